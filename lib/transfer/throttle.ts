/**
 * Per-host bandwidth limit: one token bucket per process, shared by every concurrent transfer, and a
 * Transform that makes a stream wait for tokens. Reservation style: each chunk reserves its bytes in
 * arrival order (the bucket may go into debt) and waits for the debt to be repaid, so concurrent
 * streams share the rate fairly by arrival and the sum never exceeds rate * t + burst.
 */
import { Transform, type TransformCallback } from 'node:stream';
import { OnestorError, ErrorCodes } from '../shared/errors.js';
import { sleepAbortable, throwIfAborted } from '../shared/abort.js';

export interface Clock {
  /** monotonic milliseconds */
  now(): number;
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

const THROTTLED = 'transfer aborted while throttled';

/** Ends at once with the abort's own reason when it gave one (E_YIELDED, E_NOSPACE), else E_ABORTED. */
export const realClock: Clock = {
  now: () => performance.now(),
  sleep: (ms, signal) => sleepAbortable(ms, signal, THROTTLED),
};

export class TokenBucket {
  private tokens: number;
  private last: number;

  /**
   * @param bytesPerSec sustained rate; 0 or Infinity = unlimited
   * @param burstBytes bucket size: what may pass at once after idling (default: 1/4 s of rate, >= 64 KiB)
   */
  constructor(
    readonly bytesPerSec: number,
    readonly burstBytes: number = Math.max(64 * 1024, Math.floor(bytesPerSec / 4)),
    private readonly clock: Clock = realClock,
  ) {
    if (!(bytesPerSec >= 0) || Number.isNaN(bytesPerSec)) throw new OnestorError(ErrorCodes.CONFIG, `bandwidth must be >= 0 bytes/s, got ${bytesPerSec}`, { field: 'limits.bandwidthMBps' });
    if (!(burstBytes > 0)) throw new OnestorError(ErrorCodes.CONFIG, `burst must be > 0 bytes, got ${burstBytes}`, { field: 'limits.bandwidthMBps' });
    this.tokens = burstBytes;
    this.last = clock.now();
  }

  get unlimited(): boolean {
    return this.bytesPerSec === 0 || this.bytesPerSec === Infinity;
  }

  /** Reserves n bytes now; returns how long the caller must wait before sending them (ms). */
  reserve(n: number): number {
    if (this.unlimited) return 0;
    const now = this.clock.now();
    this.tokens = Math.min(this.burstBytes, this.tokens + ((now - this.last) * this.bytesPerSec) / 1000);
    this.last = now;
    this.tokens -= n;
    return this.tokens >= 0 ? 0 : (-this.tokens * 1000) / this.bytesPerSec;
  }

  /**
   * Reserves n bytes and waits out the debt, ending at once with the signal's reason when it fires: at a
   * low rate one piece's wait is seconds, and a yield to a live migration or a shutdown must not sit it out.
   * Waits of at most `minSleepMs` are skipped (the debt stays on the bucket, so the rate holds).
   */
  async take(n: number, signal?: AbortSignal, minSleepMs = 0): Promise<void> {
    throwIfAborted(signal, THROTTLED);
    const wait = this.reserve(n);
    if (wait > minSleepMs) await this.clock.sleep(wait, signal);
  }

  /** Largest piece worth reserving at once: a chunk larger than the burst is split. */
  get pieceBytes(): number {
    return Math.max(1, Math.floor(this.burstBytes));
  }
}

/** A Transform that passes data through at the bucket's pace. */
export function throttle(bucket: TokenBucket, opts: { clock?: Clock; signal?: AbortSignal } = {}): Transform {
  const clock = opts.clock ?? realClock;
  return new Transform({
    transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback) {
      if (bucket.unlimited) return done(null, chunk);
      const piece = bucket.pieceBytes;
      const pump = async () => {
        for (let off = 0; off < chunk.length; off += piece) {
          const part = chunk.subarray(off, Math.min(chunk.length, off + piece));
          const wait = bucket.reserve(part.length);
          if (wait > 0) await clock.sleep(wait, opts.signal);
          this.push(part);
        }
      };
      pump().then(() => done(), (e: unknown) => done(e as Error));
    },
  });
}

/** Bytes/s from the config's MB/s (MB = 10^6, as link speeds are quoted); 0 = unlimited. */
export function bytesPerSecFromMBps(mbps: number): number {
  return mbps > 0 ? mbps * 1_000_000 : 0;
}
