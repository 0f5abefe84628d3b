/**
 * What a dead session of one disk leaves behind, reclaimed at the next open of that disk under its lock
 * (after any journal was finished or dropped): the lock proves no live session owns any of it.
 *   tmp/VM-D:        everything but resumable `up.*` uploads (json.*, pub.*, old-base1.*, ...); `up.*` are
 *                    bounded by age and count (uploads.ts)
 *   work/VM/disk.N:  everything but the A/B state (copy.a, copy.b, state.json, the pending incs, the
 *                    disk.N.snap link): partial copies, staged full publishes, bridges
 */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { checkedTmpDir, checkedWorkDir, lstatOrNull, removeWorkDir, type ReplicaPaths } from './layout.js';
import { readWorkState } from './merge.js';
import { MAX_OTHER_UPLOADS, boundUploads } from './uploads.js';

export interface Reclaimed {
  entries: number;
  bytes: number;
}

async function bytesOf(file: string): Promise<number> {
  const st = await lstatOrNull(file);
  return st?.isFile() && st.nlink === 1 ? st.blocks * 512 : 0;
}

export async function reclaimLeftovers(p: ReplicaPaths, log?: (obj: object, msg: string) => void): Promise<Reclaimed> {
  const out: Reclaimed = { entries: 0, bytes: 0 };
  const drop = async (file: string) => {
    out.bytes += await bytesOf(file);
    await fsp.rm(file, { recursive: true, force: true });
    out.entries++;
  };
  const tmp = await checkedTmpDir(p);
  if (tmp) {
    for (const n of await fsp.readdir(tmp)) if (!n.startsWith('up.')) await drop(path.join(tmp, n));
    out.entries += await boundUploads(p, new Set(), MAX_OTHER_UPLOADS + 1);
  }
  const work = await checkedWorkDir(p);
  if (work) {
    const state = await readWorkState(p);
    if (!state) {
      // No usable A/B state: whatever is there is a leftover (the next incremental rebuilds the pair).
      for (const n of await fsp.readdir(work)) out.bytes += await bytesOf(path.join(work, n));
      await removeWorkDir(p);
      out.entries++;
    } else {
      const keep = new Set(['copy.a', 'copy.b', 'state.json', p.snapDirName, ...state.pending]);
      for (const n of await fsp.readdir(work)) if (!keep.has(n)) await drop(path.join(work, n));
    }
  }
  if (out.entries > 0) log?.({ vm: p.vm, disk: p.disk, ...out }, 'reclaimed leftovers of an interrupted session');
  return out;
}
