/**
 * Pure planning: full or incremental, and which checkpoints may go. No I/O: callers gather the facts
 * (agent state, replica manifest, libvirt checkpoints, base.1 identity) and act on the answer.
 */
import { isOurCheckpoint } from '../libvirt/backup-xml.js';
import type { CycleMode } from '../shared/model.js';

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
  /**
   * the replica's lineage was last published by another host (the VM came here by migration): a base.1
   * that is not the file we checkpointed is then expected, and the bitmap check decides
   */
  lineageFromAnotherHost?: boolean;
}

export type ModeDecision =
  | { mode: 'incremental'; parent: string; reason: string }
  | { mode: 'full'; reason: string; /** checkpoint metadata that should be redefined first */ redefine?: undefined };

/**
 * Incremental only when every link of the lineage is known to hold: replica holds the checkpoint we
 * would build on, libvirt still has it with a healthy bitmap, base.1 on the host is the same file,
 * and the replica's base is ours. Anything else is a full, with the reason (logged and kept in state).
 */
export function decideMode(f: ModeFacts): ModeDecision {
  if (f.forceFull) return { mode: 'full', reason: 'full requested' };
  if (f.replicaCheckpoint === null) return { mode: 'full', reason: 'replica holds no snapshot lineage for this disk' };
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
