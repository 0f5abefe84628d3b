/**
 * Security through the real sshd and the restricted key (`command="... receive",restrict`): the key can
 * do nothing but talk to the receiver; the receiver refuses hostile ids and names without touching a byte
 * or an inode of the replica; host keys are checked; secrets stay out of logs; files get sane owners/modes.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { lstat, readdir, readFile, readlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Client, type ClientChannel } from 'ssh2';
import { startAgentEnv, type AgentEnv } from '../harness/agent-env.js';
import type { OneVm } from '../harness/one-layout.js';
import { encodeControl, FrameDecoder, PROTOCOL_VERSION } from '../../lib/protocol/protocol.js';
import { spawnAgent, withFlag } from '../../bench/soak.js';

let env: AgentEnv;
let vm: OneVm;
let marker: string;

beforeAll(async () => {
  env = await startAgentEnv({ name: 'sec' });
  vm = await env.createVm({ vmId: 81, disks: [{ diskId: 0, sizeMiB: 16, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 2, pattern: 0x81 }] }] });
  const r = await env.agent(['snapshot', '--vm', '81']);
  expect(r.code, r.stderr).toBe(0);
  marker = path.join(env.root, 'PWNED');
}, 120_000);

afterAll(async () => {
  await vm?.destroy().catch(() => {});
  await env?.stop();
});

function connect(): Promise<Client> {
  return new Promise(async (resolve, reject) => {
    const c = new Client();
    c.on('ready', () => resolve(c)).on('error', reject);
    c.connect({ host: env.sshd.host, port: env.sshd.port, username: env.sshd.user, privateKey: await readFile(env.sshd.clientKeyPath), readyTimeout: 10_000 });
  });
}

/** Everything a channel prints until it closes (or `ms` pass). */
function drain(ch: ClientChannel, ms = 8_000): Promise<{ out: Buffer; err: string; code: number | null }> {
  return new Promise((resolve) => {
    const out: Buffer[] = [];
    let err = '';
    let code: number | null = null;
    const t = setTimeout(() => finish(), ms);
    const finish = () => {
      clearTimeout(t);
      resolve({ out: Buffer.concat(out), err, code });
    };
    ch.on('data', (d: Buffer) => out.push(d));
    ch.stderr.on('data', (d: Buffer) => (err += d.toString()));
    ch.on('exit', (c: number | null) => (code = c));
    ch.on('close', finish);
  });
}

/** (path -> type, inode, size, mode, sha256 or link target) of every entry under dir. */
async function fingerprint(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const walk = async (d: string): Promise<void> => {
    for (const n of await readdir(d)) {
      const p = path.join(d, n);
      const st = await lstat(p);
      let what = '';
      if (st.isFile()) what = createHash('sha256').update(await readFile(p)).digest('hex');
      else if (st.isSymbolicLink()) what = '-> ' + (await readlink(p));
      out[path.relative(dir, p)] = `${st.mode.toString(8)} ino=${st.ino} size=${st.isDirectory() ? '-' : st.size} ${what}`;
      if (st.isDirectory()) await walk(p);
    }
  };
  await walk(dir);
  return out;
}

describe('the restricted key', () => {
  it('gets no shell: an exec request runs the receiver, not the command', async () => {
    const c = await connect();
    try {
      const ch = await new Promise<ClientChannel>((res, rej) => c.exec(`id; touch ${marker}; echo PWNED-$((6*7))`, (e, s) => (e ? rej(e) : res(s))));
      ch.end();
      const r = await drain(ch);
      const text = r.out.toString('latin1') + r.err;
      expect(text).not.toMatch(/uid=\d|PWNED-42/);
      expect(existsSync(marker)).toBe(false);
    } finally {
      c.end();
    }
  });

  it('gets no interactive shell either', async () => {
    const c = await connect();
    try {
      const ch = await new Promise<ClientChannel | Error>((res) => c.shell((e, s) => res(e ?? s)));
      if (ch instanceof Error) {
        expect(ch.message).toMatch(/denied|fail|refused|pseudo-terminal/i);
      } else {
        ch.write(`touch ${marker}\necho PWNED-$((6*7))\nexit\n`);
        const r = await drain(ch, 4_000);
        ch.close();
        expect(r.out.toString('latin1') + r.err).not.toMatch(/PWNED-42/);
      }
      expect(existsSync(marker)).toBe(false);
    } finally {
      c.end();
    }
  });

  it('gets no SFTP: the subsystem cannot be used to write anything', async () => {
    const c = await connect();
    const target = path.join(env.root, 'sftp-written');
    try {
      const result = await new Promise<string>((resolve) => {
        const t = setTimeout(() => resolve('timeout'), 8_000);
        c.sftp((e, sftp) => {
          if (e) {
            clearTimeout(t);
            resolve(`refused: ${e.message}`);
            return;
          }
          sftp.writeFile(target, 'x', (err) => {
            clearTimeout(t);
            resolve(err ? `write refused: ${err.message}` : 'WROTE');
          });
        });
      });
      expect(result).not.toBe('WROTE');
      expect(existsSync(target)).toBe(false);
    } finally {
      c.end();
    }
  });

  it('gets no port forwarding', async () => {
    const c = await connect();
    try {
      const r = await new Promise<string>((resolve) => c.forwardOut('127.0.0.1', 0, '127.0.0.1', env.sshd.port, (e) => resolve(e ? `refused: ${e.message}` : 'OPENED')));
      expect(r).toMatch(/^refused: .*(prohibited|denied|fail)/i);
      const rr = await new Promise<string>((resolve) => c.forwardIn('127.0.0.1', 0, (e) => resolve(e ? `refused: ${e.message}` : 'OPENED')));
      expect(rr).toMatch(/^refused/);
    } finally {
      c.end();
    }
  });
});

describe('the receiver behind the restricted key refuses hostile requests and touches nothing', () => {
  const hello = { type: 'hello', protocol: PROTOCOL_VERSION, agentVersion: 'security-test', host: 'attacker' };
  const hostile: Array<[string, object[]]> = [
    ['vm id with traversal', [{ type: 'open', vm: '../../etc', disk: 0 }]],
    ['negative vm id', [{ type: 'open', vm: -1, disk: 0 }]],
    ['vm id over 2^31-1', [{ type: 'open', vm: 2 ** 31, disk: 0 }]],
    ['fractional disk id', [{ type: 'open', vm: 81, disk: 0.5 }]],
    ['disk id as a path', [{ type: 'open', vm: 81, disk: '0/../../../x' }]],
    ['upload key with traversal', [{ type: 'open', vm: 81, disk: 0 }, { type: 'put', kind: 'base1', size: 4, key: '../../../../tmp/x' }]],
    ['upload key absolute', [{ type: 'open', vm: 81, disk: 0 }, { type: 'put', kind: 'base1', size: 4, key: '/etc/passwd' }]],
    ['unknown upload kind', [{ type: 'open', vm: 81, disk: 0 }, { type: 'put', kind: 'snaps-dir', size: 4, key: 'k' }]],
    ['publish of a file never uploaded', [{ type: 'open', vm: 81, disk: 0 }, { type: 'publish', mode: 'full', checkpoint: 'x', capturedAt: 1, consistency: 'crash-consistent', sourceHost: 'h', base1: 'never-uploaded' }]],
    ['incremental on a wrong parent', [{ type: 'open', vm: 81, disk: 0 }, { type: 'publish', mode: 'incremental', checkpoint: 'y', parentCheckpoint: 'not-what-the-replica-holds', capturedAt: 1, consistency: 'crash-consistent', sourceHost: 'h', inc: 'never' }]],
  ];

  for (const [name, messages] of hostile) {
    it(name, async () => {
      const before = await fingerprint(env.snapsDir);
      const siblingsBefore = (await readdir(path.dirname(env.snapsDir))).sort();
      const c = await connect();
      try {
        const ch = await new Promise<ClientChannel>((res, rej) => c.exec('onestor-agent receive', (e, s) => (e ? rej(e) : res(s))));
        const done = drain(ch);
        ch.write(encodeControl(hello));
        for (const m of messages) ch.write(encodeControl(m));
        ch.end();
        const r = await done;
        const replies = new FrameDecoder().push(r.out).filter((f) => f.type === 'control').map((f) => (f as { message: { type: string; code?: string } }).message);
        const errors = replies.filter((m) => m.type === 'error');
        expect(errors.length, JSON.stringify(replies)).toBeGreaterThan(0);
        expect(errors[0]!.code).toMatch(/^E_[A-Z_]+$/);
      } finally {
        c.end();
      }
      // byte- and inode-identical: no file written, renamed or replaced anywhere under SNAPS or beside it
      const after = await fingerprint(env.snapsDir);
      expect(strip(after)).toEqual(strip(before));
      expect((await readdir(path.dirname(env.snapsDir))).sort()).toEqual(siblingsBefore);
    });
  }
});

describe('SNAPS comes from the receiver, never from the client', () => {
  it('a snapsDir sent by the client is ignored: answers come from the configured SNAPS and nothing changes', async () => {
    const before = await fingerprint(env.snapsDir);
    const c = await connect();
    try {
      const ch = await new Promise<ClientChannel>((res, rej) => c.exec('onestor-agent receive', (e, s) => (e ? rej(e) : res(s))));
      const done = drain(ch);
      ch.write(encodeControl({ type: 'hello', protocol: PROTOCOL_VERSION, agentVersion: 't', host: 'h', snapsDir: '/etc' }));
      ch.write(encodeControl({ type: 'status', snapsDir: '/etc' }));
      ch.end();
      const r = await done;
      const replies = new FrameDecoder().push(r.out).filter((f) => f.type === 'control').map((f) => (f as { message: { type: string; manifests?: Array<{ vmId: number }> } }).message);
      const status = replies.find((m) => m.manifests);
      expect(status?.manifests?.map((m) => m.vmId)).toEqual([81]);
    } finally {
      c.end();
    }
    expect(strip(await fingerprint(env.snapsDir))).toEqual(strip(before));
  });
});

/** The receiver's own bookkeeping (lock and slot files, empty tmp dirs, the sweep stamp) may appear; the data may not change. */
function strip(fp: Record<string, string>): Record<string, string> {
  return Object.fromEntries(Object.entries(fp).filter(([k]) => !/^\.onestor\/(locks|slots|tmp)(\/|$)|^\.onestor\/sweep\./.test(k)));
}

describe('host keys, secrets, owners and modes', () => {
  it('an unknown host key is refused unless --accept-new-host-key, which records it', async () => {
    const kh = path.join(env.root, 'empty_known_hosts');
    await writeFile(kh, '');
    const flags = withFlag(env.flags, '--known-hosts', kh);
    const p = spawnAgent(['snapshot', '--vm', '81'], flags);
    expect((await p.exited).code).toBe(1);
    expect(p.stdout() + p.stderr()).toMatch(/host key/i);
    expect(await readFile(kh, 'utf8')).toBe('');

    const q = spawnAgent(['snapshot', '--vm', '81', '--accept-new-host-key'], flags);
    expect((await q.exited).code, q.stderr()).toBe(0);
    const recorded = await readFile(kh, 'utf8');
    expect(recorded).toContain(env.sshd.hostPublicKey.split(' ')[1]!);
  });

  it('secrets never reach logs, output or state (trace level)', async () => {
    const key = await readFile(env.sshd.clientKeyPath, 'utf8');
    const secretLines = key.split('\n').filter((l) => l && !l.startsWith('-----'));
    expect(secretLines.length).toBeGreaterThan(0);
    const p = spawnAgent(['snapshot', '--vm', '81', '--log-level', 'trace'], env.flags);
    expect((await p.exited).code, p.stderr()).toBe(0);
    const stateFiles = await readdir(env.stateDir);
    const texts = [p.stdout(), p.stderr(), ...(await Promise.all(stateFiles.map((f) => readFile(path.join(env.stateDir, f), 'utf8').catch(() => ''))))];
    for (const t of texts) for (const s of secretLines) expect(t.includes(s)).toBe(false);
    expect(p.stderr()).not.toMatch(/BEGIN OPENSSH PRIVATE KEY/);
  });

  it('files the agent and the receiver create belong to the running user and are not group/world-writable', async () => {
    const uid = process.getuid!();
    const bad: string[] = [];
    for (const root of [env.snapsDir, env.stateDir]) {
      const walk = async (d: string): Promise<void> => {
        for (const n of await readdir(d)) {
          const p = path.join(d, n);
          const st = await lstat(p);
          if (st.uid !== uid) bad.push(`${p}: uid ${st.uid}`);
          if (!st.isSymbolicLink() && (st.mode & 0o022) !== 0) bad.push(`${p}: mode ${(st.mode & 0o7777).toString(8)}`);
          if (st.isDirectory()) await walk(p);
        }
      };
      await walk(root);
    }
    expect(bad).toEqual([]);
  });

  it('a changed replica host key is refused and known_hosts is left alone', async () => {
    const khBefore = await readFile(env.sshd.knownHostsPath, 'utf8');
    await env.sshd.regenerateHostKey();
    const p = spawnAgent(['snapshot', '--vm', '81', '--accept-new-host-key'], env.flags);
    expect((await p.exited).code).toBe(1);
    expect(p.stdout() + p.stderr()).toMatch(/host key/i);
    expect(await readFile(env.sshd.knownHostsPath, 'utf8')).toBe(khBefore);
  });
});
