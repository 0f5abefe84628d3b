/**
 * `onestor-agent receive`: the replica side, started by sshd (ideally as the forced command of a
 * dedicated key). stdin/stdout are the protocol; logs go to stderr (sshd passes them to the client).
 * SNAPS comes from the receiver's own configuration (flag, config file, or the replica's sshrc),
 * never from the client.
 */
import type { Logger } from 'pino';
import { Exit } from '../exit-codes.js';
import { overridesFrom, parseFlags, type Flags } from '../flags.js';
import { loadConfig, parseConfig, type Config } from '../../lib/config/config.js';
import { readSshrc } from '../../lib/config/sshrc.js';
import { DEFAULT_DRIVER_SETTINGS } from '../../lib/shared/defaults.js';
import { ErrorCodes, OnestorError, isOnestorError } from '../../lib/shared/errors.js';
import type { DriverSettings } from '../../lib/shared/model.js';
import { refuseSession, runReceiver, type ReceiverOptions } from '../../lib/replica/receiver.js';
import { identityFromEnvironment } from '../../lib/replica/identity-env.js';
import { parseHostFlag } from '../../lib/replica/identity.js';
import { lentStdin, nonBlockingFd, widenStdinPipe } from '../../lib/replica/stdio.js';

/**
 * The receiver's settings from the validated config (flags included: they went through the same schema)
 * and the replica's driver settings: a null config value means "what sshrc says". Shared by both entries
 * (this command and agent/receiver-main.ts) so they cannot disagree on a default.
 */
export function receiverOptionsFrom(config: Config, settings: Readonly<DriverSettings>, identity: string, log: ReceiverOptions['log'], keyFingerprint?: string): ReceiverOptions {
  const r = config.receiver;
  return {
    snapsDir: r.snapsDir ?? settings.REPLICA_RECOVERY_SNAPS_DIR,
    identity,
    ...(keyFingerprint ? { keyFingerprint } : {}),
    lockTimeoutSec: r.lockTimeoutSec ?? settings.REPLICA_COPY_LOCK_TIMEOUT,
    maxSessions: r.maxSessions,
    busyWaitSec: r.busyWaitSec,
    ...(r.maxSessionsPerHost !== null ? { maxSessionsPerHost: r.maxSessionsPerHost } : {}),
    helloTimeoutSec: r.helloTimeoutSec,
    idleTimeoutSec: r.idleTimeoutSec,
    drainTimeoutSec: r.drainTimeoutSec,
    progressWindowSec: r.progressWindowSec,
    minProgressKiB: r.minProgressKiB,
    maxSessionSec: r.maxSessionSec,
    maxUsedPercent: r.maxUsedPercent ?? settings.REPLICA_MAX_USED_PERC,
    spaceCheck: r.spaceCheck,
    directWrites: r.directIo,
    qemuImg: config.qemuImg,
    ...(log ? { log } : {}),
  };
}

/** As a forced command this runs whatever the client asked for: SFTP would otherwise wait, speaking no protocol, until the idle timeout. */
export function isSftpRequest(requested: string): boolean {
  return /(^|\/)(internal-sftp|sftp-server)\b/.test(requested);
}

/** The flags the stand-alone entry takes: the receiver's part of the CLI flags. */
const RECEIVER_MAIN_FLAGS = new Set([
  'snaps-dir',
  'host',
  'lock-timeout',
  'max-sessions',
  'max-sessions-per-host',
  'busy-wait',
  'max-used-percent',
  'hello-timeout',
  'idle-timeout',
  'drain-timeout',
  'progress-window',
  'min-progress-kib',
  'max-session-time',
  'qemu-img',
  'no-space-check',
  'no-direct-io',
  'allow-unidentified',
]);

/**
 * For agent/receiver-main.ts (pure: argv -> receiver options; throws E_CONFIG naming the flag). Same flags as
 * `receive`, through the same config schema; no config file and no sshrc are read, so upstream's sshrc defaults apply.
 */
export function parseReceiverArgs(argv: readonly string[], log?: ReceiverOptions['log']): ReceiverOptions & { host?: string; allowUnidentified: boolean } {
  let parsed: ReturnType<typeof parseFlags>;
  try {
    parsed = parseFlags([...argv]);
  } catch (e) {
    throw new OnestorError(ErrorCodes.CONFIG, (e as Error).message, {}, { cause: e });
  }
  const { values, positionals } = parsed;
  if (positionals.length) throw new OnestorError(ErrorCodes.CONFIG, `unexpected argument ${JSON.stringify(positionals[0])}`);
  const stray = Object.keys(values).filter((k) => !RECEIVER_MAIN_FLAGS.has(k));
  if (stray.length) throw new OnestorError(ErrorCodes.CONFIG, `not a receiver flag: --${stray[0]}`, { field: `--${stray[0]}` });
  // SNAPS must be explicit here: this entry reads no sshrc that could name it
  if (!values['snaps-dir']) throw new OnestorError(ErrorCodes.CONFIG, '--snaps-dir is required', { field: '--snaps-dir' });
  // the identity is resolved by the entry (--host, else sshd's key fingerprint, else refused): see receiver-main.ts
  const host = values.host !== undefined ? parseHostFlag(values.host) : undefined;
  const { 'allow-unidentified': allow, ...rest } = values;
  const config = parseConfig(overridesFrom(rest), 'command line');
  return { ...receiverOptionsFrom(config, DEFAULT_DRIVER_SETTINGS, host ?? '', log), ...(host !== undefined ? { host } : {}), allowUnidentified: Boolean(allow) };
}

export async function run(f: Flags, _pos: string[], log: Logger): Promise<number> {
  // The writer's identity comes from the forced command of its key (`receive --host NAME`), never from the client.
  if (f.host !== undefined) parseHostFlag(f.host); // E_CONFIG (exit 2) before anything else
  const config = await loadConfig({ file: f.config, overrides: overridesFrom(f) as never });
  log.level = config.log.level;
  const sshrc = await readSshrc(config.sshrcPaths);
  const logFn: ReceiverOptions['log'] = (obj, msg, level) => (level === 'warn' ? log.warn(obj, msg) : log.info(obj, msg));
  // Who writes comes from sshd's authentication: --host in the key's forced command, else the key's
  // fingerprint (ExposeAuthInfo); neither: refused unless --allow-unidentified (lib/replica/identity.ts).
  let who: Awaited<ReturnType<typeof identityFromEnvironment>> | null = null;
  let identityError: OnestorError | null = null;
  try {
    who = await identityFromEnvironment({ ...(f.host !== undefined ? { host: f.host } : {}), allowUnidentified: Boolean(f['allow-unidentified']) });
  } catch (e) {
    if (!isOnestorError(e) || e.code !== ErrorCodes.IDENTITY) throw e;
    identityError = e;
  }
  // As a forced command this runs whatever the client asked for: SFTP would otherwise wait, speaking
  // no protocol, until the idle timeout.
  const requested = process.env['SSH_ORIGINAL_COMMAND'] ?? '';
  if (isSftpRequest(requested)) {
    log.warn({ writer: who?.identity ?? null, requested: requested.slice(0, 200) }, 'refusing SFTP: this key may only talk to the receiver');
    return Exit.FAILED;
  }
  // non-blocking stdout: a full pipe (agent not reading) must not freeze the session timers; a write to
  // the closed pipe ends the session, not the process
  const out = nonBlockingFd(1);
  out.on('error', () => {});
  // stdin read into one reused buffer (no allocation, hence no GC, per pipe read)
  const input = lentStdin();
  // sshd hands on at most a pipe's capacity per loop (why it matters: widenStdinPipe)
  void widenStdinPipe();
  if (!who) {
    await refuseSession(input, out, identityError!, logFn);
    if (!out.destroyed) await new Promise<void>((resolve) => out.end(resolve));
    return Exit.FAILED;
  }
  const code = await runReceiver(input, out, receiverOptionsFrom(config, sshrc.settings, who.identity, logFn, who.keyFingerprint ?? undefined));
  // a stdout destroyed because the agent stopped reading would never call back
  if (!out.destroyed) await new Promise<void>((resolve) => out.end(resolve));
  // the receiver's code is already one of the table's (OK, FAILED, PROTOCOL)
  return code;
}
