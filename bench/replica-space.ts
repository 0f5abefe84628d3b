/**
 * Issue 10, "Measure": the replica's space per protected disk after N incremental cycles — base, base.1,
 * the merge spare and the rest of the receiver's bookkeeping — next to what OpenNebula's own method
 * (bench/lib/upstream.ts) keeps for the same disk and the same guest writes: base + base.1.
 * Two VMs get the same image and the same writes (16 MiB per cycle at random offsets), ours through the
 * `snapshot` CLI and the restricted receiver, upstream's through snapshot-create / rsync / blockcommit.
 * Sizes are allocated bytes (what `du` counts); a file hard-linked to the published base.1 counts once.
 * The replica probe's own BOOKKEEPING_MB is printed as a cross-check.
 * Usage: npx tsc -p tsconfig.build.json && node dist/bench/replica-space.js [cycles=50] [diskMiB=1024] [changeMiB=16]
 */
import { lstat, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { runProbe } from '../agent/probe.js';
import { parseOneTemplate } from '../lib/monitor/one-template.js';
import { agentMain, runNode, startAgentEnv, type AgentEnv } from '../test/harness/agent-env.js';
import { guestWrite } from '../test/harness/guest.js';
import { fillDisk, fsType, plainSshAccess, sh, q } from './lib/cluster.js';
import { mib, table } from './lib/stats.js';
import { upstreamCycle, type UpstreamDisk } from './lib/upstream.js';

const CYCLES = Number(process.argv[2] ?? 50);
const DISK_MIB = Number(process.argv[3] ?? 1024);
const CHANGE_MIB = Number(process.argv[4] ?? 16);

async function alloc(file: string): Promise<number> {
  const st = await lstat(file).catch(() => null);
  return st ? st.blocks * 512 : 0;
}

/** Allocated bytes under dir, each inode once, skipping inodes in `skip` (counted elsewhere). */
async function treeAlloc(dir: string, skip: Set<number>, seen = new Set<number>()): Promise<{ bytes: number; files: string[] }> {
  let bytes = 0;
  const files: string[] = [];
  const st = await lstat(dir).catch(() => null);
  if (!st) return { bytes, files };
  if (!st.isDirectory()) {
    if (skip.has(st.ino) || seen.has(st.ino)) return { bytes, files };
    seen.add(st.ino);
    return { bytes: st.blocks * 512, files: [dir] };
  }
  bytes += st.blocks * 512;
  for (const n of await readdir(dir)) {
    const r = await treeAlloc(path.join(dir, n), skip, seen);
    bytes += r.bytes;
    files.push(...r.files);
  }
  return { bytes, files };
}

async function snapshotCli(env: AgentEnv, vmId: number): Promise<string> {
  const r = await runNode([agentMain(), 'snapshot', '--vm', String(vmId), '--json', ...env.flags], { timeoutMs: 1_800_000 });
  if (r.code !== 0) throw new Error(`snapshot --vm ${vmId} failed (${r.code}): ${r.stdout}${r.stderr}`);
  const [o] = JSON.parse(r.stdout) as Array<{ ok: boolean; mode: string }>;
  if (!o?.ok) throw new Error(`snapshot --vm ${vmId}: ${r.stdout}`);
  return o.mode;
}

async function main(): Promise<void> {
  const env = await startAgentEnv({ name: 'bench-space' });
  try {
    const plain = await plainSshAccess(env);
    const ours = await env.createVm({ vmId: 410, disks: [{ diskId: 0, sizeMiB: DISK_MIB, freq: 60 }], noStart: true });
    const theirs = await env.createVm({ vmId: 510, disks: [{ diskId: 0, sizeMiB: DISK_MIB, freq: 60 }], noStart: true });
    // a realistic start: the image (base) holds a quarter of the disk, base.1 an eighth more
    await fillDisk(ours.disks[0]!, DISK_MIB, DISK_MIB / 4, DISK_MIB / 8, env.root);
    for (const f of ['base', 'base.1']) await sh(`cp --sparse=always ${q(path.join(ours.disks[0]!.snapDir, f))} ${q(path.join(theirs.disks[0]!.snapDir, f))}`);
    await ours.start();
    await theirs.start();
    const up: UpstreamDisk = { domain: theirs.domainName, target: 'vda', vmId: theirs.vmId, diskId: 0, snapDir: theirs.disks[0]!.snapDir, basePath: theirs.disks[0]!.basePath, base1Path: theirs.disks[0]!.base1Path };
    console.log(`replica SNAPS on ${await fsType(env.snapsDir)}; disk ${DISK_MIB} MiB, ${CYCLES} cycles of ${CHANGE_MIB} MiB guest writes`);

    const seedMode = await snapshotCli(env, ours.vmId);
    await upstreamCycle(env.lv, up, plain, env.snapsDir);
    let rng = 11;
    const rnd = (n: number) => {
      rng = (rng * 1103515245 + 12345) & 0x7fffffff;
      return rng % n;
    };
    const modes = new Map<string, number>();
    const t0 = performance.now();
    for (let c = 1; c <= CYCLES; c++) {
      const w = { offsetMiB: rnd(DISK_MIB - CHANGE_MIB), lengthMiB: CHANGE_MIB, pattern: 1 + rnd(250) };
      await guestWrite(env.lv, ours.domainName, w);
      await guestWrite(env.lv, theirs.domainName, w);
      const mode = await snapshotCli(env, ours.vmId);
      modes.set(mode, (modes.get(mode) ?? 0) + 1);
      await upstreamCycle(env.lv, up, plain, env.snapsDir);
      if (c % 10 === 0) console.log(`  cycle ${c}/${CYCLES} (${((performance.now() - t0) / 1000).toFixed(0)} s)`);
    }
    console.log(`ours: seed ${seedMode}, then ${[...modes].map(([m, n]) => `${n} ${m}`).join(', ')}`);

    const snaps = env.snapsDir;
    const oSnap = path.join(snaps, String(ours.vmId), 'disk.0.snap');
    const base1St = await lstat(path.join(oSnap, 'base.1'));
    const published = new Set([(await lstat(path.join(oSnap, 'base'))).ino, base1St.ino]);
    const work = await treeAlloc(path.join(snaps, '.onestor', 'work', String(ours.vmId)), published);
    const spareFiles = work.files.filter((f) => /\/copy\.[ab]$/.test(f));
    let spare = 0;
    for (const f of spareFiles) spare += await alloc(f);
    const tmp = await treeAlloc(path.join(snaps, '.onestor', 'tmp', `${ours.vmId}-0`), published);
    const meta = await treeAlloc(path.join(snaps, String(ours.vmId), '.onestor'), published);
    const shared = await treeAlloc(path.join(snaps, '.onestor'), new Set());
    const whole = await treeAlloc(path.join(snaps, '.onestor'), published);
    const oBase = await alloc(path.join(oSnap, 'base'));
    const oBase1 = await alloc(path.join(oSnap, 'base.1'));
    const uSnap = path.join(snaps, String(theirs.vmId), 'disk.0.snap');
    const uBase = await alloc(path.join(uSnap, 'base'));
    const uBase1 = await alloc(path.join(uSnap, 'base.1'));
    const hvBase1 = await alloc(ours.disks[0]!.base1Path);

    // the probe reads SNAPS from the driver settings: point it at this env's SNAPS through a private sshrc
    const sshrc = path.join(env.root, 'bench-sshrc');
    await sh(`printf 'REPLICA_RECOVERY_SNAPS_DIR=%s\\n' ${q(snaps)} > ${q(sshrc)}`);
    const probe2 = await runProbe('replica-ds', { datastoreLocation: env.dsRoot, sshrcPaths: [sshrc], deadlineMs: 30_000, cacheFile: path.join(env.root, 'walk-cache2.json') });
    const line = parseOneTemplate(probe2.lines.join('\n') + '\n').find((a) => a.name === 'ONESTOR_REPLICA_SNAPS');

    const rows = [
      ['base (image)', mib(oBase), mib(uBase)],
      ['base.1 (published)', mib(oBase1), mib(uBase1)],
      ['merge spare (work/copy.*, not the link to base.1)', mib(spare), '-'],
      ['other work (journal, state, increment kept for the next merge)', mib(work.bytes - spare), '-'],
      ['tmp (uploads in flight, temps)', mib(tmp.bytes), '-'],
      ['manifest (SNAPS/VMID/.onestor)', mib(meta.bytes), '-'],
      ['total', mib(oBase + oBase1 + work.bytes + tmp.bytes + meta.bytes), mib(uBase + uBase1)],
    ];
    console.log(`\nReplica space for one protected disk after ${CYCLES} cycles (MiB allocated; hypervisor's base.1 ${mib(hvBase1)} MiB)\n`);
    console.log(table(['what', 'ours', 'upstream'], rows));
    console.log(`\nSNAPS/.onestor as a whole: ${mib(whole.bytes)} MiB beyond the published files (${mib(shared.bytes)} MiB counting the hard link to base.1 again)`);
    console.log(`probe: ${JSON.stringify(line?.value ?? probe2.lines)}`);
  } finally {
    await env.stop();
    await rm(path.join(env.root, 'bench-sshrc'), { force: true }).catch(() => {});
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
