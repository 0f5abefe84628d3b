/**
 * known_hosts parsing and host key checks (OpenSSH format). PURE: text in, decisions out; the caller reads
 * and appends the file. Supports plain and hashed (`|1|salt|hash`) host patterns, `[host]:port`, wildcards
 * and negation, comments. `@cert-authority` lines are ignored (no certificates here); `@revoked` keys are refused.
 */
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { ErrorCodes, OnestorError } from '../shared/errors.js';

export interface KnownHostEntry {
  line: number;
  marker: '@revoked' | '@cert-authority' | null;
  /** The host pattern field as written (comma-separated, or one hashed `|1|salt|hash`). */
  hosts: string;
  keyType: string;
  key: Buffer;
}

export interface KnownHostsParse {
  entries: KnownHostEntry[];
  /** Lines that are not comments and could not be parsed (ignored, like OpenSSH does, but reported). */
  invalid: { line: number; reason: string }[];
}

export function parseKnownHosts(text: string): KnownHostsParse {
  const entries: KnownHostEntry[] = [];
  const invalid: KnownHostsParse['invalid'] = [];
  const lines = text.split(/\r?\n/);
  lines.forEach((raw, i) => {
    const lineNo = i + 1;
    const line = raw.trim();
    if (!line || line.startsWith('#')) return;
    const fields = line.split(/[ \t]+/);
    let marker: KnownHostEntry['marker'] = null;
    if (fields[0]!.startsWith('@')) {
      const m = fields.shift()!;
      if (m !== '@revoked' && m !== '@cert-authority') {
        invalid.push({ line: lineNo, reason: `unknown marker ${m}` });
        return;
      }
      marker = m;
    }
    const [hosts, keyType, keyB64] = fields;
    if (!hosts || !keyType || !keyB64) {
      invalid.push({ line: lineNo, reason: 'expected: hosts keytype base64-key' });
      return;
    }
    if (!/^[A-Za-z0-9+/]+={0,2}$/.test(keyB64)) {
      invalid.push({ line: lineNo, reason: 'key is not base64' });
      return;
    }
    const key = Buffer.from(keyB64, 'base64');
    const blobType = keyTypeOfBlob(key);
    if (blobType === null || blobType !== keyType) {
      invalid.push({ line: lineNo, reason: `key blob does not hold a ${keyType} key` });
      return;
    }
    entries.push({ line: lineNo, marker, hosts, keyType, key });
  });
  return { entries, invalid };
}

/** The key type named inside an SSH public key blob (string length + name), or null when malformed. */
export function keyTypeOfBlob(blob: Buffer): string | null {
  if (blob.length < 4) return null;
  const len = blob.readUInt32BE(0);
  if (len < 1 || len > 64 || 4 + len > blob.length) return null;
  const name = blob.subarray(4, 4 + len).toString('latin1');
  return /^[A-Za-z0-9@._+-]+$/.test(name) ? name : null;
}

/** How OpenSSH names a host in known_hosts: plain for port 22, `[host]:port` otherwise. */
export function hostToken(host: string, port: number): string {
  return port === 22 ? host.toLowerCase() : `[${host.toLowerCase()}]:${port}`;
}

export function fingerprintSha256(blob: Buffer): string {
  return 'SHA256:' + createHash('sha256').update(blob).digest('base64').replace(/=+$/, '');
}

function globMatch(pattern: string, text: string): boolean {
  const re = new RegExp(
    '^' +
      pattern
        .split('')
        .map((ch) => (ch === '*' ? '.*' : ch === '?' ? '.' : ch.replace(/[\\^$.+()[\]{}|]/g, '\\$&')))
        .join('') +
      '$',
  );
  return re.test(text);
}

function hashedMatch(field: string, token: string): boolean {
  const parts = field.split('|');
  // ['', '1', salt, hash]
  if (parts.length !== 4 || parts[1] !== '1') return false;
  const salt = Buffer.from(parts[2]!, 'base64');
  const want = Buffer.from(parts[3]!, 'base64');
  if (salt.length === 0 || want.length !== 20) return false;
  const got = createHmac('sha1', salt).update(token).digest();
  return got.equals(want);
}

/** Whether the host field of an entry matches `token` (a negated match wins, as in OpenSSH). */
export function hostFieldMatches(field: string, token: string): boolean {
  if (field.startsWith('|')) return hashedMatch(field, token);
  let matched = false;
  for (const rawPattern of field.split(',')) {
    const negated = rawPattern.startsWith('!');
    const pattern = (negated ? rawPattern.slice(1) : rawPattern).toLowerCase();
    if (!pattern) continue;
    if (globMatch(pattern, token)) {
      if (negated) return false;
      matched = true;
    }
  }
  return matched;
}

export type HostKeyVerdict =
  | { status: 'match'; line: number }
  | { status: 'unknown' }
  | { status: 'changed'; lines: number[]; knownTypes: string[] }
  | { status: 'revoked'; line: number };

/**
 * Decision for a presented key. A key of the same type that differs is "changed"; a host known only by
 * other key types is also "changed" (OpenSSH would not silently accept a new key type either).
 */
export function checkHostKey(parsed: KnownHostsParse, host: string, port: number, key: Buffer): HostKeyVerdict {
  const token = hostToken(host, port);
  for (const e of parsed.entries) {
    if (e.marker === '@revoked' && e.key.equals(key)) return { status: 'revoked', line: e.line };
  }
  const candidates = parsed.entries.filter((e) => e.marker === null && hostFieldMatches(e.hosts, token));
  const exact = candidates.find((e) => e.key.equals(key));
  if (exact) return { status: 'match', line: exact.line };
  if (candidates.length === 0) return { status: 'unknown' };
  return { status: 'changed', lines: candidates.map((c) => c.line), knownTypes: [...new Set(candidates.map((c) => c.keyType))] };
}

/** SSH host-key algorithms (what KEXINIT negotiates) for each key type that known_hosts records. */
const ALGORITHMS_OF_KEY_TYPE: Record<string, readonly string[]> = {
  'ssh-ed25519': ['ssh-ed25519'],
  'ecdsa-sha2-nistp256': ['ecdsa-sha2-nistp256'],
  'ecdsa-sha2-nistp384': ['ecdsa-sha2-nistp384'],
  'ecdsa-sha2-nistp521': ['ecdsa-sha2-nistp521'],
  // an RSA key signs with SHA-2 (RFC 8332) on any current server; plain ssh-rsa (SHA-1) last
  'ssh-rsa': ['rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa'],
  'ssh-dss': ['ssh-dss'],
};

/** The entries that name this host with a key not revoked, in file order: the keys it may present. */
function acceptedEntries(parsed: KnownHostsParse, host: string, port: number): KnownHostEntry[] {
  const token = hostToken(host, port);
  const revoked = parsed.entries.filter((e) => e.marker === '@revoked');
  return parsed.entries.filter((e) => e.marker === null && hostFieldMatches(e.hosts, token) && !revoked.some((r) => r.key.equals(e.key)));
}

/**
 * Host-key algorithms to offer, like OpenSSH: those of the key types known_hosts holds for this host, in
 * file order, and ONLY those; null when the host is not in known_hosts (offer the client's defaults).
 * Without this the server picks its preferred type (ed25519) and a host recorded only by its ECDSA or RSA
 * key (as ssh-keyscan often records it) would be reported as changed. `supported` filters to what the
 * SSH library implements.
 */
export function hostKeyAlgorithmsFor(parsed: KnownHostsParse, host: string, port: number, supported?: readonly string[]): string[] | null {
  const out: string[] = [];
  for (const e of acceptedEntries(parsed, host, port)) {
    for (const alg of ALGORITHMS_OF_KEY_TYPE[e.keyType] ?? []) {
      if ((!supported || supported.includes(alg)) && !out.includes(alg)) out.push(alg);
    }
  }
  return out.length ? out : null;
}

/** A line to append for a newly accepted key; hashed like `HashKnownHosts yes` when asked. */
export function formatKnownHostsLine(host: string, port: number, key: Buffer, opts: { hashed?: boolean; salt?: Buffer } = {}): string {
  const type = keyTypeOfBlob(key);
  if (!type) throw new OnestorError(ErrorCodes.HOSTKEY, 'presented host key blob is malformed');
  const token = hostToken(host, port);
  let hosts = token;
  if (opts.hashed) {
    const salt = opts.salt ?? randomBytes(20);
    hosts = `|1|${salt.toString('base64')}|${createHmac('sha1', salt).update(token).digest('base64')}`;
  }
  return `${hosts} ${type} ${key.toString('base64')}`;
}

/** The E_HOSTKEY error for a verdict that must refuse the connection; null when the key is acceptable. */
export function hostKeyError(verdict: HostKeyVerdict, host: string, port: number, key: Buffer, file: string): OnestorError | null {
  const who = `[${host}]:${port}`;
  const fp = fingerprintSha256(key);
  switch (verdict.status) {
    case 'match':
      return null;
    case 'unknown':
      return new OnestorError(
        ErrorCodes.HOSTKEY,
        `unknown host key for ${who} (fingerprint ${fp}); add it to ${file} or set replica.acceptNewHostKey`,
        { file, field: 'replica.acceptNewHostKey' },
      );
    case 'changed':
      return new OnestorError(
        ErrorCodes.HOSTKEY,
        `HOST KEY CHANGED for ${who}: presented ${fp} does not match ${file} line(s) ${verdict.lines.join(', ')}; ` +
          'refusing to connect (possible man-in-the-middle). If the replica was reinstalled, remove the old line(s).',
        { file },
      );
    case 'revoked':
      return new OnestorError(ErrorCodes.HOSTKEY, `host key ${fp} of ${who} is marked @revoked in ${file} line ${verdict.line}`, { file });
  }
}

/**
 * The keys known_hosts accepts for this host, as a known_hosts text of its own under the name `alias`
 * (revoked keys left out), for an OpenSSH client told to trust exactly these (`HostKeyAlias=alias`): the
 * policy (hashed patterns, wildcards, negation, @revoked) stays this module's, OpenSSH only compares keys.
 * null when the host is not in known_hosts.
 */
export function pinnedKnownHosts(parsed: KnownHostsParse, host: string, port: number, alias: string): string | null {
  const lines = acceptedEntries(parsed, host, port).map((e) => `${alias} ${e.keyType} ${e.key.toString('base64')}`);
  return lines.length ? lines.join('\n') + '\n' : null;
}
