/**
 * The replica manifest's ONE definition: the wire schema (lib/protocol validates replies with it) and,
 * through z.infer, the ReplicaManifest type of lib/shared/model.ts. Here, not in protocol/, because both
 * hosts and the model use it and shared/ imports nothing of the other roles.
 */
import { z } from 'zod';

export const idSchema = z.number().int().min(0).max(2 ** 31 - 1);
export const sizeSchema = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);
export const sha256Schema = z.string().regex(/^[0-9a-f]{64}$/, 'sha256 must be 64 lowercase hex digits');
/** Checkpoint names are chosen by the agent; keep them to a boring alphabet (they end up in logs and JSON). */
export const checkpointSchema = z.string().regex(/^[A-Za-z0-9._:@+-]{1,200}$/, 'checkpoint name has invalid characters');
export const shortText = (max: number) => z.string().max(max).regex(/^[^\u0000-\u001f\u007f]*$/, 'control characters are not allowed');
export const epochSchema = z.number().min(0).max(1e11);
export const consistencySchema = z.enum(['filesystem-frozen', 'crash-consistent']);

/** Not a secret (status shows it to any host): it names one publish event, which only the receiver creates. */
export const publishTokenSchema = z.string().regex(/^[0-9a-f]{32}$/, 'token must be 32 lowercase hex digits');
/** How many owner changes a manifest keeps. */
export const OWNER_HISTORY_MAX = 8;
export const ownerChangeSchema = z.object({
  at: epochSchema,
  /** null: first claim (no previous owner recorded) */
  from: shortText(255).nullable(),
  to: shortText(255),
  checkpoint: checkpointSchema.nullable(),
  /** how the owner changed: first claim, take-over by a full, or hand-over on the owner's release; absent in older manifests */
  kind: z.enum(['claim', 'takeover', 'handover']).optional(),
});
export type OwnerChange = z.infer<typeof ownerChangeSchema>;

/** A release lasts at most this long (seconds) after the receiver recorded it. */
export const RELEASE_MAX_TTL_SEC = 86_400;
/**
 * The owner's release of a lineage to one named host (issue 13: live migration). Recorded by the receiver only
 * (from the authenticated owner's `release` request); it holds while the lineage is unchanged (`token` is the
 * token of the publish it releases, so any later publish voids it) and until `until` (receiver's clock).
 */
export const lineageReleaseSchema = z.object({
  /** the owner that released (authenticated) */
  from: shortText(255),
  /** the only identity that may continue the lineage with an incremental */
  to: shortText(255),
  at: epochSchema,
  until: epochSchema,
  token: publishTokenSchema,
  checkpoint: checkpointSchema.nullable(),
});
export type LineageRelease = z.infer<typeof lineageReleaseSchema>;

/** What the replica holds for one disk (the receiver's manifest, beside disk.N.snap/). */
export const replicaManifestSchema = z.object({
  version: z.literal(1),
  vmId: idSchema,
  diskId: idSchema,
  /** libvirt checkpoint name base.1 corresponds to (null when unknown) */
  checkpoint: checkpointSchema.nullable(),
  /** epoch seconds the published base.1 was captured (point in time) */
  capturedAt: epochSchema,
  publishedAt: epochSchema,
  consistency: consistencySchema,
  mode: z.enum(['full', 'incremental']),
  base: z.object({ size: sizeSchema, sha256: sha256Schema }),
  base1: z.object({ size: sizeSchema, sha256: sha256Schema.optional(), virtualSize: sizeSchema.optional() }),
  /** host that published it (for lineage after migration); since ownership, the authenticated writer */
  sourceHost: shortText(255).optional(),
  // Ownership and tamper evidence. Optional so manifests written before them stay readable and older agents
  // (which strip unknown keys) keep working. All three are set by the receiver only.
  /** the authenticated writer of the last publish (host name, key fingerprint or "(unidentified)") */
  owner: shortText(255).optional(),
  /** random value the receiver chose for the last publish; the publishing host keeps it to detect tampering */
  token: publishTokenSchema.optional(),
  /** the last owner changes (first claim and take-overs), oldest first */
  history: z.array(ownerChangeSchema).max(OWNER_HISTORY_MAX).optional(),
  /** the owner's release of this lineage to another host (live migration); only while it holds */
  release: lineageReleaseSchema.optional(),
});
