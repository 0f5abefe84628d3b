import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { acquireFileLock } from '../../lib/shared/file-lock.js';
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
});
