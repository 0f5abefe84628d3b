/**
 * Issue 10, finding 1: what the bridge of a full publish with a new base costs. The real receiver (in-process
 * streams) publishes a 1 GiB base + thin base.1, then a new base that differs from the old one by D MiB
 * (random data) with a new thin base.1; the step hooks time the bridge build (sparse copy of the new base.1,
 * rebase -u, safe rebase onto the old base, qemu-img check) and the bridge's allocated bytes are read from
 * its file. For reference, the same publish's total and a first seed (no bridge) are printed.
 * Usage: npx tsc -p tsconfig.build.json && node dist/bench/bridge-cost.js [sizeMiB=1024] [diffsMiB=16,512,1024]
 */
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { run } from '../lib/shared/exec.js';
import { replicaPaths } from '../lib/replica/layout.js';
import { runReceiver, type ReceiverOptions } from '../lib/replica/receiver.js';
import { ReceiverConnection } from '../lib/transfer/replica-client.js';

const MiB = 1024 * 1024;
const sizeMiB = Number(process.argv[2] ?? 1024);
const diffs = (process.argv[3] ?? '16,512,1024').split(',').map(Number);

async function sh(cmd: string): Promise<string> {
  const r = await run('bash', ['-c', cmd], { timeoutMs: 3_600_000 });
  if (r.code !== 0) throw new Error(`${cmd}: ${r.stderr}`);
  return r.stdout;
}

/** A qcow2 base of sizeMiB random data (incompressible), and a copy of it with [off, off+diff) re-randomized. */
async function makeBases(dir: string, diffMiB: number): Promise<{ oldBase: string; newBase: string }> {
  const raw = path.join(dir, 'base.raw');
  await sh(`openssl enc -aes-128-ctr -nosalt -pass pass:onestor-${sizeMiB} < /dev/zero 2>/dev/null | head -c ${sizeMiB * MiB} > ${raw}`);
  const oldBase = path.join(dir, 'old-base.qcow2');
  await sh(`qemu-img convert -O qcow2 ${raw} ${oldBase}`);
  const off = Math.floor((sizeMiB - diffMiB) / 2);
  await sh(`openssl enc -aes-128-ctr -nosalt -pass pass:diff-${diffMiB} < /dev/zero 2>/dev/null | head -c ${diffMiB * MiB} | dd of=${raw} bs=1M seek=${off} conv=notrunc status=none`);
  const newBase = path.join(dir, 'new-base.qcow2');
  await sh(`qemu-img convert -O qcow2 ${raw} ${newBase}`);
  await fsp.rm(raw);
  return { oldBase, newBase };
}

/** OpenNebula layout: DIR/disk.0.snap/{base (copy of `base`), base.1 with 64 MiB written, disk.0.snap -> .} */
async function layout(dir: string, base: string, pattern: number): Promise<{ base: string; base1: string }> {
  const snap = path.join(dir, 'disk.0.snap');
  await fsp.mkdir(snap, { recursive: true });
  await fsp.symlink('.', path.join(snap, 'disk.0.snap'));
  await fsp.link(base, path.join(snap, 'base'));
  const base1 = path.join(snap, 'base.1');
  await sh(`qemu-img create -q -f qcow2 -b disk.0.snap/base -F qcow2 ${base1}`);
  await sh(`qemu-io -f qcow2 -c 'write -P ${pattern} 100M 64M' ${base1} >/dev/null`);
  return { base: path.join(snap, 'base'), base1 };
}

async function publish(snaps: string, src: { base: string; base1: string }, ck: string, onStep?: ReceiverOptions['onStep']): Promise<number> {
  const to = new PassThrough();
  const from = new PassThrough();
  const done = runReceiver(to, from, { snapsDir: snaps, identity: 'bench', lockTimeoutSec: 5, maxSessions: 2, busyWaitSec: 0, maxUsedPercent: 100, spaceCheck: false, ...(onStep ? { onStep } : {}) }).finally(() => from.end());
  const c = new ReceiverConnection(from, to);
  await c.hello('bench', 'bench');
  const d = await c.openDisk(1, 0);
  await d.upload('base', src.base, { key: `${ck}.base` });
  await d.upload('base1', src.base1, { key: `${ck}.base1` });
  const t0 = process.hrtime.bigint();
  await d.publishFull({ checkpoint: ck, capturedAt: 1, consistency: 'crash-consistent', sourceHost: 'bench', base: `${ck}.base`, base1: `${ck}.base1` });
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  await d.close();
  await c.bye();
  await done;
  return ms;
}

const root = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-t-bridge-'));
const rows: string[] = [];
try {
  for (const diff of diffs) {
    const dir = path.join(root, `d${diff}`);
    await fsp.mkdir(dir);
    const { oldBase, newBase } = await makeBases(dir, diff);
    const prev = await layout(path.join(dir, 'prev'), oldBase, 0x22);
    const next = await layout(path.join(dir, 'next'), newBase, 0x33);
    const snaps = path.join(dir, 'snaps');
    const seedMs = await publish(snaps, prev, 'c1');
    const p = replicaPaths(snaps, 1, 0);
    let t: bigint = 0n;
    let bridgeMs = 0;
    let bridgeBytes = 0;
    let bridgeDataBytes = 0;
    const fullMs = await publish(snaps, next, 'c2', async (s) => {
      if (s === 'full:staged') t = process.hrtime.bigint();
      if (s === 'full:bridge-built') {
        bridgeMs = Number(process.hrtime.bigint() - t) / 1e6;
        const bridge = path.join(p.workDir, 'full.bridge');
        bridgeBytes = (await fsp.stat(bridge)).blocks * 512;
        const map = JSON.parse(await sh(`qemu-img map --output=json -f qcow2 ${bridge}`)) as Array<{ length: number; depth: number; data: boolean }>;
        bridgeDataBytes = map.filter((e) => e.depth === 0 && e.data).reduce((a, e) => a + e.length, 0);
      }
    });
    const row = `| ${sizeMiB} MiB | ${diff} MiB | ${(bridgeMs / 1000).toFixed(2)} | ${(bridgeDataBytes / MiB).toFixed(1)} | ${(bridgeBytes / MiB).toFixed(1)} | ${(fullMs / 1000).toFixed(2)} | ${(seedMs / 1000).toFixed(2)} |`;
    console.log(row);
    rows.push(row);
    await fsp.rm(dir, { recursive: true, force: true });
  }
} finally {
  await fsp.rm(root, { recursive: true, force: true });
}
console.log('\n| base size | bases differ by | bridge build s | bridge data MiB (64 MiB of base.1 + differing clusters) | bridge file MiB on disk | whole publish with new base s | first seed publish (no bridge) s |');
console.log('|---|---|---|---|---|---|---|');
for (const r of rows) console.log(r);
