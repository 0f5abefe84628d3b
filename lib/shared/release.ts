/**
 * Lineage release and hand-over (issue 13 against issue 11). PURE: shared by the receiver (which decides) and
 * the host (which plans on the receiver's answer).
 *
 * A lineage belongs to the authenticated writer that published it last. Before a live migration the owner
 * (the source host) may release it to ONE named host (the destination); that host may then continue the
 * lineage with an incremental, which hands ownership over (logged and counted apart from take-overs). A
 * release holds only while:
 *   - it was made by the current owner (`from === owner`),
 *   - the lineage is the one released (`token` equals the manifest's token: any publish in between voids it),
 *   - it has not expired (`now < until`, receiver's clock),
 *   - the caller is the named recipient (recipientMatches).
 * There is no release "to anyone": a wildcard would let any host of the cluster turn its capture of a
 * lineage into a quiet hand-over instead of a logged take-over (see README, trust).
 */
import type { LineageRelease } from './manifest-schema.js';

/** The same rules as the receiver's identities (lib/replica/identity.ts), repeated here to stay pure and shared. */
const HOSTNAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$/;
const FINGERPRINT_RE = /^SHA256:[A-Za-z0-9+/]{43}$/;

/** A value a release may name as its recipient: a host name or a key fingerprint (never "(unidentified)"). */
export function isReleaseRecipient(to: unknown): to is string {
  return typeof to === 'string' && (HOSTNAME_RE.test(to) || FINGERPRINT_RE.test(to));
}

/**
 * Does the authenticated `identity` match the recipient named in a release? Host names compare ignoring case,
 * and a short name matches its fully qualified form (OpenNebula may know a host as `hv1.example` while its key
 * is bound as `hv1`); fingerprints compare exactly. The recipient is the owner's choice, never the caller's.
 */
export function recipientMatches(to: string, identity: string): boolean {
  if (!isReleaseRecipient(to) || !isReleaseRecipient(identity)) return false;
  if (FINGERPRINT_RE.test(to) || FINGERPRINT_RE.test(identity)) return to === identity;
  const a = to.toLowerCase();
  const b = identity.toLowerCase();
  if (a === b) return true;
  const [as, bs] = [a.split('.')[0]!, b.split('.')[0]!];
  // only "short vs its own FQDN": hv1 ~ hv1.example, never hv1.a ~ hv1.b
  return (as === b && !b.includes('.')) || (bs === a && !a.includes('.'));
}

interface ManifestLike {
  owner?: string | undefined;
  token?: string | undefined;
  release?: LineageRelease | undefined;
}

/** The manifest's release when it still holds at `now` (epoch seconds), else null. */
export function activeRelease(m: ManifestLike | null | undefined, now: number): LineageRelease | null {
  const r = m?.release;
  if (!r || !m) return null;
  if (m.owner === undefined || r.from !== m.owner) return null;
  if (m.token === undefined || r.token !== m.token) return null;
  if (!(now < r.until) || r.at > r.until) return null;
  return r;
}

/** May `identity` continue this lineage (owned by someone else) on the strength of a release? */
export function releaseAllows(m: ManifestLike | null | undefined, identity: string, now: number): boolean {
  const r = activeRelease(m, now);
  return r !== null && m?.owner !== identity && recipientMatches(r.to, identity);
}

/**
 * Host side (the receiver only reports releases that hold, by its own clock): the release in the replica's
 * answer names this host and still binds the lineage the answer describes. Returns the releasing owner.
 */
export function handedOverBy(f: { selfIdentity?: string | null; replicaOwner?: string | null; replicaToken?: string | null; replicaRelease?: Pick<LineageRelease, 'from' | 'to' | 'token'> | null }): string | null {
  const r = f.replicaRelease;
  if (!r || !f.selfIdentity || !f.replicaOwner || !f.replicaToken) return null;
  if (r.from !== f.replicaOwner || r.token !== f.replicaToken || f.replicaOwner === f.selfIdentity) return null;
  return recipientMatches(r.to, f.selfIdentity) ? r.from : null;
}
