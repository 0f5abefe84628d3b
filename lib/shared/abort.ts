/**
 * Waits that end when an AbortSignal fires. Whoever aborts may give the reason as an OnestorError (the
 * pull-mode seed's watchdog gives E_YIELDED or E_NOSPACE): the wait then fails with exactly that error;
 * any other reason (a plain abort(): SIGTERM, a deadline) becomes E_ABORTED with the caller's wording.
 */
import { ErrorCodes, OnestorError } from './errors.js';

/** The error a wait ended by `signal` fails with. */
export function abortError(signal: AbortSignal | undefined, what: string): OnestorError {
  const r: unknown = signal?.reason;
  return r instanceof OnestorError ? r : new OnestorError(ErrorCodes.ABORTED, what);
}

/** Throws abortError() when the signal has fired. */
export function throwIfAborted(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted) throw abortError(signal, what);
}

/**
 * Settles as `p` does, or rejects with abortError() as soon as the signal fires (`p` is left to settle on
 * its own; its rejection is then ignored).
 */
export function raceAbort<T>(p: Promise<T>, signal: AbortSignal | undefined, what: string): Promise<T> {
  if (!signal) return p;
  p.catch(() => {});
  if (signal.aborted) return Promise.reject(abortError(signal, what));
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(abortError(signal, what));
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e as Error);
      },
    );
  });
}

/** setTimeout as a promise that rejects with abortError() when the signal fires first. */
export function sleepAbortable(ms: number, signal: AbortSignal | undefined, what: string): Promise<void> {
  if (signal?.aborted) return Promise.reject(abortError(signal, what));
  return new Promise<void>((resolve, reject) => {
    const onAbort = () => {
      clearTimeout(t);
      reject(abortError(signal, what));
    };
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * One signal that fires when any of `signals` does, with the first one's reason (Node 18 has no
 * AbortSignal.any). dispose() detaches it from its sources (a long-lived source must not collect listeners).
 */
export function anySignal(signals: ReadonlyArray<AbortSignal | undefined>): { signal: AbortSignal; dispose(): void } {
  const c = new AbortController();
  const detach: Array<() => void> = [];
  const dispose = () => detach.splice(0).forEach((d) => d());
  for (const s of signals) {
    if (!s) continue;
    if (s.aborted) {
      c.abort(s.reason);
      break;
    }
    const on = () => {
      c.abort(s.reason);
      dispose();
    };
    s.addEventListener('abort', on, { once: true });
    detach.push(() => s.removeEventListener('abort', on));
  }
  if (c.signal.aborted) dispose();
  return { signal: c.signal, dispose };
}
