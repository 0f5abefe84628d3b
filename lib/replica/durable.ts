/** Durable writes on the replica: fsync, and temp + fsync + rename + dir fsync with the temp outside SNAPS/VMID. */
import { constants as fsConstants } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { O_NOFOLLOW, ensureTmpDir, fsyncPath, tmpName, type ReplicaPaths } from './layout.js';

/** Reads a small file (manifest, journal) refusing a symlink as its last component. */
export async function readFileNoFollow(file: string): Promise<string> {
  const fh = await fsp.open(file, fsConstants.O_RDONLY | O_NOFOLLOW);
  try {
    return await fh.readFile('utf8');
  } finally {
    await fh.close();
  }
}

/** temp + fsync + rename + dir fsync. The temp lives outside SNAPS/VMID and never outlives a failure. */
export async function writeFileAtomic(p: ReplicaPaths, target: string, data: string): Promise<void> {
  await ensureTmpDir(p);
  const tmp = tmpName(p, 'json');
  // O_EXCL | O_NOFOLLOW: never write through a name someone planted
  const fh = await fsp.open(tmp, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | O_NOFOLLOW, 0o644);
  try {
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, target);
  } catch (e) {
    await fsp.rm(tmp, { force: true }).catch(() => {});
    throw e;
  }
  await fsyncPath(path.dirname(target));
}
