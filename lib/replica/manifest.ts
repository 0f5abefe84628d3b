/**
 * The manifest beside disk.N.snap/ (SNAPS/VMID/.onestor/disk.N.json): what is published, with the file
 * identities that make it trustworthy. A manifest whose identities no longer match the files is ignored.
 */
import { createHash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { z } from 'zod';
import type { ReplicaManifest } from '../shared/model.js';
import { replicaManifestSchema, sizeSchema } from '../protocol/protocol.js';
import { O_NOFOLLOW, errno, lstatOrNull, mapVanished, mkdirIn, replicaPaths, type ReplicaPaths } from './layout.js';
import { readFileNoFollow, writeFileAtomic } from './durable.js';
import { activeRelease } from '../shared/release.js';

/** Identity used to notice that a file was replaced or changed behind our back. */
export interface FileIdentity {
  ino: number;
  size: number;
  mtimeMs: number;
}

export function identityOf(st: { ino: number; size: number; mtimeMs: number }): FileIdentity {
  return { ino: st.ino, size: st.size, mtimeMs: st.mtimeMs };
}

export const identitySchema = z.object({ ino: z.number().int().min(0), size: sizeSchema, mtimeMs: z.number().min(0) });

/** The manifest as stored: the wire manifest plus the identities that make it trustworthy. */
export const storedManifestSchema = replicaManifestSchema.extend({
  files: z.object({ base: identitySchema, base1: identitySchema }),
});
export type StoredManifest = z.infer<typeof storedManifestSchema>;

/**
 * What hosts are told: the stored manifest less the file identities, and less a release that no longer holds
 * (expired by this receiver's clock, or voided by a later publish): a host then never plans on a hand-over
 * the receiver would refuse, whatever its own clock says.
 */
export function toWireManifest(m: StoredManifest, now: number = Math.floor(Date.now() / 1000)): ReplicaManifest {
  const wire = replicaManifestSchema.parse(m);
  if (wire.release && !activeRelease(wire, now)) delete wire.release;
  return wire;
}


/** The manifest when base and base.1 are still the files it describes; null when lineage is lost. */
export async function readValidManifest(p: ReplicaPaths): Promise<StoredManifest | null> {
  let text: string;
  try {
    const st = await fsp.lstat(p.manifest);
    if (!st.isFile()) return null;
    text = await readFileNoFollow(p.manifest);
  } catch (e) {
    if (errno(e) === 'ENOENT' || errno(e) === 'ENOTDIR' || errno(e) === 'ELOOP') return null;
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
  const fh = await fsp.open(file, fsConstants.O_RDONLY | O_NOFOLLOW);
  try {
    const stream = fh.createReadStream({ autoClose: false, highWaterMark: 4 * 1024 * 1024, ...(length !== undefined ? { start: 0, end: length - 1 } : {}) });
    for await (const chunk of stream) hash.update(chunk as Buffer);
  } finally {
    await fh.close();
  }
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


/** Writes the manifest into SNAPS/VMID/.onestor; a vanished VM dir is E_VANISHED, never recreated here. */
export async function writeManifest(p: ReplicaPaths, m: StoredManifest): Promise<void> {
  try {
    await mkdirIn(p, p.metaDir);
    await writeFileAtomic(p, p.manifest, JSON.stringify(m, null, 1) + '\n');
  } catch (e) {
    throw mapVanished(p, e, p.manifest);
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

