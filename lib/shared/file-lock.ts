/**
 * Crash-safe exclusive file locks. Node has no flock(2), so the lock is held by a child shell that
 * opens the file on fd 9, `flock`s that fd and waits on our stdin: when we release (or die, even by
 * SIGKILL) the pipe closes, the child exits and the kernel drops the lock.
 *
 * Lock files may be removed (FileLock.remove), which is only safe because every acquirer checks, once it
 * holds the lock, that the path still names the inode it locked, and starts over if not. Without that
 * check: A holds inode I, B waits on I, A unlinks and releases, C creates J — B (on I) and C (on J) would
 * both "hold" the lock.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { unlink } from 'node:fs/promises';
import { ErrorCodes, OnestorError, type ErrorContext } from './errors.js';

export interface FileLock {
  readonly path: string;
  release(): Promise<void>;
  /** Unlinks the lock file while still holding it, then releases (waiters notice and retry on a new file). */
  remove(): Promise<void>;
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
  const waitArgs = opts.timeoutSec > 0 ? `-w ${Number(opts.timeoutSec)}` : '-n';
  // fd 9 stays open in sh (and so locked) until sh exits, i.e. until our stdin closes. `[ A -ef B ]`
  // compares device and inode: a lock on a file that was unlinked (or replaced) meanwhile is worthless,
  // so close it and lock whatever the path names now. Each attempt waits up to the timeout.
  const script = `while :; do exec 9>>"$1"; "$2" ${waitArgs} 9 || exit $?; [ /proc/self/fd/9 -ef "$1" ] && break; exec 9>&-; done; echo ${ACQUIRED}; read _`;
  const child = spawn('sh', ['-c', script, 'sh', path, flock], {
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
  const lock: FileLock = {
    path,
    async remove() {
      if (!released) {
        // We hold it, so nobody else can be removing or replacing it right now.
        await unlink(path).catch((e: NodeJS.ErrnoException) => {
          if (e.code !== 'ENOENT') throw e;
        });
      }
      await lock.release();
    },
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
  return lock;
}

/**
 * Many try-once locks taken one after another through ONE child shell (the orphan sweep visits thousands
 * of disks; a child per lock cost ~30 ms each on a loaded 2-core machine). Same file-lock semantics as
 * acquireFileLock: fd 9 locked with `flock -n`, the path checked to still name the locked inode, the file
 * removable only while held. One lock at a time: release (or remove) it before asking for the next.
 * If we die, the shell's stdin closes and the lock goes with it.
 */
export interface BatchLocker {
  /** The lock, or null when someone else holds it (or it cannot be opened). */
  tryLock(path: string): Promise<FileLock | null>;
  close(): Promise<void>;
}

export function openBatchLocker(flockPath = 'flock'): BatchLocker {
  // Replies: L (held; then waits for a line and answers D once the fd is closed), B (busy), E (cannot open).
  // `( : >> p )` first: a failed `exec 9>>p` would end the shell (special built-in).
  const script =
    'while IFS= read -r p; do ' +
    'if ! ( : >>"$p" ) 2>/dev/null; then echo E; continue; fi; ' +
    'exec 9>>"$p"; ' +
    'if "$1" -n 9 && [ /proc/self/fd/9 -ef "$p" ]; then echo L; IFS= read -r _; exec 9>&-; echo D; ' +
    'else exec 9>&-; echo B; fi; done';
  const child = spawn('sh', ['-c', script, 'sh', flockPath], { stdio: ['pipe', 'pipe', 'ignore'], env: { ...process.env, LC_ALL: 'C' } });
  child.stdin!.on('error', () => {});
  let buf = '';
  const waiters: Array<(line: string | null) => void> = [];
  const lines: string[] = [];
  let ended = false;
  const deliver = () => {
    while (waiters.length && (lines.length || ended)) waiters.shift()!(lines.length ? lines.shift()! : null);
  };
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (d: string) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      lines.push(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
    deliver();
  });
  child.on('close', () => {
    ended = true;
    deliver();
  });
  const nextLine = () => new Promise<string | null>((resolve) => {
    waiters.push(resolve);
    deliver();
  });
  const ask = async (line: string): Promise<string> => {
    if (ended) throw new OnestorError(ErrorCodes.INTERNAL, 'lock helper ended');
    child.stdin!.write(`${line}\n`);
    const r = await nextLine();
    if (r === null) throw new OnestorError(ErrorCodes.INTERNAL, 'lock helper ended');
    return r;
  };
  let busy = false;
  return {
    async tryLock(path: string): Promise<FileLock | null> {
      if (busy) throw new OnestorError(ErrorCodes.INTERNAL, 'batch locker: release the previous lock first', { file: path });
      if (/\n/.test(path)) throw new OnestorError(ErrorCodes.INTERNAL, 'lock path with a newline', { file: path });
      const r = await ask(path);
      if (r !== 'L') return null;
      busy = true;
      let done: Promise<void> | null = null;
      const release = () => {
        if (!done) {
          done = ask('release').then(
            () => {
              busy = false;
            },
            (e) => {
              busy = false;
              throw e;
            },
          );
        }
        return done;
      };
      return {
        path,
        release,
        async remove() {
          // still held (the shell keeps fd 9 open until it reads our next line)
          if (!done) await unlink(path).catch((e: NodeJS.ErrnoException) => {
            if (e.code !== 'ENOENT') throw e;
          });
          await release();
        },
      };
    },
    async close(): Promise<void> {
      if (ended) return;
      const closed = new Promise<void>((r) => child.once('close', () => r()));
      child.stdin!.end();
      await closed;
    },
  };
}
