/**
 * `onestor-agent receive`: the replica side, started by sshd (ideally as the forced command of a
 * dedicated key). stdin/stdout are the protocol; logs go to stderr (sshd passes them to the client).
 * SNAPS comes from the receiver's own configuration (flag, config file, or the replica's sshrc),
 * never from the client.
 */
import type { Logger } from 'pino';
import { Exit } from './exit-codes.js';
import { overridesFrom, parseFlags, type Flags } from './flags.js';
import { loadConfig, parseConfig, type Config } from '../lib/config/config.js';
import { DEFAULT_DRIVER_SETTINGS } from '../lib/shared/defaults.js';
import { ErrorCodes, OnestorError } from '../lib/shared/errors.js';
import { readSshrc } from '../lib/config/sshrc.js';
import type { DriverSettings } from '../lib/shared/model.js';
import { runReceiver, type ReceiverOptions } from '../lib/replica/receiver.js';

/**
 * The receiver's settings from the validated config (flags included: they went through the same schema)
 * and the replica's driver settings: a null config value means "what sshrc says". Shared by both entries
 * (this command and agent/receiver-main.ts) so they cannot disagree on a default.
 */
export function receiverOptionsFrom(config: Config, settings: Readonly<DriverSettings>, log: ReceiverOptions['log']): ReceiverOptions {
  const r = config.receiver;
  return {
    snapsDir: r.snapsDir ?? settings.REPLICA_RECOVERY_SNAPS_DIR,
    lockTimeoutSec: r.lockTimeoutSec ?? settings.REPLICA_COPY_LOCK_TIMEOUT,
    maxSessions: r.maxSessions,
    busyWaitSec: r.busyWaitSec,
    maxUsedPercent: r.maxUsedPercent ?? settings.REPLICA_MAX_USED_PERC,
    spaceCheck: r.spaceCheck,
    idleTimeoutSec: r.idleTimeoutSec,
    qemuImg: config.qemuImg,
    ...(log ? { log } : {}),
  };
}

/** As a forced command this runs whatever the client asked for: SFTP would otherwise wait, speaking no protocol, until the idle timeout. */
export function isSftpRequest(requested: string): boolean {
  return /(^|\/)(internal-sftp|sftp-server)\b/.test(requested);
}

/** The flags the stand-alone entry takes: the receiver's part of the CLI flags. */
const RECEIVER_MAIN_FLAGS = new Set(['snaps-dir', 'lock-timeout', 'max-sessions', 'busy-wait', 'max-used-percent', 'idle-timeout', 'qemu-img', 'no-space-check']);

/**
 * For agent/receiver-main.ts (pure: argv -> receiver options; throws E_CONFIG naming the flag). Same flags as
 * `receive`, through the same config schema; no config file and no sshrc are read, so upstream's sshrc defaults apply.
 */
export function parseReceiverArgs(argv: readonly string[]): ReceiverOptions {
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
  const config = parseConfig(overridesFrom(values), 'command line');
  return receiverOptionsFrom(config, DEFAULT_DRIVER_SETTINGS, (obj, msg) => process.stderr.write(JSON.stringify({ time: Date.now(), pid: process.pid, ...obj, msg }) + '\n'));
}

export async function run(f: Flags, _pos: string[], log: Logger): Promise<number> {
  const config = await loadConfig({ file: f.config, overrides: overridesFrom(f) as never });
  log.level = config.log.level;
  const sshrc = await readSshrc(config.sshrcPaths);
  const requested = process.env['SSH_ORIGINAL_COMMAND'] ?? '';
  if (isSftpRequest(requested)) {
    log.warn({ requested: requested.slice(0, 200) }, 'refusing SFTP: this key may only talk to the receiver');
    return Exit.FAILED;
  }
  // the agent may vanish at any moment: a write to the closed pipe ends the session, not the process
  process.stdout.on('error', () => {});
  const code = await runReceiver(process.stdin, process.stdout, receiverOptionsFrom(config, sshrc.settings, (obj, msg) => log.info(obj, msg)));
  await new Promise<void>((resolve) => process.stdout.end(resolve));
  // the receiver's code is already one of the table's (OK, FAILED, PROTOCOL)
  return code;
}
