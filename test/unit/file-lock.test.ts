import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { acquireFileLock, openBatchLocker } from '../../lib/shared/file-lock.js';
import { errorCodeOf } from '../../lib/shared/errors.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'onestor-lock-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('file locks that may be removed', () => {
  it('a waiter on a removed lock file never shares the lock with a newcomer on the new file', async () => {
    const file = path.join(dir, 'a.lock');
    const a = await acquireFileLock(file, { timeoutSec: 5 });
    const held = new Set<string>();
    const take = (name: string) =>
      acquireFileLock(file, { timeoutSec: 10 }).then((l) => {
        held.add(name);
        return { name, l };
      });
    const bP = take('B');
    await new Promise((r) => setTimeout(r, 200)); // B is now blocked in flock on A's inode
    await a.remove();
    const cP = take('C'); // C opens (creates) a new file at the same path
    const first = await Promise.race([bP, cP]);
    await new Promise((r) => setTimeout(r, 400));
    // whoever won, the other one (on the old inode or the new one) is still waiting
    expect([...held]).toEqual([first.name]);
    await first.l.remove();
    const second = await (first.name === 'B' ? cP : bP);
    expect(held.size).toBe(2);
    await second.l.remove();
    await expect(stat(file)).rejects.toMatchObject({ code: 'ENOENT' });
  });
  it('try-once on a held lock times out with E_LOCK_TIMEOUT, and remove() of a released lock leaves the file', async () => {
    const file = path.join(dir, 'b.lock');
    const a = await acquireFileLock(file, { timeoutSec: 0 });
    const err = await acquireFileLock(file, { timeoutSec: 0 }).catch((e: unknown) => e);
    expect(errorCodeOf(err)).toBe('E_LOCK_TIMEOUT');
    await a.release();
    await a.remove(); // already released: must not unlink a file someone else may hold by now
    expect((await stat(file)).isFile()).toBe(true);
  });
  it('names the lock file when its directory is missing', async () => {
    const file = path.join(dir, 'missing', 'c.lock');
    const err = (await acquireFileLock(file, { timeoutSec: 0 }).catch((e: unknown) => e)) as Error;
    expect(errorCodeOf(err)).toBe('E_INTERNAL');
    expect((err as { context?: { file?: string } }).context?.file).toBe(file);
  });

  it('batch locker: busy when someone holds it, excludes others while it holds, remove() while held', async () => {
    const held = path.join(dir, 'batch-held.lock');
    const free = path.join(dir, 'batch-free.lock');
    const other = await acquireFileLock(held, { timeoutSec: 0 });
    const locker = openBatchLocker();
    try {
      expect(await locker.tryLock(held)).toBeNull();
      expect(await locker.tryLock(path.join(dir, 'no-such-dir', 'x.lock'))).toBeNull();
      const l = await locker.tryLock(free);
      expect(l).not.toBeNull();
      // a session trying the same disk meanwhile is refused (try-once) ...
      expect(errorCodeOf(await acquireFileLock(free, { timeoutSec: 0 }).catch((e: unknown) => e))).toBe('E_LOCK_TIMEOUT');
      // ... and one that waits gets it only after the remove, on a new file
      let waiterHeld = false;
      const waiter = acquireFileLock(free, { timeoutSec: 10 }).then((w) => {
        waiterHeld = true;
        return w;
      });
      await new Promise((r) => setTimeout(r, 300));
      expect(waiterHeld).toBe(false);
      await l!.remove();
      const w = await waiter;
      expect((await stat(free)).isFile()).toBe(true); // re-created by the waiter after the unlink
      await w.remove();
      // the locker goes on with the next disk
      await other.release();
      const again = await locker.tryLock(held);
      expect(again).not.toBeNull();
      await again!.release();
      expect((await stat(held)).isFile()).toBe(true);
    } finally {
      await locker.close();
      await other.release();
    }
  });
});
