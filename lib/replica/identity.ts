/**
 * Who is writing, as sshd authenticated it (DESIGN §6). PURE: no I/O; agent/commands/receive.ts and agent/receiver-main.ts read the
 * SSH_USER_AUTH file and pass its text in.
 *
 * The writer's identity is one string, from three disjoint namespaces (a host name cannot contain ':' or '('):
 *   - `hvA`                 the host name bound into the key's forced command (`receive --host hvA`);
 *   - `SHA256:<base64>`     the fingerprint (as `ssh-keygen -l` prints it) of the key sshd accepted, when no
 *                           --host is given and sshd runs with `ExposeAuthInfo yes` (SSH_USER_AUTH);
 *   - `(unidentified)`      neither, and the receiver was started with --allow-unidentified: every such key is
 *                           the same writer, so ownership cannot tell them apart (logged at warning per session).
 * Without --host, without a usable SSH_USER_AUTH and without --allow-unidentified the receiver refuses the
 * session (E_IDENTITY): failing closed is the only way a forgotten --host does not quietly merge all hosts.
 * The client's `hello.host` is never an input here.
 */
import { createHash } from 'node:crypto';
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import { UNIDENTIFIED_WRITER } from '../shared/ledger.js';

export const UNIDENTIFIED = UNIDENTIFIED_WRITER;
export type IdentityKind = 'host' | 'key' | 'unidentified';

/**
 * A host name as an opaque label: a letter or digit, then letters, digits, '.', '_', '-', at most 253 chars.
 * A superset of what install.sh accepts for --host (so no authorized line it writes is refused here); no
 * character that could break a log line, a probe attribute or the forced command, and never ':' or '(' (the
 * fingerprint and unidentified namespaces). It is only compared and shown, never used as a path.
 */
const HOSTNAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$/;
const FINGERPRINT_RE = /^SHA256:[A-Za-z0-9+/]{43}$/;

/** Validates the value of `receive --host NAME`; anything but a plain host name is E_CONFIG. */
export function parseHostFlag(value: string): string {
  if (!HOSTNAME_RE.test(value)) {
    throw new OnestorError(
      ErrorCodes.CONFIG,
      `--host must be a host name (a letter or digit, then letters, digits, '.', '_', '-'; at most 253 characters), got ${JSON.stringify(value.slice(0, 80))}`,
      { field: '--host' },
    );
  }
  return value;
}

export function identityKind(identity: string): IdentityKind {
  if (identity === UNIDENTIFIED) return 'unidentified';
  if (FINGERPRINT_RE.test(identity)) return 'key';
  return 'host';
}

/** True for any value resolveIdentity can return (used to check stored manifests and options). */
export function isValidIdentity(identity: string): boolean {
  return identity === UNIDENTIFIED || FINGERPRINT_RE.test(identity) || HOSTNAME_RE.test(identity);
}

/** `SHA256:...` of a public key blob, exactly as `ssh-keygen -l` prints it (base64 without padding). */
export function fingerprintOfBlob(blob: Buffer): string {
  return `SHA256:${createHash('sha256').update(blob).digest('base64').replace(/=+$/, '')}`;
}

/**
 * The key sshd authenticated, from the SSH_USER_AUTH file (`ExposeAuthInfo yes`): lines `METHOD [DETAILS]`,
 * a public key as `publickey TYPE BASE64`. Returns its fingerprint, or null with the reason when the text
 * does not name exactly one plain public key (several keys, certificates, garbage). Never throws.
 */
export function fingerprintFromUserAuth(text: string): { fingerprint: string } | { fingerprint: null; reason: string } {
  if (text.length > 64 * 1024) return { fingerprint: null, reason: 'SSH_USER_AUTH file is larger than 64 KiB' };
  const keys: string[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.replace(/\r$/, '');
    if (!line.trim()) continue;
    const parts = line.split(' ');
    if (parts[0] !== 'publickey') continue; // other methods (keyboard-interactive, ...) name no key
    if (parts.length !== 3) return { fingerprint: null, reason: 'malformed publickey line in SSH_USER_AUTH' };
    const [, type, b64] = parts as [string, string, string];
    if (!/^[a-z0-9@.-]{1,64}$/.test(type)) return { fingerprint: null, reason: 'malformed key type in SSH_USER_AUTH' };
    if (type.includes('-cert-')) return { fingerprint: null, reason: 'certificate authentication: bind the host with --host instead' };
    if (!/^[A-Za-z0-9+/]+={0,2}$/.test(b64) || b64.length > 16 * 1024) return { fingerprint: null, reason: 'malformed key in SSH_USER_AUTH' };
    const blob = Buffer.from(b64, 'base64');
    // The blob starts with its own type string: it must be the type the line names.
    if (blob.length < 4) return { fingerprint: null, reason: 'malformed key in SSH_USER_AUTH' };
    const n = blob.readUInt32BE(0);
    if (n > 64 || blob.length < 4 + n || blob.subarray(4, 4 + n).toString('latin1') !== type) {
      return { fingerprint: null, reason: 'key type in SSH_USER_AUTH does not match the key' };
    }
    keys.push(fingerprintOfBlob(blob));
  }
  const distinct = [...new Set(keys)];
  if (distinct.length === 0) return { fingerprint: null, reason: 'SSH_USER_AUTH names no public key' };
  if (distinct.length > 1) return { fingerprint: null, reason: 'SSH_USER_AUTH names several public keys: bind the host with --host' };
  return { fingerprint: distinct[0]! };
}

export interface IdentityInputs {
  /** value of --host, if given */
  host?: string;
  /** contents of the file named by SSH_USER_AUTH; undefined when unset or unreadable */
  userAuthText?: string;
  /** why userAuthText is missing (for the error message) */
  userAuthError?: string;
  allowUnidentified?: boolean;
}

export interface ResolvedIdentity {
  identity: string;
  kind: IdentityKind;
  /** fingerprint of the authenticated key when sshd exposed it (logged beside a --host identity) */
  keyFingerprint?: string;
  /** what the admin should know about how it was chosen (logged at warning when kind is unidentified) */
  note?: string;
}

/** --host wins; else the key's fingerprint; else (unidentified) only when allowed; else E_IDENTITY. */
export function resolveIdentity(i: IdentityInputs): ResolvedIdentity {
  const fp = i.userAuthText !== undefined ? fingerprintFromUserAuth(i.userAuthText) : null;
  const keyFingerprint = fp && fp.fingerprint ? fp.fingerprint : undefined;
  if (i.host !== undefined) return { identity: parseHostFlag(i.host), kind: 'host', ...(keyFingerprint ? { keyFingerprint } : {}) };
  if (keyFingerprint) return { identity: keyFingerprint, kind: 'key', keyFingerprint };
  const why = fp && 'reason' in fp ? fp.reason : (i.userAuthError ?? 'SSH_USER_AUTH is not set (sshd ExposeAuthInfo is off)');
  if (i.allowUnidentified) {
    return { identity: UNIDENTIFIED, kind: 'unidentified', note: `writer not identified (${why}); all such keys count as one writer` };
  }
  throw new OnestorError(
    ErrorCodes.IDENTITY,
    `the replica cannot tell which host this key belongs to (${why}): authorize the key with ` +
      `command="onestor-agent receive --host NAME",restrict (install.sh --replica --authorize KEY --host NAME), ` +
      `or enable ExposeAuthInfo in sshd, or start the receiver with --allow-unidentified`,
    { field: '--host' },
  );
}

/**
 * Whether the name a client claims in hello is the host its key is bound to: equal, ignoring case, or the
 * same host written short and fully qualified (install.sh suggests `hostname -s`, the agent says `hostname`).
 * Only decides whether a warning is logged; the claim is never used.
 */
export function claimMatches(claimed: string, identity: string): boolean {
  const a = claimed.toLowerCase();
  const b = identity.toLowerCase();
  return a === b || a.split('.')[0] === b || b.split('.')[0] === a;
}

/** A short, file-name-safe tag of an identity (upload names, ledger files). */
export function identityTag(identity: string): string {
  return createHash('sha256').update(identity).digest('hex').slice(0, 16);
}
