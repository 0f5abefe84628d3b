/**
 * `onestor-agent receive`: the replica side, started by sshd (ideally as the forced command of a
 * dedicated key). stdin/stdout are the protocol; logs go to stderr (sshd passes them to the client).
 * SNAPS comes from the receiver's own configuration (flag, config file, or the replica's sshrc),
 * never from the client.
 */
import type { Logger } from 'pino';
import { Exit } from './exit-codes.js';
import { overridesFrom, type Flags } from './flags.js';
import { loadConfig } from '../lib/config/config.js';
import { readSshrc } from '../lib/config/sshrc.js';
import { runReceiver } from '../lib/replica/receiver.js';
import { nonBlockingFd } from '../lib/replica/stdio.js';
import { HOST_NAME_RE, UNNAMED_IDENTITY } from '../lib/replica/slots.js';
import { ErrorCodes, OnestorError } from '../lib/shared/errors.js';

export async function run(f: Flags, _pos: string[], log: Logger): Promise<number> {
  // The writer's identity comes from the forced command of its key (`receive --host NAME`), never from the client.
  if (f.host !== undefined && !HOST_NAME_RE.test(f.host)) {
    throw new OnestorError(ErrorCodes.CONFIG, `--host must be a host name (letters, digits, . _ -; at most 64), got ${JSON.stringify(f.host)}`, { field: '--host' });
  }
  const config = await loadConfig({ file: f.config, overrides: overridesFrom(f) as never });
  const sshrc = await readSshrc(config.sshrcPaths);
  const snapsDir = config.receiver.snapsDir ?? sshrc.settings.REPLICA_RECOVERY_SNAPS_DIR;
  // As a forced command this runs whatever the client asked for: SFTP would otherwise wait, speaking
  // no protocol, until the idle timeout.
  const requested = process.env['SSH_ORIGINAL_COMMAND'] ?? '';
  if (/(^|\/)(internal-sftp|sftp-server)\b/.test(requested)) {
    log.warn({ requested: requested.slice(0, 200) }, 'refusing SFTP: this key may only talk to the receiver');
    return Exit.FAILED;
  }
  // non-blocking stdout: a full pipe (agent not reading) must not freeze the session timers; a write to
  // the closed pipe ends the session, not the process
  const out = nonBlockingFd(1);
  out.on('error', () => {});
  const code = await runReceiver(process.stdin, out, {
    snapsDir,
    identity: f.host ?? UNNAMED_IDENTITY,
    lockTimeoutSec: config.receiver.lockTimeoutSec ?? sshrc.settings.REPLICA_COPY_LOCK_TIMEOUT,
    maxSessions: config.receiver.maxSessions,
    busyWaitSec: config.receiver.busyWaitSec,
    ...(config.receiver.maxSessionsPerHost !== null ? { maxSessionsPerHost: config.receiver.maxSessionsPerHost } : {}),
    helloTimeoutSec: config.receiver.helloTimeoutSec,
    idleTimeoutSec: config.receiver.idleTimeoutSec,
    drainTimeoutSec: config.receiver.drainTimeoutSec,
    progressWindowSec: config.receiver.progressWindowSec,
    minProgressKiB: config.receiver.minProgressKiB,
    maxSessionSec: config.receiver.maxSessionSec,
    maxUsedPercent: sshrc.settings.REPLICA_MAX_USED_PERC,
    spaceCheck: config.receiver.spaceCheck,
    qemuImg: config.qemuImg,
    log: (obj, msg) => log.info(obj, msg),
  });
  // a stdout destroyed because the agent stopped reading would never call back
  if (!out.destroyed) await new Promise<void>((resolve) => out.end(resolve));
  return code === 0 ? Exit.OK : Exit.FAILED;
}
