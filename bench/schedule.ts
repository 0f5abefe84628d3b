/**
 * Daemon core figures: idle RSS/CPU with 200 disks known, and the due-time slip distribution.
 * Goals (issue 5): idle RSS <= 60 MB, idle CPU <= 0.2 %, slip within 2 s.
 *
 *   npm run build && node dist/bench/schedule.js [idleSec=60] [slipSec=60]
 *
 * Real timers, a real state file in a temp dir, the real loop; the cycle is a fake that takes 50 ms
 * (capture and transfer costs are measured elsewhere). Run compiled, not through a TS loader, so the
 * RSS is the agent's and not the transpiler's.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { startDaemon, type DaemonConfig, type CycleStartInfo } from '../lib/daemon/loop.js';
import { StateStore, emptyState, diskKey, recordSuccess, getDisk } from '../lib/cycle/state.js';
import { SdNotify } from '../lib/daemon/sd-notify.js';
import { createLogger } from '../lib/shared/log.js';
import type { EligibleDisk } from '../lib/shared/model.js';
import type { VmCycleRequest, DiskOutcome } from '../lib/cycle/cycle.js';

const idleSec = Number(process.argv[2] ?? 60);
const slipSec = Number(process.argv[3] ?? 60);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const silentLog = createLogger({ stream: new Writable({ write: (_c, _e, cb) => cb() }), journal: false, level: 'warn' });

function disks(root: string, freqOf: (vm: number, d: number) => number): EligibleDisk[] {
  const out: EligibleDisk[] = [];
  for (let vm = 100; vm < 150; vm++) {
    for (let d = 0; d < 4; d++) {
      const vmDir = path.join(root, 'ds', '0', String(vm));
      out.push({
        vmId: vm,
        diskId: d,
        dsId: 0,
        dsDir: path.join(root, 'ds', '0'),
        vmDir,
        domainName: `one-${vm}`,
        freqSeconds: freqOf(vm, d),
        replicaHost: 'replica',
        snapDir: `${vmDir}/disk.${d}.snap`,
        basePath: `${vmDir}/disk.${d}.snap/base`,
        base1Path: `${vmDir}/disk.${d}.snap/base.1`,
      });
    }
  }
  return out;
}

function config(root: string, concurrency = 2): DaemonConfig {
  return {
    datastoreLocation: path.join(root, 'ds'),
    stagingDirName: '.onestor',
    schedule: { rescanSec: 60, graceMinSec: 60, gracePercent: 10, backoffBaseSec: 30, backoffMaxSec: 1800, spreadSec: 0 },
    limits: { concurrency },
  };
}

function fakeCycle(state: StateStore) {
  return async (req: VmCycleRequest): Promise<DiskOutcome[]> => {
    const capturedAt = Math.floor(Date.now() / 1000);
    await sleep(50);
    await state.update((s) => {
      for (const d of req.disks) {
        s.disks[diskKey(req.vmId, d.diskId)] = recordSuccess(getDisk(s, req.vmId, d.diskId), {
          checkpoint: `ck-${capturedAt}`,
          base1Identity: '1:2',
          capturedAt,
          finishedAt: capturedAt,
          durationMs: 50,
          bytes: 1 << 20,
          mode: 'incremental',
          consistency: 'crash-consistent',
        });
      }
    });
    return req.disks.map((d) => ({ vmId: req.vmId, diskId: d.diskId, ok: true, durationMs: 50, capturedAt, mode: 'incremental' as const }));
  };
}

function pct(sorted: number[], p: number): number {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))]! : NaN;
}

async function idlePhase(): Promise<void> {
  const root = mkdtempSync(path.join(tmpdir(), 'onestor-bench-idle-'));
  try {
    const state = new StateStore(path.join(root, 'state'));
    const list = disks(root, () => 3600);
    // every disk succeeded a minute ago: nothing is due during the measurement
    const s = emptyState(Date.now() / 1000);
    const now = Math.floor(Date.now() / 1000);
    for (const d of list) {
      s.disks[diskKey(d.vmId, d.diskId)] = recordSuccess(getDisk(s, d.vmId, d.diskId), { checkpoint: 'ck', base1Identity: '1:2', capturedAt: now - 60, finishedAt: now - 59, durationMs: 1000, bytes: 1, mode: 'incremental', consistency: 'crash-consistent' });
    }
    await state.save(s);
    let cycles = 0;
    const h = startDaemon({
      config: config(root),
      log: silentLog,
      deps: { state, hostName: 'bench', discover: async () => ({ eligible: list, ineligible: [] }), runCycle: async (r) => (cycles++, fakeCycle(state)(r)), notifier: new SdNotify({ env: {} }), cleanStaleStaging: async () => [] },
    });
    await h.ready;
    await sleep(3000); // let start-up garbage settle
    (globalThis as { gc?: () => void }).gc?.();
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    let maxRss = 0;
    const sampler = setInterval(() => (maxRss = Math.max(maxRss, process.memoryUsage().rss)), 1000);
    await sleep(idleSec * 1000);
    clearInterval(sampler);
    const cpu = process.cpuUsage(cpu0);
    const wallMs = performance.now() - t0;
    maxRss = Math.max(maxRss, process.memoryUsage().rss);
    h.stop();
    await h.done;
    const cpuPct = ((cpu.user + cpu.system) / 1000 / wallMs) * 100;
    console.log(`idle, 200 disks / 50 VMs known, ${idleSec} s (rescan 60 s, heartbeat 30 s), ${cycles} cycles ran`);
    console.log(`  RSS max      ${(maxRss / 1e6).toFixed(1)} MB   (goal <= 60 MB)   heap used ${(process.memoryUsage().heapUsed / 1e6).toFixed(1)} MB`);
    console.log(`  CPU          ${cpuPct.toFixed(3)} %    (goal <= 0.2 %)   user ${(cpu.user / 1000).toFixed(0)} ms, system ${(cpu.system / 1000).toFixed(0)} ms`);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}

async function slipPhase(): Promise<void> {
  const root = mkdtempSync(path.join(tmpdir(), 'onestor-bench-slip-'));
  try {
    const state = new StateStore(path.join(root, 'state'));
    // 5 .. 20 s: 50 VMs every ~12 s on average = ~4 cycles/s through 2 slots of 50 ms cycles
    const list = disks(root, (vm) => 5 + (vm % 16));
    const starts: CycleStartInfo[] = [];
    const h = startDaemon({
      config: { ...config(root), schedule: { ...config(root).schedule, spreadSec: 2 } },
      log: silentLog,
      deps: { state, hostName: 'bench', discover: async () => ({ eligible: list, ineligible: [] }), runCycle: fakeCycle(state), notifier: new SdNotify({ env: {} }), cleanStaleStaging: async () => [], onCycleStart: (i) => starts.push(i) },
    });
    await h.ready;
    await sleep(slipSec * 1000);
    h.stop();
    await h.done;
    const slips = starts.map((s) => s.slipMs).sort((a, b) => a - b);
    // cadence error: start-to-start spacing of one VM minus its frequency
    const spacingErr: number[] = [];
    for (let vm = 100; vm < 150; vm++) {
      const t = starts.filter((s) => s.vmId === vm).map((s) => s.startMono);
      for (let i = 1; i < t.length; i++) spacingErr.push(t[i]! - t[i - 1]! - (5 + (vm % 16)) * 1000);
    }
    spacingErr.sort((a, b) => a - b);
    const f = (x: number) => `${x.toFixed(1)} ms`;
    console.log(`slip, 200 disks / 50 VMs, freq 5-20 s, concurrency 2, 50 ms cycles, ${slipSec} s, ${starts.length} cycles`);
    console.log(`  start - due  p50 ${f(pct(slips, 50))}  p90 ${f(pct(slips, 90))}  p99 ${f(pct(slips, 99))}  max ${f(slips.at(-1) ?? NaN)}   (goal: within 2000 ms)`);
    console.log(`  spacing-freq min ${f(spacingErr[0] ?? NaN)}  p50 ${f(pct(spacingErr, 50))}  p99 ${f(pct(spacingErr, 99))}  max ${f(spacingErr.at(-1) ?? NaN)}`);
    console.log(`  over 2 s     ${slips.filter((s) => s > 2000).length} of ${slips.length}`);
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
}

await idlePhase();
await slipPhase();
