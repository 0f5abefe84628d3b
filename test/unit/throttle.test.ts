import { describe, it, expect } from 'vitest';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createHash, randomBytes } from 'node:crypto';
import { TokenBucket, throttle, realClock, bytesPerSecFromMBps, type Clock } from '../../lib/transfer/throttle.js';
import { OnestorError } from '../../lib/shared/errors.js';

/** Virtual time: sleeping advances the clock instead of waiting; every sleep is recorded. */
class FakeClock implements Clock {
  t = 5000;
  sleeps: number[] = [];
  now() {
    return this.t;
  }
  async sleep(ms: number) {
    this.sleeps.push(ms);
    this.t += ms;
    await Promise.resolve();
  }
}

function sink(onChunk?: (n: number, t: number) => void, clock?: Clock) {
  const hash = createHash('sha256');
  let bytes = 0;
  const w = new Writable({
    write(chunk: Buffer, _e, cb) {
      hash.update(chunk);
      bytes += chunk.length;
      onChunk?.(chunk.length, clock?.now() ?? 0);
      cb();
    },
  });
  return { w, result: () => ({ bytes, sha: hash.digest('hex') }) };
}

function chunks(data: Buffer, size: number): Buffer[] {
  const out: Buffer[] = [];
  for (let o = 0; o < data.length; o += size) out.push(data.subarray(o, o + size));
  return out;
}

describe('TokenBucket', () => {
  it('lets the burst through, then paces at the rate', () => {
    const c = new FakeClock();
    const b = new TokenBucket(1000, 500, c);
    expect(b.reserve(500)).toBe(0);
    expect(b.reserve(100)).toBe(100); // 100 bytes of debt at 1000 B/s
    c.t += 100;
    expect(b.reserve(100)).toBe(100);
    c.t += 10_000; // long idle refills only up to the burst
    expect(b.reserve(500)).toBe(0);
    expect(b.reserve(1)).toBeCloseTo(1, 5);
  });

  it('0 means unlimited; hostile settings are refused with E_CONFIG', () => {
    expect(new TokenBucket(0).reserve(1e12)).toBe(0);
    expect(bytesPerSecFromMBps(0)).toBe(0);
    expect(bytesPerSecFromMBps(12.5)).toBe(12_500_000);
    for (const [rate, burst] of [
      [-1, 10],
      [Number.NaN, 10],
      [100, 0],
      [100, -5],
    ] as const) {
      expect(() => new TokenBucket(rate, burst)).toThrow(OnestorError);
    }
  });
});

describe('throttle stream (real streams, fake clock)', () => {
  it('passes every byte unchanged and takes (size - burst) / rate of virtual time', async () => {
    const c = new FakeClock();
    const rate = 1_000_000;
    const burst = 64 * 1024;
    const bucket = new TokenBucket(rate, burst, c);
    const data = randomBytes(3 * 1024 * 1024 + 17);
    const s = sink();
    const t0 = c.now();
    await pipeline(Readable.from(chunks(data, 200_000)), throttle(bucket, { clock: c }), s.w);
    const r = s.result();
    expect(r.bytes).toBe(data.length);
    expect(r.sha).toBe(createHash('sha256').update(data).digest('hex'));
    const elapsed = c.now() - t0;
    const ideal = ((data.length - burst) * 1000) / rate;
    expect(elapsed).toBeGreaterThanOrEqual(ideal - 1);
    expect(elapsed).toBeLessThanOrEqual(ideal + 1);
  });

  it('never exceeds rate * t + burst at any point', async () => {
    const c = new FakeClock();
    const rate = 250_000;
    const burst = 32_768;
    const bucket = new TokenBucket(rate, burst, c);
    const t0 = c.now();
    let sent = 0;
    let worst = -Infinity;
    const s = sink((n, t) => {
      sent += n;
      worst = Math.max(worst, sent - (rate * (t - t0)) / 1000 - burst);
    }, c);
    await pipeline(Readable.from(chunks(randomBytes(1_000_000), 100_000)), throttle(bucket, { clock: c }), s.w);
    expect(sent).toBe(1_000_000);
    expect(worst).toBeLessThanOrEqual(0.001);
    expect(Math.max(...c.sleeps)).toBeLessThanOrEqual((burst * 1000) / rate + 1e-6); // chunks are split to the burst size
  });

  it('one bucket shared by three concurrent streams limits their SUM', async () => {
    const c = new FakeClock();
    const rate = 2_000_000;
    const bucket = new TokenBucket(rate, 65_536, c);
    const t0 = c.now();
    const sizes = [1_500_000, 700_000, 2_300_000];
    const sinks = sizes.map(() => sink());
    await Promise.all(sizes.map((n, i) => pipeline(Readable.from(chunks(randomBytes(n), 64_000)), throttle(bucket, { clock: c }), sinks[i]!.w)));
    const total = sizes.reduce((a, b) => a + b, 0);
    expect(sinks.map((s) => s.result().bytes)).toEqual(sizes);
    const elapsed = c.now() - t0;
    // each stream sleeps its own debt; virtual time advances by the sum of sleeps, so the
    // shared bucket must account for all three to reach at least total/rate
    expect(elapsed).toBeGreaterThanOrEqual(((total - 65_536) * 1000) / rate - 1);
  });

  it('an unlimited bucket does not split or delay', async () => {
    const c = new FakeClock();
    const bucket = new TokenBucket(0, 1, c);
    const seen: number[] = [];
    await pipeline(Readable.from(chunks(randomBytes(300_000), 100_000)), throttle(bucket, { clock: c }), sink((n) => seen.push(n)).w);
    expect(seen).toEqual([100_000, 100_000, 100_000]);
    expect(c.sleeps).toEqual([]);
  });
});

describe('throttle stream (real clock)', () => {
  it('400 KB at 2 MB/s with a 100 KB burst takes about 150 ms', async () => {
    const bucket = new TokenBucket(2_000_000, 100_000, realClock);
    const t0 = performance.now();
    const s = sink();
    await pipeline(Readable.from(chunks(randomBytes(400_000), 16_384)), throttle(bucket), s.w);
    const ms = performance.now() - t0;
    expect(s.result().bytes).toBe(400_000);
    expect(ms).toBeGreaterThanOrEqual(140);
    expect(ms).toBeLessThan(1500);
  });

  it('an abort while throttled fails the pipeline with E_ABORTED', async () => {
    const bucket = new TokenBucket(10_000, 1000, realClock);
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 50);
    const err = await pipeline(Readable.from(chunks(randomBytes(100_000), 10_000)), throttle(bucket, { signal: ac.signal }), sink().w).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OnestorError);
    expect((err as OnestorError).code).toBe('E_ABORTED');
  });
});
