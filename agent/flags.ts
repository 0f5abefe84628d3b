/**
 * The command line's options and how they map onto the config file's shape (flags override the file).
 * Kept out of main.ts so commands can use them without importing the entry module.
 */
import { parseArgs } from 'node:util';
import { OnestorError, ErrorCodes } from '../lib/shared/errors.js';

const OPTIONS = {
  help: { type: 'boolean', short: 'h' },
  version: { type: 'boolean' },
  json: { type: 'boolean' },
  full: { type: 'boolean' },
  keep: { type: 'boolean' },
  vm: { type: 'string' },
  disk: { type: 'string' },
  config: { type: 'string' },
  datastores: { type: 'string' },
  'state-dir': { type: 'string' },
  'libvirt-uri': { type: 'string' },
  sshrc: { type: 'string' },
  'replica-host': { type: 'string' },
  'replica-port': { type: 'string' },
  'replica-user': { type: 'string' },
  identity: { type: 'string' },
  'known-hosts': { type: 'string' },
  'accept-new-host-key': { type: 'boolean' },
  'receiver-command': { type: 'string' },
  'snaps-dir': { type: 'string' },
  'max-sessions': { type: 'string' },
  host: { type: 'string' },
  'max-sessions-per-host': { type: 'string' },
  'hello-timeout': { type: 'string' },
  'idle-timeout': { type: 'string' },
  'drain-timeout': { type: 'string' },
  'progress-window': { type: 'string' },
  'min-progress-kib': { type: 'string' },
  'max-session-time': { type: 'string' },
  'bandwidth-mbps': { type: 'string' },
  'no-space-check': { type: 'boolean' },
  'no-direct-io': { type: 'boolean' },
  // receive: serve keys with neither --host nor an exposed key fingerprint (see lib/replica/identity.ts)
  'allow-unidentified': { type: 'boolean' },
  'lock-timeout': { type: 'string' },
  'busy-wait': { type: 'string' },
  'max-used-percent': { type: 'string' },
  'qemu-img': { type: 'string' },
  'log-level': { type: 'string' },
  'host-name': { type: 'string' },
  seconds: { type: 'string' },
  // probe
  state: { type: 'string' },
  'deadline-ms': { type: 'string' },
  prometheus: { type: 'string' },
  // yield: the destination host of the migration, to release the VM's lineages to
  to: { type: 'string' },
} as const;

export type Flags = ReturnType<typeof parseFlags>['values'];

export function parseFlags(argv: string[]) {
  return parseArgs({ args: argv, options: OPTIONS, allowPositionals: true, strict: true });
}

function intFlag(v: string | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  if (!/^\d+$/.test(v)) throw new OnestorError(ErrorCodes.CONFIG, `--${name} must be a non-negative integer, got ${JSON.stringify(v)}`, { field: `--${name}` });
  return Number(v);
}

/** CLI flags -> config overrides (same shape as the config file). */
export function overridesFrom(f: Flags): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  const replica: Record<string, unknown> = {};
  const receiver: Record<string, unknown> = {};
  if (f.datastores) o.datastoreLocation = f.datastores;
  if (f['state-dir']) o.stateDir = f['state-dir'];
  if (f['libvirt-uri']) o.libvirtUri = f['libvirt-uri'];
  if (f['host-name']) o.hostName = f['host-name'];
  if (f.sshrc) o.sshrcPaths = [f.sshrc];
  if (f['replica-host']) replica.hostOverride = f['replica-host'];
  if (f['replica-port']) replica.port = intFlag(f['replica-port'], 'replica-port');
  if (f['replica-user']) replica.user = f['replica-user'];
  if (f.identity) replica.identityFile = f.identity;
  if (f['known-hosts']) replica.knownHostsFile = f['known-hosts'];
  if (f['accept-new-host-key']) replica.acceptNewHostKey = true;
  if (f['receiver-command']) replica.receiverCommand = f['receiver-command'];
  if (f['snaps-dir']) receiver.snapsDir = f['snaps-dir'];
  if (f['max-sessions']) receiver.maxSessions = intFlag(f['max-sessions'], 'max-sessions');
  const receiverInts = [
    ['max-sessions-per-host', 'maxSessionsPerHost'],
    ['hello-timeout', 'helloTimeoutSec'],
    ['idle-timeout', 'idleTimeoutSec'],
    ['drain-timeout', 'drainTimeoutSec'],
    ['progress-window', 'progressWindowSec'],
    ['min-progress-kib', 'minProgressKiB'],
    ['max-session-time', 'maxSessionSec'],
  ] as const;
  for (const [flag, key] of receiverInts) if (f[flag] !== undefined) receiver[key] = intFlag(f[flag], flag);
  if (f['no-space-check']) receiver.spaceCheck = false;
  if (f['no-direct-io']) receiver.directIo = false;
  if (f['lock-timeout']) receiver.lockTimeoutSec = intFlag(f['lock-timeout'], 'lock-timeout');
  if (f['busy-wait']) receiver.busyWaitSec = intFlag(f['busy-wait'], 'busy-wait');
  if (f['max-used-percent']) receiver.maxUsedPercent = intFlag(f['max-used-percent'], 'max-used-percent');
  if (f['qemu-img']) o.qemuImg = f['qemu-img'];
  if (f['log-level']) o.log = { level: f['log-level'] };
  if (f['bandwidth-mbps']) o.limits = { bandwidthMBps: intFlag(f['bandwidth-mbps'], 'bandwidth-mbps') };
  if (Object.keys(replica).length) o.replica = replica;
  if (Object.keys(receiver).length) o.receiver = receiver;
  return o;
}

