/**
 * Minimal stand-alone receiver entry (`node dist/lib/receiver-main.js --snaps-dir DIR ...`), for an
 * authorized_keys forced command and for tests. The full CLI (`onestor-agent receive`) reads the driver
 * settings instead; both end in runReceiver. stdout is the protocol, logs are JSON lines on stderr.
 */
import { ErrorCodes, OnestorError, describeError } from '../shared/errors.js';
import { runReceiver, type ReceiverOptions } from './receiver.js';
import { HOST_NAME_RE, UNNAMED_IDENTITY } from './slots.js';
import { droppingLogSink, nonBlockingFd } from './stdio.js';

const FLAGS = {
  '--snaps-dir': 'snapsDir',
  '--lock-timeout': 'lockTimeoutSec',
  '--max-sessions': 'maxSessions',
  '--busy-wait': 'busyWaitSec',
  '--max-used-percent': 'maxUsedPercent',
  '--qemu-img': 'qemuImg',
  '--idle-timeout': 'idleTimeoutSec',
  '--host': 'identity',
  '--max-sessions-per-host': 'maxSessionsPerHost',
  '--hello-timeout': 'helloTimeoutSec',
  '--drain-timeout': 'drainTimeoutSec',
  '--progress-window': 'progressWindowSec',
  '--min-progress-kib': 'minProgressKiB',
  '--max-session-time': 'maxSessionSec',
} as const;

let sink: { write(line: string): boolean } | null = null;
const logSink = () => (sink ??= droppingLogSink());

export function parseReceiverArgs(argv: readonly string[]): ReceiverOptions {
  const raw: Record<string, string> = {};
  for (let i = 0; i < argv.length; i += 2) {
    const flag = argv[i]!;
    const value = argv[i + 1];
    const key = (FLAGS as Record<string, string>)[flag];
    if (!key || value === undefined) throw new OnestorError(ErrorCodes.CONFIG, `unknown flag or missing value: ${flag}`, { field: flag });
    raw[key] = value;
  }
  const num = (key: string, def: number, min: number, max: number): number => {
    const v = raw[key];
    if (v === undefined) return def;
    const n = Number(v);
    if (!/^[0-9]+$/.test(v) || n < min || n > max) throw new OnestorError(ErrorCodes.CONFIG, `${key} must be an integer ${min}..${max}, got ${v}`, { field: key });
    return n;
  };
  if (!raw.snapsDir || !raw.snapsDir.startsWith('/')) {
    throw new OnestorError(ErrorCodes.CONFIG, '--snaps-dir must be an absolute path', { field: '--snaps-dir' });
  }
  if (raw.identity !== undefined && !HOST_NAME_RE.test(raw.identity)) {
    throw new OnestorError(ErrorCodes.CONFIG, `--host must be a host name (letters, digits, . _ -; at most 64), got ${JSON.stringify(raw.identity)}`, { field: '--host' });
  }
  const maxSessions = num('maxSessions', 4, 1, 1024);
  const opt = (key: string, min: number, max: number) => (raw[key] === undefined ? {} : { [key]: num(key, 0, min, max) });
  return {
    snapsDir: raw.snapsDir,
    identity: raw.identity ?? UNNAMED_IDENTITY,
    lockTimeoutSec: num('lockTimeoutSec', 600, 0, 86400),
    maxSessions,
    busyWaitSec: num('busyWaitSec', 60, 0, 86400),
    maxUsedPercent: num('maxUsedPercent', 90, 1, 100),
    idleTimeoutSec: num('idleTimeoutSec', 900, 1, 86400),
    ...opt('maxSessionsPerHost', 1, maxSessions),
    ...opt('helloTimeoutSec', 1, 3600),
    ...opt('drainTimeoutSec', 1, 86400),
    ...opt('progressWindowSec', 1, 86400),
    ...opt('minProgressKiB', 0, 1024 * 1024),
    ...opt('maxSessionSec', 1, 30 * 86400),
    ...(raw.qemuImg ? { qemuImg: raw.qemuImg } : {}),
    log: (obj, msg) => logSink().write(JSON.stringify({ time: Date.now(), pid: process.pid, ...obj, msg }) + '\n'),
  };
}

async function main(): Promise<void> {
  let opts: ReceiverOptions;
  try {
    opts = parseReceiverArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(describeError(e) + '\n');
    process.exit(64);
  }
  // Under `command="...",restrict` every request runs this program; an SFTP subsystem request arrives
  // as SSH_ORIGINAL_COMMAND=internal-sftp (or sftp-server). Refuse it up front instead of waiting on
  // bytes that will never form a frame.
  const original = process.env.SSH_ORIGINAL_COMMAND ?? '';
  if (/(^|\/)(internal-sftp|sftp-server)\b/.test(original)) {
    opts.log?.({ requested: original.slice(0, 200) }, 'refusing SFTP: this key may only talk to the receiver');
    process.exit(1);
  }
  // Non-blocking stdout (a full pipe must not freeze the timers); errors when the agent vanishes are
  // handled by the session (partial uploads are flushed for resume), never a crash.
  const out = nonBlockingFd(1);
  out.on('error', () => {});
  const code = await runReceiver(process.stdin, out, opts);
  // Let the last reply reach the pipe before exiting; a stdout destroyed because the agent stopped
  // reading would never call back.
  if (out.destroyed) process.exit(code);
  out.end(() => process.exit(code));
}

main().catch((e) => {
  process.stderr.write(describeError(e) + '\n');
  process.exit(1);
});
