/**
 * The replica's on-disk layout and every write the receiver makes under SNAPS (REPLICA_RECOVERY_SNAPS_DIR).
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
 *
 * Incremental merge (A/B): work/copy.a and work/copy.b are two full copies of base.1. One of them is the
 * published file itself (same inode, hard link); the other, the spare, is one increment behind. A merge
 * applies [previous inc, new inc] onto the spare (qemu-img commit writes whole clusters, so applying the
 * same inc twice gives the same bytes: a crash is redone from the journal), checks it, then publishes it by
 * link+rename. The old published copy becomes the spare. Cost follows the change, never the disk size.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { z } from 'zod';
import { ErrorCodes, OnestorError, type ErrorContext } from './errors.js';
import { run } from './exec.js';
import type { ReplicaManifest } from './model.js';
import { acquireFileLock } from './file-lock.js';
import { checkpointSchema, consistencySchema, epochSchema, idSchema, replicaManifestSchema, sha256Schema, sizeSchema } from './protocol.js';

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

function ctx(p: ReplicaPaths, extra: ErrorContext = {}): ErrorContext {
  return { vm: p.vm, disk: p.disk, ...extra };
}

function errno(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException | null)?.code;
}

async function lstatOrNull(file: string) {
  try {
    return await fsp.lstat(file);
  } catch (e) {
    if (errno(e) === 'ENOENT' || errno(e) === 'ENOTDIR') return null;
    throw e;
  }
}

/** Identity used to notice that a file was replaced or changed behind our back. */
export interface FileIdentity {
  ino: number;
  size: number;
  mtimeMs: number;
}

function identityOf(st: { ino: number; size: number; mtimeMs: number }): FileIdentity {
  return { ino: st.ino, size: st.size, mtimeMs: st.mtimeMs };
}

const identitySchema = z.object({ ino: z.number().int().min(0), size: sizeSchema, mtimeMs: z.number().min(0) });

/** The manifest as stored: the wire manifest plus the identities that make it trustworthy. */
export const storedManifestSchema = replicaManifestSchema.extend({
  files: z.object({ base: identitySchema, base1: identitySchema }),
});
export type StoredManifest = z.infer<typeof storedManifestSchema>;

export function toWireManifest(m: StoredManifest): ReplicaManifest {
  return replicaManifestSchema.parse(m) as ReplicaManifest;
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
function vmDirIdOf(st: { ino: number; birthtimeMs: number }): VmDirId {
  return `${st.ino}/${st.birthtimeMs}`;
}

export async function checkLayout(p: ReplicaPaths): Promise<{ vmDirId: VmDirId | null }> {
  const refuse = (file: string, why: string) => new OnestorError(ErrorCodes.PATH, `refusing ${why}`, ctx(p, { file }));
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

/** The manifest when base and base.1 are still the files it describes; null when lineage is lost. */
export async function readValidManifest(p: ReplicaPaths): Promise<StoredManifest | null> {
  let text: string;
  try {
    const st = await fsp.lstat(p.manifest);
    if (!st.isFile()) return null;
    text = await fsp.readFile(p.manifest, 'utf8');
  } catch (e) {
    if (errno(e) === 'ENOENT' || errno(e) === 'ENOTDIR') return null;
    throw e;
  }
  let parsed: StoredManifest;
  try {
    const r = storedManifestSchema.safeParse(JSON.parse(text));
    if (!r.success) return null;
    parsed = r.data;
  } catch {
    return null;
  }
  if (parsed.vmId !== p.vm || parsed.diskId !== p.disk) return null;
  const [b, b1] = await Promise.all([lstatOrNull(p.base), lstatOrNull(p.base1)]);
  if (!b?.isFile() || !b1?.isFile()) return null;
  if (b.ino !== parsed.files.base.ino || b.size !== parsed.files.base.size) return null;
  if (b1.ino !== parsed.files.base1.ino || b1.size !== parsed.files.base1.size) return null;
  return parsed;
}

export async function sha256File(file: string, length?: number): Promise<string> {
  const hash = createHash('sha256');
  if (length === 0) return hash.digest('hex');
  const stream = createReadStream(file, { highWaterMark: 4 * 1024 * 1024, ...(length !== undefined ? { start: 0, end: length - 1 } : {}) });
  for await (const chunk of stream) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

export interface BaseOnReplica {
  size: number;
  sha256: string;
  identity: FileIdentity;
}

/**
 * Digest of SNAPS/VMID/disk.N.snap/base. Taken from the manifest's cache while (ino, size, mtime) are
 * unchanged so a steady cycle never re-reads the image; re-hashed (and the cache refreshed) otherwise.
 */
export async function baseOnReplica(p: ReplicaPaths, manifest: StoredManifest | null): Promise<BaseOnReplica | null> {
  const st = await lstatOrNull(p.base);
  if (!st?.isFile()) return null;
  const id = identityOf(st);
  const cached = manifest?.files.base;
  if (manifest && cached && cached.ino === id.ino && cached.size === id.size && cached.mtimeMs === id.mtimeMs) {
    return { size: id.size, sha256: manifest.base.sha256, identity: id };
  }
  const sha256 = await sha256File(p.base);
  if (manifest && cached && cached.ino === id.ino && cached.size === id.size) {
    // Same file, touched: refresh the cache so the next open does not hash again.
    await writeManifest(p, { ...manifest, base: { size: id.size, sha256 }, files: { ...manifest.files, base: id } });
  }
  return { size: id.size, sha256, identity: id };
}

// ---------------------------------------------------------------------------------------------------------
// Small durable-write helpers

export async function fsyncPath(file: string): Promise<void> {
  const fh = await fsp.open(file, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function ensureDir(dir: string): Promise<void> {
  await fsp.mkdir(dir, { recursive: true });
}

function tmpName(p: ReplicaPaths, prefix: string): string {
  return path.join(p.tmpDir, `${prefix}.${randomBytes(6).toString('hex')}`);
}

/** temp + fsync + rename + dir fsync. The temp lives outside SNAPS/VMID. */
async function writeFileAtomic(p: ReplicaPaths, target: string, data: string): Promise<void> {
  await ensureDir(p.tmpDir);
  const tmp = tmpName(p, 'json');
  const fh = await fsp.open(tmp, 'w', 0o644);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
  try {
    await fsp.rename(tmp, target);
  } catch (e) {
    await fsp.rm(tmp, { force: true });
    throw e;
  }
  await fsyncPath(path.dirname(target));
}

/** Writes the manifest into SNAPS/VMID/.onestor; a vanished VM dir is E_VANISHED, never recreated here. */
export async function writeManifest(p: ReplicaPaths, m: StoredManifest): Promise<void> {
  try {
    await mkdirIn(p, p.metaDir);
    await writeFileAtomic(p, p.manifest, JSON.stringify(m, null, 1) + '\n');
  } catch (e) {
    throw mapVanished(p, e, p.manifest);
  }
}

/** mkdir of one level inside SNAPS/VMID: the parent must exist (ENOENT means the VM dir vanished). */
async function mkdirIn(p: ReplicaPaths, dir: string): Promise<void> {
  try {
    await fsp.mkdir(dir);
  } catch (e) {
    if (errno(e) !== 'EEXIST') throw e;
    const st = await fsp.lstat(dir);
    if (!st.isDirectory()) throw new OnestorError(ErrorCodes.PATH, 'refusing a non-directory where a directory belongs', ctx(p, { file: dir }));
  }
}

async function ensureSymlink(p: ReplicaPaths, link: string, target: string): Promise<void> {
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

function mapVanished(p: ReplicaPaths, e: unknown, file: string): unknown {
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

// ---------------------------------------------------------------------------------------------------------
// Uploads

export function uploadPath(p: ReplicaPaths, key: string): string {
  // The prefix keeps keys like "." or ".." from naming anything but a plain file.
  return path.join(p.tmpDir, `up.${key}`);
}

/** Bytes already held for a resumable upload; a file longer than announced is restarted from 0. */
export async function prepareUpload(p: ReplicaPaths, key: string, size: number): Promise<{ file: string; offset: number }> {
  await ensureDir(p.tmpDir);
  const file = uploadPath(p, key);
  const st = await lstatOrNull(file);
  if (st && !st.isFile()) throw new OnestorError(ErrorCodes.PATH, 'refusing a non-regular upload temp file', ctx(p, { file }));
  if (!st) return { file, offset: 0 };
  if (st.size > size) {
    await fsp.truncate(file, 0);
    return { file, offset: 0 };
  }
  return { file, offset: st.size };
}

/** After a publish, leftovers of abandoned uploads for this disk only hold space. */
export async function dropStaleUploads(p: ReplicaPaths, keep: ReadonlySet<string>): Promise<void> {
  let names: string[];
  try {
    names = await fsp.readdir(p.tmpDir);
  } catch {
    return;
  }
  for (const n of names) {
    if (n.startsWith('up.') && !keep.has(path.join(p.tmpDir, n))) await fsp.rm(path.join(p.tmpDir, n), { force: true });
  }
}

export interface UploadedFile {
  file: string;
  size: number;
  sha256: string;
}

// ---------------------------------------------------------------------------------------------------------
// qemu-img checks

interface QemuInfo {
  format?: string;
  'virtual-size'?: number;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific'?: { type?: string; data?: { 'data-file'?: string; corrupt?: boolean } };
}

async function qemuInfo(qemuImg: string, file: string, c: ErrorContext): Promise<QemuInfo> {
  // -f qcow2: never let qemu-img probe the format of a file a client sent.
  const r = await run(qemuImg, ['info', '--output=json', '-f', 'qcow2', file], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new OnestorError(ErrorCodes.QEMU_IMG, `not a usable qcow2 image: ${r.stderr.trim()}`, { ...c, file });
  try {
    return JSON.parse(r.stdout) as QemuInfo;
  } catch {
    throw new OnestorError(ErrorCodes.QEMU_IMG, 'qemu-img info printed invalid JSON', { ...c, file });
  }
}

function refuseExternalData(info: QemuInfo, file: string, c: ErrorContext): void {
  if (info['format-specific']?.data?.['data-file'] !== undefined) {
    throw new OnestorError(ErrorCodes.QEMU_IMG, 'qcow2 with an external data file refused', { ...c, file });
  }
  if (info['format-specific']?.data?.corrupt) throw new OnestorError(ErrorCodes.QEMU_IMG, 'qcow2 marked corrupt', { ...c, file });
}

/** base.1 must be a qcow2 whose stored backing is exactly `disk.N.snap/base` (qcow2): what recovery expects. */
export async function checkUploadedBase1(p: ReplicaPaths, qemuImg: string, file: string): Promise<QemuInfo> {
  const c = ctx(p);
  const info = await qemuInfo(qemuImg, file, c);
  refuseExternalData(info, file, c);
  if (info.format !== 'qcow2') throw new OnestorError(ErrorCodes.QEMU_IMG, `base.1 is ${info.format}, not qcow2`, { ...c, file });
  const want = expectedBackingName(p.disk);
  if (info['backing-filename'] !== want) {
    throw new OnestorError(ErrorCodes.QEMU_IMG, `base.1 backing name is ${JSON.stringify(info['backing-filename'] ?? null)}, expected ${want}`, {
      ...c,
      file,
      field: 'backing-filename',
    });
  }
  if (info['backing-filename-format'] !== 'qcow2') {
    throw new OnestorError(ErrorCodes.QEMU_IMG, `base.1 backing format is ${JSON.stringify(info['backing-filename-format'] ?? null)}, expected qcow2`, {
      ...c,
      file,
      field: 'backing-filename-format',
    });
  }
  return info;
}

/** base is the image copy: a qcow2 with no backing file of its own (a backing would point anywhere). */
export async function checkUploadedBase(p: ReplicaPaths, qemuImg: string, file: string): Promise<void> {
  const c = ctx(p);
  const info = await qemuInfo(qemuImg, file, c);
  refuseExternalData(info, file, c);
  if (info['backing-filename'] !== undefined) {
    throw new OnestorError(ErrorCodes.QEMU_IMG, `base has a backing file (${info['backing-filename']}); refused`, { ...c, file });
  }
}

async function checkIncrement(p: ReplicaPaths, qemuImg: string, file: string): Promise<void> {
  const c = ctx(p);
  const info = await qemuInfo(qemuImg, file, c);
  refuseExternalData(info, file, c);
}

async function qemu(qemuImg: string, args: string[], c: ErrorContext, what: string): Promise<void> {
  const r = await run(qemuImg, args, { timeoutMs: 3_600_000 });
  if (r.code !== 0) throw new OnestorError(ErrorCodes.QEMU_IMG, `${what} failed (exit ${r.code}): ${r.stderr.trim()}`, c);
}

// ---------------------------------------------------------------------------------------------------------
// Publish

export interface PublishMeta {
  checkpoint: string | null;
  capturedAt: number;
  consistency: ReplicaManifest['consistency'];
  sourceHost: string;
}

export interface PublishContext {
  paths: ReplicaPaths;
  qemuImg: string;
  /** Identity (inode + birth time) of SNAPS/VMID at open; null when it did not exist (a full seed may then create it). */
  vmDirId: VmDirId | null;
  /** base as reported at open; a publish without a new base needs it unchanged. */
  baseAtOpen: BaseOnReplica | null;
  log?: (obj: object, msg: string) => void;
  /** Test hook: called at named steps so crash-at-each-step can be simulated. */
  onStep?: (step: string) => Promise<void> | void;
}

async function step(c: PublishContext, name: string): Promise<void> {
  if (c.onStep) await c.onStep(name);
}

/**
 * Full publish. Order keeps the invariant "base + base.1 is the previous or the new complete snapshot":
 * when base changes, the old base.1 leaves first (so no base.1 is ever paired with a foreign base), then base,
 * then base.1; the manifest comes last and is only trusted while the file identities it names still match.
 * Returns the new manifest and the (possibly new) VM dir inode.
 */
export async function publishFull(
  c: PublishContext,
  up: { base?: UploadedFile; base1: UploadedFile },
  meta: PublishMeta,
): Promise<{ manifest: StoredManifest; vmDirId: VmDirId }> {
  const p = c.paths;
  const info = await checkUploadedBase1(p, c.qemuImg, up.base1.file);
  if (up.base) await checkUploadedBase(p, c.qemuImg, up.base.file);

  // A stale journal must never republish an older lineage over this seed.
  await fsp.rm(p.workDir, { recursive: true, force: true });
  await step(c, 'full:work-reset');

  let vmDirId = c.vmDirId;
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
    await step(c, 'full:layout');

    if (up.base) {
      if (await lstatOrNull(p.base1)) {
        await ensureDir(p.tmpDir);
        const away = tmpName(p, 'old-base1');
        await fsp.rename(p.base1, away);
        await fsyncPath(p.snapDir);
        await fsp.rm(away, { force: true });
        await step(c, 'full:old-base1-moved');
      }
      await fsp.rename(up.base.file, p.base);
      await step(c, 'full:base-renamed');
    } else {
      const st = await lstatOrNull(p.base);
      const was = c.baseAtOpen?.identity;
      if (!st?.isFile() || !was || st.ino !== was.ino || st.size !== was.size || st.mtimeMs !== was.mtimeMs) {
        throw new OnestorError(ErrorCodes.PARENT, 'base on the replica is missing or changed since open; send base with the publish', ctx(p, { file: p.base }));
      }
    }
    await fsp.rename(up.base1.file, p.base1);
    await fsyncPath(p.snapDir);
    await fsyncPath(p.vmDir);
    await step(c, 'full:base1-renamed');

    const [bSt, b1St] = await Promise.all([fsp.lstat(p.base), fsp.lstat(p.base1)]);
    const baseSha = up.base ? up.base.sha256 : c.baseAtOpen!.sha256;
    const manifest: StoredManifest = {
      version: 1,
      vmId: p.vm,
      diskId: p.disk,
      checkpoint: meta.checkpoint,
      capturedAt: meta.capturedAt,
      publishedAt: Math.floor(Date.now() / 1000),
      consistency: meta.consistency,
      mode: 'full',
      base: { size: bSt.size, sha256: baseSha },
      base1: { size: b1St.size, sha256: up.base1.sha256, ...(info['virtual-size'] !== undefined ? { virtualSize: info['virtual-size'] } : {}) },
      sourceHost: meta.sourceHost,
      files: { base: identityOf(bSt), base1: identityOf(b1St) },
    };
    await writeManifest(p, manifest);
    await step(c, 'full:manifest');
    try {
      await setupWorkCopies(p);
    } catch (e) {
      // Not fatal: the snapshot is published; the next incremental rebuilds the spare.
      c.log?.({ vm: p.vm, disk: p.disk, err: String(e) }, 'could not prepare the A/B copies for incremental merges');
      await fsp.rm(p.workDir, { recursive: true, force: true }).catch(() => {});
    }
    return { manifest, vmDirId };
  } catch (e) {
    throw mapVanished(p, e, p.snapDir);
  }
}

// ---------------------------------------------------------------------------------------------------------
// A/B work copies, journal, incremental

const workStateSchema = z.object({
  version: z.literal(1),
  /** Name (copy.a|copy.b) of the spare: the copy that is NOT the published base.1. */
  spare: z.enum(['copy.a', 'copy.b']),
  /** Increments the spare lacks, oldest first (names inside workDir). */
  pending: z.array(z.string().regex(/^inc\.[0-9]{1,16}$/)).max(2),
  seq: z.number().int().min(0),
});
type WorkState = z.infer<typeof workStateSchema>;

const journalSchema = z.object({
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
});
type Journal = z.infer<typeof journalSchema>;

function other(copy: 'copy.a' | 'copy.b'): 'copy.a' | 'copy.b' {
  return copy === 'copy.a' ? 'copy.b' : 'copy.a';
}

async function readJsonOrNull<T>(file: string, schema: z.ZodType<T>): Promise<T | null> {
  try {
    const r = schema.safeParse(JSON.parse(await fsp.readFile(file, 'utf8')));
    return r.success ? r.data : null;
  } catch {
    return null;
  }
}

async function writeWorkJson(p: ReplicaPaths, name: string, value: object): Promise<void> {
  await writeFileAtomic(p, path.join(p.workDir, name), JSON.stringify(value) + '\n');
}

/**
 * Builds the A/B pair from the published base.1: copy.a is a hard link to it (no copy), copy.b a sparse
 * copy (the one O(size) step, paid once per seed). `disk.N.snap` in the work dir makes the relative backing
 * name of the copies resolve to the replica's real base.
 */
export async function setupWorkCopies(p: ReplicaPaths): Promise<void> {
  await fsp.rm(p.workDir, { recursive: true, force: true });
  await ensureDir(p.workDir);
  await fsp.symlink(p.snapDir, path.join(p.workDir, p.snapDirName));
  await fsp.link(p.base1, path.join(p.workDir, 'copy.a'));
  const partial = path.join(p.workDir, 'copy.b.partial');
  const r = await run('cp', ['--sparse=always', '--', p.base1, partial], { timeoutMs: 3_600_000 });
  if (r.code !== 0) {
    throw new OnestorError(/No space/i.test(r.stderr) ? ErrorCodes.NOSPACE : ErrorCodes.INTERNAL, `copy of base.1 failed: ${r.stderr.trim()}`, ctx(p));
  }
  await fsyncPath(partial);
  await fsp.rename(partial, path.join(p.workDir, 'copy.b'));
  const state: WorkState = { version: 1, spare: 'copy.b', pending: [], seq: 0 };
  await writeWorkJson(p, 'state.json', state);
}

/** The work state when it is consistent with the published base.1, else null (caller rebuilds). */
async function readWorkState(p: ReplicaPaths): Promise<WorkState | null> {
  const state = await readJsonOrNull(path.join(p.workDir, 'state.json'), workStateSchema);
  if (!state) return null;
  const [pub, spare, b1] = await Promise.all([
    lstatOrNull(path.join(p.workDir, other(state.spare))),
    lstatOrNull(path.join(p.workDir, state.spare)),
    lstatOrNull(p.base1),
  ]);
  if (!pub?.isFile() || !spare?.isFile() || !b1?.isFile()) return null;
  if (pub.ino !== b1.ino || spare.ino === b1.ino) return null;
  for (const inc of state.pending) if (!(await lstatOrNull(path.join(p.workDir, inc)))?.isFile()) return null;
  return state;
}

async function applyIncrement(p: ReplicaPaths, qemuImg: string, spare: string, inc: string): Promise<void> {
  const c = ctx(p, { file: inc });
  // The inc's stored backing name is whatever the capture used: point it at the spare without touching data.
  await qemu(qemuImg, ['rebase', '-u', '-f', 'qcow2', '-b', spare, '-F', 'qcow2', inc], c, 'qemu-img rebase -u');
  // -d keeps the inc intact: it is applied again to the other copy next cycle, and again on a redo.
  await qemu(qemuImg, ['commit', '-f', 'qcow2', '-d', inc], c, 'qemu-img commit');
}

async function checkImage(p: ReplicaPaths, qemuImg: string, file: string): Promise<void> {
  const r = await run(qemuImg, ['check', '-f', 'qcow2', file], { timeoutMs: 3_600_000 });
  // 0 = clean, 3 = leaked clusters only (wasted space, data intact); anything else is corruption or failure.
  if (r.code !== 0 && r.code !== 3) {
    throw new OnestorError(ErrorCodes.QEMU_IMG, `qemu-img check failed (exit ${r.code}): ${(r.stdout + r.stderr).trim().slice(0, 500)}`, ctx(p, { file }));
  }
}

/**
 * Carries out (or finishes) a merge journal. Idempotent: every step can be repeated after a crash.
 * Returns the new manifest, or null when the journal no longer matches the replica (it is then dropped).
 */
async function runJournal(p: ReplicaPaths, qemuImg: string, j: Journal, c?: PublishContext): Promise<StoredManifest | null> {
  const sparePath = path.join(p.workDir, j.spare);
  const [b1, spareSt] = await Promise.all([lstatOrNull(p.base1), lstatOrNull(sparePath)]);
  if (!b1?.isFile() || !spareSt?.isFile()) return null;
  if (b1.ino === j.parentBase1Ino) {
    for (const inc of j.apply) {
      await applyIncrement(p, qemuImg, sparePath, path.join(p.workDir, inc));
      if (c) await step(c, `inc:applied:${inc}`);
    }
    await checkImage(p, qemuImg, sparePath);
    await fsyncPath(sparePath);
    if (c) await step(c, 'inc:checked');
    await ensureDir(p.tmpDir);
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
 * Redo after a crash: run at open, under the disk lock. A journal that cannot be completed is dropped
 * together with the work copies (the published files are untouched by that; the spare is rebuilt later).
 */
export async function recoverJournal(p: ReplicaPaths, qemuImg: string, log?: (obj: object, msg: string) => void): Promise<'none' | 'redone' | 'dropped'> {
  const file = path.join(p.workDir, 'journal.json');
  if (!(await lstatOrNull(file))) return 'none';
  const j = await readJsonOrNull(file, journalSchema);
  try {
    if (j && (await lstatOrNull(p.vmDir))) {
      const m = await runJournal(p, qemuImg, j);
      if (m) {
        log?.({ vm: p.vm, disk: p.disk, checkpoint: m.checkpoint }, 'finished an interrupted incremental merge');
        return 'redone';
      }
    }
  } catch (e) {
    log?.({ vm: p.vm, disk: p.disk, err: String(e) }, 'interrupted merge could not be redone; dropping work copies');
  }
  await fsp.rm(p.workDir, { recursive: true, force: true });
  return 'dropped';
}

/** Space held only by our work dir (hard links, spare) goes when upstream removed the VM. */
export async function dropWorkIfVmGone(p: ReplicaPaths): Promise<void> {
  if (!(await lstatOrNull(p.vmDir))) await fsp.rm(p.workDir, { recursive: true, force: true });
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
    await checkIncrement(p, c.qemuImg, inc.file);

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

/** Valid manifests for one VM or all (for `status`). Read without locks: a racing publish just shows old or new. */
export async function listManifests(snapsDir: string, vm?: number): Promise<StoredManifest[]> {
  const root = path.resolve(snapsDir);
  const vms: number[] = [];
  if (vm !== undefined) vms.push(vm);
  else {
    let names: string[] = [];
    try {
      names = await fsp.readdir(root);
    } catch (e) {
      if (errno(e) !== 'ENOENT') throw e;
    }
    for (const n of names) if (/^(0|[1-9][0-9]{0,9})$/.test(n) && Number(n) <= 2 ** 31 - 1) vms.push(Number(n));
  }
  const out: StoredManifest[] = [];
  for (const v of vms.sort((a, b) => a - b)) {
    let names: string[] = [];
    try {
      names = await fsp.readdir(path.join(root, String(v), '.onestor'));
    } catch {
      continue;
    }
    const disks = names
      .map((n) => /^disk\.(0|[1-9][0-9]{0,9})\.json$/.exec(n))
      .filter((m): m is RegExpExecArray => !!m)
      .map((m) => Number(m[1]))
      .filter((d) => d <= 2 ** 31 - 1)
      .sort((a, b) => a - b);
    for (const d of disks) {
      const m = await readValidManifest(replicaPaths(root, v, d));
      if (m) out.push(m);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// orphan sweep

/**
 * Upstream `rm -rf SNAPS/VMID` (terminate, detach) leaves our merge spares and partial uploads behind in
 * SNAPS/.onestor/{work,tmp}: a full copy of base.1 each. Remove those whose VM dir is gone, under the
 * disk's lock (taken without waiting: a busy disk is skipped and swept another time). Bounded per call.
 * Partial uploads are kept for a day (a first seed uploads before SNAPS/VMID exists, and may resume).
 */
export async function sweepOrphans(snapsDir: string, opts: { maxDisks?: number; uploadMaxAgeMs?: number; log?: (obj: object, msg: string) => void } = {}): Promise<number> {
  const internal = path.join(path.resolve(snapsDir), '.onestor');
  const budget = { left: opts.maxDisks ?? 32 };
  let removed = 0;
  const names = async (dir: string) => (await fsp.readdir(dir).catch(() => [] as string[]));
  const candidates: Array<{ vm: number; disk: number }> = [];
  for (const vm of await names(path.join(internal, 'work'))) {
    if (!/^\d{1,10}$/.test(vm)) continue;
    for (const d of await names(path.join(internal, 'work', vm))) {
      const m = /^disk\.(\d{1,10})$/.exec(d);
      if (m) candidates.push({ vm: Number(vm), disk: Number(m[1]) });
    }
  }
  for (const t of await names(path.join(internal, 'tmp'))) {
    const m = /^(\d{1,10})-(\d{1,10})$/.exec(t);
    if (m && !candidates.some((c) => c.vm === Number(m[1]) && c.disk === Number(m[2]))) candidates.push({ vm: Number(m[1]), disk: Number(m[2]) });
  }
  for (const c of candidates) {
    if (budget.left-- <= 0) break;
    const p = replicaPaths(snapsDir, c.vm, c.disk);
    if ((await lstatOrNull(p.vmDir)) !== null) continue;
    let lock: { release(): Promise<void> | void } | null = null;
    try {
      lock = await acquireFileLock(p.lockFile, { timeoutSec: 0 });
    } catch {
      continue; // in use: a session is working on it right now
    }
    try {
      if ((await lstatOrNull(p.vmDir)) !== null) continue; // re-created meanwhile
      await fsp.rm(p.workDir, { recursive: true, force: true });
      // uploads of a first seed arrive before SNAPS/VMID exists: only old ones are abandoned
      const tmp = await lstatOrNull(p.tmpDir);
      if (tmp && Date.now() - tmp.mtimeMs > (opts.uploadMaxAgeMs ?? 24 * 3600_000)) await fsp.rm(p.tmpDir, { recursive: true, force: true });
      await fsp.rmdir(path.dirname(p.workDir)).catch(() => {});
      removed++;
      opts.log?.({ vm: c.vm, disk: c.disk }, 'removed merge spare and uploads of a VM whose replica dir is gone');
    } finally {
      await lock.release();
    }
  }
  return removed;
}

/**
 * Finishes (or drops) interrupted merges of a VM's disks before `status` answers, so a client plans from
 * what `open` would see. Only disks whose lock is free right now: a busy disk is someone's live session.
 */
export async function recoverPendingJournals(snapsDir: string, vm: number, qemuImg: string, log?: (obj: object, msg: string) => void): Promise<number> {
  const workVm = path.join(path.resolve(snapsDir), '.onestor', 'work', String(vm));
  const names = await fsp.readdir(workVm).catch(() => [] as string[]);
  let n = 0;
  for (const name of names) {
    const m = /^disk\.(0|[1-9][0-9]{0,9})$/.exec(name);
    if (!m) continue;
    const p = replicaPaths(snapsDir, vm, Number(m[1]));
    if (!(await lstatOrNull(path.join(p.workDir, 'journal.json')))) continue;
    let lock: { release(): Promise<void> } | null = null;
    try {
      lock = await acquireFileLock(p.lockFile, { timeoutSec: 0 });
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
