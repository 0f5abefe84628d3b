/**
 * Time limits of one receiver session, so that no client can hold a slot or a disk lock for ever.
 * Only time the receiver spends WAITING FOR THE AGENT counts; time it spends working (hashing, a merge,
 * a lock or slot wait) is never the client's fault. Limits:
 *  - hello: the first frames must arrive within helloTimeoutSec of the process start;
 *  - idle: nothing at all from the agent for idleTimeoutSec ends the session (any state);
 *  - progress: while the session holds a slot (a disk is open) or the agent is in the middle of a frame,
 *    every progressWindowSec of waiting must bring at least minProgressBytes, so a trickle (a byte every
 *    0.7 s re-arms any idle timer) is cut after one window;
 *  - hold cap: at most maxSessionSec of waiting on the agent while holding a slot (per open..close);
 *  - drain (enforced in send()): a reply the agent does not read within drainTimeoutSec ends the session.
 * The clock is injectable for unit tests.
 */
import { RECEIVER_DEFAULTS } from '../shared/defaults.js';
import { ErrorCodes, OnestorError } from '../shared/errors.js';

export interface SessionLimits {
  helloTimeoutSec: number;
  idleTimeoutSec: number;
  drainTimeoutSec: number;
  progressWindowSec: number;
  minProgressKiB: number;
  maxSessionSec: number;
}

/**
 * Defaults (README "Receiver limits"). maxSessionSec bounds the agent's own transfer time only: a first
 * seed sends the image and base.1 (each at most the disk size), so 24 h covers a 4 TB disk at 100 MB/s,
 * and is above twice the agent's own per-transfer timeout (limits.transferTimeoutSec, 6 h).
 */
/** from lib/shared/defaults.ts, the one place the config schema also takes them from */
export const DEFAULT_SESSION_LIMITS: SessionLimits = {
  helloTimeoutSec: RECEIVER_DEFAULTS.helloTimeoutSec,
  idleTimeoutSec: RECEIVER_DEFAULTS.idleTimeoutSec,
  drainTimeoutSec: RECEIVER_DEFAULTS.drainTimeoutSec,
  progressWindowSec: RECEIVER_DEFAULTS.progressWindowSec,
  minProgressKiB: RECEIVER_DEFAULTS.minProgressKiB,
  maxSessionSec: RECEIVER_DEFAULTS.maxSessionSec,
};

export interface WaitState {
  /** the agent owes progress: a slot is held or a frame is half-received */
  owed: boolean;
  /** progress is owed only from this time on (epoch ms): the agent is hashing a file it has fully sent */
  owedFrom?: number;
  /** a slot is held (hold cap runs) */
  holding: boolean;
}

export class SessionWatch {
  private readonly startedAt: number;
  private greeted = false;
  /** since: accounting cursor; start: when this wait began (idle is measured from it) */
  private wait: (WaitState & { since: number; start: number }) | null = null;
  private windowMs = 0;
  private windowBytes = 0;
  private holdMs = 0;
  private timer: NodeJS.Timeout | null = null;
  /** when the armed timer fires (epoch ms) */
  private timerDue = 0;
  private expired = false;

  constructor(
    private readonly limits: SessionLimits,
    private readonly onExpire: (err: OnestorError) => void,
    private readonly now: () => number = Date.now,
  ) {
    this.startedAt = now();
  }

  markGreeted(): void {
    this.greeted = true;
  }

  /** A slot was just taken: the hold cap starts from zero. */
  holdStarted(): void {
    this.holdMs = 0;
  }

  /** The receiver starts waiting for the agent. */
  waitBegin(state: WaitState): void {
    if (this.expired) return;
    const t = this.now();
    this.wait = { owed: state.owed, holding: state.holding, owedFrom: state.owedFrom, since: t, start: t };
    this.schedule();
  }

  /**
   * Input arrived (or the wait ended otherwise): account the wait, enforce the limits. The timer stays
   * armed: a transfer begins and ends a wait per chunk read (thousands per second), and a timer that fires
   * while no wait is on does nothing; one that fires early in the next wait accounts it and re-arms.
   */
  waitEnd(bytes: number): void {
    this.account(bytes);
    this.wait = null;
  }

  stop(): void {
    this.clearTimer();
    this.wait = null;
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  /** Adds the time waited so far (and the bytes that ended it) to the counters; expires when over a limit. */
  private account(bytes: number): void {
    const w = this.wait;
    if (!w || this.expired) return;
    const t = this.now();
    const elapsed = t - w.since;
    const owedElapsed = Math.max(0, t - Math.max(w.since, w.owedFrom ?? 0));
    w.since = t;
    if (w.owed) {
      this.windowMs += owedElapsed;
      this.windowBytes += bytes;
    }
    if (w.holding) this.holdMs += elapsed;
    const L = this.limits;
    if (!this.greeted && t - this.startedAt >= L.helloTimeoutSec * 1000) {
      return this.expire(`no hello within ${L.helloTimeoutSec} s`);
    }
    if (bytes === 0 && t - w.start >= L.idleTimeoutSec * 1000) {
      return this.expire(`no data from the agent for ${L.idleTimeoutSec} s`);
    }
    if (w.holding && this.holdMs >= L.maxSessionSec * 1000) {
      return this.expire(`session held its slot for ${L.maxSessionSec} s of agent time (receiver.maxSessionSec)`);
    }
    if (this.windowMs >= L.progressWindowSec * 1000) {
      if (this.windowBytes < L.minProgressKiB * 1024) {
        return this.expire(
          `agent sent ${this.windowBytes} bytes in ${L.progressWindowSec} s while holding a slot or mid-frame ` +
            `(minimum ${L.minProgressKiB} KiB per window)`,
        );
      }
      this.windowMs = 0;
      this.windowBytes = 0;
    }
  }

  private expire(why: string): void {
    this.expired = true;
    this.clearTimer();
    this.onExpire(new OnestorError(ErrorCodes.ABORTED, `${why}; ending session`));
  }

  /**
   * One timer at the nearest limit of the current wait. An armed timer due no later is kept (re-arming a
   * timer per chunk cost a tenth of the receiver's CPU in a transfer); when it fires the current wait, if
   * any, is accounted and the timer armed again at its next limit.
   */
  private schedule(): void {
    const w = this.wait;
    if (!w || this.expired) return this.clearTimer();
    const L = this.limits;
    let at = w.start + L.idleTimeoutSec * 1000;
    if (!this.greeted) at = Math.min(at, this.startedAt + L.helloTimeoutSec * 1000);
    if (w.owed) at = Math.min(at, Math.max(w.since, w.owedFrom ?? 0) + (L.progressWindowSec * 1000 - this.windowMs));
    if (w.holding) at = Math.min(at, w.since + (L.maxSessionSec * 1000 - this.holdMs));
    if (this.timer && this.timerDue <= at) return;
    this.clearTimer();
    this.timerDue = at;
    this.timer = setTimeout(() => {
      this.timer = null;
      if (!this.wait) return;
      this.account(0);
      this.schedule();
    }, Math.max(0, at - this.now()) + 5);
  }
}
