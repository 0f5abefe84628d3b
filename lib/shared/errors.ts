/**
 * Errors with stable codes. Every failure the agent reports (logs, state, probe, protocol, exit codes)
 * carries one of these codes so scripts and admins can match on it, plus enough context (file, field,
 * VM, disk) to act on it without reading the source.
 *
 * ERROR_CATALOGUE is the ONE list of codes: docs/errors.md is checked against it by a unit test
 * (test/unit/errors-catalogue.test.ts), which also fails on any `E_...` string in the code that is not here.
 */
export const ErrorCodes = {
  CONFIG: 'E_CONFIG',
  SSHRC: 'E_SSHRC',
  VM_XML: 'E_VM_XML',
  DS_XML: 'E_DS_XML',
  NOT_ELIGIBLE: 'E_NOT_ELIGIBLE',
  DOMAIN: 'E_DOMAIN',
  VIRSH: 'E_VIRSH',
  QEMU_IMG: 'E_QEMU_IMG',
  CAPTURE: 'E_CAPTURE',
  CHECKPOINT: 'E_CHECKPOINT',
  NOSPACE: 'E_NOSPACE',
  SSH: 'E_SSH',
  HOSTKEY: 'E_HOSTKEY',
  PROTOCOL: 'E_PROTOCOL',
  PATH: 'E_PATH',
  BUSY: 'E_BUSY',
  LOCK_TIMEOUT: 'E_LOCK_TIMEOUT',
  SIZE: 'E_SIZE',
  DIGEST: 'E_DIGEST',
  PARENT: 'E_PARENT',
  VANISHED: 'E_VANISHED',
  OWNER: 'E_OWNER',
  IDENTITY: 'E_IDENTITY',
  RELEASE: 'E_RELEASE',
  STATE: 'E_STATE',
  CHANGED: 'E_CHANGED',
  TIMEOUT: 'E_TIMEOUT',
  ABORTED: 'E_ABORTED',
  AGENT_DOWN: 'E_AGENT_DOWN',
  NO_SNAPSHOT: 'E_NO_SNAPSHOT',
  OVERDUE: 'E_OVERDUE',
  NBD: 'E_NBD',
  YIELDED: 'E_YIELDED',
  SOURCE_DAMAGED: 'E_SOURCE_DAMAGED',
  INTERNAL: 'E_INTERNAL',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

/** Where a code is reported: agent = logs, state, `status`, exit codes; probe = OpenNebula/Prometheus verdicts; replica = receiver error replies. */
export type ErrorScope = 'agent' | 'probe' | 'replica';

export interface ErrorInfo {
  readonly meaning: string;
  /** what an admin does about it */
  readonly action: string;
  readonly scope: readonly ErrorScope[];
}

/** The catalogue: a Record over ErrorCode, so a code without an entry does not compile. */
export const ERROR_CATALOGUE: Readonly<Record<ErrorCode, ErrorInfo>> = Object.freeze({
  E_CONFIG: { meaning: 'agent config file, environment variable or command-line flag invalid', action: 'fix the file/field named in the message', scope: ['agent', 'replica'] },
  E_SSHRC: { meaning: 'driver settings file (sshrc) unreadable or malformed', action: 'fix the key named in the message in sshrc', scope: ['agent', 'replica', 'probe'] },
  E_VM_XML: { meaning: 'vm.xml missing, malformed or with a bad field', action: 'redeploy the VM or fix its template', scope: ['agent'] },
  E_DS_XML: { meaning: 'ds.xml missing, malformed or with a bad field (e.g. no REPLICA_HOST)', action: 'set REPLICA_HOST on the system datastore; redeploy', scope: ['agent'] },
  E_NOT_ELIGIBLE: { meaning: 'disk is not set up for protection (no disk.N.snap/base.1, no RECOVERY_SNAPSHOT_FREQ)', action: 'none if intended; else set RECOVERY_SNAPSHOT_FREQ', scope: ['agent'] },
  E_DOMAIN: { meaning: 'libvirt domain missing, not running, or not running on the expected disk', action: 'check `virsh list`; the next cycle retries', scope: ['agent'] },
  E_VIRSH: { meaning: 'virsh failed (connection, timeout, unexpected output)', action: 'check libvirtd and the libvirt URI', scope: ['agent'] },
  E_QEMU_IMG: { meaning: 'qemu-img failed or reported a damaged image', action: 'read the qemu-img message; check the image', scope: ['agent', 'replica'] },
  E_CAPTURE: { meaning: 'backup job failed or did not finish within limits.captureTimeoutSec', action: 'check the domain and libvirtd logs; the next cycle retries', scope: ['agent'] },
  E_CHECKPOINT: { meaning: 'checkpoint missing, broken, or not the expected one', action: 'none: the next cycle takes a full', scope: ['agent'] },
  E_NOSPACE: { meaning: 'not enough free space (local staging or replica, REPLICA_MAX_USED_PERC)', action: 'free space on the datastore or the replica', scope: ['agent', 'replica'] },
  E_SSH: { meaning: 'SSH connection or authentication to the replica failed', action: 'check the key, the user and that the replica is reachable', scope: ['agent'] },
  E_HOSTKEY: { meaning: 'replica host key unknown or changed', action: 'record the key in known_hosts (or --accept-new-host-key once)', scope: ['agent'] },
  E_PROTOCOL: { meaning: 'malformed frame or message, or protocol version mismatch', action: 'run the same agent version on hosts and replica', scope: ['agent', 'replica'] },
  E_PATH: { meaning: 'id or path outside the allowed area', action: 'none on a sane cluster: investigate the client', scope: ['agent', 'replica'] },
  E_BUSY: { meaning: 'every receiver session slot stayed busy for receiver.busyWaitSec', action: 'raise receiver.maxSessions or lower limits.concurrency', scope: ['replica'] },
  E_LOCK_TIMEOUT: { meaning: 'a lock (per-disk on the replica, per-VM on the host) not acquired in time (REPLICA_COPY_LOCK_TIMEOUT)', action: 'look for a stuck session holding it; the next cycle retries', scope: ['agent', 'replica'] },
  E_SIZE: { meaning: 'received size differs from the announced size', action: 'none: the upload is retried', scope: ['agent', 'replica'] },
  E_DIGEST: { meaning: 'sha256 of what arrived differs from what was announced', action: 'none: the upload is retried; repeated: check memory and disks', scope: ['agent', 'replica'] },
  E_PARENT: { meaning: 'incremental parent is not what the replica holds', action: 'none: the next cycle takes a full', scope: ['agent', 'replica'] },
  E_VANISHED: { meaning: 'replica VM dir removed during the session (upstream delete)', action: 'none: the next cycle sends a full', scope: ['replica'] },
  E_STATE: { meaning: 'agent state file unreadable or corrupt', action: 'none: it is moved aside and rebuilt from the replica', scope: ['agent', 'probe'] },
  E_CHANGED: { meaning: 'a local file changed while the agent read it (base image hashed while being replaced)', action: 'none: the next cycle reads it again', scope: ['agent'] },
  E_TIMEOUT: { meaning: 'a transfer to the replica did not finish within limits.transferTimeoutSec', action: 'check the link; raise limits.transferTimeoutSec for very large disks', scope: ['agent'] },
  E_ABORTED: { meaning: 'cancelled (SIGTERM/SIGINT, session ended); the previous snapshot stands', action: 'none', scope: ['agent', 'replica'] },
  E_AGENT_DOWN: { meaning: 'probe: protected disks exist but the daemon is not running (no fresh heartbeat, or not installed)', action: 'systemctl start onestor-agent; install it on the host', scope: ['probe'] },
  E_NO_SNAPSHOT: { meaning: 'probe: a protected disk has no snapshot yet', action: 'wait one cycle; if it persists, run `onestor-agent status`', scope: ['probe'] },
  E_OVERDUE: { meaning: 'probe: the last snapshot is older than RECOVERY_SNAPSHOT_FREQ plus grace', action: 'run `onestor-agent status` and read the disk\'s last error', scope: ['probe'] },
  E_OWNER: { meaning: 'an incremental on a lineage another host published last (or with no recorded owner) was refused', action: 'none: the agent sends a full, which takes the lineage over (logged and counted on the replica)', scope: ['replica', 'agent'] },
  E_IDENTITY: { meaning: 'the replica cannot tell which host a key belongs to (no --host in its forced command, no ExposeAuthInfo fingerprint)', action: "re-authorize the key with install.sh --replica --authorize KEY --host NAME (or add --allow-unidentified for a transition)", scope: ['replica'] },
  E_NBD: { meaning: 'the pull-mode export (NBD) refused the client, sent a malformed reply, or was cut mid-stream', action: 'none: the cycle is retried; the replica keeps its previous snapshot', scope: ['agent'] },
  E_RELEASE: { meaning: 'a lineage release was refused: the session is not the lineage\'s owner, there is no lineage, or the recipient is invalid (yourself, unidentified)', action: 'none: the destination of the migration takes a full (a take-over); repeated by one host: investigate that host', scope: ['replica', 'agent'] },
  E_YIELDED: { meaning: 'the cycle gave way to a live migration of the VM (yield marker or migration seen)', action: 'none: retried after the migration', scope: ['agent'] },
  E_SOURCE_DAMAGED: { meaning: "qemu-img check found errors in the host's base.1: nothing published, the replica's snapshot is kept", action: "check the VM's disk on the host (qemu-img check); the next clean cycle publishes", scope: ['agent'] },
  E_INTERNAL: { meaning: 'an unexpected failure: a bug, or a part of the environment the agent does not handle (e.g. the sd_notify transport)', action: 'report it with the log line', scope: ['agent', 'replica', 'probe'] },
});

export function isErrorCode(s: string): s is ErrorCode {
  return Object.prototype.hasOwnProperty.call(ERROR_CATALOGUE, s);
}

export interface ErrorContext {
  file?: string;
  field?: string;
  vm?: number;
  disk?: number;
  [key: string]: unknown;
}

export class OnestorError extends Error {
  readonly code: ErrorCode;
  readonly context: ErrorContext;

  constructor(code: ErrorCode, message: string, context: ErrorContext = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'OnestorError';
    this.code = code;
    this.context = context;
  }

  /** One line for logs, state and probe output: "E_VM_XML vm 7: /path/vm.xml: ... (field X)". */
  describe(): string {
    return describeError(this);
  }
}

export function isOnestorError(e: unknown): e is OnestorError {
  return e instanceof OnestorError;
}

/** Stable one-line rendering of any thrown value. */
export function describeError(e: unknown): string {
  if (e instanceof OnestorError) {
    const where: string[] = [];
    if (e.context.vm !== undefined) where.push(`vm ${e.context.vm}`);
    if (e.context.disk !== undefined) where.push(`disk ${e.context.disk}`);
    const head = where.length ? `${e.code} ${where.join(' ')}: ` : `${e.code}: `;
    const file = e.context.file ? `${e.context.file}: ` : '';
    const field = e.context.field ? ` (field ${e.context.field})` : '';
    return `${head}${file}${e.message}${field}`;
  }
  if (e instanceof Error) return `${ErrorCodes.INTERNAL}: ${e.message}`;
  return `${ErrorCodes.INTERNAL}: ${String(e)}`;
}

export function errorCodeOf(e: unknown): ErrorCode {
  return e instanceof OnestorError ? e.code : ErrorCodes.INTERNAL;
}
