/**
 * The receiver reads stdin into ONE reused buffer (lib/replica/stdio.ts lentStdin): every chunk it gets is
 * only lent until it asks for the next. These tests feed the real receiver through a source with exactly
 * that contract — and poison the buffer before each refill — so any byte the receiver keeps by reference
 * (a write batch, a control frame split across reads) shows up as corruption on disk or a protocol error.
 */
import { createHash } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from '../../lib/shared/exec.js';
import { runReceiver } from '../../lib/replica/receiver.js';
import type { LentChunks } from '../../lib/replica/stdio.js';
import { ReceiverConnection } from '../../lib/transfer/replica-client.js';
import { receiverOptions } from '../helpers/receiver-session.js';
import { xxh64Of } from '../helpers/digest.js';

const MiB = 1024 * 1024;
let root: string;

beforeAll(async () => {
  root = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-lent-'));
});
afterAll(async () => {
  await fsp.rm(root, { recursive: true, force: true });
});

async function q(args: string[]): Promise<void> {
  const r = await run(args[0]!, args.slice(1));
  if (r.code !== 0) throw new Error(`${args.join(' ')}: ${r.stderr}`);
}
async function sha(file: string): Promise<string> {
  return createHash('sha256').update(await fsp.readFile(file)).digest('hex');
}

/** `src` re-cut into pieces of pseudo-random size (1 byte .. maxPiece), each lent from one reused, poisoned buffer. */
function lentOver(src: PassThrough, maxPiece: number, seed: number): LentChunks {
  const buffer = Buffer.alloc(maxPiece);
  let rng = seed;
  const size = () => {
    rng = (rng * 1103515245 + 12345) & 0x7fffffff;
    // a third of the pieces are tiny, so frame headers and control frames get split too
    return rng % 3 === 0 ? 1 + (rng % 7) : 1 + (rng % maxPiece);
  };
  async function* pieces(): AsyncGenerator<Buffer> {
    for await (const c of src) {
      const chunk = c as Buffer;
      for (let at = 0; at < chunk.length; ) {
        const n = Math.min(chunk.length - at, size());
        buffer.fill(0xee); // whatever the receiver kept of the previous piece is garbage from here on
        chunk.copy(buffer, 0, at, at + n);
        at += n;
        yield buffer.subarray(0, n);
      }
    }
  }
  const it = pieces();
  return { [Symbol.asyncIterator]: () => it, destroy: (err?: Error) => src.destroy(err) };
}

async function sourceDisk(name: string): Promise<{ base: string; base1: string }> {
  const snap = path.join(root, name, 'disk.0.snap');
  await fsp.mkdir(snap, { recursive: true });
  await fsp.symlink('.', path.join(snap, 'disk.0.snap')); // OneStor's layout: base.1 names its backing disk.0.snap/base
  const base = path.join(snap, 'base');
  const base1 = path.join(snap, 'base.1');
  // larger than both write batches together, in varied patterns, so a misplaced batch shows
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', base, String(32 * MiB)]);
  for (let i = 0; i < 9; i++) await q(['qemu-io', '-f', 'qcow2', '-c', `write -P ${0x10 + i} ${i}M 1M`, base]);
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'disk.0.snap/base', '-F', 'qcow2', base1]);
  for (let i = 0; i < 6; i++) await q(['qemu-io', '-f', 'qcow2', '-c', `write -P ${0x40 + i} ${10 + 2 * i}M 1536k`, base1]);
  return { base, base1 };
}

describe('receiver on lent input chunks (one reused read buffer)', () => {
  for (const [maxPiece, seed] of [
    [64 * 1024, 7],
    [1024 * 1024, 11],
  ] as const) {
    it(`writes exactly what was sent (pieces up to ${maxPiece / 1024} KiB)`, async () => {
      const snaps = path.join(root, `snaps-${maxPiece}`);
      const src = await sourceDisk(`src-${maxPiece}`);
      const toReceiver = new PassThrough();
      const fromReceiver = new PassThrough();
      const done = runReceiver(lentOver(toReceiver, maxPiece, seed), fromReceiver, receiverOptions(snaps)).finally(() => fromReceiver.end());
      const conn = new ReceiverConnection(fromReceiver, toReceiver);
      await conn.hello('hv1', 'test');
      const d = await conn.openDisk(5, 0);
      const b = await d.upload('base', src.base, { key: 'base-k' });
      const b1 = await d.upload('base1', src.base1, { key: 'base1-k' });
      await d.publishFull({ checkpoint: 'ck1', capturedAt: 1700000000, consistency: 'crash-consistent', sourceHost: 'hv1', base: 'base-k', base1: 'base1-k' });
      await d.close();
      await conn.bye();
      expect(await done).toBe(0);
      expect(b.digest).toBe('sha256');
      expect(b.hex).toBe(await sha(src.base));
      // base.1 goes with xxh64 (the receiver offers it); base always with sha256
      expect(b1.digest).toBe('xxh64');
      expect(b1.hex).toBe(await xxh64Of(src.base1));
      // the digests are computed as data arrives; the files are what the batches wrote
      expect(await sha(path.join(snaps, '5', 'disk.0.snap', 'base'))).toBe(b.hex);
      expect(await sha(path.join(snaps, '5', 'disk.0.snap', 'base.1'))).toBe(await sha(src.base1));
    });
  }
});
