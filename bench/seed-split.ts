/**
 * Where a pull-mode seed spends its time, one piece at a time on the same 1 GiB base.1 (in-process):
 *   1. the NBD export alone: capturePull + the overlay stream consumed to nowhere;
 *   2. the export streamed to the receiver (uploadStream), as a seed does it;
 *   3. the same base.1 as a file through our upload path (upload);
 *   4. OpenSSH `ssh -c aes128-gcm host 'cat > f'` of base.1 (the reference of issue 3/14).
 * CPU: the agent (this process), the receiver process and the sshd session processes.
 * Usage: npx tsc -p tsconfig.build.json && node dist/bench/seed-split.js [dataGiB=1] [reps=2]
 */
import path from 'node:path';
import { pino } from 'pino';
import { buildContext } from '../agent/context.js';
import { capturePull } from '../lib/cycle/capture-pull.js';
import { startAgentEnv } from '../dev/agent-env.js';
import { descendants, fillDisk, plainSshAccess, procCpu, q, sh, sshdPid, timedShell } from './lib/cluster.js';

const GIB = Number(process.argv[2] ?? 1);
const REPS = Number(process.argv[3] ?? 2);
const MiB = 1048576;

async function main(): Promise<void> {
  const env = await startAgentEnv({ name: 'seed-split' });
  const ctx = await buildContext({
    log: pino({ level: 'warn' }),
    overrides: env.contextOverrides(),
  });
  try {
    const plain = await plainSshAccess(env);
    const mib = Math.round(GIB * 1024);
    const vm = await env.createVm({ vmId: 9, disks: [{ diskId: 0, sizeMiB: mib + 1024, freq: 60 }], noStart: true });
    await fillDisk(vm.disks[0]!, mib + 1024, 0, mib, env.root);
    await vm.start();
    const deps = await ctx.cycleDeps();
    let ck = 0;
    const pull = () =>
      capturePull(deps.libvirt, ctx.qemuImg, {
        vmId: 9,
        domainName: vm.domainName,
        stagingDir: path.join(env.dsRoot, String(env.dsId), '.onestor', '9'),
        checkpointName: `onestor-9-${ck++}-bench`,
        tryFreeze: false,
        timeoutMs: 600_000,
        minFreePercent: 1,
        disks: [{ diskId: 0, base1Path: vm.disks[0]!.base1Path, snapDir: vm.disks[0]!.snapDir, mode: 'full', virtualSize: (mib + 1024) * MiB }],
      });
    const replica = await deps.replicaFor('127.0.0.1');
    const spid = await sshdPid(env);
    const serverCpu = async () => {
      let recv = 0;
      let sshd = 0;
      for (const p of await descendants(spid, /receive/)) recv += (await procCpu(p))?.self ?? 0;
      for (const p of await descendants(spid, /sshd: /)) sshd += (await procCpu(p))?.self ?? 0;
      return { recv, sshd };
    };
    const timed = async (label: string, bytes: () => number, fn: () => Promise<void>) => {
      const c0 = process.cpuUsage();
      const s0 = await serverCpu();
      const t0 = performance.now();
      await fn();
      const sec = (performance.now() - t0) / 1000;
      const c = process.cpuUsage(c0);
      const s1 = await serverCpu();
      console.log(`${label.padEnd(34)} ${sec.toFixed(2).padStart(6)} s ${((bytes() / MiB) / sec).toFixed(0).padStart(5)} MB/s   cpu agent ${((c.user + c.system) / 1e6).toFixed(2)} s, receiver ${(s1.recv - s0.recv).toFixed(2)} s, sshd ${(s1.sshd - s0.sshd).toFixed(2)} s`);
    };
    console.log(`load average ${(await sh('cat /proc/loadavg')).trim()}`);
    for (let r = 0; r < REPS; r++) {
      let n = 0;
      await timed('export -> nowhere', () => n, async () => {
        const p = await pull();
        for await (const b of p.disks[0]!.stream()) n += b.length;
        await p.end();
      });
      let m = 0;
      await timed('export -> receiver (a seed)', () => m, async () => {
        const p = await pull();
        const s = await replica.openDisk(9, 0);
        m = (await s.uploadStream('base1', { size: p.disks[0]!.size, chunks: p.disks[0]!.stream() }, { key: `s${r}` })).bytes;
        await s.close();
        await p.end();
      });
      let f = 0;
      await timed('base.1 file -> receiver (upload)', () => f, async () => {
        const s = await replica.openDisk(9, 0);
        f = (await s.upload('base1', vm.disks[0]!.base1Path, { key: `f${r}` })).bytes;
        await s.close();
      });
      const o = await timedShell(`ssh ${plain.args.map(q).join(' ')} ${plain.target} 'cat > /tmp/seed-split-ref' < ${q(vm.disks[0]!.base1Path)}`);
      console.log(`${'ssh -c aes128-gcm cat > f'.padEnd(34)} ${o.seconds.toFixed(2).padStart(6)} s ${((f / MiB) / o.seconds).toFixed(0).padStart(5)} MB/s   cpu ssh client ${o.childCpu.toFixed(2)} s`);
      await sh(`ssh ${plain.args.map(q).join(' ')} ${plain.target} 'rm -f /tmp/seed-split-ref'`);
    }
    console.log(`load average ${(await sh('cat /proc/loadavg')).trim()}`);
    for (const c of (await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name'])).split('\n').map((x) => x.trim()).filter(Boolean).reverse()) await env.lv.virsh(['checkpoint-delete', vm.domainName, c]);
    await vm.destroy();
  } finally {
    await ctx.replicas.closeAll();
    await env.stop();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
