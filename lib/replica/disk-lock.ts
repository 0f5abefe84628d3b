/**
 * The per-disk lock (SNAPS/.onestor/locks/VMID-N.lock) and what a session leaves behind: an `open` that
 * never receives data must leave nothing, so at unlock the disk's tmp dir goes when empty and the lock
 * file is removed while still held (file-lock.ts makes removal safe for waiters).
 */
import * as fsp from 'node:fs/promises';
import { acquireFileLock, type FileLock } from '../shared/file-lock.js';
import { checkedTmpDir, diskLockFile, type ReplicaPaths } from './layout.js';

export async function lockDisk(p: ReplicaPaths, timeoutSec: number): Promise<FileLock> {
  // locks dir checked (and made) component by component, the lock file itself never a symlink
  return acquireFileLock(await diskLockFile(p), { timeoutSec, context: { vm: p.vm, disk: p.disk } });
}

/** Removes the disk's tmp dir if empty (a partial upload keeps it for a resume), then the lock file. */
export async function unlockDisk(p: ReplicaPaths, lock: FileLock): Promise<void> {
  try {
    // only through real directories (a planted symlink is refused, never followed)
    const tmp = await checkedTmpDir(p);
    if (tmp) await fsp.rmdir(tmp);
  } catch {
    // best effort, never in the way of releasing the lock: ENOTEMPTY (uploads kept for a resume), a
    // refused path (E_PATH), anything else — the orphan sweep looks again later
  }
  await lock.remove();
}
