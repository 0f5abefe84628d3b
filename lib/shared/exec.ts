/**
 * The one place that spawns external programs (virsh, qemu-img, ...). Always execFile (no shell),
 * LC_ALL=C so output parsing is locale-independent, a timeout, and an AbortSignal so a SIGTERM of
 * the daemon stops children too.
 */
import { execFile } from 'node:child_process';

export interface ExecResult {
  stdout: string;
  stderr: string;
  code: number;
}

export interface ExecOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
  input?: string;
  env?: Record<string, string>;
  /** Max bytes of stdout/stderr kept (default 64 MiB). */
  maxBuffer?: number;
}

/** Runs a program and resolves with its output and exit code; never rejects on a non-zero exit. */
export function run(file: string, args: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      file,
      args as string[],
      {
        env: { ...process.env, LC_ALL: 'C', LANG: 'C', ...opts.env },
        timeout: opts.timeoutMs ?? 0,
        killSignal: 'SIGKILL',
        maxBuffer: opts.maxBuffer ?? 64 * 1024 * 1024,
        signal: opts.signal,
        encoding: 'utf8',
      },
      (err, stdout, stderr) => {
        if (err && typeof (err as NodeJS.ErrnoException).code === 'string' && (err as NodeJS.ErrnoException).code !== 'ABORT_ERR') {
          // spawn failure (ENOENT, EACCES): the program is not there at all
          if ((err as NodeJS.ErrnoException).code === 'ENOENT' || (err as NodeJS.ErrnoException).code === 'EACCES') {
            reject(err);
            return;
          }
        }
        if (err && (err as NodeJS.ErrnoException).code === 'ABORT_ERR') {
          reject(err);
          return;
        }
        const anyErr = err as (Error & { code?: unknown; killed?: boolean; signal?: string }) | null;
        let code = 0;
        if (anyErr) {
          if (typeof anyErr.code === 'number') code = anyErr.code;
          else if (anyErr.killed || anyErr.signal) code = 124;
          else code = 1;
        }
        resolve({ stdout: String(stdout), stderr: String(stderr), code });
      },
    );
    if (opts.input !== undefined) {
      child.stdin?.end(opts.input);
    }
  });
}
