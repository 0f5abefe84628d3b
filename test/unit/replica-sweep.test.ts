/**
 * Orphan sweep on a real SNAPS tree (real files, hard links, locks): live disks are never touched nor
 * charged to the budget, everything orphaned goes in one sweep, a busy disk is skipped.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { access, link, lstat, mkdir, mkdtemp, readdir, rm, symlink, utimes, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { emptyTrash, replicaPaths, type ReplicaPaths } from '../../lib/replica/layout.js';
import { maybeSweep, sweepOrphans } from '../../lib/replica/sweep.js';
import { acquireFileLock } from '../../lib/shared/file-lock.js';
import { clientSession } from '../helpers/receiver-session.js';

const dirs: string[] = [];
afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});
const exists = (p: string) => access(p).then(() => true, () => false);
const HOUR = 3600_000;

async function newSnaps(): Promise<string> {
  const snaps = await mkdtemp(path.join(os.tmpdir(), 'onestor-sweep-'));
  dirs.push(snaps);
  await mkdir(path.join(snaps, '.onestor', 'locks'), { recursive: true });
  return snaps;
}

async function old(file: string, ageMs: number): Promise<void> {
  const t = (Date.now() - ageMs) / 1000;
  await utimes(file, t, t);
}

/** A published disk: base, base.1, and the A/B work dir (copy.a = hard link to base.1, copy.b = spare). */
async function published(snaps: string, vm: number, disk: number): Promise<ReplicaPaths> {
  const p = replicaPaths(snaps, vm, disk);
  await mkdir(p.snapDir, { recursive: true });
  await writeFile(p.base, 'base');
  await writeFile(p.base1, Buffer.alloc(64 * 1024, 1));
  await mkdir(p.workDir, { recursive: true });
  await link(p.base1, path.join(p.workDir, 'copy.a'));
  await writeFile(path.join(p.workDir, 'copy.b'), Buffer.alloc(64 * 1024, 2));
  await writeFile(path.join(p.workDir, 'state.json'), '{}');
  return p;
}

/** What upstream's `rm -rf SNAPS/VMID` leaves of a published disk: our work dir, a link to the deleted base.1. */
async function terminated(snaps: string, vm: number, disks = 1): Promise<ReplicaPaths[]> {
  const ps: ReplicaPaths[] = [];
  for (let d = 0; d < disks; d++) ps.push(await published(snaps, vm, d));
  await rm(ps[0]!.vmDir, { recursive: true });
  for (const p of ps) {
    await mkdir(p.tmpDir, { recursive: true });
    await writeFile(path.join(p.tmpDir, 'json.abc'), '{');
    await writeFile(path.join(p.tmpDir, 'up.base1-ck9'), 'partial'); // fresh, but its lineage is gone
    await writeFile(p.lockFile, '');
  }
  return ps;
}

describe('sweepOrphans', () => {
  it('with 24 live VMs listed first, reclaims every orphan in one sweep and leaves live disks alone', async () => {
    const snaps = await newSnaps();
    const live: ReplicaPaths[] = [];
    for (let vm = 1; vm <= 24; vm++) live.push(await published(snaps, vm, 0));
    // a live disk with a partial upload of the current cycle: kept for a resume
    const resumable = live[0]!;
    await mkdir(resumable.tmpDir, { recursive: true });
    await writeFile(path.join(resumable.tmpDir, 'up.inc-ck2'), 'half');
    const dead = [...(await terminated(snaps, 900, 2)), ...(await terminated(snaps, 901)), ...(await terminated(snaps, 902))];
    expect((await lstat(path.join(dead[0]!.workDir, 'copy.a'))).nlink).toBe(1); // the base.1 upstream "deleted"

    // a live VM whose session died mid-publish: temps and a day-old partial upload, nobody will come back
    const crashed = await published(snaps, 30, 1);
    await mkdir(crashed.tmpDir, { recursive: true });
    for (const n of ['json.1a2b', 'pub.3c4d', 'old-base1.5e6f']) await writeFile(path.join(crashed.tmpDir, n), 'x');
    await writeFile(path.join(crashed.tmpDir, 'up.base1-ck1'), 'stale');
    await old(path.join(crashed.tmpDir, 'up.base1-ck1'), 25 * HOUR);
    await writeFile(crashed.lockFile, '');
    // disk 2 of VM 30 was detached: upstream removed SNAPS/30, the next publish of disk 1 recreated it
    const detached = replicaPaths(snaps, 30, 2);
    await mkdir(detached.workDir, { recursive: true });
    await writeFile(path.join(detached.workDir, 'copy.b'), 'spare of a disk that is gone');
    // a disk whose full publish was interrupted (base renamed in, base.1 not yet): its journal and staged
    // files in the work dir are for the next open of the disk to finish, never the sweep's
    const midPublish = replicaPaths(snaps, 31, 0);
    await mkdir(midPublish.snapDir, { recursive: true });
    await writeFile(midPublish.base, 'new base');
    await mkdir(midPublish.workDir, { recursive: true });
    for (const n of ['full.json', 'full.base1']) await writeFile(path.join(midPublish.workDir, n), 'x');
    // a first seed cut an hour ago: no VM dir yet, may still resume
    const seeding = replicaPaths(snaps, 40, 0);
    await mkdir(seeding.tmpDir, { recursive: true });
    await writeFile(path.join(seeding.tmpDir, 'up.base-ck1'), 'seed');
    await old(path.join(seeding.tmpDir, 'up.base-ck1'), 0.5 * HOUR);
    // an orphan whose lock a session holds right now
    const [busy] = await terminated(snaps, 903);
    const held = await acquireFileLock(busy!.lockFile, { timeoutSec: 1 });
    // not ours: left alone
    await mkdir(path.join(snaps, '.onestor', 'work', '..x', 'disk.0'), { recursive: true });
    await mkdir(path.join(snaps, '.onestor', 'tmp', 'notadisk'), { recursive: true });

    let r;
    try {
      r = await sweepOrphans(snaps);
    } finally {
      await held.release();
    }
    for (const p of dead) {
      expect(await exists(p.workDir)).toBe(false);
      expect(await exists(p.tmpDir)).toBe(false);
      expect(await exists(p.lockFile)).toBe(false);
    }
    expect(await exists(path.join(snaps, '.onestor', 'work', '900'))).toBe(false);
    expect(await readdir(crashed.tmpDir).catch(() => 'gone')).toBe('gone');
    expect(await exists(crashed.lockFile)).toBe(false);
    expect(await exists(path.join(crashed.workDir, 'copy.b'))).toBe(true); // its spare serves its base.1
    expect(await exists(detached.workDir)).toBe(false);
    expect((await readdir(midPublish.workDir)).sort()).toEqual(['full.base1', 'full.json']);
    expect(await readdir(seeding.tmpDir)).toEqual(['up.base-ck1']);
    for (const p of live) {
      expect(await readdir(p.workDir)).toEqual(['copy.a', 'copy.b', 'state.json']);
      expect(await exists(p.base1)).toBe(true);
    }
    expect(await readdir(resumable.tmpDir)).toEqual(['up.inc-ck2']);
    expect(await exists(busy!.workDir)).toBe(true);
    expect(await exists(path.join(snaps, '.onestor', 'work', '..x', 'disk.0'))).toBe(true);
    expect(await exists(path.join(snaps, '.onestor', 'tmp', 'notadisk'))).toBe(true);
    // 4 dead disks + the crashed one + the detached one; the busy one waits; live disks cost nothing
    expect(r).toMatchObject({ cleaned: 6, busy: 1, deferred: 0 });
    expect(r.bytes).toBeGreaterThanOrEqual(4 * 2 * 64 * 1024); // each dead disk held copy.a (the only link left) + copy.b
    // the reclaimed work dirs (4 dead disks + the detached one) wait in the trash; the receiver empties it
    // when its session ends
    const trash = path.join(snaps, '.onestor', 'trash');
    const trashed = await readdir(trash);
    expect(trashed).toHaveLength(5);
    for (const t of trashed) expect(await readdir(path.join(trash, t))).toContain('copy.b');
    expect(await emptyTrash(snaps)).toBe(5);
    expect(await readdir(trash)).toEqual([]);

    // the busy one goes once its lock is free; a sweep of a clean replica finds nothing to do
    expect(await sweepOrphans(snaps)).toMatchObject({ cleaned: 1, busy: 0 });
    expect(await exists(busy!.workDir)).toBe(false);
    expect(await sweepOrphans(snaps)).toMatchObject({ candidates: 0, cleaned: 0 });
  });

  it('the budget counts disks cleaned, not disks looked at', async () => {
    const snaps = await newSnaps();
    for (let vm = 1; vm <= 20; vm++) await published(snaps, vm, 0);
    for (let vm = 500; vm < 510; vm++) await terminated(snaps, vm);
    expect(await sweepOrphans(snaps, { maxCleaned: 4 })).toMatchObject({ candidates: 10, cleaned: 4, deferred: 6 });
    expect(await sweepOrphans(snaps, { maxCleaned: 4 })).toMatchObject({ candidates: 6, cleaned: 4, deferred: 2 });
    expect(await sweepOrphans(snaps, { maxCleaned: 4 })).toMatchObject({ candidates: 2, cleaned: 2, deferred: 0 });
    expect(await readdir(path.join(snaps, '.onestor', 'work'))).toEqual(Array.from({ length: 20 }, (_, i) => String(i + 1)).sort());
  });

  it('thousands of tmp entries: every orphaned one reclaimed in one sweep, live uploads kept', async () => {
    const snaps = await newSnaps();
    const tmp = path.join(snaps, '.onestor', 'tmp');
    // 2000 live disks with a fresh partial upload (nothing to do), 400 dead ones with stale uploads and temps
    for (let vm = 1; vm <= 2000; vm++) {
      await mkdir(path.join(snaps, String(vm)));
      await mkdir(path.join(tmp, `${vm}-0`), { recursive: true });
      await writeFile(path.join(tmp, `${vm}-0`, 'up.k'), '');
    }
    for (let vm = 5000; vm < 5400; vm++) {
      const d = path.join(tmp, `${vm}-1`);
      await mkdir(d, { recursive: true });
      await writeFile(path.join(d, 'up.k'), 'x');
      await old(path.join(d, 'up.k'), 2 * HOUR);
      await writeFile(path.join(d, 'json.x'), '');
    }
    // one live disk with 3000 temps of crashed sessions
    const crowded = path.join(tmp, '7-5');
    await mkdir(crowded);
    for (let i = 0; i < 3000; i++) await writeFile(path.join(crowded, `json.${i.toString(16)}`), '');
    const r = await sweepOrphans(snaps);
    expect(r).toMatchObject({ candidates: 401, cleaned: 401, busy: 0 });
    const left = await readdir(tmp);
    expect(left.length).toBe(2000);
    expect(left.every((n) => /^\d+-0$/.test(n) && Number(n.split('-')[0]) <= 2000)).toBe(true);
  }, 120_000);
});

describe('sweepOrphans and planted symlinks', () => {
  it('a symlink planted as a disk\'s tmp dir or lock file is refused: that disk is skipped, nothing outside is touched', async () => {
    const snaps = await newSnaps();
    const outside = await mkdtemp(path.join(os.tmpdir(), 'onestor-sweep-outside-'));
    dirs.push(outside);
    await writeFile(path.join(outside, 'json.victim'), 'keep me');
    await writeFile(path.join(outside, 'victim.lock'), 'keep me too');
    await mkdir(path.join(snaps, '.onestor', 'tmp'), { recursive: true });
    await symlink(outside, path.join(snaps, '.onestor', 'tmp', '66-0'));
    await symlink(path.join(outside, 'victim.lock'), path.join(snaps, '.onestor', 'locks', '67-0.lock'));
    const [dead] = await terminated(snaps, 68);
    const r = await sweepOrphans(snaps);
    expect(r).toMatchObject({ cleaned: 1, failed: 2 });
    expect(await readdir(outside)).toEqual(['json.victim', 'victim.lock']);
    expect(await exists(dead!.workDir)).toBe(false);
  });
});

describe('maybeSweep and the receiver', () => {
  it('sweeps at most once per interval per replica, and after a hello reply (not before it)', async () => {
    const snaps = await newSnaps();
    await terminated(snaps, 77);
    expect(await maybeSweep(snaps, 60_000)).toMatchObject({ cleaned: 1 });
    await terminated(snaps, 78);
    expect(await maybeSweep(snaps, 60_000)).toBeNull(); // stamp is fresh
    // through a receiver session: a fresh stamp means the hello does no sweeping at all
    const s1 = await clientSession(snaps, { sweepIntervalSec: 600 });
    await s1.conn.bye();
    await s1.done;
    expect(await exists(replicaPaths(snaps, 78, 0).workDir)).toBe(true);
    // an expired interval: the session sweeps after answering hello, before it gives its slot back
    await old(path.join(snaps, '.onestor', 'sweep.stamp'), 700_000);
    const s2 = await clientSession(snaps, { sweepIntervalSec: 600 });
    await s2.conn.bye();
    expect(await s2.done).toBe(0);
    expect(await exists(replicaPaths(snaps, 78, 0).workDir)).toBe(false);
    // what the sweep moved to the trash was deleted before the session ended (77's as well, left by the
    // direct sweep above)
    expect(await readdir(path.join(snaps, '.onestor', 'trash'))).toEqual([]);
  });
});
