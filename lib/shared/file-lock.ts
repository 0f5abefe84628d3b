/**
 * Crash-safe exclusive file locks. Node has no flock(2), so the lock is held by a child
 * `flock` process whose command waits on our stdin: when we release (or die, even by SIGKILL) the pipe
 * closes, the child exits and the kernel drops the lock. No stale lock files to clean up after a crash.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { ErrorCodes, OnestorError, type ErrorContext } from './errors.js';

export interface FileLock {
  readonly path: string;
  release(): Promise<void>;
}

export interface LockOptions {
  /** Seconds to wait; 0 = try once. */
  timeoutSec: number;
  flockPath?: string;
  signal?: AbortSignal;
  context?: ErrorContext;
}

const ACQUIRED = 'L';

/** Acquires an exclusive lock on `path` (created if missing). Rejects with E_LOCK_TIMEOUT when not acquired in time. */
export function acquireFileLock(path: string, opts: LockOptions): Promise<FileLock> {
  const flock = opts.flockPath ?? 'flock';
  const waitArgs = opts.timeoutSec > 0 ? ['-w', String(opts.timeoutSec)] : ['-n'];
  // -o: the lock fd is not inherited by sh; flock itself keeps it until sh exits (our stdin closes).
  const child = spawn(flock, [...waitArgs, '-o', path, '-c', `echo ${ACQUIRED}; read _`], {
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, LC_ALL: 'C' },
  });
  return new Promise<FileLock>((resolve, reject) => {
    let settled = false;
    let stderr = '';
    let stdout = '';
    const onAbort = () => {
      child.kill('SIGKILL');
      finish(new OnestorError(ErrorCodes.ABORTED, `aborted while waiting for lock ${path}`, { ...opts.context, file: path }));
    };
    const finish = (err: Error | null) => {
      if (settled) return;
      settled = true;
      opts.signal?.removeEventListener('abort', onAbort);
      if (err) {
        child.stdin?.destroy();
        reject(err);
      } else {
        resolve(makeLock(path, child));
      }
    };
    if (opts.signal?.aborted) {
      onAbort();
      return;
    }
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (d: string) => {
      stdout += d;
      if (stdout.startsWith(ACQUIRED)) finish(null);
    });
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (d: string) => {
      stderr += d;
    });
    // A write to the pipe after the child died must not crash us.
    child.stdin!.on('error', () => {});
    child.on('error', (e) =>
      finish(new OnestorError(ErrorCodes.INTERNAL, `cannot run ${flock}: ${e.message}`, { ...opts.context, file: path }, { cause: e })),
    );
    child.on('exit', (code) => {
      if (code === 1 && !stderr.trim()) {
        finish(
          new OnestorError(
            ErrorCodes.LOCK_TIMEOUT,
            `lock ${path} still held by another session after ${opts.timeoutSec} s`,
            { ...opts.context, file: path },
          ),
        );
      } else {
        finish(new OnestorError(ErrorCodes.INTERNAL, `flock exited ${code}: ${stderr.trim()}`, { ...opts.context, file: path }));
      }
    });
  });
}

function makeLock(path: string, child: ChildProcess): FileLock {
  let released: Promise<void> | null = null;
  // The lock must not keep the event loop alive on its own.
  child.unref();
  (child.stdout as unknown as { unref?: () => void })?.unref?.();
  (child.stderr as unknown as { unref?: () => void })?.unref?.();
  return {
    path,
    release() {
      if (!released) {
        released = new Promise<void>((resolve) => {
          if (child.exitCode !== null || child.signalCode !== null) return resolve();
          // Someone is now waiting on the child: it must keep the process alive until it is gone.
          child.ref();
          child.once('exit', () => resolve());
          child.stdin!.end();
        });
      }
      return released;
    },
  };
}
