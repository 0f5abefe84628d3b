/**
 * `onestor-agent status`, the OpenNebula probe lines (vm/snapshot and host ONESTOR_AGENT) and the
 * Prometheus textfile must never disagree about the same disk: the same state fixture goes through
 * all of them and each disk must get the same verdict everywhere. Includes the cases where the three
 * rules used to differ (a slow cycle inside freq + 2 x cycle; a heartbeat between 120 s and 180 s).
 */
import { describe, expect, it } from 'vitest';
import { parseOneTemplate } from '../../lib/monitor/one-template.js';
import { hostAgentLines, vmSnapshotLines } from '../../lib/monitor/probe-lines.js';
import { metricsText } from '../../lib/monitor/prometheus.js';
import { assess, type VerdictKind } from '../../lib/monitor/assessment.js';
import { buildStatus } from '../../lib/monitor/status.js';
import type { AgentState, DiskState } from '../../lib/cycle/state.js';
import type { EligibleDisk } from '../../lib/shared/model.js';

const NOW = 1_732_440_000;
const success = (age: number, durationS = 5) => ({ capturedAt: NOW - age, finishedAt: NOW - age + durationS, durationMs: durationS * 1000, bytes: 1 << 20, mode: 'incremental' as const, consistency: 'crash-consistent' as const });
const disk = (vmId: number, diskId: number, extra: Partial<DiskState>): DiskState => ({ vmId, diskId, checkpoint: null, base1Identity: null, failCount: 0, freqSeconds: 600, ...extra });

/** One disk of each kind; `want` is the verdict all outputs must show while the daemon is alive. */
const FIXTURE: Array<{ d: DiskState; want: VerdictKind; what: string }> = [
  { what: 'fresh', want: 'ok', d: disk(7, 0, { lastSuccess: success(100) }) },
  { what: 'overdue', want: 'overdue', d: disk(7, 1, { lastSuccess: success(2000) }) },
  { what: 'failing (error newer than the last success)', want: 'failing', d: disk(8, 0, { lastSuccess: success(100), failCount: 2, lastError: { code: 'E_SSH', message: 'replica unreachable', at: NOW - 10 } }) },
  { what: 'never snapshotted, first cycle running', want: 'never', d: disk(8, 1, { phase: 'running', progress: { sent: 5, total: 10, at: NOW } }) },
  // 700 s old, 100 s cycles: inside freq + cycle + grace (760 s); the old status rule said overdue (> 660 s),
  // the old probe rule ok (< 600 + 2 x 100)
  { what: 'slow cycle, within freq + cycle + grace', want: 'ok', d: disk(9, 0, { lastSuccess: success(700, 100), phase: 'running' }) },
  // 700 s old, 5 s cycles: beyond freq + cycle + grace (665 s)
  { what: 'fast cycle, beyond freq + cycle + grace', want: 'overdue', d: disk(9, 1, { lastSuccess: success(700, 5) }) },
];

function stateWith(heartbeatAge: number): AgentState {
  return {
    version: 1,
    host: 'kvm-1',
    updatedAt: NOW,
    daemon: { pid: 4242, startedAt: NOW - 5000, heartbeatAt: NOW - heartbeatAge, version: '0.1.0', grace: { minSec: 60, percent: 10 } },
    disks: Object.fromEntries(FIXTURE.map(({ d }) => [`${d.vmId}.${d.diskId}`, d])),
    baseDigests: {},
  };
}

const eligible: EligibleDisk[] = FIXTURE.map(({ d }) => ({
  vmId: d.vmId,
  diskId: d.diskId,
  dsId: 0,
  dsDir: '/ds/0',
  vmDir: `/ds/0/${d.vmId}`,
  domainName: `one-${d.vmId}`,
  freqSeconds: 600,
  replicaHost: 'replica',
  snapDir: `/ds/0/${d.vmId}/disk.${d.diskId}.snap`,
  basePath: `/ds/0/${d.vmId}/disk.${d.diskId}.snap/base`,
  base1Path: `/ds/0/${d.vmId}/disk.${d.diskId}.snap/base.1`,
}));

interface Seen {
  status: string;
  /** the code status shows ('ok' when none) */
  statusCode: string;
  probe: string; // 'ok' or the ERROR_CODE
  prometheusOk: number;
}

/** Every output for one state, reduced to one verdict per disk. */
function outputs(state: AgentState) {
  const status = buildStatus({ now: NOW, state, stateFile: '/st/state.json', eligible, ineligible: [] });
  // the probe as it runs with a dead daemon: discovery names the disks
  const a = assess({ now: NOW, state, stateFile: '/st/state.json', discovered: eligible.map((e) => ({ vmId: e.vmId, diskId: e.diskId, freqSeconds: e.freqSeconds })) });
  const vmLines = vmSnapshotLines({ now: NOW, state, stateFile: '/st/state.json' }, a);
  const host = parseOneTemplate(hostAgentLines({ now: NOW, state, stateFile: '/st/state.json', probeVersion: 't' }, a).join('\n'))[0]!.value as Record<string, string>;
  const prom = metricsText(a, NOW, state.host);
  const seen = new Map<string, Seen>();
  for (const r of status.rows) seen.set(`${r.vm}.${r.disk}`, { status: r.health, statusCode: r.code ?? 'ok', probe: '', prometheusOk: -1 });
  for (const l of parseOneTemplate(vmLines.join('\n'))) {
    const v = l.value as Record<string, string>;
    for (const d of parseOneTemplate(Buffer.from(v.MONITOR!, 'base64').toString())) {
      const x = d.value as Record<string, string>;
      seen.get(`${v.ID}.${x.ID}`)!.probe = x.TIMESTAMP ? 'ok' : x.ERROR_CODE!;
    }
  }
  for (const m of prom.matchAll(/^onestor_disk_ok\{host="kvm-1",vm="(\d+)",disk="(\d+)"\} (\d)$/gm)) seen.get(`${m[1]}.${m[2]}`)!.prometheusOk = Number(m[3]);
  const gauge = (name: string) => Number(new RegExp(`^${name}\\{host="kvm-1"\\} (\\S+)$`, 'm').exec(prom)![1]);
  return { status, host, seen, gauge };
}

const CODE: Record<VerdictKind, string> = { ok: 'ok', overdue: 'E_OVERDUE', failing: 'E_SSH', never: 'E_NO_SNAPSHOT', 'daemon-down': 'E_AGENT_DOWN' };

describe('status, probe lines and Prometheus agree on the same state', () => {
  it('daemon alive: each disk has the same verdict in the three outputs', () => {
    const { status, host, seen, gauge } = outputs(stateWith(10));
    for (const { d, want, what } of FIXTURE) {
      const s = seen.get(`${d.vmId}.${d.diskId}`)!;
      expect({ what, ...s }).toEqual({ what, status: want, statusCode: CODE[want], probe: CODE[want], prometheusOk: want === 'ok' ? 1 : 0 });
    }
    const notOk = FIXTURE.filter((f) => f.want !== 'ok').length;
    const overdue = status.rows.filter((r) => r.overdue).length;
    expect(overdue).toBe(2);
    expect(Number(host.FAILING_DISKS)).toBe(notOk);
    expect(gauge('onestor_failing_disks')).toBe(notOk);
    expect(Number(host.OVERDUE_DISKS)).toBe(overdue);
    expect(status.daemon.alive).toBe(true);
    expect(host.STATUS).toBe('RUNNING');
    expect(gauge('onestor_agent_up')).toBe(1);
  });

  it('a heartbeat 150 s old is alive everywhere (status used to say down at rescanSec 30)', () => {
    const { status, host, gauge } = outputs(stateWith(150));
    expect([status.daemon.alive, host.STATUS, gauge('onestor_agent_up')]).toEqual([true, 'RUNNING', 1]);
  });

  it('daemon down (heartbeat 200 s old): every disk is daemon-down in the three outputs', () => {
    const { status, host, seen, gauge } = outputs(stateWith(200));
    expect([status.daemon.alive, host.STATUS, gauge('onestor_agent_up')]).toEqual([false, 'DOWN', 0]);
    for (const { d } of FIXTURE) expect(seen.get(`${d.vmId}.${d.diskId}`)).toEqual({ status: 'daemon-down', statusCode: 'E_AGENT_DOWN', probe: 'E_AGENT_DOWN', prometheusOk: 0 });
    expect(host.MSG).toMatch(/^ERROR onestor-agent is not running \(last heartbeat 200 s ago, limit 180 s/);
  });

  it('daemon down: status still names the last cycle\'s failure (a CLI snapshot recorded it) beside the verdict', () => {
    const { status } = outputs(stateWith(200));
    const row = status.rows.find((r) => r.vm === 8 && r.disk === 0)!;
    expect([row.health, row.code]).toEqual(['daemon-down', 'E_AGENT_DOWN']);
    expect(row.detail).toBe('daemon not running; last cycle failed 2x E_SSH: replica unreachable');
    expect(status.rows.find((r) => r.vm === 7 && r.disk === 0)!.detail).toBe('daemon not running');
  });

  it('the grace the daemon recorded in the state is the one everybody uses', () => {
    const s = stateWith(10);
    s.daemon!.grace = { minSec: 1000, percent: 0 };
    const { seen } = outputs(s);
    // limit 600 + 5 + 1000 = 1605 s: 2000 s old is still overdue, 700 s old is now ok
    expect(seen.get('7.1')).toEqual({ status: 'overdue', statusCode: 'E_OVERDUE', probe: 'E_OVERDUE', prometheusOk: 0 });
    expect(seen.get('9.1')).toEqual({ status: 'ok', statusCode: 'ok', probe: 'ok', prometheusOk: 1 });
  });
});
