/**
 * An upload ends at once when its signal fires, wherever it waits: on the bandwidth limit (at 1 MB/s one
 * 2 MiB frame is a 2 s wait; a seed's base is minutes), on the channel's drain, or on the next chunk of
 * its source. With the signal's OnestorError as the reason (the pull-mode seed's watchdog: E_YIELDED for
 * a live migration, E_NOSPACE) that is the error; a plain abort is E_ABORTED. The channel is dropped (the
 * receiver keeps what it got, for a resume). A wait that ignored the signal would hang the test.
 */
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { PassThrough, Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodeControl, FrameDecoder } from '../../lib/protocol/protocol.js';
import { ReceiverConnection } from '../../lib/transfer/replica-client.js';
import { TokenBucket, realClock } from '../../lib/transfer/throttle.js';
import { ErrorCodes, OnestorError } from '../../lib/shared/errors.js';
import { anySignal, raceAbort, sleepAbortable } from '../../lib/shared/abort.js';
import { transferDeadline } from '../../lib/cycle/cycle.js';

const KiB = 1024;
const never = new Promise<never>(() => {});
const yielded = () => new OnestorError(ErrorCodes.YIELDED, 'seed stopped: migration of one-7 in progress');

/**
 * A receiver that accepts every `put` at offset 0 and swallows data frames. `stall`: after the put, the
 * channel takes no more bytes (its write callbacks never come), so the client waits for a drain.
 */
function fakeChannel(o: { stall?: boolean } = {}) {
  const fromReceiver = new PassThrough();
  const dec = new FrameDecoder();
  let stalled = false;
  const toReceiver = new Writable({
    highWaterMark: 16 * KiB,
    write(chunk: Buffer, _enc, cb) {
      if (stalled) return; // never calls back: the client's writes pile up until it waits for 'drain'
      for (const f of dec.push(chunk)) {
        if (f.type === 'control' && (f.message as { type: string }).type === 'put') {
          fromReceiver.write(encodeControl({ type: 'ok', offset: 0 }));
          if (o.stall) stalled = true;
        }
      }
      cb();
    },
  });
  const conn = new ReceiverConnection(fromReceiver, toReceiver);
  return { conn };
}

/** Chunks of `size` bytes forever, or until `stallAfter` chunks, after which the next one never comes. */
async function* source(size: number, stallAfter = Infinity): AsyncGenerator<Buffer> {
  for (let i = 0; ; i++) {
    if (i >= stallAfter) await never;
    yield Buffer.alloc(size, i & 0xff);
  }
}

/** Aborts `ac` (with `reason`) at the first progress callback: the upload is then past the put. */
function abortOnFirstProgress(ac: AbortController, reason?: unknown) {
  let done = false;
  return () => {
    if (done) return;
    done = true;
    setImmediate(() => ac.abort(reason));
  };
}

let root: string;
beforeAll(async () => {
  root = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-upabort-'));
});
afterAll(async () => {
  await fsp.rm(root, { recursive: true, force: true });
});

describe('an upload ends promptly on its signal', () => {
  it('waiting on the bandwidth limit (stream): fails with the stop reason (E_YIELDED), channel dropped', async () => {
    const { conn } = fakeChannel();
    // 1 KB/s with a tiny burst: each 64 KiB piece owes ~65 s
    conn.bandwidth = new TokenBucket(1000, 1);
    const ac = new AbortController();
    const p = conn.uploadStream('base1', { size: 1 << 30, chunks: source(64 * KiB) }, { key: 'k', signal: ac.signal, onProgress: abortOnFirstProgress(ac, yielded()) });
    await expect(p).rejects.toMatchObject({ code: ErrorCodes.YIELDED });
    expect(conn.connected).toBe(false);
  });

  it('waiting on the bandwidth limit (file): a plain abort (shutdown) is E_ABORTED', async () => {
    const file = path.join(root, 'base');
    await fsp.writeFile(file, Buffer.alloc(512 * KiB, 7));
    const { conn } = fakeChannel();
    conn.bandwidth = new TokenBucket(1000, 1);
    const ac = new AbortController();
    const p = conn.upload('base', file, { key: 'b', sha256: 'f'.repeat(64), signal: ac.signal, onProgress: abortOnFirstProgress(ac) });
    await expect(p).rejects.toMatchObject({ code: ErrorCodes.ABORTED });
    expect(conn.connected).toBe(false);
  });

  it('waiting for the next chunk of a source that stalls (an NBD export gone away): fails with the reason', async () => {
    const { conn } = fakeChannel();
    const ac = new AbortController();
    const p = conn.uploadStream('base1', { size: 1 << 30, chunks: source(64 * KiB, 1) }, { key: 'k', signal: ac.signal, onProgress: abortOnFirstProgress(ac, yielded()) });
    await expect(p).rejects.toMatchObject({ code: ErrorCodes.YIELDED });
    expect(conn.connected).toBe(false);
  });

  it('waiting for the channel to drain: fails with the reason (E_NOSPACE)', async () => {
    const { conn } = fakeChannel({ stall: true });
    const ac = new AbortController();
    const p = conn.uploadStream('base1', { size: 1 << 30, chunks: source(64 * KiB) }, { key: 'k', signal: ac.signal });
    // the put is answered, then the channel stops taking bytes: the client ends up waiting for a drain
    setTimeout(() => ac.abort(new OnestorError(ErrorCodes.NOSPACE, 'staging filesystem fell below its reserve')), 50);
    await expect(p).rejects.toMatchObject({ code: ErrorCodes.NOSPACE });
    expect(conn.connected).toBe(false);
  });

  it('an already aborted signal: nothing is sent past the put', async () => {
    const { conn } = fakeChannel();
    const ac = new AbortController();
    ac.abort(yielded());
    let progress = 0;
    await expect(conn.uploadStream('base1', { size: 1 << 20, chunks: source(64 * KiB) }, { key: 'k', signal: ac.signal, onProgress: () => progress++ })).rejects.toMatchObject({ code: ErrorCodes.YIELDED });
    expect(progress).toBe(0);
  });
});

describe('abortable waits', () => {
  it('TokenBucket.take: a wait of hours ends on the signal, with its reason or E_ABORTED', async () => {
    const b = new TokenBucket(1, 1, realClock);
    b.reserve(1);
    const ac = new AbortController();
    const p = b.take(10_000, ac.signal);
    setImmediate(() => ac.abort(yielded()));
    await expect(p).rejects.toMatchObject({ code: ErrorCodes.YIELDED });
    const ac2 = new AbortController();
    const p2 = b.take(10_000, ac2.signal);
    setImmediate(() => ac2.abort());
    await expect(p2).rejects.toMatchObject({ code: ErrorCodes.ABORTED });
    await expect(b.take(1, ac2.signal)).rejects.toMatchObject({ code: ErrorCodes.ABORTED });
    // unlimited: no wait at all
    await new TokenBucket(0).take(1e12, new AbortController().signal);
  });

  it('raceAbort / sleepAbortable end with the reason; anySignal carries the first reason', async () => {
    const ac = new AbortController();
    const r = raceAbort(never, ac.signal, 'x');
    const s = sleepAbortable(3_600_000, ac.signal, 'x');
    ac.abort(yielded());
    await expect(r).rejects.toMatchObject({ code: ErrorCodes.YIELDED });
    await expect(s).rejects.toMatchObject({ code: ErrorCodes.YIELDED });
    await expect(raceAbort(Promise.resolve(3), ac.signal, 'x')).rejects.toMatchObject({ code: ErrorCodes.YIELDED });
    expect(await raceAbort(Promise.resolve(3), undefined, 'x')).toBe(3);

    const a = new AbortController();
    const b = new AbortController();
    const any = anySignal([a.signal, undefined, b.signal]);
    expect(any.signal.aborted).toBe(false);
    b.abort(yielded());
    expect(any.signal.reason).toMatchObject({ code: ErrorCodes.YIELDED });
    a.abort();
    expect(any.signal.reason).toMatchObject({ code: ErrorCodes.YIELDED });
  });

  it("transferDeadline: the seed's stop reaches the disk's uploads with its reason, and is no deadline", () => {
    const shutdown = new AbortController();
    const stop = new AbortController();
    const d = transferDeadline([shutdown.signal, stop.signal], 3_600_000);
    expect(d.signal?.aborted).toBe(false);
    stop.abort(yielded());
    expect(d.signal?.aborted).toBe(true);
    expect(d.signal?.reason).toMatchObject({ code: ErrorCodes.YIELDED });
    expect(d.expired()).toBe(false);
    d.dispose();
    // no deadline and one signal: that signal itself
    expect(transferDeadline([shutdown.signal, undefined], undefined).signal).toBe(shutdown.signal);
  });
});

describe('uploadStream with lent chunks', () => {
  it('writes each chunk out before asking for the next: a source that reuses one buffer arrives intact', async () => {
    // a channel whose write callbacks come late (a slow link): what it holds is read only then
    const fromReceiver = new PassThrough();
    const dec = new FrameDecoder();
    const received: Buffer[] = [];
    const toReceiver = new Writable({
      highWaterMark: 4 * 1024 * KiB,
      write(chunk: Buffer, _enc, cb) {
        setTimeout(() => {
          for (const f of dec.push(chunk)) {
            if (f.type === 'data') received.push(Buffer.from(f.chunk));
            else if ((f.message as { type: string }).type === 'put') fromReceiver.write(encodeControl({ type: 'ok', offset: 0 }));
            else if ((f.message as { type: string }).type === 'end') {
              const sha = (f.message as { sha256: string }).sha256;
              fromReceiver.write(encodeControl({ type: 'ok', bytes: 8 * 64 * KiB, sha256: sha }));
            }
          }
          cb();
        }, 2);
      },
    });
    const conn = new ReceiverConnection(fromReceiver, toReceiver);
    const one = Buffer.alloc(64 * KiB);
    async function* lent(): AsyncGenerator<Buffer> {
      for (let i = 0; i < 8; i++) {
        one.fill(i + 1);
        yield one;
        one.fill(0xee); // the consumer asked for the next: the buffer is ours again
      }
    }
    const r = await conn.uploadStream('base1', { size: 8 * 64 * KiB, chunks: lent() }, { key: 'lent' });
    expect(r.bytes).toBe(8 * 64 * KiB);
    const all = Buffer.concat(received);
    expect(all.length).toBe(8 * 64 * KiB);
    for (let i = 0; i < 8; i++) expect(all.subarray(i * 64 * KiB, (i + 1) * 64 * KiB).every((b) => b === i + 1)).toBe(true);
  });
});
