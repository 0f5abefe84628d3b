/**
 * The sshd harness against the real OpenSSH client: login with the generated key and known_hosts,
 * a forced command from authorized_keys, and a changed host key refused under StrictHostKeyChecking.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { access, readdir, readFile } from 'node:fs/promises';
import { run } from '../../lib/exec.js';
import { startSshd, type Sshd } from '../harness/sshd.js';

function sshArgs(sshd: Sshd, command: string[]): string[] {
  return [
    '-F', '/dev/null', // no user or system client config may change the outcome
    '-i', sshd.clientKeyPath,
    '-o', 'IdentitiesOnly=yes',
    '-o', 'BatchMode=yes',
    '-o', `UserKnownHostsFile=${sshd.knownHostsPath}`,
    '-o', 'GlobalKnownHostsFile=/dev/null',
    '-o', 'StrictHostKeyChecking=yes',
    '-o', 'ConnectTimeout=10',
    '-p', String(sshd.port),
    `${sshd.user}@${sshd.host}`,
    ...command,
  ];
}

let current: Sshd | null = null;

afterEach(async () => {
  await current?.stop();
  current = null;
});

describe('sshd harness', () => {
  it('accepts the client key and a known host key; files are laid out as promised', async () => {
    const sshd = (current = await startSshd());
    expect(sshd.port).toBeGreaterThan(0);
    expect(await readFile(sshd.knownHostsPath, 'utf8')).toBe(`[127.0.0.1]:${sshd.port} ${sshd.hostPublicKey}\n`);
    expect(sshd.hostPublicKey).toMatch(/^ssh-ed25519 [A-Za-z0-9+/=]+$/);
    expect(sshd.clientPublicKey).toMatch(/^ssh-ed25519 /);
    expect(await readFile(sshd.clientKeyPath, 'utf8')).toMatch(/^-----BEGIN OPENSSH PRIVATE KEY-----/);
    expect(await readdir(sshd.replicaDir)).toEqual([]);

    const r = await run('ssh', sshArgs(sshd, ['echo', 'hello-$((40+2))']), { timeoutMs: 20_000 });
    expect(r.code, `${r.stderr}\n${await sshd.readLog()}`).toBe(0);
    expect(r.stdout).toBe('hello-42\n'); // ran through the user's shell on the server

    const t = await run('ssh', sshArgs(sshd, ['true']), { timeoutMs: 20_000 });
    expect(t.code, t.stderr).toBe(0);
  });

  it('refuses a key that is not in authorized_keys', async () => {
    const sshd = (current = await startSshd());
    await sshd.setAuthorizedKeys([]);
    const r = await run('ssh', sshArgs(sshd, ['true']), { timeoutMs: 20_000 });
    expect(r.code).toBe(255);
    expect(r.stderr).toMatch(/Permission denied \(publickey\)/);
  });

  it('runs the forced command of a restricted key instead of the requested one', async () => {
    const sshd = (current = await startSshd({ authorizedKeyOptions: 'command="echo forced",restrict' }));
    expect(await readFile(sshd.authorizedKeysPath, 'utf8')).toBe(`command="echo forced",restrict ${sshd.clientPublicKey}\n`);
    const r = await run('ssh', sshArgs(sshd, ['echo', 'requested']), { timeoutMs: 20_000 });
    expect(r.code, `${r.stderr}\n${await sshd.readLog()}`).toBe(0);
    expect(r.stdout).toBe('forced\n');

    // setAuthorizedKeys takes effect without a restart
    await sshd.setAuthorizedKeys([`command="echo \\"$SSH_ORIGINAL_COMMAND\\"",restrict ${sshd.clientPublicKey}`]);
    const o = await run('ssh', sshArgs(sshd, ['asked', 'for', 'this']), { timeoutMs: 20_000 });
    expect(o.code, o.stderr).toBe(0);
    expect(o.stdout).toBe('asked for this\n');
  });

  it('after regenerateHostKey the old known_hosts is refused, on the same port', async () => {
    const sshd = (current = await startSshd());
    const before = await run('ssh', sshArgs(sshd, ['true']), { timeoutMs: 20_000 });
    expect(before.code, before.stderr).toBe(0);

    const oldPort = sshd.port;
    const oldKey = sshd.hostPublicKey;
    await sshd.regenerateHostKey();
    expect(sshd.port).toBe(oldPort);
    expect(sshd.hostPublicKey).not.toBe(oldKey);

    const after = await run('ssh', sshArgs(sshd, ['true']), { timeoutMs: 20_000 });
    expect(after.code).toBe(255);
    expect(after.stderr).toMatch(/REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed/);
  });

  it('stop() ends the server and removes its directory', async () => {
    const sshd = await startSshd();
    const pid = Number((await readFile(`${sshd.rootDir}/sshd.pid`, 'utf8')).trim());
    expect(pid).toBeGreaterThan(1);
    await sshd.stop();
    expect(() => process.kill(pid, 0)).toThrow();
    await expect(access(sshd.rootDir)).rejects.toThrow();
  });
});
