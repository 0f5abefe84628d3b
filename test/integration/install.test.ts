/**
 * install.sh roles that need no package manager: --frontend puts the probes where `onehost sync`
 * distributes them (keeping upstream's recovery.rb aside) and --uninstall takes them out again.
 */
import { describe, it, expect, afterAll, beforeAll } from 'vitest';
import { mkdtemp, mkdir, writeFile, readFile, readdir, stat, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { run } from '../../lib/shared/exec.js';
import { projectRoot } from '../harness/agent-env.js';

const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

describe('install.sh --frontend / --uninstall', () => {
  it('installs the probes, keeps upstream recovery.rb aside, and restores it on uninstall', async () => {
    const root = await mkdtemp(path.join(os.tmpdir(), 'onestor-install-'));
    dirs.push(root);
    const remotes = path.join(root, 'remotes');
    const probeDir = path.join(remotes, 'im', 'kvm-probes.d', 'vm', 'snapshot');
    await mkdir(probeDir, { recursive: true });
    await writeFile(path.join(probeDir, 'recovery.rb'), '#!/usr/bin/env ruby\n# upstream\n');
    const env = { REMOTES: remotes, PREFIX: path.join(root, 'prefix'), BIN_DIR: path.join(root, 'bin') };
    const script = path.join(projectRoot(), 'install.sh');

    const inst = await run('bash', [script, '--frontend'], { env });
    expect(inst.code, inst.stderr).toBe(0);
    const installed = await readFile(path.join(probeDir, 'recovery.rb'), 'utf8');
    expect(installed).toMatch(/onestor-agent/);
    expect((await stat(path.join(probeDir, 'recovery.rb'))).mode & 0o111).not.toBe(0);
    expect(await readFile(path.join(probeDir, 'recovery.rb.onestor-orig'), 'utf8')).toMatch(/# upstream/);
    // idempotent: a second run keeps the original aside, not our copy
    expect((await run('bash', [script, '--frontend'], { env })).code).toBe(0);
    expect(await readFile(path.join(probeDir, 'recovery.rb.onestor-orig'), 'utf8')).toMatch(/# upstream/);

    const un = await run('bash', [script, '--uninstall'], { env });
    expect(un.code, un.stderr).toBe(0);
    expect(await readFile(path.join(probeDir, 'recovery.rb'), 'utf8')).toMatch(/# upstream/);
    expect(await readdir(probeDir)).toEqual(['recovery.rb']);
  });

  it('refuses unknown options with a clear message', async () => {
    const r = await run('bash', [path.join(projectRoot(), 'install.sh'), '--frobnicate']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/unknown option '--frobnicate'/);
  });
});

describe('install.sh --replica --authorize: one restricted key line, nothing else', () => {
  const script = () => path.join(projectRoot(), 'install.sh');
  let root: string;
  let env: Record<string, string>;
  let ak: string;
  let key: string; // "ssh-ed25519 AAAA... comment"
  let key2: string;
  const user = os.userInfo().username;
  // other lines must survive byte for byte, including one with options of its own
  const existing = 'ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 admin@laptop\ncommand="/bin/true",restrict ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther other\n';

  const gen = async (name: string): Promise<string> => {
    const f = path.join(root, name);
    const r = await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', `oneadmin@${name}`, '-f', f]);
    expect(r.code, r.stderr).toBe(0);
    return (await readFile(`${f}.pub`, 'utf8')).trim();
  };

  beforeAll(async () => {
    root = await mkdtemp(path.join(os.tmpdir(), 'onestor-install-auth-'));
    dirs.push(root);
    env = { ONE_USER: user, ONE_VAR: path.join(root, 'one'), PREFIX: path.join(root, 'prefix'), BIN_DIR: '/usr/local/bin', REMOTES: path.join(root, 'remotes') };
    ak = path.join(root, 'one', '.ssh', 'authorized_keys');
    await mkdir(path.dirname(ak), { recursive: true });
    key = await gen('hv1');
    key2 = await gen('hv2');
  });

  const inst = (args: string[]) => run('bash', [script(), '--replica', '--authorize-only', ...args], { env });
  const [type, b64] = [() => key.split(' ')[0]!, () => key.split(' ')[1]!];

  const refused: Array<[string, () => string, RegExp]> = [
    ['a newline (a second, unrestricted key)', () => `${key}\n${key2}`, /line break/],
    ['two keys on one line', () => `${key} ${key2}`, /not a single public key line/],
    ['options injected before the key', () => `command="/bin/sh",no-pty ${key}`, /options are not accepted/],
    ['options injected in the comment', () => `${type()} ${b64()} x",command="/bin/sh`, /options are not accepted/],
    ['bad base64', () => `${type()} ${b64().slice(0, 20)}!!${b64().slice(22)}`, /not a single public key line|base64/],
    ['base64 of the wrong length', () => `${type()} ${b64().slice(0, -1)}`, /base64/],
    ['a blob of another type', () => `ssh-rsa ${b64()}`, /does not hold a ssh-rsa key/],
    ['an unknown key type', () => `ssh-foo ${b64()}`, /not a single public key line/],
    ['a carriage return', () => `${key}\r`, /line break/],
    ['an empty value', () => '', /not a single public key line/],
  ];

  for (const [name, value, why] of refused) {
    it(`refuses ${name}; authorized_keys byte-identical`, async () => {
      await writeFile(ak, existing);
      const r = await inst(['--authorize', value(), '--host', 'hv1']);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(why);
      expect(r.stderr).toMatch(/authorized_keys was not changed/);
      expect(await readFile(ak, 'utf8')).toBe(existing);
    });
  }

  it('refuses a missing or bad --host, a bad --from, and key options without --replica', async () => {
    await writeFile(ak, existing);
    const noHost = await inst(['--authorize', key]);
    expect(noHost.code).toBe(2);
    expect(noHost.stderr).toMatch(/needs --host NAME/);
    for (const host of ['hv1 --x', 'hv"1', '-hv1', '']) {
      const r = await inst(['--authorize', key, '--host', host]);
      expect(r.code, host).toBe(2);
    }
    for (const from of ['10.0.0.1"', '10.0.0.1 ,x', 'a,,b', '10.0.0.1\n']) {
      const r = await inst(['--authorize', key, '--host', 'hv1', '--from', from]);
      expect(r.code, from).toBe(2);
      expect(r.stderr).toMatch(/--from: expected/);
    }
    const host = await run('bash', [script(), '--authorize', key, '--host', 'hv1'], { env });
    expect(host.code).toBe(2);
    expect(host.stderr).toMatch(/go with --replica/);
    expect(await readFile(ak, 'utf8')).toBe(existing);
  });

  it('writes exactly the restricted line with --host and --from, keeps other lines, and is idempotent', async () => {
    await writeFile(ak, existing);
    const r = await inst(['--authorize', key, '--host', 'hv1.example', '--from', '10.0.0.5,10.0.1.0/24']);
    expect(r.code, r.stderr).toBe(0);
    const expected = `command="/usr/local/bin/onestor-agent receive --host hv1.example",restrict,from="10.0.0.5,10.0.1.0/24" ${key}`;
    expect(await readFile(ak, 'utf8')).toBe(existing + expected + '\n');
    expect((await stat(ak)).mode & 0o777).toBe(0o600);
    const again = await inst(['--authorize', key, '--host', 'hv1.example', '--from', '10.0.0.5,10.0.1.0/24']);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stdout).toMatch(/already authorized/);
    expect(await readFile(ak, 'utf8')).toBe(existing + expected + '\n');
    // ssh-keygen reads the file as authorized_keys lines (options included)
    const check = await run('ssh-keygen', ['-l', '-f', ak]);
    expect(check.code, check.stderr).toBe(0);
  });

  it('replaces an older line for the same key (sshd would use the first match, e.g. an unrestricted one)', async () => {
    await writeFile(ak, `${key}\n${existing}command="/usr/local/bin/onestor-agent receive",restrict ${key}\n`);
    const r = await inst(['--authorize', key, '--host', 'hv1']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/replacing the existing/);
    expect(await readFile(ak, 'utf8')).toBe(`${existing}command="/usr/local/bin/onestor-agent receive --host hv1",restrict ${key}\n`);
  });

  it('a key without a comment, and a second host beside the first', async () => {
    await writeFile(ak, '');
    const bare = key2.split(' ').slice(0, 2).join(' ');
    expect((await inst(['--authorize', key, '--host', 'hv1'])).code).toBe(0);
    const r = await inst(['--authorize', bare, '--host', 'hv2']);
    expect(r.code, r.stderr).toBe(0);
    expect(await readFile(ak, 'utf8')).toBe(
      `command="/usr/local/bin/onestor-agent receive --host hv1",restrict ${key}\ncommand="/usr/local/bin/onestor-agent receive --host hv2",restrict ${bare}\n`,
    );
  });
});
