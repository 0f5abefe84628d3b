/**
 * Incremental merge (A/B): work/copy.a and work/copy.b are two full copies of base.1. One of them is the
 * published file itself (same inode, hard link); the other, the spare, is one increment behind. A merge
 * applies [previous inc, new inc] onto the spare (qemu-img commit writes whole clusters, so applying the
 * same inc twice gives the same bytes: a crash is redone from the journal), checks it, then publishes it by
 * link+rename. The old published copy becomes the spare. Cost follows the change, never the disk size.
 */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { z } from 'zod';
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import { run } from '../shared/exec.js';
import { acquireFileLock } from '../shared/file-lock.js';
import { checkpointSchema, consistencySchema, epochSchema, OWNER_HISTORY_MAX, ownerChangeSchema, publishTokenSchema, sha256Schema, sizeSchema } from '../protocol/protocol.js';
import { readFileNoFollow, writeFileAtomic } from './durable.js';
import { FULL_JOURNAL, readFullJournal, runFullJournal } from './full-journal.js';
import { checkImage, qemu } from './image-check.js';
import {
  assertSameVmDir,
  checkLayout,
  checkedWorkDir,
  ctx,
  diskLockFile,
  ensureTmpDir,
  ensureWorkDir,
  fsyncPath,
  lstatOrNull,
  mapVanished,
  privateDir,
  removeWorkDir,
  replicaPaths,
  tmpName,
  type ReplicaPaths,
} from './layout.js';
import { identityOf, readValidManifest, writeManifest, type StoredManifest } from './manifest.js';
import { step, type PublishContext, type PublishMeta } from './publish-context.js';
import type { UploadedFile } from './uploads.js';

/** Every step an incremental merge can stop at (test hooks; crash tests enumerate this list). */
export const INC_STEPS = [
  'inc:spare-ready',
  'inc:journal',
  'inc:fresh-spare',
  'inc:applied:inc.N',
  'inc:checked',
  'inc:published',
  'inc:manifest',
  'inc:done',
] as const;

export const workStateSchema = z.object({
  version: z.literal(1),
  /** Name (copy.a|copy.b) of the spare: the copy that is NOT the published base.1. */
  spare: z.enum(['copy.a', 'copy.b']),
  /** Increments the spare lacks, oldest first (names inside workDir). */
  pending: z.array(z.string().regex(/^inc\.[0-9]{1,16}$/)).max(2),
  seq: z.number().int().min(0),
});
export type WorkState = z.infer<typeof workStateSchema>;

export const journalSchema = z.object({
  version: z.literal(1),
  spare: z.enum(['copy.a', 'copy.b']),
  /** Inode of base.1 before this merge: tells "not yet published" from "already published" on redo. */
  parentBase1Ino: z.number().int().min(0),
  apply: z.array(z.string().regex(/^inc\.[0-9]{1,16}$/)).min(1).max(3),
  parentCheckpoint: checkpointSchema,
  checkpoint: checkpointSchema,
  capturedAt: epochSchema,
  consistency: consistencySchema,
  sourceHost: z.string().max(255),
  base: z.object({ size: sizeSchema, sha256: sha256Schema }),
  seq: z.number().int().min(0),
  /** owner/token/history of the manifest this merge publishes (a redo after a crash writes the same) */
  ownership: z.object({ owner: z.string().max(255), token: publishTokenSchema, history: z.array(ownerChangeSchema).max(OWNER_HISTORY_MAX) }).optional(),
});
export type Journal = z.infer<typeof journalSchema>;

export function other(copy: 'copy.a' | 'copy.b'): 'copy.a' | 'copy.b' {
  return copy === 'copy.a' ? 'copy.b' : 'copy.a';
}

export async function readJsonOrNull<T>(file: string, schema: z.ZodType<T>): Promise<T | null> {
  try {
    const r = schema.safeParse(JSON.parse(await readFileNoFollow(file)));
    return r.success ? r.data : null;
  } catch {
    return null;
  }
}

export async function writeWorkJson(p: ReplicaPaths, name: string, value: object): Promise<void> {
  await writeFileAtomic(p, path.join(p.workDir, name), JSON.stringify(value) + '\n');
}

/**
 * Builds the A/B pair from the published base.1: copy.a is a hard link to it (no copy), copy.b a sparse
 * copy (the one O(size) step, paid once per seed). `disk.N.snap` in the work dir makes the relative backing
 * name of the copies resolve to the replica's real base.
 */
export async function setupWorkCopies(p: ReplicaPaths): Promise<void> {
  await removeWorkDir(p);
  await ensureWorkDir(p);
  await fsp.symlink(p.snapDir, path.join(p.workDir, p.snapDirName));
  await fsp.link(p.base1, path.join(p.workDir, 'copy.a'));
  await freshCopyOfBase1(p, path.join(p.workDir, 'copy.b'));
  const state: WorkState = { version: 1, spare: 'copy.b', pending: [], seq: 0 };
  await writeWorkJson(p, 'state.json', state);
}

/** A sparse copy of the published base.1 at `dest` (via dest.partial): the one O(size) step of the A/B scheme. */
export async function freshCopyOfBase1(p: ReplicaPaths, dest: string): Promise<void> {
  const partial = `${dest}.partial`;
  const r = await run('cp', ['--sparse=always', '--', p.base1, partial], { timeoutMs: 3_600_000 });
  if (r.code !== 0) {
    await fsp.rm(partial, { force: true }).catch(() => {});
    throw new OnestorError(/No space/i.test(r.stderr) ? ErrorCodes.NOSPACE : ErrorCodes.INTERNAL, `copy of base.1 failed: ${r.stderr.trim()}`, ctx(p, { file: partial }));
  }
  await fsyncPath(partial);
  await fsp.rename(partial, dest);
  await fsyncPath(path.dirname(dest));
}

/** The work state when it is consistent with the published base.1, else null (caller rebuilds). */
export async function readWorkState(p: ReplicaPaths): Promise<WorkState | null> {
  if (!(await checkedWorkDir(p))) return null;
  const state = await readJsonOrNull(path.join(p.workDir, 'state.json'), workStateSchema);
  if (!state) return null;
  const [pub, spare, b1] = await Promise.all([
    lstatOrNull(path.join(p.workDir, other(state.spare))),
    lstatOrNull(path.join(p.workDir, state.spare)),
    lstatOrNull(p.base1),
  ]);
  if (!pub?.isFile() || !spare?.isFile() || !b1?.isFile()) return null;
  if (pub.ino !== b1.ino || spare.ino === b1.ino) return null;
  // The copies' backing name resolves through this link: only the one we made is trusted.
  const link = path.join(p.workDir, p.snapDirName);
  if (!(await lstatOrNull(link))?.isSymbolicLink() || (await fsp.readlink(link)) !== p.snapDir) return null;
  for (const inc of state.pending) if (!(await lstatOrNull(path.join(p.workDir, inc)))?.isFile()) return null;
  return state;
}

export async function applyIncrement(p: ReplicaPaths, qemuImg: string, spare: string, inc: string): Promise<void> {
  const c = ctx(p, { file: inc });
  // The inc's stored backing name is whatever the capture used: point it at the spare without touching data.
  await qemu(qemuImg, ['rebase', '-u', '-f', 'qcow2', '-b', spare, '-F', 'qcow2', inc], c, 'qemu-img rebase -u');
  // -d keeps the inc intact: it is applied again to the other copy next cycle, and again on a redo.
  await qemu(qemuImg, ['commit', '-f', 'qcow2', '-d', inc], c, 'qemu-img commit');
}


/**
 * Carries out (or finishes) a merge journal. Idempotent: every step can be repeated after a crash.
 * Returns the new manifest, or null when the journal no longer matches the replica (it is then dropped).
 */
export async function runJournal(p: ReplicaPaths, qemuImg: string, j: Journal, c?: PublishContext): Promise<StoredManifest | null> {
  const sparePath = path.join(p.workDir, j.spare);
  const [b1, spareSt] = await Promise.all([lstatOrNull(p.base1), lstatOrNull(sparePath)]);
  if (!b1?.isFile() || !spareSt?.isFile()) return null;
  if (b1.ino === j.parentBase1Ino) {
    if (spareSt.nlink > 1) {
      // Something besides our work dir links the spare (a once-published base.1: `cp -al` backup, rsync
      // --link-dest): it must never change. Start from a fresh copy of the published base.1 instead; the
      // pending incs it already holds are applied again harmlessly (commit writes whole clusters).
      c?.log?.({ vm: p.vm, disk: p.disk, links: spareSt.nlink }, 'spare is linked elsewhere; merging into a fresh copy');
      await freshCopyOfBase1(p, sparePath);
      if (c) await step(c, 'inc:fresh-spare');
    }
    for (const inc of j.apply) {
      await applyIncrement(p, qemuImg, sparePath, path.join(p.workDir, inc));
      if (c) await step(c, `inc:applied:${inc}`);
    }
    await checkImage(p, qemuImg, sparePath);
    await fsyncPath(sparePath);
    if (c) await step(c, 'inc:checked');
    await ensureTmpDir(p);
    const staged = tmpName(p, 'pub');
    await fsp.link(sparePath, staged);
    try {
      await fsp.rename(staged, p.base1);
    } catch (e) {
      await fsp.rm(staged, { force: true });
      throw e;
    }
    await fsyncPath(p.snapDir);
    if (c) await step(c, 'inc:published');
  } else if (b1.ino !== spareSt.ino) {
    return null;
  }
  const [bSt, b1St] = await Promise.all([fsp.lstat(p.base), fsp.lstat(p.base1)]);
  const manifest: StoredManifest = {
    version: 1,
    vmId: p.vm,
    diskId: p.disk,
    checkpoint: j.checkpoint,
    capturedAt: j.capturedAt,
    publishedAt: Math.floor(Date.now() / 1000),
    consistency: j.consistency,
    mode: 'incremental',
    base: j.base,
    base1: { size: b1St.size },
    sourceHost: j.sourceHost,
    ...j.ownership,
    files: { base: identityOf(bSt), base1: identityOf(b1St) },
  };
  await writeManifest(p, manifest);
  if (c) await step(c, 'inc:manifest');
  const last = j.apply[j.apply.length - 1]!;
  const state: WorkState = { version: 1, spare: other(j.spare), pending: [last], seq: j.seq };
  await writeWorkJson(p, 'state.json', state);
  for (const inc of j.apply.slice(0, -1)) await fsp.rm(path.join(p.workDir, inc), { force: true });
  await fsp.rm(path.join(p.workDir, 'journal.json'), { force: true });
  await fsyncPath(p.workDir);
  if (c) await step(c, 'inc:done');
  return manifest;
}

/**
 * Redo after a crash: run at open (and before `status`), under the disk lock, and only after the layout
 * check: a journal never renames anything through a path that is not what we made. A journal that cannot
 * be completed is dropped together with the work dir (the published pair is complete either way; a lost
 * spare is rebuilt later).
 */
export async function recoverJournal(p: ReplicaPaths, qemuImg: string, log?: (obj: object, msg: string) => void): Promise<'none' | 'redone' | 'dropped'> {
  if (!(await checkedWorkDir(p))) return 'none';
  const fullFile = path.join(p.workDir, FULL_JOURNAL);
  const mergeFile = path.join(p.workDir, 'journal.json');
  const [hasFull, hasMerge] = await Promise.all([lstatOrNull(fullFile), lstatOrNull(mergeFile)]);
  if (!hasFull && !hasMerge) return 'none';
  await checkLayout(p);
  try {
    if (await lstatOrNull(p.vmDir)) {
      if (hasFull) {
        const fj = await readFullJournal(p);
        const m = fj ? await runFullJournal(p, fj) : null;
        if (m) {
          log?.({ vm: p.vm, disk: p.disk, checkpoint: m.checkpoint }, 'finished an interrupted full publish');
          // The A/B pair went with the old base.1: the next incremental rebuilds it.
          await removeWorkDir(p);
          return 'redone';
        }
      } else {
        const j = await readJsonOrNull(mergeFile, journalSchema);
        const m = j ? await runJournal(p, qemuImg, j) : null;
        if (m) {
          log?.({ vm: p.vm, disk: p.disk, checkpoint: m.checkpoint }, 'finished an interrupted incremental merge');
          return 'redone';
        }
      }
    }
  } catch (e) {
    log?.({ vm: p.vm, disk: p.disk, err: String(e) }, 'interrupted publish could not be redone; dropping work copies');
  }
  await removeWorkDir(p);
  return 'dropped';
}

/** Space held only by our work dir (hard links, spare) goes when upstream removed the VM. */
export async function dropWorkIfVmGone(p: ReplicaPaths): Promise<void> {
  if (!(await lstatOrNull(p.vmDir))) await removeWorkDir(p);
}

export async function publishIncremental(
  c: PublishContext,
  inc: UploadedFile,
  meta: PublishMeta & { checkpoint: string; parentCheckpoint: string },
): Promise<StoredManifest> {
  const p = c.paths;
  try {
    const manifest = await readValidManifest(p);
    if (!manifest) {
      throw new OnestorError(ErrorCodes.PARENT, 'the replica holds no valid snapshot for this disk; a full seed is needed', ctx(p));
    }
    if (manifest.checkpoint !== meta.parentCheckpoint) {
      throw new OnestorError(
        ErrorCodes.PARENT,
        `replica holds checkpoint ${JSON.stringify(manifest.checkpoint)}, increment is based on ${JSON.stringify(meta.parentCheckpoint)}`,
        ctx(p, { field: 'parentCheckpoint' }),
      );
    }
    if (c.vmDirId === null) throw new OnestorError(ErrorCodes.VANISHED, 'replica VM dir did not exist at open', ctx(p));
    await assertSameVmDir(p, c.vmDirId);
    // qemu-img's check began when the upload's bytes were verified (receiver onEnd)
    await inc.verdict;

    let state = await readWorkState(p);
    if (!state) {
      c.log?.({ vm: p.vm, disk: p.disk }, 'rebuilding A/B copies from the published base.1');
      await setupWorkCopies(p);
      state = await readWorkState(p);
      if (!state) throw new OnestorError(ErrorCodes.INTERNAL, 'A/B copies inconsistent right after setup', ctx(p, { file: p.workDir }));
    }
    await step(c, 'inc:spare-ready');
    const seq = state.seq + 1;
    const incName = `inc.${seq}`;
    await fsp.rename(inc.file, path.join(p.workDir, incName));
    const b1 = await fsp.lstat(p.base1);
    const journal: Journal = {
      version: 1,
      spare: state.spare,
      parentBase1Ino: b1.ino,
      apply: [...state.pending, incName],
      parentCheckpoint: meta.parentCheckpoint,
      checkpoint: meta.checkpoint,
      capturedAt: meta.capturedAt,
      consistency: meta.consistency,
      sourceHost: meta.sourceHost,
      base: manifest.base,
      seq,
      ...(meta.ownership ? { ownership: meta.ownership } : {}),
    };
    await writeWorkJson(p, 'journal.json', journal);
    await step(c, 'inc:journal');
    const result = await runJournal(p, c.qemuImg, journal, c);
    if (!result) throw new OnestorError(ErrorCodes.INTERNAL, 'merge journal did not match the replica right after writing it', ctx(p));
    return result;
  } catch (e) {
    throw mapVanished(p, e, p.base1);
  }
}


/**
 * Finishes (or drops) interrupted merges of a VM's disks before `status` answers, so a client plans from
 * what `open` would see. Only disks whose lock is free right now: a busy disk is someone's live session.
 */
export async function recoverPendingJournals(snapsDir: string, vm: number, qemuImg: string, log?: (obj: object, msg: string) => void): Promise<number> {
  const workVm = await privateDir(snapsDir, ['work', String(vm)], { create: false, context: { vm } });
  const names = workVm ? await fsp.readdir(workVm).catch(() => [] as string[]) : [];
  let n = 0;
  for (const name of names) {
    const m = /^disk\.(0|[1-9][0-9]{0,9})$/.exec(name);
    if (!m) continue;
    const p = replicaPaths(snapsDir, vm, Number(m[1]));
    const journals = await Promise.all([lstatOrNull(path.join(p.workDir, 'journal.json')), lstatOrNull(path.join(p.workDir, FULL_JOURNAL))]);
    if (!journals.some(Boolean)) continue;
    let lock: { release(): Promise<void> } | null = null;
    try {
      lock = await acquireFileLock(await diskLockFile(p), { timeoutSec: 0 });
    } catch {
      continue;
    }
    try {
      if ((await recoverJournal(p, qemuImg, log)) !== 'none') n++;
    } finally {
      await lock.release();
    }
  }
  return n;
}
