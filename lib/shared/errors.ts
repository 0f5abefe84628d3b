/**
 * Errors with stable codes. Every failure the agent reports (logs, state, probe, protocol, exit codes)
 * carries one of these codes so scripts and admins can match on it, plus enough context (file, field,
 * VM, disk) to act on it without reading the source.
 */
export const ErrorCodes = {
  CONFIG: 'E_CONFIG', // agent config file or CLI flag invalid
  SSHRC: 'E_SSHRC', // driver settings file unreadable or malformed
  VM_XML: 'E_VM_XML', // vm.xml missing, malformed or with a bad field
  DS_XML: 'E_DS_XML', // ds.xml missing, malformed or with a bad field
  NOT_ELIGIBLE: 'E_NOT_ELIGIBLE', // disk is not set up for protection
  DOMAIN: 'E_DOMAIN', // libvirt domain missing / not running / unexpected
  VIRSH: 'E_VIRSH', // virsh failed
  QEMU_IMG: 'E_QEMU_IMG', // qemu-img failed
  CAPTURE: 'E_CAPTURE', // backup job failed / timed out
  CHECKPOINT: 'E_CHECKPOINT', // checkpoint missing, broken, or not the expected one
  NOSPACE: 'E_NOSPACE', // not enough free space (local staging or replica)
  SSH: 'E_SSH', // connection / authentication / host key problem
  HOSTKEY: 'E_HOSTKEY', // replica host key unknown or changed
  PROTOCOL: 'E_PROTOCOL', // malformed frame or message, version mismatch
  PATH: 'E_PATH', // id or path outside the allowed area
  BUSY: 'E_BUSY', // receiver session cap reached
  LOCK_TIMEOUT: 'E_LOCK_TIMEOUT', // per-disk lock not acquired within REPLICA_COPY_LOCK_TIMEOUT
  SIZE: 'E_SIZE', // received size differs from announced size
  DIGEST: 'E_DIGEST', // sha256 mismatch
  PARENT: 'E_PARENT', // incremental parent is not what the replica holds
  VANISHED: 'E_VANISHED', // replica VM dir removed during the session
  STATE: 'E_STATE', // agent state file unreadable / corrupt
  ABORTED: 'E_ABORTED', // cancelled (SIGTERM, timeout)
  NBD: 'E_NBD', // NBD export refused, malformed or cut
  YIELDED: 'E_YIELDED', // gave way to a live migration of the VM (yield marker or migration seen); retried
  SOURCE_DAMAGED: 'E_SOURCE_DAMAGED', // qemu-img check found errors in the host's base.1: replica snapshot kept
  INTERNAL: 'E_INTERNAL',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

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
