/** Resumable uploads: partial files under SNAPS/.onestor/tmp/VMID-N/, keyed by what the client sends. */
import { constants as fsConstants } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import type { QemuInfo } from './image-check.js';
import { O_NOFOLLOW, checkedTmpDir, ctx, ensureTmpDir, lstatOrNull, type ReplicaPaths } from './layout.js';

/**
 * Partial uploads of other keys kept per disk besides the one being written and those verified in this
 * session: enough for a full (base + base.1) cut and resumed, while keys of abandoned captures (the client
 * names keys after the checkpoint, so a new capture never resumes them) cannot pile up.
 */
export const MAX_OTHER_UPLOADS = 2;
/** Partial uploads untouched for this long are abandoned whatever their key. */
export const UPLOAD_MAX_AGE_MS = 24 * 3600_000;

export function uploadPath(p: ReplicaPaths, key: string): string {
  // The prefix keeps keys like "." or ".." from naming anything but a plain file.
  return path.join(p.tmpDir, `up.${key}`);
}

/**
 * Bytes already held for a resumable upload; a file longer than announced is restarted from 0. Other
 * partial uploads of this disk beyond MAX_OTHER_UPLOADS (oldest first) are removed: `keep` names the files
 * this session still needs.
 */
export async function prepareUpload(p: ReplicaPaths, key: string, size: number, keep: ReadonlySet<string> = new Set()): Promise<{ file: string; offset: number }> {
  await ensureTmpDir(p);
  const file = uploadPath(p, key);
  await boundUploads(p, new Set([...keep, file]), MAX_OTHER_UPLOADS);
  let st = await lstatOrNull(file);
  if (st && !st.isFile()) throw new OnestorError(ErrorCodes.PATH, `refusing ${file}: not a regular file`, ctx(p, { file }));
  if (st && st.nlink > 1) {
    // Linked elsewhere: staged or already published by a journal that did not finish its bookkeeping.
    // Never written again; the upload starts over in a new inode.
    await fsp.rm(file, { force: true });
    st = null;
  }
  if (!st) return { file, offset: 0 };
  if (st.size > size) {
    const fh = await openUpload(file, 0);
    await fh.close();
    return { file, offset: 0 };
  }
  return { file, offset: st.size };
}

/**
 * File offsets, lengths and buffer addresses of direct writes are multiples of this: the largest logical
 * block size of the disks a replica sits on (512 or 4096 bytes).
 */
export const DIRECT_ALIGN = 4096;

/**
 * A second handle on the same open upload with O_DIRECT, through /proc/self/fd (the very inode `fh` has
 * open, whatever the path names now), or null where the filesystem or the system does not offer it
 * (tmpfs before Linux 6.6, no /proc): the upload is then written through the page cache alone.
 */
export async function openDirect(fh: fsp.FileHandle): Promise<fsp.FileHandle | null> {
  const O_DIRECT = fsConstants.O_DIRECT;
  if (!O_DIRECT) return null;
  let direct: fsp.FileHandle;
  try {
    direct = await fsp.open(`/proc/self/fd/${fh.fd}`, fsConstants.O_WRONLY | O_DIRECT);
  } catch {
    return null;
  }
  const [a, b] = await Promise.all([fh.stat(), direct.stat()]).catch(() => [null, null]);
  if (!a || !b || a.dev !== b.dev || a.ino !== b.ino) {
    await direct.close().catch(() => {});
    return null;
  }
  return direct;
}

/**
 * `count` buffers of `size` bytes (a multiple of DIRECT_ALIGN), page-aligned as O_DIRECT needs (a Buffer's
 * address is whatever malloc gave): a WebAssembly memory's backing store is allocated in whole pages.
 */
export function pageAlignedBuffers(count: number, size: number): Buffer[] {
  // (the ES2022 lib this project compiles against declares no WebAssembly value)
  const { Memory } = (globalThis as unknown as { WebAssembly: { Memory: new (d: { initial: number; maximum: number }) => { buffer: ArrayBuffer } } }).WebAssembly;
  const pages = Math.ceil((count * size) / 65536);
  const memory = new Memory({ initial: pages, maximum: pages });
  return Array.from({ length: count }, (_, i) => Buffer.from(memory.buffer, i * size, size));
}

/** Opens an upload temp for writing without following a symlink; offset 0 truncates. */
export async function openUpload(file: string, offset: number): Promise<fsp.FileHandle> {
  const flags = fsConstants.O_RDWR | fsConstants.O_CREAT | O_NOFOLLOW | (offset === 0 ? fsConstants.O_TRUNC : 0);
  return fsp.open(file, flags, 0o600);
}

async function uploadEntries(p: ReplicaPaths): Promise<Array<{ file: string; mtimeMs: number }>> {
  const dir = await checkedTmpDir(p);
  if (!dir) return [];
  const out: Array<{ file: string; mtimeMs: number }> = [];
  for (const n of await fsp.readdir(dir)) {
    if (!n.startsWith('up.')) continue;
    const st = await lstatOrNull(path.join(dir, n));
    // linked elsewhere (published): not a partial upload, never resumed; sorts as oldest
    if (st) out.push({ file: path.join(dir, n), mtimeMs: st.nlink > 1 ? 0 : st.mtimeMs });
  }
  return out;
}

/** Keeps at most `max` partial uploads outside `keep` (newest first); drops any older than UPLOAD_MAX_AGE_MS. */
export async function boundUploads(p: ReplicaPaths, keep: ReadonlySet<string>, max: number, now = Date.now()): Promise<number> {
  const others = (await uploadEntries(p)).filter((u) => !keep.has(u.file)).sort((a, b) => b.mtimeMs - a.mtimeMs);
  let removed = 0;
  for (const [i, u] of others.entries()) {
    if (i >= max || now - u.mtimeMs > UPLOAD_MAX_AGE_MS) {
      await fsp.rm(u.file, { recursive: true, force: true });
      removed++;
    }
  }
  return removed;
}

/** After a publish, leftovers of abandoned uploads for this disk only hold space. */
export async function dropStaleUploads(p: ReplicaPaths, keep: ReadonlySet<string>): Promise<void> {
  await boundUploads(p, keep, 0);
}

export interface UploadedFile {
  file: string;
  size: number;
  /** when it came with sha256 (always for base; base.1 and increments may use xxh64) */
  sha256?: string;
  /**
   * qemu-img's verdict on the file, started as soon as its bytes were verified (image-check.ts
   * checkUploadedImage): it runs while the next upload streams, and publish only awaits it.
   */
  verdict: Promise<QemuInfo | null>;
}
