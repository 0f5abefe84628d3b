/**
 * sha256 of local files, cached by identity (dev:ino:size:mtime) so a multi-GiB base image is read
 * once, not every cycle.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { ErrorCodes, OnestorError } from '../shared/errors.js';

export async function fileIdentity(file: string): Promise<{ identity: string; size: number; devIno: string }> {
  const st = await stat(file, { bigint: true });
  return { identity: `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}`, size: Number(st.size), devIno: `${st.dev}:${st.ino}` };
}

export async function sha256File(file: string, signal?: AbortSignal): Promise<string> {
  const h = createHash('sha256');
  const rs = createReadStream(file, { highWaterMark: 4 * 1024 * 1024 });
  for await (const chunk of rs) {
    if (signal?.aborted) {
      rs.destroy();
      throw new OnestorError(ErrorCodes.ABORTED, `hashing ${file} aborted`, { file });
    }
    h.update(chunk as Buffer);
  }
  return h.digest('hex');
}

export interface DigestCacheEntry {
  sha256: string;
  size: number;
  identity: string;
}

/** Digest from cache when the file is provably unchanged, else computed (and returned for caching). */
export async function cachedSha256(file: string, cache: DigestCacheEntry | undefined, signal?: AbortSignal): Promise<DigestCacheEntry & { fromCache: boolean }> {
  const id = await fileIdentity(file);
  if (cache && cache.identity === id.identity) return { ...cache, fromCache: true };
  const sha256 = await sha256File(file, signal);
  const after = await fileIdentity(file);
  // a file that changed while we read it has no trustworthy digest
  if (after.identity !== id.identity) throw new OnestorError(ErrorCodes.CHANGED, 'changed while hashing', { file });
  return { sha256, size: id.size, identity: id.identity, fromCache: false };
}
