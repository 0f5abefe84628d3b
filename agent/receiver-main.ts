/**
 * Minimal stand-alone receiver entry (`node dist/agent/receiver-main.js --snaps-dir DIR ...`), for an
 * authorized_keys forced command and for tests. Unlike `onestor-agent receive` it reads no config file
 * and no sshrc (upstream's defaults apply), but its flags are the same flags, validated by the same
 * config schema, with the same defaults (lib/shared/defaults.ts). stdout is the protocol, logs are JSON
 * lines on stderr.
 */
import { Exit } from './exit-codes.js';
import { isSftpRequest, parseReceiverArgs } from './cmd-receive.js';
import { describeError } from '../lib/shared/errors.js';
import { runReceiver, type ReceiverOptions } from '../lib/replica/receiver.js';

async function main(): Promise<void> {
  let opts: ReceiverOptions;
  try {
    opts = parseReceiverArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(describeError(e) + '\n');
    process.exit(Exit.USAGE);
  }
  // Under `command="...",restrict` every request runs this program; an SFTP subsystem request arrives
  // as SSH_ORIGINAL_COMMAND=internal-sftp (or sftp-server). Refuse it up front instead of waiting on
  // bytes that will never form a frame.
  const original = process.env['SSH_ORIGINAL_COMMAND'] ?? '';
  if (isSftpRequest(original)) {
    opts.log?.({ requested: original.slice(0, 200) }, 'refusing SFTP: this key may only talk to the receiver');
    process.exit(Exit.FAILED);
  }
  // The agent may vanish at any moment: a write to the closed pipe must end the session, not crash it
  // before partial uploads are flushed for resume.
  process.stdout.on('error', () => {});
  const code = await runReceiver(process.stdin, process.stdout, opts);
  // Let the last reply reach the pipe before exiting.
  process.stdout.end(() => process.exit(code));
}

main().catch((e) => {
  process.stderr.write(describeError(e) + '\n');
  process.exit(Exit.FAILED);
});
