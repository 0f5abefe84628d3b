import { createHmac } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import {
  checkHostKey,
  fingerprintSha256,
  formatKnownHostsLine,
  hostFieldMatches,
  hostKeyError,
  hostKeyAlgorithmsFor,
  hostToken,
  keyTypeOfBlob,
  parseKnownHosts,
} from '../../lib/transfer/known-hosts.js';

/** A syntactically valid key blob: string type + some bytes (content is irrelevant to matching). */
function blob(type: string, fill: number): Buffer {
  const t = Buffer.from(type);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(t.length);
  const body = Buffer.alloc(36, fill);
  body.writeUInt32BE(32, 0);
  return Buffer.concat([len, t, body]);
}

const K1 = blob('ssh-ed25519', 1);
const K2 = blob('ssh-ed25519', 2);
const R1 = blob('ssh-rsa', 3);
const b64 = (b: Buffer) => b.toString('base64');
const hashed = (token: string, salt = Buffer.alloc(20, 9)) => `|1|${salt.toString('base64')}|${createHmac('sha1', salt).update(token).digest('base64')}`;

describe('known_hosts parsing', () => {
  it('parses plain, bracketed, hashed and marked lines; skips comments; reports malformed lines', () => {
    const text = [
      '# comment',
      '',
      `replica.example,10.0.0.5 ssh-ed25519 ${b64(K1)} root@replica`,
      `[10.0.0.5]:2222 ssh-rsa ${b64(R1)}`,
      `${hashed('[127.0.0.1]:2200')} ssh-ed25519 ${b64(K2)}`,
      `@cert-authority *.example ssh-ed25519 ${b64(K2)}`,
      `@revoked * ssh-rsa ${b64(R1)}`,
      `@bogus host ssh-ed25519 ${b64(K1)}`,
      'host-without-key ssh-ed25519',
      `host ssh-ed25519 not*base64`,
      `host ssh-rsa ${b64(K1)}`,
    ].join('\n');
    const p = parseKnownHosts(text);
    expect(p.entries.map((e) => [e.line, e.marker, e.keyType])).toEqual([
      [3, null, 'ssh-ed25519'],
      [4, null, 'ssh-rsa'],
      [5, null, 'ssh-ed25519'],
      [6, '@cert-authority', 'ssh-ed25519'],
      [7, '@revoked', 'ssh-rsa'],
    ]);
    expect(p.invalid.map((i) => i.line)).toEqual([8, 9, 10, 11]);
  });

  it('host patterns: port 22 plain, other ports bracketed, wildcards, negation, case, hashed', () => {
    expect(hostToken('Replica.Example', 22)).toBe('replica.example');
    expect(hostToken('10.0.0.5', 2222)).toBe('[10.0.0.5]:2222');
    expect(hostFieldMatches('a,replica.example', 'replica.example')).toBe(true);
    expect(hostFieldMatches('REPLICA.example', 'replica.example')).toBe(true);
    expect(hostFieldMatches('replica.example', '[replica.example]:2222')).toBe(false);
    expect(hostFieldMatches('*.example,!bad.example', 'bad.example')).toBe(false);
    expect(hostFieldMatches('*.example', 'good.example')).toBe(true);
    expect(hostFieldMatches('10.0.0.?', '10.0.0.5')).toBe(true);
    expect(hostFieldMatches('10.0.0.?', '10.0.0.50')).toBe(false);
    expect(hostFieldMatches('a.b', 'aXb')).toBe(false); // dots are literal
    expect(hostFieldMatches(hashed('[127.0.0.1]:2200'), '[127.0.0.1]:2200')).toBe(true);
    expect(hostFieldMatches(hashed('[127.0.0.1]:2200'), '[127.0.0.1]:2201')).toBe(false);
    expect(hostFieldMatches('|1|bad|hash', 'x')).toBe(false);
  });
});

describe('host key verdicts', () => {
  const known = parseKnownHosts(
    [`[127.0.0.1]:2200 ssh-ed25519 ${b64(K1)}`, `${hashed('other')} ssh-ed25519 ${b64(K2)}`, `@revoked * ssh-rsa ${b64(R1)}`].join('\n'),
  );
  it('match, unknown, changed, revoked', () => {
    expect(checkHostKey(known, '127.0.0.1', 2200, K1)).toEqual({ status: 'match', line: 1 });
    expect(checkHostKey(known, '127.0.0.1', 2201, K1)).toEqual({ status: 'unknown' });
    expect(checkHostKey(known, '127.0.0.1', 2200, K2)).toMatchObject({ status: 'changed', lines: [1] });
    expect(checkHostKey(known, 'other', 22, K2)).toEqual({ status: 'match', line: 2 });
    expect(checkHostKey(known, 'other', 22, R1)).toEqual({ status: 'revoked', line: 3 });
  });

  it('errors name the host, the fingerprint, the file and what to do', () => {
    const unknown = hostKeyError({ status: 'unknown' }, '10.1.1.1', 22, K1, '/etc/kh');
    expect(unknown?.code).toBe('E_HOSTKEY');
    expect(unknown?.message).toBe(`unknown host key for [10.1.1.1]:22 (fingerprint ${fingerprintSha256(K1)}); add it to /etc/kh or set replica.acceptNewHostKey`);
    const changed = hostKeyError({ status: 'changed', lines: [4], knownTypes: ['ssh-ed25519'] }, 'h', 2200, K2, '/etc/kh');
    expect(changed?.message).toMatch(/HOST KEY CHANGED for \[h\]:2200.*line\(s\) 4.*refusing/);
    expect(hostKeyError({ status: 'match', line: 1 }, 'h', 22, K1, 'f')).toBeNull();
    expect(fingerprintSha256(K1)).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
  });

  it('a formatted line (plain or hashed) is read back as a match', () => {
    for (const hashedLine of [false, true]) {
      const line = formatKnownHostsLine('127.0.0.1', 2200, K2, { hashed: hashedLine });
      expect(checkHostKey(parseKnownHosts(line), '127.0.0.1', 2200, K2).status).toBe('match');
    }
    expect(keyTypeOfBlob(Buffer.from([0, 0, 0, 99]))).toBeNull();
    expect(() => formatKnownHostsLine('h', 22, Buffer.alloc(2))).toThrow(/malformed/);
  });
});

describe('host-key algorithms to offer (like OpenSSH)', () => {
  const E1 = blob('ecdsa-sha2-nistp256', 4);
  it('only the types known for the host, in file order; RSA as its SHA-2 signature algorithms first', () => {
    const p = parseKnownHosts([`other ssh-ed25519 ${b64(K1)}`, `[10.0.0.5]:2222 ecdsa-sha2-nistp256 ${b64(E1)}`, `${hashed('[10.0.0.5]:2222')} ssh-rsa ${b64(R1)}`].join('\n'));
    expect(hostKeyAlgorithmsFor(p, '10.0.0.5', 2222)).toEqual(['ecdsa-sha2-nistp256', 'rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa']);
    expect(hostKeyAlgorithmsFor(p, 'other', 22)).toEqual(['ssh-ed25519']);
  });
  it('null for an unknown host (the library defaults apply); revoked and CA lines do not count', () => {
    const p = parseKnownHosts([`@revoked * ssh-rsa ${b64(R1)}`, `host ssh-rsa ${b64(R1)}`, `@cert-authority host ssh-ed25519 ${b64(K2)}`].join('\n'));
    expect(hostKeyAlgorithmsFor(p, 'nowhere', 22)).toBeNull();
    expect(hostKeyAlgorithmsFor(p, 'host', 22)).toBeNull();
  });
  it('filters to what the SSH library supports', () => {
    const p = parseKnownHosts(`h ssh-rsa ${b64(R1)}`);
    expect(hostKeyAlgorithmsFor(p, 'h', 22, ['rsa-sha2-256', 'ssh-ed25519'])).toEqual(['rsa-sha2-256']);
  });
});
