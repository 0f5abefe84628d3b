/** What a publish (full or incremental) is given by the session: paths, tools, what open saw, test hooks. */
import type { ReplicaManifest } from '../shared/model.js';
import type { BaseOnReplica } from './manifest.js';
import type { ReplicaPaths, VmDirId } from './layout.js';
import type { OwnershipFields } from './ownership.js';

export interface PublishMeta {
  checkpoint: string | null;
  capturedAt: number;
  consistency: ReplicaManifest['consistency'];
  sourceHost: string;
  /** owner/token/history the manifest gets (lib/replica/ownership.ts); set by the receiver on every publish */
  ownership?: OwnershipFields;
}

export interface PublishContext {
  paths: ReplicaPaths;
  qemuImg: string;
  /** Identity (inode + birth time) of SNAPS/VMID at open; null when it did not exist (a full seed may then create it). */
  vmDirId: VmDirId | null;
  /** base as reported at open; a publish without a new base needs it unchanged. */
  baseAtOpen: BaseOnReplica | null;
  log?: (obj: object, msg: string) => void;
  /** Test hook: called at named steps so crash-at-each-step can be simulated. */
  onStep?: (step: string) => Promise<void> | void;
}

export async function step(c: PublishContext, name: string): Promise<void> {
  if (c.onStep) await c.onStep(name);
}

