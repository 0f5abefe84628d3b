/** Full publish: a seed (or a re-seed) of base.1, with or without a new base. */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import { run } from '../shared/exec.js';
import { step, type PublishContext, type PublishMeta } from './publish-context.js';
import { STAGED, refOf, runFullJournal, writeFullJournal, type FileRef, type FullJournal } from './full-journal.js';
import { checkImage, qemu } from './image-check.js';
import {
  assertSameVmDir,
  ctx,
  ensureSymlink,
  ensureWorkDir,
  errno,
  expectedBackingName,
  lstatOrNull,
  fsyncPath,
  mapVanished,
  mkdirIn,
  removeWorkDir,
  trashWorkDir,
  emptyTrash,
  vmDirIdOf,
  type ReplicaPaths,
  type VmDirId,
} from './layout.js';
import type { StoredManifest } from './manifest.js';
import type { UploadedFile } from './uploads.js';
import { setupWorkCopies } from './merge.js';

export type { PublishContext, PublishMeta } from './publish-context.js';

/** Every step a full publish can stop at (test hooks; crash tests enumerate this list). */
export const FULL_STEPS = [
  'full:work-reset',
  'full:layout',
  'full:staged',
  'full:bridge-built',
  'full:journal',
  'full:bridge-published',
  'full:base-published',
  'full:base1-published',
  'full:uploads-dropped',
  'full:manifest',
  'full:done',
  'full:spare',
  'full:work-copies',
] as const;

/** Steps that run after the publish reply (the A/B spare): a failure there leaves the snapshot published. */
export const FULL_STEPS_AFTER_REPLY: readonly string[] = ['full:spare', 'full:work-copies'];

/**
 * Full publish. DESIGN §2 must hold between any two syscalls, and a dead host never comes back to finish,
 * so when base changes under an existing base.1 a bridge is published first: the new thin base.1 safely
 * rebased from the new base onto the OLD base, with the stored name disk.N.snap/base. It reads the new guest
 * view over either base (it holds the clusters where the two bases differ), so:
 *   bridge → base.1 (old base + bridge = new)   new base → base (new + bridge = new)   base.1 (new + new)
 * Everything is staged and the journal written before the first rename; the next session of the disk
 * finishes it after a crash (runFullJournal). The manifest comes last and is only trusted while the file
 * identities it names still match. Returns the new manifest and the (possibly new) VM dir identity.
 */
export async function publishFull(
  c: PublishContext,
  up: { base?: UploadedFile; base1: UploadedFile },
  meta: PublishMeta,
): Promise<{ manifest: StoredManifest; vmDirId: VmDirId }> {
  const p = c.paths;
  // qemu-img's checks began when each upload's bytes were verified (receiver onEnd)
  const info = await up.base1.verdict;
  if (up.base) await up.base.verdict;
  if (!info) throw new OnestorError(ErrorCodes.INTERNAL, 'base.1 upload checked as another kind', ctx(p, { file: up.base1.file }));

  // A stale journal must never republish an older lineage over this seed. Moved aside, not deleted here: the
  // old A/B copies are full-size files (the receiver empties the trash after its reply).
  await trashWorkDir(p);
  await step(c, 'full:work-reset');

  let vmDirId = c.vmDirId;
  let journaled = false;
  try {
    if (vmDirId === null) {
      try {
        await fsp.mkdir(p.vmDir);
      } catch (e) {
        if (errno(e) !== 'EEXIST') throw e;
      }
      const st = await fsp.lstat(p.vmDir);
      if (!st.isDirectory()) throw new OnestorError(ErrorCodes.PATH, 'refusing a VM dir that is not a directory', ctx(p, { file: p.vmDir }));
      vmDirId = vmDirIdOf(st);
    } else {
      await assertSameVmDir(p, vmDirId);
    }
    await mkdirIn(p, p.snapDir);
    await ensureSymlink(p, p.selfLink, '.');
    await ensureSymlink(p, p.diskLink, `${p.snapDirName}/base.1`);
    await fsyncPath(p.snapDir);
    await fsyncPath(p.vmDir);
    await step(c, 'full:layout');

    // Stage: hard links to the verified uploads (no copy; the uploads stay resumable until published).
    await ensureWorkDir(p);
    await fsp.symlink(p.snapDir, path.join(p.workDir, p.snapDirName));
    const staged = (name: string) => path.join(p.workDir, name);
    await fsp.link(up.base1.file, staged(STAGED.base1));
    if (up.base) await fsp.link(up.base.file, staged(STAGED.base));
    const [oldBase, oldBase1] = await Promise.all([lstatOrNull(p.base), lstatOrNull(p.base1)]);
    let order: FullJournal['order'];
    let keepBase: FileRef | null = null;
    if (!up.base) {
      const was = c.baseAtOpen?.identity;
      if (!oldBase?.isFile() || !was || oldBase.ino !== was.ino || oldBase.size !== was.size || oldBase.mtimeMs !== was.mtimeMs) {
        throw new OnestorError(ErrorCodes.PARENT, 'base on the replica is missing or changed since open; send base with the publish', ctx(p, { file: p.base }));
      }
      order = 'replace';
      keepBase = refOf(oldBase);
    } else if (oldBase?.isFile() && oldBase1?.isFile()) {
      order = 'bridge';
    } else {
      order = oldBase ? 'base-first' : 'base1-first';
    }
    await step(c, 'full:staged');

    let bridge: FileRef | null = null;
    if (order === 'bridge') {
      // the bridge is a copy of base.1: the old A/B copies give their room back first, as before the trash
      await emptyTrash(p.snapsDir);
      bridge = await buildBridge(p, c.qemuImg);
      await step(c, 'full:bridge-built');
    }
    await fsyncPath(p.workDir);

    const [nb, nb1] = await Promise.all([up.base ? fsp.lstat(staged(STAGED.base)) : null, fsp.lstat(staged(STAGED.base1))]);
    const baseSha = up.base ? up.base.sha256 : c.baseAtOpen!.sha256;
    // the receiver takes base only with sha256 (onPut): the manifest compares bases by it
    if (baseSha === undefined) throw new OnestorError(ErrorCodes.INTERNAL, 'base upload without its sha256', ctx(p, { file: p.base }));
    const manifest: FullJournal['manifest'] = {
      version: 1,
      vmId: p.vm,
      diskId: p.disk,
      checkpoint: meta.checkpoint,
      capturedAt: meta.capturedAt,
      publishedAt: Math.floor(Date.now() / 1000),
      consistency: meta.consistency,
      mode: 'full',
      base: { size: nb ? nb.size : keepBase!.size, sha256: baseSha },
      base1: { size: nb1.size, ...(up.base1.sha256 ? { sha256: up.base1.sha256 } : {}), ...(info['virtual-size'] !== undefined ? { virtualSize: info['virtual-size'] } : {}) },
      sourceHost: meta.sourceHost,
      ...meta.ownership,
    };
    const journal: FullJournal = {
      version: 1,
      order,
      vmDirId,
      newBase: nb ? refOf(nb) : null,
      newBase1: refOf(nb1),
      bridge,
      keepBase,
      uploads: [
        { file: up.base1.file, ino: nb1.ino },
        ...(up.base && nb ? [{ file: up.base.file, ino: nb.ino }] : []),
      ],
      manifest,
    };
    await writeFullJournal(p, journal);
    journaled = true;
    await step(c, 'full:journal');
    const published = await runFullJournal(p, journal, c);
    if (!published) throw new OnestorError(ErrorCodes.INTERNAL, 'full publish journal did not match the replica right after writing it', ctx(p, { file: p.workDir }));
    return { manifest: published, vmDirId };
  } catch (e) {
    // Before the journal nothing is published: staged links and a partial bridge only hold space.
    if (!journaled) await removeWorkDir(p).catch(() => {});
    throw mapVanished(p, e, p.snapDir);
  }
}

/**
 * The A/B copies the next incremental merges into (copy.a = the published base.1, copy.b = a full copy of
 * it). Not part of the publish: the snapshot is durable without them, so the receiver runs this after its
 * reply, still under the disk lock; the copy is O(size of base.1) and was most of a seed's publish time.
 * Never fails: without the copies the next incremental rebuilds them (merge.ts readWorkState).
 */
export async function prepareSpareAfterSeed(c: PublishContext): Promise<void> {
  const p = c.paths;
  try {
    await step(c, 'full:spare');
    await setupWorkCopies(p);
    await step(c, 'full:work-copies');
  } catch (e) {
    c.log?.({ vm: p.vm, disk: p.disk, err: String(e) }, 'could not prepare the A/B copies for incremental merges');
    await removeWorkDir(p).catch(() => {});
  }
}

/**
 * The bridge, built in the work dir where `disk.N.snap` links to the replica's real disk.N.snap/ (as the
 * host's staging dir does in DESIGN §3): a sparse copy of the new base.1, pointed (-u) at the staged new
 * base, then rebased safely (not -u) onto `disk.N.snap/base`, i.e. the old base: qemu-img writes into it
 * every cluster it does not hold where the two bases read differently, and stores the final name.
 */
async function buildBridge(p: ReplicaPaths, qemuImg: string): Promise<FileRef> {
  const partial = path.join(p.workDir, `${STAGED.bridge}.partial`);
  const c = ctx(p, { file: partial });
  const r = await run('cp', ['--sparse=always', '--', path.join(p.workDir, STAGED.base1), partial], { timeoutMs: 3_600_000 });
  if (r.code !== 0) {
    throw new OnestorError(/No space/i.test(r.stderr) ? ErrorCodes.NOSPACE : ErrorCodes.INTERNAL, `copy of the new base.1 failed: ${r.stderr.trim()}`, c);
  }
  await qemu(qemuImg, ['rebase', '-u', '-f', 'qcow2', '-b', STAGED.base, '-F', 'qcow2', partial], c, 'qemu-img rebase -u (bridge)');
  await qemu(qemuImg, ['rebase', '-f', 'qcow2', '-b', expectedBackingName(p.disk), '-F', 'qcow2', partial], c, 'qemu-img rebase (bridge)');
  await checkImage(p, qemuImg, partial);
  await fsyncPath(partial);
  const file = path.join(p.workDir, STAGED.bridge);
  await fsp.rename(partial, file);
  return refOf(await fsp.lstat(file));
}
