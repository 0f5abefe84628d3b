/**
 * Framing of a long-lived interactive `virsh` (one process, one libvirt connection, many commands),
 * PURE (sans-IO): command lines out, stdout/stderr text in, one result per command out. The adapter
 * (virsh-shell.ts) owns the process.
 *
 * Why: spawning virsh costs 50-70 ms per call on a busy 2-vCPU host (loading libvirt, connecting,
 * authenticating) against ~1 ms for the same query in a running shell, and a cycle makes about ten queries.
 *
 * What virsh prints in shell mode (libvirt 9.0, stdin a pipe): readline echoes every line after the
 * prompt `virsh # ` on stdout, then the command's own output, byte for byte what a one-shot `virsh CMD`
 * prints; errors go to stderr as `error: ...`. A command is written as three lines:
 *
 *     CMD
 *     echo --err --xml TOKEN<     -> stderr `error: TOKEN&lt;\n` ends the command's stderr
 *     echo --xml TOKEN<           -> stdout `TOKEN&lt;` ends the command's stdout
 *
 * TOKEN is random per command, and its XML-escaped echo (`&lt;`) never appears in the echoed input, so
 * neither a command's output nor the echo of a line can fake the end of a frame. Everything between the
 * markers is checked against the exact bytes expected (prompt, echoed line); any other byte is a
 * ShellProtocolError, after which the adapter drops the shell and runs the command the one-shot way.
 *
 * Readline would rewrite a line holding control characters (tab completes, ESC starts a key sequence) or
 * bytes outside ASCII, and virsh's own tokenizer gives quotes and backslashes meaning: `shellLine` only
 * takes arguments it can carry verbatim and returns null otherwise (the caller then spawns virsh).
 */

export const SHELL_PROMPT = 'virsh # ';

/** Arguments written as they are. */
const BARE_ARG = /^[A-Za-z0-9@%+=:,./_-]+$/;
/** Arguments written inside single quotes: printable ASCII without quotes or backslashes. */
const QUOTABLE_ARG = /^[\x20-\x7e]+$/;
const NEEDS_QUOTES_BUT_CANNOT = /['"\\]/;

/** The shell line for argv, or null when an argument cannot be carried verbatim. */
export function shellLine(args: readonly string[]): string | null {
  if (args.length === 0) return null;
  const words: string[] = [];
  for (const a of args) {
    if (BARE_ARG.test(a)) words.push(a);
    else if (QUOTABLE_ARG.test(a) && !NEEDS_QUOTES_BUT_CANNOT.test(a)) words.push(`'${a}'`);
    else return null;
  }
  return words.join(' ');
}

export class ShellProtocolError extends Error {
  override readonly name = 'ShellProtocolError';
}

export interface ShellOutput {
  stdout: string;
  stderr: string;
}

interface Pending {
  line: string;
  token: string;
  stdout: string | null;
  stderr: string | null;
}

const stdoutMarker = (token: string): string => `${token}&lt;`;
const stderrMarker = (token: string): string => `error: ${token}&lt;\n`;
/** The two marker commands, as written after a command. */
export const markerLines = (token: string): string => `echo --err --xml ${token}<\necho --xml ${token}<\n`;

/**
 * One shell's conversation. `start(token)` before the first command (its banner and the startup marker are
 * consumed), then `send(line, token)` per command; feed every stdout/stderr chunk as it arrives and take
 * the finished commands in order from `take()`. Throws ShellProtocolError on any unexpected byte.
 */
export class VirshShellFrames {
  private out = '';
  private err = '';
  private readonly pending: Pending[] = [];
  private started = false;
  private startToken: string | null = null;
  private readonly done: ShellOutput[] = [];
  /** Bounds what an unanswered command may buffer (a `capabilities` is ~20 KiB; dumpxml of a big VM less than 1 MiB). */
  constructor(private readonly maxBuffered = 16 * 1024 * 1024) {}

  /** The bytes to write to start the conversation. */
  start(token: string): string {
    if (this.startToken !== null) throw new ShellProtocolError('start() called twice');
    this.startToken = token;
    return markerLines(token);
  }

  /** The bytes to write for one command. `line` must come from shellLine(). */
  send(line: string, token: string): string {
    if (this.startToken === null) throw new ShellProtocolError('send() before start()');
    if (line.includes('\n')) throw new ShellProtocolError('a command line may not hold a newline');
    this.pending.push({ line, token, stdout: null, stderr: null });
    return `${line}\n${markerLines(token)}`;
  }

  /** True once the banner and the startup marker were seen on both streams. */
  get ready(): boolean {
    return this.started;
  }

  /** Commands sent and not yet finished. */
  get inFlight(): number {
    return this.pending.length;
  }

  stdout(chunk: string): void {
    this.out += chunk;
    this.advance();
  }

  stderr(chunk: string): void {
    this.err += chunk;
    this.advance();
  }

  /** Finished commands, oldest first; each is returned once. */
  take(): ShellOutput[] {
    return this.done.splice(0);
  }

  private advance(): void {
    if (this.out.length + this.err.length > this.maxBuffered) throw new ShellProtocolError(`more than ${this.maxBuffered} bytes of output without a marker`);
    if (!this.started) {
      if (this.startToken === null) {
        if (this.out.length + this.err.length > 0) throw new ShellProtocolError('output before the conversation started');
        return;
      }
      const o = this.out.indexOf(stdoutMarker(this.startToken));
      const e = this.err.indexOf(stderrMarker(this.startToken));
      if (o < 0 || e < 0) return;
      // before the startup marker, stderr holds nothing but a failure to connect: the shell is unusable
      if (e > 0) throw new ShellProtocolError(`virsh shell did not start cleanly: ${this.err.slice(0, e).trim()}`);
      this.out = this.out.slice(o + stdoutMarker(this.startToken).length);
      this.err = this.err.slice(e + stderrMarker(this.startToken).length);
      this.started = true;
    }
    for (;;) {
      const head = this.pending[0];
      if (!head) {
        // nothing asked: the prompt's leading newline is the only thing that may wait here
        if (this.err.length > 0) return; // asynchronous errors (e.g. a disconnect) belong to the next command
        if (!('\n' + SHELL_PROMPT).startsWith(this.out)) throw new ShellProtocolError(`unexpected output between commands: ${JSON.stringify(this.out.slice(0, 80))}`);
        return;
      }
      if (head.stdout === null) {
        const prefix = `\n${SHELL_PROMPT}${head.line}\n`;
        const suffix = `${SHELL_PROMPT}echo --err --xml ${head.token}<\n\n${SHELL_PROMPT}echo --xml ${head.token}<\n${stdoutMarker(head.token)}`;
        // the prefix can be checked as soon as enough has arrived
        const seen = this.out.slice(0, prefix.length);
        if (!prefix.startsWith(seen)) throw new ShellProtocolError(`unexpected echo of ${JSON.stringify(head.line.slice(0, 60))}: ${JSON.stringify(seen.slice(0, 80))}`);
        const end = this.out.indexOf(suffix, prefix.length);
        if (end < 0) {
          // the stdout marker without the exact lines before it means the echo was rewritten
          if (this.out.includes(stdoutMarker(head.token))) throw new ShellProtocolError(`malformed frame for ${JSON.stringify(head.line.slice(0, 60))}`);
        } else {
          head.stdout = this.out.slice(prefix.length, end);
          this.out = this.out.slice(end + suffix.length);
        }
      }
      if (head.stderr === null) {
        const m = this.err.indexOf(stderrMarker(head.token));
        if (m >= 0) {
          head.stderr = this.err.slice(0, m);
          this.err = this.err.slice(m + stderrMarker(head.token).length);
        }
      }
      if (head.stdout === null || head.stderr === null) return;
      this.pending.shift();
      this.done.push({ stdout: head.stdout, stderr: head.stderr });
    }
  }
}

/** What virsh prints on its own when its libvirt connection drops and comes back (not a command's failure). */
const CONNECTION_NOTICE = /^error: (?:Disconnected from .* due to .*|Reconnected to the hypervisor)$/;

export type ActionOutcome =
  | { kind: 'ok' }
  /** the command failed: its error lines, as a one-shot virsh prints them before exiting 1 */
  | { kind: 'failed'; stderr: string }
  /** the connection dropped around the command: it may or may not have taken effect */
  | { kind: 'unclear'; why: string };

/**
 * Reads a state-changing command's shell answer. A one-shot virsh says success with exit 0; in a shell
 * there is no exit code, so success is the command's own success output (`success`, e.g. `Backup started`)
 * with no error line, and failure is an error line. Connection notices mixed in make an answer without its
 * success output unclear, as a one-shot run that lost its connection is: the caller treats it as a failure
 * that may have happened (the same window as the agent being killed right after the call).
 */
export function actionOutcome(answer: ShellOutput, success: RegExp | null): ActionOutcome {
  const lines = answer.stderr.split('\n').filter((l) => l.trim() !== '');
  const notices = lines.filter((l) => CONNECTION_NOTICE.test(l));
  const errors = lines.filter((l) => !CONNECTION_NOTICE.test(l));
  // a command without success output (success null) says nothing by printing nothing
  const saidSuccess = success !== null && success.test(answer.stdout);
  const quiet = success === null && answer.stdout.trim() === '';
  if (errors.length > 0) return saidSuccess ? { kind: 'unclear', why: `success output and errors: ${errors.join(' | ')}` } : { kind: 'failed', stderr: errors.join('\n') + '\n' };
  if (notices.length > 0) return saidSuccess ? { kind: 'ok' } : { kind: 'unclear', why: notices.join(' | ') };
  return saidSuccess || quiet ? { kind: 'ok' } : { kind: 'unclear', why: `no error and no success output: ${JSON.stringify(answer.stdout.slice(0, 120))}` };
}
