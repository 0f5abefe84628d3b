/**
 * Issue 10, findings 1, 2, 7, 8 on the real receiver (in-process streams), real qemu-img, real files:
 * the full publish's bridge in every base/base.1 situation with a failure at each of its steps, a spare that
 * something else links, leftovers and temp files, and symlinks planted at every bookkeeping path.
 */
import { createHash } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { errorCodeOf } from '../../lib/shared/errors.js';
import { run } from '../../lib/shared/exec.js';
import { writeFileAtomic } from '../../lib/replica/durable.js';
import { replicaPaths } from '../../lib/replica/layout.js';
import { FULL_STEPS, FULL_STEPS_AFTER_REPLY } from '../../lib/replica/publish.js';
import { MAX_OTHER_UPLOADS } from '../../lib/replica/uploads.js';
import { runReceiver, type ReceiverOptions } from '../../lib/replica/receiver.js';
import { ReceiverConnection } from '../../lib/transfer/replica-client.js';
import { recoverDrill } from '../../dev/recover.js';
import { uploadKeyFor } from '../../lib/replica/ownership.js';

let root: string;
beforeAll(async () => {
  root = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-t-safety-'));
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
async function view(image: string): Promise<string> {
  const out = path.join(root, `v-${Math.random().toString(36).slice(2)}.raw`);
  await q(['qemu-img', 'convert', '-O', 'raw', image, out]);
  try {
    return await sha(out);
  } finally {
    await fsp.rm(out);
  }
}
/** The recover drill's guest view; throws when base or base.1 is missing. */
async function recovered(snaps: string, vm: number): Promise<string> {
  const d = await recoverDrill(snaps, vm, 0, root);
  expect(d.check.ok).toBe(true);
  expect(d.backingName).toBe('disk.0.snap/base');
  const v = await sha(d.rawPath);
  await fsp.rm(d.dir, { recursive: true });
  return v;
}

let uniq = 0;
async function disk(sizeMiB: number, baseOps: string[], base1Ops: string[]): Promise<{ base: string; base1: string }> {
  const snap = path.join(root, `src-${uniq++}`, 'disk.0.snap');
  await fsp.mkdir(snap, { recursive: true });
  await fsp.symlink('.', path.join(snap, 'disk.0.snap'));
  const base = path.join(snap, 'base');
  const base1 = path.join(snap, 'base.1');
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', base, `${sizeMiB}M`]);
  for (const op of baseOps) await q(['qemu-io', '-f', 'qcow2', '-c', op, base]);
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'disk.0.snap/base', '-F', 'qcow2', base1]);
  for (const op of base1Ops) await q(['qemu-io', '-f', 'qcow2', '-c', op, base1]);
  return { base, base1 };
}

function opts(snaps: string, extra: Partial<ReceiverOptions> = {}): ReceiverOptions {
  return { snapsDir: snaps, identity: 'hv-test', lockTimeoutSec: 2, maxSessions: 4, busyWaitSec: 0, maxUsedPercent: 100, spaceCheck: false, ...extra };
}

async function withSession<T>(snaps: string, fn: (c: ReceiverConnection) => Promise<T>, extra: Partial<ReceiverOptions> = {}): Promise<T> {
  const to = new PassThrough();
  const from = new PassThrough();
  const done = runReceiver(to, from, opts(snaps, extra)).finally(() => from.end());
  const conn = new ReceiverConnection(from, to);
  try {
    await conn.hello('hv1', 'test');
    const r = await fn(conn);
    await conn.bye();
    return r;
  } finally {
    conn.destroy();
    await done;
  }
}

async function publishFull(snaps: string, vm: number, src: { base?: string; base1: string }, ck: string, extra: Partial<ReceiverOptions> = {}) {
  return withSession(
    snaps,
    async (c) => {
      const d = await c.openDisk(vm, 0);
      if (src.base) await d.upload('base', src.base, { key: `${ck}.base` });
      await d.upload('base1', src.base1, { key: `${ck}.base1` });
      const m = await d.publishFull({ checkpoint: ck, capturedAt: 1, consistency: 'crash-consistent', sourceHost: 'hv1', base1: `${ck}.base1`, ...(src.base ? { base: `${ck}.base` } : {}) });
      await d.close();
      return m;
    },
    extra,
  );
}

async function publishInc(snaps: string, vm: number, inc: string, parent: string, ck: string, extra: Partial<ReceiverOptions> = {}) {
  return withSession(
    snaps,
    async (c) => {
      const d = await c.openDisk(vm, 0);
      await d.upload('inc', inc, { key: `${ck}.inc` });
      const m = await d.publishIncremental({ parentCheckpoint: parent, checkpoint: ck, capturedAt: 2, consistency: 'crash-consistent', sourceHost: 'hv1', inc: `${ck}.inc` });
      await d.close();
      return m;
    },
    extra,
  );
}

async function makeInc(ops: string[], alsoApplyTo: string, sizeMiB = 8): Promise<string> {
  const inc = path.join(root, `inc-${uniq++}.qcow2`);
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', inc, `${sizeMiB}M`]);
  for (const op of ops) {
    await q(['qemu-io', '-f', 'qcow2', '-c', op, inc]);
    await q(['qemu-io', '-f', 'qcow2', '-c', op, alsoApplyTo]);
  }
  await q(['qemu-img', 'rebase', '-u', '-f', 'qcow2', '-b', '/nonexistent/target', '-F', 'qcow2', inc]);
  return inc;
}

describe('full publish with a new base: the bridge', () => {
  // old situation on the replica -> the new full; every step of the publish fails in turn
  // Without an old pair only the renames' order matters: those cases fail from the journal on.
  const renames = FULL_STEPS.slice(FULL_STEPS.indexOf('full:journal'), FULL_STEPS.indexOf('full:uploads-dropped'));
  const cases: Array<{ name: string; seedBase: boolean; seedBase1: boolean; oldMiB: number; newMiB: number; steps: readonly string[] }> = [
    { name: 'new base smaller than the old one', seedBase: true, seedBase1: true, oldMiB: 12, newMiB: 8, steps: FULL_STEPS },
    { name: 'no old base.1 (base alone was left)', seedBase: true, seedBase1: false, oldMiB: 8, newMiB: 8, steps: renames },
    { name: 'no old base (base.1 alone was left)', seedBase: false, seedBase1: true, oldMiB: 8, newMiB: 8, steps: renames },
  ];
  for (const cs of cases) {
    it(`${cs.name}: previous or new at a failure in every step, then the next session completes`, async () => {
      const prev = await disk(cs.oldMiB, ['write -P 0x11 0 6M'], ['write -P 0x22 1M 1M']);
      const next = await disk(cs.newMiB, ['write -P 0x11 0 3M', 'write -P 0x55 4M 1M'], ['write -P 0x66 2M 64k']);
      const prevView = await view(prev.base1);
      const newView = await view(next.base1);
      const seen = new Set<string>();
      for (const [i, stepName] of cs.steps.entries()) {
        const snaps = path.join(root, `bridge-${uniq++}`);
        await publishFull(snaps, 7, prev, 'ck1');
        const snapDir = path.join(snaps, '7', 'disk.0.snap');
        if (!cs.seedBase) await fsp.rm(path.join(snapDir, 'base'));
        if (!cs.seedBase1) await fsp.rm(path.join(snapDir, 'base.1'));
        const err = await publishFull(snaps, 7, next, 'ck2', {
          onStep: (s) => {
            seen.add(s);
            if (s === stepName) throw new Error(`failure injected at ${s}`);
          },
        }).catch((e: Error) => e);
        const reached = seen.has(stepName);
        // after the publish reply, a failed A/B preparation is not an error (the next merge rebuilds the spare)
        if (reached && !FULL_STEPS_AFTER_REPLY.includes(stepName)) expect(String(err)).toMatch(/failure injected/);
        if (FULL_STEPS_AFTER_REPLY.includes(stepName)) expect(err).not.toBeInstanceOf(Error);
        // previous (when it was complete) or new: never a new base.1 on the old base, never the reverse
        if (cs.seedBase && cs.seedBase1) expect([prevView, newView]).toContain(await recovered(snaps, 7));
        else {
          const complete = await Promise.all(['base', 'base.1'].map((f) => fsp.lstat(path.join(snapDir, f)).then((s) => s.isFile(), () => false)));
          if (complete.every(Boolean)) expect(await recovered(snaps, 7)).toBe(newView);
        }
        // the next session finishes (journal) or the client retries; then the new snapshot, no leftovers
        const m = await withSession(snaps, async (c) => {
          const d = await c.openDisk(7, 0);
          await d.close();
          return d.manifest;
        });
        if (m?.checkpoint !== 'ck2') await publishFull(snaps, 7, next, 'ck2');
        expect(await recovered(snaps, 7)).toBe(newView);
        expect((await fsp.readdir(snapDir)).sort()).toEqual(['base', 'base.1', 'disk.0.snap']);
        expect(await fsp.readdir(path.join(snaps, '.onestor', 'tmp', '7-0')).catch(() => [])).toEqual([]);
        if (i === 0) expect(seen.size).toBeGreaterThan(0);
        await fsp.rm(snaps, { recursive: true });
      }
      expect(seen.has('full:bridge-published')).toBe(cs.seedBase && cs.seedBase1);
      // the order that keeps a new base.1 off the old base (and the reverse) when there is no bridge
      if (!cs.seedBase1) expect(seen.has('full:base-published')).toBe(true);
    });
  }

  it('the bridge holds only where the bases differ, and reads the new view over both bases', async () => {
    const prev = await disk(8, ['write -P 0x11 0 8M'], ['write -P 0x22 1M 1M']);
    const next = await disk(8, ['write -P 0x11 0 8M', 'write -P 0x77 4M 512k'], ['write -P 0x66 2M 64k']);
    const snaps = path.join(root, `bridge-bytes-${uniq++}`);
    await publishFull(snaps, 8, prev, 'ck1');
    let bridgeMap = '';
    let bridgeView = '';
    await publishFull(snaps, 8, next, 'ck2', {
      onStep: async (s) => {
        if (s !== 'full:bridge-published') return;
        const b1 = path.join(snaps, '8', 'disk.0.snap', 'base.1');
        bridgeMap = await q(['qemu-img', 'map', '--output=json', '-f', 'qcow2', b1]);
        bridgeView = await recovered(snaps, 8); // bridge over the OLD base
      },
    });
    expect(bridgeView).toBe(await view(next.base1));
    const data = (JSON.parse(bridgeMap) as Array<{ start: number; length: number; depth: number; data: boolean }>).filter((e) => e.depth === 0 && e.data);
    const bytes = data.reduce((a, e) => a + e.length, 0);
    // 64 KiB written in the new base.1 + the 512 KiB where the bases differ
    expect(bytes).toBe(64 * 1024 + 512 * 1024);
    expect(await recovered(snaps, 8)).toBe(await view(next.base1));
  });
});

describe('a spare that something else links is never written', () => {
  it('a hard link to a published base.1 (cp -al backup) keeps its bytes through later merges; merges use a fresh copy', async () => {
    const src = await disk(8, ['write -P 0x11 0 4M'], ['write -P 0x22 1M 1M']);
    const snaps = path.join(root, `spare-${uniq++}`);
    await publishFull(snaps, 9, src, 'c1');
    const b1 = path.join(snaps, '9', 'disk.0.snap', 'base.1');
    const backup = path.join(root, `backup-${uniq++}`);
    await fsp.link(b1, backup); // what `cp -al` / `rsync --link-dest` does
    const ino = (await fsp.stat(backup)).ino;
    const hash = await sha(backup);
    const work = path.join(snaps, '.onestor', 'work', '9', 'disk.0');
    let parent = 'c1';
    for (let i = 2; i <= 5; i++) {
      const inc = await makeInc([`write -P 0x${(0x40 + i).toString(16)} ${i}M 128k`], src.base1);
      await publishInc(snaps, 9, inc, parent, `c${i}`);
      parent = `c${i}`;
      expect(await recovered(snaps, 9)).toBe(await view(src.base1));
      // the published inode: never touched, still linked by the backup
      expect((await fsp.stat(backup)).ino).toBe(ino);
      expect(await sha(backup)).toBe(hash);
      const copies = await Promise.all(['copy.a', 'copy.b'].map((n) => fsp.stat(path.join(work, n))));
      expect(copies.map((c) => c.ino)).toContain((await fsp.stat(b1)).ino);
      // from the first merge that would have written into it, the backup's inode has left the work dir
      if (i >= 3) expect(copies.map((c) => c.ino)).not.toContain(ino);
      expect((await fsp.stat(backup)).nlink).toBe(i >= 3 ? 1 : 2);
    }
    // Without a foreign link the spare is reused in place: no copy per merge.
    const spareBefore = await Promise.all(['copy.a', 'copy.b'].map(async (n) => (await fsp.stat(path.join(work, n))).ino));
    for (let i = 6; i <= 7; i++) {
      const inc = await makeInc([`write -P 0x${(0x40 + i).toString(16)} ${i - 4}M 64k`], src.base1);
      await publishInc(snaps, 9, inc, parent, `c${i}`);
      parent = `c${i}`;
    }
    const spareAfter = await Promise.all(['copy.a', 'copy.b'].map(async (n) => (await fsp.stat(path.join(work, n))).ino));
    expect(spareAfter.sort()).toEqual(spareBefore.sort());
    expect(await recovered(snaps, 9)).toBe(await view(src.base1));
  });
});

describe('a merge interrupted right after starting its fresh spare', () => {
  it('is finished by the next open; the linked inode stays untouched', async () => {
    const src = await disk(8, ['write -P 0x11 0 4M'], ['write -P 0x22 1M 1M']);
    const snaps = path.join(root, `spare-crash-${uniq++}`);
    await publishFull(snaps, 10, src, 'c1');
    const backup = path.join(root, `backup-${uniq++}`);
    await fsp.link(path.join(snaps, '10', 'disk.0.snap', 'base.1'), backup);
    const hash = await sha(backup);
    await publishInc(snaps, 10, await makeInc(['write -P 0x51 2M 128k'], src.base1), 'c1', 'c2');
    const inc3 = await makeInc(['write -P 0x52 5M 128k'], src.base1);
    const steps: string[] = [];
    const err = await publishInc(snaps, 10, inc3, 'c2', 'c3', {
      onStep: (s) => {
        steps.push(s);
        if (s === 'inc:fresh-spare') throw new Error('crash after the fresh spare');
      },
    }).catch((e: Error) => e);
    expect(String(err)).toMatch(/crash after the fresh spare/);
    expect(steps).toContain('inc:fresh-spare');
    const m = await withSession(snaps, async (c) => {
      const d = await c.openDisk(10, 0);
      await d.close();
      return d.manifest;
    });
    expect(m?.checkpoint).toBe('c3');
    expect(await recovered(snaps, 10)).toBe(await view(src.base1));
    expect(await sha(backup)).toBe(hash);
  });
});

describe('temp files and leftovers', () => {
  it('writeFileAtomic removes its temp when the write fails (ENOSPC on a full filesystem)', async () => {
    const snaps = path.join(root, `enospc-${uniq++}`);
    await fsp.mkdir(snaps);
    const m = await run('mount', ['-t', 'tmpfs', '-o', 'size=256k,mode=0755', 'onestor-test-atomic', snaps]);
    if (m.code !== 0) throw new Error(`mount: ${m.stderr}`);
    try {
      const p = replicaPaths(snaps, 3, 0);
      await fsp.mkdir(path.join(snaps, '3', '.onestor'), { recursive: true });
      await writeFileAtomic(p, p.manifest, '{"small":1}\n');
      await fsp.writeFile(path.join(snaps, 'filler'), Buffer.alloc(200 * 1024));
      const err = await writeFileAtomic(p, p.manifest, 'x'.repeat(200 * 1024)).catch((e) => e);
      expect((err as NodeJS.ErrnoException).code).toBe('ENOSPC');
      expect(await fsp.readdir(p.tmpDir)).toEqual([]);
      expect(await fsp.readFile(p.manifest, 'utf8')).toBe('{"small":1}\n');
    } finally {
      await run('umount', [snaps]);
    }
  });

  it("a dead session's leftovers are reclaimed at the next open; partial uploads are bounded", async () => {
    const src = await disk(8, ['write -P 0x11 0 4M'], ['write -P 0x22 1M 1M']);
    const snaps = path.join(root, `leftovers-${uniq++}`);
    await publishFull(snaps, 4, src, 'c1');
    const p = replicaPaths(snaps, 4, 0);
    const old = new Date(Date.now() - 3 * 24 * 3600_000);
    // what a crash leaves: a manifest temp, a staged merge link, a full-size old base.1, a half bridge, a partial spare copy
    // (the clean session above removed its empty tmp dir; a crashed one leaves it, with these in it)
    await fsp.mkdir(p.tmpDir, { recursive: true });
    for (const n of ['json.0a1b2c', 'pub.3d4e5f', 'old-base1.6a7b8c']) await fsp.writeFile(path.join(p.tmpDir, n), Buffer.alloc(64 * 1024, 1));
    await fsp.mkdir(path.join(p.tmpDir, 'stray-dir'));
    for (const n of ['full.bridge.partial', 'copy.b.partial', 'full.base1']) await fsp.writeFile(path.join(p.workDir, n), Buffer.alloc(64 * 1024, 2));
    // uploads: one abandoned days ago, five recent ones of abandoned captures
    await fsp.writeFile(path.join(p.tmpDir, 'up.ancient.base1'), 'a');
    await fsp.utimes(path.join(p.tmpDir, 'up.ancient.base1'), old, old);
    for (let i = 0; i < 5; i++) {
      await fsp.writeFile(path.join(p.tmpDir, `up.cap${i}.inc`), 'b');
      const t = new Date(Date.now() - (10 - i) * 1000);
      await fsp.utimes(path.join(p.tmpDir, `up.cap${i}.inc`), t, t);
    }
    await withSession(snaps, async (c) => {
      const d = await c.openDisk(4, 0);
      expect(d.manifest?.checkpoint).toBe('c1');
      await d.close();
    });
    // only the newest partial uploads survive an open (one to resume + MAX_OTHER_UPLOADS)
    expect((await fsp.readdir(p.tmpDir)).sort()).toEqual(['up.cap2.inc', 'up.cap3.inc', 'up.cap4.inc']);
    expect((await fsp.readdir(p.workDir)).sort()).toEqual(['copy.a', 'copy.b', 'disk.0.snap', 'state.json']);
    // a put of a new key keeps at most MAX_OTHER_UPLOADS others beside it
    await withSession(snaps, async (c) => {
      const d = await c.openDisk(4, 0);
      await d.upload('base1', src.base1, { key: 'cap9.base1' });
      await d.close();
    });
    const ups = (await fsp.readdir(p.tmpDir)).filter((n) => n.startsWith('up.'));
    expect(ups).toContain(`up.${uploadKeyFor('hv-test', 'cap9.base1')}`); // upload temps are per writer
    expect(ups.length).toBe(MAX_OTHER_UPLOADS + 1);
    expect(await recovered(snaps, 4)).toBe(await view(src.base1));
  });
});

/** Every path under dir with inode, type, size and content digest. */
async function tree(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const walk = async (d: string) => {
    for (const e of await fsp.readdir(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      const st = await fsp.lstat(p);
      if (e.isSymbolicLink()) out[p] = `L ${st.ino} ${await fsp.readlink(p)}`;
      else if (e.isDirectory()) {
        out[p] = `D ${st.ino} ${st.mode}`;
        await walk(p);
      } else out[p] = `F ${st.ino} ${st.size} ${st.mtimeMs} ${st.mode} ${await sha(p)}`;
    }
  };
  await walk(dir);
  return out;
}

describe('symlinks planted at bookkeeping paths', () => {
  const VMID = 12;
  const planted: Array<{ rel: string; kind: 'dir' | 'file' }> = [
    { rel: '.onestor', kind: 'dir' },
    { rel: '.onestor/tmp', kind: 'dir' },
    { rel: `.onestor/tmp/${VMID}-0`, kind: 'dir' },
    { rel: '.onestor/work', kind: 'dir' },
    { rel: `.onestor/work/${VMID}`, kind: 'dir' },
    { rel: `.onestor/work/${VMID}/disk.0`, kind: 'dir' },
    { rel: '.onestor/locks', kind: 'dir' },
    { rel: `.onestor/locks/${VMID}-0.lock`, kind: 'file' },
    { rel: '.onestor/slots', kind: 'dir' },
    { rel: '.onestor/slots/slot.0', kind: 'file' },
  ];
  for (const pl of planted) {
    it(`a symlink at ${pl.rel} is refused with E_PATH naming it; nothing outside SNAPS changes`, async () => {
      const src = await disk(8, ['write -P 0x11 0 4M'], ['write -P 0x22 1M 1M']);
      const snaps = path.join(root, `sym-${uniq++}`);
      await publishFull(snaps, VMID, src, 'c1');
      // a journal waiting for redo: it must not run through the planted link either
      const canary = path.join(root, `canary-${uniq++}`);
      await fsp.mkdir(path.join(canary, 'sub'), { recursive: true });
      await fsp.writeFile(path.join(canary, 'sub', 'precious'), 'keep me');
      await fsp.writeFile(path.join(canary, 'file'), 'keep me too');
      const target = path.join(snaps, pl.rel);
      await fsp.rm(target, { recursive: true, force: true });
      await fsp.mkdir(path.dirname(target), { recursive: true });
      await fsp.symlink(pl.kind === 'dir' ? canary : path.join(canary, 'file'), target);
      const before = await tree(canary);
      const replicaBefore = await tree(path.join(snaps, String(VMID)));
      const err = await withSession(snaps, async (c) => {
        const d = await c.openDisk(VMID, 0);
        await d.upload('base1', src.base1, { key: 'c2.base1' });
        await d.publishFull({ checkpoint: 'c2', capturedAt: 2, consistency: 'crash-consistent', sourceHost: 'hv1', base1: 'c2.base1' });
        await d.close();
      }).catch((e) => e);
      expect(errorCodeOf(err)).toBe('E_PATH');
      expect(String((err as Error).message)).toContain(target);
      expect(await tree(canary)).toEqual(before);
      // the published snapshot is untouched as well
      expect(await tree(path.join(snaps, String(VMID)))).toEqual(replicaBefore);
      expect(await recovered(snaps, VMID)).toBe(await view(src.base1));
    });
  }

  it('a journal is never redone through a symlink in SNAPS/VMID (layout check first)', async () => {
    const src = await disk(8, ['write -P 0x11 0 4M'], ['write -P 0x22 1M 1M']);
    const snaps = path.join(root, `sym-journal-${uniq++}`);
    await publishFull(snaps, 13, src, 'c1');
    const next = await disk(8, ['write -P 0x11 0 4M'], ['write -P 0x23 2M 1M']);
    // a full publish dies right after its journal
    await publishFull(snaps, 13, { base1: next.base1 }, 'c2', { onStep: (s) => { if (s === 'full:journal') throw new Error('crash'); } }).catch(() => {});
    const canary = path.join(root, `canary-j-${uniq++}`);
    await fsp.mkdir(canary);
    await fsp.writeFile(path.join(canary, 'base.1'), 'victim');
    const b1 = path.join(snaps, '13', 'disk.0.snap', 'base.1');
    await fsp.rm(b1);
    await fsp.symlink(path.join(canary, 'base.1'), b1);
    const before = await tree(canary);
    const err = await withSession(snaps, (c) => c.openDisk(13, 0)).catch((e) => e);
    expect(errorCodeOf(err)).toBe('E_PATH');
    expect(String((err as Error).message)).toContain(b1);
    expect(await tree(canary)).toEqual(before);
    expect(await fsp.readlink(b1)).toBe(path.join(canary, 'base.1'));
  });
});
