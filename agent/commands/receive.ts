/**
 * `onestor-agent receive`: the replica side, started by sshd (ideally as the forced command of a
 * dedicated key). stdin/stdout are the protocol; logs go to stderr (sshd passes them to the client).
 * SNAPS comes from the receiver's own configuration (flag, config file, or the replica's sshrc),
 * never from the client.
 */
import type { Logger } from 'pino';
import { Exit } from '../exit-codes.js';
import { overridesFrom, type Flags } from '../flags.js';
import { loadConfig } from '../../lib/config/config.js';
import { readSshrc } from '../../lib/config/sshrc.js';
import { runReceiver } from '../../lib/replica/receiver.js';

export async function run(f: Flags, _pos: string[], log: Logger): Promise<number> {
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
  // the agent may vanish at any moment: a write to the closed pipe ends the session, not the process
  process.stdout.on('error', () => {});
  const code = await runReceiver(process.stdin, process.stdout, {
    snapsDir,
    lockTimeoutSec: config.receiver.lockTimeoutSec ?? sshrc.settings.REPLICA_COPY_LOCK_TIMEOUT,
    maxSessions: config.receiver.maxSessions,
    busyWaitSec: config.receiver.busyWaitSec,
    maxUsedPercent: sshrc.settings.REPLICA_MAX_USED_PERC,
    spaceCheck: config.receiver.spaceCheck,
    qemuImg: config.qemuImg,
    log: (obj, msg) => log.info(obj, msg),
  });
  await new Promise<void>((resolve) => process.stdout.end(resolve));
  return code === 0 ? Exit.OK : Exit.FAILED;
}
