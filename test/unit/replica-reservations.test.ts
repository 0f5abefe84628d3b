import { spawn } from 'node:child_process';
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { acquireFileLock } from '../../lib/shared/file-lock.js';
import { createHash } from 'node:crypto';
import { PassThrough } from 'node:stream';
import { devKey, heldFlocks, reservedByOthers, SpaceLedger } from '../../lib/replica/reservations.js';
import { runReceiver } from '../../lib/replica/receiver.js';
import { FrameDecoder, encodeControl, encodeData } from '../../lib/protocol/protocol.js';
import { receiverOptions } from '../helpers/receiver-session.js';

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

  it('an upload in flight is counted once: its reservation shrinks as its bytes land, and goes at end', async () => {
    const MiB = 1024 * 1024;
    const snaps = path.join(dir, 'snaps-inflight');
    const toReceiver = new PassThrough();
    const fromReceiver = new PassThrough();
    const done = runReceiver(toReceiver, fromReceiver, receiverOptions(snaps, { sweepIntervalSec: 3600 }));
    const dec = new FrameDecoder();
    const replies: Array<Record<string, unknown>> = [];
    fromReceiver.on('data', (c: Buffer) => {
      for (const f of dec.push(c)) if (f.type === 'control') replies.push(f.message as Record<string, unknown>);
    });
    const reply = async () => {
      for (let i = 0; i < 600 && !replies.length; i++) await new Promise((r) => setTimeout(r, 10));
      return replies.shift();
    };
    const ask = async (m: object) => (toReceiver.write(encodeControl(m)), reply());
    const ledgerBytes = async () => {
      const f = (await fsp.readdir(path.join(snaps, '.onestor', 'slots'))).find((n) => n.endsWith('.resv'));
      return f ? (JSON.parse(await fsp.readFile(path.join(snaps, '.onestor', 'slots', f), 'utf8')) as { bytes: number }).bytes : 0;
    };
    expect(await ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'h' })).toMatchObject({ type: 'ok' });
    expect(await ask({ type: 'open', vm: 1, disk: 0 })).toMatchObject({ type: 'ok' });
    const size = 100 * MiB;
    expect(await ask({ type: 'put', kind: 'base1', size, key: 'b1' })).toMatchObject({ type: 'ok', offset: 0 });
    expect(await ledgerBytes()).toBe(2 * size); // the upload and the spare it will need
    const data = Buffer.alloc(size, 0x5a);
    for (let o = 0; o < 80 * MiB; o += 4 * MiB) for (const b of encodeData(data.subarray(o, o + 4 * MiB))) toReceiver.write(b);
    let now = 2 * size;
    for (let i = 0; i < 500 && now === 2 * size; i++) {
      await new Promise((r) => setTimeout(r, 20));
      now = await ledgerBytes();
    }
    // after 64 MiB on disk, the reservation holds only what is still to come plus the spare
    expect(now).toBeLessThanOrEqual(2 * size - 64 * MiB);
    for (let o = 80 * MiB; o < size; o += 4 * MiB) for (const b of encodeData(data.subarray(o, o + 4 * MiB))) toReceiver.write(b);
    expect(await ask({ type: 'end', sha256: createHash('sha256').update(data).digest('hex') })).toMatchObject({ type: 'ok' });
    expect(await ledgerBytes()).toBe(size); // the spare's room, until publish or close
    expect(await ask({ type: 'close' })).toMatchObject({ type: 'ok' });
    expect(await ledgerBytes()).toBe(0);
    await ask({ type: 'bye' });
    expect(await done).toBe(0);
  });
});
