/**
 * Agent side of the replica protocol. ReceiverConnection speaks lib/protocol.ts over any pair of streams
 * (the system's ssh or an ssh2 exec channel in production, an in-process pipe in tests); ReplicaClient
 * opens that channel, checking the replica's host key against known_hosts.
 */
import * as fsp from 'node:fs/promises';
import type { Readable, Writable } from 'node:stream';
import net from 'node:net';
import { Client, type ClientChannel, type ConnectConfig } from 'ssh2';
import type { z } from 'zod';
import { ErrorCodes, OnestorError, describeError } from '../shared/errors.js';
import { abortError, raceAbort, throwIfAborted } from '../shared/abort.js';
import { checkHostKey, formatKnownHostsLine, hostKeyAlgorithmsFor, hostKeyError, parseKnownHosts, pinnedKnownHosts } from './known-hosts.js';
import { classifySshFailure, PINNED_ALIAS, spawnOpenSsh, sshComplaint } from './openssh.js';
import { lentFileChunks } from './file-chunks.js';
import { digestFor, newDigest, type DigestAlg } from '../protocol/digest.js';
import type { ReplicaManifest } from '../shared/model.js';
import {
  FrameDecoder,
  PROTOCOL_VERSION,
  encodeControl,
  encodeData,
  endOkSchema,
  helloOkSchema,
  openOkSchema,
  parseReply,
  plainOkSchema,
  publishOkSchema,
  releaseOkSchema,
  type LineageRelease,
  putOkSchema,
  statusOkSchema,
  type HelloOk,
  type StatusOk,
  type UploadKind,
} from '../protocol/protocol.js';
import { clientMessage, type Built } from '../protocol/messages.js';
import type { ClientMessage } from '../protocol/protocol.js';
import type { TokenBucket } from './throttle.js';
import { DEFAULT_CIPHERS, DEFAULT_REPLICA_TRANSPORT } from '../shared/defaults.js';

export { DEFAULT_CIPHERS };

export const AGENT_PROTOCOL_VERSION = PROTOCOL_VERSION;
const DEFAULT_CHUNK = 2 * 1024 * 1024;

export interface UploadOptions {
  key: string;
  sha256?: string;
  onProgress?: (sent: number, total: number) => void;
  /**
   * Ends the upload promptly wherever it waits (the next chunk of the source, the channel's drain, the
   * bandwidth limit): the channel is dropped (the receiver keeps what it got, for a resume) and the upload
   * fails with the signal's reason when that is an OnestorError (E_YIELDED, E_NOSPACE), else E_ABORTED.
   */
  signal?: AbortSignal;
}

export interface UploadResult {
  bytes: number;
  /** the end-to-end digest both ends agreed on (lib/protocol/digest.ts) */
  digest: DigestAlg;
  hex: string;
  resumedFrom: number;
}

export interface PublishFullArgs {
  checkpoint: string | null;
  capturedAt: number;
  consistency: ReplicaManifest['consistency'];
  sourceHost: string;
  /** Key of an uploaded base; omit when the replica already holds an identical base. */
  base?: string;
  base1: string;
}

export interface PublishIncrementalArgs {
  parentCheckpoint: string;
  checkpoint: string;
  capturedAt: number;
  consistency: ReplicaManifest['consistency'];
  sourceHost: string;
  inc: string;
}

export interface DiskSession {
  readonly vm: number;
  readonly disk: number;
  readonly manifest: ReplicaManifest | null;
  readonly baseOnReplica: { size: number; sha256: string } | null;
  upload(kind: UploadKind, localPath: string, opts: UploadOptions): Promise<UploadResult>;
  uploadStream(kind: UploadKind, source: { size: number; chunks: AsyncIterable<Buffer> }, opts: UploadOptions): Promise<UploadResult>;
  publishFull(args: PublishFullArgs): Promise<ReplicaManifest>;
  publishIncremental(args: PublishIncrementalArgs): Promise<ReplicaManifest>;
  /** The owner releases this disk's lineage to host `to` for `ttlSec` s (live migration); E_RELEASE when not the owner. */
  release(to: string, ttlSec: number): Promise<LineageRelease>;
  /** Releases the replica's per-disk lock. */
  close(): Promise<void>;
}

type Waiter = { resolve: (v: unknown) => void; reject: (e: Error) => void };

/** One receiver session over a byte stream pair. Requests are strictly one at a time. */
export class ReceiverConnection {
  private readonly decoder = new FrameDecoder();
  private readonly waiters: Waiter[] = [];
  private closedError: OnestorError | null = null;
  private busy = false;
  private drainWaiters: (() => void)[] = [];
  private helloInfo: HelloOk | null = null;
  /** Optional source of detail for "channel closed" errors (the receiver's stderr tail). */
  diagnostics: () => string = () => '';
  /** shared by every transfer of the process: the per-host bandwidth limit */
  bandwidth: TokenBucket | null = null;

  constructor(
    private readonly input: Readable,
    private readonly output: Writable,
  ) {
    input.on('data', (chunk: Buffer) => this.onData(chunk));
    input.on('end', () => this.fail(this.closedErr('receiver closed the channel')));
    input.on('close', () => this.fail(this.closedErr('receiver closed the channel')));
    input.on('error', (e: Error) => this.fail(new OnestorError(ErrorCodes.SSH, `channel error: ${e.message}`)));
    output.on('error', (e: Error) => this.fail(new OnestorError(ErrorCodes.SSH, `channel error: ${e.message}`)));
    output.on('drain', () => {
      const ws = this.drainWaiters;
      this.drainWaiters = [];
      ws.forEach((w) => w());
    });
  }

  get connected(): boolean {
    return this.closedError === null;
  }

  get receiverInfo(): HelloOk | null {
    return this.helloInfo;
  }

  private closedErr(msg: string): OnestorError {
    const detail = this.diagnostics().trim();
    return new OnestorError(ErrorCodes.SSH, detail ? `${msg}: ${detail.slice(-2000)}` : msg);
  }

  private onData(chunk: Buffer): void {
    let frames;
    try {
      frames = this.decoder.push(chunk);
    } catch (e) {
      this.fail(e as OnestorError);
      return;
    }
    for (const f of frames) {
      if (f.type === 'data') {
        this.fail(new OnestorError(ErrorCodes.PROTOCOL, 'receiver sent a data frame'));
        return;
      }
      const w = this.waiters.shift();
      if (!w) {
        this.fail(new OnestorError(ErrorCodes.PROTOCOL, `unsolicited message from receiver: ${JSON.stringify(f.message).slice(0, 200)}`));
        return;
      }
      w.resolve(f.message);
    }
  }

  private fail(err: OnestorError): void {
    if (this.closedError) return;
    this.closedError = err;
    for (const w of this.waiters.splice(0)) w.reject(err);
    for (const d of this.drainWaiters.splice(0)) d();
    this.output.destroy();
    this.input.destroy();
  }

  /** Registers the waiter for the next reply before anything is sent (an early error must find it). */
  private nextReply(): Promise<unknown> {
    if (this.closedError) return Promise.reject(this.closedError);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  /** Writes, then waits for the channel to drain when it asks to; `signal` ends that wait. */
  private async write(buf: Buffer, signal?: AbortSignal): Promise<void> {
    if (this.closedError) throw this.closedError;
    if (!this.output.write(buf)) await raceAbort(new Promise<void>((r) => this.drainWaiters.push(r)), signal, 'upload aborted');
    if (this.closedError) throw this.closedError;
  }

  /** Writes, and resolves once the channel has taken the bytes (its write callback): the buffer is free again. */
  private async writeOut(buf: Buffer, signal?: AbortSignal): Promise<void> {
    if (this.closedError) throw this.closedError;
    await raceAbort(new Promise<void>((r) => this.output.write(buf, () => r())), signal, 'upload aborted');
    if (this.closedError) throw this.closedError;
  }

  /**
   * The data frames of one upload: pulls chunks from `source` (any wait for the next one ends with the
   * signal), sends `chunk.subarray(skip)` of each in frames of at most `frame` bytes, keeps to the
   * channel's backpressure and the bandwidth limit. Stops early when the receiver answered (`stop()`).
   * Chunks are taken as LENT (file-chunks.ts, overlay-stream.ts reuse their buffers): each is written out
   * (the channel's callback) before the next is asked for.
   * Any failure or abort drops the channel: the receiver is mid-upload, and closing is the only clean way out
   * (it keeps the bytes it got, for a resume).
   */
  private async sendFrames(
    source: AsyncIterable<Buffer>,
    frame: number,
    signal: AbortSignal | undefined,
    each: (chunk: Buffer) => number,
    sent: (n: number) => void,
    stop: () => boolean,
  ): Promise<void> {
    const it = source[Symbol.asyncIterator]();
    let finished = false;
    try {
      for (;;) {
        const n = await raceAbort(it.next(), signal, 'upload aborted');
        if (n.done) {
          finished = true;
          return;
        }
        if (stop()) return;
        throwIfAborted(signal, 'upload aborted');
        const chunk = n.value;
        const skip = each(chunk);
        for (let at = skip; at < chunk.length; at += frame) {
          const piece = chunk.subarray(at, Math.min(chunk.length, at + frame));
          const [header, payload] = encodeData(piece);
          this.output.write(header);
          if (at + frame >= chunk.length) await this.writeOut(payload, signal);
          else await this.write(payload, signal);
          sent(piece.length);
          // small waits are left as debt on the bucket (the rate holds); any wait ends with the signal
          await this.bandwidth?.take(piece.length, signal, 5);
        }
      }
    } catch (e) {
      const err = e instanceof OnestorError ? e : signal?.aborted ? abortError(signal, 'upload aborted') : new OnestorError(ErrorCodes.INTERNAL, describeError(e), {}, { cause: e });
      this.fail(err);
      throw err;
    } finally {
      // Leaving early: let the source clean up. Not awaited: a source stuck in a read (an NBD export that
      // went away) settles when its owner closes it, and must not hold this upload.
      if (!finished) void it.return?.()?.catch(() => {});
    }
  }

  private async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    if (this.busy) throw new OnestorError(ErrorCodes.INTERNAL, 'concurrent requests on one receiver connection');
    this.busy = true;
    try {
      return await fn();
    } finally {
      this.busy = false;
    }
  }

  async request<T>(msg: Built<ClientMessage>, schema: z.ZodType<T>): Promise<T> {
    return this.exclusive(async () => {
      const reply = this.nextReply();
      reply.catch(() => {});
      await this.write(encodeControl(msg));
      return parseReply(schema, await reply, msg.type);
    });
  }

  async hello(host: string, agentVersion: string): Promise<HelloOk> {
    this.helloInfo = await this.request(clientMessage.hello(agentVersion, host), helloOkSchema);
    return this.helloInfo;
  }

  /** All manifests (of one VM or all), following the receiver's pages until it says there are no more. */
  async status(vm?: number): Promise<ReplicaManifest[]> {
    const out: ReplicaManifest[] = [];
    let after: { vm: number; disk: number } | null = null;
    for (;;) {
      const r: StatusOk = await this.request(clientMessage.status(vm, after), statusOkSchema);
      out.push(...r.manifests);
      // a receiver from before paging answers everything at once, without `next`
      if (!r.next) return out;
      if (after && (r.next.vm < after.vm || (r.next.vm === after.vm && r.next.disk <= after.disk))) {
        throw new OnestorError(ErrorCodes.PROTOCOL, `receiver status cursor went back from ${after.vm}/${after.disk} to ${r.next.vm}/${r.next.disk}`, { field: 'next' });
      }
      after = r.next;
    }
  }

  async openDisk(vm: number, disk: number): Promise<DiskSession> {
    const r = await this.request(clientMessage.open(vm, disk), openOkSchema);
    const conn = this;
    let open = true;
    return {
      vm,
      disk,
      manifest: r.manifest,
      baseOnReplica: r.baseOnReplica,
      upload: (kind, localPath, opts) => conn.upload(kind, localPath, opts),
      uploadStream: (kind, source, opts) => conn.uploadStream(kind, source, opts),
      publishFull: async (a) => (await conn.request(clientMessage.publishFull(a), publishOkSchema)).manifest,
      publishIncremental: async (a) =>
        (await conn.request(clientMessage.publishIncremental(a), publishOkSchema)).manifest,
      release: async (to, ttlSec) => (await conn.request(clientMessage.release(to, ttlSec), releaseOkSchema)).release,
      close: async () => {
        if (!open) return;
        open = false;
        if (conn.connected) await conn.request(clientMessage.close(), plainOkSchema);
      },
    };
  }

  /** true when the receiver answered: it owes us nothing more and we may hang up */
  async bye(): Promise<boolean> {
    if (!this.connected) return false;
    return this.request(clientMessage.bye(), plainOkSchema).then(
      () => true,
      () => false,
    );
  }

  /**
   * Streams a local file: asks where to resume, hashes as it reads (the prefix first when resuming), keeps
   * to the channel's backpressure. The receiver answers once: an early error or the verdict on `end`.
   */
  upload(kind: UploadKind, localPath: string, opts: UploadOptions): Promise<UploadResult> {
    return this.exclusive(async () => {
      const size = (await fsp.stat(localPath)).size;
      // a digest known in advance is a sha256 (base's, cached per image)
      const alg = opts.sha256 ? 'sha256' : digestFor(kind, this.helloInfo?.digests);
      const putReply = this.nextReply();
      putReply.catch(() => {});
      await this.write(encodeControl(clientMessage.put({ kind, size, key: opts.key, digest: alg, sha256: opts.sha256 })));
      const { offset } = parseReply(putOkSchema, await putReply, 'put');
      if (offset > size) throw new OnestorError(ErrorCodes.PROTOCOL, `receiver resume offset ${offset} beyond file size ${size}`);
      // A digest known in advance (computed while capturing) saves reading the file twice on this host;
      // the receiver still hashes what it got and refuses a mismatch.
      // On a resume the digest needs the prefix first; hashing it before sending would leave the receiver
      // waiting on us (it ends sessions that hold a slot without progress), so the whole file is hashed in
      // the background while the rest streams, and the send loop does not hash.
      const resumeHash = !opts.sha256 && offset > 0 ? hashFile(localPath, size, alg) : null;
      resumeHash?.catch(() => {});
      const hash = opts.sha256 || offset > 0 ? null : await newDigest(alg);
      const verdict = this.uploadVerdict();
      const chunkSize = Math.min(this.helloInfo?.maxChunk ?? DEFAULT_CHUNK, DEFAULT_CHUNK);
      let sent = offset;
      if (offset < size) {
        // lent chunks from two reused buffers (file-chunks.ts): each is written out before the next is read into it
        await this.sendFrames(
          lentFileChunks(localPath, offset, size, chunkSize),
          chunkSize,
          opts.signal,
          (chunk) => (hash?.update(chunk), 0),
          (n) => {
            sent += n;
            opts.onProgress?.(sent, size);
          },
          verdict.arrived,
        );
      }
      await verdict.throwIfEarly();
      if (sent !== size) throw new OnestorError(ErrorCodes.SIZE, `local file ${localPath} shrank while uploading`, { file: localPath });
      const hex = hash ? hash.hex() : resumeHash ? await resumeHash : opts.sha256!;
      await verdict.end(alg, hex, size);
      return { bytes: size, digest: alg, hex, resumedFrom: offset };
    });
  }

  /**
   * The receiver answers an upload once: an error as soon as it has one (disk full, bad size), else its
   * verdict on `end`. Watched from the start so the send loop can stop on an early answer.
   */
  private uploadVerdict(): { arrived: () => boolean; throwIfEarly: () => Promise<void>; end: (alg: DigestAlg, hex: string, size: number) => Promise<void> } {
    let early: unknown = undefined;
    let arrived = false;
    const verdict = this.nextReply().then(
      (v) => {
        arrived = true;
        early = v;
        return v;
      },
      (e) => {
        arrived = true;
        throw e;
      },
    );
    verdict.catch(() => {});
    return {
      arrived: () => arrived,
      throwIfEarly: async () => {
        if (!arrived) return;
        // Only an error may come before `end`; this throws it with the receiver's code.
        parseReply(endOkSchema, early ?? (await verdict), 'upload');
        throw new OnestorError(ErrorCodes.PROTOCOL, 'receiver answered an upload before its end');
      },
      end: async (alg, hex, size) => {
        await this.write(encodeControl(clientMessage.end(alg, hex)));
        const r = parseReply(endOkSchema, await verdict, 'end');
        if (r[alg] !== hex || r.bytes !== size) throw new OnestorError(ErrorCodes.DIGEST, 'receiver confirmed a different digest or size');
      },
    };
  }

  /**
   * Streams bytes produced on the fly (a seed's qcow2 overlay read from the NBD export): the size is known
   * up front, the digest is computed as the bytes pass. The chunks may be lent: each is written out before
   * the next is asked for, so the source may reuse its buffers (overlay-stream.ts). On a resume offset the source is replayed and only
   * hashed up to that offset (it is deterministic while its backup job runs).
   */
  uploadStream(kind: UploadKind, source: { size: number; chunks: AsyncIterable<Buffer> }, opts: UploadOptions): Promise<UploadResult> {
    return this.exclusive(async () => {
      const size = source.size;
      const alg = digestFor(kind, this.helloInfo?.digests);
      const hash = await newDigest(alg);
      const putReply = this.nextReply();
      putReply.catch(() => {});
      await this.write(encodeControl(clientMessage.put({ kind, size, key: opts.key, digest: alg })));
      const { offset } = parseReply(putOkSchema, await putReply, 'put');
      if (offset > size) throw new OnestorError(ErrorCodes.PROTOCOL, `receiver resume offset ${offset} beyond stream size ${size}`);
      const verdict = this.uploadVerdict();
      const frame = Math.min(this.helloInfo?.maxChunk ?? DEFAULT_CHUNK, DEFAULT_CHUNK);
      let produced = 0;
      let sent = offset;
      await this.sendFrames(
        source.chunks,
        frame,
        opts.signal,
        (chunk) => {
          if (produced + chunk.length > size) throw new OnestorError(ErrorCodes.SIZE, `stream grew beyond its announced ${size} bytes`);
          hash.update(chunk);
          const skip = Math.max(0, Math.min(chunk.length, offset - produced));
          produced += chunk.length;
          return skip;
        },
        (n) => {
          sent += n;
          opts.onProgress?.(sent, size);
        },
        verdict.arrived,
      );
      await verdict.throwIfEarly();
      if (produced !== size) throw new OnestorError(ErrorCodes.SIZE, `stream ended at ${produced} of its announced ${size} bytes`);
      const hex = hash.hex();
      await verdict.end(alg, hex, size);
      return { bytes: size, digest: alg, hex, resumedFrom: offset };
    });
  }

  destroy(): void {
    this.fail(new OnestorError(ErrorCodes.SSH, 'connection closed'));
  }
}

// ---------------------------------------------------------------------------------------------------------
// ssh2 transport

export interface ReplicaConnectOptions {
  host: string;
  port: number;
  username: string;
  /** Key contents, or a path to read it from. */
  privateKey: Buffer | string;
  knownHostsFile: string;
  acceptNewHostKey: boolean;
  ciphers?: string[];
  receiverCommand: string;
  connectTimeoutMs: number;
  keepaliveMs?: number;
  /** one bucket per process, shared by all connections (per-host limit); null/undefined = unlimited */
  bandwidth?: TokenBucket | null;
  /** Name this host gives in hello (logs, lineage). */
  localHost?: string;
  agentVersion?: string;
  /**
   * 'openssh' (default): the system's `ssh` client carries the session (lib/transfer/openssh.ts), pinned to
   * the keys known_hosts holds for the replica; an unknown host, a refused key and a key given as contents
   * go through ssh2, which records a new key (acceptNewHostKey) and explains a changed one. 'ssh2': ssh2 only.
   */
  transport?: 'openssh' | 'ssh2';
  /** the ssh program for the openssh transport */
  sshProgram?: string;
}

/** Host-key algorithms ssh2 implements (its defaults plus ssh-dss); eddsa only where the crypto has it. */
const SSH2_HOST_KEY_ALGORITHMS = ['ssh-ed25519', 'ecdsa-sha2-nistp256', 'ecdsa-sha2-nistp384', 'ecdsa-sha2-nistp521', 'rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa', 'ssh-dss'];

async function readKnownHosts(file: string): Promise<string> {
  try {
    return await fsp.readFile(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return '';
    throw new OnestorError(ErrorCodes.HOSTKEY, `cannot read known_hosts: ${(e as Error).message}`, { file });
  }
}

async function hashFile(file: string, size: number, alg: DigestAlg): Promise<string> {
  const h = await newDigest(alg);
  for await (const chunk of lentFileChunks(file, 0, size, 4 << 20)) h.update(chunk);
  return h.hex();
}

/**
 * ssh2 sends every SSH packet (at most 32 KiB of data) with its own socket write, i.e. its own syscall,
 * and most packets of a transfer go out from the window-adjust handler, not from our write. Corking the
 * socket until the end of the tick in which a write happens turns each burst (a chunk, or what one window
 * adjust releases) into one writev: measured, socket writes were the agent's largest CPU cost in a seed.
 */
export function corkPerTick(sock: net.Socket): void {
  const write = sock.write;
  let corked = false;
  const uncork = () => {
    corked = false;
    sock.uncork();
  };
  sock.write = function (this: net.Socket, ...args: unknown[]) {
    if (!corked && !sock.destroyed) {
      corked = true;
      sock.cork();
      process.nextTick(uncork);
    }
    return (write as (...a: unknown[]) => boolean).apply(this, args);
  } as net.Socket['write'];
}

export class ReplicaClient {
  private constructor(
    /** ends the transport under the session (the SSH connection, or the ssh process) */
    /** `answered`: the receiver answered `bye` (a seed's spare copy may still keep it running) */
    private readonly endTransport: (answered: boolean) => Promise<void> | void,
    readonly connection: ReceiverConnection,
    /** which transport carries the session */
    readonly transport: 'openssh' | 'ssh2',
  ) {}

  static async connect(o: ReplicaConnectOptions): Promise<ReplicaClient> {
    if ((o.transport ?? DEFAULT_REPLICA_TRANSPORT) === 'openssh' && typeof o.privateKey === 'string') {
      const known = parseKnownHosts(await readKnownHosts(o.knownHostsFile));
      const pinned = pinnedKnownHosts(known, o.host, o.port, PINNED_ALIAS);
      if (pinned) {
        const client = await ReplicaClient.connectOpenSsh(o, o.privateKey, pinned, hostKeyAlgorithmsFor(known, o.host, o.port) ?? []);
        // null: ssh refused the host key; ssh2 gives the verdict (HOST KEY CHANGED ..., or a key ssh could not use)
        if (client) return client;
      }
    }
    return ReplicaClient.connectSsh2(o);
  }

  /** The session through the system's ssh; null when ssh refused the host key, failed without saying why, or is not installed. */
  private static async connectOpenSsh(o: ReplicaConnectOptions, identityFile: string, pinned: string, hostKeyAlgorithms: string[]): Promise<ReplicaClient | null> {
    // no room for the pinned known_hosts (a TMPDIR that does not exist, a full /tmp): ssh2 needs none
    const ch = await spawnOpenSsh({
      host: o.host,
      port: o.port,
      username: o.username,
      identityFile,
      pinnedKnownHosts: pinned,
      hostKeyAlgorithms,
      ciphers: o.ciphers ?? [...DEFAULT_CIPHERS],
      receiverCommand: o.receiverCommand,
      connectTimeoutMs: o.connectTimeoutMs,
      keepaliveMs: o.keepaliveMs ?? 15_000,
      ...(o.sshProgram ? { sshProgram: o.sshProgram } : {}),
    }).catch(() => null);
    if (!ch) return null;
    const conn = new ReceiverConnection(ch.input, ch.output);
    conn.diagnostics = () => ch.stderrTail();
    conn.bandwidth = o.bandwidth ?? null;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new OnestorError(ErrorCodes.SSH, `ssh to ${o.username}@${o.host}:${o.port}: no answer within ${Math.round(o.connectTimeoutMs / 1000)} s`);
    try {
      // ConnectTimeout covers ssh's TCP connect; this covers the handshake and the receiver's start too
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(timedOut), o.connectTimeoutMs);
      });
      await Promise.race([conn.hello(o.localHost ?? 'unknown', o.agentVersion ?? '0.1.0'), timeout]);
      await ch.forgetKnownHosts();
      return new ReplicaClient((answered) => ch.close(undefined, answered), conn, 'openssh');
    } catch (e) {
      await ch.close(1000);
      // no ssh on this host: ssh2 does the same job, only with more CPU
      if (ch.failedToStart()) return null;
      // a refusal from the receiver itself (E_IDENTITY, E_BUSY, ...) is its answer, not a transport failure;
      // a replica that did not answer in time would not answer ssh2 either
      if (!(e instanceof OnestorError) || e.code !== ErrorCodes.SSH || e === timedOut) throw e;
      const stderr = ch.stderrTail();
      const why = classifySshFailure(stderr);
      if (why === 'network') throw new OnestorError(ErrorCodes.SSH, `ssh to ${o.username}@${o.host}:${o.port}: ${sshComplaint(stderr)}`, {}, { cause: e });
      // A host key ssh refused, a key it would not use (ssh refuses a private key file others can read,
      // where ssh2 did not), or a failure it did not explain: ssh2 connects as before, or says what is wrong.
      return null;
    } finally {
      clearTimeout(timer);
    }
  }

  private static async connectSsh2(o: ReplicaConnectOptions): Promise<ReplicaClient> {
    const privateKey = typeof o.privateKey === 'string' ? await fsp.readFile(o.privateKey) : o.privateKey;
    const knownText = await readKnownHosts(o.knownHostsFile);
    const known = parseKnownHosts(knownText);
    let hostKeyFailure: OnestorError | null = null;
    // Offer only the host-key types known_hosts has for this host (OpenSSH does the same): the server then
    // presents the key we can check instead of its favourite type.
    const hostKeyAlgs = hostKeyAlgorithmsFor(known, o.host, o.port, SSH2_HOST_KEY_ALGORITHMS);
    let keyToRecord: Buffer | null = null;
    const ssh = new Client();
    const config: ConnectConfig = {
      host: o.host,
      port: o.port,
      username: o.username,
      privateKey,
      readyTimeout: o.connectTimeoutMs,
      keepaliveInterval: o.keepaliveMs ?? 15_000,
      keepaliveCountMax: 4,
      algorithms: { cipher: (o.ciphers ?? [...DEFAULT_CIPHERS]) as never, ...(hostKeyAlgs ? { serverHostKey: hostKeyAlgs as never } : {}) },
      hostVerifier: (key: Buffer) => {
        const verdict = checkHostKey(known, o.host, o.port, key);
        if (verdict.status === 'unknown' && o.acceptNewHostKey) {
          keyToRecord = key;
          return true;
        }
        hostKeyFailure = hostKeyError(verdict, o.host, o.port, key, o.knownHostsFile);
        return hostKeyFailure === null;
      },
    };
    await new Promise<void>((resolve, reject) => {
      const onError = (e: Error & { level?: string }) => {
        ssh.off('ready', onReady);
        if (hostKeyFailure) return reject(hostKeyFailure);
        if (hostKeyAlgs && /no matching host key/i.test(e.message)) {
          // the replica has none of the key types we know for it: a changed key as far as we can tell
          return reject(
            new OnestorError(
              ErrorCodes.HOSTKEY,
              `HOST KEY CHANGED for [${o.host}]:${o.port}: the replica presents none of the key types ${o.knownHostsFile} holds for it ` +
                `(${hostKeyAlgs.join(', ')}); refusing to connect (possible man-in-the-middle). If the replica was reinstalled, replace its line(s).`,
              { file: o.knownHostsFile },
            ),
          );
        }
        const what = e.level === 'client-authentication' ? 'authentication refused' : e.message;
        reject(new OnestorError(ErrorCodes.SSH, `ssh to ${o.username}@${o.host}:${o.port}: ${what}`, {}, { cause: e }));
      };
      const onReady = () => {
        ssh.off('error', onError);
        resolve();
      };
      // A permanent listener from the start: a transport error after a refused handshake (the peer resets
      // the socket we are closing) must never be an uncaught 'error' that takes the whole agent down.
      ssh.on('error', () => {});
      ssh.once('error', onError);
      ssh.once('ready', onReady);
      ssh.connect(config);
    }).catch((e: unknown) => {
      ssh.end();
      throw e;
    });
    try {
      if (keyToRecord) {
        const existing = knownText;
        const line = formatKnownHostsLine(o.host, o.port, keyToRecord);
        await fsp.appendFile(o.knownHostsFile, (existing && !existing.endsWith('\n') ? '\n' : '') + line + '\n', { mode: 0o600 });
      }
      const channel = await new Promise<ClientChannel>((resolve, reject) =>
        ssh.exec(o.receiverCommand, (err, ch) => (err ? reject(new OnestorError(ErrorCodes.SSH, `exec refused: ${err.message}`)) : resolve(ch))),
      );
      const conn = new ReceiverConnection(channel, channel);
      let stderrTail = '';
      channel.stderr.on('data', (d: Buffer) => {
        stderrTail = (stderrTail + d.toString('utf8')).slice(-4000);
      });
      conn.diagnostics = () => stderrTail;
      conn.bandwidth = o.bandwidth ?? null;
      const sock = (ssh as unknown as { _sock?: unknown })._sock;
      if (sock instanceof net.Socket) corkPerTick(sock);
      const client = new ReplicaClient(() => {
        channel.end();
        ssh.end();
      }, conn, 'ssh2');
      await conn.hello(o.localHost ?? 'unknown', o.agentVersion ?? '0.1.0');
      return client;
    } catch (e) {
      ssh.end();
      throw e instanceof OnestorError ? e : new OnestorError(ErrorCodes.SSH, describeError(e), {}, { cause: e });
    }
  }

  get connected(): boolean {
    return this.connection.connected;
  }

  hello(): HelloOk | null {
    return this.connection.receiverInfo;
  }

  /** This host as the replica authenticated it (never what we claim in hello); null from older receivers. */
  get writer(): string | null {
    return this.connection.receiverInfo?.identity ?? null;
  }

  status(vm?: number): Promise<ReplicaManifest[]> {
    return this.connection.status(vm);
  }

  openDisk(vm: number, disk: number): Promise<DiskSession> {
    return this.connection.openDisk(vm, disk);
  }

  async close(): Promise<void> {
    await this.endTransport(await this.connection.bye());
  }
}
