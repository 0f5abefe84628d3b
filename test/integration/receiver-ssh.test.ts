/**
 * The agent's ssh2 client against the real sshd on loopback, where the client key may only run the
 * receiver (`command="node .../receiver-main.js ...",restrict`), and the real receiver behind it.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream, existsSync } from 'node:fs';
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Client } from 'ssh2';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { errorCodeOf } from '../../lib/shared/errors.js';
import { Exit } from '../../lib/shared/exit-codes.js';
import { run } from '../../lib/shared/exec.js';
import { ReplicaClient, type ReplicaConnectOptions } from '../../lib/transfer/replica-client.js';
import { startSshd, type Sshd } from '../../dev/sshd.js';
import { STDIN_PIPE_BYTES } from '../../lib/replica/stdio.js';
import { ensureDistBuilt } from '../helpers/build-dist.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const entry = path.join(repoRoot, 'dist', 'agent', 'receiver-main.js');
const crashReceiver = path.join(repoRoot, 'dist', 'dev', 'crash-receiver.js');


let sshd: Sshd;
let work: string;

function forcedCommand(snaps: string): string {
  return `command="${process.execPath} ${entry} --snaps-dir ${snaps} --lock-timeout 5 --max-sessions 2 --busy-wait 1 --host hv-test",restrict`;
}

function connectOptions(extra: Partial<ReplicaConnectOptions> = {}): ReplicaConnectOptions {
  return {
    host: sshd.host,
    port: sshd.port,
    username: sshd.user,
    privateKey: sshd.clientKeyPath,
    knownHostsFile: sshd.knownHostsPath,
    acceptNewHostKey: false,
    receiverCommand: 'onestor-agent receive',
    connectTimeoutMs: 10_000,
    localHost: 'hv-test',
    ...extra,
  };
}

/** A refused request must be refused promptly, not hang the suite. */
function within<T>(p: Promise<T>, what: string, ms = 15_000): Promise<T> {
  return Promise.race([p, new Promise<T>((_, reject) => setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms).unref())]);
}

async function q(args: string[]): Promise<string> {
  const r = await run(args[0]!, args.slice(1));
  if (r.code !== 0) throw new Error(`${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

beforeAll(async () => {
  await ensureDistBuilt();
  work = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-rssh-'));
  sshd = await startSshd();
  await sshd.setAuthorizedKeys([`${forcedCommand(sshd.replicaDir)} ${sshd.clientPublicKey}`]);
});

afterAll(async () => {
  await sshd?.stop();
  if (work) await fsp.rm(work, { recursive: true, force: true });
});

describe('replica over ssh with a restricted key', () => {
  it('uploads and publishes a seed through the forced-command receiver', async () => {
    const snap = path.join(work, 'src', 'disk.0.snap');
    await fsp.mkdir(snap, { recursive: true });
    await fsp.symlink('.', path.join(snap, 'disk.0.snap'));
    await q(['qemu-img', 'create', '-q', '-f', 'qcow2', path.join(snap, 'base'), '16M']);
    await q(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x3c 0 3M', path.join(snap, 'base')]);
    await q(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'disk.0.snap/base', '-F', 'qcow2', path.join(snap, 'base.1')]);
    await q(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x4d 2M 2M', path.join(snap, 'base.1')]);

    const client = await ReplicaClient.connect(connectOptions());
    expect(client.hello()?.protocol).toBe(1);
    const d = await client.openDisk(11, 0);
    expect(d.manifest).toBeNull();
    await d.upload('base', path.join(snap, 'base'), { key: 'base-c1' });
    const progress: number[] = [];
    await d.upload('base1', path.join(snap, 'base.1'), { key: 'b1-c1', onProgress: (s) => progress.push(s) });
    expect(progress.at(-1)).toBe((await fsp.stat(path.join(snap, 'base.1'))).size);
    const m = await d.publishFull({ checkpoint: 'c1', capturedAt: 1700000000, consistency: 'crash-consistent', sourceHost: 'hv-test', base: 'base-c1', base1: 'b1-c1' });
    expect(m.checkpoint).toBe('c1');
    await d.close();
    expect((await client.status(11)).map((x) => x.checkpoint)).toEqual(['c1']);
    await client.close();

    const replicaDisk = path.join(sshd.replicaDir, '11', 'disk.0');
    const info = JSON.parse(await q(['qemu-img', 'info', '--output=json', '--backing-chain', replicaDisk]));
    expect(info[0]['backing-filename']).toBe('disk.0.snap/base');
    const a = await q(['qemu-img', 'compare', '-f', 'qcow2', '-F', 'qcow2', replicaDisk, path.join(snap, 'base.1')]);
    expect(a).toMatch(/Images are identical/);
  });

  it("the receiver widens the pipe sshd feeds it through to 1 MiB (sshd hands on one pipe's worth per loop)", async () => {
    const client = await ReplicaClient.connect(connectOptions());
    try {
      // the session's receiver: the forced command, run by this sshd
      let pid: number | null = null;
      for (let i = 0; i < 100 && pid === null; i++) {
        for (const p of await sshd.sessionCommandPids()) {
          if ((await fsp.readFile(`/proc/${p}/cmdline`, 'utf8').catch(() => '')).includes(entry)) pid = p;
        }
        if (pid === null) await new Promise((r) => setTimeout(r, 50));
      }
      expect(pid, 'receiver process').not.toBeNull();
      // F_GETPIPE_SZ (1032) on the receiver's own stdin, opened through /proc: fails unless it is a pipe
      const pipeSize = async () => (await q(['perl', '-e', 'open(my $f, "<", $ARGV[0]) or die "$!"; print fcntl($f, 1032, 0) or die "$!"', `/proc/${pid}/fd/0`])).trim();
      let size = await pipeSize();
      for (let i = 0; i < 50 && size !== String(STDIN_PIPE_BYTES); i++) {
        await new Promise((r) => setTimeout(r, 100));
        size = await pipeSize();
      }
      // the default pipe is 64 KiB: the check means something only above it
      expect(STDIN_PIPE_BYTES).toBeGreaterThan(64 * 1024);
      expect(size).toBe(String(STDIN_PIPE_BYTES));
      // and the widened pipe carries a session as before
      expect(await client.status(99)).toEqual([]);
    } finally {
      await client.close();
    }
  });

  it('a receiver killed with SIGKILL holding a disk lock leaves no stale lock behind', async () => {
    const a = await ReplicaClient.connect(connectOptions());
    const da = await a.openDisk(21, 0);
    expect(da.manifest).toBeNull();
    // The receiver logs its pid on stderr; the client keeps the tail for diagnostics.
    // stderr is its own stream: give it a moment to arrive.
    let pids: number[] = [];
    for (let i = 0; i < 100 && pids.length === 0; i++) {
      pids = [...a.connection.diagnostics().matchAll(/"pid":(\d+)/g)].map((m) => Number(m[1]));
      if (pids.length === 0) await new Promise((r) => setTimeout(r, 20));
    }
    expect(pids.length).toBeGreaterThan(0);
    process.kill(pids.at(-1)!, 'SIGKILL');
    // The lock must be free at once (lock timeout is 5 s; a stale lock would make this E_LOCK_TIMEOUT).
    const b = await ReplicaClient.connect(connectOptions());
    const t0 = Date.now();
    const db = await b.openDisk(21, 0);
    expect(Date.now() - t0).toBeLessThan(4000);
    await db.close();
    await b.close();
    expect(a.connected).toBe(false);
    await a.close().catch(() => {});
  });

  it('the key can do nothing but talk to the receiver: no command, no SFTP, no port forward', async () => {
    const ssh = new Client();
    const privateKey = await fsp.readFile(sshd.clientKeyPath);
    await new Promise<void>((resolve, reject) => {
      ssh.once('ready', () => resolve());
      ssh.once('error', reject);
      ssh.connect({ host: sshd.host, port: sshd.port, username: sshd.user, privateKey });
    });
    try {
      // The requested command is ignored: the receiver runs, sees no protocol, prints no passwd.
      const out = await new Promise<{ stdout: string; code: number | null }>((resolve, reject) =>
        ssh.exec('cat /etc/passwd; id', (err, ch) => {
          if (err) return reject(err);
          let stdout = '';
          ch.on('data', (b: Buffer) => (stdout += b.toString('latin1')));
          ch.on('exit', (code: number | null) => resolve({ stdout, code }));
          ch.write('garbage that is not a frame\n');
          ch.end();
        }),
      );
      expect(out.stdout).not.toMatch(/root:|uid=/);
      expect(out.stdout).toMatch(/E_PROTOCOL/);
      expect(out.code).toBe(Exit.PROTOCOL);

      const sftpErr = await within(new Promise<unknown>((resolve) => ssh.sftp((err) => resolve(err ?? null))), 'sftp');
      expect(sftpErr).toBeInstanceOf(Error);

      const fwdErr = await within(
        new Promise<unknown>((resolve) =>
          ssh.forwardOut('127.0.0.1', 0, '127.0.0.1', sshd.port, (err, ch) => {
            ch?.close();
            resolve(err ?? null);
          }),
        ),
        'forwardOut',
      );
      expect(fwdErr).toBeInstanceOf(Error);
      expect(String(fwdErr)).toMatch(/open failed|prohibited|refused|denied/i);
    } finally {
      ssh.end();
    }
  });

  it('unknown host refused unless acceptNewHostKey, which records the key; a changed host key is refused', async () => {
    const emptyKh = path.join(work, 'known_hosts_new');
    await fsp.writeFile(emptyKh, '# nothing yet\n', { mode: 0o600 });
    const err = await ReplicaClient.connect(connectOptions({ knownHostsFile: emptyKh })).catch((e) => e);
    expect(errorCodeOf(err)).toBe('E_HOSTKEY');
    expect(err.message).toMatch(new RegExp(`unknown host key for \\[127\\.0\\.0\\.1\\]:${sshd.port} \\(fingerprint SHA256:`));
    expect(err.message).toContain(emptyKh);

    const c1 = await ReplicaClient.connect(connectOptions({ knownHostsFile: emptyKh, acceptNewHostKey: true }));
    // an unknown host goes through ssh2, which records the key it accepted
    expect(c1.transport).toBe('ssh2');
    await c1.close();
    const recorded = await fsp.readFile(emptyKh, 'utf8');
    expect(recorded).toContain(`[127.0.0.1]:${sshd.port} ${sshd.hostPublicKey}`);
    const c2 = await ReplicaClient.connect(connectOptions({ knownHostsFile: emptyKh }));
    // known now: the system's ssh carries the session, pinned to that key
    expect(c2.transport).toBe('openssh');
    await c2.close();

    await sshd.regenerateHostKey();
    for (const kh of [emptyKh, sshd.knownHostsPath]) {
      for (const acceptNewHostKey of [false, true]) {
        const changed = await ReplicaClient.connect(connectOptions({ knownHostsFile: kh, acceptNewHostKey })).catch((e) => e);
        expect(errorCodeOf(changed)).toBe('E_HOSTKEY');
        expect(changed.message).toMatch(/HOST KEY CHANGED/);
      }
    }
    expect(await fsp.readFile(emptyKh, 'utf8')).toBe(recorded);
    // Put the current key in place for the tests that follow.
    await fsp.writeFile(sshd.knownHostsPath, `[127.0.0.1]:${sshd.port} ${sshd.hostPublicKey}\n`);
  });

  it('the system ssh carries the session by default, pinned to known_hosts; ssh2 when asked, or when ssh cannot run', async () => {
    const viaSsh = await ReplicaClient.connect(connectOptions());
    expect(viaSsh.transport).toBe('openssh');
    expect(viaSsh.writer).toBe('hv-test');
    await viaSsh.close();
    const viaSsh2 = await ReplicaClient.connect(connectOptions({ transport: 'ssh2' }));
    expect(viaSsh2.transport).toBe('ssh2');
    await viaSsh2.close();
    const noSsh = await ReplicaClient.connect(connectOptions({ sshProgram: path.join(work, 'no-such-ssh') }));
    expect(noSsh.transport).toBe('ssh2');
    await noSsh.close();
    // the pinned known_hosts is a private file (0600 in a 0700 dir) holding only the replica's key, gone
    // once the session is up: a wrapper around the real ssh records where it was and what it held
    const record = path.join(work, 'ssh-args');
    const wrapper = path.join(work, 'ssh-wrapper');
    await fsp.writeFile(wrapper, `#!/bin/sh\nfor a; do case "$a" in UserKnownHostsFile=*) f=\${a#UserKnownHostsFile=}; f=\${f#\\"}; f=\${f%\\"}; { echo "$f"; stat -c %a "$f" "$(dirname "$f")"; cat "$f"; } > ${record};; esac; done\nexec ssh "$@"\n`, { mode: 0o755 });
    const wrapped = await ReplicaClient.connect(connectOptions({ sshProgram: wrapper }));
    expect(wrapped.transport).toBe('openssh');
    const [pinnedFile, fileMode, dirMode, ...pinned] = (await fsp.readFile(record, 'utf8')).trim().split('\n');
    expect([fileMode, dirMode]).toEqual(['600', '700']);
    expect(pinned).toEqual([`onestor-replica ${sshd.hostPublicKey}`]);
    expect(existsSync(pinnedFile!)).toBe(false);
    await wrapped.close();
  });

  it('a private key file others can read (ssh refuses to use it, ssh2 did not): the session goes through ssh2', async () => {
    const loose = path.join(work, 'loose_key');
    await fsp.copyFile(sshd.clientKeyPath, loose);
    await fsp.chmod(loose, 0o644);
    const c = await ReplicaClient.connect(connectOptions({ privateKey: loose }));
    expect(c.transport).toBe('ssh2');
    expect(c.writer).toBe('hv-test');
    await c.close();
  });

  it('a key the replica does not accept: authentication refused, named, through ssh too', async () => {
    const otherKey = path.join(work, 'other_ed25519');
    await fsp.rm(otherKey, { force: true });
    expect((await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', otherKey])).code).toBe(0);
    const err = await ReplicaClient.connect(connectOptions({ privateKey: otherKey })).catch((e) => e);
    expect(errorCodeOf(err)).toBe('E_SSH');
    expect(err.message).toMatch(/authentication refused/);
  });

  it('after a seed, close and bye return while the receiver still makes its spare copy, which survives the hang-up', async () => {
    const snap = path.join(work, 'src-spare', 'disk.0.snap');
    await fsp.mkdir(snap, { recursive: true });
    await fsp.symlink('.', path.join(snap, 'disk.0.snap'));
    await q(['qemu-img', 'create', '-q', '-f', 'qcow2', path.join(snap, 'base'), '16M']);
    await q(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'disk.0.snap/base', '-F', 'qcow2', path.join(snap, 'base.1')]);
    await q(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x5e 1M 3M', path.join(snap, 'base.1')]);
    // the real receiver with its step hooks: it holds the spare copy until `release` exists
    const snaps = path.join(work, 'snaps-spare');
    await fsp.mkdir(snaps);
    const release = path.join(work, 'spare-release');
    const steps = path.join(work, 'spare-steps');
    await sshd.setAuthorizedKeys([`command="ONESTOR_PAUSE_AT=full:spare ONESTOR_PAUSE_RELEASE=${release} ONESTOR_STEP_LOG=${steps} ${process.execPath} ${crashReceiver} ${snaps}",restrict ${sshd.clientPublicKey}`]);
    try {
      const client = await ReplicaClient.connect(connectOptions());
      expect(client.transport).toBe('openssh');
      const d = await client.openDisk(13, 0);
      await d.upload('base', path.join(snap, 'base'), { key: 'sb' });
      await d.upload('base1', path.join(snap, 'base.1'), { key: 'sb1' });
      await d.publishFull({ checkpoint: 'sp1', capturedAt: 1700000000, consistency: 'crash-consistent', sourceHost: 'hv-test', base: 'sb', base1: 'sb1' });
      // close and the whole connection's end come back while the spare waits at its step, however long
      await within(d.close(), 'close');
      await within(client.close(), 'client close', 4000);
      expect(client.connected).toBe(false);
      const work13 = path.join(snaps, '.onestor', 'work', '13', 'disk.0');
      expect(await fsp.readdir(work13).catch(() => [])).not.toContain('copy.b');
      expect((await fsp.readFile(steps, 'utf8')).split('\n')).not.toContain('full:work-copies');
      // the ssh client is gone; the receiver sshd started lives on, finishes the spare and frees the lock
      await fsp.writeFile(release, '');
      const again = await ReplicaClient.connect(connectOptions());
      const d2 = await within(again.openDisk(13, 0), 'open after the spare');
      await d2.close();
      await again.close();
      expect((await fsp.readFile(steps, 'utf8')).split('\n')).toContain('full:work-copies');
      expect((await fsp.readdir(work13)).sort()).toEqual(['copy.a', 'copy.b', 'disk.0.snap', 'state.json']);
      const b1 = path.join(snaps, '13', 'disk.0.snap', 'base.1');
      expect(createHash('sha256').update(await fsp.readFile(path.join(work13, 'copy.b'))).digest('hex')).toBe(createHash('sha256').update(await fsp.readFile(b1)).digest('hex'));
    } finally {
      await fsp.writeFile(release, '');
      await sshd.setAuthorizedKeys([`${forcedCommand(sshd.replicaDir)} ${sshd.clientPublicKey}`]);
    }
  });

  it('a 256 MiB upload through the restricted key arrives whole (digest verified by the receiver and returned)', async () => {
    const size = 256 * 1024 * 1024;
    const file = path.join(work, 'big.bin');
    await new Promise<void>((resolve, reject) => {
      const ws = createWriteStream(file);
      const chunk = randomBytes(4 * 1024 * 1024);
      let written = 0;
      const pump = () => {
        while (written < size) {
          written += chunk.length;
          if (!ws.write(chunk)) return ws.once('drain', pump);
        }
        ws.end(resolve);
      };
      ws.on('error', reject);
      pump();
    });
    // Speed is measured in bench/push.ts (side by side with `ssh cat`), never asserted here.
    await sshd.setAuthorizedKeys([`${forcedCommand(sshd.replicaDir)} ${sshd.clientPublicKey}`]);
    const client = await ReplicaClient.connect(connectOptions());
    const d = await client.openDisk(12, 0);
    const r = await d.upload('base', file, { key: 'big' });
    await d.close();
    await client.close();
    expect(r.resumedFrom).toBe(0);
    expect(r.bytes).toBe(size);
    expect(r.digest).toBe('sha256');
    expect(r.hex).toBe(createHash('sha256').update(await fsp.readFile(file)).digest('hex'));
  });
});
