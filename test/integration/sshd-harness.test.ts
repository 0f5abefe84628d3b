/**
 * The sshd harness against the real OpenSSH client: login with the generated key and known_hosts,
 * a forced command from authorized_keys, and a changed host key refused under StrictHostKeyChecking.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { access, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { run } from '../../lib/shared/exec.js';
import { startSshd, type Sshd } from '../../dev/sshd.js';

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

    // the session's shell is not the first (SHLVL=1 from sshd), so bash skips the account's ~/.bashrc
    const lvl = await run('ssh', sshArgs(sshd, ['echo', '$SHLVL']), { timeoutMs: 20_000 });
    expect(lvl.stdout).toBe('2\n');
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

  it('the server dies with a test runner that is SIGKILLed (no cleanup runs)', async () => {
    // A separate runner process starts an sshd through the harness, reports its pid, and is then killed.
    const scratch = await mkdtemp(path.join(os.tmpdir(), 'onestor-sshd-runner-'));
    const harnessUrl = new URL('../../dev/sshd.ts', import.meta.url).href;
    const script = path.join(scratch, 'runner.ts');
    await writeFile(
      script,
      `import { readFileSync } from 'node:fs';\n` +
        `const { startSshd } = await import(${JSON.stringify(harnessUrl)});\n` +
        `const s = await startSshd();\n` +
        `const pid = Number(readFileSync(s.rootDir + '/sshd.pid', 'utf8').trim());\n` +
        `console.log(JSON.stringify({ pid, rootDir: s.rootDir }));\n` +
        `setInterval(() => {}, 1 << 30);\n`,
    );
    const viteNode = fileURLToPath(new URL('../../node_modules/vite-node/vite-node.mjs', import.meta.url));
    const runner = spawn(process.execPath, [viteNode, script], { stdio: ['ignore', 'pipe', 'pipe'] });
    let rootDir = '';
    let sshdPid = 0;
    try {
      const line = await new Promise<string>((resolve, reject) => {
        let out = '';
        let errText = '';
        runner.stdout.on('data', (d: Buffer) => {
          out += d.toString();
          const m = /^\{.*\}$/m.exec(out);
          if (m) resolve(m[0]);
        });
        runner.stderr.on('data', (d: Buffer) => (errText += d.toString()));
        runner.once('exit', (code) => reject(new Error(`runner exited ${code}: ${errText}`)));
        setTimeout(() => reject(new Error(`runner did not report: ${out} ${errText}`)), 30_000);
      });
      const { pid, rootDir: dir } = JSON.parse(line) as { pid: number; rootDir: string };
      rootDir = dir;
      expect(() => process.kill(pid, 0)).not.toThrow();
      runner.kill('SIGKILL');
      const deadline = Date.now() + 5000;
      let alive = true;
      while (alive && Date.now() < deadline) {
        await sleep(20);
        try {
          process.kill(pid, 0);
        } catch {
          alive = false;
        }
      }
      if (alive) sshdPid = pid; // killed below, so a failing run leaks nothing
      expect(alive, `sshd ${pid} survived its runner`).toBe(false);
    } finally {
      runner.kill('SIGKILL');
      try {
        if (sshdPid) process.kill(sshdPid, 'SIGKILL');
      } catch {
        // gone, as expected
      }
      await rm(scratch, { recursive: true, force: true });
      if (rootDir) await rm(rootDir, { recursive: true, force: true });
    }
  });
});
