import { describe, expect, it } from 'vitest';
import { parseOneTemplate } from '../../lib/monitor/one-template.js';
import { dsLocationFromMonitordXml, hostAgentLines, parseProbeState, replicaDsLines, vmSnapshotLines, type VmProbeInput } from '../../lib/monitor/probe-lines.js';
import type { AgentState, DiskState } from '../../lib/cycle/state.js';
import { effectiveCacheLimitMb, parseFindOutput, parseStatfsLine, summarizeCache, summarizeSnaps } from '../../lib/monitor/usage.js';

const NOW = 1_732_440_000;
const disk = (vmId: number, diskId: number, extra: Partial<DiskState> = {}): DiskState => ({ vmId, diskId, checkpoint: null, base1Identity: null, failCount: 0, freqSeconds: 600, ...extra });
const ok = (capturedAt: number) => ({ capturedAt, finishedAt: capturedAt + 5, durationMs: 5200, bytes: 16_777_216, mode: 'incremental' as const, consistency: 'crash-consistent' as const });
function state(disks: DiskState[], heartbeatAt = NOW - 10): AgentState {
  return { version: 1, updatedAt: NOW, daemon: { pid: 1, startedAt: NOW - 1000, heartbeatAt, version: '0.1.0' }, disks: Object.fromEntries(disks.map((d) => [`${d.vmId}.${d.diskId}`, d])), baseDigests: {} };
}
const input = (s: AgentState | null, more: Partial<VmProbeInput> = {}): VmProbeInput => ({ now: NOW, stateFile: '/st/state.json', state: s, ...more });

/** Parses probe output the way monitord does: outer template, then each VM's base64 MONITOR. */
function decodeVmOutput(lines: string[]): Map<number, Array<Record<string, string>>> {
  const out = new Map<number, Array<Record<string, string>>>();
  for (const a of parseOneTemplate(`${lines.join('\n')}\n`)) {
    expect(a.name).toBe('VM');
    const v = a.value as Record<string, string>;
    const inner = parseOneTemplate(Buffer.from(v.MONITOR!, 'base64').toString('utf8'));
    out.set(Number(v.ID), inner.map((x) => { expect(x.name).toBe('DISK_RECOVERY_SNAPSHOT'); return x.value as Record<string, string>; }));
  }
  return out;
}

describe('vm/snapshot lines', () => {
  it('success: TIMESTAMP is the point in time, with mode, consistency, bytes, duration, next due', () => {
    const vms = decodeVmOutput(vmSnapshotLines(input(state([disk(7, 0, { lastSuccess: ok(NOW - 100), nextDueAt: NOW + 500 })]))));
    expect(vms.get(7)).toEqual([{ ID: '0', TIMESTAMP: String(NOW - 100), MODE: 'incremental', CONSISTENCY: 'crash-consistent', BYTES: '16777216', DURATION: '5.2', AGE: '100', FREQ: '600', NEXT_DUE: String(NOW + 500) }]);
  });

  it('failure after a success: MSG="ERROR code: message" with the previous timestamp kept', () => {
    const msg = 'ssh: "replica" said\nline two \\';
    const d = disk(7, 1, { lastSuccess: ok(NOW - 700), lastError: { code: 'E_SSH', message: msg, at: NOW - 20 }, failCount: 3 });
    const r = decodeVmOutput(vmSnapshotLines(input(state([d])))).get(7)![0]!;
    expect(r.MSG).toBe('ERROR E_SSH: ssh: "replica" said\\nline two \\ ');
    expect(r).toMatchObject({ ID: '1', ERROR_CODE: 'E_SSH', LAST_TIMESTAMP: String(NOW - 700), FAIL_COUNT: '3' });
    expect(r.TIMESTAMP).toBeUndefined();
  });

  it('an error older than the last success is history, not the current status', () => {
    const d = disk(7, 0, { lastSuccess: ok(NOW - 50), lastError: { code: 'E_SSH', message: 'x', at: NOW - 400 } });
    expect(decodeVmOutput(vmSnapshotLines(input(state([d])))).get(7)![0]!.TIMESTAMP).toBe(String(NOW - 50));
  });

  it('overdue and never-snapshotted disks are errors', () => {
    const vms = decodeVmOutput(vmSnapshotLines(input(state([disk(3, 0, { lastSuccess: ok(NOW - 5000) }), disk(3, 1, { phase: 'seeding', progress: { sent: 25, total: 100, at: NOW } })]))));
    expect(vms.get(3)![0]!.MSG).toMatch(/^ERROR snapshot overdue: last one 5000 s old, frequency 600 s$/);
    expect(vms.get(3)![1]!.MSG).toBe('ERROR first snapshot in progress (25% sent)');
  });

  it('stale heartbeat: every disk discovery finds gets an ERROR, state-only disks are dropped', () => {
    const s = state([disk(9, 0, { lastSuccess: ok(NOW - 100) }), disk(99, 0)], NOW - 3600);
    const vms = decodeVmOutput(vmSnapshotLines(input(s, { discovered: [{ vmId: 9, diskId: 0 }, { vmId: 10, diskId: 2 }] })));
    expect([...vms.keys()]).toEqual([9, 10]);
    expect(vms.get(9)![0]!.MSG).toMatch(/^ERROR onestor-agent is not running \(last heartbeat 3600 s ago/);
    expect(vms.get(9)![0]!.LAST_TIMESTAMP).toBe(String(NOW - 100));
    expect(vms.get(10)![0]).toMatchObject({ ID: '2', ERROR_CODE: 'E_AGENT_DOWN' });
  });

  it('unreadable state + failed discovery: a comment line, still valid template text', () => {
    const lines = vmSnapshotLines(input(null, { stateError: 'reading /st/state.json timed out', discoveryError: 'discovery timed out' }));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^# onestor-agent probe: ERROR .*timed out.*discovery timed out/);
    expect(parseOneTemplate(`${lines[0]}\n`)).toEqual([]);
  });

  it('a zero-filled state file (power loss): the error comment carries no raw NUL and ends where it should', () => {
    let stateError = '';
    try {
      parseProbeState('\u0000'.repeat(64), '/st/state.json');
    } catch (e) {
      stateError = (e as Error).message;
    }
    expect(stateError).toContain('\u0000');
    const lines = vmSnapshotLines(input(null, { stateError }));
    expect(lines.join('\n')).not.toMatch(/[\u0000-\u0008]/);
    // OpenNebula reads the output as a C string: a NUL would cut the comment and break the record after it
    expect(parseOneTemplate(`${lines.join('\n')}\nNEXT = "kept"\n`)).toMatchObject([{ name: 'NEXT', value: 'kept' }]);
  });

  it('VMs and disks are sorted and grouped, one VM line each', () => {
    const lines = vmSnapshotLines(input(state([disk(20, 1, { lastSuccess: ok(NOW) }), disk(3, 0, { lastSuccess: ok(NOW) }), disk(20, 0, { lastSuccess: ok(NOW) })])));
    const vms = decodeVmOutput(lines);
    expect([...vms.keys()]).toEqual([3, 20]);
    expect(vms.get(20)!.map((d) => d.ID)).toEqual(['0', '1']);
  });
});

describe('state reading for the probe', () => {
  it('names the file and the bad field', () => {
    expect(() => parseProbeState('{"version":1,"disks":{"7.0":{"vmId":"7","diskId":0}}}', '/s.json')).toThrow(expect.objectContaining({ code: 'E_STATE', context: expect.objectContaining({ file: '/s.json', field: 'disks.7.0.vmId' }) }));
    expect(() => parseProbeState('not json', '/s.json')).toThrow(/not valid JSON/);
    expect(() => parseProbeState('[]', '/s.json')).toThrow(/expected a JSON object/);
    expect(() => parseProbeState('{"version":2,"disks":{}}', '/s.json')).toThrow(/version/);
    expect(() => parseProbeState('{"version":1,"disks":{"1.0":{"vmId":1,"diskId":0,"lastSuccess":{"capturedAt":"x"}}}}', '/s.json')).toThrow(expect.objectContaining({ context: expect.objectContaining({ field: 'disks.1.0.lastSuccess.capturedAt' }) }));
  });

  it('accepts a state the daemon writes', () => {
    const s = state([disk(1, 0, { lastSuccess: ok(NOW) })]);
    expect(parseProbeState(JSON.stringify(s), '/s.json').disks['1.0']!.lastSuccess!.capturedAt).toBe(NOW);
  });

  it('DATASTORE_LOCATION from monitord XML, hostile values fall back', () => {
    expect(dsLocationFromMonitordXml('<MONITORD_CONFIG><DATASTORE_LOCATION>/srv/ds</DATASTORE_LOCATION></MONITORD_CONFIG>')).toBe('/srv/ds');
    expect(dsLocationFromMonitordXml('<X><DATASTORE_LOCATION><![CDATA[/a&b]]></DATASTORE_LOCATION></X>')).toBe('/a&b');
    expect(dsLocationFromMonitordXml('<X><DATASTORE_LOCATION>rel/path</DATASTORE_LOCATION></X>')).toBeNull();
    expect(dsLocationFromMonitordXml('garbage')).toBeNull();
  });
});

describe('host/system agent line', () => {
  it('counts protected, failing, overdue disks, oldest age and recent bytes', () => {
    const s = state([disk(1, 0, { lastSuccess: ok(NOW - 100) }), disk(1, 1, { lastSuccess: ok(NOW - 9000) }), disk(2, 0, { lastError: { code: 'E_SSH', message: 'down', at: NOW } })]);
    const a = parseOneTemplate(`${hostAgentLines({ ...input(s), probeVersion: '0.1.0' }).join('\n')}\n`);
    expect(a[0]!.name).toBe('ONESTOR_AGENT');
    expect(a[0]!.value).toMatchObject({ STATUS: 'RUNNING', VERSION: '0.1.0', HEARTBEAT_AGE: '10', PROTECTED_DISKS: '3', FAILING_DISKS: '2', OVERDUE_DISKS: '1', OLDEST_SNAPSHOT_AGE: '9000', BYTES_SENT_RECENT: '16777216' });
  });

  it('no state at all: DOWN with the reason', () => {
    const a = parseOneTemplate(hostAgentLines({ ...input(null, { stateError: 'no state file /st/state.json' }), probeVersion: '0.1.0' })[0]!);
    expect(a[0]!.value).toMatchObject({ STATUS: 'DOWN', PROTECTED_DISKS: '0', MSG: 'ERROR onestor-agent state unreadable: no state file /st/state.json' });
  });
});

describe('replica datastore lines', () => {
  const fs = { totalMb: 100_000, usedMb: 60_000, freeMb: 40_000 };
  const settings = { REPLICA_MAX_SIZE_MB: null, REPLICA_MAX_USED_PERC: 90, REPLICA_RECOVERY_SNAPS_DIR: '/ds/replica_snaps' };

  it('prints monitor_ds.rb-compatible lines with numeric cache size, limit and snaps area', () => {
    const lines = replicaDsLines({
      location: { ok: true, value: fs },
      datastores: [
        { id: 101, tm: 'replica', fs: { ok: true, value: fs }, cache: { ok: true, value: { usedMb: 2048, images: 3, truncated: false, measuredAt: NOW } } },
        { id: 0, tm: 'ssh', fs: { ok: false, error: 'stat -f: no answer within 900 ms (hung filesystem?)' } },
      ],
      settings,
      snaps: { fs: { ok: true, value: fs }, usage: { ok: true, value: { usedMb: 512, vms: 2, completeDisks: 3, incompleteDisks: 1, truncated: false, measuredAt: NOW } } },
    });
    const a = parseOneTemplate(`${lines.join('\n')}\n`);
    expect(a.map((x) => x.name)).toEqual(['DS_LOCATION_USED_MB', 'DS_LOCATION_TOTAL_MB', 'DS_LOCATION_FREE_MB', 'DS', 'DS', 'ONESTOR_REPLICA_SNAPS']);
    expect(a[3]!.value).toMatchObject({ ID: '0', USED_MB: '0', TOTAL_MB: '0', FREE_MB: '0', MSG: 'ERROR statfs: stat -f: no answer within 900 ms (hung filesystem?)' });
    // 90% of 100000 - 60000 used + 2048 cache
    expect(a[4]!.value).toMatchObject({ ID: '101', REPLICA_CACHE: 'YES', REPLICA_CACHE_SIZE: '2048', REPLICA_IMAGES: '3', REPLICA_CACHE_LIMIT_MB: '32048', REPLICA_CACHE_LIMIT_FROM: 'REPLICA_MAX_USED_PERC', REPLICA_CACHE_OVER_LIMIT: 'NO', USED_MB: '60000' });
    expect(a[5]!.value).toMatchObject({ PATH: '/ds/replica_snaps', USED_MB: '512', VMS: '2', DISKS: '3', INCOMPLETE_DISKS: '1', FS_FREE_MB: '40000' });
  });

  it('REPLICA_MAX_SIZE_MB wins when set', () => {
    expect(effectiveCacheLimitMb({ REPLICA_MAX_SIZE_MB: 1000, REPLICA_MAX_USED_PERC: 90 }, fs, 5000)).toEqual({ limitMb: 1000, from: 'REPLICA_MAX_SIZE_MB' });
  });

  it('a dead DS location: no DS_LOCATION lines, an error attribute instead', () => {
    const a = parseOneTemplate(replicaDsLines({ location: { ok: false, error: 'timed out' }, datastores: [], settings, settingsError: 'E_SSHRC: "bad"' }).join('\n'));
    expect(a).toEqual([{ name: 'ONESTOR_PROBE_ERROR', value: 'ERROR datastore location: timed out; driver settings: E_SSHRC: "bad"', line: 1 }]);
  });
});

describe('walk and statfs parsing', () => {
  it('statfs line in MiB rounded up like df -B1M', () => {
    expect(parseStatfsLine('4096 262144 131072 120000\n')).toEqual({ totalMb: 1024, usedMb: 512, freeMb: 469 });
    expect(parseStatfsLine('garbage')).toBeNull();
  });

  it('find records: NUL separated, names with spaces and newlines, cut record dropped', () => {
    const buf = Buffer.from('f 8 1 abc-123\0f 8 1 abc.md5sum\0d 0 1 7\0d 0 2 7/disk.0.snap\0f 2048 3 7/disk.0.snap/base\0f 16 3 7/disk.0.snap/base.1\0d 0 2 7/disk.1.snap\0f 8 1 odd\nname\0f 9 1 cut');
    const e = parseFindOutput(buf);
    expect(e).toHaveLength(8);
    expect(e[7]).toEqual({ type: 'f', allocated: 4096, depth: 1, rel: 'odd\nname' });
    expect(summarizeCache({ entries: e, truncated: false, missing: false })).toMatchObject({ images: 1 });
    expect(summarizeSnaps({ entries: e, truncated: true, missing: false })).toEqual({ usedMb: 2, vms: 1, completeDisks: 1, incompleteDisks: 1, truncated: true });
  });
});
