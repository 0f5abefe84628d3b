import { spawn } from 'node:child_process';
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { acquireFileLock } from '../../lib/shared/file-lock.js';
import { devKey, heldFlocks, reservedByOthers, SpaceLedger } from '../../lib/replica/reservations.js';

let dir: string;
beforeAll(async () => {
  dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-resv-'));
});
afterAll(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

describe('reservation ledger', () => {
  it('parses held flocks from /proc/locks, not waiters nor other lock kinds', () => {
    const text = [
      '1: FLOCK  ADVISORY  WRITE 22707 fe:00:2148055 0 EOF',
      '1: -> FLOCK  ADVISORY  WRITE 22800 fe:00:2148055 0 EOF',
      '2: OFDLCK ADVISORY  READ -1 00:2c:77 203 203',
      '3: FLOCK  ADVISORY  WRITE 1234 00:2c:99 0 EOF',
      '',
    ].join('\n');
    expect([...heldFlocks(text)].sort()).toEqual(['0:44:99', '254:0:2148055']);
    expect(devKey(0xfe00, 5)).toBe('254:0:5');
    expect(devKey(44, 7)).toBe('0:44:7');
  });

  it('counts only reservations whose slot is locked right now, and refuses past the limit with the figures', async () => {
    const slots = path.join(dir, 'slots');
    await fsp.mkdir(slots);
    const heldSlot = path.join(slots, 'slot.0');
    const lock = await acquireFileLock(heldSlot, { timeoutSec: 0 });
    await fsp.writeFile(`${heldSlot}.resv`, JSON.stringify({ bytes: 600 }));
    // a session that died: its file remains, its slot is free
    await fsp.writeFile(path.join(slots, 'slot.1'), '');
    await fsp.writeFile(path.join(slots, 'slot.1.resv'), JSON.stringify({ bytes: 10_000 }));
    expect(await reservedByOthers(slots, null)).toBe(600);

    const mine = path.join(slots, 'slot.2');
    const myLock = await acquireFileLock(mine, { timeoutSec: 0 });
    const ledger = new SpaceLedger(mine, async () => ({ total: 1000, used: 100, avail: 900 }), 90);
    await ledger.reserve('a', 150, { vm: 1, disk: 0 }); // 100 + 600 + 150 = 850 <= 900
    expect(JSON.parse(await fsp.readFile(`${mine}.resv`, 'utf8')).bytes).toBe(150);
    const err = (await ledger.reserve('b', 100, { vm: 1, disk: 0 }).catch((e: unknown) => e)) as { code: string; message: string; context: object };
    expect(err.code).toBe('E_NOSPACE');
    expect(err.message).toMatch(/600 reserved by other sessions, 150 by this one/);
    expect(err.context).toMatchObject({ vm: 1, disk: 0, field: 'REPLICA_MAX_USED_PERC' });
    await ledger.lower('a', 0);
    await expect(fsp.stat(`${mine}.resv`)).rejects.toMatchObject({ code: 'ENOENT' });
    await ledger.reserve('b', 100, {});
    // the other session ends: its reservation no longer counts even before anyone removes its file
    await lock.release();
    expect(await reservedByOthers(slots, mine)).toBe(0);
    await ledger.releaseAll();
    await myLock.release();
  });

  it('a reservation of a process killed with SIGKILL stops counting', async () => {
    const slots = path.join(dir, 'slots-kill');
    await fsp.mkdir(slots);
    const slot = path.join(slots, 'slot.0');
    const holder = spawn('sh', ['-c', 'exec 9>>"$1"; flock 9; echo L; exec sleep 600', 'sh', slot], { stdio: ['ignore', 'pipe', 'ignore'] });
    await new Promise((r) => holder.stdout!.once('data', r));
    await fsp.writeFile(`${slot}.resv`, JSON.stringify({ bytes: 123 }));
    expect(await reservedByOthers(slots, null)).toBe(123);
    holder.kill('SIGKILL');
    await new Promise((r) => holder.once('exit', r));
    expect(await reservedByOthers(slots, null)).toBe(0);
  });
});
