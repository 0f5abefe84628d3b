/**
 * OpenNebula's own method (bench/lib/upstream.ts) run on its own: a 1 GiB disk with ~300 MiB in base.1,
 * N cycles of 16 MiB guest writes; per-step times, bytes rsync sent, and the chain changes counted from
 * libvirt each cycle (ours: 0). At the end the replica's frozen copy is checked against the source at its
 * point in time (qemu-img compare), so the reference method is known to do what it claims.
 * Usage: npx tsc -p tsconfig.build.json && node dist/bench/upstream-method.js [cycles=3]
 */
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { startAgentEnv } from '../dev/agent-env.js';
import { guestWrite, readGuestView, sha256File } from '../dev/guest.js';
import { fillDisk, plainSshAccess } from './lib/cluster.js';
import { medianSpread, mib, table } from './lib/stats.js';
import { upstreamCycle, type UpstreamCycleResult, type UpstreamDisk } from './lib/upstream.js';

const CYCLES = Number(process.argv[2] ?? 3);
const VM = 81;

async function main(): Promise<void> {
  const env = await startAgentEnv({ name: 'bench-upstream' });
  try {
    const plain = await plainSshAccess(env);
    const vm = await env.createVm({ vmId: VM, disks: [{ diskId: 0, sizeMiB: 1024, freq: 60 }], noStart: true });
    await fillDisk(vm.disks[0]!, 1024, 0, 300, env.root);
    await vm.start();
    const d = vm.disks[0]!;
    const disk: UpstreamDisk = { domain: vm.domainName, target: 'vda', vmId: VM, diskId: 0, snapDir: d.snapDir, basePath: d.basePath, base1Path: d.base1Path };
    const results: UpstreamCycleResult[] = [];
    const seed = await upstreamCycle(env.lv, disk, plain, env.snapsDir);
    let expected = '';
    for (let i = 0; i < CYCLES; i++) {
      await guestWrite(env.lv, vm.domainName, { offsetMiB: 20 * i, lengthMiB: 16, pattern: 0x30 + i });
      const ref = path.join(env.root, 'ref.raw');
      await readGuestView(d.base1Path, ref);
      expected = await sha256File(ref);
      await rm(ref, { force: true });
      results.push(await upstreamCycle(env.lv, disk, plain, env.snapsDir));
    }
    const rows = [seed, ...results].map((r, i) => [
      i === 0 ? 'seed' : `#${i}`,
      r.seconds.toFixed(2),
      r.steps.snapshot.toFixed(2),
      r.steps.rsync.toFixed(2),
      r.steps.blockcommit.toFixed(2),
      mib(r.rsyncBytesSent),
      String(r.chainChanges),
      String(r.pivots),
    ]);
    console.log(`\nUpstream method, 1 GiB disk, ~300 MiB in base.1, 16 MiB written per cycle\n`);
    console.log(table(['cycle', 'total s', 'snapshot-create-as s', 'rsync s', 'blockcommit s', 'rsync sent MiB', 'chain changes', 'pivots'], rows));
    console.log(`\nsteady cycles: ${medianSpread(results.map((r) => r.seconds))} s`);
    // The replica's copy must be the source's point in time (recovery would use it).
    const got = path.join(env.root, 'replica.raw');
    await readGuestView(path.join(env.snapsDir, String(VM), 'disk.0.snap', 'base.1'), got);
    const same = (await sha256File(got)) === expected;
    await rm(got, { force: true });
    console.log(`replica copy equals the source at the last cycle's point in time: ${same ? 'yes' : 'NO'}`);
    if (!same) process.exitCode = 1;
  } finally {
    await env.stop();
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
