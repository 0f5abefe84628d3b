/**
 * Minimal stand-alone receiver entry (`node dist/agent/receiver-main.js --snaps-dir DIR ...`), for an
 * authorized_keys forced command and for tests. Unlike `onestor-agent receive` it reads no config file
 * and no sshrc (upstream's defaults apply), but its flags are the same flags, validated by the same
 * config schema, with the same defaults (lib/shared/defaults.ts). stdout is the protocol, logs are JSON
 * lines on stderr (dropped rather than blocking when nobody reads them).
 */
import { Exit } from './exit-codes.js';
import { isSftpRequest, parseReceiverArgs } from './commands/receive.js';
import { ErrorCodes, describeError, isOnestorError } from '../lib/shared/errors.js';
import { identityFromEnvironment } from '../lib/replica/identity-env.js';
import { refuseSession, runReceiver } from '../lib/replica/receiver.js';
import { droppingLogSink, lentStdin, nonBlockingFd, widenStdinPipe } from '../lib/replica/stdio.js';

let sink: { write(line: string): boolean } | null = null;
const logSink = () => (sink ??= droppingLogSink());

async function main(): Promise<void> {
  let args: ReturnType<typeof parseReceiverArgs>;
  try {
    args = parseReceiverArgs(process.argv.slice(2), (obj, msg) => logSink().write(JSON.stringify({ time: Date.now(), pid: process.pid, ...obj, msg }) + '\n'));
  } catch (e) {
    process.stderr.write(describeError(e) + '\n');
    process.exit(Exit.USAGE);
  }
  const { host, allowUnidentified, ...opts } = args;
  // Under `command="...",restrict` every request runs this program; an SFTP subsystem request arrives
  // as SSH_ORIGINAL_COMMAND=internal-sftp (or sftp-server). Refuse it up front instead of waiting on
  // bytes that will never form a frame.
  const original = process.env['SSH_ORIGINAL_COMMAND'] ?? '';
  if (isSftpRequest(original)) {
    opts.log?.({ requested: original.slice(0, 200) }, 'refusing SFTP: this key may only talk to the receiver');
    process.exit(Exit.FAILED);
  }
  // Non-blocking stdout (a full pipe must not freeze the timers); errors when the agent vanishes are
  // handled by the session (partial uploads are flushed for resume), never a crash.
  const out = nonBlockingFd(1);
  out.on('error', () => {});
  // Who writes comes from sshd's authentication: --host in the key's forced command, else the key's
  // fingerprint (ExposeAuthInfo); neither: refused unless --allow-unidentified (lib/replica/identity.ts).
  // stdin read into one reused buffer (no allocation, hence no GC, per pipe read)
  const input = lentStdin();
  // sshd hands on at most a pipe's capacity per loop (why it matters: widenStdinPipe)
  void widenStdinPipe();
  let code: number;
  try {
    const who = await identityFromEnvironment({ ...(host !== undefined ? { host } : {}), allowUnidentified });
    code = await runReceiver(input, out, { ...opts, identity: who.identity, ...(who.keyFingerprint ? { keyFingerprint: who.keyFingerprint } : {}) });
  } catch (e) {
    if (!isOnestorError(e) || e.code !== ErrorCodes.IDENTITY) throw e;
    code = await refuseSession(input, out, e, opts.log);
  }
  // Let the last reply reach the pipe before exiting; a stdout destroyed because the agent stopped
  // reading would never call back.
  if (out.destroyed) process.exit(code);
  out.end(() => process.exit(code));
}

main().catch((e) => {
  process.stderr.write(describeError(e) + '\n');
  process.exit(Exit.FAILED);
});
