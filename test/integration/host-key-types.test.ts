/**
 * known_hosts like OpenSSH against a real sshd that has ed25519, ECDSA and RSA host keys: the client offers
 * only the key types known_hosts records for the replica, so an ECDSA- or RSA-only entry (as ssh-keyscan
 * often leaves) connects, and a different key of that type is still refused as changed.
 */
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { errorCodeOf } from '../../lib/shared/errors.js';
import { run } from '../../lib/shared/exec.js';
import { formatKnownHostsLine } from '../../lib/transfer/known-hosts.js';
import { ReplicaClient, type ReplicaConnectOptions } from '../../lib/transfer/replica-client.js';
import { startSshd, type Sshd } from '../harness/sshd.js';

let all: Sshd;
let edOnly: Sshd;
let work: string;

beforeAll(async () => {
  work = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-hkt-'));
  all = await startSshd({ hostKeyTypes: ['ed25519', 'ecdsa', 'rsa'] });
  edOnly = await startSshd();
}, 120_000);

afterAll(async () => {
  await all?.stop();
  await edOnly?.stop();
  if (work) await fsp.rm(work, { recursive: true, force: true });
});

/** An SSH session with host key checking only (ReplicaClient.connect would also need a receiver). */
async function handshake(s: Sshd, knownHosts: string): Promise<unknown> {
  const kh = path.join(work, `kh-${Math.random().toString(36).slice(2)}`);
  await fsp.writeFile(kh, knownHosts, { mode: 0o600 });
  const o: ReplicaConnectOptions = {
    host: s.host,
    port: s.port,
    username: s.user,
    privateKey: s.clientKeyPath,
    knownHostsFile: kh,
    acceptNewHostKey: false,
    // no receiver behind this sshd: `cat` echoes our hello back, which fails the hello AFTER the handshake
    receiverCommand: 'cat',
    connectTimeoutMs: 10_000,
  };
  return ReplicaClient.connect(o).then(
    (c) => c.close().then(() => 'connected'),
    (e) => e,
  );
}

/**
 * Host key accepted and logged in: the exec channel ran, `cat` echoed our hello, and the client refused
 * that echo as a protocol error (E_PROTOCOL comes only after the SSH handshake and authentication).
 */
function passedHostKey(r: unknown): boolean {
  return r === 'connected' || errorCodeOf(r) === 'E_PROTOCOL';
}

async function otherKey(type: 'ecdsa' | 'rsa'): Promise<string> {
  const f = path.join(work, `other-${type}-${Math.random().toString(36).slice(2)}`);
  const r = await run('ssh-keygen', ['-q', '-t', type, ...(type === 'rsa' ? ['-b', '2048'] : []), '-N', '', '-f', f]);
  if (r.code !== 0) throw new Error(r.stderr);
  return (await fsp.readFile(`${f}.pub`, 'utf8')).trim().split(/\s+/).slice(0, 2).join(' ');
}

const line = (s: Sshd, key: string) => `[127.0.0.1]:${s.port} ${key}\n`;

describe('host key types offered from known_hosts', () => {
  it('only the ECDSA key recorded: connects (the server would prefer ed25519)', async () => {
    const r = await handshake(all, line(all, all.hostPublicKeys.ecdsa!));
    expect(passedHostKey(r), String(r)).toBe(true);
  });

  it('only the RSA key recorded: connects', async () => {
    const r = await handshake(all, line(all, all.hostPublicKeys.rsa!));
    expect(passedHostKey(r), String(r)).toBe(true);
  });

  it('a different ECDSA key recorded: refused as HOST KEY CHANGED', async () => {
    const r = await handshake(all, line(all, await otherKey('ecdsa')));
    expect(errorCodeOf(r)).toBe('E_HOSTKEY');
    expect((r as Error).message).toMatch(/HOST KEY CHANGED/);
  });

  it('a different RSA key recorded: refused as HOST KEY CHANGED', async () => {
    const r = await handshake(all, line(all, await otherKey('rsa')));
    expect(errorCodeOf(r)).toBe('E_HOSTKEY');
    expect((r as Error).message).toMatch(/HOST KEY CHANGED/);
  });

  it('hashed [host]:port entries keep working', async () => {
    const [type, b64] = all.hostPublicKeys.ecdsa!.split(' ');
    const hashed = formatKnownHostsLine('127.0.0.1', all.port, Buffer.from(b64!, 'base64'), { hashed: true });
    expect(hashed.startsWith('|1|')).toBe(true);
    expect(hashed).toContain(type!);
    expect(passedHostKey(await handshake(all, hashed + '\n')), 'hashed').toBe(true);
  });

  it('a replica that has none of the recorded key types is refused as changed, with the types named', async () => {
    const r = await handshake(edOnly, line(edOnly, await otherKey('ecdsa')));
    expect(errorCodeOf(r)).toBe('E_HOSTKEY');
    expect((r as Error).message).toMatch(/HOST KEY CHANGED.*none of the key types.*ecdsa-sha2-nistp256/);
  });

  it('OpenSSH agrees: ssh-keyscan of the ECDSA key alone is what we accept', async () => {
    const r = await run('ssh-keyscan', ['-p', String(all.port), '-t', 'ecdsa', '127.0.0.1']);
    expect(r.code, r.stderr).toBe(0);
    const scanned = r.stdout.split('\n').find((l) => l.includes('ecdsa-sha2'))!;
    expect(scanned).toContain(all.hostPublicKeys.ecdsa!.split(' ')[1]!);
    expect(passedHostKey(await handshake(all, scanned + '\n'))).toBe(true);
  });
});
