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
 * A manifest written before ownership existed has no owner: nobody may build an incremental on it (its
 * writer is unknown: `sourceHost` was the client's claim); the next full claims it.
 */
import { randomBytes } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import { LEDGER_DIR, TAKEOVERS_FILE, TAKEOVERS_ROTATE_BYTES, WRITERS_DIR, type TakeoverEvent, type WriterRecord } from '../shared/ledger.js';
import { OWNER_HISTORY_MAX, type OwnerChange } from '../protocol/protocol.js';
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

/**
 * Pure: the ownership fields of a new publish by `identity` over `prev` (the valid manifest before it, or null),
 * and the take-over it amounts to (null when the owner does not change or there was no previous owner).
 */
export function ownershipForPublish(
  prev: { owner?: string; history?: OwnerChange[] } | null,
  identity: string,
  checkpoint: string | null,
  now: number,
  token: string = newPublishToken(),
): { fields: OwnershipFields; takeover: { from: string; to: string } | null } {
  const previousOwner = prev?.owner ?? null;
  if (previousOwner === identity) return { fields: { owner: identity, token, history: [...(prev?.history ?? [])] }, takeover: null };
  const history = appendHistory(prev?.history, { at: now, from: previousOwner, to: identity, checkpoint });
  return { fields: { owner: identity, token, history }, takeover: previousOwner === null ? null : { from: previousOwner, to: identity } };
}

/** An incremental only by the lineage's owner. `manifest` null is left to the parent check (E_PARENT). */
export function assertMayIncrement(manifest: { owner?: string } | null, identity: string, p: ReplicaPaths): void {
  if (!manifest) return;
  if (manifest.owner === undefined) {
    throw new OnestorError(ErrorCodes.OWNER, 'the lineage on the replica has no recorded owner (written before ownership was tracked); a full publish claims it', ctx(p));
  }
  if (manifest.owner !== identity) {
    throw new OnestorError(
      ErrorCodes.OWNER,
      `the lineage on the replica belongs to ${manifest.owner}, this session is ${identity}: only a full publish may take it over`,
      ctx(p),
    );
  }
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
export async function appendTakeover(snapsDir: string, e: TakeoverEvent): Promise<void> {
  const dir = ledgerDir(snapsDir);
  await fsp.mkdir(dir, { recursive: true });
  const file = path.join(dir, TAKEOVERS_FILE);
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
