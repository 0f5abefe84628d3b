/**
 * Shared domain types. Pure data: no I/O, no classes. Every module speaks these.
 */
import type { z } from 'zod';
import type { ErrorCode } from './errors.js';
import type { replicaManifestSchema } from './manifest-schema.js';

/** Driver settings from the ssh TM `sshrc` (upstream names and defaults, see DESIGN §2). */
export interface DriverSettings {
  REPLICA_COPY_LOCK_TIMEOUT: number; // seconds
  REPLICA_RECOVERY_SNAPS_DIR: string;
  REPLICA_SSH_OPTS: string;
  REPLICA_SSH_FE_OPTS: string;
  REPLICA_MAX_SIZE_MB: number | null; // null = unset
  REPLICA_MAX_USED_PERC: number;
}

/** A disk that is set up for protection (layout present, frequency and replica known). */
export interface EligibleDisk {
  vmId: number;
  diskId: number;
  dsId: number;
  /** DATASTORE_LOCATION/DSID */
  dsDir: string;
  /** DATASTORE_LOCATION/DSID/VMID */
  vmDir: string;
  /** /VM/DEPLOY_ID or one-VMID */
  domainName: string;
  freqSeconds: number;
  /** /DATASTORE/TEMPLATE/REPLICA_HOST */
  replicaHost: string;
  /** DS/VMID/disk.N.snap */
  snapDir: string;
  /** DS/VMID/disk.N.snap/base (the image copy) */
  basePath: string;
  /** DS/VMID/disk.N.snap/base.1 (the running overlay; what libvirt names since 6.8) */
  base1Path: string;
  /** /VM/TEMPLATE/DISK/TARGET when present (vda, sdb...) */
  target?: string;
}

/** A disk (or whole VM when diskId is undefined) that is not protected, and why. */
export interface IneligibleDisk {
  vmId: number;
  diskId?: number;
  dsId: number;
  code: ErrorCode;
  reason: string; // names the file and field
  file?: string;
  field?: string;
}

export type Consistency = 'filesystem-frozen' | 'crash-consistent';
export type CycleMode = 'full' | 'incremental';

/** What the replica holds for one disk: the wire schema's type (lib/shared/manifest-schema.ts), not a twin. */
export type ReplicaManifest = z.infer<typeof replicaManifestSchema>;
