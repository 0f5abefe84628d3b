/**
 * No starvation, through the real sshd and the real receiver processes (one per exec), with two hosts
 * whose keys bind their names into the forced command (`--host hvA`, `--host hvB`). Bounds are small here
 * so the tests stay short; the assertions are "cut within the bound plus a generous margin", never speed.
 */
import { randomBytes } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Client, type ClientChannel } from 'ssh2';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { encodeControl, encodeData, FrameDecoder, PROTOCOL_VERSION } from '../../lib/protocol/protocol.js';
import { slotsDir } from '../../lib/replica/layout.js';
import { readSlotView } from '../../lib/replica/slots.js';
import { errorCodeOf } from '../../lib/shared/errors.js';
import { run } from '../../lib/shared/exec.js';
import { ReplicaClient, type ReplicaConnectOptions } from '../../lib/transfer/replica-client.js';
import { startSshd, type Sshd } from '../../dev/sshd.js';
import { ensureDistBuilt } from '../helpers/build-dist.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const entry = path.join(repoRoot, 'dist', 'agent', 'receiver-main.js');


const LIMITS = { drain: 2, window: 3, minKiB: 64, hello: 3 };

let sshd: Sshd;
let work: string;
let keyB: string;
let pubB: string;

function forced(host: string, extra = ''): string {
  return (
    `command="${process.execPath} ${entry} --host ${host} --snaps-dir ${sshd.replicaDir} --lock-timeout 5 --busy-wait 20 ` +
    `--drain-timeout ${LIMITS.drain} --progress-window ${LIMITS.window} --min-progress-kib ${LIMITS.minKiB} ` +
    `--hello-timeout ${LIMITS.hello} --max-session-time 120 ${extra}",restrict`
  );
}

async function authorize(extra: string): Promise<void> {
  await sshd.setAuthorizedKeys([`${forced('hvA', extra)} ${sshd.clientPublicKey}`, `${forced('hvB', extra)} ${pubB}`]);
}

/** Every client a test opened, closed after it even when it failed (a held slot would fail the next test). */
const clients: ReplicaClient[] = [];
async function connect(who: 'A' | 'B'): Promise<ReplicaClient> {
  const c = await ReplicaClient.connect(opts(who));
  clients.push(c);
  return c;
}
afterEach(async () => {
  for (const c of clients.splice(0)) await c.close().catch(() => {});
});

function opts(who: 'A' | 'B'): ReplicaConnectOptions {
  return {
    host: sshd.host,
    port: sshd.port,
    username: sshd.user,
    privateKey: who === 'A' ? sshd.clientKeyPath : keyB,
    knownHostsFile: sshd.knownHostsPath,
    acceptNewHostKey: false,
    receiverCommand: 'onestor-agent receive',
    connectTimeoutMs: 10_000,
    localHost: `hv${who}`,
  };
}

/**
 * Resolves once a receiver of `identity` is registered as waiting for a slot (its wait file, read as the
 * receivers read it): a fixed sleep would be too short on a loaded machine.
 */
async function waitsForSlot(identity: string): Promise<void> {
  const dir = slotsDir(sshd.replicaDir);
  for (const t0 = Date.now(); Date.now() - t0 < 20_000; await new Promise((r) => setTimeout(r, 50))) {
    if ((await readSlotView(dir, 2)).waiting.has(identity)) return;
  }
  throw new Error(`no receiver of ${identity} waits for a slot in ${dir} after 20 s`);
}

/** A raw exec channel on A's key: the test plays a misbehaving agent. */
async function rawA(): Promise<{ ssh: Client; ch: ClientChannel; closed: Promise<number> }> {
  const ssh = new Client();
  const privateKey = await fsp.readFile(sshd.clientKeyPath);
  await new Promise<void>((resolve, reject) => {
    ssh.once('ready', () => resolve()).once('error', reject);
    ssh.connect({ host: sshd.host, port: sshd.port, username: sshd.user, privateKey, readyTimeout: 10_000 });
  });
  ssh.on('error', () => {});
  const ch = await new Promise<ClientChannel>((res, rej) => ssh.exec('onestor-agent receive', (e, c) => (e ? rej(e) : res(c))));
  // 'exit' (the receiver's exit status) comes even when we never read the channel; 'close' would wait for that
  const closed = new Promise<number>((resolve) => {
    ch.once('exit', () => resolve(Date.now()));
    ch.once('close', () => resolve(Date.now()));
  });
  return { ssh, ch, closed };
}

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return Promise.race([p, new Promise<T>((_, reject) => setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms).unref())]);
}

/** A small valid seed (base + base.1) to publish. */
async function makeSeed(name: string, diskId = 0): Promise<{ base: string; base1: string }> {
  const snap = path.join(work, name, `disk.${diskId}.snap`);
  await fsp.mkdir(snap, { recursive: true });
  await fsp.symlink('.', path.join(snap, `disk.${diskId}.snap`));
  const base = path.join(snap, 'base');
  const base1 = path.join(snap, 'base.1');
  const q = async (args: string[]) => {
    const r = await run(args[0]!, args.slice(1));
    if (r.code !== 0) throw new Error(`${args.join(' ')}: ${r.stderr}`);
  };
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', base, '16M']);
  await q(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x3c 0 2M', base]);
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', `disk.${diskId}.snap/base`, '-F', 'qcow2', base1]);
  await q(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x4d 1M 1M', base1]);
  return { base, base1 };
}

async function publishSeed(c: ReplicaClient, vm: number, disk: number, seed: { base: string; base1: string }, checkpoint: string): Promise<void> {
  const d = await c.openDisk(vm, disk);
  await d.upload('base', seed.base, { key: `base-${checkpoint}` });
  await d.upload('base1', seed.base1, { key: `b1-${checkpoint}` });
  const m = await d.publishFull({ checkpoint, capturedAt: 1_700_000_000, consistency: 'crash-consistent', sourceHost: 'x', base: `base-${checkpoint}`, base1: `b1-${checkpoint}` });
  expect(m.checkpoint).toBe(checkpoint);
  await d.close();
}

let seed: { base: string; base1: string };

beforeAll(async () => {
  await ensureDistBuilt();
  work = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-rlim-'));
  sshd = await startSshd();
  keyB = path.join(work, 'hvB_ed25519');
  const r = await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'hvB', '-f', keyB]);
  expect(r.code, r.stderr).toBe(0);
  pubB = (await fsp.readFile(`${keyB}.pub`, 'utf8')).trim();
  seed = await makeSeed('seed');
}, 300_000);

afterAll(async () => {
  await sshd?.stop();
  if (work) await fsp.rm(work, { recursive: true, force: true });
});

describe('sessions that do not move data are ended in bounded time; other hosts proceed', () => {
  it('a client that never reads its replies is cut after the drain timeout, releasing its slot and disk lock', async () => {
    await authorize('--max-sessions 2');
    // Replies must be big enough to fill the SSH window: status of a VM with several disks published.
    const b = await connect('B');
    for (let disk = 0; disk < 8; disk++) await publishSeed(b, 60, disk, await makeSeed(`s60-${disk}`, disk), `c60-${disk}`);
    await b.close();

    const a = await rawA();
    // never attach a 'data' listener: ssh2 stops opening the window once its buffer is full
    a.ch.write(encodeControl({ type: 'hello', protocol: PROTOCOL_VERSION, agentVersion: 't', host: 'hvA' }));
    a.ch.write(encodeControl({ type: 'open', vm: 61, disk: 0 }));
    let sent = 0;
    // ~3 KiB replies: 2000 of them are three times what the SSH window (2 MiB) and the pipe can hold
    while (sent < 2_000 && a.ch.write(encodeControl({ type: 'status', vm: 60 }))) {
      sent++;
      if (sent % 200 === 0) await new Promise((r) => setImmediate(r));
    }
    const stuckAt = Date.now();

    // meanwhile host B works normally
    const b2 = await connect('B');
    await publishSeed(b2, 62, 0, seed, 'c62');

    const closedAt = await within(a.closed, 60_000, 'non-reading session cut');
    // the drain timeout is 2 s; the margin covers the receiver working through the ~700 requests (each
    // status reads 8 manifests) it answers before its output blocks
    expect(closedAt - stuckAt).toBeLessThan(30_000);
    // now read what was held back: the receiver's log names the drain timeout as the reason
    let stderr = '';
    a.ch.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    a.ch.on('data', () => {});
    await within(new Promise((r) => a.ch.once('close', r)), 30_000, 'channel drained after exit');
    expect(stderr).toMatch(/agent does not read replies; ending session/);
    // its disk lock went with it (lock timeout is 5 s; a held lock would be E_LOCK_TIMEOUT)
    await publishSeed(b2, 61, 0, seed, 'c61');
    await b2.close();
    a.ssh.end();
  }, 180_000);

  it('a client that trickles a byte every 0.7 s inside an upload is cut after one progress window; B uploads meanwhile', async () => {
    await authorize('--max-sessions 2');
    const a = await rawA();
    const replies: Array<{ type: string; code?: string; message?: string }> = [];
    const dec = new FrameDecoder();
    a.ch.on('data', (d: Buffer) => {
      for (const f of dec.push(d)) if (f.type === 'control') replies.push(f.message as never);
    });
    a.ch.stderr.on('data', () => {});
    a.ch.write(encodeControl({ type: 'hello', protocol: PROTOCOL_VERSION, agentVersion: 't', host: 'hvA' }));
    a.ch.write(encodeControl({ type: 'open', vm: 63, disk: 0 }));
    a.ch.write(encodeControl({ type: 'put', kind: 'base', size: 1 << 20, key: 'trickle' }));
    const [header, payload] = encodeData(Buffer.alloc(1 << 20, 1));
    const stream = Buffer.concat([header, payload]);
    let pos = 0;
    let closed = false;
    void a.closed.then(() => (closed = true));
    const t0 = Date.now();
    const trickle = (async () => {
      while (!closed && pos < stream.length) {
        a.ch.write(stream.subarray(pos, pos + 1));
        pos++;
        await new Promise((r) => setTimeout(r, 700));
      }
    })();

    // B seeds a disk while A trickles: a normal session is never cut by the same bounds
    const big = path.join(work, 'big.bin');
    await fsp.writeFile(big, randomBytes(8 << 20));
    const b = await connect('B');
    const d = await b.openDisk(64, 0);
    const up = await d.upload('base', big, { key: 'big' });
    expect(up.bytes).toBe(8 << 20);
    await d.close();
    await b.close();

    const closedAt = await within(a.closed, 60_000, 'trickling session cut');
    await trickle;
    // one window of agent time (3 s) plus process start and margins; far below the idle timeout (900 s)
    expect(closedAt - t0).toBeLessThan(30_000);
    expect(pos).toBeLessThan(60);
    const err = replies.find((r) => r.type === 'error');
    expect(err?.code).toBe('E_ABORTED');
    expect(err?.message).toMatch(/minimum 64 KiB per window/);
    a.ssh.end();
  }, 120_000);

  it('a receiver that never gets a hello is ended at the hello deadline', async () => {
    await authorize('--max-sessions 2');
    const a = await rawA();
    a.ch.on('data', () => {});
    a.ch.stderr.on('data', () => {});
    const t0 = Date.now();
    // a byte now and then (a trickled hello) does not keep it alive either
    const hello = encodeControl({ type: 'hello', protocol: PROTOCOL_VERSION, agentVersion: 'x'.repeat(200), host: 'hvA' });
    let pos = 0;
    const timer = setInterval(() => a.ch.write(hello.subarray(pos, ++pos)), 700);
    const closedAt = await within(a.closed, 30_000, 'hello deadline');
    clearInterval(timer);
    expect(closedAt - t0).toBeLessThan(20_000);
    a.ssh.end();
  }, 60_000);
});

describe('slots are fair across hosts', () => {
  // these sessions sit on an open disk on purpose: a long progress window keeps them from being cut
  const idleOk = '--progress-window 300';
  it('one host cannot take all slots: with 2 slots, A gets one, B the other at once, A waits', async () => {
    await authorize(`--max-sessions 2 ${idleOk}`);
    const a1 = await connect('A');
    const a2 = await connect('A');
    const b1 = await connect('B');
    const da1 = await a1.openDisk(70, 0);
    let a2Opened = false;
    const pa2 = a2.openDisk(70, 1).then((d) => {
      a2Opened = true;
      return d;
    });
    pa2.catch(() => {});
    const db1 = await within(b1.openDisk(71, 0), 20_000, 'B opens while A holds its share');
    expect(a2Opened).toBe(false);
    await db1.close();
    // B's slot is free now but it is beyond A's share (1 of 2): A still waits until its own first one closes
    await new Promise((r) => setTimeout(r, 1500));
    expect(a2Opened).toBe(false);
    await da1.close();
    const da2 = await within(pa2, 20_000, 'A second session after its first closed');
    await da2.close();
    for (const c of [a1, a2, b1]) await c.close();
  }, 60_000);

  it('a freed slot goes to the host holding fewer, even when the other host asked first', async () => {
    // A may use both slots while alone
    await authorize(`--max-sessions 2 --max-sessions-per-host 2 ${idleOk}`);
    const a1 = await connect('A');
    const a2 = await connect('A');
    const a3 = await connect('A');
    const b1 = await connect('B');
    const da1 = await a1.openDisk(72, 0);
    const da2 = await a2.openDisk(72, 1);
    const order: string[] = [];
    const pa3 = a3.openDisk(72, 2).then((d) => (order.push('A'), d));
    pa3.catch(() => {});
    await waitsForSlot('hvA'); // A3 is waiting first
    const pb1 = b1.openDisk(73, 0).then((d) => (order.push('B'), d));
    pb1.catch(() => {});
    await waitsForSlot('hvB'); // B is registered as waiting
    expect(order).toEqual([]);
    await da1.close();
    const db1 = await within(pb1, 20_000, 'B gets the freed slot');
    await new Promise((r) => setTimeout(r, 1000));
    expect(order).toEqual(['B']);
    await da2.close();
    const da3 = await within(pa3, 20_000, 'A third session once A holds fewer');
    expect(order).toEqual(['B', 'A']);
    await da3.close();
    await db1.close();
    for (const c of [a1, a2, a3, b1]) await c.close();
  }, 60_000);

  it('E_BUSY with a clear reason when the wait ends', async () => {
    await sshd.setAuthorizedKeys([
      `${forced('hvA', '--max-sessions 2').replace('--busy-wait 20', '--busy-wait 1')} ${sshd.clientPublicKey}`,
    ]);
    const a1 = await connect('A');
    const a2 = await connect('A');
    const d = await a1.openDisk(74, 0);
    const err = await a2.openDisk(74, 1).catch((e) => e);
    expect(errorCodeOf(err)).toBe('E_BUSY');
    expect(err.message).toMatch(/host hvA already holds 1 of its 1 sessions/);
    await d.close();
    await a1.close();
    await a2.close();
  }, 60_000);
});

describe('onestor-agent receive --host (the forced command install.sh writes)', () => {
  const main = path.join(repoRoot, 'dist', 'agent', 'main.js');
  it('takes a host name and serves the protocol; refuses anything else as a name', async () => {
    const snaps = path.join(work, 'cli-snaps');
    const sshrc = path.join(work, 'cli-sshrc');
    await fsp.writeFile(sshrc, `REPLICA_RECOVERY_SNAPS_DIR=${snaps}\n`);
    const hello = encodeControl({ type: 'hello', protocol: PROTOCOL_VERSION, agentVersion: 't', host: 'claims-to-be-someone-else' });
    const ok = await run(process.execPath, [main, 'receive', '--host', 'hv1.example', '--sshrc', sshrc], { input: Buffer.concat([hello, encodeControl({ type: 'bye' })]).toString('latin1') });
    expect(ok.code, ok.stderr).toBe(0);
    for (const bad of ['hv 1', 'hv1;id', '-x', 'a'.repeat(254)]) {
      const r = await run(process.execPath, [main, 'receive', '--host', bad, '--sshrc', sshrc]);
      expect(r.code, bad).toBe(2);
      expect(r.stderr).toMatch(bad === '-x' ? /--host/ : /--host must be a host name/);
    }
  });
});
