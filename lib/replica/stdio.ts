/**
 * The receiver's stdout (the protocol) and stderr (logs) as NON-BLOCKING streams. Node writes to a pipe
 * synchronously through process.stdout/stderr on Linux: an agent that stops reading fills sshd's window,
 * then the pipe, and the next write blocks the whole event loop, so no timer (drain timeout, session
 * limits) could ever end the session. A socket on the same fd is asynchronous: write() reports
 * backpressure and destroy() gives up.
 */
import { spawn } from 'node:child_process';
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

/**
 * What the receiver reads the protocol from: chunks that are LENT — each is valid until the next `next()`
 * of the iterator; whatever the reader keeps, it copies. A Node Readable fits (its chunks are never reused).
 */
export interface LentChunks extends AsyncIterable<Buffer> {
  /** Ends the input: the pending or next `next()` rejects with `err` (or ends when none is given). */
  destroy(err?: Error): void;
}

/** What the receiver asks for the pipe sshd feeds it through: Linux's default pipe-max-size (unprivileged). */
export const STDIN_PIPE_BYTES = 1 << 20;
const F_SETPIPE_SZ = 1031;

/**
 * Widens the pipe sshd writes the session's input into, from 64 KiB to `bytes`. sshd hands on at most a
 * pipe's capacity per loop; whenever its channel buffer holds most of the SSH window (2 MiB; it fills as
 * soon as the receiver pauses, as it does at the start of a session's first upload), every 64 KiB it
 * hands on costs it a compaction of that buffer: sshd at 100 % CPU in memmove and page faults for ~1 s per
 * session on a 2-vCPU VM (perf), the upload at ~3 MB/s meanwhile. Node has no fcntl, so perl does it on
 * the inherited fd 0 (perl-base is Essential in Debian). Best effort: false (and the default size) when
 * perl is missing, fd 0 is not a pipe, or the size is above pipe-max-size or the user's pipe quota.
 */
export function widenStdinPipe(bytes = STDIN_PIPE_BYTES): Promise<boolean> {
  return new Promise((resolve) => {
    try {
      const child = spawn('perl', ['-e', `exit(fcntl(STDIN, ${F_SETPIPE_SZ}, 0 + $ARGV[0]) ? 0 : 1)`, String(bytes)], { stdio: ['inherit', 'ignore', 'ignore'] });
      child.on('error', () => resolve(false));
      child.on('exit', (code) => resolve(code === 0));
    } catch {
      resolve(false);
    }
  });
}

/** Read size of lentStdin: a pipe delivers at most its capacity (64 KiB by default) per read anyway. */
export const STDIN_READ_BYTES = 256 * 1024;
/** Buffers lentStdin reads into: while the consumer works on one chunk, up to this many - 2 more are read. */
export const STDIN_BUFFERS = 4;

/**
 * fd 0 read into a small fixed pool of buffers, reused for every read. Node's stream would allocate a fresh
 * buffer per read (16 384 per GiB through a pipe); that external memory makes V8 run a full GC every few
 * dozen MiB, which measured 0.65 CPU-s per GiB received, a fifth of the receiver's CPU. A chunk is lent
 * until the consumer asks for the next one; meanwhile reading goes on into the other buffers (so sshd is
 * not left waiting on a full pipe while the receiver works), and stops only when none is free.
 * Falls back to process.stdin where fd 0 is not a pipe or socket (a file, a tty).
 */
export function lentStdin(readBytes = STDIN_READ_BYTES, buffers = STDIN_BUFFERS): LentChunks {
  const free: Buffer[] = Array.from({ length: Math.max(2, buffers) }, () => Buffer.allocUnsafeSlow(readBytes));
  // One buffer is always the read target, neither lent nor queued: Node reads the next chunk into it.
  let target = free.pop()!;
  const queued: Array<{ chunk: Buffer; owner: Buffer }> = [];
  let lent: Buffer | null = null;
  let paused = false;
  let waiter: { resolve: (r: IteratorResult<Buffer>) => void; reject: (e: Error) => void } | null = null;
  let ended = false;
  let failure: Error | null = null;
  let socket: net.Socket;
  try {
    // `onread` is honoured by the constructor (net.connect passes its options through it) but typed on
    // connect's options only. Node calls `buffer()` after every read for the buffer of the next one.
    const options: net.SocketConstructorOpts & { onread: net.OnReadOpts } = {
      fd: 0,
      readable: true,
      writable: false,
      onread: {
        buffer: () => target,
        callback: (n: number, filled: Uint8Array) => {
          const owner = filled as Buffer;
          // never empty while reading is on (it stops when the last free buffer becomes the target); a
          // read Node starts on its own meanwhile gets a new buffer rather than one that is lent
          target = free.pop() ?? Buffer.allocUnsafeSlow(readBytes);
          const chunk = owner.subarray(0, n);
          if (waiter) {
            const w = waiter;
            waiter = null;
            lent = owner;
            w.resolve({ value: chunk, done: false });
          } else {
            queued.push({ chunk, owner });
          }
          paused = free.length === 0;
          return !paused;
        },
      },
    };
    socket = new net.Socket(options);
  } catch {
    return process.stdin;
  }
  const finish = (err: Error | null) => {
    if (ended) return;
    ended = true;
    failure = err;
    const w = waiter;
    waiter = null;
    if (w) {
      if (err) w.reject(err);
      else w.resolve({ value: undefined, done: true });
    }
  };
  socket.on('end', () => finish(null));
  socket.on('error', (e: Error) => finish(e));
  socket.on('close', () => finish(null));
  // flowing, so that EOF is reported as 'end' (data never goes through the stream's buffer)
  socket.resume();
  const next = (): Promise<IteratorResult<Buffer>> => {
    if (lent) {
      // the chunk lent by the previous next() is given back
      free.push(lent);
      lent = null;
      if (paused && !ended) {
        paused = false;
        socket.resume();
      }
    }
    // an error (a session limit, a broken pipe) ends the input at once; a clean end after what was read
    if (failure) return Promise.reject(failure);
    const q = queued.shift();
    if (q) {
      lent = q.owner;
      return Promise.resolve({ value: q.chunk, done: false });
    }
    if (ended) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => {
      waiter = { resolve, reject };
    });
  };
  return {
    [Symbol.asyncIterator]: () => ({
      next,
      return: () => {
        socket.destroy();
        return Promise.resolve({ value: undefined, done: true });
      },
    }),
    destroy: (err?: Error) => {
      // the error first: 'close' after destroy() would otherwise end the iteration as a clean EOF
      if (err) finish(err);
      socket.destroy();
    },
  };
}
