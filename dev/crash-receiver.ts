/**
 * The real receiver (runReceiver, as receiver-main runs it) with its publish step hooks wired for crash
 * tests: every step it passes is appended to $ONESTOR_STEP_LOG, and at the step named $ONESTOR_CRASH_AT the
 * process kills itself with SIGKILL (no finally, no cleanup: a crash). At the step named $ONESTOR_PAUSE_AT
 * it waits until the file $ONESTOR_PAUSE_RELEASE exists (a step held open while a test looks). Test use only.
 * Usage: node dist/dev/crash-receiver.js SNAPS_DIR
 */
import { appendFileSync, existsSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { runReceiver } from '../lib/replica/receiver.js';
import { lentStdin } from '../lib/replica/stdio.js';

const snapsDir = process.argv[2];
if (!snapsDir?.startsWith('/')) {
  process.stderr.write('usage: crash-receiver SNAPS_DIR\n');
  process.exit(64);
}
const stepLog = process.env.ONESTOR_STEP_LOG;
const crashAt = process.env.ONESTOR_CRASH_AT;
const pauseAt = process.env.ONESTOR_PAUSE_AT;
const pauseRelease = process.env.ONESTOR_PAUSE_RELEASE;
process.stdout.on('error', () => {});
const code = await runReceiver(lentStdin(), process.stdout, {
  snapsDir,
  identity: 'hv-crash',
  lockTimeoutSec: 10,
  maxSessions: 4,
  busyWaitSec: 5,
  maxUsedPercent: 100,
  spaceCheck: false,
  idleTimeoutSec: 60,
  log: (obj, msg) => process.stderr.write(JSON.stringify({ ...obj, msg }) + '\n'),
  onStep: async (step) => {
    if (stepLog) appendFileSync(stepLog, step + '\n');
    if (step === crashAt) process.kill(process.pid, 'SIGKILL');
    if (step === pauseAt && pauseRelease) while (!existsSync(pauseRelease)) await sleep(20);
  },
});
process.stdout.end(() => process.exit(code));
