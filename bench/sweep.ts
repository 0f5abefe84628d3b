/**
 * Issue 10 finding 3: the orphan sweep's time against what is on the replica. Two curves:
 *   - N live disks with a partial upload each (nothing to remove: only listed and looked at) + 100 orphans;
 *   - N orphaned disks of terminated VMs (work dir + tmp dir + lock file each: all removed, one per-disk
 *     lock taken for each).
 * Linear means the time per entry stays flat as N grows (the old sweep was O(n²): 20k tmp dirs, 1.7 s).
 * Usage: npx tsc -p tsconfig.build.json && node dist/bench/sweep.js [sizes=1000,5000,20000] [orphanSizes=100,500,2000]
 */
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { sweepOrphans } from '../lib/replica/sweep.js';
import { table } from './lib/stats.js';

const SIZES = (process.argv[2] ?? '1000,5000,20000').split(',').map(Number);
const ORPHANS = (process.argv[3] ?? '100,500,2000').split(',').map(Number);

async function orphan(snaps: string, vm: number): Promise<void> {
  const work = path.join(snaps, '.onestor', 'work', String(vm), 'disk.0');
  await mkdir(work, { recursive: true });
  await writeFile(path.join(work, 'copy.b'), 'spare');
  const tmp = path.join(snaps, '.onestor', 'tmp', `${vm}-0`);
  await mkdir(tmp, { recursive: true });
  await writeFile(path.join(tmp, 'json.1'), '{');
  await writeFile(path.join(snaps, '.onestor', 'locks', `${vm}-0.lock`), '');
}

async function tree(live: number, orphans: number): Promise<string> {
  const snaps = await mkdtemp(path.join(os.tmpdir(), 'onestor-bench-sweep-'));
  await mkdir(path.join(snaps, '.onestor', 'locks'), { recursive: true });
  for (let vm = 1; vm <= live; vm++) {
    await mkdir(path.join(snaps, String(vm)));
    const tmp = path.join(snaps, '.onestor', 'tmp', `${vm}-0`);
    await mkdir(tmp, { recursive: true });
    await writeFile(path.join(tmp, 'up.k'), '');
  }
  for (let i = 0; i < orphans; i++) await orphan(snaps, 1_000_000 + i);
  return snaps;
}

async function time(live: number, orphans: number): Promise<string[]> {
  const snaps = await tree(live, orphans);
  try {
    const t0 = performance.now();
    const r = await sweepOrphans(snaps);
    const ms = performance.now() - t0;
    if (r.cleaned !== orphans) throw new Error(`expected ${orphans} cleaned, got ${JSON.stringify(r)}`);
    const again = performance.now();
    await sweepOrphans(snaps); // nothing left to do: the cost of looking only
    const idleMs = performance.now() - again;
    return [String(live), String(orphans), ms.toFixed(0), ((ms * 1000) / (live + orphans)).toFixed(0), idleMs.toFixed(0), ((idleMs * 1000) / live).toFixed(1)];
  } finally {
    await rm(snaps, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const rows: string[][] = [];
  for (const n of SIZES) rows.push(await time(n, 100));
  for (const o of ORPHANS) rows.push(await time(1000, o));
  console.log(table(['live disks (tmp dir each)', 'orphaned disks', 'sweep ms', 'µs per disk', 'second sweep ms (nothing to do)', 'µs per live disk'], rows));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
