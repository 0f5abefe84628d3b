/**
 * Issue 4's cycle-time goals measured the way the daemon runs cycles: in one process, with the replica
 * connection kept open between cycles (no Node start-up, no SSH handshake, no receiver start per cycle),
 * next to OpenNebula's own method (overlay + rsync of the frozen base.1 + blockcommit back) on an identical
 * VM, 16 MiB changed per cycle. bench/incremental.ts measures whole CLI runs; this isolates the cycle.
 * Usage: npx tsc -p tsconfig.build.json && node dist/bench/daemon-cycle.js [sizesGiB=0.3,4] [reps=3]
 */
import path from 'node:path';
import { pino } from 'pino';
import { buildContext } from '../agent/context.js';
import { discover } from '../lib/discover/discover.js';
import { runVmCycle } from '../lib/cycle/cycle.js';
import { startAgentEnv } from '../dev/agent-env.js';
import { guestWrite } from '../dev/guest.js';
import { fillDisk, plainSshAccess, sh, q } from './lib/cluster.js';
import { upstreamCycle, type UpstreamDisk } from './lib/upstream.js';
import { median, table } from './lib/stats.js';

const SIZES = (process.argv[2] ?? '0.3,4').split(',').map(Number);
const REPS = Number(process.argv[3] ?? 3);
const CHANGE_MIB = 16;
const GOALS: Record<string, number> = { '0.3': 0.5, '4': 0.1 };

async function main(): Promise<void> {
  const env = await startAgentEnv({ name: 'bench-daemon' });
  const log = pino({ level: process.env.BENCH_LOG_LEVEL ?? 'warn' });
  const ctx = await buildContext({
    log,
    overrides: env.contextOverrides(),
  });
  const rows: string[][] = [];
  try {
    const plain = await plainSshAccess(env);
    for (const [i, gib] of SIZES.entries()) {
      const dataMiB = Math.round(gib * 1024);
      const virtMiB = dataMiB + 1024;
      const vmO = await env.createVm({ vmId: 400 + i, disks: [{ diskId: 0, sizeMiB: virtMiB, freq: 60 }], noStart: true });
      const vmU = await env.createVm({ vmId: 500 + i, disks: [{ diskId: 0, sizeMiB: virtMiB, freq: 60 }], noStart: true });
      try {
        await fillDisk(vmO.disks[0]!, virtMiB, 0, dataMiB, env.root);
        for (const f of ['base', 'base.1']) await sh(`cp --sparse=always ${q(path.join(vmO.disks[0]!.snapDir, f))} ${q(path.join(vmU.disks[0]!.snapDir, f))}`);
        await vmO.start();
        await vmU.start();
        const upDisk: UpstreamDisk = { domain: vmU.domainName, target: 'vda', vmId: vmU.vmId, diskId: 0, snapDir: vmU.disks[0]!.snapDir, basePath: vmU.disks[0]!.basePath, base1Path: vmU.disks[0]!.base1Path };
        const found = await discover({ datastoreLocation: env.dsRoot });
        const disks = found.eligible.filter((d) => d.vmId === vmO.vmId);
        const cycle = async () => {
          const t0 = performance.now();
          const [o] = await runVmCycle(await ctx.cycleDeps(), { vmId: vmO.vmId, domainName: disks[0]!.domainName, dsDir: disks[0]!.dsDir, disks });
          if (!o?.ok) throw new Error(`cycle failed: ${o?.error?.message}`);
          return { seconds: (performance.now() - t0) / 1000, mode: o.mode!, bytes: o.bytes ?? 0 };
        };
        await cycle(); // seed (and the connection is opened and kept from here on)
        await upstreamCycle(env.lv, upDisk, plain, env.snapsDir);
        await guestWrite(env.lv, vmO.domainName, { offsetMiB: 1, lengthMiB: CHANGE_MIB, pattern: 0x10 });
        await cycle(); // first incremental after the seed
        await guestWrite(env.lv, vmU.domainName, { offsetMiB: 1, lengthMiB: CHANGE_MIB, pattern: 0x10 });
        await upstreamCycle(env.lv, upDisk, plain, env.snapsDir);
        const ours: number[] = [];
        const up: number[] = [];
        for (let r = 0; r < REPS; r++) {
          const off = 32 + r * CHANGE_MIB * 2;
          await guestWrite(env.lv, vmO.domainName, { offsetMiB: off, lengthMiB: CHANGE_MIB, pattern: 0x20 + r });
          const o = await cycle();
          if (o.mode !== 'incremental') throw new Error(`expected incremental, got ${o.mode}`);
          ours.push(o.seconds);
          await guestWrite(env.lv, vmU.domainName, { offsetMiB: off, lengthMiB: CHANGE_MIB, pattern: 0x20 + r });
          up.push((await upstreamCycle(env.lv, upDisk, plain, env.snapsDir)).seconds);
          console.log(`${gib} GiB #${r + 1}: ours ${o.seconds.toFixed(2)} s (${(o.bytes / 1048576).toFixed(1)} MiB), upstream ${up[r]!.toFixed(2)} s`);
        }
        const ratio = median(ours) / median(up);
        const goal = GOALS[String(gib)];
        rows.push([`${gib} GiB`, `${CHANGE_MIB} MiB`, median(ours).toFixed(2), median(up).toFixed(2), `${ratio.toFixed(3)}x`, goal ? `<= ${goal}x ${ratio <= goal ? 'met' : 'NOT met'}` : '-']);
      } finally {
        await vmO.destroy().catch(() => {});
        await vmU.destroy().catch(() => {});
        await sh(`rm -rf ${q(vmO.vmDir)} ${q(vmU.vmDir)} ${q(path.join(env.snapsDir, String(vmO.vmId)))} ${q(path.join(env.snapsDir, String(vmU.vmId)))}`);
      }
    }
  } finally {
    await ctx.replicas.closeAll();
    await env.stop();
  }
  console.log(`\nCycle wall time with a kept-open connection (daemon-like), median of ${REPS}, 16 MiB changed per cycle:\n`);
  console.log(table(['base.1 data', 'changed', 'ours s', 'upstream s', 'ours/upstream', 'goal'], rows));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
