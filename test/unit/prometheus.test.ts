import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { assess, summarize } from '../../lib/monitor/assessment.js';
import { escapeLabelValue, formatMetrics, metricsText, writeTextfile } from '../../lib/monitor/prometheus.js';
import type { AgentState } from '../../lib/cycle/state.js';

const NOW = 1_732_440_000;
const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*")*)?\})? (-?[0-9.e+]+|NaN|[+-]Inf)$/;

/** Checks every line against the text exposition format and returns samples by name. */
function parseExposition(text: string): Map<string, Array<{ labels: string; value: number }>> {
  expect(text.endsWith('\n')).toBe(true);
  const out = new Map<string, Array<{ labels: string; value: number }>>();
  const typed = new Set<string>();
  for (const line of text.slice(0, -1).split('\n')) {
    if (line.startsWith('# HELP ')) continue;
    const t = /^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (gauge|counter)$/.exec(line);
    if (t) {
      expect(typed.has(t[1]!)).toBe(false);
      typed.add(t[1]!);
      continue;
    }
    const m = SAMPLE.exec(line);
    expect(m, `bad exposition line: ${line}`).not.toBeNull();
    expect(typed.has(m![1]!)).toBe(true);
    const list = out.get(m![1]!) ?? [];
    list.push({ labels: m![3] ?? '', value: Number(m![4]) });
    out.set(m![1]!, list);
  }
  return out;
}

const state: AgentState = {
  version: 1,
  updatedAt: NOW,
  host: 'kvm-1 "rack\\2"\n',
  daemon: { pid: 1, startedAt: NOW - 100, heartbeatAt: NOW - 5 },
  disks: {
    '7.0': { vmId: 7, diskId: 0, checkpoint: null, base1Identity: null, failCount: 0, freqSeconds: 600, lastSuccess: { capturedAt: NOW - 60, finishedAt: NOW - 55, durationMs: 5000, bytes: 1024, mode: 'full', consistency: 'crash-consistent' } },
    '7.1': { vmId: 7, diskId: 1, checkpoint: null, base1Identity: null, failCount: 2, freqSeconds: 600, lastError: { code: 'E_SSH', message: 'x', at: NOW }, lineageAlert: { at: NOW - 10, kind: 'token-mismatch', reason: 'token mismatch: ...' } },
  },
  baseDigests: {},
};

describe('prometheus textfile', () => {
  it('same figures as the probe, labelled by vm and disk, with a timestamp metric', () => {
    const m = parseExposition(metricsText(assess({ now: NOW, stateFile: '/s', state }), NOW, state.host));
    const host = `host="${escapeLabelValue(state.host!)}"`;
    expect(m.get('onestor_probe_timestamp_seconds')).toEqual([{ labels: host, value: NOW }]);
    expect(m.get('onestor_agent_up')![0]!.value).toBe(1);
    expect(m.get('onestor_disk_ok')).toEqual([
      { labels: `${host},vm="7",disk="0"`, value: 1 },
      { labels: `${host},vm="7",disk="1"`, value: 0 },
    ]);
    expect(m.get('onestor_disk_snapshot_age_seconds')).toEqual([{ labels: `${host},vm="7",disk="0"`, value: 60 }]);
    expect(m.get('onestor_disk_fail_count')![1]!.value).toBe(2);
    expect(m.get('onestor_failing_disks')![0]!.value).toBe(1);
    expect(m.get('onestor_disk_lineage_alert_timestamp_seconds')).toEqual([{ labels: `${host},vm="7",disk="1"`, value: NOW - 10 }]);
    expect(summarize(assess({ now: NOW, stateFile: '/s', state }), NOW).lineageAlertsRecent).toBe(1);
  });

  it('escapes label values and refuses bad names', () => {
    expect(escapeLabelValue('a"b\\c\nd')).toBe('a\\"b\\\\c\\nd');
    expect(() => formatMetrics([{ name: 'bad-name', help: '', type: 'gauge', samples: [] }])).toThrow(RangeError);
    expect(() => formatMetrics([{ name: 'ok', help: '', type: 'gauge', samples: [{ labels: { __x: 1 }, value: 1 }] }])).toThrow(RangeError);
    expect(formatMetrics([{ name: 'n', help: 'h\\x\ny', type: 'gauge', samples: [{ value: Number.NaN }] }])).toBe('# HELP n h\\\\x\\ny\n# TYPE n gauge\nn NaN\n');
  });

  const dirs: string[] = [];
  afterAll(async () => {
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  });

  it('atomic write: replaces the file and leaves no temp file; a missing dir is an error, not a throw', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'onestor-prom-'));
    dirs.push(dir);
    const file = path.join(dir, 'onestor.prom');
    expect((await writeTextfile(file, 'a 1\n')).ok).toBe(true);
    expect((await writeTextfile(file, 'a 2\n')).ok).toBe(true);
    expect(await readFile(file, 'utf8')).toBe('a 2\n');
    expect(await readdir(dir)).toEqual(['onestor.prom']);
    const bad = await writeTextfile(path.join(dir, 'nope', 'x.prom'), 'a 1\n');
    expect(bad.ok).toBe(false);
  });
});
