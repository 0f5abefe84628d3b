/**
 * The per-disk lock (SNAPS/.onestor/locks/VMID-N.lock) and what a session leaves behind: an `open` that
 * never receives data must leave nothing, so at unlock the disk's tmp dir goes when empty and the lock
 * file is removed while still held (file-lock.ts makes removal safe for waiters).
 */
import * as fsp from 'node:fs/promises';
import { acquireFileLock, type FileLock } from '../shared/file-lock.js';
import { diskLockFile, errno, type ReplicaPaths } from './layout.js';

export async function lockDisk(p: ReplicaPaths, timeoutSec: number): Promise<FileLock> {
  // flock(1) follows symlinks: the locks dir is checked component by component, the file must be regular
  return acquireFileLock(await diskLockFile(p), { timeoutSec, context: { vm: p.vm, disk: p.disk } });
}

/** Removes the disk's tmp dir if empty (a partial upload keeps it for a resume), then the lock file. */
export async function unlockDisk(p: ReplicaPaths, lock: FileLock): Promise<void> {
  try {
    await fsp.rmdir(p.tmpDir);
  } catch (e) {
    // ENOTEMPTY/EEXIST: uploads kept for a resume; ENOENT: no put in this session
    if (!['ENOENT', 'ENOTEMPTY', 'EEXIST', 'ENOTDIR'].includes(errno(e) ?? '')) {
      await lock.release();
      throw e;
    }
  }
  await lock.remove();
}
