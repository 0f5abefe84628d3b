/**
 * Seeds through the pull-mode export (issue 14), against real daemons: private libvirtd + QEMU, the replica
 * behind a real sshd with the restricted key, the agent CLI as a separate process. References are made by
 * test code (the guest view read with qemu-img -U), never by the agent; the staging dir is watched by the
 * test itself, not taken from the agent's word.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn } from 'node:child_process';
import { chmod, readdir, rm, stat, statfs, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { startAgentEnv, agentMain, agentProcessEnv, type AgentEnv } from '../../dev/agent-env.js';
import type { OneVm } from '../../dev/one-layout.js';
import { guestWrite, guestZero, guestViewSha256, sha256File } from '../../dev/guest.js';
import { recoverDrill } from '../../dev/recover.js';
import { run } from '../../lib/shared/exec.js';
import { pino } from 'pino';
import { buildContext } from '../../agent/context.js';
import { discover } from '../../lib/discover/discover.js';
import { runVmCycle } from '../../lib/cycle/cycle.js';
import { clearYieldMarker, writeYieldMarker } from '../../lib/cycle/migration.js';
import { StateStore, diskKey } from '../../lib/cycle/state.js';
import { unreferenceHeaderCluster } from '../helpers/qcow2-damage.js';

let env: AgentEnv;
const MiB = 1 << 20;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

beforeAll(async () => {
  env = await startAgentEnv({ name: 'seed' });
});
afterAll(async () => {
  await env?.stop();
});

const stagingOf = (vmId: number) => path.join(env.dsRoot, String(env.dsId), '.onestor', String(vmId));

/** Bytes allocated under a dir (scratch files, socket), 0 when it does not exist. */
async function allocated(dir: string): Promise<number> {
  let n = 0;
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    const st = await stat(path.join(dir, name)).catch(() => null);
    if (st) n += st.blocks * 512;
  }
  return n;
}

/** Starts `snapshot` as a child process; resolves its result; samples the staging dir every 50 ms meanwhile. */
function startSnapshot(vmId: number, extra: string[] = []) {
  const child = spawn(process.execPath, [agentMain(), 'snapshot', '--vm', String(vmId), '--log-level', 'info', ...extra, ...env.flags], {
    env: agentProcessEnv(env.flags) as Record<string, string>,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  let peak = 0;
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      peak = Math.max(peak, await allocated(stagingOf(vmId)));
      await sleep(50);
    }
  })();
  const done = new Promise<{ code: number; signal: NodeJS.Signals | null; stdout: string; stderr: string; peak: number }>((resolve) => {
    child.on('close', async (code, signal) => {
      sampling = false;
      await sampler;
      resolve({ code: code ?? 128, signal, stdout, stderr, peak });
    });
  });
  return { child, done, stderr: () => stderr };
}

async function waitFor(what: string, cond: () => Promise<boolean>, timeoutMs = 120_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

const exists = (p: string) => stat(p).then(() => true, () => false);
const jobType = async (dom: string) => /Job type:\s+(\w+)/.exec(await env.lv.virshOk(['domjobinfo', dom]))?.[1];

/** The recover drill of a disk passes `qemu-img check` and reads as `ref` (sha256 of the guest view). */
async function expectDrillEquals(vmId: number, diskId: number, ref: string): Promise<void> {
  const drill = await recoverDrill(env.snapsDir, vmId, diskId, env.root);
  try {
    expect(drill.check.ok, drill.check.raw).toBe(true);
    expect(await sha256File(drill.rawPath)).toBe(ref);
  } finally {
    await rm(drill.dir, { recursive: true, force: true });
  }
}

function logRecords(stderr: string): Array<Record<string, unknown>> {
  return stderr
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => {
      try {
        return JSON.parse(l) as Record<string, unknown>;
      } catch {
        return {};
      }
    });
}

describe('seed from the pull-mode export', () => {
  let vm: OneVm;

  beforeAll(async () => {
    vm = await env.createVm({
      vmId: 60,
      disks: [
        { diskId: 0, sizeMiB: 256, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 16, pattern: 0x31 }], overlayData: [{ offsetMiB: 16, lengthMiB: 64, pattern: 0x32 }] },
        { diskId: 1, sizeMiB: 128, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 8, pattern: 0x41 }], overlayData: [{ offsetMiB: 8, lengthMiB: 32, pattern: 0x42 }] },
      ],
    });
  });
  afterAll(async () => {
    await vm?.destroy().catch(() => {});
  });

  it('a multi-disk VM seeded while the guest writes: the replica holds the instant, staging stays under the bound, nothing is left behind', async () => {
    // Before the instant: written and zeroed clusters of base.1 that hide base's data (zero clusters must stay zero).
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 2, lengthMiB: 2, pattern: 0x51 });
    await guestZero(env.lv, vm.domainName, { target: 'vda', offsetMiB: 6, lengthMiB: 2 });
    await guestWrite(env.lv, vm.domainName, { target: 'vdb', offsetMiB: 100, lengthMiB: 4, pattern: 0x52 });
    const ref0 = await guestViewSha256(vm.disks[0]!.base1Path, env.root);
    const ref1 = await guestViewSha256(vm.disks[1]!.base1Path, env.root);

    // 16 MB/s keeps the export open for seconds: the guest writes below land while it is being read
    const s = startSnapshot(60, ['--bandwidth-mbps', '16']);
    await waitFor('the NBD socket', () => exists(path.join(stagingOf(60), 'nbd.sock')));
    // after the instant: overwrite clusters being streamed (copy-before-write to scratch), allocate new ones
    const written = 8 + 8 + 4;
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 20, lengthMiB: 8, pattern: 0x77 });
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 120, lengthMiB: 8, pattern: 0x78 });
    await guestWrite(env.lv, vm.domainName, { target: 'vdb', offsetMiB: 10, lengthMiB: 4, pattern: 0x79 });
    expect(await jobType(vm.domainName), 'the writes must land while the export is still open').toBe('Unbounded');
    const r = await s.done;
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/vm 60 disk 0: full snapshot published/);
    expect(r.stdout).toMatch(/vm 60 disk 1: full snapshot published/);

    const logs = logRecords(r.stderr);
    const streamed = logs.filter((l) => l['msg'] === 'streaming from the pull-mode export');
    expect(streamed.map((l) => l['disk']).sort()).toEqual([0, 1]);
    // thin: what base.1 holds (64 + 2 + 2 MiB on vda; 32 + 4 on vdb) plus metadata, not the disk size
    const d0 = streamed.find((l) => l['disk'] === 0)!;
    expect(d0['dataBytes']).toBe((64 + 2) * MiB);
    expect(d0['zeroBytes']).toBe(2 * MiB);
    expect(d0['streamBytes'] as number).toBeLessThan((64 + 2 + 1) * MiB);

    // the replica holds the instant, not the live disks
    for (const [diskId, ref] of [[0, ref0], [1, ref1]] as const) {
      const drill = await recoverDrill(env.snapsDir, 60, diskId, env.root);
      expect(drill.check.ok, drill.check.raw).toBe(true);
      expect(drill.backingName).toBe(`disk.${diskId}.snap/base`);
      expect(await sha256File(drill.rawPath)).toBe(ref);
      await rm(drill.dir, { recursive: true, force: true });
    }
    expect(await guestViewSha256(vm.disks[0]!.base1Path, env.root)).not.toBe(ref0);

    // staging: scratch only, bounded by what the guest wrote meanwhile + 64 MiB
    expect(r.peak, 'the sampler saw the scratch files (copy-before-write of the overwritten clusters)').toBeGreaterThanOrEqual(8 * MiB);
    expect(r.peak).toBeLessThanOrEqual(written * MiB + 64 * MiB);
    expect(await readdir(stagingOf(60)).catch(() => [])).toEqual([]);
    expect(await jobType(vm.domainName)).toBe('None');
  });

  it('an agent SIGKILLed mid-stream leaves the job; the next cycle aborts it, cleans up and succeeds', async () => {
    const s = startSnapshot(60, ['--full', '--bandwidth-mbps', '4']);
    await waitFor('the NBD socket', () => exists(path.join(stagingOf(60), 'nbd.sock')));
    await waitFor('bytes on the wire', async () => /streaming from the pull-mode export/.test(s.stderr()));
    await sleep(1500);
    s.child.kill('SIGKILL');
    const killed = await s.done;
    expect(killed.signal).toBe('SIGKILL');
    // the scenario: the export is still there with its scratch files
    expect(await jobType(vm.domainName)).toBe('Unbounded');
    expect((await readdir(stagingOf(60))).some((n) => n.endsWith('.scratch'))).toBe(true);

    const ref0 = await guestViewSha256(vm.disks[0]!.base1Path, env.root);
    const again = startSnapshot(60, ['--full']);
    const r = await again.done;
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stderr).toMatch(/aborting a backup job left by a previous run/);
    expect(await jobType(vm.domainName)).toBe('None');
    expect(await readdir(stagingOf(60)).catch(() => [])).toEqual([]);
    await expectDrillEquals(60, 0, ref0);
    // one rolling checkpoint: the killed run's is retired
    const cks = (await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name'])).trim().split('\n').filter(Boolean);
    expect(cks).toHaveLength(1);
  });
  it('one job for a full and an incremental of the same VM: the incremental streams the exported dirty bitmap', async () => {
    // disk 0 loses its base on the replica (a full is due), disk 1 only changed (an incremental is due)
    await rm(path.join(env.snapsDir, '60', 'disk.0.snap', 'base'));
    await guestWrite(env.lv, vm.domainName, { target: 'vdb', offsetMiB: 50, lengthMiB: 3, pattern: 0x5a });
    await guestZero(env.lv, vm.domainName, { target: 'vdb', offsetMiB: 0, lengthMiB: 1 });
    const ref0 = await guestViewSha256(vm.disks[0]!.base1Path, env.root);
    const ref1 = await guestViewSha256(vm.disks[1]!.base1Path, env.root);
    const r = await startSnapshot(60).done;
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/vm 60 disk 0: full snapshot published/);
    expect(r.stdout).toMatch(/vm 60 disk 1: incremental snapshot published/);
    const streamed = logRecords(r.stderr).filter((l) => l['msg'] === 'streaming from the pull-mode export');
    const inc = streamed.find((l) => l['disk'] === 1)!;
    expect(inc['mode']).toBe('incremental');
    expect(inc['dataBytes']).toBe(3 * MiB); // the dirty clusters only; the zeroed MiB is a zero run
    expect(inc['zeroBytes']).toBe(1 * MiB);
    for (const [diskId, ref] of [[0, ref0], [1, ref1]] as const) {
      await expectDrillEquals(60, diskId, ref);
    }
    expect(await jobType(vm.domainName)).toBe('None');
    expect(await readdir(stagingOf(60)).catch(() => [])).toEqual([]);
  });
});

describe('yielding to a migration', () => {
  it('an AbortSignal mid-stream ends the seed cleanly: E_ABORTED, export and scratch gone, no checkpoint left, previous snapshot stands', async () => {
    const vm = await env.createVm({ vmId: 62, disks: [{ diskId: 0, sizeMiB: 256, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 8, pattern: 0x71 }], overlayData: [{ offsetMiB: 8, lengthMiB: 96, pattern: 0x72 }] }] });
    let ctx: Awaited<ReturnType<typeof buildContext>> | undefined;
    try {
      const found = await discover({ datastoreLocation: env.dsRoot });
      const disks = found.eligible.filter((d) => d.vmId === 62);
      const req = { vmId: 62, domainName: vm.domainName, dsDir: disks[0]!.dsDir, disks };
      // The previous snapshot goes unthrottled (8 MB/s would make it ~13 s of waiting); only the seed
      // aborted below must be slow, so that bytes are still flowing when the signal fires.
      const firstCtx = await buildContext({ log: pino({ level: 'silent' }), overrides: env.contextOverrides() });
      try {
        const [first] = await runVmCycle(await firstCtx.cycleDeps(), req);
        expect(first?.ok, first?.error?.message).toBe(true);
      } finally {
        await firstCtx.replicas.closeAll();
      }
      ctx = await buildContext({
        log: pino({ level: 'silent' }),
        overrides: env.contextOverrides({ extra: { limits: { bandwidthMBps: 8 } } }),
      });
      const published = await sha256File(path.join(env.snapsDir, '62', 'disk.0.snap', 'base.1'));
      const checkpointsBefore = (await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name'])).trim();

      await guestWrite(env.lv, vm.domainName, { offsetMiB: 150, lengthMiB: 4, pattern: 0x73 });
      const ac = new AbortController();
      const cycle = runVmCycle(await ctx.cycleDeps(), { ...req, forceFull: true, signal: ac.signal });
      await waitFor('the NBD socket', () => exists(path.join(stagingOf(62), 'nbd.sock')));
      await sleep(1000); // bytes are flowing (8 MB/s for ~100 MiB)
      expect(await jobType(vm.domainName)).toBe('Unbounded');
      const t0 = Date.now();
      ac.abort();
      const [o] = await cycle;
      const yieldMs = Date.now() - t0;
      expect(o?.ok).toBe(false);
      expect(o?.error?.code).toBe('E_ABORTED');
      // a migration waits at most 30 s for the domain's job: it must be gone well before
      expect(yieldMs).toBeLessThan(30_000);
      expect(await jobType(vm.domainName)).toBe('None');
      expect(await readdir(stagingOf(62)).catch(() => [])).toEqual([]);
      expect((await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name'])).trim()).toBe(checkpointsBefore);
      expect(await sha256File(path.join(env.snapsDir, '62', 'disk.0.snap', 'base.1'))).toBe(published);
    } finally {
      await ctx?.replicas.closeAll();
      await vm.destroy().catch(() => {});
    }
  });
});

describe('a migration wants the domain while a seed streams', () => {
  it('a yield marker mid-stream ends the export within the migration\'s 30 s: E_YIELDED, job and scratch gone, previous snapshot stands', async () => {
    const vm = await env.createVm({ vmId: 63, disks: [{ diskId: 0, sizeMiB: 256, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 8, pattern: 0x81 }], overlayData: [{ offsetMiB: 8, lengthMiB: 96, pattern: 0x82 }] }] });
    const ctx = await buildContext({
      log: pino({ level: 'silent' }),
      overrides: env.contextOverrides({ extra: { limits: { bandwidthMBps: 8 } } }),
    });
    try {
      const found = await discover({ datastoreLocation: env.dsRoot });
      const disks = found.eligible.filter((d) => d.vmId === 63);
      const req = { vmId: 63, domainName: vm.domainName, dsDir: disks[0]!.dsDir, disks };
      const cycle = runVmCycle(await ctx.cycleDeps(), req);
      await waitFor('the NBD socket', () => exists(path.join(stagingOf(63), 'nbd.sock')));
      await sleep(1000);
      expect(await jobType(vm.domainName)).toBe('Unbounded');
      const domId = Number((await env.lv.virshOk(['domid', vm.domainName])).trim());
      const t0 = Date.now();
      await writeYieldMarker(env.stateDir, { vmId: 63, until: Math.floor(Date.now() / 1000) + 120, domainId: domId, domainName: vm.domainName, setAt: Math.floor(Date.now() / 1000), reason: 'test migration' });
      const [o] = await cycle;
      expect(o?.ok).toBe(false);
      expect(o?.error?.code).toBe('E_YIELDED');
      expect(await jobType(vm.domainName)).toBe('None');
      // the contract: the domain's job is released before a migration waiting for it gives up (30 s)
      expect(Date.now() - t0).toBeLessThan(30_000);
      expect(await readdir(stagingOf(63)).catch(() => [])).toEqual([]);
      expect(await exists(path.join(env.snapsDir, '63', 'disk.0.snap', 'base.1'))).toBe(false);
      await clearYieldMarker(env.stateDir, 63);
    } finally {
      await ctx.replicas.closeAll();
      await vm.destroy().catch(() => {});
    }
  });
});

describe('a disk larger than the free space of its datastore', () => {
  it('is seeded: only the allocated data moves, nothing of disk size is written on the hypervisor', async () => {
    const fs = await statfs(env.dsRoot);
    const free = Number(fs.bavail) * Number(fs.bsize);
    const sizeMiB = Math.max(256 * 1024, Math.ceil((2 * free) / MiB / 1024) * 1024); // at least twice the free space
    const big = await env.createVm({ vmId: 61, disks: [{ diskId: 0, sizeMiB, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 4, pattern: 0x61 }], overlayData: [{ offsetMiB: 1024, lengthMiB: 8, pattern: 0x62 }] }] });
    try {
      expect(sizeMiB * MiB).toBeGreaterThan(free);
      await guestWrite(env.lv, big.domainName, { offsetMiB: sizeMiB - 16, lengthMiB: 4, pattern: 0x63 }); // far end of the disk
      const s = startSnapshot(61);
      const r = await s.done;
      expect(r.code, r.stdout + r.stderr).toBe(0);
      expect(r.peak).toBeLessThan(64 * MiB);
      // the replica's base.1 equals the live disk (guest idle): compared through both chains
      const rep = path.join(env.snapsDir, '61', 'disk.0');
      const chk = await run('qemu-img', ['check', rep]);
      expect(chk.code, chk.stdout + chk.stderr).toBe(0);
      const cmp = await run('qemu-img', ['compare', '-U', big.disks[0]!.base1Path, rep], { timeoutMs: 600_000 });
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
      expect((await stat(path.join(env.snapsDir, '61', 'disk.0.snap', 'base.1'))).size).toBeLessThan(16 * MiB);
    } finally {
      await big.destroy().catch(() => {});
    }
  });
});

describe('a seed\'s capture begun while the replica connection comes up (a VM never protected from this host)', () => {
  it('waits for the source check it runs beside: a damaged base.1 is refused (E_SOURCE_DAMAGED) and leaves no job, checkpoint, staging or replica files', async () => {
    const vm = await env.createVm({ vmId: 65, disks: [{ diskId: 0, sizeMiB: 64, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 4, pattern: 0xa1 }], overlayData: [{ offsetMiB: 4, lengthMiB: 8, pattern: 0xa2 }] }] });
    try {
      await unreferenceHeaderCluster(vm.disks[0]!.base1Path);
      const r = await startSnapshot(65).done;
      expect(r.code).not.toBe(0);
      expect(r.stdout + r.stderr).toMatch(/E_SOURCE_DAMAGED/);
      expect(r.stdout + r.stderr).toMatch(/refcount=0 reference=1/);
      const logs = logRecords(r.stderr);
      // the capture was begun early (nothing says the replica holds anything) and never got to its job: a
      // job begun would have been ended as an early capture the plan did not use
      expect(logs.filter((l) => /^capture|^captured$|^streaming/.test(String(l['msg']))).map((l) => l['msg'])).toEqual([]);
      expect(await jobType(vm.domainName)).toBe('None');
      expect((await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name'])).trim()).toBe('');
      expect(await readdir(stagingOf(65)).catch(() => [])).toEqual([]);
      expect(await readdir(path.join(env.snapsDir, '65', 'disk.0.snap')).catch(() => [])).toEqual([]);
    } finally {
      await vm.destroy().catch(() => {});
    }
  });
  it('is the one streamed for a first seed, and is ended with its checkpoint when the replica turns out to hold a lineage', async () => {
    const vm = await env.createVm({ vmId: 64, disks: [{ diskId: 0, sizeMiB: 128, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 8, pattern: 0x91 }], overlayData: [{ offsetMiB: 8, lengthMiB: 24, pattern: 0x92 }] }] });
    try {
      const first = await startSnapshot(64).done;
      expect(first.code, first.stdout + first.stderr).toBe(0);
      const streamed = logRecords(first.stderr).find((l) => l['msg'] === 'streaming from the pull-mode export');
      expect(streamed?.['beganEarly']).toBe(true);

      // This host forgets the VM (its state entry and libvirt's checkpoints, the bitmaps with them); the
      // replica keeps the lineage. Nothing local says so: the capture begins early, then gives way.
      for (const c of (await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name'])).split('\n').map((x) => x.trim()).filter(Boolean).reverse()) {
        await env.lv.virshOk(['checkpoint-delete', vm.domainName, c]);
      }
      await new StateStore(env.stateDir).update((s) => {
        delete s.disks[diskKey(64, 0)];
        return s;
      });
      await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 40, lengthMiB: 2, pattern: 0x93 });
      const ref = await guestViewSha256(vm.disks[0]!.base1Path, env.root);
      const again = await startSnapshot(64).done;
      expect(again.code, again.stdout + again.stderr).toBe(0);
      const logs = logRecords(again.stderr);
      const dropped = logs.find((l) => l['msg'] === 'capture begun before the plan not used; ended');
      expect(dropped?.['why']).toBe('the replica holds a lineage');
      expect(logs.find((l) => l['msg'] === 'streaming from the pull-mode export')?.['beganEarly']).toBeUndefined();
      // the replica's checkpoint is not in libvirt any more: a full, under a checkpoint of its own
      expect(again.stdout).toMatch(/vm 64 disk 0: full snapshot published/);
      const cks = (await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name'])).split('\n').map((x) => x.trim()).filter(Boolean);
      expect(cks).toHaveLength(1);
      expect(cks[0]).not.toBe(dropped!['checkpoint']);
      expect(await jobType(vm.domainName)).toBe('None');
      expect(await readdir(stagingOf(64)).catch(() => [])).toEqual([]);
      await expectDrillEquals(64, 0, ref);
    } finally {
      await vm.destroy().catch(() => {});
    }
  });
});

describe('a backup-begin whose answer is lost (the virsh connection dropped around it)', () => {
  it('is cleaned up as a begun job: no export, job or checkpoint left, for the seed and for an incremental; the next cycles succeed', async () => {
    const vm = await env.createVm({ vmId: 66, disks: [{ diskId: 0, sizeMiB: 128, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 4, pattern: 0xb1 }], overlayData: [{ offsetMiB: 4, lengthMiB: 16, pattern: 0xb2 }] }] });
    // A virsh whose state changes take effect but whose success line never arrives: what the agent sees when
    // libvirtd answers and the connection drops before the answer is read. Everything else passes through.
    const lossy = path.join(env.root, 'virsh-lossy');
    await writeFile(lossy, '#!/bin/bash\nset -o pipefail\nvirsh "$@" | sed -u \'/^Backup started$/d\'\n');
    await chmod(lossy, 0o755);
    const lossyCtx = await buildContext({ log: pino({ level: 'silent' }), overrides: env.contextOverrides({ extra: { virsh: lossy } }) });
    const goodCtx = await buildContext({ log: pino({ level: 'silent' }), overrides: env.contextOverrides() });
    const checkpoints = async () => (await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name'])).split('\n').map((x) => x.trim()).filter(Boolean);
    try {
      const found = await discover({ datastoreLocation: env.dsRoot });
      const disks = found.eligible.filter((d) => d.vmId === 66);
      const req = { vmId: 66, domainName: vm.domainName, dsDir: disks[0]!.dsDir, disks };
      const expectLostAndCleaned = async (ctx: typeof lossyCtx, before: string[]) => {
        const [o] = await runVmCycle(await ctx.cycleDeps(), req);
        expect(o?.ok).toBe(false);
        expect(o?.error?.code).toBe('E_VIRSH');
        expect(o?.error?.message).toMatch(/backup-begin .*may or may not have taken effect/);
        expect(await jobType(vm.domainName)).toBe('None');
        expect(await checkpoints()).toEqual(before);
        expect(await readdir(stagingOf(66)).catch(() => [])).toEqual([]);
      };

      // the seed (pull mode): the export job had begun, with its checkpoint
      await expectLostAndCleaned(lossyCtx, []);
      expect(await readdir(path.join(env.snapsDir, '66', 'disk.0.snap')).catch(() => [])).toEqual([]);
      const [seeded] = await runVmCycle(await goodCtx.cycleDeps(), req);
      expect(seeded?.ok, seeded?.error?.message).toBe(true);
      expect(seeded?.mode).toBe('full');
      const afterSeed = await checkpoints();
      expect(afterSeed).toHaveLength(1);
      const published = await sha256File(path.join(env.snapsDir, '66', 'disk.0.snap', 'base.1'));

      // an incremental (push mode): same, and the published snapshot stands
      await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 40, lengthMiB: 2, pattern: 0xb3 });
      await expectLostAndCleaned(lossyCtx, afterSeed);
      expect(await sha256File(path.join(env.snapsDir, '66', 'disk.0.snap', 'base.1'))).toBe(published);
      const ref = await guestViewSha256(vm.disks[0]!.base1Path, env.root);
      const [inc] = await runVmCycle(await goodCtx.cycleDeps(), req);
      expect(inc?.ok, inc?.error?.message).toBe(true);
      expect(inc?.mode).toBe('incremental');
      await expectDrillEquals(66, 0, ref);
      // the lossy virsh's shells answered (they were used, not bypassed)
      expect(lossyCtx.virsh.shellStats?.answered).toBeGreaterThan(0);
    } finally {
      lossyCtx.virsh.close();
      goodCtx.virsh.close();
      await lossyCtx.replicas.closeAll();
      await goodCtx.replicas.closeAll();
      await vm.destroy().catch(() => {});
    }
  });
});
