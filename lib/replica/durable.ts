/** Durable writes on the replica: fsync, and temp + fsync + rename + dir fsync with the temp outside SNAPS/VMID. */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { ensureDir, tmpName, type ReplicaPaths } from './layout.js';

export async function fsyncPath(file: string): Promise<void> {
  const fh = await fsp.open(file, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}


/** temp + fsync + rename + dir fsync. The temp lives outside SNAPS/VMID. */
export async function writeFileAtomic(p: ReplicaPaths, target: string, data: string): Promise<void> {
  await ensureDir(p.tmpDir);
  const tmp = tmpName(p, 'json');
  const fh = await fsp.open(tmp, 'w', 0o644);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  try {
    await fsp.rename(tmp, target);
  } catch (e) {
    await fsp.rm(tmp, { force: true });
    throw e;
  }
  await fsyncPath(path.dirname(target));
}

