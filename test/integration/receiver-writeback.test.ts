/**
 * The receiver hands written data to the disk while an upload streams (fdatasync in the background every
 * 64 MiB), so the fsync before its verdict only waits for the tail. Seen from outside: the real receiver
 * process under `strace -f -e trace=fdatasync,fsync`, one 200 MiB upload through the real client.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Readable, Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CRASH_RECEIVER, sha256Of } from '../../dev/replica-crash.js';
import { ReceiverConnection } from '../../lib/transfer/replica-client.js';

const MiB = 1024 * 1024;
let root: string;

beforeAll(async () => {
  root = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-t-writeback-'));
});
afterAll(async () => {
  if (root) await fsp.rm(root, { recursive: true, force: true });
});

describe('receiver writeback during an upload', () => {
  it('syncs data every 64 MiB while receiving, before the final fsync, and verifies the upload', async () => {
    const snaps = path.join(root, 'snaps');
    await fsp.mkdir(snaps);
    const src = path.join(root, 'src.bin');
    const fh = await fsp.open(src, 'w');
    for (let i = 0; i < 25; i++) await fh.write(randomBytes(8 * MiB));
    await fh.close();
    const trace = path.join(root, 'strace.log');
    const child = spawn('strace', ['-f', '-qq', '-e', 'trace=fdatasync,fsync', '-o', trace, process.execPath, CRASH_RECEIVER, snaps], { stdio: ['pipe', 'pipe', 'inherit'] });
    const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
    const conn = new ReceiverConnection(child.stdout as Readable, child.stdin as Writable);
    await conn.hello('hv-crash', 'test');
    const d = await conn.openDisk(41, 0);
    const r = await d.upload('base', src, { key: 'wb' });
    expect(r.bytes).toBe(200 * MiB);
    expect(r.digest).toBe('sha256'); // base goes with sha256
    expect(r.hex).toBe(await sha256Of(src));
    await d.close();
    await conn.bye();
    expect(await exited).toBe(0);

    // strace lines: "PID fdatasync(FD) = 0" / "PID fsync(FD) = 0"; the upload's fd is the one fdatasync saw
    const calls = (await fsp.readFile(trace, 'utf8')).split('\n').map((l) => /^\d+\s+(fdatasync|fsync)\((\d+)\)\s+=\s+0/.exec(l)).filter((m) => m !== null);
    const background = calls.filter((m) => m[1] === 'fdatasync');
    expect(background.length).toBeGreaterThanOrEqual(2); // 200 MiB: at >= 64 and >= 128 MiB written (one at a time)
    const fd = background[0]![2];
    expect(background.every((m) => m[2] === fd)).toBe(true);
    // the verdict's fsync of that file comes after every background sync
    const finalAt = calls.findIndex((m) => m[1] === 'fsync' && m[2] === fd);
    expect(finalAt).toBeGreaterThan(calls.lastIndexOf(background[background.length - 1]!));
  }, 120_000);
});
