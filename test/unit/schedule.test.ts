import { describe, it, expect } from 'vitest';
import {
  Scheduler,
  backoffMs,
  overdueLimitSec,
  spreadOffsetMs,
  alignWindowMs,
  type KnownDisk,
  type SchedulerOptions,
  type VmStart,
} from '../../lib/daemon/schedule.js';
import { OnestorError } from '../../lib/shared/errors.js';

const BASE: SchedulerOptions = {
  graceMinSec: 60,
  gracePercent: 10,
  backoffBaseSec: 30,
  backoffMaxSec: 900,
  spreadSec: 0,
  concurrency: 2,
  host: 'hv1',
};

const WALL0 = Date.UTC(2026, 0, 15, 12, 0, 0); // epoch ms at mono 0
const MONO0 = 1_000_000; // monotonic clocks do not start at 0

interface StartRecord extends VmStart {
  mono: number;
}

/**
 * Drives a Scheduler the way the daemon does, on a fake monotonic clock (events only) and a fake
 * wall clock given as a function of monotonic time (so jumps can be placed anywhere).
 */
function simulate(
  s: Scheduler,
  o: {
    untilMono: number;
    startMono?: number;
    wallAt?: (mono: number) => number;
    cycleMs?: (vmId: number) => number;
    fails?: (vmId: number, diskId: number, mono: number) => boolean;
    floorCapturedAt?: boolean;
    captureDelayMs?: number;
  },
) {
  const wallAt = o.wallAt ?? ((m: number) => WALL0 + (m - MONO0));
  const cycleMs = o.cycleMs ?? (() => 1000);
  const starts: StartRecord[] = [];
  const pending: Array<{ at: number; start: VmStart; startedMono: number }> = [];
  let maxInFlight = 0;
  let t = o.startMono ?? MONO0;
  for (let guard = 0; guard < 1_000_000; guard++) {
    // finish everything due at t first, then start
    pending.sort((a, b) => a.at - b.at);
    while (pending.length && pending[0]!.at <= t) {
      const p = pending.shift()!;
      const startedWallMs = wallAt(p.startedMono);
      const capturedMs = wallAt(p.startedMono + (o.captureDelayMs ?? 0));
      const capturedAt = o.floorCapturedAt ? Math.floor(capturedMs / 1000) : capturedMs / 1000;
      s.finished(
        p.start.vmId,
        p.start.diskIds.map((diskId) => {
          const failed = o.fails?.(p.start.vmId, diskId, p.startedMono) ?? false;
          return failed ? { diskId, ok: false } : { diskId, ok: true, capturedAt };
        }),
        { startedMono: p.startedMono, finishedMono: p.at, startedWallMs },
      );
    }
    for (const st of s.takeDue(t)) {
      starts.push({ ...st, mono: t });
      pending.push({ at: t + cycleMs(st.vmId), start: st, startedMono: t });
    }
    maxInFlight = Math.max(maxInFlight, s.inFlight().length);
    expect(s.inFlight().length).toBe(pending.length);
    const wake = s.nextWake(t);
    const nextFinish = pending.length ? Math.min(...pending.map((p) => p.at)) : Infinity;
    const next = Math.min(wake ?? Infinity, nextFinish);
    if (next === Infinity || next > o.untilMono) break;
    expect(next).toBeGreaterThanOrEqual(t);
    t = next;
  }
  return { starts, maxInFlight };
}

function startsOf(starts: StartRecord[], vmId: number, diskId: number): number[] {
  return starts.filter((s) => s.vmId === vmId && s.diskIds.includes(diskId)).map((s) => s.mono);
}

function gaps(times: number[]): number[] {
  return times.slice(1).map((t, i) => t - times[i]!);
}

describe('pure helpers', () => {
  it('backoff doubles from the base, capped at backoffMaxSec and at the disk frequency', () => {
    const s = { backoffBaseSec: 30, backoffMaxSec: 900 };
    const freq = 3600_000;
    expect([1, 2, 3, 4, 5, 6].map((n) => backoffMs(n, freq, s))).toEqual([30_000, 60_000, 120_000, 240_000, 480_000, 900_000]);
    expect(backoffMs(60, freq, s)).toBe(900_000);
    expect(backoffMs(5000, freq, s)).toBe(900_000); // 2^4999 is Infinity: still capped
    expect(backoffMs(6, 300_000, s)).toBe(300_000); // never longer than a healthy disk waits
    expect(backoffMs(0, freq, s)).toBe(30_000);
  });

  it('overdue limit is freq + max(graceMin, gracePercent of freq)', () => {
    expect(overdueLimitSec(600, { graceMinSec: 60, gracePercent: 10 })).toBe(660);
    expect(overdueLimitSec(3600, { graceMinSec: 60, gracePercent: 10 })).toBe(3960);
    expect(overdueLimitSec(60, { graceMinSec: 60, gracePercent: 10 })).toBe(120);
  });

  it('spread offset is fixed per (host, vm, disk), within range, and differs across hosts', () => {
    const a = spreadOffsetMs('hv1', 7, 0, 60_000);
    expect(spreadOffsetMs('hv1', 7, 0, 60_000)).toBe(a);
    expect(a).toBeGreaterThanOrEqual(0);
    expect(a).toBeLessThan(60_000);
    const hosts = Array.from({ length: 50 }, (_, i) => spreadOffsetMs(`hv${i}`, 7, 0, 60_000));
    expect(new Set(hosts.map((x) => Math.floor(x / 1000))).size).toBeGreaterThan(25); // not all in one second
    expect(spreadOffsetMs('hv1', 7, 0, 0)).toBe(0);
  });

  it('alignment window is min(10 s, 5 % of freq)', () => {
    expect(alignWindowMs(60_000)).toBe(3000);
    expect(alignWindowMs(3600_000)).toBe(10_000);
  });
});

describe('validation', () => {
  it('rejects bad options with E_CONFIG naming the field', () => {
    for (const [field, value] of [
      ['concurrency', 0],
      ['concurrency', 1.5],
      ['graceMinSec', -1],
      ['gracePercent', Number.NaN],
      ['backoffBaseSec', 0],
      ['spreadSec', Infinity],
    ] as const) {
      let err: unknown;
      try {
        new Scheduler({ ...BASE, [field]: value });
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(OnestorError);
      expect((err as OnestorError).code).toBe('E_CONFIG');
      expect((err as OnestorError).context.field).toBe(field);
    }
    expect(() => new Scheduler({ ...BASE, backoffMaxSec: 10 })).toThrow(/backoffMaxSec/);
  });

  it('leaves out disks with a hostile frequency, naming VM and disk, and keeps the others', () => {
    const s = new Scheduler(BASE);
    const r = s.sync(
      [
        { vmId: 1, diskId: 0, freqSeconds: 0 },
        { vmId: 1, diskId: 1, freqSeconds: -5 },
        { vmId: 2, diskId: 0, freqSeconds: Number.NaN },
        { vmId: 3, diskId: 0, freqSeconds: Infinity },
        { vmId: 4, diskId: 2, freqSeconds: 60 },
      ],
      MONO0,
      WALL0,
    );
    expect(r.rejected).toHaveLength(4);
    expect(r.rejected.map((e) => [e.context.vm, e.context.disk, e.context.field])).toEqual([
      [1, 0, 'RECOVERY_SNAPSHOT_FREQ'],
      [1, 1, 'RECOVERY_SNAPSHOT_FREQ'],
      [2, 0, 'RECOVERY_SNAPSHOT_FREQ'],
      [3, 0, 'RECOVERY_SNAPSHOT_FREQ'],
    ]);
    expect(s.size()).toBe(1);
  });
});

describe('cadence', () => {
  it('first run from the persisted epoch (+ fixed spread), then exactly every freq after the start of the last success', () => {
    const s = new Scheduler({ ...BASE, host: 'hvA' });
    // last success 20 s ago by the wall clock
    s.sync([{ vmId: 5, diskId: 0, freqSeconds: 60, lastSuccessAt: WALL0 / 1000 - 20 }], MONO0, WALL0);
    const offset = spreadOffsetMs('hvA', 5, 0, 6000); // min(60/10, 60) s
    const { starts } = simulate(s, { untilMono: MONO0 + 10 * 60_000, cycleMs: () => 4000 });
    const t = startsOf(starts, 5, 0);
    expect(t[0]).toBe(MONO0 + 40_000 + offset);
    expect(gaps(t).every((g) => g === 60_000)).toBe(true);
    expect(t.length).toBe(Math.floor((10 * 60_000 - 40_000 - offset) / 60_000) + 1);
  });

  it('anchors on the capture instant, not the cycle end, and stays within 2 s with epoch seconds', () => {
    const s = new Scheduler(BASE);
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 30, lastSuccessAt: WALL0 / 1000 }], MONO0, WALL0);
    // capture happens 1.7 s into a 9 s cycle; the state stores whole seconds
    const { starts } = simulate(s, { untilMono: MONO0 + 30 * 60_000, cycleMs: () => 9000, captureDelayMs: 1700, floorCapturedAt: true });
    const g = gaps(startsOf(starts, 1, 0));
    expect(g.length).toBeGreaterThan(50);
    for (const x of g) {
      expect(x).toBeGreaterThanOrEqual(30_000 - 1000); // floor loses < 1 s: at most that early
      expect(x).toBeLessThanOrEqual(30_000 + 2000);
    }
  });

  it('a persisted success older than freq gives ONE catch-up run (spread), not a burst', () => {
    const s = new Scheduler(BASE);
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 60, lastSuccessAt: WALL0 / 1000 - 86_400 }], MONO0, WALL0);
    const { starts } = simulate(s, { untilMono: MONO0 + 5 * 60_000 });
    const t = startsOf(starts, 1, 0);
    expect(t[0]! - MONO0).toBeLessThan(6000);
    expect(gaps(t).every((g) => g === 60_000)).toBe(true);
  });

  it('a persisted success in the future (wall stepped back before restart) waits at most one freq', () => {
    const s = new Scheduler(BASE);
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 120, lastSuccessAt: WALL0 / 1000 + 3600 }], MONO0, WALL0);
    const v = s.view(MONO0, WALL0)[0]!;
    expect(v.dueMono - MONO0).toBeGreaterThanOrEqual(120_000);
    expect(v.dueMono - MONO0).toBeLessThan(120_000 + 12_000);
    expect(v.overdue).toBe(false);
  });

  for (const [name, jumpMs] of [
    ['+1 day', 86_400_000],
    ['-1 hour', -3_600_000],
  ] as const) {
    it(`wall clock jump ${name} while running: no burst, no silence, cadence unchanged`, () => {
      const s = new Scheduler(BASE);
      const disks: KnownDisk[] = [
        { vmId: 1, diskId: 0, freqSeconds: 60, lastSuccessAt: WALL0 / 1000 - 59 },
        { vmId: 2, diskId: 0, freqSeconds: 300, lastSuccessAt: WALL0 / 1000 - 100 },
      ];
      s.sync(disks, MONO0, WALL0);
      const jumpAt = MONO0 + 17 * 60_000 + 123;
      const wallAt = (m: number) => WALL0 + (m - MONO0) + (m >= jumpAt ? jumpMs : 0);
      // the daemon re-syncs from state on every rescan: the persisted epochs now carry the jump
      const { starts } = simulate(s, { untilMono: MONO0 + 60 * 60_000, wallAt });
      for (const [vm, freq] of [
        [1, 60_000],
        [2, 300_000],
      ] as const) {
        const t = startsOf(starts, vm, 0);
        expect(gaps(t).every((g) => g === freq)).toBe(true);
        expect(t.length).toBeGreaterThanOrEqual(Math.floor(60 * 60_000 / freq) - 1);
        expect(t.length).toBeLessThanOrEqual(Math.floor(60 * 60_000 / freq) + 1);
      }
      // a rescan after the jump hands back the epochs the cycles recorded: it must not re-anchor
      const mono = MONO0 + 60 * 60_000;
      const before = s.view(mono, wallAt(mono)).map((v) => v.dueMono);
      const last1 = startsOf(starts, 1, 0).at(-1)!;
      const last2 = startsOf(starts, 2, 0).at(-1)!;
      s.sync(
        [
          { vmId: 1, diskId: 0, freqSeconds: 60, lastSuccessAt: wallAt(last1) / 1000 },
          { vmId: 2, diskId: 0, freqSeconds: 300, lastSuccessAt: wallAt(last2) / 1000 },
        ],
        mono,
        wallAt(mono),
      );
      expect(s.view(mono, wallAt(mono)).map((v) => v.dueMono)).toEqual(before);
    });
  }
});

describe('grouping', () => {
  it('disks of one VM with the same freq are captured together, first run included', () => {
    const s = new Scheduler(BASE);
    s.sync(
      [
        { vmId: 9, diskId: 0, freqSeconds: 60 },
        { vmId: 9, diskId: 1, freqSeconds: 60 },
        { vmId: 9, diskId: 2, freqSeconds: 60 },
      ],
      MONO0,
      WALL0,
    );
    const { starts } = simulate(s, { untilMono: MONO0 + 10 * 60_000 });
    expect(starts.length).toBeGreaterThanOrEqual(10);
    for (const st of starts) expect(st.diskIds).toEqual([0, 1, 2]);
  });

  it('a disk due within the window joins; one due later runs on its own', () => {
    const s = new Scheduler(BASE);
    const now = WALL0 / 1000;
    s.sync(
      [
        { vmId: 3, diskId: 0, freqSeconds: 600, lastSuccessAt: now - 600 }, // due now
        { vmId: 3, diskId: 1, freqSeconds: 600, lastSuccessAt: now - 595 }, // due in 5 s <= 10 s window
        { vmId: 3, diskId: 2, freqSeconds: 600, lastSuccessAt: now - 300 }, // due in 300 s
      ],
      MONO0,
      WALL0,
    );
    // skip the first-run spread: a restart is not what this checks
    const { starts } = simulate(s, { untilMono: MONO0 + 60 * 60_000 });
    const first = starts[0]!;
    expect(first.diskIds).toEqual([0, 1]);
    expect(starts.some((st) => st.diskIds.length === 1 && st.diskIds[0] === 2)).toBe(true);
    // after their first joint capture, 0 and 1 stay together
    for (const st of starts.filter((x) => x.diskIds.includes(0))) expect(st.diskIds).toEqual(expect.arrayContaining([0, 1]));
  });
});

describe('200 disks on 50 VMs, concurrency 2', () => {
  it('never exceeds the limit, starves no disk, keeps cadence', () => {
    const s = new Scheduler({ ...BASE, concurrency: 2 });
    const disks: KnownDisk[] = [];
    const freqs = [300, 600, 900, 1800];
    for (let vm = 100; vm < 150; vm++) {
      for (let d = 0; d < 4; d++) {
        // some VMs have disks of different frequencies
        const freq = freqs[(vm + (vm % 3 === 0 ? d : 0)) % freqs.length]!;
        disks.push({ vmId: vm, diskId: d, freqSeconds: freq, lastSuccessAt: WALL0 / 1000 - ((vm * 37 + d * 11) % freq) });
      }
    }
    s.sync(disks, MONO0, WALL0);
    const hours = 6;
    // cycles of 2-10 s: 2 slots give 720-3600 cycles/h of capacity for ~ 400 needed
    const { starts, maxInFlight } = simulate(s, { untilMono: MONO0 + hours * 3600_000, cycleMs: (vm) => 2000 + (vm % 9) * 1000 });
    expect(maxInFlight).toBe(2);
    for (const d of disks) {
      const t = startsOf(starts, d.vmId, d.diskId);
      const expected = (hours * 3600) / d.freqSeconds;
      expect(t.length, `vm ${d.vmId} disk ${d.diskId}`).toBeGreaterThanOrEqual(expected - 1);
      expect(t.length, `vm ${d.vmId} disk ${d.diskId}`).toBeLessThanOrEqual(expected + 1);
      // generous: queueing behind 2 slots may delay a start; the exact slip is measured in bench/
      for (const g of gaps(t)) {
        expect(g).toBeGreaterThanOrEqual(d.freqSeconds * 1000 - 10_000);
        expect(g).toBeLessThanOrEqual(d.freqSeconds * 1000 + 60_000);
      }
    }
    expect(s.overdue(MONO0 + hours * 3600_000)).toEqual([]);
  });
});

describe('failures', () => {
  it('retries with growing delay, capped, then returns to the cadence after a success', () => {
    const s = new Scheduler({ ...BASE, backoffBaseSec: 10, backoffMaxSec: 80 });
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 3600, lastSuccessAt: WALL0 / 1000 - 3600 }], MONO0, WALL0);
    const okAfter = MONO0 + 600_000;
    const { starts } = simulate(s, { untilMono: MONO0 + 3 * 3600_000, cycleMs: () => 1000, fails: (_vm, _d, m) => m < okAfter });
    const t = startsOf(starts, 1, 0);
    const g = gaps(t);
    // cycle 1 s + backoff 10, 20, 40, 80, 80, ...
    expect(g.slice(0, 6)).toEqual([11_000, 21_000, 41_000, 81_000, 81_000, 81_000]);
    const firstOk = t.findIndex((x) => x >= okAfter);
    expect(g.slice(firstOk).every((x) => x === 3600_000)).toBe(true);
    expect(s.view(MONO0 + 3 * 3600_000, WALL0).map((v) => v.failCount)).toEqual([0]);
  });

  it('backoff of a frequent disk never exceeds its frequency', () => {
    const s = new Scheduler({ ...BASE, backoffBaseSec: 30, backoffMaxSec: 900 });
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 60 }], MONO0, WALL0);
    const { starts } = simulate(s, { untilMono: MONO0 + 3600_000, cycleMs: () => 500, fails: () => true });
    const g = gaps(startsOf(starts, 1, 0));
    expect(g[0]).toBe(30_500);
    expect(g.slice(1).every((x) => x === 60_500)).toBe(true);
    expect(s.view(MONO0 + 3600_000, WALL0)[0]!.failCount).toBe(starts.length);
  });

  it('an aborted cycle (shutdown) does not count as a failure', () => {
    const s = new Scheduler(BASE);
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 60, failCount: 2 }], MONO0, WALL0);
    const [st] = s.takeDue(MONO0 + 10_000);
    expect(st).toBeDefined();
    s.finished(1, [{ diskId: 0, ok: false, aborted: true }], { startedMono: MONO0 + 10_000, finishedMono: MONO0 + 11_000, startedWallMs: WALL0 });
    expect(s.view(MONO0 + 11_000, WALL0)[0]!.failCount).toBe(2);
  });

  it('a taken disk missing from the results counts as failed instead of being lost', () => {
    const s = new Scheduler(BASE);
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 600 }, { vmId: 1, diskId: 1, freqSeconds: 600 }], MONO0, WALL0);
    const [st] = s.takeDue(MONO0 + 60_000);
    expect(st!.diskIds).toEqual([0, 1]);
    s.finished(1, [{ diskId: 0, ok: true, capturedAt: WALL0 / 1000 + 60 }], { startedMono: MONO0 + 60_000, finishedMono: MONO0 + 61_000, startedWallMs: WALL0 + 60_000 });
    const v = s.view(MONO0 + 61_000, WALL0 + 61_000);
    expect(v.map((x) => x.failCount)).toEqual([0, 1]);
    expect(v[1]!.dueMono).toBe(MONO0 + 61_000 + 30_000);
  });
});

describe('overdue', () => {
  it('age > freq + grace is overdue; never-succeeded disks count from when they became known', () => {
    const s = new Scheduler(BASE);
    const now = WALL0 / 1000;
    s.sync(
      [
        { vmId: 1, diskId: 0, freqSeconds: 600, lastSuccessAt: now - 659 },
        { vmId: 1, diskId: 1, freqSeconds: 600, lastSuccessAt: now - 661 },
        { vmId: 2, diskId: 0, freqSeconds: 3600, lastSuccessAt: now - 3961 },
        { vmId: 3, diskId: 0, freqSeconds: 60 },
      ],
      MONO0,
      WALL0,
    );
    expect(s.overdue(MONO0).map((o) => [o.vmId, o.diskId])).toEqual([
      [1, 1],
      [2, 0],
    ]);
    const o = s.overdue(MONO0 + 121_000);
    expect(o.find((x) => x.vmId === 3)).toMatchObject({ neverSucceeded: true, limitSec: 120 });
    expect(s.view(MONO0, WALL0).find((v) => v.vmId === 1 && v.diskId === 0)!.overdue).toBe(false);
  });
});

describe('discovery changes, force, queue', () => {
  it('drops removed disks (also while in flight) and re-plans on a changed freq', () => {
    const s = new Scheduler(BASE);
    const now = WALL0 / 1000;
    s.sync(
      [
        { vmId: 1, diskId: 0, freqSeconds: 600, lastSuccessAt: now - 100 },
        { vmId: 2, diskId: 0, freqSeconds: 600, lastSuccessAt: now - 700 },
      ],
      MONO0,
      WALL0,
    );
    const [st] = s.takeDue(MONO0 + 60_000);
    expect(st!.vmId).toBe(2);
    const r = s.sync([{ vmId: 1, diskId: 0, freqSeconds: 120, lastSuccessAt: now - 100 }], MONO0 + 61_000, WALL0 + 61_000);
    expect(r.removed).toBe(1);
    s.finished(2, [{ diskId: 0, ok: true, capturedAt: now + 60 }], { startedMono: MONO0 + 60_000, finishedMono: MONO0 + 62_000, startedWallMs: WALL0 + 60_000 });
    expect(s.view(MONO0 + 62_000, WALL0).map((v) => v.vmId)).toEqual([1]);
    // freq 600 -> 120: the disk (last success 100 s before start) is now due 20 s after start, plus its first-run spread
    const due = s.view(MONO0 + 62_000, WALL0)[0]!.dueMono;
    expect(due - MONO0).toBeGreaterThanOrEqual(20_000);
    expect(due - MONO0).toBeLessThan(20_000 + 12_000);
  });

  it('a newer success recorded by another process re-anchors the cadence', () => {
    const s = new Scheduler(BASE);
    const now = WALL0 / 1000;
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 600, lastSuccessAt: now - 500 }], MONO0, WALL0);
    // CLI snapshot at wall now+50
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 600, lastSuccessAt: now + 50 }], MONO0 + 60_000, WALL0 + 60_000);
    expect(s.view(MONO0 + 60_000, WALL0 + 60_000)[0]!.dueMono).toBe(MONO0 + 50_000 + 600_000);
  });

  it('after a backward wall step, a state read older than the last finish does not re-anchor', () => {
    const s = new Scheduler(BASE);
    const now = WALL0 / 1000;
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 60, lastSuccessAt: now - 60 }], MONO0, WALL0);
    const [st] = s.takeDue(MONO0 + 10_000);
    expect(st).toBeDefined();
    // wall stepped back 1 h during the cycle: the new success has a SMALLER epoch than the old one
    const startedWallMs = WALL0 + 10_000 - 3600_000;
    s.finished(1, [{ diskId: 0, ok: true, capturedAt: startedWallMs / 1000 }], { startedMono: MONO0 + 10_000, finishedMono: MONO0 + 11_000, startedWallMs });
    const due = s.view(MONO0 + 11_000, startedWallMs + 1000)[0]!.dueMono;
    expect(due).toBe(MONO0 + 70_000);
    // a rescan whose state read predates the finish hands back the previous epoch
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 60, lastSuccessAt: now - 60 }], MONO0 + 12_000, startedWallMs + 2000);
    expect(s.view(MONO0 + 12_000, startedWallMs + 2000)[0]!.dueMono).toBe(due);
    // and one that read after it hands back the new one
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 60, lastSuccessAt: startedWallMs / 1000 }], MONO0 + 13_000, startedWallMs + 3000);
    expect(s.view(MONO0 + 13_000, startedWallMs + 3000)[0]!.dueMono).toBe(due);
  });

  it('snapshot-now runs ahead of queued VMs, with forceFull, regardless of cadence', () => {
    const s = new Scheduler({ ...BASE, concurrency: 1 });
    const now = WALL0 / 1000;
    s.sync(
      [
        { vmId: 1, diskId: 0, freqSeconds: 60, lastSuccessAt: now - 600 },
        { vmId: 2, diskId: 0, freqSeconds: 60, lastSuccessAt: now - 600 },
        { vmId: 3, diskId: 0, freqSeconds: 3600, lastSuccessAt: now },
        { vmId: 3, diskId: 1, freqSeconds: 3600, lastSuccessAt: now },
      ],
      MONO0,
      WALL0,
    );
    const t = MONO0 + 10_000;
    const first = s.takeDue(t);
    expect(first).toHaveLength(1);
    const q = s.view(t, WALL0 + 10_000).filter((v) => v.queuedSince !== undefined);
    expect(q).toHaveLength(1);
    expect(s.force(3, { full: true, diskIds: [1] })).toBe(1);
    expect(s.force(999)).toBe(0);
    s.finished(first[0]!.vmId, [{ diskId: 0, ok: true, capturedAt: now + 10 }], { startedMono: t, finishedMono: t + 1000, startedWallMs: WALL0 + 10_000 });
    const next = s.takeDue(t + 1000);
    expect(next).toEqual([expect.objectContaining({ vmId: 3, diskIds: [1], forced: true, forceFull: true })]);
  });

  it('nextWake is the earliest due of idle VMs, null when nothing is known', () => {
    const s = new Scheduler({ ...BASE, concurrency: 1 });
    expect(s.nextWake(MONO0)).toBeNull();
    const now = WALL0 / 1000;
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 60, lastSuccessAt: now - 30 }], MONO0, WALL0);
    const w = s.nextWake(MONO0)!;
    expect(w).toBeGreaterThanOrEqual(MONO0 + 30_000);
    expect(s.takeDue(w)).toHaveLength(1);
    expect(s.nextWake(w)).toBeNull(); // its only VM is in flight
  });

  it('view maps monotonic due times to epochs for the state file', () => {
    const s = new Scheduler(BASE);
    s.sync([{ vmId: 1, diskId: 0, freqSeconds: 60, lastSuccessAt: WALL0 / 1000 - 30 }], MONO0, WALL0);
    const v = s.view(MONO0, WALL0)[0]!;
    expect(v.nextDueAt).toBe(Math.round((WALL0 + (v.dueMono - MONO0)) / 1000));
    expect(v.ageSec).toBe(30);
  });
});
