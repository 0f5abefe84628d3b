/**
 * Session time limits (fake clock) and the slot fairness rule: pure decisions, no processes.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { SessionWatch, type SessionLimits } from '../../lib/replica/session-watch.js';
import { defaultMaxPerHost, mayTake, type SlotView } from '../../lib/replica/slots.js';

const limits: SessionLimits = { helloTimeoutSec: 5, idleTimeoutSec: 100, drainTimeoutSec: 10, progressWindowSec: 10, minProgressKiB: 64, maxSessionSec: 50 };

describe('SessionWatch', () => {
  let expired: string[];
  let watch: SessionWatch;
  beforeEach(() => {
    vi.useFakeTimers();
    expired = [];
    watch = new SessionWatch(limits, (e) => expired.push(e.message));
  });
  afterEach(() => {
    watch.stop();
    vi.useRealTimers();
  });

  it('cuts a client that trickles a byte every 0.7 s while holding a slot, after one window', () => {
    watch.markGreeted();
    watch.holdStarted();
    let t = 0;
    while (expired.length === 0 && t < 60_000) {
      watch.waitBegin({ owed: true, holding: true });
      vi.advanceTimersByTime(700);
      t += 700;
      if (expired.length === 0) watch.waitEnd(1);
    }
    expect(expired[0]).toMatch(/bytes in 10 s .*minimum 64 KiB/);
    expect(t).toBeGreaterThanOrEqual(9_800);
    expect(t).toBeLessThanOrEqual(10_500);
  });

  it('a client that stops sending mid-upload is cut when the window ends, before the idle timeout', () => {
    watch.markGreeted();
    watch.waitBegin({ owed: true, holding: true });
    vi.advanceTimersByTime(9_000);
    expect(expired).toEqual([]);
    vi.advanceTimersByTime(1_100);
    expect(expired[0]).toMatch(/sent 0 bytes in 10 s/);
  });

  it('time the receiver spends working (merge, lock wait) never counts against the client', () => {
    watch.markGreeted();
    watch.holdStarted();
    for (let i = 0; i < 20; i++) {
      watch.waitBegin({ owed: true, holding: true });
      vi.advanceTimersByTime(100);
      watch.waitEnd(100 * 1024);
      // receiver busy for 30 s: no wait open, nothing counted
      vi.advanceTimersByTime(30_000);
    }
    expect(expired).toEqual([]);
  });

  it('waiting for `end` of a fully sent upload is not owed until the hashing grace ends', () => {
    watch.markGreeted();
    watch.waitBegin({ owed: true, holding: true, owedFrom: Date.now() + 20_000 });
    vi.advanceTimersByTime(29_000);
    expect(expired).toEqual([]);
    vi.advanceTimersByTime(1_100);
    expect(expired[0]).toMatch(/sent 0 bytes in 10 s/);
  });

  it('a fast client is left alone until the hold cap of agent time', () => {
    watch.markGreeted();
    watch.holdStarted();
    let t = 0;
    while (expired.length === 0 && t < 200_000) {
      watch.waitBegin({ owed: true, holding: true });
      vi.advanceTimersByTime(1_000);
      t += 1_000;
      if (expired.length === 0) watch.waitEnd(1024 * 1024);
    }
    expect(expired[0]).toMatch(/held its slot for 50 s/);
    expect(t).toBe(50_000);
  });

  it('idle between requests with nothing held: only the idle timeout applies', () => {
    watch.markGreeted();
    watch.waitBegin({ owed: false, holding: false });
    vi.advanceTimersByTime(99_000);
    expect(expired).toEqual([]);
    vi.advanceTimersByTime(1_100);
    expect(expired[0]).toMatch(/no data from the agent for 100 s/);
  });

  it('a process that never says hello is cut at the hello deadline, bytes or not', () => {
    let t = 0;
    while (expired.length === 0 && t < 20_000) {
      watch.waitBegin({ owed: true, holding: false });
      vi.advanceTimersByTime(500);
      t += 500;
      if (expired.length === 0) watch.waitEnd(1);
    }
    expect(expired[0]).toMatch(/no hello within 5 s/);
    expect(t).toBeLessThanOrEqual(5_500);
  });
});

describe('slot fairness rule', () => {
  const view = (held: Record<string, number>, waiting: string[]): SlotView => ({ held: new Map(Object.entries(held)), waiting: new Set(waiting), busy: new Set() });

  it('a host alone may use up to its cap; never more', () => {
    expect(mayTake('a', view({ a: 1 }, []), 2)).toBe(true);
    expect(mayTake('a', view({ a: 2 }, []), 2)).toBe(false);
  });

  it('while another host waits, a free slot goes to whoever holds fewer', () => {
    expect(mayTake('a', view({ a: 1 }, ['b']), 4)).toBe(false);
    expect(mayTake('b', view({ a: 1 }, ['a', 'b']), 4)).toBe(true);
    // ties race; waiters of the same identity do not block each other
    expect(mayTake('a', view({ a: 1, b: 1 }, ['b']), 4)).toBe(true);
    expect(mayTake('a', view({ a: 1 }, ['a']), 4)).toBe(true);
  });

  it('default per-host cap is half the slots, rounded up', () => {
    expect([1, 2, 3, 4, 5, 8].map(defaultMaxPerHost)).toEqual([1, 1, 2, 2, 3, 4]);
  });
});
