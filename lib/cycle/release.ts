/**
 * The host side of a lineage release (issue 13): when this host yields a VM to a live migration, it releases
 * the lineage of each of the VM's disks it owns on the replica to the destination host, so that host may go
 * on with an incremental (a hand-over) instead of a full (a take-over). Best effort: a failure only costs the
 * destination a full, and never delays the migration itself (callers release after giving way).
 */
import type { Logger } from 'pino';
import { describeError, errorCodeOf, ErrorCodes } from '../shared/errors.js';
import { RELEASE_MAX_TTL_SEC } from '../shared/manifest-schema.js';
import type { ReplicaPort } from './ports.js';

/** How long a release holds by default: a day covers any migration, and it is voided by any later publish anyway. */
export const DEFAULT_RELEASE_TTL_SEC = RELEASE_MAX_TTL_SEC;

export interface ReleaseOutcome {
  diskId: number;
  released: boolean;
  /** what happened, one line */
  note: string;
}

export async function releaseVmDisks(opts: {
  vmId: number;
  disks: ReadonlyArray<{ diskId: number; replicaHost: string }>;
  to: string;
  ttlSec?: number;
  replicaFor(host: string): Promise<ReplicaPort>;
  log: Pick<Logger, 'info' | 'warn'>;
}): Promise<ReleaseOutcome[]> {
  const out: ReleaseOutcome[] = [];
  for (const d of opts.disks) {
    const r = await releaseOne(opts, d).catch((e: unknown) => ({ diskId: d.diskId, released: false, note: errorCodeOf(e) === ErrorCodes.PROTOCOL ? `the replica does not take releases (older receiver?): ${describeError(e)}` : describeError(e) }));
    if (r.released) opts.log.info({ vm: opts.vmId, disk: d.diskId, to: opts.to }, r.note);
    else opts.log.warn({ vm: opts.vmId, disk: d.diskId, to: opts.to, why: r.note }, 'lineage not released: the destination will take a full');
    out.push(r);
  }
  return out;
}

async function releaseOne(opts: { vmId: number; to: string; ttlSec?: number; replicaFor(host: string): Promise<ReplicaPort> }, d: { diskId: number; replicaHost: string }): Promise<ReleaseOutcome> {
  const replica = await opts.replicaFor(d.replicaHost);
  if (!replica.writer) return { diskId: d.diskId, released: false, note: 'the replica predates ownership (no identity in its hello)' };
  const session = await replica.openDisk(opts.vmId, d.diskId);
  try {
    const m = session.manifest;
    if (!m) return { diskId: d.diskId, released: false, note: 'the replica holds no lineage of this disk' };
    if (m.owner !== replica.writer) return { diskId: d.diskId, released: false, note: `the lineage belongs to ${m.owner ?? 'nobody recorded'}, not to this host (${replica.writer})` };
    if (!session.release) return { diskId: d.diskId, released: false, note: 'this replica port cannot release' };
    const rel = await session.release(opts.to, opts.ttlSec ?? DEFAULT_RELEASE_TTL_SEC);
    return { diskId: d.diskId, released: true, note: `lineage released to ${rel.to} until ${new Date(rel.until * 1000).toISOString()}` };
  } finally {
    await session.close().catch(() => {});
  }
}
