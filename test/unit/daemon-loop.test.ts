/**
 * The daemon loop (lib/daemon/loop.ts) with fake ports: an in-memory state file, a fake discovery and
 * cycle, a captured Prometheus textfile. What the daemon writes from memory must say what the probe
 * says when it reads the same state file. The heartbeat marks (marks.ts) are checked on their own.
 */
import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { startDaemon, type DaemonConfig, type DaemonStatePort } from '../../lib/daemon/loop.js';
import { applyMarks } from '../../lib/daemon/marks.js';
import { SdNotify } from '../../lib/daemon/sd-notify.js';
import { emptyState, getDisk, recordSuccess, diskKey, type AgentState } from '../../lib/cycle/state.js';
import { createLogger } from '../../lib/shared/log.js';
import { parseOneTemplate } from '../../lib/monitor/one-template.js';
import { vmSnapshotLines } from '../../lib/monitor/probe-lines.js';
import type { EligibleDisk } from '../../lib/shared/model.js';
import type { DiskView } from '../../lib/daemon/schedule.js';

const log = createLogger({ stream: new Writable({ write: (_c, _e, cb) => cb() }), journal: false, level: 'warn' });

const disk: EligibleDisk = {
  vmId: 7,
  diskId: 0,
  dsId: 0,
  dsDir: '/ds/0',
  vmDir: '/ds/0/7',
  domainName: 'one-7',
  freqSeconds: 600,
  replicaHost: 'replica',
  snapDir: '/ds/0/7/disk.0.snap',
  basePath: '/ds/0/7/disk.0.snap/base',
  base1Path: '/ds/0/7/disk.0.snap/base.1',
};

const config: DaemonConfig = {
  datastoreLocation: '/ds',
  stagingDirName: '.onestor',
  schedule: { rescanSec: 60, graceMinSec: 45, gracePercent: 5, backoffBaseSec: 30, backoffMaxSec: 1800, spreadSec: 0 },
  limits: { concurrency: 1 },
};

/** The state file in memory: every read and write goes through JSON, as the real one does. */
function memoryState(): DaemonStatePort & { current(): AgentState } {
  let text = JSON.stringify(emptyState(Date.now() / 1000));
  return {
    file: '/mem/state.json',
    current: () => JSON.parse(text) as AgentState,
    loadOrReset: async () => ({ state: JSON.parse(text) as AgentState }),
    update: async (fn) => {
      const s = JSON.parse(text) as AgentState;
      const next = fn(s) ?? s;
      text = JSON.stringify(next);
      return JSON.parse(text) as AgentState;
    },
  };
}

describe('daemon loop with fake ports', () => {
  it('a forced cycle is recorded, and the textfile written from memory agrees with the probe on the same state', async () => {
    const state = memoryState();
    const metrics: string[] = [];
    let cycles = 0;
    const h = startDaemon({
      config,
      log,
      heartbeatMs: 60_000,
      deps: {
        state,
        hostName: 'kvm-1',
        version: 't',
        notifier: new SdNotify({ env: {} }),
        discover: async () => ({ eligible: [disk], ineligible: [] }),
        // as the real cycle does: it records its own outcome in the state, then returns it
        runCycle: async (req) => {
          cycles++;
          const capturedAt = Math.floor(Date.now() / 1000) - 1;
          await state.update((s) => {
            s.disks[diskKey(7, 0)] = recordSuccess(getDisk(s, 7, 0), { capturedAt, finishedAt: capturedAt + 1, durationMs: 1000, bytes: 42, mode: 'full', consistency: 'crash-consistent', checkpoint: 'ck1', base1Identity: 'i' });
          });
          return req.disks.map((d) => ({ vmId: 7, diskId: d.diskId, ok: true, capturedAt, durationMs: 1000, bytes: 42 }));
        },
        writeMetrics: async (text) => {
          metrics.push(text);
        },
      },
    });
    await h.ready;
    // before any snapshot: the disk is known, has none yet, and the textfile says so
    expect(metrics.at(-1)).toMatch(/^onestor_disk_ok\{host="kvm-1",vm="7",disk="0"\} 0$/m);
    expect(h.force(7)).toBe(1);
    for (let i = 0; i < 200 && !/onestor_disk_ok\{[^}]*\} 1/.test(metrics.at(-1) ?? ''); i++) await new Promise((r) => setTimeout(r, 10));
    h.stop();
    await h.done;
    expect(cycles).toBe(1);
    const final = state.current();
    // the grace the daemon runs with is in the state, for the probe and `status`
    expect(final.daemon).toMatchObject({ pid: process.pid, version: 't', grace: { minSec: 45, percent: 5 } });
    const last = metrics.at(-1)!;
    expect(last).toMatch(/^onestor_agent_up\{host="kvm-1"\} 1$/m);
    expect(last).toMatch(/^onestor_disk_ok\{host="kvm-1",vm="7",disk="0"\} 1$/m);
    expect(last).toMatch(new RegExp(`^onestor_disk_snapshot_timestamp_seconds\\{host="kvm-1",vm="7",disk="0"\\} ${final.disks['7.0']!.lastSuccess!.capturedAt}$`, 'm'));
    // the probe reading the same state file
    const vm = parseOneTemplate(vmSnapshotLines({ now: Date.now() / 1000, state: final, stateFile: state.file }).join('\n'))[0]!.value as Record<string, string>;
    const line = parseOneTemplate(Buffer.from(vm.MONITOR!, 'base64').toString())[0]!.value as Record<string, string>;
    expect(line.TIMESTAMP).toBe(String(final.disks['7.0']!.lastSuccess!.capturedAt));
  });
});

describe('heartbeat marks', () => {
  const view = (over: Partial<DiskView>): DiskView => ({ vmId: 7, diskId: 0, freqSeconds: 600, running: false, forced: false, dueMono: 0, nextDueAt: 1000, ageSec: null, overdue: false, failCount: 0, ...over });
  const marks = (v: DiskView, progress = new Map<string, { sent: number; total: number; at: number }>()) => ({
    host: 'kvm-1',
    daemon: { pid: 1, startedAt: 1, heartbeatAt: 2 },
    view: [v],
    eligible: new Map([['7.0', disk]]),
    progress,
  });

  it('running: phase and progress; done: the daemon clears its own phase but keeps a CLI one', () => {
    const s = emptyState(0);
    applyMarks(s, marks(view({ running: true }), new Map([['7.0', { sent: 1, total: 2, at: 3 }]])));
    expect(s.disks['7.0']).toMatchObject({ phase: 'running', progress: { sent: 1, total: 2 }, nextDueAt: 1000, domainName: 'one-7', freqSeconds: 600 });
    applyMarks(s, marks(view({})));
    expect(s.disks['7.0']!.phase).toBeUndefined();
    expect(s.disks['7.0']!.progress).toBeUndefined();
    s.disks['7.0']!.phase = 'capture';
    applyMarks(s, marks(view({})));
    expect(s.disks['7.0']!.phase).toBe('capture');
    expect(s.daemon).toEqual({ pid: 1, startedAt: 1, heartbeatAt: 2 });
    expect(s.host).toBe('kvm-1');
  });

  it('queued: phase queued with the time it started waiting', () => {
    const s = emptyState(0);
    applyMarks(s, marks(view({ queuedSince: 500 })));
    expect(s.disks['7.0']).toMatchObject({ phase: 'queued', queuedSince: 500 });
  });
});
