/**
 * sd_notify(3) for a Type=notify unit: READY=1, WATCHDOG=1, STOPPING=1, RELOADING=1, STATUS=...
 *
 * Node has no AF_UNIX datagram sockets, and NOTIFY_SOCKET is one. How we send, and why:
 *
 * 1. Preferred: the `node-unix-socket` package (N-API, prebuilt for linux x64/arm64 glibc/musl, so
 *    nothing compiles on the hypervisor and one binary serves Node 18 and 20). The datagram leaves the
 *    MAIN process, so systemd attributes it without any race and NotifyAccess=main would do.
 *    Rejected alternatives: `sd-notify` (links libsystemd: needs libsystemd-dev and a compiler on every
 *    host), `unix-dgram` (nan addon compiled by node-gyp at install: a toolchain on every hypervisor),
 *    python3/socat helpers (not guaranteed on a host).
 * 2. Fallback when the package cannot be loaded (unusual platform, or NOTIFY_SOCKET is an abstract
 *    `@name`, which the package does not address): spawn `systemd-notify`, present wherever systemd is.
 *    The sender is then a child, so the unit needs NotifyAccess=all; the classic race (systemd looking
 *    up the cgroup of an already exited sender) is closed since systemd 246, where systemd-notify waits
 *    on a BARRIER=1 round trip before exiting. Costs a fork per message (every WatchdogSec/2).
 *
 * Without NOTIFY_SOCKET (not under systemd, tests, CLI) every call is a no-op.
 */
import { createRequire } from 'node:module';
import { run } from '../shared/exec.js';
import { ErrorCodes, OnestorError } from '../shared/errors.js';

export interface NotifyTransport {
  readonly name: string;
  send(socketPath: string, message: string): Promise<void>;
  close(): void;
}

interface DgramSocketLike {
  sendTo(buf: Buffer, offset: number, length: number, destPath: string, cb?: (err: Error | undefined) => void): void;
  close(): void;
  on(event: 'error', fn: (e: Error) => void): unknown;
}

/** The native datagram transport, or null when the package is not installed / not loadable here. */
export function addonTransport(): NotifyTransport | null {
  let DgramSocket: new () => DgramSocketLike;
  try {
    const require = createRequire(import.meta.url);
    // resolved at run time on purpose: the agent still runs (through the fallback) without it
    const mod = require('node-unix-socket') as { DgramSocket: new () => DgramSocketLike };
    DgramSocket = mod.DgramSocket;
  } catch {
    return null;
  }
  let sock: DgramSocketLike | null = null;
  return {
    name: 'node-unix-socket',
    send(socketPath, message) {
      if (socketPath.startsWith('@')) return Promise.reject(new OnestorError(ErrorCodes.INTERNAL, 'abstract NOTIFY_SOCKET is not supported by node-unix-socket'));
      if (!sock) {
        sock = new DgramSocket();
        sock.on('error', () => {}); // send errors arrive through the callback
      }
      const s = sock;
      const buf = Buffer.from(message, 'utf8');
      return new Promise((resolve, reject) => s.sendTo(buf, 0, buf.length, socketPath, (err) => (err ? reject(err) : resolve())));
    },
    close() {
      sock?.close();
      sock = null;
    },
  };
}

/** Spawns systemd-notify per message (needs NotifyAccess=all in the unit). */
export function systemdNotifyTransport(bin = 'systemd-notify', timeoutMs = 5000): NotifyTransport {
  return {
    name: 'systemd-notify',
    async send(socketPath, message) {
      const r = await run(bin, message.split('\n'), { env: { NOTIFY_SOCKET: socketPath }, timeoutMs });
      if (r.code !== 0) throw new OnestorError(ErrorCodes.INTERNAL, `${bin} exited ${r.code}: ${r.stderr.trim()}`);
    },
    close() {},
  };
}

/** Pure: the watchdog ping interval (ms) from the environment, or null when no watchdog is asked of us. */
export function watchdogIntervalMs(env: NodeJS.ProcessEnv, pid: number): number | null {
  const usecText = env['WATCHDOG_USEC'];
  if (!usecText || !/^\d+$/.test(usecText)) return null;
  const usec = Number(usecText);
  if (!(usec > 0)) return null;
  const wpid = env['WATCHDOG_PID'];
  // the watchdog is meant for another process (we were forked from the main one)
  if (wpid !== undefined && wpid !== '' && Number(wpid) !== pid) return null;
  // systemd's advice: ping at half the timeout
  return Math.max(1, usec / 2 / 1000);
}

export interface SdNotifyOptions {
  env?: NodeJS.ProcessEnv;
  pid?: number;
  /** default: the addon when loadable, else systemd-notify */
  transport?: NotifyTransport;
  /** where send failures go (they must never crash the daemon) */
  onError?: (e: unknown, message: string) => void;
}

export class SdNotify {
  readonly socketPath: string | null;
  readonly transport: NotifyTransport | null;
  readonly watchdogMs: number | null;
  private readonly onError: (e: unknown, message: string) => void;
  private watchdogTimer: NodeJS.Timeout | null = null;
  private pingInFlight = false;

  constructor(opts: SdNotifyOptions = {}) {
    const env = opts.env ?? process.env;
    const sp = env['NOTIFY_SOCKET'];
    this.socketPath = sp ? sp : null;
    this.onError = opts.onError ?? (() => {});
    if (!this.socketPath) {
      this.transport = null;
      this.watchdogMs = null;
      return;
    }
    const preferred = opts.transport ?? (this.socketPath.startsWith('@') ? null : addonTransport());
    this.transport = preferred ?? systemdNotifyTransport();
    this.watchdogMs = watchdogIntervalMs(env, opts.pid ?? process.pid);
  }

  get enabled(): boolean {
    return this.transport !== null;
  }

  /** Sends one state string (lines KEY=VALUE); never rejects. */
  async notify(state: string): Promise<void> {
    if (!this.transport || !this.socketPath) return;
    try {
      await this.transport.send(this.socketPath, state);
    } catch (e) {
      this.onError(e, state);
    }
  }

  ready(status?: string): Promise<void> {
    return this.notify(status ? `READY=1\nSTATUS=${oneLine(status)}` : 'READY=1');
  }

  reloading(): Promise<void> {
    return this.notify('RELOADING=1');
  }

  stopping(status?: string): Promise<void> {
    return this.notify(status ? `STOPPING=1\nSTATUS=${oneLine(status)}` : 'STOPPING=1');
  }

  status(text: string): Promise<void> {
    return this.notify(`STATUS=${oneLine(text)}`);
  }

  watchdog(): Promise<void> {
    return this.notify('WATCHDOG=1');
  }

  /**
   * Pings every WATCHDOG_USEC/2 while `healthy()` says so (e.g. the scheduling loop has run lately),
   * so a wedged daemon is restarted by systemd. Returns a stop function. The timer does not keep the
   * process alive.
   */
  startWatchdog(healthy: () => boolean = () => true): () => void {
    if (!this.enabled || this.watchdogMs === null || this.watchdogTimer) return () => this.stopWatchdog();
    this.watchdogTimer = setInterval(() => {
      if (this.pingInFlight || !healthy()) return;
      this.pingInFlight = true;
      void this.watchdog().finally(() => (this.pingInFlight = false));
    }, this.watchdogMs);
    this.watchdogTimer.unref();
    return () => this.stopWatchdog();
  }

  stopWatchdog(): void {
    if (this.watchdogTimer) clearInterval(this.watchdogTimer);
    this.watchdogTimer = null;
  }

  close(): void {
    this.stopWatchdog();
    this.transport?.close();
  }
}

function oneLine(s: string): string {
  return s.replace(/[\r\n]+/g, ' ');
}
