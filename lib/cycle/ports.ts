/**
 * The cycle's ports: every side effect runVmCycle has besides libvirt goes through one of these, so the
 * cycle's logic is tested with fakes (test/unit/cycle-ports.test.ts) and the same code runs in production
 * with localCyclePorts(). The replica side is a port too: lib/transfer's client satisfies ReplicaPort
 * structurally and agent/ wires it; lib/cycle does not import lib/transfer.
 */
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import type { QemuImg } from '../libvirt/qemu-img.js';
import { acquireFileLock } from '../shared/file-lock.js';
import type { ReplicaManifest } from '../shared/model.js';
import type { UploadKind } from '../protocol/protocol.js';
import { capture, cleanStagingDir, type CaptureLibvirt, type CaptureRequest, type CaptureResult } from './capture.js';
import { capturePull, type PullCapture } from './capture-pull.js';
import { cachedSha256, fileIdentity, type DigestCacheEntry } from './digest.js';
import type { AgentState } from './state.js';

// ---- replica (implemented by lib/transfer/replica-client.ts) ----

export interface ReplicaDiskSession {
  readonly manifest: ReplicaManifest | null;
  readonly baseOnReplica: { size: number; sha256: string } | null;
  upload(kind: UploadKind, localPath: string, opts: { key: string; sha256?: string; signal?: AbortSignal; onProgress?: (sent: number, total: number) => void }): Promise<{ bytes: number; resumedFrom: number }>;
  /** an upload whose bytes are produced as they are sent (the pull-mode seed's qcow2 overlay stream) */
  uploadStream(kind: UploadKind, source: { size: number; chunks: AsyncIterable<Uint8Array> }, opts: { key: string; signal?: AbortSignal; onProgress?: (sent: number, total: number) => void }): Promise<{ bytes: number; resumedFrom: number }>;
  publishFull(args: { checkpoint: string | null; capturedAt: number; consistency: ReplicaManifest['consistency']; sourceHost: string; base?: string; base1: string }): Promise<ReplicaManifest>;
  publishIncremental(args: { parentCheckpoint: string; checkpoint: string; capturedAt: number; consistency: ReplicaManifest['consistency']; sourceHost: string; inc: string }): Promise<ReplicaManifest>;
  /** the owner hands this disk's lineage to host `to` for `ttlSec` s (live migration); absent: a port without it */
  release?(to: string, ttlSec: number): Promise<{ to: string; until: number }>;
  /** releases the replica's per-disk lock */
  close(): Promise<void>;
}

export interface ReplicaPort {
  /** this host as the replica authenticated it (null/undefined: the receiver predates ownership) */
  readonly writer?: string | null;
  /** false once the session has ended (an upload that failed or gave way drops its channel); undefined: unknown */
  readonly connected?: boolean;
  /** manifests the replica holds for a VM (no lock taken) */
  status(vmId: number): Promise<ReplicaManifest[]>;
  /** takes the per-disk lock until the session is closed */
  openDisk(vmId: number, diskId: number): Promise<ReplicaDiskSession>;
}

// ---- host side ----

/** Capture into DS/<staging>/VMID and clean it up. */
export interface StagingPort {
  capture(req: CaptureRequest): Promise<CaptureResult>;
  /** the pull-mode seed: an NBD export of the point in time, streamed instead of staged (capture-pull.ts) */
  capturePull(req: CaptureRequest): Promise<PullCapture>;
  clean(stagingDir: string): Promise<void>;
}

/** The host-side per-VM cycle lock (DS/<staging>/VMID.lock). */
export interface LockPort {
  lockVm(stagingRoot: string, vmId: number, opts: { timeoutSec: number; signal?: AbortSignal }): Promise<{ release(): Promise<void> }>;
}

/** Identity and sha256 of local files (the base image's digest is cached by identity). */
export interface DigestPort {
  identity(file: string): Promise<{ identity: string; size: number; devIno: string }>;
  sha256(file: string, cached: DigestCacheEntry | undefined, signal?: AbortSignal): Promise<DigestCacheEntry & { fromCache: boolean }>;
}

/** What the cycle needs of lib/cycle/state.ts's StateStore. */
export interface CycleStatePort {
  /** the state dir (live-migration yield markers live beside the state file: lib/cycle/migration.ts) */
  readonly dir: string;
  loadOrReset(): Promise<{ state: AgentState }>;
  update(fn: (cur: AgentState) => AgentState | void): Promise<AgentState>;
}

/** The production ports. */
export function localCyclePorts(libvirt: CaptureLibvirt, qemuImg: QemuImg): { staging: StagingPort; locks: LockPort; digests: DigestPort } {
  return {
    staging: { capture: (req) => capture(libvirt, qemuImg, req), capturePull: (req) => capturePull(libvirt, qemuImg, req), clean: (dir) => cleanStagingDir(dir) },
    locks: {
      async lockVm(root, vmId, opts) {
        await mkdir(root, { recursive: true, mode: 0o750 });
        return acquireFileLock(path.join(root, `${vmId}.lock`), { timeoutSec: opts.timeoutSec, signal: opts.signal, context: { vm: vmId } });
      },
    },
    digests: { identity: fileIdentity, sha256: cachedSha256 },
  };
}
