/**
 * The journal of a full publish, and its idempotent completion (used by the publish itself and, after a
 * crash, by the next session of the disk). Everything it renames is staged in the disk's work dir:
 *   work/VM/disk.N/full.base     the new base (hard link to its upload)
 *   work/VM/disk.N/full.base1    the new thin base.1 (hard link to its upload)
 *   work/VM/disk.N/full.bridge   the bridge: new guest view over the OLD base and over the new one
 *   work/VM/disk.N/full.json     this journal, written once all of the above is durable
 * The renames into disk.N.snap/ follow `order`, and every pair they leave between two syscalls is a
 * complete snapshot (the previous one or the new one): see publish.ts.
 */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { z } from 'zod';
import { readFileNoFollow, writeFileAtomic } from './durable.js';
import { fsyncPath, lstatOrNull, vmDirIdOf, type ReplicaPaths } from './layout.js';
import { identityOf, storedManifestSchema, writeManifest, type StoredManifest } from './manifest.js';
import { step, type PublishContext } from './publish-context.js';

export const FULL_JOURNAL = 'full.json';
export const STAGED = { base: 'full.base', base1: 'full.base1', bridge: 'full.bridge' } as const;

const fileRef = z.object({ ino: z.number().int().min(0), size: z.number().int().min(0) });
export type FileRef = z.infer<typeof fileRef>;

export const fullJournalSchema = z.object({
  version: z.literal(1),
  /**
   * bridge: old base and old base.1 both present; the bridge replaces base.1, then base, then base.1.
   * base-first: no old base.1 (nothing complete to keep). base1-first: no old base (idem; a new base.1
   * must never sit on the old base). replace: no new base, base.1 alone is replaced (one rename).
   */
  order: z.enum(['bridge', 'base-first', 'base1-first', 'replace']),
  vmDirId: z.string().max(64),
  newBase: fileRef.nullable(),
  newBase1: fileRef,
  bridge: fileRef.nullable(),
  /** order 'replace': the base the new base.1 was verified against. */
  keepBase: fileRef.nullable(),
  /** Upload temps that are links to the staged files: unlinked once published. */
  uploads: z.array(z.object({ file: z.string().max(4096), ino: z.number().int().min(0) })).max(2),
  manifest: storedManifestSchema.omit({ files: true }),
});
export type FullJournal = z.infer<typeof fullJournalSchema>;

export function refOf(st: { ino: number; size: number }): FileRef {
  return { ino: st.ino, size: st.size };
}

function is(st: Awaited<ReturnType<typeof lstatOrNull>>, ref: FileRef | null): boolean {
  return !!st && !!ref && st.isFile() && st.ino === ref.ino && st.size === ref.size;
}

export async function writeFullJournal(p: ReplicaPaths, j: FullJournal): Promise<void> {
  await writeFileAtomic(p, path.join(p.workDir, FULL_JOURNAL), JSON.stringify(j) + '\n');
}

export async function readFullJournal(p: ReplicaPaths): Promise<FullJournal | null> {
  try {
    const r = fullJournalSchema.safeParse(JSON.parse(await readFileNoFollow(path.join(p.workDir, FULL_JOURNAL))));
    return r.success ? r.data : null;
  } catch {
    return null;
  }
}

/** rename staged → published, only when the staged name still holds the journal's inode; then fsync the dir. */
async function publishStaged(p: ReplicaPaths, name: string, ref: FileRef, target: string): Promise<boolean> {
  const from = path.join(p.workDir, name);
  if (!is(await lstatOrNull(from), ref)) return false;
  await fsp.rename(from, target);
  await fsyncPath(p.snapDir);
  return true;
}

/**
 * Carries out (or finishes) a full publish from its journal. Idempotent: where the published files stand is
 * read from their inodes, so a crash between any two syscalls is finished by running this again.
 * Returns the new manifest, or null when the journal cannot be completed (a staged file is gone, the VM dir
 * was replaced, base changed under a base.1-only publish): the caller drops it; the pair left in place is
 * complete either way.
 */
export async function runFullJournal(p: ReplicaPaths, j: FullJournal, c?: PublishContext): Promise<StoredManifest | null> {
  const vmSt = await lstatOrNull(p.vmDir);
  if (!vmSt?.isDirectory() || vmDirIdOf(vmSt) !== j.vmDirId) return null;
  const hook = async (name: string) => {
    if (c) await step(c, name);
  };
  const base = () => lstatOrNull(p.base);
  const base1 = () => lstatOrNull(p.base1);

  if (j.order === 'replace') {
    if (!is(await base(), j.keepBase)) return null;
  } else {
    if (!j.newBase) return null;
    if (j.order === 'bridge' && !is(await base(), j.newBase)) {
      const b1 = await base1();
      if (!is(b1, j.bridge) && !is(b1, j.newBase1)) {
        if (!(await publishStaged(p, STAGED.bridge, j.bridge!, p.base1))) return null;
        await hook('full:bridge-published');
      }
    }
    if (j.order === 'base1-first' && !is(await base(), j.newBase) && !is(await base1(), j.newBase1)) {
      if (!(await publishStaged(p, STAGED.base1, j.newBase1, p.base1))) return null;
      await hook('full:base1-published');
    }
    if (!is(await base(), j.newBase)) {
      if (!(await publishStaged(p, STAGED.base, j.newBase, p.base))) return null;
      await hook('full:base-published');
    }
  }
  if (!is(await base1(), j.newBase1)) {
    if (!(await publishStaged(p, STAGED.base1, j.newBase1, p.base1))) return null;
    await hook('full:base1-published');
  }
  // The pair is the new snapshot from here on; what follows is bookkeeping.
  for (const u of j.uploads) {
    if (path.dirname(u.file) !== p.tmpDir || !path.basename(u.file).startsWith('up.')) continue; // only our upload temps
    const st = await lstatOrNull(u.file);
    if (st?.isFile() && st.ino === u.ino) await fsp.rm(u.file, { force: true });
  }
  await hook('full:uploads-dropped');
  const [bSt, b1St] = await Promise.all([fsp.lstat(p.base), fsp.lstat(p.base1)]);
  const manifest: StoredManifest = { ...j.manifest, files: { base: identityOf(bSt), base1: identityOf(b1St) } };
  await writeManifest(p, manifest);
  await hook('full:manifest');
  for (const name of Object.values(STAGED)) await fsp.rm(path.join(p.workDir, name), { force: true });
  await fsp.rm(path.join(p.workDir, FULL_JOURNAL), { force: true });
  await fsyncPath(p.workDir);
  await hook('full:done');
  return manifest;
}
