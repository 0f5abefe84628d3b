/**
 * Where everything of one disk lives on the replica, and the checks that refuse anything we would not have
 * made (symlinks where directories or files belong). Paths come from validated integers only.
 *
 * Layout kept for recovery (DESIGN §2), nothing else inside disk.N.snap/:
 *   SNAPS/VMID/disk.N -> disk.N.snap/base.1
 *   SNAPS/VMID/disk.N.snap/{base, base.1, disk.N.snap -> .}
 *   SNAPS/VMID/.onestor/disk.N.json                 manifest (what is published, with file identities)
 * Receiver-private, outside SNAPS/VMID so upstream's `rm -rf SNAPS/VMID` never meets a half-written file:
 *   SNAPS/.onestor/tmp/VMID-N/up.KEY                 uploads (resumable), manifest temps
 *   SNAPS/.onestor/locks/VMID-N.lock                 per-disk lock
 *   SNAPS/.onestor/slots/slot.K                      session cap
 *   SNAPS/.onestor/work/VMID/disk.N/                 A/B copies of base.1 for O(changed) merges
 *   SNAPS/.onestor/trash/VMID-N-TIME-RAND/           a disk's old work dir, moved aside for later deletion
 */
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { ErrorCodes, OnestorError, type ErrorContext } from '../shared/errors.js';
import { idSchema } from '../protocol/protocol.js';

export interface ReplicaPaths {
  vm: number;
  disk: number;
  snapsDir: string;
  vmDir: string;
  /** `disk.N.snap`: the directory name, the self-link name and the first part of base.1's backing name. */
  snapDirName: string;
  snapDir: string;
  base: string;
  base1: string;
  /** SNAPS/VMID/disk.N */
  diskLink: string;
  /** SNAPS/VMID/disk.N.snap/disk.N.snap */
  selfLink: string;
  metaDir: string;
  manifest: string;
  internalDir: string;
  tmpDir: string;
  workDir: string;
  lockFile: string;
}

/** Backing name base.1 must store (relative, resolved through the self-link). */
export function expectedBackingName(disk: number): string {
  return `disk.${disk}.snap/base`;
}

/** All paths for one disk, from validated integers only (never from client-supplied strings). */
export function replicaPaths(snapsDir: string, vm: number, disk: number): ReplicaPaths {
  for (const [field, v] of [['vm', vm], ['disk', disk]] as const) {
    if (!idSchema.safeParse(v).success) {
      throw new OnestorError(ErrorCodes.PATH, `${field} id must be an integer 0..2^31-1, got ${JSON.stringify(v)}`, { field });
    }
  }
  if (!path.isAbsolute(snapsDir)) throw new OnestorError(ErrorCodes.CONFIG, `snaps dir must be absolute: ${snapsDir}`, { field: 'snapsDir' });
  const root = path.resolve(snapsDir);
  const vmDir = path.join(root, String(vm));
  const snapDirName = `disk.${disk}.snap`;
  const snapDir = path.join(vmDir, snapDirName);
  const internalDir = path.join(root, '.onestor');
  return {
    vm,
    disk,
    snapsDir: root,
    vmDir,
    snapDirName,
    snapDir,
    base: path.join(snapDir, 'base'),
    base1: path.join(snapDir, 'base.1'),
    diskLink: path.join(vmDir, `disk.${disk}`),
    selfLink: path.join(snapDir, snapDirName),
    metaDir: path.join(vmDir, '.onestor'),
    manifest: path.join(vmDir, '.onestor', `disk.${disk}.json`),
    internalDir,
    tmpDir: path.join(internalDir, 'tmp', `${vm}-${disk}`),
    workDir: path.join(internalDir, 'work', String(vm), `disk.${disk}`),
    lockFile: path.join(internalDir, 'locks', `${vm}-${disk}.lock`),
  };
}

export function slotsDir(snapsDir: string): string {
  return path.join(path.resolve(snapsDir), '.onestor', 'slots');
}

export function ctx(p: ReplicaPaths, extra: ErrorContext = {}): ErrorContext {
  return { vm: p.vm, disk: p.disk, ...extra };
}

export function errno(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException | null)?.code;
}

export async function lstatOrNull(file: string) {
  try {
    return await fsp.lstat(file);
  } catch (e) {
    if (errno(e) === 'ENOENT' || errno(e) === 'ENOTDIR') return null;
    throw e;
  }
}

/**
 * Refuses anything in SNAPS/VMID that is not what we would have made: a symlink where a directory or file
 * belongs, or a link pointing elsewhere. Nothing is ever written through such a path.
 */
/**
 * Identity of SNAPS/VMID: inode plus birth time, because ext4 hands a freed inode number straight to the
 * next mkdir, so `rm -rf` + recreate can yield the same inode.
 */
export type VmDirId = string;
export function vmDirIdOf(st: { ino: number; birthtimeMs: number }): VmDirId {
  return `${st.ino}/${st.birthtimeMs}`;
}

export async function checkLayout(p: ReplicaPaths): Promise<{ vmDirId: VmDirId | null }> {
  const refuse = (file: string, why: string) => new OnestorError(ErrorCodes.PATH, `refusing ${file}: ${why}`, ctx(p, { file }));
  const internal = await lstatOrNull(p.internalDir);
  if (internal && !internal.isDirectory()) throw refuse(p.internalDir, 'receiver dir that is not a directory');
  const vmSt = await lstatOrNull(p.vmDir);
  if (!vmSt) return { vmDirId: null };
  if (!vmSt.isDirectory()) throw refuse(p.vmDir, 'VM dir that is not a directory (symlink?)');
  for (const dir of [p.snapDir, p.metaDir]) {
    const st = await lstatOrNull(dir);
    if (st && !st.isDirectory()) throw refuse(dir, 'a non-directory where a directory belongs');
  }
  for (const file of [p.base, p.base1, p.manifest]) {
    const st = await lstatOrNull(file);
    if (st && !st.isFile()) throw refuse(file, 'a non-regular file (symlink?) where a regular file belongs');
  }
  for (const [link, target] of [
    [p.diskLink, `${p.snapDirName}/base.1`],
    [p.selfLink, '.'],
  ] as const) {
    const st = await lstatOrNull(link);
    if (!st) continue;
    if (!st.isSymbolicLink()) throw refuse(link, `a non-symlink where the link -> ${target} belongs`);
    const actual = await fsp.readlink(link);
    if (actual !== target) throw refuse(link, `link pointing to ${JSON.stringify(actual)} instead of ${target}`);
  }
  return { vmDirId: vmDirIdOf(vmSt) };
}


/**
 * The receiver's own directories under SNAPS/.onestor, walked one component at a time with lstat: a symlink
 * or a non-directory anywhere on the way is refused (E_PATH naming it), never followed, never replaced.
 * Missing components are created one level at a time when `create`, else the answer is null.
 * Without openat(2) a swap between this check and the later use remains possible (see README).
 */
export async function privateDir(snapsDir: string, rel: readonly string[], opts: { create: boolean; context?: ErrorContext }): Promise<string | null> {
  let dir = path.join(path.resolve(snapsDir), '.onestor');
  for (let i = -1; i < rel.length; i++) {
    if (i >= 0) dir = path.join(dir, rel[i]!);
    let st = await lstatOrNull(dir);
    if (!st) {
      if (!opts.create) return null;
      try {
        await fsp.mkdir(dir, 0o755);
      } catch (e) {
        if (errno(e) !== 'EEXIST') throw e;
      }
      st = await fsp.lstat(dir);
    }
    if (!st.isDirectory()) {
      throw new OnestorError(
        ErrorCodes.PATH,
        `refusing ${dir}: ${st.isSymbolicLink() ? 'a symlink' : 'a non-directory'} where the receiver's own directory belongs`,
        { ...opts.context, file: dir },
      );
    }
  }
  return dir;
}

const tmpRel = (p: ReplicaPaths) => ['tmp', `${p.vm}-${p.disk}`];
const workRel = (p: ReplicaPaths) => ['work', String(p.vm), `disk.${p.disk}`];
const TRASH_REL = ['trash'];

/** fsync of a file or directory, opened without following a symlink as its last component (durable.ts re-exports it). */
export async function fsyncPath(file: string): Promise<void> {
  const fh = await fsp.open(file, fsConstants.O_RDONLY | O_NOFOLLOW);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

export async function ensureTmpDir(p: ReplicaPaths): Promise<string> {
  return (await privateDir(p.snapsDir, tmpRel(p), { create: true, context: ctx(p) }))!;
}
/** SNAPS/.onestor/tmp/VM-D when it exists (checked), else null. */
export async function checkedTmpDir(p: ReplicaPaths): Promise<string | null> {
  return privateDir(p.snapsDir, tmpRel(p), { create: false, context: ctx(p) });
}
export async function ensureWorkDir(p: ReplicaPaths): Promise<string> {
  return (await privateDir(p.snapsDir, workRel(p), { create: true, context: ctx(p) }))!;
}
export async function checkedWorkDir(p: ReplicaPaths): Promise<string | null> {
  return privateDir(p.snapsDir, workRel(p), { create: false, context: ctx(p) });
}

/** rm -rf of the disk's work dir, only once every component down to it is a real directory. */
export async function removeWorkDir(p: ReplicaPaths): Promise<void> {
  const dir = await checkedWorkDir(p);
  // fs.rm does not follow symlinks inside the tree (the work dir's own disk.N.snap link is unlinked, not walked)
  if (dir) await fsp.rm(dir, { recursive: true, force: true });
}

/**
 * Moves the disk's work dir aside in one rename, into SNAPS/.onestor/trash, for emptyTrash to delete after the
 * reply. Deleting a full-size copy of base.1 is not free: where the filesystem discards freed blocks as it
 * frees them (ext4 mounted with -o discard), unlink(2) of a 1 GiB copy blocked for ~1 s (bench/README.md,
 * issue 14 ninth pass), and a seed's publish must not wait for that. The parent is synced so that the old dir
 * (a stale journal among it) cannot come back after a crash once anything new is staged. False: none was there.
 */
export async function trashWorkDir(p: ReplicaPaths): Promise<boolean> {
  const dir = await checkedWorkDir(p);
  if (!dir) return false;
  const trash = (await privateDir(p.snapsDir, TRASH_REL, { create: true, context: ctx(p) }))!;
  await fsp.rename(dir, path.join(trash, `${p.vm}-${p.disk}-${Date.now()}-${randomBytes(4).toString('hex')}`));
  await fsyncPath(path.dirname(dir));
  return true;
}

/**
 * rm -rf of everything in SNAPS/.onestor/trash (whoever put it there: a receiver killed before it emptied its
 * own is cleaned by the next one). Entries vanishing meanwhile (another receiver emptying too) are fine.
 * Returns the entries removed.
 */
export async function emptyTrash(snapsDir: string): Promise<number> {
  const trash = await privateDir(snapsDir, TRASH_REL, { create: false });
  if (!trash) return 0;
  let removed = 0;
  for (const name of await fsp.readdir(trash)) {
    await fsp.rm(path.join(trash, name), { recursive: true, force: true, maxRetries: 2 });
    removed++;
  }
  return removed;
}

/** rm -rf of the disk's tmp dir (uploads included), only once every component down to it is a real directory. */
export async function removeTmpDir(p: ReplicaPaths): Promise<void> {
  const dir = await checkedTmpDir(p);
  if (dir) await fsp.rm(dir, { recursive: true, force: true });
}

/**
 * A lock or slot file we are about to hand to flock(1), which opens it following symlinks: its directory
 * is checked (and created) component by component and the file itself must be absent or a regular file.
 */
export async function checkedLockFile(snapsDir: string, rel: readonly string[], name: string, context: ErrorContext = {}): Promise<string> {
  const dir = (await privateDir(snapsDir, rel, { create: true, context }))!;
  const file = path.join(dir, name);
  const st = await lstatOrNull(file);
  if (st && !st.isFile()) {
    throw new OnestorError(ErrorCodes.PATH, `refusing lock file ${file}: ${st.isSymbolicLink() ? 'a symlink' : 'not a regular file'}`, { ...context, file });
  }
  return file;
}

export async function diskLockFile(p: ReplicaPaths): Promise<string> {
  return checkedLockFile(p.snapsDir, ['locks'], path.basename(p.lockFile), ctx(p));
}

/** Open flags that refuse a symlink as the last component (Node exposes O_NOFOLLOW on Linux). */
export const O_NOFOLLOW = fsConstants.O_NOFOLLOW ?? 0;
export const O_DIRECTORY = fsConstants.O_DIRECTORY ?? 0;

export function tmpName(p: ReplicaPaths, prefix: string): string {
  return path.join(p.tmpDir, `${prefix}.${randomBytes(6).toString('hex')}`);
}


/** mkdir of one level inside SNAPS/VMID: the parent must exist (ENOENT means the VM dir vanished). */
export async function mkdirIn(p: ReplicaPaths, dir: string): Promise<void> {
  try {
    await fsp.mkdir(dir);
  } catch (e) {
    if (errno(e) !== 'EEXIST') throw e;
    const st = await fsp.lstat(dir);
    if (!st.isDirectory()) throw new OnestorError(ErrorCodes.PATH, 'refusing a non-directory where a directory belongs', ctx(p, { file: dir }));
  }
}

export async function ensureSymlink(p: ReplicaPaths, link: string, target: string): Promise<void> {
  try {
    await fsp.symlink(target, link);
  } catch (e) {
    if (errno(e) !== 'EEXIST') throw e;
    const st = await fsp.lstat(link);
    if (!st.isSymbolicLink() || (await fsp.readlink(link)) !== target) {
      throw new OnestorError(ErrorCodes.PATH, `refusing ${link}: not a link to ${target}`, ctx(p, { file: link }));
    }
  }
}

export function mapVanished(p: ReplicaPaths, e: unknown, file: string): unknown {
  if (e instanceof OnestorError) return e;
  if (errno(e) === 'ENOENT' || errno(e) === 'ENOTDIR') {
    return new OnestorError(ErrorCodes.VANISHED, `replica VM dir ${p.vmDir} was removed during the session`, ctx(p, { file }), { cause: e });
  }
  if (errno(e) === 'ENOSPC' || errno(e) === 'EDQUOT') {
    return new OnestorError(ErrorCodes.NOSPACE, `no space left on the replica writing ${file}`, ctx(p, { file }), { cause: e });
  }
  return e;
}

/** The VM dir must still be the one seen at open (upstream may `rm -rf` it at any time). */
export async function assertSameVmDir(p: ReplicaPaths, vmDirId: VmDirId): Promise<void> {
  const st = await lstatOrNull(p.vmDir);
  if (!st || !st.isDirectory() || vmDirIdOf(st) !== vmDirId) {
    throw new OnestorError(ErrorCodes.VANISHED, `replica VM dir ${p.vmDir} was removed or replaced during the session`, ctx(p, { file: p.vmDir }));
  }
}

