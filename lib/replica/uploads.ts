/** Resumable uploads: partial files under SNAPS/.onestor/tmp/VMID-N/, keyed by what the client sends. */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import { ctx, ensureDir, lstatOrNull, type ReplicaPaths } from './layout.js';

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

