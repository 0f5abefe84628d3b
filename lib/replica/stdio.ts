/**
 * The receiver's stdout (the protocol) and stderr (logs) as NON-BLOCKING streams. Node writes to a pipe
 * synchronously through process.stdout/stderr on Linux: an agent that stops reading fills sshd's window,
 * then the pipe, and the next write blocks the whole event loop, so no timer (drain timeout, session
 * limits) could ever end the session. A socket on the same fd is asynchronous: write() reports
 * backpressure and destroy() gives up.
 */
import net from 'node:net';
import type { Writable } from 'node:stream';

/** A non-blocking writable on fd 1 or 2 when it is a pipe or socket; the process stream otherwise (files, ttys). */
export function nonBlockingFd(fd: 1 | 2): Writable {
  const fallback = fd === 1 ? process.stdout : process.stderr;
  try {
    const s = new net.Socket({ fd, readable: false, writable: true });
    // a peer gone away must end the session through the protocol code, not crash the process
    s.on('error', () => {});
    return s;
  } catch {
    return fallback;
  }
}

/** Log lines beyond this much unsent stderr are dropped (an agent that does not read must not grow our memory). */
const MAX_LOG_BACKLOG = 256 * 1024;

/** A line sink over a non-blocking stderr that drops lines instead of blocking or buffering without bound. */
export function droppingLogSink(): { write(line: string): boolean } {
  const err = nonBlockingFd(2);
  let dropped = 0;
  return {
    write(line: string): boolean {
      if (err.destroyed || !err.writable) return true;
      if (err.writableLength > MAX_LOG_BACKLOG) {
        dropped++;
        return true;
      }
      if (dropped > 0) {
        err.write(JSON.stringify({ time: Date.now(), pid: process.pid, msg: `${dropped} log lines dropped (stderr not read)` }) + '\n');
        dropped = 0;
      }
      err.write(line);
      return true;
    },
  };
}
