/**
 * The replica-side receiver: one session per process (each ssh exec is one), speaking lib/protocol.ts on
 * stdin/stdout. It owns every write under SNAPS; SNAPS itself comes from ReceiverOptions, never the client.
 * Logs go to opts.log (stderr in production): stdout is the protocol.
 */
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import type { Writable } from 'node:stream';
import { ErrorCodes, OnestorError, describeError, errorCodeOf } from '../shared/errors.js';
import { acquireFileLock, type FileLock } from '../shared/file-lock.js';
import { Exit } from '../shared/exit-codes.js';
import { AGENT_VERSION } from '../shared/version.js';
import { RECEIVER_DEFAULTS } from '../shared/defaults.js';
import {
  FrameDecoder,
  MAX_DATA_BYTES,
  PROTOCOL_VERSION,
  encodeReply,
  parseClientMessage,
  type ClientMessage,
  type EndMessage,
  type PutMessage,
} from '../protocol/protocol.js';
import { DIGEST_ALGS, newDigest, type StreamDigest } from '../protocol/digest.js';
import { receiverReply, type Built, type ReceiverReply } from '../protocol/messages.js';
import { assertSameVmDir, checkLayout, emptyTrash, privateDir, replicaPaths, type ReplicaPaths, type VmDirId } from './layout.js';
import { claimMatches, identityKind } from './identity.js';
import { appendTakeover, assertMayIncrement, makeRelease, ownershipForPublish, recordWriter, uploadKeyFor } from './ownership.js';
import { reclaimLeftovers } from './leftovers.js';
import { baseOnReplica, readValidManifest, toWireManifest, writeManifest, type BaseOnReplica } from './manifest.js';
import { statusPage } from './status-page.js';
import { lockDisk, unlockDisk } from './disk-lock.js';
import { dropWorkIfVmGone, publishIncremental, recoverJournal, recoverPendingJournals } from './merge.js';
import { prepareSpareAfterSeed, publishFull, type PublishContext } from './publish.js';
import { startImageCheck } from './image-check.js';
import { maybeSweep } from './sweep.js';
import { SpaceLedger } from './reservations.js';
import { DEFAULT_SESSION_LIMITS, SessionWatch, type SessionLimits } from './session-watch.js';
import { acquireFairSlot, defaultMaxPerHost, UNNAMED_IDENTITY, type Slot } from './slots.js';
import { DIRECT_ALIGN, dropStaleUploads, openDirect, openUpload, pageAlignedBuffers, prepareUpload, type UploadedFile } from './uploads.js';
import type { LentChunks } from './stdio.js';


export interface ReceiverOptions {
  snapsDir: string;
  /**
   * The authenticated writer (lib/replica/identity.ts): `--host NAME` from the key's forced command, else the
   * key's fingerprint from sshd. Owner of what this session publishes, field `writer` of every log line.
   */
  identity: string;
  /** fingerprint of the authenticated key when sshd exposed it (logged beside a --host identity) */
  keyFingerprint?: string;
  lockTimeoutSec: number;
  /** concurrent disk sessions (open..close) on this replica, all hosts together */
  maxSessions: number;
  /** most of those one identity may hold at once; default half of maxSessions, rounded up */
  maxSessionsPerHost?: number;
  busyWaitSec: number;
  maxUsedPercent: number;
  /** false: no up-front free-space refusal (a real ENOSPC still fails the upload cleanly) */
  spaceCheck?: boolean;
  qemuImg?: string;
  /** End the session when the peer sends nothing for this long (a stuck or half-dead agent). Default 900. */
  idleTimeoutSec?: number;
  /** The other session time limits (lib/replica/session-watch.ts); defaults in DEFAULT_SESSION_LIMITS. */
  helloTimeoutSec?: number;
  drainTimeoutSec?: number;
  progressWindowSec?: number;
  minProgressKiB?: number;
  maxSessionSec?: number;
  /** level defaults to info; take-overs and identity mismatches come at warn */
  log?: (obj: object, msg: string, level?: 'info' | 'warn') => void;
  /** Orphan sweep at most this often per replica (after a hello reply). Default 600; 0 = after every hello. */
  sweepIntervalSec?: number;
  /** Test hook passed to the publish functions (simulated crashes). */
  onStep?: PublishContext['onStep'];
  /** false: write uploads through the page cache only (default: O_DIRECT where the filesystem takes it) */
  directWrites?: boolean;
}

/** Exit codes (lib/shared/exit-codes.ts): OK clean end, PROTOCOL violation, FAILED anything else that ended the session. */
const EXIT_OK = Exit.OK;
const EXIT_FAILED = Exit.FAILED;
const EXIT_PROTOCOL = Exit.PROTOCOL;

/**
 * Received data is copied into one of two buffers of this size per session and written from there: the
 * input's chunks are only lent (the stdin reader reuses one buffer for every read, see stdio.ts). While one
 * buffer is being written (the page-cache copy, in the thread pool) the other fills from the pipe, so
 * reading and hashing go on during a write (bench/receiver-pipe.ts: a little faster than one awaited
 * buffer on 2 vCPUs; more where the replica has cores to spare).
 */
/*
 * 512 KiB, not more: since Linux 6.x the page cache takes folios as large as the write, and a 2 MiB write
 * gets 2 MiB folios, allocated from the large free blocks that a VM with free page reporting has handed
 * back to its host: every first touch then faults on the host. Measured on such a replica (1.1 GiB into a
 * new file after a cache drop, one write at a time): 2 MiB writes 3.0 s of system time, 1 MiB 0.47 s,
 * 512 KiB 0.35 s, 256 KiB 0.43 s, 64 KiB 0.85 s. A seed's receiver spent 3.3 CPU-s per GiB in that copy
 * where rsync (smaller writes) spent 0.14.
 */
const WRITE_BATCH_BYTES = 512 * 1024;
const LEDGER_STEP_BYTES = 64 * 1024 * 1024;
/**
 * Written data is handed to the disk every this many bytes (fdatasync in the background, one at a time)
 * so that the fsync before `end`'s verdict only waits for the tail: a seed's 1 GiB upload otherwise sat
 * on a 0.6 s fsync at the end here (nothing had been written back: the kernel starts at 10 % of RAM dirty).
 */
const WRITEBACK_STEP_BYTES = 64 * 1024 * 1024;
/**
 * Once every byte of an upload has arrived the agent still has to finish its digest before it sends `end`
 * (a resumed upload hashes the whole file): that long is not a stall. The grace is the upload size at
 * a hashing rate any host exceeds, so a client can only earn idle time by moving data.
 */
const HASH_RATE_FLOOR_BYTES_PER_SEC = 50_000_000;

interface Upload {
  put: PutMessage;
  file: string;
  fh: fsp.FileHandle;
  /** the same file opened with O_DIRECT, null where refused (then every batch goes through `fh`) */
  direct: fsp.FileHandle | null;
  position: number;
  hash: StreamDigest;
  /** bytes in the session's current batch buffer, not yet handed to a write (they follow `position`) */
  batchFill: number;
  /** the write of the other batch buffer, if one is in flight (its error is thrown by the next waitWrite) */
  writing: Promise<void> | null;
  /** position at which the ledger last lowered this upload's reservation by what landed on disk */
  ledgerAt: number;
  /** the background fdatasync in flight, if any, and the position the last one started at */
  syncing: Promise<void> | null;
  syncedAt: number;
  /**
   * The first failed background fdatasync. Kept: Linux reports a writeback error to one fsync only, so
   * a later sync may succeed on a file whose earlier pages were lost.
   */
  syncError: unknown;
  /** when the last announced byte arrived (ms), null before */
  completeAt: number | null;
}

interface DiskSession {
  paths: ReplicaPaths;
  lock: FileLock;
  vmDirId: VmDirId | null;
  baseAtOpen: BaseOnReplica | null;
  /** Verified uploads of this session, by key. */
  uploads: Map<string, UploadedFile & { kind: PutMessage['kind'] }>;
}

class SessionEnd extends Error {
  constructor(readonly exitCode: number) {
    super('session end');
  }
}

export function sessionLimitsOf(opts: ReceiverOptions): SessionLimits {
  const d = DEFAULT_SESSION_LIMITS;
  return {
    helloTimeoutSec: opts.helloTimeoutSec ?? d.helloTimeoutSec,
    idleTimeoutSec: opts.idleTimeoutSec ?? d.idleTimeoutSec,
    drainTimeoutSec: opts.drainTimeoutSec ?? d.drainTimeoutSec,
    progressWindowSec: opts.progressWindowSec ?? d.progressWindowSec,
    minProgressKiB: opts.minProgressKiB ?? d.minProgressKiB,
    maxSessionSec: opts.maxSessionSec ?? d.maxSessionSec,
  };
}

export async function runReceiver(input: LentChunks, output: Writable, options: ReceiverOptions): Promise<number> {
  // Every line this session logs names the authenticated writer.
  const baseLog = options.log;
  const who = { writer: options.identity, ...(options.keyFingerprint && options.keyFingerprint !== options.identity ? { key: options.keyFingerprint } : {}) };
  // `who` last: no field of a log call can override the writer.
  const opts: ReceiverOptions = baseLog ? { ...options, log: (obj, msg, level) => baseLog({ ...obj, ...who }, msg, level) } : options;
  if (identityKind(opts.identity) === 'unidentified') {
    opts.log?.({}, 'writer not identified: bind the host with receive --host NAME (ownership cannot tell unidentified keys apart)', 'warn');
  }
  const limits = sessionLimitsOf(opts);
  const watch = new SessionWatch(limits, (err) => {
    opts.log?.({ identity: opts.identity, err: describeError(err) }, 'session limit reached');
    input.destroy(err);
  });
  const session = new ReceiverSession(output, opts, watch);
  const decoder = new FrameDecoder();
  let exitCode: number = EXIT_OK;
  // Only time spent waiting for the agent counts against it; a merge or a lock wait is the receiver's.
  const waitBegin = () => {
    const owedFrom = decoder.idle ? session.hashGraceUntil() : 0;
    watch.waitBegin({ owed: session.holdsSlot || !decoder.idle, holding: session.holdsSlot, ...(owedFrom ? { owedFrom } : {}) });
  };
  try {
    try {
      waitBegin();
      for await (const chunk of input) {
        watch.waitEnd((chunk as Buffer).length);
        const frames = decoder.push(chunk as Buffer);
        for (const frame of frames) {
          if (frame.type === 'data') await session.onData(frame.chunk);
          else await session.onControl(frame.message);
        }
        waitBegin();
      }
      decoder.end();
    } catch (e) {
      if (e instanceof SessionEnd) {
        exitCode = e.exitCode;
      } else if (errorCodeOf(e) === ErrorCodes.PROTOCOL) {
        opts.log?.({ err: describeError(e) }, 'protocol violation; ending session');
        await session.sendSafe(receiverReply.error(ErrorCodes.PROTOCOL, (e as Error).message));
        exitCode = EXIT_PROTOCOL;
      } else {
        opts.log?.({ err: describeError(e) }, 'receiver failed');
        await session.sendSafe(receiverReply.error(errorCodeOf(e), (e as Error).message));
        exitCode = EXIT_FAILED;
      }
    }
  } finally {
    watch.stop();
    await session.cleanup();
  }
  return exitCode;
}

/**
 * A session the receiver cannot serve at all (no identity): answers the client's first message with the
 * error, so the agent logs the reason and its code instead of "channel closed", then ends. Bounded in time.
 */
export async function refuseSession(input: LentChunks, output: Writable, err: OnestorError, log?: ReceiverOptions['log'], waitMs = 30_000): Promise<number> {
  log?.({ err: describeError(err) }, 'session refused', 'warn');
  const decoder = new FrameDecoder();
  const timer = setTimeout(() => input.destroy(), waitMs);
  try {
    for await (const chunk of input) {
      if (decoder.push(chunk as Buffer).some((f) => f.type === 'control')) break;
    }
  } catch {
    // garbage or a timeout: the answer below is all the peer gets
  } finally {
    clearTimeout(timer);
  }
  if (!output.destroyed && output.writable) output.write(encodeReply(receiverReply.error(err.code, err.message)));
  return EXIT_FAILED;
}

class ReceiverSession {
  private slot: Slot | null = null;
  private sweep: Promise<void> | null = null;
  /** accepted-but-unpublished bytes of this session, visible to every other session (null: no space check) */
  private ledger: SpaceLedger | null = null;
  private greeted = false;
  private disk: DiskSession | null = null;
  private upload: Upload | null = null;
  /** After an upload failed early: discard its remaining data and its `end` (the error was its answer). */
  private draining = false;
  /** where received data waits for its write: two of WRITE_BATCH_BYTES, allocated at the first data */
  private batches: [Buffer, Buffer] | null = null;
  private batchIndex = 0;
  private readonly qemuImg: string;
  /**
   * Work that follows a seed's publish reply under the disk lock (the A/B spare copy, O(size of base.1)):
   * the agent is told "published" as soon as the snapshot is durable. `close` is answered at once and
   * waits for it before the lock goes; any other request waits for it first, so requests stay in order.
   */
  private afterPublish: Promise<void> | null = null;
  /** `close` answered, the disk (lock, slot) goes when afterPublish is done: the receiver's work, not the agent's */
  private closingAfterPublish = false;

  private readonly drainMs: number;

  constructor(
    private readonly output: Writable,
    private readonly opts: ReceiverOptions,
    private readonly watch: SessionWatch,
  ) {
    this.qemuImg = opts.qemuImg ?? 'qemu-img';
    this.drainMs = sessionLimitsOf(opts).drainTimeoutSec * 1000;
  }

  /** a slot the agent holds: what it does meanwhile is owed progress (a spare after `close` is ours) */
  get holdsSlot(): boolean {
    return this.slot !== null && !this.closingAfterPublish;
  }

  /** Until when (epoch ms) waiting for `end` of a fully received upload is not owed progress; 0 = no grace. */
  hashGraceUntil(): number {
    const up = this.upload;
    if (!up || up.completeAt === null) return 0;
    return up.completeAt + Math.ceil((up.put.size / HASH_RATE_FLOOR_BYTES_PER_SEC) * 1000);
  }

  private async send(msg: Built<ReceiverReply>): Promise<void> {
    const out = this.output;
    // A peer that hung up gets no more replies (and a destroyed stream never emits 'drain').
    if (out.destroyed || !out.writable) throw new OnestorError(ErrorCodes.ABORTED, 'agent closed the channel');
    if (!out.write(encodeReply(msg))) {
      await new Promise<void>((resolve, reject) => {
        const done = (err?: Error) => {
          clearTimeout(timer);
          out.off('drain', onDrain);
          out.off('error', onError);
          out.off('close', onClose);
          if (err) reject(err);
          else resolve();
        };
        // A client that never reads its replies would keep us (and our slot and lock) here for ever.
        const timer = setTimeout(() => {
          this.opts.log?.({ identity: this.opts.identity, drainTimeoutSec: this.drainMs / 1000 }, 'agent does not read replies; ending session');
          out.destroy();
          done(new SessionEnd(EXIT_FAILED));
        }, this.drainMs);
        const onDrain = () => done();
        const onError = (e: Error) => done(e);
        const onClose = () => done(new OnestorError(ErrorCodes.ABORTED, 'agent closed the channel'));
        out.once('drain', onDrain);
        out.once('error', onError);
        out.once('close', onClose);
      });
    }
  }

  async sendSafe(msg: Built<ReceiverReply>): Promise<void> {
    try {
      await this.send(msg);
    } catch {
      // peer gone: nothing left to tell it
    }
  }

  /** `chunk` is lent until this returns: what is kept is copied into a batch buffer. */
  async onData(chunk: Buffer): Promise<void> {
    if (this.draining) return;
    const up = this.upload;
    if (!up) throw new OnestorError(ErrorCodes.PROTOCOL, 'data frame outside an upload');
    const received = up.position + up.batchFill + chunk.length;
    if (received > up.put.size) {
      await this.failUpload(new OnestorError(ErrorCodes.SIZE, `received more than the announced ${up.put.size} bytes`, this.ctx()));
      return;
    }
    if (chunk.length === 0) return;
    up.hash.update(chunk);
    if (received === up.put.size) up.completeAt = Date.now();
    for (let at = 0; at < chunk.length; ) {
      const batch = this.currentBatch();
      // a batch ends on a multiple of DIRECT_ALIGN in the file, so every full one can be written direct
      const capacity = batch.length - (up.position % DIRECT_ALIGN);
      const n = chunk.copy(batch, up.batchFill, at, Math.min(chunk.length, at + capacity - up.batchFill));
      up.batchFill += n;
      at += n;
      if (up.batchFill === capacity) {
        try {
          await this.startWrite(up);
        } catch (e) {
          await this.failUpload(this.mapWriteError(e, up.file));
          return;
        }
      }
    }
  }

  private currentBatch(): Buffer {
    this.batches ??= pageAlignedBuffers(2, WRITE_BATCH_BYTES) as [Buffer, Buffer];
    return this.batches[this.batchIndex]!;
  }

  /** Waits for the write in flight, if any; throws its error. */
  private async waitWrite(up: Upload): Promise<void> {
    const w = up.writing;
    if (!w) return;
    up.writing = null;
    await w;
  }

  /**
   * Hands the current batch to a write and switches to the other buffer, after the write in flight (the
   * other buffer) is done: writes stay in file order, and one that failed stops every later one, so the
   * file never has a hole before what it holds (a resume trusts its length).
   */
  private async startWrite(up: Upload): Promise<void> {
    await this.waitWrite(up);
    if (up.batchFill === 0) return;
    const buf = this.currentBatch();
    const n = up.batchFill;
    const at = up.position;
    up.batchFill = 0;
    up.position += n;
    this.batchIndex ^= 1;
    const write = this.writeBatch(up, buf, n, at).then(async (bytesWritten) => {
      // Short write on a regular file: only a full disk does that.
      if (bytesWritten !== n) throw Object.assign(new Error('short write'), { code: 'ENOSPC' });
      // What landed on disk now shows in the filesystem's usage: stop counting it twice (coarsely, so the
      // ledger file is rewritten every 64 MiB at most).
      const done = at + n;
      if (this.ledger && done - up.ledgerAt >= LEDGER_STEP_BYTES) {
        up.ledgerAt = done;
        // an optimisation only: a failure to rewrite the ledger must not fail the upload
        await this.ledger.lower(this.resvKey(up.put.key), up.put.size - done + spareBytes(up.put)).catch(() => {});
      }
      if (!up.syncing && done - up.syncedAt >= WRITEBACK_STEP_BYTES) {
        up.syncedAt = done;
        up.syncing = up.fh.datasync().then(
          () => void (up.syncing = null),
          (e: unknown) => void ((up.syncError ??= e), (up.syncing = null)),
        );
      }
    });
    write.catch(() => {}); // observed by the next waitWrite
    up.writing = write;
  }

  /**
   * One batch: direct when aligned and the filesystem takes it, else through the page cache.
   * Batches go to the disk with O_DIRECT where the filesystem allows it (uploads.ts openDirect): received
   * data is cold (read again at most once, by the spare copy or a merge), and copying it into the page cache
   * was the largest cost of a seed on the replica: fresh page-cache pages for every byte, then the kernel's
   * writeback. Measured on a VM replica (1 GiB, 512 KiB writes): 0.8-3.3 s of system time through the page
   * cache, 0.25 s direct. A batch is direct when its offset and length are multiples of DIRECT_ALIGN (all
   * but an upload's last, and the first after a resume at an odd offset, which is cut short to realign);
   * the others go through the page cache, as does everything where O_DIRECT is refused. Durability is the
   * same either way: the fsync before `end`'s verdict covers the file whichever handle wrote it.
   */
  private async writeBatch(up: Upload, buf: Buffer, n: number, at: number): Promise<number> {
    const direct = up.direct;
    if (direct && at % DIRECT_ALIGN === 0 && n % DIRECT_ALIGN === 0) {
      try {
        return (await direct.write(buf, 0, n, at)).bytesWritten;
      } catch (e) {
        // EINVAL: this filesystem wants another alignment (nothing was written); any other error is real
        if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw e;
        up.direct = null;
        await direct.close().catch(() => {});
        this.opts.log?.({ ...this.ctx({ file: up.file }) }, 'direct writes refused (EINVAL); this upload goes through the page cache');
      }
    }
    return (await up.fh.write(buf, 0, n, at)).bytesWritten;
  }

  /** Closes both handles of an upload (a write in flight must have ended). */
  private async closeUpload(up: Upload): Promise<void> {
    await up.direct?.close().catch(() => {});
    up.direct = null;
    await up.fh.close().catch(() => {});
  }

  /** Everything received is written (end, resume, cleanup); throws the first write error. */
  private async flush(up: Upload): Promise<void> {
    await this.startWrite(up);
    await this.waitWrite(up);
  }

  /** Everything written is on disk: waits for the background writeback, then fsync; throws its first error. */
  private async sync(up: Upload): Promise<void> {
    await up.syncing;
    if (up.syncError) throw up.syncError;
    await up.fh.sync();
  }

  private mapWriteError(e: unknown, file: string): OnestorError {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT') {
      return new OnestorError(ErrorCodes.NOSPACE, 'replica filesystem full while receiving; upload discarded', this.ctx({ file }));
    }
    if (e instanceof OnestorError) return e;
    return new OnestorError(ErrorCodes.INTERNAL, `writing ${file}: ${(e as Error).message}`, this.ctx({ file }));
  }

  private resvKey(key: string): string {
    return this.disk ? `${this.disk.paths.vm}-${this.disk.paths.disk}/${key}` : key;
  }

  private ctx(extra: Record<string, unknown> = {}) {
    return this.disk ? { vm: this.disk.paths.vm, disk: this.disk.paths.disk, ...extra } : extra;
  }

  /** Answers the upload with an error now, removes the temp (a bad upload must not be resumed). */
  private async failUpload(err: OnestorError): Promise<void> {
    const up = this.upload;
    this.upload = null;
    this.draining = true;
    if (up) {
      // a write in flight must end before its file is closed and removed
      await up.writing?.catch(() => {});
      await up.syncing;
      up.batchFill = 0;
      await this.closeUpload(up);
      await fsp.rm(up.file, { force: true });
      await this.ledger?.lower(this.resvKey(up.put.key), 0);
    }
    this.opts.log?.({ err: describeError(err) }, 'upload failed');
    await this.send(receiverReply.error(err.code, err.message));
  }

  async onControl(raw: unknown): Promise<void> {
    const msg = parseClientMessage(raw);
    if (this.draining) {
      this.draining = false;
      if (msg.type === 'end') return;
    }
    if (this.upload && msg.type !== 'end') {
      throw new OnestorError(ErrorCodes.PROTOCOL, `${msg.type} in the middle of an upload`);
    }
    try {
      await this.dispatch(msg);
    } catch (e) {
      if (e instanceof SessionEnd || errorCodeOf(e) === ErrorCodes.PROTOCOL) throw e;
      // Every other failure is the answer to this request; the session goes on.
      this.opts.log?.({ err: describeError(e), request: msg.type }, 'request failed');
      await this.send(receiverReply.error(errorCodeOf(e), e instanceof Error ? e.message : String(e)));
    }
  }

  private async dispatch(msg: ClientMessage): Promise<void> {
    if (msg.type === 'close' && this.afterPublish) {
      // The disk stays locked (and the slot held) until the spare is made; the agent need not wait for it,
      // and the session reads on, so that a `bye` is answered at once too.
      await this.send(receiverReply.ok());
      this.closingAfterPublish = true;
      this.afterPublish = this.afterPublish.then(() =>
        this.closeDisk().catch((e: unknown) => this.opts.log?.({ ...this.ctx(), err: describeError(e) }, 'closing the disk after its spare copy failed', 'warn')),
      );
      return;
    }
    if (msg.type === 'bye') {
      // Nothing more for the agent: it may hang up now. The process lives on (sshd does not signal a
      // command whose client left) until the spare is made and the lock released.
      await this.send(receiverReply.ok());
      await this.settleAfterPublish();
      throw new SessionEnd(EXIT_OK);
    }
    await this.settleAfterPublish();
    if (msg.type === 'hello') {
      this.watch.markGreeted();
      return this.onHello(msg);
    }
    if (!this.greeted) throw new OnestorError(ErrorCodes.PROTOCOL, `${msg.type} before hello`);
    switch (msg.type) {
      case 'status': {
        // an interrupted merge is finished first: the client plans its next increment from this answer
        if (msg.vm !== undefined) await recoverPendingJournals(this.opts.snapsDir, msg.vm, this.qemuImg, this.opts.log).catch(() => 0);
        // `status VM` is open to any authorized host (the one now running the VM must learn where the
        // lineage stands); the replica-wide list only shows the caller's own disks.
        const own = (m: { owner?: string }) => m.owner === this.opts.identity;
        const page = await statusPage(this.opts.snapsDir, { ...(msg.vm !== undefined ? { vm: msg.vm } : { include: own }), after: msg.after ?? null });
        if (msg.after === undefined && page.next) {
          // an agent from before paging: it cannot follow a cursor, and a partial list would mislead it
          throw new OnestorError(ErrorCodes.INTERNAL, `status holds more manifests than one reply carries; this agent must be upgraded to page through them`, msg.vm !== undefined ? { vm: msg.vm } : {});
        }
        // a cursor only for an agent that pages (it sent `after`)
        return this.send(receiverReply.status(page.manifests, msg.after !== undefined ? page.next : undefined));
      }
      case 'open':
        return this.onOpen(msg.vm, msg.disk);
      case 'close':
        await this.closeDisk();
        return this.send(receiverReply.ok());
      case 'put':
        return this.onPut(msg);
      case 'end':
        return this.onEnd(msg);
      case 'publish':
        return this.onPublish(msg);
      case 'release':
        return this.onRelease(msg.to, msg.ttlSec);
    }
  }

  private async onHello(hello: Extract<ClientMessage, { type: 'hello' }>): Promise<void> {
    const protocol = hello.protocol;
    if (this.greeted) throw new OnestorError(ErrorCodes.PROTOCOL, 'second hello');
    // hello.host is the client's word: it is only compared, never used. A mismatch is worth a warning (a key
    // copied to another host, or a host named differently in the agent and in authorized_keys) but not a
    // refusal: the name grants nothing, and refusing over a naming nit would stop protection.
    if (identityKind(this.opts.identity) === 'host' && !claimMatches(hello.host, this.opts.identity)) {
      this.opts.log?.({ claimed: hello.host.slice(0, 255) }, 'hello names another host than the key is bound to; the authenticated name is used', 'warn');
    }
    if (protocol !== PROTOCOL_VERSION) {
      await this.send(receiverReply.error(ErrorCodes.PROTOCOL, `protocol ${protocol} not supported; this receiver speaks ${PROTOCOL_VERSION}`));
      throw new SessionEnd(EXIT_PROTOCOL);
    }
    await fsp.mkdir(this.opts.snapsDir, { recursive: true });
    // No slot yet: a connection kept open between cycles holds nothing; the slot is taken at `open`.
    this.greeted = true;
    const fs = await spaceOf(this.opts.snapsDir);
    await this.send(
      receiverReply.hello({
        receiverVersion: AGENT_VERSION,
        maxChunk: MAX_DATA_BYTES,
        snapsDirFree: fs.avail,
        snapsDirUsedPercent: Math.round(fs.usedPercent * 100) / 100,
        identity: this.opts.identity,
        digests: [...DIGEST_ALGS],
      }),
    );
    this.startSweep();
  }

  /**
   * The reservation ledger lives beside the slot file and counts while that slot is held: bind it right
   * after a slot is taken (dropping what a dead earlier holder left), unbind it when the slot goes.
   */
  private async bindLedger(slotFile: string): Promise<void> {
    if (this.opts.spaceCheck === false) return;
    this.ledger = new SpaceLedger(slotFile, () => spaceOf(this.opts.snapsDir), this.opts.maxUsedPercent);
    await this.ledger.reset();
  }

  private async unbindLedger(): Promise<void> {
    const l = this.ledger;
    this.ledger = null;
    await l?.releaseAll();
  }

  /** Housekeeping after the reply, in the background, while we hold a slot; cleanup() waits for it. */
  private startSweep(): void {
    const log = this.opts.log;
    this.sweep = maybeSweep(this.opts.snapsDir, (this.opts.sweepIntervalSec ?? RECEIVER_DEFAULTS.sweepIntervalSec) * 1000, log ? { log } : {})
      .then((r) => {
        if (r && r.candidates > 0) log?.({ ...r }, 'orphan sweep');
      })
      .catch((e: unknown) => log?.({ err: describeError(e) }, 'orphan sweep failed'));
  }

  private async onOpen(vm: number, disk: number): Promise<void> {
    if (this.disk) throw new OnestorError(ErrorCodes.PROTOCOL, 'open while another disk is open; close it first');
    const paths = replicaPaths(this.opts.snapsDir, vm, disk);
    // Lock first (symlink-checked; the tmp dir is made by the first put, see unlockDisk), then the slot:
    // nobody ever waits for a disk lock while holding a slot.
    const lock = await lockDisk(paths, this.opts.lockTimeoutSec);
    try {
      const slots = (await privateDir(this.opts.snapsDir, ['slots'], { create: true, context: { vm, disk } }))!;
      this.slot = await acquireFairSlot({
        dir: slots,
        identity: this.opts.identity,
        maxSessions: this.opts.maxSessions,
        maxPerHost:
          this.opts.identity === UNNAMED_IDENTITY || identityKind(this.opts.identity) === 'unidentified' ? this.opts.maxSessions : (this.opts.maxSessionsPerHost ?? defaultMaxPerHost(this.opts.maxSessions)),
        busyWaitSec: this.opts.busyWaitSec,
        ...(this.opts.log ? { log: this.opts.log } : {}),
      });
      this.watch.holdStarted();
      await this.bindLedger(path.join(slots, `slot.${this.slot.index}`));
      // Layout first: no journal redo or cleanup ever acts through a path we did not make.
      await checkLayout(paths);
      await dropWorkIfVmGone(paths);
      await recoverJournal(paths, this.qemuImg, this.opts.log);
      await reclaimLeftovers(paths, this.opts.log);
      const { vmDirId } = await checkLayout(paths);
      const manifest = await readValidManifest(paths);
      const base = await baseOnReplica(paths, manifest);
      this.disk = { paths, lock, vmDirId, baseAtOpen: base, uploads: new Map() };
      this.opts.log?.({ vm, disk, checkpoint: manifest?.checkpoint ?? null }, 'disk opened');
      await this.send(receiverReply.open(manifest ? toWireManifest(manifest) : null, base));
    } catch (e) {
      if (!this.disk) {
        await this.unbindLedger().catch(() => {});
        await this.releaseSlot();
        await unlockDisk(paths, lock);
      }
      throw e;
    }
  }

  private requireDisk(what: string): DiskSession {
    if (!this.disk) throw new OnestorError(ErrorCodes.PROTOCOL, `${what} without an open disk`);
    return this.disk;
  }

  private async onPut(put: PutMessage): Promise<void> {
    const d = this.requireDisk('put');
    if (d.vmDirId !== null) await assertSameVmDir(d.paths, d.vmDirId);
    const { file, offset } = await prepareUpload(d.paths, uploadKeyFor(this.opts.identity, put.key), put.size, new Set([...d.uploads.values()].map((u) => u.file)));
    const alg = put.digest ?? 'sha256';
    // base is compared across hosts by its sha256 (manifest), and a digest known in advance is a sha256
    if (alg !== 'sha256' && (put.kind === 'base' || put.sha256 !== undefined)) {
      throw new OnestorError(ErrorCodes.PROTOCOL, `put of ${put.kind} with digest ${alg}${put.sha256 !== undefined ? ' and a sha256' : ''}: base and a known digest go with sha256`);
    }
    // base.1 and incs need room twice: the upload, then the A/B spare (copy at seed, merge growth later).
    // Reserved until published or dropped, so concurrent sessions cannot over-commit the filesystem.
    await this.ledger?.reserve(this.resvKey(put.key), put.size - offset + spareBytes(put), this.ctx());
    const hash = await newDigest(alg);
    const fh = await openUpload(file, offset);
    if (offset > 0) {
      try {
        // The digest covers the whole file: fold in what we already hold.
        for await (const chunk of fh.createReadStream({ start: 0, end: offset - 1, highWaterMark: 4 << 20, autoClose: false })) {
          hash.update(chunk as Buffer);
        }
      } catch (e) {
        await fh.close().catch(() => {});
        throw e;
      }
    }
    const direct = this.opts.directWrites === false ? null : await openDirect(fh);
    d.uploads.delete(put.key);
    this.upload = { put, file, fh, direct, position: offset, hash, batchFill: 0, writing: null, ledgerAt: offset, syncing: null, syncedAt: offset, syncError: undefined, completeAt: offset === put.size ? Date.now() : null };
    this.opts.log?.({ ...this.ctx(), kind: put.kind, key: put.key, size: put.size, offset }, 'upload accepted');
    await this.send(receiverReply.put(offset));
  }

  private async onEnd(msg: EndMessage): Promise<void> {
    const up = this.upload;
    if (!up) throw new OnestorError(ErrorCodes.PROTOCOL, 'end without an upload');
    const alg = up.hash.alg;
    const said = msg[alg];
    if (said === undefined) throw new OnestorError(ErrorCodes.PROTOCOL, `end without the ${alg} digest its put announced`);
    const d = this.requireDisk('end');
    let failure: OnestorError | null = null;
    try {
      await this.flush(up);
      await this.sync(up);
    } catch (e) {
      failure = this.mapWriteError(e, up.file);
    }
    if (!failure && up.position !== up.put.size) {
      failure = new OnestorError(ErrorCodes.SIZE, `received ${up.position} bytes, announced ${up.put.size}`, this.ctx({ file: up.file }));
    }
    const digest = up.hash.hex();
    if (!failure && (digest !== said || (up.put.sha256 !== undefined && up.put.sha256 !== digest))) {
      failure = new OnestorError(ErrorCodes.DIGEST, `${alg} of received data is ${digest}, sender says ${said}`, this.ctx({ file: up.file }));
    }
    this.upload = null;
    await this.closeUpload(up);
    if (failure) {
      await fsp.rm(up.file, { force: true });
      await this.ledger?.lower(this.resvKey(up.put.key), 0);
      throw failure;
    }
    // the upload itself now shows in the filesystem's usage; only the spare's room stays reserved
    await this.ledger?.lower(this.resvKey(up.put.key), spareBytes(up.put));
    // qemu-img checks the file while the client sends its next upload; publish awaits the verdict
    const verdict = startImageCheck(d.paths, this.qemuImg, up.put.kind, up.file);
    d.uploads.set(up.put.key, { kind: up.put.kind, file: up.file, size: up.position, ...(alg === 'sha256' ? { sha256: digest } : {}), verdict });
    await this.send(receiverReply.end(up.position, alg, digest));
  }

  private takeUpload(d: DiskSession, key: string, kind: PutMessage['kind'], field: string): UploadedFile {
    const u = d.uploads.get(key);
    if (!u || u.kind !== kind) {
      throw new OnestorError(ErrorCodes.PROTOCOL, `no verified ${kind} upload with key ${key} in this session`, this.ctx({ field }));
    }
    return u;
  }

  private async onPublish(msg: Extract<ClientMessage, { type: 'publish' }>): Promise<void> {
    const d = this.requireDisk('publish');
    const c: PublishContext = {
      paths: d.paths,
      qemuImg: this.qemuImg,
      vmDirId: d.vmDirId,
      baseAtOpen: d.baseAtOpen,
      ...(this.opts.log ? { log: this.opts.log } : {}),
      ...(this.opts.onStep ? { onStep: this.opts.onStep } : {}),
    };
    // Under the session's disk lock: the manifest cannot change between this read and the publish.
    const prev = await readValidManifest(d.paths);
    const nowSec = Math.floor(Date.now() / 1000);
    if (msg.mode === 'incremental') assertMayIncrement(prev, this.opts.identity, d.paths, nowSec);
    const own = ownershipForPublish(prev, this.opts.identity, msg.checkpoint, nowSec);
    // msg.sourceHost is the client's word: the manifest names the authenticated writer instead.
    const meta = { checkpoint: msg.checkpoint, capturedAt: msg.capturedAt, consistency: msg.consistency, sourceHost: this.opts.identity, ownership: own.fields };
    let manifest;
    if (msg.mode === 'full') {
      const base1 = this.takeUpload(d, msg.base1, 'base1', 'base1');
      const base = msg.base !== undefined ? this.takeUpload(d, msg.base, 'base', 'base') : undefined;
      const r = await publishFull(c, base ? { base, base1 } : { base1 }, meta);
      d.vmDirId = r.vmDirId;
      manifest = r.manifest;
      d.uploads.delete(msg.base1);
      if (msg.base !== undefined) d.uploads.delete(msg.base);
    } else {
      const inc = this.takeUpload(d, msg.inc, 'inc', 'inc');
      manifest = await publishIncremental(c, inc, { ...meta, checkpoint: msg.checkpoint, parentCheckpoint: msg.parentCheckpoint });
      d.uploads.delete(msg.inc);
    }
    for (const k of msg.mode === 'full' ? [msg.base1, msg.base] : [msg.inc]) if (k !== undefined) await this.ledger?.lower(this.resvKey(k), 0);
    await dropStaleUploads(d.paths, new Set([...d.uploads.values()].map((u) => u.file)));
    d.baseAtOpen = await baseOnReplica(d.paths, manifest);
    this.opts.log?.({ ...this.ctx(), mode: msg.mode, checkpoint: manifest.checkpoint }, 'published');
    await this.recordOwnership(d.paths, msg.mode, manifest.checkpoint, own.takeover, own.handover);
    await this.send(receiverReply.publish(toWireManifest(manifest)));
    // a seed's spare, after the reply; never rejects (it logs and leaves the spare to the next incremental)
    // the trash (the old A/B copies a full moved aside) is emptied first: the spare copy needs that room
    if (msg.mode === 'full') this.afterPublish = this.emptyTrash().then(() => prepareSpareAfterSeed(c));
  }

  private async settleAfterPublish(): Promise<void> {
    const job = this.afterPublish;
    this.afterPublish = null;
    if (job) await job;
    this.closingAfterPublish = false;
  }

  /**
   * The owner releases the open disk's lineage to `to` (live migration). Under the session's disk lock: the
   * manifest read here is the one rewritten, and the release is bound to its token (any later publish voids it).
   */
  private async onRelease(to: string, ttlSec: number): Promise<void> {
    const d = this.requireDisk('release');
    const prev = await readValidManifest(d.paths);
    const now = Math.floor(Date.now() / 1000);
    let release;
    try {
      release = makeRelease(prev, this.opts.identity, to, ttlSec, now, d.paths);
    } catch (e) {
      this.opts.log?.({ ...this.ctx(), to: to.slice(0, 255), owner: prev?.owner ?? null, err: describeError(e) }, 'lineage release refused', 'warn');
      throw e;
    }
    if (d.vmDirId !== null) await assertSameVmDir(d.paths, d.vmDirId);
    await writeManifest(d.paths, { ...prev!, release });
    this.opts.log?.({ ...this.ctx(), to: release.to, until: release.until, checkpoint: release.checkpoint }, `lineage released to ${release.to} (a live migration): it may continue it with an incremental until ${new Date(release.until * 1000).toISOString()}`, 'warn');
    await this.send(receiverReply.release(release));
  }

  /** After a publish: the take-over warning and ledger entry (or the hand-over's), the writer's record. Never fails the publish. */
  private async recordOwnership(p: ReplicaPaths, mode: 'full' | 'incremental', checkpoint: string | null, takeover: { from: string; to: string } | null, handover: { from: string; to: string } | null = null): Promise<void> {
    const at = Math.floor(Date.now() / 1000);
    if (handover) {
      this.opts.log?.({ vm: p.vm, disk: p.disk, from: handover.from, to: handover.to, checkpoint }, `lineage handed over: ${handover.from} -> ${handover.to} (${mode} publish on ${handover.from}'s release)`, 'warn');
      await appendTakeover(this.opts.snapsDir, { at, vm: p.vm, disk: p.disk, from: handover.from, to: handover.to, checkpoint }, 'handover').catch((e: unknown) =>
        this.opts.log?.({ vm: p.vm, disk: p.disk, err: describeError(e) }, 'could not append the hand-over to the ledger', 'warn'),
      );
    }
    if (takeover) {
      this.opts.log?.({ vm: p.vm, disk: p.disk, from: takeover.from, to: takeover.to, checkpoint }, `lineage taken over: ${takeover.from} -> ${takeover.to} (full publish)`, 'warn');
      await appendTakeover(this.opts.snapsDir, { at, vm: p.vm, disk: p.disk, from: takeover.from, to: takeover.to, checkpoint }).catch((e: unknown) =>
        this.opts.log?.({ vm: p.vm, disk: p.disk, err: describeError(e) }, 'could not append the take-over to the ledger', 'warn'),
      );
    }
    await recordWriter(this.opts.snapsDir, { identity: this.opts.identity, lastPublishAt: at, lastVm: p.vm, lastDisk: p.disk, lastMode: mode }).catch((e: unknown) =>
      this.opts.log?.({ err: describeError(e) }, 'could not record the writer in the ledger', 'warn'),
    );
  }

  private async closeDisk(): Promise<void> {
    const d = this.disk;
    this.disk = null;
    // what this disk did not publish is dropped with it (one disk open at a time); the slot goes with the
    // disk: the next open competes (fairly) again
    try {
      await this.unbindLedger();
    } finally {
      await this.releaseSlot();
      if (d) await unlockDisk(d.paths, d.lock);
    }
  }

  private async releaseSlot(): Promise<void> {
    const slot = this.slot;
    this.slot = null;
    if (slot) await slot.release().catch(() => {});
  }

  /** Deletes what was moved to the trash (by this session or one that died before it could); never rejects. */
  private async emptyTrash(): Promise<void> {
    const t0 = Date.now();
    const removed = await emptyTrash(this.opts.snapsDir).catch((e: unknown) => {
      this.opts.log?.({ err: describeError(e) }, 'emptying the trash failed; the next session retries', 'warn');
      return 0;
    });
    if (removed > 0) this.opts.log?.({ removed, ms: Date.now() - t0 }, 'trash emptied');
  }

  async cleanup(): Promise<void> {
    await this.settleAfterPublish();
    if (this.upload) {
      // Keep the partial file: the next session resumes from it.
      await this.flush(this.upload).catch(() => {});
      await this.upload.syncing;
      await this.closeUpload(this.upload);
      this.upload = null;
    }
    await this.closeDisk().catch(() => {});
    // after the sweep, which moves what it reclaims into the trash
    if (this.sweep) await this.sweep;
    await this.emptyTrash();
    await this.unbindLedger().catch(() => {});
    await this.releaseSlot();
  }
}

/** Room a base.1 or an increment needs after its upload: the A/B spare (copy at seed, merge growth later). */
function spareBytes(put: PutMessage): number {
  return put.kind === 'base' ? 0 : put.size;
}

async function spaceOf(dir: string): Promise<{ total: number; used: number; avail: number; usedPercent: number }> {
  const s = await fsp.statfs(dir);
  const used = (s.blocks - s.bfree) * s.bsize;
  const avail = s.bavail * s.bsize;
  // Like df: the root reserve counts neither as used nor as available.
  const total = used + avail;
  return { total, used, avail, usedPercent: total > 0 ? (used / total) * 100 : 100 };
}

