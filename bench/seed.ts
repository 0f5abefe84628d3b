/**
 * Issue 14: a seed (first full copy, replica empty for the VM) side by side in one run, same disks:
 *   ours pull  — pull-mode backup export streamed as a qcow2 overlay (the default);
 *   ours push  — the staged push-mode copy + thinning (seedMode 'push'), once per size, for reference;
 *   upstream   — snapshot-create-as + rsync of base and the frozen base.1 + blockcommit (bench/lib/upstream.ts).
 * Our seeds run in-process as the daemon runs them, each on a fresh SSH connection (the pool is closed
 * before every seed), so connect and receiver start are paid like upstream's rsync pays its ssh.
 * Wire = bytes over the loopback interface, IP and TCP headers included (/proc/net/dev; nothing else uses
 * 127.0.0.1 here). BENCH_WIRE=relay counts through a relay process in front of sshd instead, as before
 * 2026-12-01: that relay costs ~1 CPU-s per GiB and slowed upstream's seed more than ours.
 * Staging peak = allocated bytes under DS/.onestor/VMID sampled every 50 ms by this script.
 * "replica done" = until the receiver has also made its A/B spare (after its publish reply; the agent
 * hangs up at once, the receiver process lives on until the spare is made, and the next method starts
 * only once it is gone, on a quiet replica).
 * BENCH_DROP_CACHES=1 drops the page cache before every seed and reads the two source files back (each
 * method starts from the same memory state; bench/README.md, issue 14 third and fourth passes).
 * BENCH_METHODS=pull,upstream runs only the named methods (default: pull,upstream,push); BENCH_RECEIVER_ARGS adds receiver flags.
 * BENCH_REFULL=1: from the second run of ours on, a forced full over the lineage the replica holds (no cleanup).
 * Usage: npx tsc -p tsconfig.build.json && node dist/bench/seed.js [dataGiB=1,4] [reps=2]
 */
import { readdir, rm, stat, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { pino } from 'pino';
import { buildContext } from '../agent/context.js';
import { discover } from '../lib/discover/discover.js';
import { runVmCycle, type CycleDeps } from '../lib/cycle/cycle.js';
import { diskKey } from '../lib/cycle/state.js';
import { startAgentEnv, type AgentEnv } from '../dev/agent-env.js';
import type { OneVm } from '../dev/one-layout.js';
import { emptyReplicaFor, fillDisk, fsType, levelPageCache, plainSshAccess, settleGuests, sh, q, startTcpMeter, loopbackMeter, type TcpMeter } from './lib/cluster.js';
import { upstreamCycle, type UpstreamDisk } from './lib/upstream.js';
import { ourCheckpoints } from './soak.js';
import { median, table } from './lib/stats.js';

const SIZES = (process.argv[2] ?? '1,4').split(',').map(Number);
const REPS = Number(process.argv[3] ?? 2);
const REFULL = process.env.BENCH_REFULL === '1';
// BENCH_METHODS=pull,upstream,push (the default: all three) runs only those
const METHODS = new Set((process.env.BENCH_METHODS ?? 'pull,upstream,push').split(',').map((x) => x.trim()));
const BASE_MIB = 64;
const MiB = 1048576;

async function allocatedUnder(dir: string): Promise<number> {
  let n = 0;
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    const st = await stat(path.join(dir, name)).catch(() => null);
    if (st) n += st.blocks * 512;
  }
  return n;
}

async function main(): Promise<void> {
  const env = await startAgentEnv({ name: 'bench-seed', receiverArgs: process.env.BENCH_RECEIVER_ARGS?.split(' ').filter(Boolean) ?? [] });
  // BENCH_WIRE=relay counts through a relay process (as before); default: the loopback counter, no relay
  const meter = process.env.BENCH_WIRE === 'relay' ? await startTcpMeter(env.sshd.port) : await loopbackMeter(env.sshd.port);
  const knownHosts = path.join(env.root, 'known_hosts.meter');
  await writeFile(knownHosts, `[127.0.0.1]:${meter.port} ${env.sshd.hostPublicKey}\n`, { mode: 0o600 });
  const ctx = await buildContext({
    log: pino({ level: process.env.BENCH_LOG_LEVEL ?? 'warn' }),
    // through the meter's port (sshd's own with the loopback counter)
    overrides: env.contextOverrides({ replica: { port: meter.port, knownHostsFile: knownHosts } }),
  });
  const rows: string[][] = [];
  const lines: string[] = [];
  try {
    const plain = await plainSshAccess(env, meter.port);
    console.log(`replica SNAPS on ${await fsType(env.snapsDir)}; load average ${(await sh('cat /proc/loadavg')).trim()}`);
    for (const [i, gib] of SIZES.entries()) {
      const dataMiB = Math.round(gib * 1024);
      const virtMiB = dataMiB + BASE_MIB + 1024;
      const mk = (id: number) => env.createVm({ vmId: id, disks: [{ diskId: 0, sizeMiB: virtMiB, freq: 60 }], noStart: true });
      const vmP = await mk(600 + i);
      const vmS = await mk(700 + i);
      const vmU = await mk(800 + i);
      const vms = [vmP, vmS, vmU];
      try {
        await fillDisk(vmP.disks[0]!, virtMiB, BASE_MIB, dataMiB, env.root);
        for (const v of [vmS, vmU]) for (const f of ['base', 'base.1']) await sh(`cp --sparse=always ${q(path.join(vmP.disks[0]!.snapDir, f))} ${q(path.join(v.disks[0]!.snapDir, f))}`);
        for (const v of vms) await v.start();
        // guests that just started burn CPU for a while (firmware): the first run would pay for it
        const guestCpu = await settleGuests(vms.map((v) => v.domainName));
        console.log(`guests settled: ${guestCpu.toFixed(2)} CPU in the last second`);
        const base1Bytes = (await stat(vmP.disks[0]!.base1Path)).size;
        const upDisk: UpstreamDisk = { domain: vmU.domainName, target: 'vda', vmId: vmU.vmId, diskId: 0, snapDir: vmU.disks[0]!.snapDir, basePath: vmU.disks[0]!.basePath, base1Path: vmU.disks[0]!.base1Path };

        const ours = async (vm: OneVm, seedMode: 'pull' | 'push') => {
          // an empty replica for the VM; with BENCH_REFULL=1, from the 2nd run on, a forced full over the
          // lineage the replica holds (`snapshot --full`)
          const refull = REFULL && existsSync(path.join(env.snapsDir, String(vm.vmId)));
          if (!refull) await emptyReplicaFor(env.snapsDir, vm.vmId);
          // and a host that never protected it (a first seed; a new host after a migration or a recovery):
          // no checkpoint of ours in libvirt, no state. BENCH_RESEED=1 keeps both (the replica lost the copy).
          const deps: CycleDeps = { ...(await ctx.cycleDeps()), seedMode };
          if (process.env.BENCH_RESEED !== '1' && !REFULL) {
            for (const c of (await ourCheckpoints(env, vm)).reverse()) await env.lv.virshOk(['checkpoint-delete', vm.domainName, c]);
            await deps.state.update((st) => {
              delete st.disks[diskKey(vm.vmId, 0)];
              for (const k of Object.keys(st.baseDigests)) if (k.startsWith(vm.vmDir + '/')) delete st.baseDigests[k];
            });
          }
          await ctx.replicas.closeAll();
          const found = await discover({ datastoreLocation: env.dsRoot });
          const disks = found.eligible.filter((d) => d.vmId === vm.vmId);
          const staging = path.join(env.dsRoot, String(env.dsId), '.onestor', String(vm.vmId));
          let peak = 0;
          let sampling = true;
          const sampler = (async () => {
            while (sampling) {
              peak = Math.max(peak, await allocatedUnder(staging));
              await new Promise((r) => setTimeout(r, 50));
            }
          })();
          await levelPageCache([vm.disks[0]!.basePath, vm.disks[0]!.base1Path]);
          await meter.reset();
          const t0 = performance.now();
          const [o] = await runVmCycle(deps, { vmId: vm.vmId, domainName: disks[0]!.domainName, dsDir: disks[0]!.dsDir, disks, ...(refull ? { forceFull: true } : {}) });
          const seconds = (performance.now() - t0) / 1000;
          sampling = false;
          await sampler;
          if (!o?.ok || o.mode !== 'full') throw new Error(`seed of vm ${vm.vmId} failed: ${o?.error?.message ?? o?.mode}`);
          const c = await meter.refresh();
          // The receiver makes the A/B spare after its publish reply and outlives the connection for it:
          // wait until it is gone, so the next method runs on a quiet replica, and show the time until then.
          await ctx.replicas.closeAll();
          if (!(await env.sshd.sessionCommandsGone())) throw new Error('the receiver did not finish within 120 s of the seed');
          const settled = (performance.now() - t0) / 1000;
          return { seconds, wire: c.up + c.down, peak, settled };
        };
        const upstream = async () => {
          await rm(path.join(env.snapsDir, String(vmU.vmId)), { recursive: true, force: true });
          await levelPageCache([upDisk.basePath, upDisk.base1Path]);
          await meter.reset();
          const r = await upstreamCycle(env.lv, upDisk, plain, env.snapsDir);
          const c = await meter.refresh();
          return { seconds: r.seconds, wire: c.up + c.down, peak: NaN, settled: NaN };
        };

        const res: Record<string, Array<{ seconds: number; wire: number; peak: number; settled: number }>> = { pull: [], push: [], upstream: [] };
        for (let r = 0; r < REPS; r++) {
          // alternate which method goes first, so neither always runs on a machine the other just warmed
          if (r % 2 === 0) {
            if (METHODS.has('pull')) res['pull']!.push(await ours(vmP, 'pull'));
            if (METHODS.has('upstream')) res['upstream']!.push(await upstream());
          } else {
            if (METHODS.has('upstream')) res['upstream']!.push(await upstream());
            if (METHODS.has('pull')) res['pull']!.push(await ours(vmP, 'pull'));
          }
          if (r === 0 && METHODS.has('push')) res['push']!.push(await ours(vmS, 'push'));
          const last = (k: string) => res[k]![res[k]!.length - 1]?.seconds.toFixed(2) ?? '-';
          const line = `${gib} GiB #${r + 1}: pull ${last('pull')} s, upstream ${last('upstream')} s${r === 0 ? `, push ${last('push')} s` : ''}`;
          console.log(line);
          lines.push(line);
        }
        const up = median(res['upstream']!.map((x) => x.seconds));
        // each rep's two methods ran back to back: their ratio is steadier than the ratio of medians when
        // the machine's speed drifts between reps
        const paired = res['pull']!.map((x, i) => x.seconds / (res['upstream']![i]?.seconds ?? NaN)).filter((x) => Number.isFinite(x));
        if (paired.length) {
          const line = `${gib} GiB pull / upstream per rep: ${paired.map((x) => `${x.toFixed(2)}x`).join(', ')}; median ${median(paired).toFixed(2)}x`;
          console.log(line);
          lines.push(line);
        }
        for (const [k, label] of [['pull', 'ours, pull-mode stream'], ['push', 'ours, push-mode staged (old)'], ['upstream', 'upstream snapshot+rsync']] as const) {
          const xs = res[k]!;
          if (xs.length === 0) continue;
          const s = xs.map((x) => x.seconds);
          const peak = Math.max(...xs.map((x) => x.peak));
          rows.push([
            `${gib} GiB (base.1 ${(base1Bytes / MiB).toFixed(0)} MiB, base ${BASE_MIB} MiB, disk ${virtMiB} MiB)`,
            label,
            `${median(s).toFixed(2)} (${Math.min(...s).toFixed(2)}–${Math.max(...s).toFixed(2)})`,
            `${(median(s) / up).toFixed(2)}x`,
            (median(xs.map((x) => x.wire)) / MiB).toFixed(1),
            Number.isNaN(peak) ? '-' : (peak / MiB).toFixed(1),
            xs.some((x) => Number.isNaN(x.settled)) ? '-' : median(xs.map((x) => x.settled)).toFixed(2),
          ]);
        }
      } finally {
        for (const v of vms) await v.destroy().catch(() => {});
        await sh(`rm -rf ${vms.map((v) => `${q(v.vmDir)} ${q(path.join(env.snapsDir, String(v.vmId)))}`).join(' ')}`);
      }
    }
  } finally {
    await ctx.replicas.closeAll();
    await meter.close();
    await env.stop();
  }
  console.log(`\nSeed (replica empty for the VM: base + base.1 sent), median (min–max) of ${REPS} for pull and upstream, 1 run of push; load average at the end ${(await sh('cat /proc/loadavg')).trim()}\n`);
  console.log(table(['data in base.1', 'method', 'seconds', 'vs upstream', 'wire MiB', 'staging peak MiB', 'replica done s'], rows));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
