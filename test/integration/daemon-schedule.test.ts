/**
 * The daemon loop on real timers, a real state file and (in one test) a real NOTIFY_SOCKET listener.
 * The cycle itself is a fast fake (allowed for this scheduling test only): it writes its success to
 * the state file the way lib/cycle.ts does, stamped with the daemon's (fakeable) WALL clock, so the
 * rescan path that re-reads persisted epochs is exercised across wall-clock jumps.
 */
import { describe, it, expect, beforeEach, afterEach } from 'vitest';
import { mkdtempSync, rmSync, mkdirSync, existsSync } from 'node:fs';
import { spawn, spawnSync } from 'node:child_process';
import { createInterface } from 'node:readline';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { startDaemon, type DaemonConfig, type CycleStartInfo } from '../../lib/daemon/loop.js';
import { StateStore, getDisk, recordSuccess, diskKey } from '../../lib/cycle/state.js';
import { SdNotify } from '../../lib/daemon/sd-notify.js';
import { createLogger } from '../../lib/shared/log.js';
import type { EligibleDisk } from '../../lib/shared/model.js';
import type { VmCycleRequest, DiskOutcome } from '../../lib/cycle/cycle.js';
import { Writable } from 'node:stream';

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(path.join(tmpdir(), 'onestor-daemon-'));
});
afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function logger() {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk: Buffer, _e, cb) {
      for (const l of chunk.toString().split('\n')) if (l) lines.push(JSON.parse(l) as Record<string, unknown>);
      cb();
    },
  });
  return { log: createLogger({ stream, journal: false, level: 'debug' }), lines };
}

function config(over: Partial<DaemonConfig['schedule']> = {}, concurrency = 2): DaemonConfig {
  return {
    datastoreLocation: path.join(dir, 'datastores'),
    stagingDirName: '.onestor',
    schedule: { rescanSec: 1, graceMinSec: 60, gracePercent: 10, backoffBaseSec: 1, backoffMaxSec: 4, spreadSec: 0, ...over },
    limits: { concurrency },
  };
}

function disk(vmId: number, diskId: number, freqSeconds: number): EligibleDisk {
  const vmDir = path.join(dir, 'datastores', '0', String(vmId));
  return {
    vmId,
    diskId,
    dsId: 0,
    dsDir: path.join(dir, 'datastores', '0'),
    vmDir,
    domainName: `one-${vmId}`,
    freqSeconds,
    replicaHost: 'replica',
    snapDir: `${vmDir}/disk.${diskId}.snap`,
    basePath: `${vmDir}/disk.${diskId}.snap/base`,
    base1Path: `${vmDir}/disk.${diskId}.snap/base.1`,
  };
}

/** A cycle that takes `ms`, records its success in the state file like the real one, and reports. */
function fakeCycle(state: StateStore, wallNow: () => number, o: { ms?: number; ignoreAbort?: boolean } = {}) {
  const calls: Array<{ req: VmCycleRequest; mono: number; wall: number }> = [];
  let inFlight = 0;
  let maxInFlight = 0;
  const run = async (req: VmCycleRequest, signal: AbortSignal): Promise<DiskOutcome[]> => {
    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    const t0 = performance.now();
    const capturedAt = Math.floor(wallNow() / 1000);
    calls.push({ req, mono: t0, wall: wallNow() });
    try {
      await new Promise<void>((resolve, reject) => {
        const t = setTimeout(resolve, o.ms ?? 20);
        if (!o.ignoreAbort) signal.addEventListener('abort', () => (clearTimeout(t), reject(new Error('aborted'))), { once: true });
      });
    } catch {
      return req.disks.map((d) => ({ vmId: req.vmId, diskId: d.diskId, ok: false, durationMs: performance.now() - t0, error: { code: 'E_ABORTED', message: 'aborted' } }));
    } finally {
      inFlight--;
    }
    await state.update((s) => {
      for (const d of req.disks) {
        s.disks[diskKey(req.vmId, d.diskId)] = recordSuccess(getDisk(s, req.vmId, d.diskId), {
          checkpoint: `ck-${capturedAt}`,
          base1Identity: 'x',
          capturedAt,
          finishedAt: capturedAt,
          durationMs: 1,
          bytes: 1,
          mode: 'incremental',
          consistency: 'crash-consistent',
        });
      }
    });
    return req.disks.map((d) => ({ vmId: req.vmId, diskId: d.diskId, ok: true, durationMs: performance.now() - t0, capturedAt, mode: 'incremental' as const }));
  };
  return { run, calls, maxInFlight: () => maxInFlight };
}

function startsOf(calls: Array<{ req: VmCycleRequest; mono: number }>, vmId: number): number[] {
  return calls.filter((c) => c.req.vmId === vmId).map((c) => c.mono);
}
const gaps = (t: number[]) => t.slice(1).map((x, i) => x - t[i]!);

describe('daemon schedule on real timers', () => {
  it('wall clock +1 day then -1 hour while running: cycle count and spacing unchanged', async () => {
    let wallOffset = 0;
    const wallNow = () => Date.now() + wallOffset;
    const state = new StateStore(path.join(dir, 'state'));
    const cycle = fakeCycle(state, wallNow, { ms: 30 });
    const { log } = logger();
    const disks = [disk(1, 0, 1), disk(1, 1, 1), disk(2, 0, 2)];
    const h = startDaemon({
      config: config(),
      log,
      deps: {
        state,
        hostName: 'hv-test',
        wallNow,
        discover: async () => ({ eligible: disks, ineligible: [] }),
        runCycle: cycle.run,
        notifier: new SdNotify({ env: {} }),
        cleanStaleStaging: async () => [],
      },
    });
    await h.ready;
    const t0 = performance.now();
    await sleep(2500);
    wallOffset = 86_400_000; // NTP step / admin: +1 day
    await sleep(2500);
    wallOffset = -3_600_000; // and back to 1 hour behind
    await sleep(2600);
    h.stop();
    await h.done;
    const elapsed = performance.now() - t0;

    // disks 0 and 1 of VM 1 go in one capture every time
    for (const c of cycle.calls.filter((x) => x.req.vmId === 1)) expect(c.req.disks.map((d) => d.diskId)).toEqual([0, 1]);
    const vm1 = startsOf(cycle.calls, 1);
    const vm2 = startsOf(cycle.calls, 2);
    // freq 1 s over ~7.6 s (first run within 100 ms spread): 7-8 cycles, never a burst, never a silence
    expect(vm1.length).toBeGreaterThanOrEqual(Math.floor(elapsed / 1000) - 1);
    expect(vm1.length).toBeLessThanOrEqual(Math.ceil(elapsed / 1000) + 1);
    for (const g of gaps(vm1)) {
      expect(g).toBeGreaterThanOrEqual(950);
      expect(g).toBeLessThanOrEqual(1300);
    }
    expect(vm2.length).toBeGreaterThanOrEqual(3);
    expect(vm2.length).toBeLessThanOrEqual(5);
    for (const g of gaps(vm2)) {
      expect(g).toBeGreaterThanOrEqual(1950);
      expect(g).toBeLessThanOrEqual(2300);
    }
    // the state carries epochs of the (jumped) wall clock, for display only
    const s = await state.load();
    expect(Math.abs(s.daemon!.heartbeatAt - wallNow() / 1000)).toBeLessThan(5);
    const d10 = s.disks[diskKey(1, 0)]!;
    expect(d10.nextDueAt).toBeDefined();
    expect(Math.abs(d10.nextDueAt! - wallNow() / 1000)).toBeLessThan(3);
    expect(d10.phase).toBeUndefined();
  }, 30_000);

  it('200 disks on 50 VMs, concurrency 2: limit never exceeded, no disk starved, cadence kept', async () => {
    const state = new StateStore(path.join(dir, 'state'));
    const cycle = fakeCycle(state, Date.now, { ms: 15 });
    const { log } = logger();
    const disks: EligibleDisk[] = [];
    for (let vm = 0; vm < 50; vm++) for (let d = 0; d < 4; d++) disks.push(disk(100 + vm, d, 2 + (vm % 3)));
    const starts: CycleStartInfo[] = [];
    const h = startDaemon({
      config: config({ spreadSec: 1 }, 2),
      log,
      deps: {
        state,
        hostName: 'hv-test',
        discover: async () => ({ eligible: disks, ineligible: [] }),
        runCycle: cycle.run,
        notifier: new SdNotify({ env: {} }),
        cleanStaleStaging: async () => [],
        onCycleStart: (i) => starts.push(i),
      },
    });
    await h.ready;
    await sleep(9000);
    h.stop();
    await h.done;
    expect(cycle.maxInFlight()).toBeLessThanOrEqual(2);
    expect(cycle.maxInFlight()).toBe(2); // the limit was reached, so it was actually exercised
    for (let vm = 100; vm < 150; vm++) {
      const freqMs = (2 + ((vm - 100) % 3)) * 1000;
      const t = startsOf(cycle.calls, vm);
      expect(t.length, `vm ${vm}`).toBeGreaterThanOrEqual(Math.floor(9000 / freqMs) - 1);
      for (const g of gaps(t)) {
        expect(g, `vm ${vm}`).toBeGreaterThanOrEqual(freqMs - 100);
        expect(g, `vm ${vm}`).toBeLessThanOrEqual(freqMs + 1000); // generous; bench/ measures the slip
      }
      // all four disks of a VM share each capture
      for (const c of cycle.calls.filter((x) => x.req.vmId === vm)) expect(c.req.disks).toHaveLength(4);
    }
    const slips = starts.map((s) => s.slipMs).sort((a, b) => a - b);
    expect(slips[Math.floor(slips.length * 0.5)]!).toBeLessThan(500);
  }, 30_000);

  it('SIGTERM-like stop aborts running cycles, is not counted as a failure, and exits in bounded time', async () => {
    const state = new StateStore(path.join(dir, 'state'));
    const slow = fakeCycle(state, Date.now, { ms: 60_000 });
    const { log, lines } = logger();
    const ac = new AbortController();
    const h = startDaemon({
      config: config({ spreadSec: 0.1 }),
      log,
      signal: ac.signal,
      deps: {
        state,
        discover: async () => ({ eligible: [disk(7, 0, 3600), disk(8, 0, 3600)], ineligible: [] }),
        runCycle: slow.run,
        notifier: new SdNotify({ env: {} }),
        cleanStaleStaging: async () => [],
      },
    });
    await h.ready;
    await sleep(300);
    expect(h.inFlight().sort()).toEqual([7, 8]);
    const s1 = await state.load();
    expect(s1.disks[diskKey(7, 0)]!.phase).toBe('running');
    const t0 = performance.now();
    ac.abort();
    await h.done;
    expect(performance.now() - t0).toBeLessThan(2000);
    const s = await state.load();
    expect(s.disks[diskKey(7, 0)]!.failCount).toBe(0);
    expect(s.disks[diskKey(7, 0)]!.phase).toBeUndefined();
    expect(lines.some((l) => l['msg'] === 'daemon stopped')).toBe(true);
  });

  it('a cycle that ignores the abort is given up on after the shutdown timeout', async () => {
    const state = new StateStore(path.join(dir, 'state'));
    const stuck = fakeCycle(state, Date.now, { ms: 20_000, ignoreAbort: true });
    const { log, lines } = logger();
    const h = startDaemon({
      config: config({ spreadSec: 0.1 }),
      log,
      shutdownTimeoutMs: 500,
      deps: { state, discover: async () => ({ eligible: [disk(7, 0, 60)], ineligible: [] }), runCycle: stuck.run, notifier: new SdNotify({ env: {} }), cleanStaleStaging: async () => [] },
    });
    await h.ready;
    await sleep(200);
    const t0 = performance.now();
    h.stop();
    await h.done;
    const ms = performance.now() - t0;
    expect(ms).toBeGreaterThanOrEqual(450);
    expect(ms).toBeLessThan(2000);
    expect(lines.some((l) => String(l['msg']).includes('did not wind down'))).toBe(true);
  });

  it('rescan drops removed VMs and picks up new ones and changed frequencies; failures back off', async () => {
    const state = new StateStore(path.join(dir, 'state'));
    let view = [disk(1, 0, 1)];
    let failVm3 = true;
    const calls: Array<{ vm: number; mono: number }> = [];
    const { log } = logger();
    const h = startDaemon({
      config: config({ backoffBaseSec: 1, backoffMaxSec: 1, spreadSec: 0.1 }),
      log,
      deps: {
        state,
        discover: async () => ({ eligible: view, ineligible: [] }),
        runCycle: async (req) => {
          calls.push({ vm: req.vmId, mono: performance.now() });
          const ok = !(req.vmId === 3 && failVm3);
          return req.disks.map((d) => (ok ? { vmId: req.vmId, diskId: d.diskId, ok, durationMs: 1, capturedAt: Date.now() / 1000 } : { vmId: req.vmId, diskId: d.diskId, ok, durationMs: 1, error: { code: 'E_SSH', message: 'replica down' } }));
        },
        notifier: new SdNotify({ env: {} }),
        cleanStaleStaging: async () => [],
      },
    });
    await h.ready;
    await sleep(1500);
    view = [disk(3, 0, 60)];
    await h.rescan();
    await sleep(2500);
    failVm3 = false;
    await sleep(1300);
    h.stop();
    await h.done;
    const removedAt = calls.findIndex((c) => c.vm === 3);
    expect(calls.slice(removedAt).some((c) => c.vm === 1)).toBe(false);
    const vm3 = calls.filter((c) => c.vm === 3).map((c) => c.mono);
    // freq 60 s but failing: retried about every backoffMax (1 s), then one success and quiet
    expect(vm3.length).toBeGreaterThanOrEqual(3);
    expect(vm3.length).toBeLessThanOrEqual(6);
    for (const g of gaps(vm3)) expect(g).toBeGreaterThanOrEqual(900);
  });

  it('stale staging is cleaned at start (default cleaner over numeric datastore dirs)', async () => {
    const stale = path.join(dir, 'datastores', '0', '.onestor', '42');
    mkdirSync(stale, { recursive: true });
    mkdirSync(path.join(dir, 'datastores', 'notnumeric', '.onestor', '43'), { recursive: true });
    const { log } = logger();
    const h = startDaemon({ config: config(), log, deps: { state: new StateStore(path.join(dir, 'state')), discover: async () => ({ eligible: [], ineligible: [] }), runCycle: async () => [], notifier: new SdNotify({ env: {} }) } });
    await h.ready;
    h.stop();
    await h.done;
    expect(existsSync(stale)).toBe(false);
    expect(existsSync(path.join(dir, 'datastores', 'notnumeric', '.onestor', '43'))).toBe(true);
  });
});

const hasPython = spawnSync('python3', ['-c', 'import socket'], { stdio: 'ignore' }).status === 0;

describe.skipIf(!hasPython)('daemon and a real NOTIFY_SOCKET', () => {
  it('sends READY=1 after discovery, STATUS with the disk count, WATCHDOG=1, STOPPING=1 on stop', async () => {
    const sock = path.join(dir, 'notify.sock');
    const py = spawn('python3', ['-c', 'import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\ns.bind(sys.argv[1])\nprint("up",flush=True)\nwhile True:\n  print(s.recv(4096).decode().replace("\\n","|"),flush=True)', sock], { stdio: ['ignore', 'pipe', 'inherit'] });
    const got: string[] = [];
    await new Promise<void>((resolve) => createInterface({ input: py.stdout! }).on('line', (l) => (l === 'up' ? resolve() : got.push(l))));
    try {
      const { log } = logger();
      const state = new StateStore(path.join(dir, 'state'));
      const h = startDaemon({
        config: config(),
        log,
        deps: {
          state,
          discover: async () => ({ eligible: [disk(1, 0, 3600), disk(1, 1, 3600), disk(2, 0, 3600)], ineligible: [{ vmId: 9, reason: 'no vm.xml' }] }),
          runCycle: fakeCycle(state, Date.now, { ms: 10 }).run,
          notifier: new SdNotify({ env: { NOTIFY_SOCKET: sock, WATCHDOG_USEC: '400000' } }),
          cleanStaleStaging: async () => [],
        },
      });
      await h.ready;
      await sleep(1000);
      h.stop();
      await h.done;
      await sleep(200);
      const ready = got.findIndex((m) => m.startsWith('READY=1'));
      expect(ready).toBeGreaterThanOrEqual(0);
      expect(got[ready]).toMatch(/^READY=1\|STATUS=3 disks protected, 0 failing/);
      expect(got[ready]).toContain('1 not eligible');
      expect(got.filter((m) => m === 'WATCHDOG=1').length).toBeGreaterThanOrEqual(3);
      expect(got.findIndex((m) => m.startsWith('STOPPING=1'))).toBeGreaterThan(ready);
    } finally {
      py.kill('SIGKILL');
    }
  });
});
