/**
 * A few long-lived interactive `virsh` processes that answer read-only queries in ~1 ms instead of the
 * 50-70 ms a spawned virsh costs on a busy host (framing: virsh-shell-protocol.ts).
 *
 * This is only a fast path for the clean case. A query is answered from a shell when the shell printed
 * its output and nothing at all on stderr; anything else (an error, a reconnect notice, a dead or confused
 * shell, an argument the shell line cannot carry, every shell busy) returns null and the caller runs the
 * same command the one-shot way, whose exit code and message stay the single source of failure semantics.
 * Commands that change state never come here: the caller decides which commands are queries.
 *
 * Each shell answers one query at a time; a query never waits behind another (a slow `domjobinfo` of one
 * VM must not delay the others): it takes an idle shell, starts one while fewer than `maxShells` run, or
 * falls back. Shells close after `idleMs` unused, on abort, and when their stdin closes with this process.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { ShellProtocolError, VirshShellFrames, shellLine, type ShellOutput } from './virsh-shell-protocol.js';

export interface VirshShellOptions {
  virshPath: string;
  uri?: string;
  /** shells running at most (default 4) */
  maxShells?: number;
  /** a shell unused this long exits (default 60 s) */
  idleMs?: number;
  /** closes every shell (daemon shutdown) */
  signal?: AbortSignal;
}

export type ShellAnswer =
  | { kind: 'output'; stdout: string; stderr: string }
  /** no answer in time; the shell was killed (a one-shot run would have timed out the same way) */
  | { kind: 'timeout' }
  /** the shell died or printed something unexpected after the command was written: it may have run */
  | { kind: 'lost'; why: string };

export interface VirshShellStats {
  /** queries answered by a shell (clean or not) */
  answered: number;
  /** queries handed back to the caller for a one-shot run */
  declined: number;
  shellsStarted: number;
  /** shells dropped for an unexpected byte; three of them switch the fast path off */
  protocolErrors: number;
}

// readline must not rewrite what it echoes: no wrapping (COLUMNS), no terminal features (TERM), and no
// key bindings or settings from /etc/inputrc or ~/.inputrc (INPUTRC)
const SHELL_ENV = { LC_ALL: 'C', LANG: 'C', TERM: 'dumb', COLUMNS: '1000000', INPUTRC: '/dev/null' };
const START_TIMEOUT_MS = 10_000;
/** After a shell failed to start, this long without trying again (libvirtd down, virsh missing). */
const START_BACKOFF_MS = 10_000;
const MAX_PROTOCOL_ERRORS = 3;

/** Why a shell stopped answering; never leaves this module (the caller gets null or 'lost'). */
class ShellGone extends Error {
  override readonly name = 'ShellGone';
}

const newToken = (): string => `OSTK${randomBytes(12).toString('hex')}`;

class Shell {
  readonly child: ChildProcessWithoutNullStreams;
  readonly frames = new VirshShellFrames();
  busy = false;
  dead = false;
  private idleTimer: NodeJS.Timeout | null = null;
  private waiter: ((r: ShellOutput | Error) => void) | null = null;
  private startWaiter: ((e: Error | null) => void) | null = null;
  private exitError: Error | null = null;

  constructor(opts: VirshShellOptions, private readonly onGone: (s: Shell) => void) {
    this.child = spawn(opts.virshPath, opts.uri ? ['-c', opts.uri] : [], {
      env: { ...process.env, ...SHELL_ENV },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    this.child.stdout.setEncoding('utf8');
    this.child.stderr.setEncoding('utf8');
    this.child.stdout.on('data', (d: string) => this.feed(() => this.frames.stdout(d)));
    this.child.stderr.on('data', (d: string) => this.feed(() => this.frames.stderr(d)));
    this.child.stdin.on('error', () => this.fail(new ShellGone('virsh shell stdin closed')));
    this.child.on('error', (e) => this.fail(e));
    this.child.on('exit', (code, sig) => this.fail(new ShellGone(`virsh shell exited (${sig ?? code})`)));
    this.child.stdin.write(this.frames.start(newToken()));
  }

  /** Resolves once the banner and the startup marker went by; rejects if the shell cannot start. */
  started(): Promise<void> {
    if (this.frames.ready) return Promise.resolve();
    if (this.exitError) return Promise.reject(this.exitError);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => this.fail(new ShellGone(`virsh shell did not start within ${START_TIMEOUT_MS} ms`)), START_TIMEOUT_MS);
      this.startWaiter = (e) => {
        clearTimeout(timer);
        this.startWaiter = null;
        if (e) reject(e);
        else resolve();
      };
    });
  }

  /** One command; the caller holds `busy`. */
  ask(line: string, timeoutMs: number): Promise<ShellOutput | 'timeout'> {
    this.cancelIdle();
    return new Promise((resolve, reject) => {
      const timer = timeoutMs > 0 ? setTimeout(() => {
        this.waiter = null;
        this.kill();
        resolve('timeout');
      }, timeoutMs) : null;
      this.waiter = (r) => {
        if (timer) clearTimeout(timer);
        this.waiter = null;
        if (r instanceof Error) reject(r);
        else resolve(r);
      };
      this.child.stdin.write(this.frames.send(line, newToken()));
    });
  }

  idleAfter(ms: number): void {
    this.cancelIdle();
    this.idleTimer = setTimeout(() => this.kill(), ms);
    this.idleTimer.unref();
    // an idle shell must not keep this process alive
    this.child.unref();
    for (const s of [this.child.stdin, this.child.stdout, this.child.stderr] as unknown as Array<{ unref?: () => void }>) s.unref?.();
  }

  private cancelIdle(): void {
    if (this.idleTimer) clearTimeout(this.idleTimer);
    this.idleTimer = null;
    this.child.ref();
    for (const s of [this.child.stdin, this.child.stdout, this.child.stderr] as unknown as Array<{ ref?: () => void }>) s.ref?.();
  }

  kill(): void {
    if (!this.dead) this.child.kill('SIGKILL');
    this.fail(new ShellGone('virsh shell closed'));
  }

  private feed(push: () => void): void {
    try {
      push();
    } catch (e) {
      this.fail(e as Error);
      return;
    }
    if (this.startWaiter && this.frames.ready) this.startWaiter(null);
    const done = this.frames.take();
    if (done.length > 1) this.fail(new ShellProtocolError('more answers than questions'));
    else if (done[0] && this.waiter) this.waiter(done[0]);
  }

  private fail(e: Error): void {
    if (this.dead) return;
    this.dead = true;
    this.exitError = e;
    this.cancelIdleTimerOnly();
    if (!this.child.killed && this.child.exitCode === null) this.child.kill('SIGKILL');
    this.startWaiter?.(e);
    this.waiter?.(e);
    this.onGone(this);
  }

  private cancelIdleTimerOnly(): void {
    if (this.idleTimer) clearTimeout(this.idleTimer);
    this.idleTimer = null;
  }
}

export class VirshShellPool {
  private readonly shells = new Set<Shell>();
  private readonly maxShells: number;
  private readonly idleMs: number;
  private noStartUntil = 0;
  private closed = false;
  readonly stats: VirshShellStats = { answered: 0, declined: 0, shellsStarted: 0, protocolErrors: 0 };

  constructor(private readonly opts: VirshShellOptions) {
    this.maxShells = opts.maxShells ?? 4;
    this.idleMs = opts.idleMs ?? 60_000;
    opts.signal?.addEventListener('abort', () => this.close(), { once: true });
  }

  /**
   * Runs a command in a shell. Null: it was not written to any shell (no idle shell, an argument the line
   * cannot carry, the fast path off): run it the one-shot way.
   */
  async query(args: readonly string[], timeoutMs: number): Promise<ShellAnswer | null> {
    const line = this.closed || this.stats.protocolErrors >= MAX_PROTOCOL_ERRORS ? null : shellLine(args);
    const shell = line === null ? null : await this.acquire();
    if (line === null || shell === null) {
      this.stats.declined++;
      return null;
    }
    try {
      const r = await shell.ask(line, timeoutMs);
      this.stats.answered++;
      return r === 'timeout' ? { kind: 'timeout' } : { kind: 'output', ...r };
    } catch (e) {
      if (e instanceof ShellProtocolError) this.stats.protocolErrors++;
      this.stats.declined++;
      return { kind: 'lost', why: (e as Error).message };
    } finally {
      shell.busy = false;
      if (!shell.dead) shell.idleAfter(this.idleMs);
    }
  }

  /** Kills every shell; later queries are declined. */
  close(): void {
    this.closed = true;
    for (const s of [...this.shells]) s.kill();
  }

  /** Shells alive now (tests). */
  get size(): number {
    return this.shells.size;
  }

  private async acquire(): Promise<Shell | null> {
    for (const s of this.shells) {
      if (!s.busy && !s.dead) {
        s.busy = true;
        return s;
      }
    }
    if (this.shells.size >= this.maxShells || Date.now() < this.noStartUntil) return null;
    let s: Shell;
    try {
      s = new Shell(this.opts, (gone) => this.shells.delete(gone));
    } catch {
      this.noStartUntil = Date.now() + START_BACKOFF_MS;
      return null;
    }
    s.busy = true;
    this.shells.add(s);
    this.stats.shellsStarted++;
    try {
      await s.started();
      return s;
    } catch {
      // not counted as a protocol error: libvirtd may just be down (the one-shot run reports that)
      this.noStartUntil = Date.now() + START_BACKOFF_MS;
      s.kill();
      return null;
    }
  }
}
