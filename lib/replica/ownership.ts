/**
 * Ownership of a disk's lineage and tamper evidence (DESIGN §6, issue 11).
 *
 * - A lineage belongs to the writer that published it last (`owner` in the manifest, the authenticated
 *   identity, never the client's word). Only the owner may publish an incremental on it (else E_OWNER);
 *   anyone authorized may publish a full, which is how a migration or a recovery moves a lineage: that
 *   take-over is logged at warning with both names, appended to the ledger (counted by the replica probe)
 *   and kept in the manifest's bounded `history`.
 * - Every publish gets a fresh random `token`, chosen here and returned in the publish reply. The publishing
 *   host keeps it and, before its next incremental, checks the replica still holds that token: a publish by
 *   anyone else in between (even under the same checkpoint name) changes it.
 * - Issue 13 (live migration): the owner may release the lineage to one named host (`release`, recorded in
 *   the manifest under the disk lock, lib/shared/release.ts). While that release holds, the recipient may
 *   continue with an INCREMENTAL (or a full): ownership passes to it as a hand-over, logged and counted apart
 *   from take-overs; the released-from host is then no longer owner and its incrementals are refused.
 * A manifest written before ownership existed has no owner: nobody may build an incremental on it (its
 * writer is unknown: `sourceHost` was the client's claim); the next full claims it.
 */
import { randomBytes } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import { LEDGER_DIR, HANDOVERS_FILE, TAKEOVERS_FILE, TAKEOVERS_ROTATE_BYTES, WRITERS_DIR, type TakeoverEvent, type WriterRecord } from '../shared/ledger.js';
import { OWNER_HISTORY_MAX, RELEASE_MAX_TTL_SEC, type LineageRelease, type OwnerChange } from '../protocol/protocol.js';
import { isReleaseRecipient, recipientMatches, releaseAllows } from '../shared/release.js';
import { identityKind, identityTag } from './identity.js';
import { ctx, type ReplicaPaths } from './layout.js';

/** What the receiver adds to every manifest it writes. */
export interface OwnershipFields {
  owner: string;
  token: string;
  history: OwnerChange[];
}

export function newPublishToken(): string {
  return randomBytes(16).toString('hex');
}

/** Pure: appends a change and keeps the newest OWNER_HISTORY_MAX. */
export function appendHistory(history: readonly OwnerChange[] | undefined, change: OwnerChange, max = OWNER_HISTORY_MAX): OwnerChange[] {
  return [...(history ?? []), change].slice(-max);
}

type PrevManifest = { owner?: string; token?: string; history?: OwnerChange[]; release?: LineageRelease; checkpoint?: string | null } | null;

/**
 * Pure: the ownership fields of a new publish by `identity` over `prev` (the valid manifest before it, or null),
 * and the owner change it amounts to: a take-over (another owner, no release for us), a hand-over (the owner
 * released the lineage to us and the release holds at `now`), or none (same owner, or no previous owner).
 */
export function ownershipForPublish(
  prev: PrevManifest,
  identity: string,
  checkpoint: string | null,
  now: number,
  token: string = newPublishToken(),
): { fields: OwnershipFields; takeover: { from: string; to: string } | null; handover: { from: string; to: string } | null } {
  const previousOwner = prev?.owner ?? null;
  if (previousOwner === identity) return { fields: { owner: identity, token, history: [...(prev?.history ?? [])] }, takeover: null, handover: null };
  const handedOver = previousOwner !== null && releaseAllows(prev, identity, now);
  const kind = previousOwner === null ? 'claim' : handedOver ? 'handover' : 'takeover';
  const history = appendHistory(prev?.history, { at: now, from: previousOwner, to: identity, checkpoint, kind });
  const change = previousOwner === null ? null : { from: previousOwner, to: identity };
  return { fields: { owner: identity, token, history }, takeover: handedOver ? null : change, handover: handedOver ? change : null };
}

/**
 * An incremental only by the lineage's owner, or by the recipient of the owner's release while it holds.
 * `manifest` null is left to the parent check (E_PARENT).
 */
export function assertMayIncrement(manifest: PrevManifest, identity: string, p: ReplicaPaths, now: number = Math.floor(Date.now() / 1000)): void {
  if (!manifest) return;
  if (manifest.owner === undefined) {
    throw new OnestorError(ErrorCodes.OWNER, 'the lineage on the replica has no recorded owner (written before ownership was tracked); a full publish claims it', ctx(p));
  }
  if (manifest.owner !== identity && !releaseAllows(manifest, identity, now)) {
    const r = manifest.release;
    const why = !r ? '' : recipientMatches(r.to, identity) ? ' (its release to this host no longer holds: expired or the lineage changed since)' : ` (released to ${r.to}, not to this host)`;
    throw new OnestorError(
      ErrorCodes.OWNER,
      `the lineage on the replica belongs to ${manifest.owner}, this session is ${identity}${why}: only a full publish may take it over`,
      ctx(p),
    );
  }
}

/**
 * Pure: the release `identity` asks for on `prev` (the valid manifest, under the disk lock), or E_RELEASE:
 * only the current owner may release, only a lineage that exists, only to another named host, for at most
 * RELEASE_MAX_TTL_SEC. A new release replaces an earlier one (one recipient at a time).
 */
export function makeRelease(prev: PrevManifest, identity: string, to: string, ttlSec: number, now: number, p: ReplicaPaths): LineageRelease {
  if (!prev) throw new OnestorError(ErrorCodes.RELEASE, 'there is no lineage of this disk on the replica to release', ctx(p));
  if (identityKind(identity) === 'unidentified') {
    throw new OnestorError(ErrorCodes.RELEASE, 'an unidentified writer cannot release a lineage (every unidentified key is the same writer): bind the host with receive --host NAME', ctx(p));
  }
  if (prev.owner === undefined || prev.owner !== identity) {
    throw new OnestorError(ErrorCodes.RELEASE, `only the lineage's owner may release it: it belongs to ${prev.owner ?? 'nobody recorded'}, this session is ${identity}`, ctx(p));
  }
  if (!prev.token) throw new OnestorError(ErrorCodes.RELEASE, 'the lineage has no publish token to bind a release to; the next publish sets one', ctx(p));
  if (!isReleaseRecipient(to)) throw new OnestorError(ErrorCodes.RELEASE, `the recipient ${JSON.stringify(String(to).slice(0, 80))} is not a host name or key fingerprint`, { ...ctx(p), field: 'to' });
  if (recipientMatches(to, identity)) throw new OnestorError(ErrorCodes.RELEASE, `a release names another host; ${to} is this session (${identity})`, { ...ctx(p), field: 'to' });
  if (!Number.isInteger(ttlSec) || ttlSec < 1 || ttlSec > RELEASE_MAX_TTL_SEC) {
    throw new OnestorError(ErrorCodes.RELEASE, `a release lasts 1..${RELEASE_MAX_TTL_SEC} s, asked ${ttlSec}`, { ...ctx(p), field: 'ttlSec' });
  }
  return { from: identity, to, at: now, until: now + ttlSec, token: prev.token, checkpoint: prev.checkpoint ?? null };
}

/** Upload temp names are per writer: one host can never resume (or poison) another host's partial upload. */
export function uploadKeyFor(identity: string, key: string): string {
  return `${identityTag(identity)}.${key}`;
}

function ledgerDir(snapsDir: string): string {
  return path.join(path.resolve(snapsDir), LEDGER_DIR);
}

/**
 * Appends one take-over to the ledger (O_APPEND: one small write per event, safe across receiver processes).
 * Past the size cap the file moves to .1 first (the older .1 goes); a racing appender then writes into .1,
 * which is still counted.
 */
export async function appendTakeover(snapsDir: string, e: TakeoverEvent, kind: 'takeover' | 'handover' = 'takeover'): Promise<void> {
  const dir = ledgerDir(snapsDir);
  await fsp.mkdir(dir, { recursive: true });
  const file = path.join(dir, kind === 'handover' ? HANDOVERS_FILE : TAKEOVERS_FILE);
  const st = await fsp.stat(file).catch(() => null);
  if (st && st.size > TAKEOVERS_ROTATE_BYTES) await fsp.rename(file, `${file}.1`).catch(() => {});
  const fh = await fsp.open(file, 'a', 0o644);
  try {
    await fh.write(JSON.stringify(e) + '\n');
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Records the writer's last publish (one file per writer, replaced atomically; the probe lists them). */
export async function recordWriter(snapsDir: string, r: Omit<WriterRecord, 'auth'>): Promise<void> {
  const dir = path.join(ledgerDir(snapsDir), WRITERS_DIR);
  await fsp.mkdir(dir, { recursive: true });
  const rec: WriterRecord = { ...r, auth: identityKind(r.identity) };
  const file = path.join(dir, `${identityTag(r.identity)}.json`);
  const tmp = `${file}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  await fsp.writeFile(tmp, JSON.stringify(rec) + '\n', { mode: 0o644 });
  try {
    await fsp.rename(tmp, file);
  } catch (e) {
    await fsp.rm(tmp, { force: true });
    throw e;
  }
}
