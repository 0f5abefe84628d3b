import { describe, it, expect, afterEach } from 'vitest';
import { mkdtemp, mkdir, writeFile, rm, access } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { replicaPaths } from '../../lib/replica/layout.js';
import { sweepOrphans } from '../../lib/replica/sweep.js';
import { acquireFileLock } from '../../lib/shared/file-lock.js';

const dirs: string[] = [];
afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});
const exists = (p: string) => access(p).then(() => true, () => false);

async function spare(snaps: string, vm: number, disk: number) {
  const p = replicaPaths(snaps, vm, disk);
  await mkdir(p.workDir, { recursive: true });
  await writeFile(path.join(p.workDir, 'copy.a'), 'x');
  await mkdir(p.tmpDir, { recursive: true });
  await writeFile(path.join(p.tmpDir, 'upload'), 'y');
  await mkdir(path.dirname(p.lockFile), { recursive: true });
  return p;
}

describe('sweepOrphans', () => {
  it('removes spares and uploads of VMs whose replica dir is gone, keeps live and locked ones', async () => {
    const snaps = await mkdtemp(path.join(os.tmpdir(), 'onestor-sweep-'));
    dirs.push(snaps);
    const gone = await spare(snaps, 5, 0);
    const live = await spare(snaps, 6, 0);
    await mkdir(live.snapDir, { recursive: true });
    const busy = await spare(snaps, 7, 1);
    const lock = await acquireFileLock(busy.lockFile, { timeoutSec: 1 });
    // a fresh upload of a first seed (no VM dir yet) must survive: it may be resumed
    const fresh = await spare(snaps, 8, 0);
    await rm(fresh.workDir, { recursive: true });
    expect(await sweepOrphans(snaps)).toBe(2);
    expect(await exists(path.join(fresh.tmpDir, 'upload'))).toBe(true);
    expect(await exists(gone.tmpDir)).toBe(true);
    try {
      // old uploads go now (5 and 8); 7 is still locked
      expect(await sweepOrphans(snaps, { uploadMaxAgeMs: -1 })).toBe(2);
    } finally {
      await lock.release();
    }
    expect(await exists(gone.workDir)).toBe(false);
    expect(await exists(gone.tmpDir)).toBe(false);
    expect(await exists(path.join(live.workDir, 'copy.a'))).toBe(true);
    expect(await exists(path.join(busy.workDir, 'copy.a'))).toBe(true);
    // once the lock is free the busy one goes too
    expect(await sweepOrphans(snaps, { uploadMaxAgeMs: -1 })).toBe(1);
    expect(await exists(busy.workDir)).toBe(false);
  });
  it('ignores names that are not ours', async () => {
    const snaps = await mkdtemp(path.join(os.tmpdir(), 'onestor-sweep-'));
    dirs.push(snaps);
    await mkdir(path.join(snaps, '.onestor', 'work', '..x', 'disk.0'), { recursive: true });
    await mkdir(path.join(snaps, '.onestor', 'work', '9', 'notadisk'), { recursive: true });
    expect(await sweepOrphans(snaps)).toBe(0);
    expect(await exists(path.join(snaps, '.onestor', 'work', '9', 'notadisk'))).toBe(true);
  });
});
