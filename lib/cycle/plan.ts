/**
 * Pure planning: full or incremental, and which checkpoints may go. No I/O: callers gather the facts
 * (agent state, replica manifest, libvirt checkpoints, base.1 identity) and act on the answer.
 */
import { isOurCheckpoint } from '../libvirt/backup-xml.js';
import type { CycleMode } from '../shared/model.js';
import { UNIDENTIFIED_WRITER } from '../shared/ledger.js';
import { handedOverBy } from '../shared/release.js';

export interface ModeFacts {
  forceFull: boolean;
  /** checkpoint the agent's state says the replica confirmed */
  stateCheckpoint: string | null;
  /** checkpoint the replica's manifest says base.1 corresponds to (null: no manifest / lineage lost) */
  replicaCheckpoint: string | null;
  /** checkpoints libvirt currently knows for the domain */
  libvirtCheckpoints: readonly string[];
  /** stateCheckpoint's bitmap for this disk is present and consistent (null: unknown / not checked) */
  bitmapHealthy: boolean | null;
  /** identity (dev:ino) of the host's base.1 when stateCheckpoint was taken, and now */
  base1IdentityThen: string | null;
  base1IdentityNow: string;
  /** the replica's base equals the host's base (sizes + digest) */
  replicaBaseMatches: boolean;
  // Ownership and tamper evidence (issue 11). Optional: without selfIdentity the receiver predates
  // ownership and the checks below cannot be made (the earlier rules still hold).
  /** this host as the replica authenticated it (hello reply); null/undefined: receiver without ownership */
  selfIdentity?: string | null;
  /** manifest owner: the authenticated writer of the replica's last publish (null: not recorded) */
  replicaOwner?: string | null;
  /** token the receiver chose for its last publish of this disk */
  replicaToken?: string | null;
  /** token this host got back from its own last confirmed publish of this disk (agent state) */
  stateToken?: string | null;
  /**
   * the owner's release of the lineage as the replica reports it (only while it holds, by the replica's
   * clock): naming this host, it lets this host continue another owner's lineage (live migration hand-over)
   */
  replicaRelease?: { from: string; to: string; token: string } | null;
  /** a checkpoint this host published without getting the reply (link died) */
  uncertainCheckpoint?: string | null;
  /**
   * the replica's lineage was last published by another host (the VM came here by migration): a base.1
   * that is not the file we checkpointed is then expected, and the bitmap check decides
   */
  lineageFromAnotherHost?: boolean;
}

/** Why a full was forced by the lineage's owner or token (recorded as an alert in state and probe). */
export type LineageAlert = 'foreign-owner' | 'unowned' | 'token-mismatch';

export type ModeDecision =
  | { mode: 'incremental'; parent: string; reason: string }
  | { mode: 'full'; reason: string; /** set when someone else's publish (or an unowned lineage) forced it */ alert?: LineageAlert };

const short = (t: string | null | undefined): string => (t ? t.slice(0, 8) : 'none');

/**
 * Pure: may this host build on the replica's lineage? null = yes; else the full it must take, and why.
 * The owner check keeps a host off a lineage someone else published last; the token check catches a publish
 * in between that the owner check cannot tell apart (same identity: unidentified keys, or a copied key).
 * An old state without a token (agent upgraded) is accepted once when the replica says the lineage is ours
 * and holds the checkpoint our state names: a foreign publish would have changed the owner (its name is
 * authenticated), so the only writer that can match is this host. Likewise a publish of ours that state never
 * recorded (reply lost, agent killed). With unidentified keys that argument fails, so they take a full.
 */
export function lineageCheck(f: ModeFacts): Extract<ModeDecision, { mode: 'full' }> | null {
  const self = f.selfIdentity;
  if (!self) return null;
  if (!f.replicaOwner) {
    return { mode: 'full', alert: 'unowned', reason: 'replica lineage has no recorded owner (written before ownership was tracked); a full claims it' };
  }
  // The owner released this lineage to us (live migration): our incremental hands it over. The release is
  // bound to the token the replica holds, so nobody published in between; the bitmap check (decideMode) then
  // proves the disk we run on continues what the replica holds.
  if (f.replicaOwner !== self && handedOverBy(f) !== null) return null;
  if (f.replicaOwner !== self) {
    const token = f.replicaToken !== (f.stateToken ?? null) ? `; token mismatch (replica ${short(f.replicaToken)}, ours ${short(f.stateToken)})` : '';
    return { mode: 'full', alert: 'foreign-owner', reason: `replica lineage was last published by ${f.replicaOwner}, not by this host (${self})${token}; never building on it` };
  }
  if (f.stateToken && f.replicaToken === f.stateToken) return null;
  const identified = self !== UNIDENTIFIED_WRITER;
  // Our own publish that state never recorded: the reply was lost (uncertainCheckpoint), or the agent died
  // between the publish and the state write (the replica names a newer checkpoint of ours that libvirt has).
  // A republish under our *current* checkpoint name, the reproduced attack, matches neither; our checkpoint
  // names carry a time and a random suffix (a foreign one, e.g. an OpenNebula backup's, could be guessed).
  if (identified && f.replicaCheckpoint !== null && f.replicaCheckpoint !== f.stateCheckpoint && isOurCheckpoint(f.replicaCheckpoint)) {
    if (f.replicaCheckpoint === f.uncertainCheckpoint || f.libvirtCheckpoints.includes(f.replicaCheckpoint)) return null;
  }
  if (identified && !f.stateToken && f.stateCheckpoint !== null && f.replicaCheckpoint === f.stateCheckpoint) return null; // state predates tokens
  return {
    mode: 'full',
    alert: 'token-mismatch',
    reason: `token mismatch: the replica holds a publish this host did not make (replica token ${short(f.replicaToken)}, ours ${short(f.stateToken)}); never merging on it`,
  };
}

/**
 * Incremental only when every link of the lineage is known to hold: replica holds the checkpoint we
 * would build on, libvirt still has it with a healthy bitmap, base.1 on the host is the same file,
 * and the replica's base is ours. Anything else is a full, with the reason (logged and kept in state).
 */
export function decideMode(f: ModeFacts): ModeDecision {
  if (f.forceFull) return { mode: 'full', reason: 'full requested' };
  if (f.replicaCheckpoint === null) return { mode: 'full', reason: 'replica holds no snapshot lineage for this disk' };
  const lineage = lineageCheck(f);
  if (lineage) return lineage;
  if (!f.replicaBaseMatches) return { mode: 'full', reason: 'replica base differs from the host image' };
  const parent = f.replicaCheckpoint;
  if (f.stateCheckpoint !== null && f.stateCheckpoint !== parent) {
    // The replica's lineage wins over our memory (another host may have published since).
  }
  if (!f.libvirtCheckpoints.includes(parent)) return { mode: 'full', reason: `checkpoint ${parent} missing in libvirt` };
  if (f.base1IdentityThen !== null && f.base1IdentityThen !== f.base1IdentityNow) {
    // A live migration (there and back) hands us a new file that carries the checkpoint's bitmap,
    // consistent and recording: that bitmap proves continuity. A recovery's base.1 (the replica's copy)
    // carries none, and a copy of a running image carries it inconsistent: both fail the bitmap check.
    if (!(f.lineageFromAnotherHost && f.bitmapHealthy === true)) {
      return { mode: 'full', reason: 'base.1 on the host was replaced since the last snapshot' };
    }
  }
  if (f.bitmapHealthy === false) return { mode: 'full', reason: `checkpoint ${parent} bitmap is broken or inconsistent` };
  if (f.bitmapHealthy === null) return { mode: 'full', reason: `checkpoint ${parent} bitmap state unknown` };
  const from = handedOverBy(f);
  if (from !== null) return { mode: 'incremental', parent, reason: `lineage handed over by ${from} (its release names this host)` };
  return { mode: 'incremental', parent, reason: 'lineage intact' };
}

/**
 * Which of our checkpoints to delete after a publish: every `onestor-` checkpoint that no disk still
 * builds on, leaf first (libvirt lists them oldest first when asked for topological order; we take
 * the caller's order oldest->newest and reverse). Never a foreign checkpoint.
 */
export function checkpointsToDelete(allOldestFirst: readonly string[], stillNeeded: ReadonlySet<string>): string[] {
  return allOldestFirst.filter((n) => isOurCheckpoint(n) && !stillNeeded.has(n)).reverse();
}
