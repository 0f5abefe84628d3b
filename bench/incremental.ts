/**
 * Issue 4, "Measure": our incremental cycle, our full cycle and OpenNebula's own method (bench/lib/upstream.ts)
 * side by side in one run, on disks whose base.1 holds 0.3, 1, 2 and 4 GiB (incompressible data), with
 * 16 MiB and 256 MiB changed per cycle by guest writes.
 *   - bytes on the wire: every byte of the SSH connections (handshake, framing, MACs, protocol) counted by a
 *     TCP relay in front of the replica's sshd, which both methods go through;
 *   - dirty bytes: the size libvirt reports for our checkpoint's bitmap (`checkpoint-dumpxml --size`);
 *   - cycle wall time: ours = the whole `snapshot` CLI process (start-up, connect and all; the daemon keeps
 *     its connection, so this overstates it), plus the cycle's own duration it reports; upstream = its 4 steps;
 *   - chain changes: how often the disk's active image changed during a cycle (read from libvirt).
 * The replica (SNAPS) sits on the machine's temp filesystem; its type and whether reflink works are printed,
 * so a hidden O(disk) copy cannot hide behind reflink.
 * Usage: npx tsc -p tsconfig.build.json && node dist/bench/incremental.js [sizesGiB=0.3,1,2,4] [reps=3]
 */
import { rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { agentMain, runNode, startAgentEnv, type AgentEnv } from '../dev/agent-env.js';
import { guestWrite } from '../dev/guest.js';
import type { OneVm } from '../dev/one-layout.js';
import { fileSize, fillDisk, fsType, plainSshAccess, reflinkWorks, sh, q, startTcpMeter, type TcpMeter } from './lib/cluster.js';
import { median, medianSpread, mib, MiB, table } from './lib/stats.js';
import { upstreamCycle, type UpstreamDisk } from './lib/upstream.js';

const SIZES_GIB = (process.argv[2] ?? '0.3,1,2,4').split(',').map(Number);
const REPS = Number(process.argv[3] ?? 3);
const CHANGES_MIB = [16, 256];

interface Run {
  seconds: number;
  /** ours: the cycle's own duration as the CLI reports it */
  cycleSeconds?: number;
  wire: number;
  payload: number;
  dirty?: number;
  chainChanges: number;
  mode?: string;
  /** ours: where the cycle's time went, from the agent's own log lines */
  phases?: string;
}

/** From the CLI's pino lines: cycle start -> captured -> disk published -> cycle end (seconds). */
function phasesFromLog(stderr: string): string {
  const at = new Map<string, number>();
  let captured: { ms?: number; thinMs?: number } = {};
  for (const line of stderr.split('\n')) {
    let o: { time?: string; msg?: string; ms?: number; thinMs?: number };
    try {
      o = JSON.parse(line) as typeof o;
    } catch {
      continue;
    }
    if (!o.msg || !o.time || at.has(o.msg)) continue;
    at.set(o.msg, Date.parse(o.time));
    if (o.msg === 'captured') captured = o;
  }
  const d = (a: string, b: string) => (at.has(a) && at.has(b) ? ((at.get(b)! - at.get(a)!) / 1000).toFixed(2) : '?');
  return `plan+capture ${d('cycle start', 'captured')} (backup job ${((captured.ms ?? NaN) / 1000).toFixed(2)}, thin ${((captured.thinMs ?? NaN) / 1000).toFixed(2)}), transfer+publish ${d('captured', 'disk published')}, finish ${d('disk published', 'cycle end')}`;
}

/** The env's flags, pointed at the meter; its known_hosts names the meter's port with the replica's key. */
let meterFlags: string[] = [];
async function flagsForMeter(env: AgentEnv, port: number): Promise<string[]> {
  const f = [...env.flags];
  f[f.indexOf('--replica-port') + 1] = String(port);
  const knownHosts = path.join(env.root, 'known_hosts.meter');
  await writeFile(knownHosts, `[127.0.0.1]:${port} ${env.sshd.hostPublicKey}\n`, { mode: 0o600 });
  f[f.indexOf('--known-hosts') + 1] = knownHosts;
  return f;
}
const flagsVia = (_env: AgentEnv, _port: number): string[] => meterFlags;

async function ourCheckpointDirty(env: AgentEnv, dom: string): Promise<number> {
  const names = (await env.lv.virshOk(['checkpoint-list', dom, '--name'])).split('\n').map((s) => s.trim()).filter((s) => s.startsWith('onestor-'));
  if (names.length !== 1) throw new Error(`expected one onestor checkpoint on ${dom}, found ${names.join(',') || 'none'}`);
  const xml = await env.lv.virshOk(['checkpoint-dumpxml', dom, names[0]!, '--size', '--no-domain']);
  const m = /size='(\d+)'/.exec(xml);
  if (!m) throw new Error(`no size in checkpoint ${names[0]}: ${xml}`);
  return Number(m[1]);
}

async function oursCycle(env: AgentEnv, meter: TcpMeter, vm: OneVm, extra: string[] = []): Promise<Run> {
  await meter.reset();
  const t0 = performance.now();
  const r = await runNode([agentMain(), 'snapshot', '--vm', String(vm.vmId), '--json', ...extra, ...flagsVia(env, meter.port)], { timeoutMs: 1_800_000 });
  const seconds = (performance.now() - t0) / 1000;
  if (r.code !== 0) throw new Error(`snapshot --vm ${vm.vmId} failed (${r.code}): ${r.stdout}${r.stderr}`);
  const [o] = JSON.parse(r.stdout) as Array<{ ok: boolean; mode: string; bytes: number; durationMs: number }>;
  if (!o?.ok) throw new Error(`snapshot --vm ${vm.vmId}: ${r.stdout}`);
  const c = await meter.refresh();
  return { seconds, cycleSeconds: o.durationMs / 1000, wire: c.up + c.down, payload: o.bytes, chainChanges: 0, mode: o.mode, phases: phasesFromLog(r.stderr) };
}

async function upCycle(env: AgentEnv, meter: TcpMeter, disk: UpstreamDisk, plain: Awaited<ReturnType<typeof plainSshAccess>>): Promise<Run> {
  await meter.reset();
  const r = await upstreamCycle(env.lv, disk, plain, env.snapsDir);
  const c = await meter.refresh();
  return { seconds: r.seconds, wire: c.up + c.down, payload: r.rsyncBytesSent, chainChanges: r.chainChanges };
}

async function main(): Promise<void> {
  console.log(`df before:\n${await sh('df -h --output=target,fstype,size,avail ' + q(process.env.TMPDIR ?? '/tmp'))}`);
  const env = await startAgentEnv({ name: 'bench-inc' });
  const meter = await startTcpMeter(env.sshd.port);
  try {
    const plain = await plainSshAccess(env, meter.port);
    meterFlags = await flagsForMeter(env, meter.port);
    const replicaFs = await fsType(env.snapsDir);
    const reflink = await reflinkWorks(env.snapsDir);
    console.log(`replica SNAPS on ${replicaFs}, reflink ${reflink ? 'WORKS (an O(disk) copy could hide!)' : 'unavailable (cp of base.1 would cost O(disk))'}`);

    const rows: string[][] = [];
    const curve: string[][] = [];
    let seedRng = 7;
    const rnd = (n: number) => {
      seedRng = (seedRng * 1103515245 + 12345) & 0x7fffffff;
      return seedRng % n;
    };

    for (const [i, gib] of SIZES_GIB.entries()) {
      const dataMiB = Math.round(gib * 1024);
      const virtMiB = dataMiB + 1024;
      const vmO = await env.createVm({ vmId: 200 + i, disks: [{ diskId: 0, sizeMiB: virtMiB, freq: 60 }], noStart: true });
      const vmU = await env.createVm({ vmId: 300 + i, disks: [{ diskId: 0, sizeMiB: virtMiB, freq: 60 }], noStart: true });
      try {
        await fillDisk(vmO.disks[0]!, virtMiB, 0, dataMiB, env.root);
        // the same bytes for upstream's VM
        for (const f of ['base', 'base.1']) await sh(`cp --sparse=always ${q(path.join(vmO.disks[0]!.snapDir, f))} ${q(path.join(vmU.disks[0]!.snapDir, f))}`);
        await vmO.start();
        await vmU.start();
        const base1Size = await fileSize(vmO.disks[0]!.base1Path);
        const upDisk: UpstreamDisk = { domain: vmU.domainName, target: 'vda', vmId: vmU.vmId, diskId: 0, snapDir: vmU.disks[0]!.snapDir, basePath: vmU.disks[0]!.basePath, base1Path: vmU.disks[0]!.base1Path };
        const label = `${gib} GiB`;
        console.log(`\n== base.1 ${mib(base1Size)} MiB (${label} of data, disk ${virtMiB} MiB)`);

        const oSeed = await oursCycle(env, meter, vmO);
        const uSeed = await upCycle(env, meter, upDisk, plain);
        console.log(`seed: ours ${oSeed.mode} ${oSeed.seconds.toFixed(2)} s ${mib(oSeed.wire)} MiB wire [${oSeed.phases}]; upstream ${uSeed.seconds.toFixed(2)} s ${mib(uSeed.wire)} MiB wire`);
        // The first incremental after a seed may prepare the replica's spare copy: shown apart, not hidden.
        await guestWrite(env.lv, vmO.domainName, { offsetMiB: rnd(dataMiB - 16), lengthMiB: 16, pattern: 0x11 });
        const dirty0 = await ourCheckpointDirty(env, vmO.domainName);
        const oFirst = await oursCycle(env, meter, vmO);
        console.log(`first incremental after seed: ${oFirst.mode} ${oFirst.seconds.toFixed(2)} s (cycle ${oFirst.cycleSeconds!.toFixed(2)} s), ${mib(oFirst.wire)} MiB wire for ${mib(dirty0)} MiB dirty`);
        await upCycle(env, meter, upDisk, plain); // upstream's first delta cycle, for symmetry (not reported)

        for (const change of CHANGES_MIB) {
          const O: Run[] = [];
          const U: Run[] = [];
          const reps = change >= 256 ? Math.max(1, REPS - 1) : REPS;
          for (let r = 0; r < reps; r++) {
            const off = rnd(dataMiB - change);
            const pattern = 1 + rnd(250);
            await guestWrite(env.lv, vmO.domainName, { offsetMiB: off, lengthMiB: change, pattern });
            const dirty = await ourCheckpointDirty(env, vmO.domainName);
            const o = await oursCycle(env, meter, vmO);
            if (o.mode !== 'incremental') throw new Error(`expected an incremental, got ${o.mode}`);
            O.push({ ...o, dirty });
            await guestWrite(env.lv, vmU.domainName, { offsetMiB: off, lengthMiB: change, pattern });
            U.push(await upCycle(env, meter, upDisk, plain));
            console.log(`  ${label} ${change} MiB #${r + 1}: ours ${o.seconds.toFixed(2)} s ${mib(o.wire)} MiB wire (dirty ${mib(dirty)}) [${o.phases}]; upstream ${U[r]!.seconds.toFixed(2)} s ${mib(U[r]!.wire)} MiB wire`);
          }
          const uMed = median(U.map((x) => x.seconds));
          const oMed = median(O.map((x) => x.seconds));
          const dirtyMed = median(O.map((x) => x.dirty!));
          const wireGoal = 1.1 * dirtyMed + MiB;
          const ratio = oMed / uMed;
          const timeGoal = change === 16 && gib >= 4 ? 0.1 : change === 16 && gib <= 0.3 ? 0.5 : null;
          rows.push([
            label, `${change} MiB`, 'ours incremental',
            `${mib(median(O.map((x) => x.wire)))} (dirty ${mib(dirtyMed)})`,
            `<= ${mib(wireGoal)} ${median(O.map((x) => x.wire)) <= wireGoal ? 'MET' : 'NOT MET'}`,
            `${medianSpread(O.map((x) => x.seconds))} [cycle ${median(O.map((x) => x.cycleSeconds!)).toFixed(2)}]`,
            `${ratio.toFixed(3)}x${timeGoal !== null ? ` (goal <= ${timeGoal}x ${ratio <= timeGoal ? 'MET' : 'NOT MET'})` : ''}`,
            String(Math.max(...O.map((x) => x.chainChanges))),
          ]);
          rows.push([label, `${change} MiB`, 'upstream', mib(median(U.map((x) => x.wire))), '', medianSpread(U.map((x) => x.seconds)), '1x', String(Math.max(...U.map((x) => x.chainChanges)))]);
          if (change === 16) curve.push([mib(base1Size, 0), medianSpread(O.map((x) => x.seconds)), median(O.map((x) => x.cycleSeconds!)).toFixed(2), medianSpread(U.map((x) => x.seconds)), `${ratio.toFixed(3)}x`]);
        }
        const oFull = await oursCycle(env, meter, vmO, ['--full']);
        console.log(`ours --full: ${oFull.seconds.toFixed(2)} s ${mib(oFull.wire)} MiB wire [${oFull.phases}]`);
        rows.push([label, '(any)', 'ours full (base on replica)', mib(oFull.wire), '', `${oFull.seconds.toFixed(2)} [cycle ${oFull.cycleSeconds!.toFixed(2)}]`, '', '0']);
        rows.push([label, '(seed)', 'ours full seed / upstream seed', `${mib(oSeed.wire)} / ${mib(uSeed.wire)}`, '', `${oSeed.seconds.toFixed(2)} / ${uSeed.seconds.toFixed(2)}`, '', `0 / ${uSeed.chainChanges}`]);
        rows.push([label, '16 MiB', 'ours 1st incremental after seed', `${mib(oFirst.wire)} (dirty ${mib(dirty0)})`, '', `${oFirst.seconds.toFixed(2)} [cycle ${oFirst.cycleSeconds!.toFixed(2)}]`, '', '0']);
      } finally {
        await vmO.destroy().catch(() => {});
        await vmU.destroy().catch(() => {});
        for (const d of [vmO.vmDir, vmU.vmDir, path.join(env.snapsDir, String(vmO.vmId)), path.join(env.snapsDir, String(vmU.vmId)), path.join(env.snapsDir, '.onestor', 'work', String(vmO.vmId))]) {
          await rm(d, { recursive: true, force: true });
        }
        await rm(path.join(env.dsRoot, String(env.dsId), '.onestor', String(vmO.vmId)), { recursive: true, force: true });
      }
    }
    console.log(`\nIncremental cycles, replica on ${replicaFs} (reflink ${reflink ? 'yes' : 'no'}); median (min–max) of ${REPS} cycles for 16 MiB, ${Math.max(1, REPS - 1)} for 256 MiB; wire = all TCP bytes of the cycle\n`);
    console.log(table(['base.1 data', 'changed', 'method', 'wire MiB', 'wire goal MiB', 'cycle s [own duration]', 'time vs upstream', 'chain changes'], rows));
    console.log(`\nCycle time vs base.1 size, 16 MiB changed (ours: CLI wall [cycle's own duration])\n`);
    console.log(table(['base.1 MiB', 'ours s', 'ours cycle s', 'upstream s', 'ours/upstream'], curve));
  } finally {
    await meter.close();
    await env.stop();
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
