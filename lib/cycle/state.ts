/**
 * The agent's persistent state: one JSON file, written atomically (temp, fsync, rename, dir fsync).
 * Pure transitions (what a success or failure does to a disk's record) are separate from the store,
 * so they are unit-tested without a filesystem. A corrupt file is never fatal: the caller rebuilds
 * from the replica's manifests and logs that it did.
 */
import { open, readFile, rename, mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { z } from 'zod';
import { OnestorError, ErrorCodes } from '../shared/errors.js';

const ErrorRecord = z.object({ code: z.string(), message: z.string(), at: z.number() });
const SuccessRecord = z.object({
  capturedAt: z.number(), // epoch s of the point in time
  finishedAt: z.number(),
  durationMs: z.number(),
  bytes: z.number(),
  mode: z.enum(['full', 'incremental']),
  consistency: z.enum(['filesystem-frozen', 'crash-consistent']),
  reason: z.string().optional(),
});
const DiskStateSchema = z.object({
  vmId: z.number().int().nonnegative(),
  diskId: z.number().int().nonnegative(),
  domainName: z.string().optional(),
  freqSeconds: z.number().optional(),
  replicaHost: z.string().optional(),
  checkpoint: z.string().nullable().default(null),
  checkpointXml: z.string().optional(),
  /** a checkpoint whose publish was sent but not confirmed (link died): kept until the replica tells */
  uncertainCheckpoint: z.string().optional(),
  base1Identity: z.string().nullable().default(null),
  /** token the replica returned for this host's last confirmed publish (tamper evidence; see cycle/plan.ts) */
  replicaToken: z.string().optional(),
  /** the last time someone else's publish (or an unowned lineage) forced a full, and why */
  lineageAlert: z.object({ at: z.number(), kind: z.string(), reason: z.string() }).optional(),
  lastSuccess: SuccessRecord.optional(),
  lastError: ErrorRecord.optional(),
  failCount: z.number().int().nonnegative().default(0),
  nextDueAt: z.number().optional(),
  phase: z.string().optional(),
  progress: z.object({ sent: z.number(), total: z.number(), at: z.number() }).optional(),
  queuedSince: z.number().optional(),
});
const BaseDigest = z.object({ sha256: z.string(), size: z.number(), identity: z.string() });
export const AgentStateSchema = z.object({
  version: z.literal(1),
  host: z.string().optional(),
  updatedAt: z.number(),
  daemon: z
    .object({
      pid: z.number(),
      startedAt: z.number(),
      heartbeatAt: z.number(),
      version: z.string().optional(),
      /** the overdue grace the daemon runs with: the probe reads it here instead of loading the config */
      grace: z.object({ minSec: z.number(), percent: z.number() }).optional(),
    })
    .optional(),
  disks: z.record(z.string(), DiskStateSchema),
  /** digests of host-side base images, keyed by path, valid while identity (dev:ino:size:mtime) holds */
  baseDigests: z.record(z.string(), BaseDigest).default({}),
});

export type DiskState = z.infer<typeof DiskStateSchema>;
export type AgentState = z.infer<typeof AgentStateSchema>;
export type SuccessInfo = z.infer<typeof SuccessRecord>;

export const diskKey = (vmId: number, diskId: number): string => `${vmId}.${diskId}`;

export function emptyState(now: number): AgentState {
  return { version: 1, updatedAt: now, disks: {}, baseDigests: {} };
}

/** Pure: parse a state file's text; throws E_STATE naming the file and the first bad field. */
export function parseState(text: string, file: string): AgentState {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new OnestorError(ErrorCodes.STATE, `not valid JSON (${(e as Error).message})`, { file });
  }
  const r = AgentStateSchema.safeParse(raw);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    throw new OnestorError(ErrorCodes.STATE, issue.message, { file, field: issue.path.join('.') });
  }
  return r.data;
}

export function getDisk(s: AgentState, vmId: number, diskId: number): DiskState {
  return s.disks[diskKey(vmId, diskId)] ?? { vmId, diskId, checkpoint: null, base1Identity: null, failCount: 0 };
}

/** Pure transition: a published snapshot. */
export function recordSuccess(d: DiskState, ok: SuccessInfo & { checkpoint: string; checkpointXml?: string; base1Identity: string; token?: string }): DiskState {
  const { checkpoint, checkpointXml, base1Identity, token, ...success } = ok;
  return { ...d, checkpoint, checkpointXml: checkpointXml ?? d.checkpointXml, base1Identity, replicaToken: token, lastSuccess: success, failCount: 0, lastError: undefined, phase: undefined, progress: undefined, uncertainCheckpoint: undefined };
}

/** Pure transition: a failed cycle. The previous success (and checkpoint) stay as they were. */
export function recordFailure(d: DiskState, err: { code: string; message: string }, at: number): DiskState {
  return { ...d, failCount: d.failCount + 1, lastError: { code: err.code, message: err.message, at }, phase: undefined, progress: undefined };
}

export class StateStore {
  readonly file: string;
  /** One write at a time per process: the daemon's marks and the cycles' outcomes share this store. */
  private queue: Promise<unknown> = Promise.resolve();
  constructor(readonly dir: string) {
    this.file = path.join(dir, 'state.json');
  }

  private enqueue<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.queue.then(fn);
    this.queue = p.catch(() => {});
    return p;
  }

  /** Reads the state; a missing file gives an empty state, a corrupt one throws E_STATE. */
  async load(now = Date.now() / 1000): Promise<AgentState> {
    let text: string;
    try {
      text = await readFile(this.file, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return emptyState(now);
      throw new OnestorError(ErrorCodes.STATE, (e as Error).message, { file: this.file });
    }
    return parseState(text, this.file);
  }

  /** Loads, or on corruption moves the bad file aside and starts empty; returns what happened. */
  async loadOrReset(now = Date.now() / 1000): Promise<{ state: AgentState; reset?: string }> {
    try {
      return { state: await this.load(now) };
    } catch (e) {
      const aside = `${this.file}.corrupt-${Math.floor(now)}`;
      await rename(this.file, aside).catch(() => {});
      return { state: emptyState(now), reset: `${(e as Error).message}; moved to ${aside}` };
    }
  }

  /** For readers (status, probe): never moves anything; a corrupt file reads as empty plus the error. */
  async loadOrReadOnly(now = Date.now() / 1000): Promise<{ state: AgentState; error?: string }> {
    try {
      return { state: await this.load(now) };
    } catch (e) {
      return { state: emptyState(now), error: (e as Error).message };
    }
  }

  save(state: AgentState, now = Date.now() / 1000): Promise<void> {
    return this.enqueue(() => this.write(state, now));
  }

  private async write(state: AgentState, now: number): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o750 });
    const tmp = `${this.file}.tmp-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
    const fh = await open(tmp, 'w', 0o640);
    try {
      await fh.writeFile(JSON.stringify({ ...state, updatedAt: now }, null, 1));
      await fh.sync();
    } finally {
      await fh.close();
    }
    try {
      await rename(tmp, this.file);
    } catch (e) {
      await rm(tmp, { force: true });
      throw e;
    }
    const dh = await open(this.dir, 'r');
    try {
      await dh.sync();
    } finally {
      await dh.close();
    }
  }

  /**
   * Read-modify-write of the latest file, never interleaved with another write of this process. Another
   * process (a CLI `snapshot` beside the daemon) re-reads before it writes, so it loses nothing it did
   * not race within the same few milliseconds.
   */
  update(fn: (s: AgentState) => AgentState | void): Promise<AgentState> {
    return this.enqueue(async () => {
      const cur = (await this.loadOrReset()).state;
      const next = fn(cur) ?? cur;
      await this.write(next, Date.now() / 1000);
      return next;
    });
  }
}
