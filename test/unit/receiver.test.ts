/**
 * The real receiver on a real temp SNAPS dir with real qemu-img; only the transport is an in-process
 * stream pair. The agent side is the real ReceiverConnection, except where a test needs to misbehave on
 * the wire (corrupted bytes, cuts), which uses raw frames.
 */
import { createHash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from '../../lib/shared/exec.js';
import { errorCodeOf } from '../../lib/shared/errors.js';
import { Exit } from '../../lib/shared/exit-codes.js';
import { encodeData } from '../../lib/protocol/protocol.js';
import { runReceiver, type ReceiverOptions } from '../../lib/replica/receiver.js';
import { uploadKeyFor } from '../../lib/replica/ownership.js';
import { ReceiverConnection } from '../../lib/transfer/replica-client.js';
import { rawPeer as sharedRawPeer } from '../helpers/receiver-session.js';
import { xxh64Of } from '../helpers/digest.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
let root: string;

beforeAll(async () => {
  root = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-recv-'));
});
afterAll(async () => {
  await fsp.rm(root, { recursive: true, force: true });
});


async function q(args: string[]): Promise<string> {
  const r = await run(args[0]!, args.slice(1));
  if (r.code !== 0) throw new Error(`${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

async function sha(file: string): Promise<string> {
  return createHash('sha256').update(await fsp.readFile(file)).digest('hex');
}

/** Guest view of an image: digest of its raw content (comparing digests keeps failures readable). */
async function guestView(image: string): Promise<string> {
  const out = path.join(root, `view-${Math.random().toString(36).slice(2)}.raw`);
  await q(['qemu-img', 'convert', '-O', 'raw', image, out]);
  const digest = await sha(out);
  await fsp.rm(out);
  return digest;
}

/** A hypervisor-side disk in OpenNebula's layout: DIR/disk.N.snap/{base, base.1, disk.N.snap -> .}. */
async function makeSourceDisk(name: string, disk = 0, basePattern = 0x11): Promise<{ snap: string; base: string; base1: string }> {
  const dir = path.join(root, name);
  const snap = path.join(dir, `disk.${disk}.snap`);
  await fsp.mkdir(snap, { recursive: true });
  await fsp.symlink('.', path.join(snap, `disk.${disk}.snap`));
  const base = path.join(snap, 'base');
  const base1 = path.join(snap, 'base.1');
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', base, String(SIZE)]);
  await q(['qemu-io', '-f', 'qcow2', '-c', `write -P ${basePattern} 0 4M`, base]);
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', `disk.${disk}.snap/base`, '-F', 'qcow2', base1]);
  await q(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x22 1M 1M', base1]);
  return { snap, base, base1 };
}

/** An increment holding only the given writes (like a reuse-external incremental backup target). */
async function makeInc(name: string, ops: string[], alsoApplyTo?: string): Promise<string> {
  const inc = path.join(root, `${name}.qcow2`);
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', inc, String(SIZE)]);
  for (const op of ops) {
    await q(['qemu-io', '-f', 'qcow2', '-c', op, inc]);
    if (alsoApplyTo) await q(['qemu-io', '-f', 'qcow2', '-c', op, alsoApplyTo]);
  }
  // As captured, the inc names a backing that does not exist on the replica.
  await q(['qemu-img', 'rebase', '-u', '-f', 'qcow2', '-b', '/nonexistent/capture-target-backing', '-F', 'qcow2', inc]);
  return inc;
}

function options(snapsDir: string, extra: Partial<ReceiverOptions> = {}): ReceiverOptions {
  return { snapsDir, identity: 'hv1', lockTimeoutSec: 2, maxSessions: 4, busyWaitSec: 0, maxUsedPercent: 99, ...(process.env.RLOG ? { log: (o: object, m: string) => console.error(Date.now() % 100000, m, JSON.stringify(o)) } : {}), ...extra };
}

interface Session {
  conn: ReceiverConnection;
  done: Promise<number>;
}

async function session(snapsDir: string, extra: Partial<ReceiverOptions> = {}): Promise<Session> {
  const toReceiver = new PassThrough();
  const fromReceiver = new PassThrough();
  const done = runReceiver(toReceiver, fromReceiver, options(snapsDir, extra)).finally(() => fromReceiver.end());
  const conn = new ReceiverConnection(fromReceiver, toReceiver);
  await conn.hello('hv1', 'test');
  return { conn, done };
}

async function endSession(s: Session): Promise<number> {
  await s.conn.bye();
  return s.done;
}

/** A misbehaving peer: raw frames in, decoded replies out (the shared helper, as writer hv1). */
function rawPeer(snapsDir: string, extra: Partial<ReceiverOptions> = {}) {
  return sharedRawPeer(snapsDir, { identity: 'hv1', ...extra });
}

/** Every path under dir with its inode, type, size and content digest: to prove nothing was touched. */
async function treeSnapshot(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  async function walk(d: string): Promise<void> {
    for (const e of await fsp.readdir(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      const st = await fsp.lstat(p);
      if (e.isSymbolicLink()) out[p] = `L ${st.ino} ${await fsp.readlink(p)}`;
      else if (e.isDirectory()) {
        out[p] = `D ${st.ino}`;
        await walk(p);
      } else out[p] = `F ${st.ino} ${st.size} ${st.mtimeMs} ${await sha(p)}`;
    }
  }
  await walk(dir);
  return out;
}

/** What recovery does: test -f both, tar disk.N + disk.N.snap/ elsewhere, and read the guest view there. */
async function recoverView(snapsDir: string, vm: number, disk: number): Promise<string> {
  const vmDir = path.join(snapsDir, String(vm));
  expect((await fsp.lstat(path.join(vmDir, `disk.${disk}.snap`, 'base'))).isFile()).toBe(true);
  expect((await fsp.lstat(path.join(vmDir, `disk.${disk}.snap`, 'base.1'))).isFile()).toBe(true);
  const target = path.join(root, `recovered-${Math.random().toString(36).slice(2)}`);
  await fsp.mkdir(target);
  const tarFile = `${target}.tar`;
  await q(['tar', '-C', vmDir, '-cf', tarFile, `disk.${disk}`, `disk.${disk}.snap`]);
  await q(['tar', '-C', target, '-xf', tarFile]);
  const view = await guestView(path.join(target, `disk.${disk}`));
  await fsp.rm(target, { recursive: true });
  await fsp.rm(tarFile);
  return view;
}

async function seed(snapsDir: string, vm: number, disk: number, src: { base: string; base1: string }, checkpoint = 'ck1') {
  const s = await session(snapsDir);
  const d = await s.conn.openDisk(vm, disk);
  const b = await d.upload('base', src.base, { key: `base-${checkpoint}` });
  const b1 = await d.upload('base1', src.base1, { key: `base1-${checkpoint}` });
  const manifest = await d.publishFull({
    checkpoint,
    capturedAt: 1700000000,
    consistency: 'crash-consistent',
    sourceHost: 'hv1',
    base: `base-${checkpoint}`,
    base1: `base1-${checkpoint}`,
  });
  await d.close();
  expect(await endSession(s)).toBe(0);
  return { manifest, b, b1 };
}

describe('receiver: full seed', () => {
  it('publishes the exact recovery layout, nothing else inside disk.N.snap, and a manifest beside it', async () => {
    const snaps = path.join(root, 'snaps-seed');
    const src = await makeSourceDisk('src-seed', 3);
    const { manifest, b1 } = await seed(snaps, 42, 3, src);
    const vmDir = path.join(snaps, '42');
    expect(await fsp.readlink(path.join(vmDir, 'disk.3'))).toBe('disk.3.snap/base.1');
    expect(await fsp.readlink(path.join(vmDir, 'disk.3.snap', 'disk.3.snap'))).toBe('.');
    expect((await fsp.readdir(path.join(vmDir, 'disk.3.snap'))).sort()).toEqual(['base', 'base.1', 'disk.3.snap']);
    expect((await fsp.readdir(vmDir)).sort()).toEqual(['.onestor', 'disk.3', 'disk.3.snap']);
    const info = JSON.parse(await q(['qemu-img', 'info', '--output=json', path.join(vmDir, 'disk.3')]));
    expect(info['backing-filename']).toBe('disk.3.snap/base');
    expect(info['backing-filename-format']).toBe('qcow2');
    expect(b1.digest).toBe('xxh64');
    expect(await xxh64Of(path.join(vmDir, 'disk.3.snap', 'base.1'))).toBe(b1.hex);
    expect(await sha(path.join(vmDir, 'disk.3.snap', 'base.1'))).toBe(await sha(src.base1));
    expect(manifest.base1.sha256).toBeUndefined(); // base.1 came with xxh64
    expect(await recoverView(snaps, 42, 3)).toEqual(await guestView(src.base1));
    expect(manifest.checkpoint).toBe('ck1');
    expect(manifest.base.sha256).toBe(await sha(src.base));
    const stored = JSON.parse(await fsp.readFile(path.join(vmDir, '.onestor', 'disk.3.json'), 'utf8'));
    expect(stored.checkpoint).toBe('ck1');

    // A second session sees the lineage and the base digest (from the cache: base is not re-read).
    const s = await session(snaps);
    const d = await s.conn.openDisk(42, 3);
    expect(d.manifest?.checkpoint).toBe('ck1');
    expect(d.baseOnReplica).toEqual({ size: (await fsp.stat(src.base)).size, sha256: await sha(src.base) });
    expect((await s.conn.status()).map((m) => [m.vmId, m.diskId, m.checkpoint])).toEqual([[42, 3, 'ck1']]);
    await d.close();
    await endSession(s);
  });

  it('a seed without base reuses the replica base; a changed base replaces base.1 coherently', async () => {
    const snaps = path.join(root, 'snaps-reseed');
    const src = await makeSourceDisk('src-reseed', 0);
    await seed(snaps, 7, 0, src);
    await q(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x33 5M 64k', src.base1]);
    const s = await session(snaps);
    const d = await s.conn.openDisk(7, 0);
    expect(d.baseOnReplica?.sha256).toBe(await sha(src.base));
    await d.upload('base1', src.base1, { key: 'b1-ck2' });
    await d.publishFull({ checkpoint: 'ck2', capturedAt: 1700000100, consistency: 'filesystem-frozen', sourceHost: 'hv2', base1: 'b1-ck2' });
    await d.close();
    await endSession(s);
    expect(await recoverView(snaps, 7, 0)).toEqual(await guestView(src.base1));

    // Different image (e.g. after a detach/attach): new base + base.1 published together.
    const src2 = await makeSourceDisk('src-reseed2', 0, 0x44);
    await seed(snaps, 7, 0, src2, 'ck3');
    expect(await recoverView(snaps, 7, 0)).toEqual(await guestView(src2.base1));
  });

  it('refuses a base.1 whose backing name is not disk.N.snap/base, publishing nothing', async () => {
    const snaps = path.join(root, 'snaps-badbacking');
    const src = await makeSourceDisk('src-badbacking', 1);
    const s = await session(snaps);
    const d = await s.conn.openDisk(9, 0); // disk 0, but the image says disk.1.snap/base
    await d.upload('base', src.base, { key: 'b' });
    await d.upload('base1', src.base1, { key: 'b1' });
    const err = await d
      .publishFull({ checkpoint: 'x', capturedAt: 1, consistency: 'crash-consistent', sourceHost: 'h', base: 'b', base1: 'b1' })
      .catch((e) => e);
    expect(errorCodeOf(err)).toBe('E_QEMU_IMG');
    expect(String(err.message)).toMatch(/disk\.0\.snap\/base/);
    await d.close();
    await endSession(s);
    await expect(fsp.lstat(path.join(snaps, '9'))).rejects.toThrow(/ENOENT/);
  });

  /** A qemu-img that logs each call (`SUBCOMMAND FILE`) before running the real one. */
  async function loggingQemuImg(name: string): Promise<{ bin: string; calls: () => Promise<string[]> }> {
    const dir = path.join(root, name);
    await fsp.mkdir(dir, { recursive: true });
    const log = path.join(dir, 'calls');
    const bin = path.join(dir, 'qemu-img');
    await fsp.writeFile(bin, `#!/bin/sh\nfor a; do last="$a"; done\nprintf '%s %s\\n' "$1" "$last" >> '${log}'\nexec qemu-img "$@"\n`, { mode: 0o755 });
    return { bin, calls: async () => (await fsp.readFile(log, 'utf8').catch(() => '')).split('\n').filter(Boolean) };
  }

  it('checks each upload with qemu-img as soon as its bytes are verified, before the publish asks', async () => {
    const snaps = path.join(root, 'snaps-early-check');
    const src = await makeSourceDisk('src-early-check', 0);
    const qemu = await loggingQemuImg('qemu-early-check');
    const s = await session(snaps, { qemuImg: qemu.bin });
    const d = await s.conn.openDisk(12, 0);
    await d.upload('base', src.base, { key: 'b' });
    await d.upload('base1', src.base1, { key: 'b1' });
    // no publish yet: the three checks (info of base; check alone + info of base.1) run on their own
    const uploads = (c: string[]) => c.filter((l) => l.includes('/12-0/up.'));
    let seen: string[] = [];
    for (let i = 0; i < 200 && uploads(seen).length < 3; i++) {
      await new Promise((r) => setTimeout(r, 25));
      seen = await qemu.calls();
    }
    expect(uploads(seen).map((l) => l.split(' ')[0]).sort()).toEqual(['check', 'info', 'info']);
    const m = await d.publishFull({ checkpoint: 'c1', capturedAt: 1, consistency: 'crash-consistent', sourceHost: 'h', base: 'b', base1: 'b1' });
    expect(m.checkpoint).toBe('c1');
    // the publish awaited those verdicts instead of asking qemu-img again about the uploads
    expect(uploads(await qemu.calls())).toHaveLength(3);
    await d.close();
    expect(await endSession(s)).toBe(Exit.OK);
    expect(await recoverView(snaps, 12, 0)).toEqual(await guestView(src.base1));
  });

  it("a base.1 that fails both checks is refused with the check's error; one never published ends the session cleanly", async () => {
    const snaps = path.join(root, 'snaps-garbage-base1');
    const garbage = path.join(root, 'garbage-base1');
    await fsp.writeFile(garbage, Buffer.alloc(3 * 65536, 0x5a));
    const s = await session(snaps);
    const d = await s.conn.openDisk(13, 0);
    await d.upload('base1', garbage, { key: 'g1' });
    const err = await d.publishFull({ checkpoint: 'x', capturedAt: 1, consistency: 'crash-consistent', sourceHost: 'h', base1: 'g1' }).catch((e) => e);
    expect(errorCodeOf(err)).toBe('E_QEMU_IMG');
    expect(String(err.message)).toMatch(/^replica: qemu-img check of base\.1 failed/);
    // uploaded, failing its checks, and never published: nothing is left unhandled, the session ends normally
    await d.upload('base1', garbage, { key: 'g2' });
    await d.close();
    expect(await endSession(s)).toBe(Exit.OK);
    await expect(fsp.lstat(path.join(snaps, '13'))).rejects.toThrow(/ENOENT/);
  });
});

describe('receiver: hostile and broken input', () => {
  it('refuses traversal and malformed ids/keys with E_PROTOCOL, leaving the replica byte- and inode-identical', async () => {
    const snaps = path.join(root, 'snaps-hostile');
    const src = await makeSourceDisk('src-hostile', 0);
    await seed(snaps, 1, 0, src);
    const before = await treeSnapshot(snaps);
    const hostile: object[] = [
      { type: 'open', vm: '../1', disk: 0 },
      { type: 'open', vm: -1, disk: 0 },
      { type: 'open', vm: 1.5, disk: 0 },
      { type: 'open', vm: 2 ** 31, disk: 0 },
      { type: 'open', vm: 1, disk: '0/../../etc' },
      { type: 'open', vm: '1e0', disk: 0 },
    ];
    for (const msg of hostile) {
      const p = rawPeer(snaps);
      expect((await p.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'h' })).type).toBe('ok');
      const r = await p.ask(msg);
      expect(r).toMatchObject({ type: 'error', code: 'E_PROTOCOL' });
      expect(await p.done).toBe(Exit.PROTOCOL);
    }
    for (const key of ['../../1/disk.0.snap/base.1', '..', '/etc/passwd', 'a'.repeat(129), '']) {
      const p = rawPeer(snaps);
      await p.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'h' });
      expect((await p.ask({ type: 'open', vm: 1, disk: 0 })).type).toBe('ok');
      const r = await p.ask({ type: 'put', kind: 'base1', size: 10, key });
      expect(r).toMatchObject({ type: 'error', code: 'E_PROTOCOL' });
      expect(await p.done).toBe(Exit.PROTOCOL);
    }
    // Wrong protocol version, messages before hello, garbage frames
    const v = rawPeer(snaps);
    expect(await v.ask({ type: 'hello', protocol: 2, agentVersion: 't', host: 'h' })).toMatchObject({ code: 'E_PROTOCOL' });
    expect(await v.done).toBe(Exit.PROTOCOL);
    const early = rawPeer(snaps);
    expect(await early.ask({ type: 'open', vm: 1, disk: 0 })).toMatchObject({ code: 'E_PROTOCOL' });
    const junk = rawPeer(snaps);
    junk.raw(Buffer.from([0, 0, 0, 1, 9, 0]));
    expect(await junk.next()).toMatchObject({ code: 'E_PROTOCOL' });
    expect(await junk.done).toBe(Exit.PROTOCOL);
    // the replica-wide sweep stamp a hello may write is housekeeping, not something the input changed
    const noSweep = (t: Record<string, string>) => Object.fromEntries(Object.entries(t).filter(([k]) => !k.includes('/.onestor/sweep.')));
    expect(noSweep(await treeSnapshot(snaps))).toEqual(noSweep(before));
  });

  it('refuses symlinks planted inside SNAPS/VMID (never written through)', async () => {
    const snaps = path.join(root, 'snaps-symlink');
    const elsewhere = path.join(root, 'elsewhere');
    await fsp.mkdir(path.join(elsewhere, 'disk.0.snap'), { recursive: true });
    await fsp.mkdir(snaps, { recursive: true });
    await fsp.symlink(elsewhere, path.join(snaps, '5'));
    const s = await session(snaps);
    expect(errorCodeOf(await s.conn.openDisk(5, 0).catch((e) => e))).toBe('E_PATH');
    await fsp.rm(path.join(snaps, '5'));
    await fsp.mkdir(path.join(snaps, '6', 'disk.0.snap'), { recursive: true });
    await fsp.writeFile(path.join(elsewhere, 'victim'), 'keep');
    await fsp.symlink(path.join(elsewhere, 'victim'), path.join(snaps, '6', 'disk.0.snap', 'base.1'));
    expect(errorCodeOf(await s.conn.openDisk(6, 0).catch((e) => e))).toBe('E_PATH');
    await endSession(s);
    expect(await fsp.readFile(path.join(elsewhere, 'victim'), 'utf8')).toBe('keep');
    expect(await fsp.readdir(path.join(elsewhere, 'disk.0.snap'))).toEqual([]);
  });

  it('E_DIGEST on a corrupted byte and E_SIZE on a short upload: temp removed, nothing published', async () => {
    const snaps = path.join(root, 'snaps-corrupt');
    const src = await makeSourceDisk('src-corrupt', 0);
    await seed(snaps, 2, 0, src);
    const before = await treeSnapshot(path.join(snaps, '2'));
    const data = await fsp.readFile(src.base1);
    const good = createHash('sha256').update(data).digest('hex');
    const bad = Buffer.from(data);
    bad[bad.length >> 1] = bad[bad.length >> 1]! ^ 0x01;

    const p = rawPeer(snaps);
    await p.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'h' });
    await p.ask({ type: 'open', vm: 2, disk: 0 });
    expect(await p.ask({ type: 'put', kind: 'base1', size: bad.length, key: 'k1' })).toMatchObject({ type: 'ok', offset: 0 });
    p.data(bad);
    expect(await p.ask({ type: 'end', sha256: good })).toMatchObject({ type: 'error', code: 'E_DIGEST' });
    // The bad upload is gone: a publish naming it is refused, and a new put starts from 0.
    expect(
      await p.ask({ type: 'publish', mode: 'full', checkpoint: 'z', capturedAt: 1, consistency: 'crash-consistent', sourceHost: 'h', base1: 'k1' }),
    ).toMatchObject({ type: 'error', code: 'E_PROTOCOL' });
    expect(await p.done).toBe(Exit.PROTOCOL);

    const p2 = rawPeer(snaps);
    await p2.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'h' });
    await p2.ask({ type: 'open', vm: 2, disk: 0 });
    expect(await p2.ask({ type: 'put', kind: 'base1', size: data.length, key: 'k1' })).toMatchObject({ offset: 0 });
    p2.data(data.subarray(0, data.length - 10));
    expect(await p2.ask({ type: 'end', sha256: good })).toMatchObject({ type: 'error', code: 'E_SIZE' });
    // More than announced: answered early, the rest of the upload is discarded.
    expect(await p2.ask({ type: 'put', kind: 'base1', size: 100, key: 'k2' })).toMatchObject({ offset: 0 });
    p2.data(data.subarray(0, 200));
    expect(await p2.next()).toMatchObject({ type: 'error', code: 'E_SIZE' });
    p2.send({ type: 'end', sha256: good });
    expect(await p2.ask({ type: 'bye' })).toMatchObject({ type: 'ok' });
    expect(await p2.done).toBe(0);
    expect(await treeSnapshot(path.join(snaps, '2'))).toEqual(before);
    // nothing left for this disk: not even its (empty) tmp dir
    await expect(fsp.readdir(path.join(snaps, '.onestor', 'tmp', '2-0'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('xxh64 uploads: a corrupted byte is E_DIGEST; base only with sha256; end must carry the put\'s digest', async () => {
    const snaps = path.join(root, 'snaps-xxh');
    const src = await makeSourceDisk('src-xxh', 0);
    await seed(snaps, 6, 0, src);
    const before = await treeSnapshot(path.join(snaps, '6'));
    const data = await fsp.readFile(src.base1);
    const good = await xxh64Of(src.base1);
    const bad = Buffer.from(data);
    bad[bad.length >> 2] = bad[bad.length >> 2]! ^ 0x80;

    const p = rawPeer(snaps);
    expect(await p.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'h' })).toMatchObject({ digests: expect.arrayContaining(['sha256', 'xxh64']) });
    await p.ask({ type: 'open', vm: 6, disk: 0 });
    expect(await p.ask({ type: 'put', kind: 'base1', size: bad.length, key: 'x1', digest: 'xxh64' })).toMatchObject({ type: 'ok', offset: 0 });
    p.data(bad);
    expect(await p.ask({ type: 'end', xxh64: good })).toMatchObject({ type: 'error', code: 'E_DIGEST', message: expect.stringContaining('xxh64') });
    // the same bytes, right: verified, and the reply names the digest
    expect(await p.ask({ type: 'put', kind: 'base1', size: data.length, key: 'x2', digest: 'xxh64' })).toMatchObject({ offset: 0 });
    p.data(data);
    expect(await p.ask({ type: 'end', xxh64: good })).toEqual({ type: 'ok', bytes: data.length, xxh64: good });
    // base goes with sha256 only (the manifest compares bases by it): a protocol error ends the session
    expect(await p.ask({ type: 'put', kind: 'base', size: 10, key: 'b', digest: 'xxh64' })).toMatchObject({ type: 'error', code: 'E_PROTOCOL' });
    expect(await p.done).toBe(Exit.PROTOCOL);

    const p2 = rawPeer(snaps);
    await p2.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'h' });
    await p2.ask({ type: 'open', vm: 6, disk: 0 });
    expect(await p2.ask({ type: 'put', kind: 'inc', size: data.length, key: 'x3', digest: 'xxh64' })).toMatchObject({ offset: 0 });
    p2.data(data);
    // a sha256 where the put announced xxh64
    expect(await p2.ask({ type: 'end', sha256: createHash('sha256').update(data).digest('hex') })).toMatchObject({ type: 'error', code: 'E_PROTOCOL' });
    expect(await p2.done).toBe(Exit.PROTOCOL);
    expect(await treeSnapshot(path.join(snaps, '6'))).toEqual(before);
  });

  it('resumes an upload cut in the middle and publishes the complete file', async () => {
    const snaps = path.join(root, 'snaps-resume');
    const src = await makeSourceDisk('src-resume', 0);
    const data = await fsp.readFile(src.base);
    const p = rawPeer(snaps);
    await p.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'h' });
    await p.ask({ type: 'open', vm: 3, disk: 0 });
    await p.ask({ type: 'put', kind: 'base', size: data.length, key: 'base-ck1' });
    const half = Math.floor(data.length / 2) + 12345;
    p.data(data.subarray(0, half));
    // The link dies mid-frame: a header announcing more than arrives.
    p.raw(Buffer.concat([encodeData(data.subarray(half, half + 1000))[0], data.subarray(half, half + 10)]));
    p.cut();
    expect(await p.done).toBe(Exit.PROTOCOL);

    const s = await session(snaps);
    const d = await s.conn.openDisk(3, 0);
    const up = await d.upload('base', src.base, { key: 'base-ck1' });
    // Whole bytes of the cut frame that did arrive are kept too: data has no meaning per frame.
    expect(up.resumedFrom).toBe(half + 10);
    expect(up.digest).toBe('sha256');
    expect(up.hex).toBe(await sha(src.base));
    await d.upload('base1', src.base1, { key: 'b1' });
    await d.publishFull({ checkpoint: 'ck1', capturedAt: 1, consistency: 'crash-consistent', sourceHost: 'h', base: 'base-ck1', base1: 'b1' });
    await d.close();
    await endSession(s);
    expect(await sha(path.join(snaps, '3', 'disk.0.snap', 'base'))).toBe(await sha(src.base));
    expect(await recoverView(snaps, 3, 0)).toEqual(await guestView(src.base1));
    // nothing left for this disk: not even its (empty) tmp dir
    await expect(fsp.readdir(path.join(snaps, '.onestor', 'tmp', '3-0'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('an aborted client upload drops the channel; the next session resumes where the bytes stopped', async () => {
    const snaps = path.join(root, 'snaps-abort');
    const big = path.join(root, 'abort-src.bin');
    await fsp.writeFile(big, Buffer.alloc(12 * MiB, 0x5c));
    const s = await session(snaps);
    const d = await s.conn.openDisk(14, 0);
    const ac = new AbortController();
    const err = await d
      .upload('base', big, { key: 'big', signal: ac.signal, onProgress: (sent) => sent >= 4 * MiB && ac.abort() })
      .catch((e) => e);
    expect(errorCodeOf(err)).toBe('E_ABORTED');
    expect(s.conn.connected).toBe(false);
    await s.done;
    const s2 = await session(snaps);
    const d2 = await s2.conn.openDisk(14, 0);
    const r = await d2.upload('base', big, { key: 'big' });
    expect(r.resumedFrom).toBeGreaterThanOrEqual(4 * MiB);
    expect(r.resumedFrom).toBeLessThan(12 * MiB);
    expect(r.digest).toBe('sha256');
    expect(r.hex).toBe(await sha(big));
    await d2.close();
    await endSession(s2);
  });

  it('E_VANISHED when SNAPS/VMID is removed mid-session; the dir is not recreated', async () => {
    const snaps = path.join(root, 'snaps-vanish');
    const src = await makeSourceDisk('src-vanish', 0);
    await seed(snaps, 4, 0, src);
    const s = await session(snaps);
    const d = await s.conn.openDisk(4, 0);
    await d.upload('base1', src.base1, { key: 'b1-2' });
    await fsp.rm(path.join(snaps, '4'), { recursive: true });
    const err = await d
      .publishFull({ checkpoint: 'ck2', capturedAt: 2, consistency: 'crash-consistent', sourceHost: 'h', base1: 'b1-2' })
      .catch((e) => e);
    expect(errorCodeOf(err)).toBe('E_VANISHED');
    expect(errorCodeOf(await d.upload('base1', src.base1, { key: 'b1-3' }).catch((e) => e))).toBe('E_VANISHED');
    await d.close();
    await endSession(s);
    await expect(fsp.lstat(path.join(snaps, '4'))).rejects.toThrow(/ENOENT/);
    // Removed and recreated by someone else (different inode) is the same story.
    await seed(snaps, 4, 0, src);
    const s2 = await session(snaps);
    const d2 = await s2.conn.openDisk(4, 0);
    await d2.upload('base1', src.base1, { key: 'b1-4' });
    await fsp.rm(path.join(snaps, '4'), { recursive: true });
    await fsp.mkdir(path.join(snaps, '4'));
    const err2 = await d2
      .publishFull({ checkpoint: 'ck4', capturedAt: 2, consistency: 'crash-consistent', sourceHost: 'h', base1: 'b1-4' })
      .catch((e) => e);
    expect(errorCodeOf(err2)).toBe('E_VANISHED');
    expect(await fsp.readdir(path.join(snaps, '4'))).toEqual([]);
    await endSession(s2);
  });

  it('per-disk lock: a second session waits then gets E_LOCK_TIMEOUT; session cap gives E_BUSY', async () => {
    const snaps = path.join(root, 'snaps-lock');
    const a = await session(snaps);
    const da = await a.conn.openDisk(8, 0);
    const b = await session(snaps, { lockTimeoutSec: 1 });
    const t0 = Date.now();
    expect(errorCodeOf(await b.conn.openDisk(8, 0).catch((e) => e))).toBe('E_LOCK_TIMEOUT');
    expect(Date.now() - t0).toBeGreaterThanOrEqual(900);
    const other = await b.conn.openDisk(8, 1); // another disk is independent
    await other.close();
    await da.close();
    const again = await b.conn.openDisk(8, 0);
    await again.close();
    await endSession(a);
    await endSession(b);

    // the slot is taken at open (an idle connection holds none) and goes with close
    const c1 = await session(snaps, { maxSessions: 1 });
    const c1d = await c1.conn.openDisk(9, 0);
    const c2 = await session(snaps, { maxSessions: 1, busyWaitSec: 0 });
    expect(errorCodeOf(await c2.conn.openDisk(9, 1).catch((e) => e))).toBe('E_BUSY');
    await c1d.close();
    // refused at open, the disk lock it took first went with the refusal (or this would time out)
    const c2d = await c2.conn.openDisk(9, 1);
    await c2d.close();
    await endSession(c1);
    await endSession(c2);
  });

  it('ends a session whose peer goes silent mid-frame (idle timeout), keeping what arrived for a resume', async () => {
    const snaps = path.join(root, 'snaps-idle');
    const p = rawPeer(snaps, { idleTimeoutSec: 1 });
    await p.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'h' });
    await p.ask({ type: 'open', vm: 13, disk: 0 });
    await p.ask({ type: 'put', kind: 'base', size: 1000, key: 'k' });
    p.raw(Buffer.concat([encodeData(Buffer.alloc(500, 7))[0], Buffer.alloc(100, 7)]));
    const t0 = Date.now();
    expect(await p.done).toBe(1);
    expect(Date.now() - t0).toBeLessThan(5000);
    expect((await fsp.stat(path.join(snaps, '.onestor', 'tmp', '13-0', `up.${uploadKeyFor('hv1', 'k')}`))).size).toBe(100);
    // The lock went with the session.
    const s = await session(snaps, { lockTimeoutSec: 0 });
    await (await s.conn.openDisk(13, 0)).close();
    await endSession(s);
  });

  it('time the receiver spends publishing does not count against the agent; a silent holder is cut after one window', async () => {
    const snaps = path.join(root, 'snaps-progress');
    const src = await makeSourceDisk('src-progress', 0);
    // publish takes 2.5 s of receiver work, far beyond a 1 s progress window: the session must survive it
    const s = await session(snaps, {
      progressWindowSec: 1,
      minProgressKiB: 16,
      onStep: async (step) => {
        if (step.startsWith('full:')) await new Promise((r) => setTimeout(r, 500));
      },
    });
    const d = await s.conn.openDisk(14, 0);
    await d.upload('base', src.base, { key: 'b' });
    await d.upload('base1', src.base1, { key: 'b1' });
    const t0 = Date.now();
    const m = await d.publishFull({ checkpoint: 'p1', capturedAt: 1, consistency: 'crash-consistent', sourceHost: 'hv1', base: 'b', base1: 'b1' });
    expect(m.checkpoint).toBe('p1');
    expect(Date.now() - t0).toBeGreaterThan(1000);
    // now the agent sits on the open disk and sends nothing: cut after the window, lock and slot released
    const code = await s.done;
    expect(code).toBe(1);
    expect(s.conn.connected).toBe(false);
    const s2 = await session(snaps, { lockTimeoutSec: 0, maxSessions: 1, busyWaitSec: 0 });
    await (await s2.conn.openDisk(14, 0)).close();
    await endSession(s2);
  });

  it('hold cap: a session that keeps sending but holds its slot past maxSessionSec of agent time is ended', async () => {
    const snaps = path.join(root, 'snaps-cap');
    const p = rawPeer(snaps, { maxSessionSec: 2, progressWindowSec: 60, minProgressKiB: 1 });
    await p.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'h' });
    await p.ask({ type: 'open', vm: 15, disk: 0 });
    await p.ask({ type: 'put', kind: 'base', size: 64 << 20, key: 'slow' });
    let ended = false;
    void p.done.then(() => (ended = true));
    const t0 = Date.now();
    while (!ended && Date.now() - t0 < 20_000) {
      p.data(Buffer.alloc(16 << 10, 5));
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(await p.done).toBe(1);
    expect(Date.now() - t0).toBeLessThan(15_000);
    const reply = await p.next();
    expect(reply.code).toBe('E_ABORTED');
    expect(String(reply.message)).toMatch(/held its slot for 2 s/);
  });

  it('E_NOSPACE before accepting a put that would pass REPLICA_MAX_USED_PERC', async () => {
    const snaps = path.join(root, 'snaps-space');
    const src = await makeSourceDisk('src-space', 0);
    const s = await session(snaps, { maxUsedPercent: 1 });
    const d = await s.conn.openDisk(10, 0);
    expect(errorCodeOf(await d.upload('base', src.base, { key: 'b' }).catch((e) => e))).toBe('E_NOSPACE');
    await d.close();
    await endSession(s);
  });
});

/**
 * A seed published on a fresh session whose receiver holds its spare copy at the `full:spare` step until
 * openGate() is called; `onStep` sees every step first.
 */
async function seedHeldAtSpare(name: string, vm: number, checkpoint: string, onStep?: (step: string) => void) {
  const snaps = path.join(root, `snaps-${name}`);
  const src = await makeSourceDisk(`src-${name}`, 0);
  let openGate!: () => void;
  const gate = new Promise<void>((r) => (openGate = r));
  const s = await session(snaps, {
    onStep: async (step) => {
      onStep?.(step);
      if (step === 'full:spare') await gate;
    },
  });
  const d = await s.conn.openDisk(vm, 0);
  await d.upload('base', src.base, { key: `${name}-b` });
  await d.upload('base1', src.base1, { key: `${name}-b1` });
  const manifest = await d.publishFull({ checkpoint, capturedAt: 1, consistency: 'crash-consistent', sourceHost: 'hv1', base: `${name}-b`, base1: `${name}-b1` });
  return { snaps, src, s, d, manifest, openGate };
}

describe('receiver: a full over an existing lineage moves the old A/B copies aside and deletes them after its reply', () => {
  const trashOf = (snaps: string) => path.join(snaps, '.onestor', 'trash');
  it('at the publish the old work dir is in the trash (its copies untouched), gone once the session ends; new copies, new view', async () => {
    const snaps = path.join(root, 'snaps-trash');
    const src = await makeSourceDisk('src-trash', 0);
    await seed(snaps, 31, 0, src);
    const work = path.join(snaps, '.onestor', 'work', '31', 'disk.0');
    const oldSpare = await fsp.stat(path.join(work, 'copy.b'));
    await q(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x5a 2M 64k', src.base1]);
    // at the first step after the move, and at the spare step (after the reply): what is where
    const seen: Record<string, { work: string[]; trash: string[][] }> = {};
    const look = async (step: string) => {
      const trash = await fsp.readdir(trashOf(snaps)).catch(() => [] as string[]);
      seen[step] = { work: await fsp.readdir(work).catch(() => []), trash: await Promise.all(trash.map((t) => fsp.readdir(path.join(trashOf(snaps), t)))) };
      if (step === 'full:work-reset') {
        expect(trash).toHaveLength(1);
        expect(trash[0]).toMatch(/^31-0-\d+-[0-9a-f]{8}$/);
        // the same inode, moved, not copied or deleted
        expect((await fsp.stat(path.join(trashOf(snaps), trash[0]!, 'copy.b'))).ino).toBe(oldSpare.ino);
      }
    };
    const s = await session(snaps, { onStep: look });
    const d = await s.conn.openDisk(31, 0);
    await d.upload('base1', src.base1, { key: 'trash-b1-2' });
    await d.publishFull({ checkpoint: 't2', capturedAt: 2, consistency: 'crash-consistent', sourceHost: 'hv1', base1: 'trash-b1-2' });
    await d.close();
    expect(await endSession(s)).toBe(0);
    expect(seen['full:work-reset']!.work).toEqual([]);
    expect(seen['full:work-reset']!.trash[0]!.sort()).toEqual(['copy.a', 'copy.b', 'disk.0.snap', 'state.json']);
    // emptied after the reply, before the spare copy that needs the room
    expect(seen['full:spare']!.trash).toEqual([]);
    expect(await fsp.readdir(trashOf(snaps))).toEqual([]);
    expect((await fsp.readdir(work)).sort()).toEqual(['copy.a', 'copy.b', 'disk.0.snap', 'state.json']);
    expect(await sha(path.join(work, 'copy.b'))).toBe(await sha(path.join(snaps, '31', 'disk.0.snap', 'base.1')));
    expect(await recoverView(snaps, 31, 0)).toEqual(await guestView(src.base1));
  });

  it('a trash left by a receiver that died before emptying it is emptied by the next session, whatever it holds', async () => {
    const snaps = path.join(root, 'snaps-trash-left');
    const src = await makeSourceDisk('src-trash-left', 0);
    await seed(snaps, 32, 0, src);
    const left = path.join(trashOf(snaps), '32-0-1-deadbeef');
    await fsp.mkdir(path.join(left, 'sub'), { recursive: true });
    await fsp.writeFile(path.join(left, 'copy.b'), Buffer.alloc(65536, 1));
    // a symlink in the trash is removed, never followed
    const outside = path.join(root, 'trash-outside.txt');
    await fsp.writeFile(outside, 'keep');
    await fsp.symlink(outside, path.join(left, 'sub', 'link'));
    const s = await session(snaps);
    await (await s.conn.openDisk(32, 0)).close();
    expect(await endSession(s)).toBe(0);
    expect(await fsp.readdir(trashOf(snaps))).toEqual([]);
    expect(await fsp.readFile(outside, 'utf8')).toBe('keep');
  });

  it('a trash dir that is a symlink is refused, never walked', async () => {
    const snaps = path.join(root, 'snaps-trash-link');
    const src = await makeSourceDisk('src-trash-link', 0);
    await seed(snaps, 33, 0, src);
    const elsewhere = path.join(root, 'trash-elsewhere');
    await fsp.mkdir(elsewhere, { recursive: true });
    await fsp.writeFile(path.join(elsewhere, 'precious'), 'x');
    await fsp.symlink(elsewhere, trashOf(snaps));
    const lines: string[] = [];
    const s = await session(snaps, { log: (_o, m) => void lines.push(m) });
    await (await s.conn.openDisk(33, 0)).close();
    await endSession(s);
    expect(await fsp.readdir(elsewhere)).toEqual(['precious']);
    expect(lines).toContain('emptying the trash failed; the next session retries');
  });
});

describe('receiver: uploads written with O_DIRECT', () => {
  /** qemu-img info + check of a 12 MiB file read at most this much of it (measured: 16 KiB) */
  const QEMU_IMG_READ_BACK = 64 * 1024;
  /** Bytes of `file` in the page cache (util-linux fincore: what the kernel holds, not what we think). */
  async function resident(file: string): Promise<number> {
    return Number((await run('fincore', ['--bytes', '--noheadings', '--output', 'RES', file])).stdout.trim());
  }
  async function uploadOnce(snaps: string, src: string, extra: Partial<ReceiverOptions>) {
    const lines: string[] = [];
    const s = await session(snaps, { ...extra, log: (_o, m) => void lines.push(m) });
    const d = await s.conn.openDisk(21, 0);
    const up = await d.upload('base1', src, { key: 'dio' });
    const tmp = path.join(snaps, '.onestor', 'tmp', '21-0');
    const [name] = (await fsp.readdir(tmp)).filter((n) => n.startsWith('up.'));
    const file = path.join(tmp, name!);
    // the receiver's qemu-img checks begin at the upload's end and read the image's first pages back
    const cachedBytes = await resident(file);
    const res = { up, resident: cachedBytes, bytes: await fsp.readFile(file), lines };
    await d.close();
    await endSession(s);
    return res;
  }

  it('a verified upload is on disk byte for byte, and only its unaligned tail went through the page cache', async () => {
    const src = path.join(root, 'dio-src.bin');
    // 12 MiB and an odd tail: 24 batches direct, the last 1234 bytes buffered
    const data = Buffer.alloc(12 * MiB + 1234);
    for (let i = 0; i + 4 <= data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
    await fsp.writeFile(src, data);
    // whether this filesystem takes O_DIRECT, asked of the kernel directly (not through the code under test)
    const fsTakesDirect = await fsp.open(path.join(root, 'dio-probe'), fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_DIRECT).then(
      async (fh) => (await fh.close(), true),
      () => false,
    );
    const direct = await uploadOnce(path.join(root, 'snaps-dio'), src, {});
    const cached = await uploadOnce(path.join(root, 'snaps-nodio'), src, { directWrites: false });
    for (const r of [direct, cached]) {
      expect(r.up.digest).toBe('xxh64');
      expect(r.up.hex).toBe(await xxh64Of(src));
      expect(r.bytes.equals(data)).toBe(true);
      expect(r.lines).not.toContain('direct writes refused (EINVAL); this upload goes through the page cache');
    }
    // through the page cache every byte stays resident after the fsync; direct, at most the tail's page and
    // what qemu-img's checks read back (header and tables: a few pages, far from the 12 MiB written)
    expect(cached.resident).toBeGreaterThanOrEqual(12 * MiB);
    if (fsTakesDirect) expect(direct.resident).toBeLessThanOrEqual(4096 + QEMU_IMG_READ_BACK);
    else expect(direct.resident).toBeGreaterThanOrEqual(12 * MiB);
  });
});

describe('receiver: a seed\'s A/B spare is made after the publish reply', () => {
  it('answers publish and close before the spare copy, holds the disk lock until it is made, then merges as before', async () => {
    const reached: string[] = [];
    const { snaps, src, s, d, manifest: m, openGate } = await seedHeldAtSpare('spare', 23, 's1', (step) => reached.push(step));
    const work = path.join(snaps, '.onestor', 'work', '23', 'disk.0');
    // published and recoverable while the spare has not started copying
    expect(m.checkpoint).toBe('s1');
    // the spare starts after the reply (once the trash is emptied): wait for it to reach its gate
    for (let i = 0; i < 200 && !reached.includes('full:spare'); i++) await new Promise((r) => setTimeout(r, 10));
    expect(reached).toContain('full:spare');
    expect(reached).not.toContain('full:work-copies');
    expect(await recoverView(snaps, 23, 0)).toEqual(await guestView(src.base1));
    await d.close();
    // close was answered, yet the disk stays locked: another session cannot open it
    const other = await session(snaps, { lockTimeoutSec: 1 });
    expect(errorCodeOf(await other.conn.openDisk(23, 0).catch((e) => e))).toBe('E_LOCK_TIMEOUT');
    expect(await fsp.readdir(work).catch(() => [])).not.toContain('copy.b');
    // a request after close waits for the spare, so the session's requests stay in order (bye does not:
    // the next test)
    let statusDone = false;
    const status = s.conn.status(23).then((ms) => ((statusDone = true), ms));
    await new Promise((r) => setTimeout(r, 200));
    expect(statusDone).toBe(false);
    openGate();
    expect((await status).map((x) => x.checkpoint)).toEqual(['s1']);
    expect(await endSession(s)).toBe(0);
    expect(reached).toContain('full:work-copies');
    expect((await fsp.readdir(work)).sort()).toEqual(['copy.a', 'copy.b', 'disk.0.snap', 'state.json']);
    const [a, b1] = await Promise.all([fsp.stat(path.join(work, 'copy.a')), fsp.stat(path.join(snaps, '23', 'disk.0.snap', 'base.1'))]);
    expect(a.ino).toBe(b1.ino);
    expect(await sha(path.join(work, 'copy.b'))).toBe(await sha(path.join(snaps, '23', 'disk.0.snap', 'base.1')));
    // the lock went with the spare
    await (await other.conn.openDisk(23, 0)).close();
    await endSession(other);
  });

  it('bye after close is answered before the spare copy; the session then finishes the spare and releases the lock', async () => {
    const { snaps, s, d, openGate } = await seedHeldAtSpare('spare-bye', 25, 'b1');
    await d.close();
    let sessionDone = false;
    void s.done.then(() => (sessionDone = true));
    // answered while the spare waits at its gate
    expect(await s.conn.bye()).toBe(true);
    await new Promise((r) => setTimeout(r, 100));
    expect(sessionDone).toBe(false);
    const work = path.join(snaps, '.onestor', 'work', '25', 'disk.0');
    expect(await fsp.readdir(work).catch(() => [])).not.toContain('copy.b');
    // the agent has hung up (its end of the channel is gone): the spare is still made, with a clean exit
    s.conn.destroy();
    openGate();
    expect(await s.done).toBe(0);
    expect((await fsp.readdir(work)).sort()).toEqual(['copy.a', 'copy.b', 'disk.0.snap', 'state.json']);
    expect(await sha(path.join(work, 'copy.b'))).toBe(await sha(path.join(snaps, '25', 'disk.0.snap', 'base.1')));
    const next = await session(snaps, { lockTimeoutSec: 1 });
    await (await next.conn.openDisk(25, 0)).close();
    await endSession(next);
  });

  it('a session whose agent hangs up during the spare copy still finishes it; an incremental right after merges into it', async () => {
    const { snaps, src, s, openGate } = await seedHeldAtSpare('spare-eof', 24, 'e1');
    // the agent goes away without close or bye (its end of the channel ends)
    s.conn.destroy();
    await new Promise((r) => setTimeout(r, 100));
    openGate();
    await s.done; // an unexplained hang-up ends the session as failed; what matters is what it left
    const work = path.join(snaps, '.onestor', 'work', '24', 'disk.0');
    expect((await fsp.readdir(work)).sort()).toEqual(['copy.a', 'copy.b', 'disk.0.snap', 'state.json']);
    const inc = await makeInc('inc-spare-eof', ['write -P 0x71 3M 128k'], src.base1);
    const s2 = await session(snaps);
    const d2 = await s2.conn.openDisk(24, 0);
    await d2.upload('inc', inc, { key: 'ei2' });
    const m2 = await d2.publishIncremental({ parentCheckpoint: 'e1', checkpoint: 'e2', capturedAt: 2, consistency: 'crash-consistent', sourceHost: 'hv1', inc: 'ei2' });
    await d2.close();
    await endSession(s2);
    expect(m2.checkpoint).toBe('e2');
    expect(await recoverView(snaps, 24, 0)).toEqual(await guestView(src.base1));
  });
});

describe('receiver: incremental merge (A/B copies)', () => {
  async function publishInc(snaps: string, vm: number, inc: string, parent: string, ck: string, extra: Partial<ReceiverOptions> = {}) {
    const s = await session(snaps, extra);
    try {
      const d = await s.conn.openDisk(vm, 0);
      await d.upload('inc', inc, { key: `inc-${ck}` });
      const m = await d.publishIncremental({ parentCheckpoint: parent, checkpoint: ck, capturedAt: 1700000500, consistency: 'crash-consistent', sourceHost: 'hv1', inc: `inc-${ck}` });
      await d.close();
      return m;
    } finally {
      await endSession(s);
    }
  }

  it('merges increments (data and zeroed clusters) so the guest view follows the source, at O(changed)', async () => {
    const snaps = path.join(root, 'snaps-inc');
    const src = await makeSourceDisk('src-inc', 0);
    await seed(snaps, 20, 0, src, 'c1');
    const work = path.join(snaps, '.onestor', 'work', '20', 'disk.0');
    expect((await fsp.readdir(work)).sort()).toEqual(['copy.a', 'copy.b', 'disk.0.snap', 'state.json']);

    const inc2 = await makeInc('inc2', ['write -P 0x55 2M 128k', 'write -z 1M 64k'], src.base1);
    const m2 = await publishInc(snaps, 20, inc2, 'c1', 'c2');
    expect(m2.checkpoint).toBe('c2');
    expect(m2.mode).toBe('incremental');
    expect(await recoverView(snaps, 20, 0)).toEqual(await guestView(src.base1));

    const inc3 = await makeInc('inc3', ['write -P 0x66 6M 64k', 'write -P 0x67 2M 64k'], src.base1);
    await publishInc(snaps, 20, inc3, 'c2', 'c3');
    expect(await recoverView(snaps, 20, 0)).toEqual(await guestView(src.base1));
    const inc4 = await makeInc('inc4', ['write -z 2M 64k', 'write -P 0x68 7M 1M'], src.base1);
    await publishInc(snaps, 20, inc4, 'c3', 'c4');
    expect(await recoverView(snaps, 20, 0)).toEqual(await guestView(src.base1));

    // The published base.1 is one of the two copies; the spare is the other; only the last inc is kept.
    const b1 = await fsp.stat(path.join(snaps, '20', 'disk.0.snap', 'base.1'));
    const [a, b] = await Promise.all([fsp.stat(path.join(work, 'copy.a')), fsp.stat(path.join(work, 'copy.b'))]);
    expect([a.ino, b.ino]).toContain(b1.ino);
    expect(a.ino).not.toBe(b.ino);
    expect((await fsp.readdir(work)).filter((n) => n.startsWith('inc.'))).toHaveLength(1);
    expect((await fsp.readdir(path.join(snaps, '20', 'disk.0.snap'))).sort()).toEqual(['base', 'base.1', 'disk.0.snap']);

    // E_PARENT: an increment on a checkpoint the replica does not hold changes nothing.
    const before = await treeSnapshot(path.join(snaps, '20'));
    const stray = await makeInc('stray', ['write -P 0x99 0 64k']);
    expect(errorCodeOf(await publishInc(snaps, 20, stray, 'c2', 'c9').catch((e) => e))).toBe('E_PARENT');
    expect(await treeSnapshot(path.join(snaps, '20'))).toEqual(before);
  });

  const steps = ['inc:spare-ready', 'inc:journal', 'inc:applied:inc.1', 'inc:checked', 'inc:published', 'inc:manifest', 'inc:done'];
  for (const crashAt of steps) {
    it(`crash at ${crashAt}: replica stays on a complete snapshot and the next open redoes or drops the merge`, async () => {
      const snaps = path.join(root, `snaps-crash-${crashAt.replace(/[^a-z0-9]/g, '-')}`);
      const src = await makeSourceDisk(`src-crash-${crashAt.replace(/[^a-z0-9]/g, '-')}`, 0);
      await seed(snaps, 30, 0, src, 'c1');
      const viewC1 = await guestView(src.base1);
      const inc2 = await makeInc(`crash-inc2-${steps.indexOf(crashAt)}`, ['write -P 0x71 3M 192k', 'write -z 1M 64k'], src.base1);
      const viewC2 = await guestView(src.base1);
      const crash = new Error(`simulated crash at ${crashAt}`);
      const err = await publishInc(snaps, 30, inc2, 'c1', 'c2', {
        onStep: (s) => {
          if (s === crashAt) throw crash;
        },
      }).catch((e) => e);
      expect(err).toBeInstanceOf(Error);
      // Right after the crash: the published pair is c1 or c2, complete either way.
      const now = await recoverView(snaps, 30, 0);
      expect([viewC1, viewC2]).toContain(now);
      expect(viewC1).not.toBe(viewC2);
      // Next session: open redoes the journal when it was written, else the replica is still on c1.
      const s = await session(snaps);
      const d = await s.conn.openDisk(30, 0);
      const journalWritten = steps.indexOf(crashAt) >= steps.indexOf('inc:journal');
      expect(d.manifest?.checkpoint).toBe(journalWritten ? 'c2' : 'c1');
      await d.close();
      await endSession(s);
      expect(await recoverView(snaps, 30, 0)).toEqual(journalWritten ? viewC2 : viewC1);
      // And the lineage goes on from there.
      const parent = journalWritten ? 'c2' : 'c1';
      if (!journalWritten) await publishInc(snaps, 30, inc2, 'c1', 'c2');
      const inc3 = await makeInc(`crash-inc3-${steps.indexOf(crashAt)}`, ['write -P 0x72 3M 64k'], src.base1);
      await publishInc(snaps, 30, inc3, 'c2', 'c3');
      void parent;
      expect(await recoverView(snaps, 30, 0)).toEqual(await guestView(src.base1));
    });
  }

  it('rebuilds the spare when the work dir is lost, and drops work copies when upstream removed the VM', async () => {
    const snaps = path.join(root, 'snaps-rebuild');
    const src = await makeSourceDisk('src-rebuild', 0);
    await seed(snaps, 40, 0, src, 'c1');
    const work = path.join(snaps, '.onestor', 'work', '40', 'disk.0');
    await fsp.rm(work, { recursive: true });
    const inc2 = await makeInc('rebuild-inc2', ['write -P 0x5a 0 64k'], src.base1);
    await publishInc(snaps, 40, inc2, 'c1', 'c2');
    expect(await recoverView(snaps, 40, 0)).toEqual(await guestView(src.base1));
    await fsp.rm(path.join(snaps, '40'), { recursive: true });
    const s = await session(snaps);
    const d = await s.conn.openDisk(40, 0);
    expect(d.manifest).toBeNull();
    expect(d.baseOnReplica).toBeNull();
    await d.close();
    await endSession(s);
    await expect(fsp.lstat(work)).rejects.toThrow(/ENOENT/);
  });
});
