/** Reclaims what upstream's `rm -rf SNAPS/VMID` leaves of ours in SNAPS/.onestor. */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { acquireFileLock } from '../shared/file-lock.js';
import { lstatOrNull, replicaPaths } from './layout.js';

/**
 * Upstream `rm -rf SNAPS/VMID` (terminate, detach) leaves our merge spares and partial uploads behind in
 * SNAPS/.onestor/{work,tmp}: a full copy of base.1 each. Remove those whose VM dir is gone, under the
 * disk's lock (taken without waiting: a busy disk is skipped and swept another time). Bounded per call.
 * Partial uploads are kept for a day (a first seed uploads before SNAPS/VMID exists, and may resume).
 */
export async function sweepOrphans(snapsDir: string, opts: { maxDisks?: number; uploadMaxAgeMs?: number; log?: (obj: object, msg: string) => void } = {}): Promise<number> {
  const internal = path.join(path.resolve(snapsDir), '.onestor');
  const budget = { left: opts.maxDisks ?? 32 };
  let removed = 0;
  const names = async (dir: string) => (await fsp.readdir(dir).catch(() => [] as string[]));
  const candidates: Array<{ vm: number; disk: number }> = [];
  for (const vm of await names(path.join(internal, 'work'))) {
    if (!/^\d{1,10}$/.test(vm)) continue;
    for (const d of await names(path.join(internal, 'work', vm))) {
      const m = /^disk\.(\d{1,10})$/.exec(d);
      if (m) candidates.push({ vm: Number(vm), disk: Number(m[1]) });
    }
  }
  for (const t of await names(path.join(internal, 'tmp'))) {
    const m = /^(\d{1,10})-(\d{1,10})$/.exec(t);
    if (m && !candidates.some((c) => c.vm === Number(m[1]) && c.disk === Number(m[2]))) candidates.push({ vm: Number(m[1]), disk: Number(m[2]) });
  }
  for (const c of candidates) {
    if (budget.left-- <= 0) break;
    const p = replicaPaths(snapsDir, c.vm, c.disk);
    if ((await lstatOrNull(p.vmDir)) !== null) continue;
    let lock: { release(): Promise<void> | void } | null = null;
    try {
      lock = await acquireFileLock(p.lockFile, { timeoutSec: 0 });
    } catch {
      continue; // in use: a session is working on it right now
    }
    try {
      if ((await lstatOrNull(p.vmDir)) !== null) continue; // re-created meanwhile
      await fsp.rm(p.workDir, { recursive: true, force: true });
      // uploads of a first seed arrive before SNAPS/VMID exists: only old ones are abandoned
      const tmp = await lstatOrNull(p.tmpDir);
      if (tmp && Date.now() - tmp.mtimeMs > (opts.uploadMaxAgeMs ?? 24 * 3600_000)) await fsp.rm(p.tmpDir, { recursive: true, force: true });
      await fsp.rmdir(path.dirname(p.workDir)).catch(() => {});
      removed++;
      opts.log?.({ vm: c.vm, disk: c.disk }, 'removed merge spare and uploads of a VM whose replica dir is gone');
    } finally {
      await lock.release();
    }
  }
  return removed;
}

