/**
 * Reclaims what no session will ever clean up in SNAPS/.onestor:
 *   - merge work dirs (a full spare, plus a hard link that keeps alive the base.1 upstream's `rm -rf SNAPS/VMID`
 *     thought it deleted: ~2x base.1 each) of disks whose disk.N.snap/ is gone;
 *   - temp files of dead sessions (manifest temps, staged publishes, an old base.1 moved away), and partial
 *     uploads nobody resumed in time;
 *   - empty tmp dirs and lock files.
 * Cost is linear in what is there: one listing of SNAPS and of each bookkeeping dir, a Map keyed by disk,
 * then per disk a few lstat calls plus its own tmp entries. The per-disk lock (try-once: a busy disk is a
 * live session, skipped and swept another time) is only taken for disks that have something to remove, and
 * the budget counts those disks, not the ones merely looked at.
 *
 * maybeSweep runs it at most once per interval per replica (a stamp file, under a try-once lock), so a
 * `hello` never pays it more often than that, and the receiver runs it after its hello reply.
 */
import { constants } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { acquireFileLock, openBatchLocker, type BatchLocker } from '../shared/file-lock.js';
import { checkedTmpDir, diskLockFile, lstatOrNull, trashWorkDir, replicaPaths, type ReplicaPaths } from './layout.js';
import { describeError } from '../shared/errors.js';
import { unlockDisk } from './disk-lock.js';

export interface SweepOptions {
  /** At most this many disks cleaned per call (the rest next time). Default: no limit. */
  maxCleaned?: number;
  /** Partial uploads of a disk whose VM dir exists are kept this long for a resume. Default 24 h. */
  uploadMaxAgeMs?: number;
  /**
   * Partial uploads of a disk without a VM dir: a first seed uploads before SNAPS/VMID exists and may
   * resume, so they are kept this long too (default 1 h, beyond the agent's default retry backoff of at most
   * 30 min: a longer outage costs a re-upload, never a snapshot); those of a disk that had a published lineage
   * (a work dir) whose VM dir upstream removed go at once.
   */
  orphanUploadMaxAgeMs?: number;
  now?: number;
  log?: (obj: object, msg: string) => void;
}

export interface SweepResult {
  /** disks with something to remove */
  candidates: number;
  /** disks cleaned (what the budget counts) */
  cleaned: number;
  /** disks skipped because a session holds their lock */
  busy: number;
  /** disks left for the next sweep because the budget was spent */
  deferred: number;
  /** entries removed (files, dirs, lock files) and the bytes they held */
  removed: number;
  bytes: number;
  /** disks skipped because a path was refused (a symlink planted in the bookkeeping) or an error */
  failed: number;
}

interface Candidate {
  vm: number;
  disk: number;
  work: boolean;
  tmp: boolean;
  lock: boolean;
}

const ID = '(0|[1-9][0-9]{0,9})';
const VM_RE = new RegExp(`^${ID}$`);
const WORK_DISK_RE = new RegExp(`^disk\\.${ID}$`);
const TMP_RE = new RegExp(`^${ID}-${ID}$`);
const LOCK_RE = new RegExp(`^${ID}-${ID}\\.lock$`);
const MAX_ID = 2 ** 31 - 1;

/** Directory entries, or [] when the dir is missing or is not a real directory (never followed). */
async function listDir(dir: string): Promise<string[]> {
  const st = await lstatOrNull(dir);
  if (!st?.isDirectory()) return [];
  return fsp.readdir(dir).catch(() => [] as string[]);
}

function validIds(...ids: string[]): boolean {
  return ids.every((s) => Number(s) <= MAX_ID);
}

/** What may go now in a disk's tmp dir (names), given whether its VM / lineage still exists. */
async function removableTmp(p: ReplicaPaths, names: readonly string[], uploadAgeMs: number, now: number): Promise<string[]> {
  const out: string[] = [];
  for (const n of names) {
    if (!n.startsWith('up.')) {
      // manifest temps, staged publishes, moved-away base.1: only the session holding the lock uses them
      out.push(n);
      continue;
    }
    const st = await lstatOrNull(path.join(p.tmpDir, n));
    if (st && now - st.mtimeMs > uploadAgeMs) out.push(n);
  }
  return out;
}

async function allocatedBytes(file: string): Promise<number> {
  const st = await lstatOrNull(file);
  if (!st) return 0;
  if (!st.isDirectory()) return st.nlink > 1 ? 0 : st.blocks * 512;
  let sum = 0;
  for (const n of await fsp.readdir(file).catch(() => [] as string[])) sum += await allocatedBytes(path.join(file, n));
  return sum;
}

export async function sweepOrphans(snapsDir: string, opts: SweepOptions = {}): Promise<SweepResult> {
  const root = path.resolve(snapsDir);
  const internal = path.join(root, '.onestor');
  const now = opts.now ?? Date.now();
  const uploadAge = opts.uploadMaxAgeMs ?? 24 * 3600_000;
  const orphanUploadAge = opts.orphanUploadMaxAgeMs ?? 3600_000;
  const maxCleaned = opts.maxCleaned ?? Infinity;
  const result: SweepResult = { candidates: 0, cleaned: 0, busy: 0, deferred: 0, removed: 0, bytes: 0, failed: 0 };
  const internalSt = await lstatOrNull(internal);
  if (!internalSt?.isDirectory()) return result;

  // One listing of SNAPS answers "does the VM dir exist" for every disk before anything is spent.
  const liveVms = new Set<number>();
  for (const n of await listDir(root)) if (VM_RE.test(n) && validIds(n)) liveVms.add(Number(n));

  const byDisk = new Map<string, Candidate>();
  const at = (vm: string, disk: string): Candidate => {
    const key = `${vm}-${disk}`;
    let c = byDisk.get(key);
    if (!c) byDisk.set(key, (c = { vm: Number(vm), disk: Number(disk), work: false, tmp: false, lock: false }));
    return c;
  };
  const workVms: string[] = [];
  for (const vm of await listDir(path.join(internal, 'work'))) {
    if (!VM_RE.test(vm) || !validIds(vm)) continue;
    workVms.push(vm);
    for (const d of await listDir(path.join(internal, 'work', vm))) {
      const m = WORK_DISK_RE.exec(d);
      if (m && validIds(m[1]!)) at(vm, m[1]!).work = true;
    }
  }
  for (const t of await listDir(path.join(internal, 'tmp'))) {
    const m = TMP_RE.exec(t);
    if (m && validIds(m[1]!, m[2]!)) at(m[1]!, m[2]!).tmp = true;
  }
  for (const l of await listDir(path.join(internal, 'locks'))) {
    const m = LOCK_RE.exec(l);
    if (m && validIds(m[1]!, m[2]!)) at(m[1]!, m[2]!).lock = true;
  }

  /**
   * What this disk has to give back. First from the listings alone (cheap: most disks need nothing and cost
   * a readdir of their tmp dir at most), then again under the lock with lstat checks before removing.
   */
  const plan = async (c: Candidate, p: ReplicaPaths, locked: boolean) => {
    const vmLive = locked ? (await lstatOrNull(p.vmDir))?.isDirectory() === true : liveVms.has(c.vm);
    // The work dir serves this disk's snapshot dir only (A/B spares, a journal a later open finishes).
    // Without disk.N.snap (VM terminated, or disk detached and SNAPS/VMID recreated by another disk) it
    // holds a spare and a link for nothing; with it, even half-published, the next open of the disk decides.
    const snapDir = c.work && vmLive ? await lstatOrNull(p.snapDir) : null;
    const dropWork = c.work && snapDir === null && (!locked || (await lstatOrNull(p.workDir)) !== null);
    const tmpDir = !c.tmp ? null : locked ? await checkedTmpDir(p) : p.tmpDir;
    const tmpNames = tmpDir ? await fsp.readdir(tmpDir).catch(() => [] as string[]) : [];
    const lineageGone = !vmLive && c.work;
    const tmpGone = await removableTmp(p, tmpNames, lineageGone ? -1 : vmLive ? uploadAge : orphanUploadAge, now);
    const tmpEmptyAfter = c.tmp && tmpGone.length === tmpNames.length;
    return { dropWork, tmpGone, tmpEmptyAfter, any: dropWork || tmpGone.length > 0 || tmpEmptyAfter || c.lock };
  };

  let locker: BatchLocker | null = null;
  try {
    for (const c of byDisk.values()) {
      const p = replicaPaths(root, c.vm, c.disk);
      if (!(await plan(c, p, false)).any) continue;
      result.candidates++;
      if (result.cleaned >= maxCleaned) {
        result.deferred++;
        continue;
      }
      if (!locker) {
        await fsp.mkdir(path.dirname(p.lockFile), { recursive: true });
        locker = openBatchLocker();
      }
      let lock;
      try {
        lock = await locker.tryLock(await diskLockFile(p));
      } catch (e) {
        result.failed++;
        opts.log?.({ vm: c.vm, disk: c.disk, err: describeError(e) }, 'sweep: skipping a disk');
        continue;
      }
      if (!lock) {
        result.busy++; // a session is working on it right now
        continue;
      }
      let removed = 0;
      let failed: unknown = null;
      try {
        const todo = await plan(c, p, true);
        if (todo.dropWork) {
          result.bytes += await allocatedBytes(p.workDir);
          // moved aside under the lock, deleted when the session ends (layout.ts trashWorkDir): the copies
          // are full-size files, and the session this sweep runs beside is uploading to the same disk
          await trashWorkDir(p);
          removed++;
        }
        // removal through checked real directories only (a planted symlink is refused, never followed)
        const tmpDir = todo.tmpGone.length ? await checkedTmpDir(p) : null;
        for (const n of tmpDir ? todo.tmpGone : []) {
          const f = path.join(tmpDir!, n);
          result.bytes += await allocatedBytes(f);
          await fsp.rm(f, { recursive: true, force: true });
          removed++;
        }
      } catch (e) {
        failed = e;
      } finally {
        // on success also removes the tmp dir when empty, and the lock file, both while still held
        if (failed) await lock.release();
        else await unlockDisk(p, lock);
      }
      if (failed) {
        result.failed++;
        opts.log?.({ vm: c.vm, disk: c.disk, err: describeError(failed) }, 'sweep: skipping a disk');
        continue;
      }
      removed += c.lock ? 1 : 0;
      if (c.tmp && !(await lstatOrNull(p.tmpDir))) removed++;
      result.removed += removed;
      result.cleaned++;
      if (removed > 0) opts.log?.({ vm: c.vm, disk: c.disk, removed }, 'sweep: reclaimed leftovers of a disk');
    }
  } finally {
    await locker?.close();
  }
  // work/VMID dirs whose disks are all gone (rmdir only succeeds on an empty dir)
  for (const vm of workVms) await fsp.rmdir(path.join(internal, 'work', vm)).catch(() => {});
  return result;
}

/**
 * Runs the sweep when the last one (on this replica, by any session) is older than intervalMs. The stamp
 * is written before sweeping, so a sweep that crashes is not retried by every following hello.
 */
export async function maybeSweep(snapsDir: string, intervalMs: number, opts: SweepOptions = {}): Promise<SweepResult | null> {
  const internal = path.join(path.resolve(snapsDir), '.onestor');
  const stamp = path.join(internal, 'sweep.stamp');
  const now = opts.now ?? Date.now();
  const fresh = async () => {
    const st = await lstatOrNull(stamp);
    return st !== null && now - st.mtimeMs < intervalMs && st.mtimeMs <= now;
  };
  if (await fresh()) return null;
  const internalSt = await lstatOrNull(internal);
  if (!internalSt?.isDirectory()) return null;
  let lock;
  try {
    lock = await acquireFileLock(path.join(internal, 'sweep.lock'), { timeoutSec: 0 });
  } catch {
    return null; // another session is sweeping
  }
  try {
    if (await fresh()) return null;
    // O_NOFOLLOW: a symlink planted at the stamp's name is refused (ELOOP), never written through
    const fh = await fsp.open(stamp, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW, 0o644);
    try {
      await fh.writeFile(`${Math.floor(now / 1000)}\n`);
      await fh.utimes(now / 1000, now / 1000);
    } finally {
      await fh.close();
    }
    return await sweepOrphans(snapsDir, opts);
  } finally {
    await lock.release();
  }
}
