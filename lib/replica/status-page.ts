/**
 * `status` in pages: every reply must fit one control frame (64 KiB) while a replica may hold far more
 * manifests than that (~130 per page). Pages follow the (vm, disk) order; the cursor is the last position
 * looked at, so each page costs one listing of SNAPS plus what it returns (invalid manifests are skipped
 * once, never re-read by the next page).
 */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import { MAX_CONTROL_BYTES, type StatusCursor } from '../protocol/protocol.js';
import type { ReplicaManifest } from '../shared/model.js';
import { errno, replicaPaths } from './layout.js';
import { readValidManifest, toWireManifest, type StoredManifest } from './manifest.js';

const ID = /^(0|[1-9][0-9]{0,9})$/;
const MAX_ID = 2 ** 31 - 1;
/** Room left for the envelope: {"type":"ok","manifests":[...],"next":{"vm":2147483647,"disk":2147483647}} */
const ENVELOPE_BYTES = 128;

export interface StatusPage {
  manifests: ReplicaManifest[];
  /** Where the next page starts (after this position); null when this was the last page. */
  next: StatusCursor | null;
}

async function ids(dir: string, re: RegExp): Promise<number[]> {
  let names: string[];
  try {
    names = await fsp.readdir(dir);
  } catch (e) {
    if (errno(e) === 'ENOENT' || errno(e) === 'ENOTDIR') return [];
    throw e;
  }
  const out: number[] = [];
  for (const n of names) {
    const m = re.exec(n);
    if (m && ID.test(m[1]!) && Number(m[1]) <= MAX_ID) out.push(Number(m[1]));
  }
  return out.sort((a, b) => a - b);
}

/**
 * One page of valid manifests (one VM or all) after `after`, at most `maxBytes` of JSON. `include`
 * filters (e.g. by owner) without breaking the cursor.
 */
export async function statusPage(
  snapsDir: string,
  q: { vm?: number; after: StatusCursor | null; maxBytes?: number; include?: (m: StoredManifest) => boolean },
): Promise<StatusPage> {
  const root = path.resolve(snapsDir);
  const budget = (q.maxBytes ?? MAX_CONTROL_BYTES) - ENVELOPE_BYTES;
  let vms = q.vm !== undefined ? [q.vm] : await ids(root, /^(.+)$/);
  if (q.after) vms = vms.filter((v) => v >= q.after!.vm);
  const manifests: ReplicaManifest[] = [];
  let used = 0;
  let last: StatusCursor | null = q.after;
  for (const vm of vms) {
    let disks = await ids(path.join(root, String(vm), '.onestor'), /^disk\.(.+)\.json$/);
    if (q.after && vm === q.after.vm) disks = disks.filter((d) => d > q.after!.disk);
    for (const disk of disks) {
      const m = await readValidManifest(replicaPaths(root, vm, disk));
      if (m && (!q.include || q.include(m))) {
        const wire = toWireManifest(m);
        const bytes = Buffer.byteLength(JSON.stringify(wire)) + 1;
        if (bytes > budget) {
          throw new OnestorError(ErrorCodes.INTERNAL, `manifest of vm ${vm} disk ${disk} alone is ${bytes} bytes, more than a reply holds`, { vm, disk });
        }
        if (used + bytes > budget) return { manifests, next: last! }; // used > 0, so last is set
        used += bytes;
        manifests.push(wire);
      }
      last = { vm, disk };
    }
  }
  return { manifests, next: null };
}
