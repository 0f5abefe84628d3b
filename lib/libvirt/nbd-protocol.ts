/**
 * NBD client protocol, PURE (sans-IO): bytes in, bytes and events out. The adapter (nbd-client.ts) owns
 * the socket. Only what reading a libvirt pull-mode backup export needs: fixed newstyle handshake,
 * NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT, NBD_OPT_GO, then NBD_CMD_READ / NBD_CMD_BLOCK_STATUS
 * with structured replies, NBD_CMD_DISC. Spec: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
 *
 * The server is QEMU, but it serves data from a guest's disk: every length, offset and id it sends is
 * checked against what was asked before it is used (a reply may not make us allocate or write beyond a request).
 */
import { ErrorCodes, OnestorError } from '../shared/errors.js';

export const NBD_MAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const NBD_IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const NBD_OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const NBD_FLAG_FIXED_NEWSTYLE = 1;
export const NBD_FLAG_NO_ZEROES = 2;

export const NBD_OPT_ABORT = 2;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_SET_META_CONTEXT = 10;

export const NBD_REP_ACK = 1;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_FLAG_ERROR = 0x80000000;

export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_BLOCK_SIZE = 3;

export const NBD_CMD_READ = 0;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_BLOCK_STATUS = 7;

export const NBD_REPLY_FLAG_DONE = 1;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = 32769;
export const NBD_REPLY_TYPE_ERROR_OFFSET = 32770;

/** base:allocation flags */
export const NBD_STATE_HOLE = 1;
export const NBD_STATE_ZERO = 2;

/** Option replies are small (export info, context names): anything bigger is hostile. */
export const MAX_OPTION_REPLY = 64 * 1024;
/** Largest single request we make (QEMU's maximum block size is 32 MiB). */
export const MAX_REQUEST = 32 * 1024 * 1024;
/** Block status replies: 8 bytes per extent; a 1 GiB request in 512-byte extents would be 16 MiB. Cap well below. */
export const MAX_STATUS_PAYLOAD = 4 * 1024 * 1024;

export function nbdError(message: string): OnestorError {
  return new OnestorError(ErrorCodes.NBD, `NBD: ${message}`);
}

/** Accumulates stream chunks; hands out exactly-sized pieces without copying when a piece lies in one chunk. */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0;
  length = 0;

  push(b: Buffer): void {
    if (b.length === 0) return;
    this.chunks.push(b);
    this.length += b.length;
  }

  /** n bytes, or null if fewer are buffered. */
  take(n: number): Buffer | null {
    if (n > this.length) return null;
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length - this.head >= n) {
      const out = first.subarray(this.head, this.head + n);
      this.head += n;
      this.length -= n;
      if (this.head === first.length) {
        this.chunks.shift();
        this.head = 0;
      }
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length - this.head, n - filled);
      c.copy(out, filled, this.head, this.head + k);
      filled += k;
      this.head += k;
      if (this.head === c.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
    this.length -= n;
    return out;
  }

  /**
   * Copies what is still buffered into memory of its own: call before the caller reuses the buffers it
   * pushed (a socket reading into one fixed buffer).
   */
  detach(): void {
    if (this.length === 0) {
      this.chunks = [];
      this.head = 0;
      return;
    }
    const rest = this.take(this.length)!;
    this.chunks = [Buffer.from(rest)];
    this.head = 0;
    this.length = rest.length;
  }

  /** Up to n bytes that are already buffered, without copying (at least 1 when length > 0). */
  takeSome(n: number): Buffer {
    const first = this.chunks[0]!;
    const k = Math.min(n, first.length - this.head);
    return this.take(k)!;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Handshake

export interface ExportInfo {
  exportName: string;
  size: number;
  transmissionFlags: number;
  /** negotiated meta contexts: name -> id */
  contexts: Map<string, number>;
  blockSize: { minimum: number; preferred: number; maximum: number } | null;
}

function option(opt: number, data: Buffer): Buffer {
  const h = Buffer.allocUnsafe(16);
  h.writeBigUInt64BE(NBD_IHAVEOPT, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, data]);
}

function lenString(s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  const l = Buffer.allocUnsafe(4);
  l.writeUInt32BE(b.length, 0);
  return Buffer.concat([l, b]);
}

export function encodeOptStructuredReply(): Buffer {
  return option(NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0));
}

export function encodeOptSetMetaContext(exportName: string, queries: readonly string[]): Buffer {
  const n = Buffer.allocUnsafe(4);
  n.writeUInt32BE(queries.length, 0);
  return option(NBD_OPT_SET_META_CONTEXT, Buffer.concat([lenString(exportName), n, ...queries.map(lenString)]));
}

export function encodeOptGo(exportName: string): Buffer {
  const infos = Buffer.allocUnsafe(4);
  infos.writeUInt16BE(1, 0);
  infos.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 2);
  return option(NBD_OPT_GO, Buffer.concat([lenString(exportName), infos]));
}

export function encodeOptAbort(): Buffer {
  return option(NBD_OPT_ABORT, Buffer.alloc(0));
}

type Phase = 'greeting' | 'structured' | 'meta' | 'go' | 'done' | 'failed';

/**
 * Client side of the fixed newstyle handshake. push() the server's bytes; send what it returns; `result`
 * is set once NBD_OPT_GO succeeded. Structured replies are required (reads and block status rely on them).
 */
export class NbdHandshake {
  private readonly q = new ByteQueue();
  private phase: Phase = 'greeting';
  private readonly contexts = new Map<string, number>();
  private size: number | null = null;
  private tflags = 0;
  private blockSize: ExportInfo['blockSize'] = null;
  result: ExportInfo | null = null;

  /** Bytes received after the handshake ended (belong to the transmission phase). */
  leftover(): Buffer {
    return this.q.take(this.q.length) ?? Buffer.alloc(0);
  }

  constructor(
    private readonly exportName: string,
    private readonly metaContexts: readonly string[],
  ) {}

  push(chunk: Buffer): Buffer[] {
    if (this.phase === 'failed') throw nbdError('handshake already failed');
    this.q.push(chunk);
    const out: Buffer[] = [];
    try {
      for (;;) {
        if (this.phase === 'done') return out;
        if (this.phase === 'greeting') {
          const g = this.q.take(18);
          if (!g) return out;
          if (g.readBigUInt64BE(0) !== NBD_MAGIC) throw nbdError('not an NBD server (bad greeting magic)');
          if (g.readBigUInt64BE(8) !== NBD_IHAVEOPT) throw nbdError('server does not speak newstyle negotiation');
          const flags = g.readUInt16BE(16);
          if (!(flags & NBD_FLAG_FIXED_NEWSTYLE)) throw nbdError('server does not support fixed newstyle negotiation');
          const cf = Buffer.allocUnsafe(4);
          cf.writeUInt32BE(NBD_FLAG_FIXED_NEWSTYLE | (flags & NBD_FLAG_NO_ZEROES), 0);
          out.push(cf, encodeOptStructuredReply());
          this.phase = 'structured';
          continue;
        }
        const r = this.takeOptionReply();
        if (!r) return out;
        this.onReply(r, out);
      }
    } catch (e) {
      this.phase = 'failed';
      throw e;
    }
  }

  private expectedOption(): number {
    return this.phase === 'structured' ? NBD_OPT_STRUCTURED_REPLY : this.phase === 'meta' ? NBD_OPT_SET_META_CONTEXT : NBD_OPT_GO;
  }

  private pendingHeader: { opt: number; type: number; length: number } | null = null;

  private takeOptionReply(): { opt: number; type: number; data: Buffer } | null {
    if (!this.pendingHeader) {
      const h = this.q.take(20);
      if (!h) return null;
      if (h.readBigUInt64BE(0) !== NBD_OPT_REPLY_MAGIC) throw nbdError('bad option reply magic');
      const length = h.readUInt32BE(16);
      if (length > MAX_OPTION_REPLY) throw nbdError(`option reply of ${length} bytes exceeds ${MAX_OPTION_REPLY}`);
      this.pendingHeader = { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), length };
    }
    const data = this.q.take(this.pendingHeader.length);
    if (!data) return null;
    const r = { opt: this.pendingHeader.opt, type: this.pendingHeader.type, data };
    this.pendingHeader = null;
    return r;
  }

  private onReply(r: { opt: number; type: number; data: Buffer }, out: Buffer[]): void {
    const want = this.expectedOption();
    if (r.opt !== want) throw nbdError(`reply to option ${r.opt} while waiting for option ${want}`);
    if (r.type & NBD_REP_FLAG_ERROR) {
      const msg = r.data.toString('utf8').replace(/[^\x20-\x7e]/g, '?').slice(0, 200);
      const what = this.phase === 'structured' ? 'structured replies' : this.phase === 'meta' ? `meta contexts of export ${JSON.stringify(this.exportName)}` : `export ${JSON.stringify(this.exportName)}`;
      throw nbdError(`server refused ${what} (error 0x${(r.type >>> 0).toString(16)}${msg ? `: ${msg}` : ''})`);
    }
    if (this.phase === 'structured') {
      if (r.type !== NBD_REP_ACK) throw nbdError(`unexpected reply type ${r.type} to structured replies`);
      this.phase = 'meta';
      out.push(encodeOptSetMetaContext(this.exportName, this.metaContexts));
      return;
    }
    if (this.phase === 'meta') {
      if (r.type === NBD_REP_META_CONTEXT) {
        if (r.data.length < 5) throw nbdError('meta context reply too short');
        const id = r.data.readUInt32BE(0);
        const name = r.data.subarray(4).toString('utf8');
        if (!this.metaContexts.includes(name)) throw nbdError(`server chose a meta context we did not ask for: ${JSON.stringify(name.slice(0, 100))}`);
        this.contexts.set(name, id);
        return;
      }
      if (r.type !== NBD_REP_ACK) throw nbdError(`unexpected reply type ${r.type} to meta contexts`);
      this.phase = 'go';
      out.push(encodeOptGo(this.exportName));
      return;
    }
    // go
    if (r.type === NBD_REP_INFO) {
      if (r.data.length < 2) throw nbdError('info reply too short');
      const info = r.data.readUInt16BE(0);
      if (info === NBD_INFO_EXPORT) {
        if (r.data.length !== 12) throw nbdError('export info of wrong length');
        const size = r.data.readBigUInt64BE(2);
        if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw nbdError(`export size ${size} is too large`);
        this.size = Number(size);
        this.tflags = r.data.readUInt16BE(10);
      } else if (info === NBD_INFO_BLOCK_SIZE) {
        if (r.data.length !== 14) throw nbdError('block size info of wrong length');
        this.blockSize = { minimum: r.data.readUInt32BE(2), preferred: r.data.readUInt32BE(6), maximum: r.data.readUInt32BE(10) };
      }
      // other infos (name, description) are not needed
      return;
    }
    if (r.type !== NBD_REP_ACK) throw nbdError(`unexpected reply type ${r.type} to go`);
    if (this.size === null) throw nbdError('server ended go without export info');
    this.phase = 'done';
    this.result = { exportName: this.exportName, size: this.size, transmissionFlags: this.tflags, contexts: this.contexts, blockSize: this.blockSize };
  }
}

// ---------------------------------------------------------------------------------------------------------
// Transmission

export function encodeRequest(type: number, cookie: bigint, offset: number, length: number, flags = 0): Buffer {
  const b = Buffer.allocUnsafe(28);
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeBigUInt64BE(BigInt(offset), 16);
  b.writeUInt32BE(length, 24);
  return b;
}

export interface Extent {
  offset: number;
  length: number;
  /** base:allocation flags (NBD_STATE_HOLE | NBD_STATE_ZERO) */
  flags: number;
}

export type ReplyEvent =
  /** A piece of read data for [offset, offset + data.length). Pieces of one chunk arrive in order. */
  | { kind: 'data'; cookie: bigint; offset: number; data: Buffer }
  | { kind: 'hole'; cookie: bigint; offset: number; length: number }
  | { kind: 'status'; cookie: bigint; contextId: number; extents: Extent[] }
  | { kind: 'error'; cookie: bigint; errno: number; message: string }
  /** the request is complete (after its last chunk) */
  | { kind: 'done'; cookie: bigint };

interface Outstanding {
  type: number;
  offset: number;
  length: number;
  /** bytes covered by data/hole chunks so far (reads) */
  covered: number;
  /** covered ranges (reads): overlap or a gap is a protocol error */
  ranges: Array<[number, number]>;
  statusSeen: Set<number>;
  failed: boolean;
}

/**
 * Parses the transmission phase. Every request must be registered (`expect`) before its reply can arrive;
 * a reply for an unknown cookie, a chunk outside its request's range, a read not fully covered, an unknown
 * context id or an oversized payload is an E_NBD error and the connection must be dropped.
 */
export class NbdReplyParser {
  private readonly q = new ByteQueue();
  private readonly outstanding = new Map<bigint, Outstanding>();
  private failed: OnestorError | null = null;
  /** state of a data chunk being streamed out piece by piece */
  private dataLeft = 0;
  private dataCookie = 0n;
  private dataOffset = 0;
  private dataDone = false;
  private header: { flags: number; type: number; cookie: bigint; length: number } | null = null;

  constructor(
    private readonly exportSize: number,
    private readonly contextIds: ReadonlySet<number>,
  ) {}

  expect(cookie: bigint, type: number, offset: number, length: number): void {
    if (this.outstanding.has(cookie)) throw nbdError(`cookie ${cookie} already in use`);
    if (length <= 0 || length > 0xffffffff || offset < 0 || offset + length > this.exportSize) throw nbdError(`request [${offset}, +${length}) outside the export (${this.exportSize} bytes)`);
    this.outstanding.set(cookie, { type, offset, length, covered: 0, ranges: [], statusSeen: new Set(), failed: false });
  }

  get pending(): number {
    return this.outstanding.size;
  }

  /**
   * Decodes what `chunk` completes. Data events point into `chunk`: consume them before pushing again.
   * Nothing of `chunk` is kept after the call (partial headers are copied), so a caller may reuse it.
   */
  push(chunk: Buffer): ReplyEvent[] {
    if (this.failed) throw this.failed;
    this.q.push(chunk);
    const out: ReplyEvent[] = [];
    try {
      this.decode(out);
      this.q.detach();
    } catch (e) {
      this.failed = e instanceof OnestorError ? e : nbdError(String(e));
      throw this.failed;
    }
    return out;
  }

  /** At end of stream: anything outstanding or partial means the server went away mid-reply. */
  end(): void {
    if (this.failed) throw this.failed;
    if (this.q.length > 0 || this.header || this.dataLeft > 0 || this.outstanding.size > 0) {
      this.failed = nbdError('connection closed in the middle of a reply (truncated)');
      throw this.failed;
    }
  }

  private decode(out: ReplyEvent[]): void {
    for (;;) {
      if (this.dataLeft > 0) {
        if (this.q.length === 0) return;
        const piece = this.q.takeSome(this.dataLeft);
        out.push({ kind: 'data', cookie: this.dataCookie, offset: this.dataOffset, data: piece });
        this.dataOffset += piece.length;
        this.dataLeft -= piece.length;
        if (this.dataLeft > 0) return;
        if (this.dataDone) this.finish(this.dataCookie, out);
        continue;
      }
      if (!this.header) {
        if (this.q.length < 4) return;
        const magicPeek = this.q.take(4)!;
        const magic = magicPeek.readUInt32BE(0);
        if (magic === NBD_SIMPLE_REPLY_MAGIC) {
          // Simple replies are allowed for requests without payload (we never get one for reads: structured).
          const rest = this.takeOrUnshift(magicPeek, 12);
          if (!rest) return;
          const errno = rest.readUInt32BE(0);
          const cookie = rest.readBigUInt64BE(4);
          const o = this.req(cookie);
          if (errno === 0 && o.type === NBD_CMD_READ) throw nbdError('simple reply to a read (structured replies were negotiated)');
          if (errno !== 0) out.push({ kind: 'error', cookie, errno, message: '' });
          this.finish(cookie, out, errno !== 0);
          continue;
        }
        if (magic !== NBD_STRUCTURED_REPLY_MAGIC) throw nbdError(`bad reply magic 0x${magic.toString(16)}`);
        const rest = this.takeOrUnshift(magicPeek, 16);
        if (!rest) return;
        this.header = { flags: rest.readUInt16BE(0), type: rest.readUInt16BE(2), cookie: rest.readBigUInt64BE(4), length: rest.readUInt32BE(12) };
      }
      const h = this.header;
      const o = this.req(h.cookie);
      const done = (h.flags & NBD_REPLY_FLAG_DONE) !== 0;
      if (h.type === NBD_REPLY_TYPE_OFFSET_DATA) {
        if (o.type !== NBD_CMD_READ) throw nbdError('data chunk for a request that is not a read');
        if (h.length < 8 || h.length - 8 > o.length) throw nbdError(`data chunk of ${h.length} bytes for a read of ${o.length}`);
        const off = this.q.take(8);
        if (!off) return;
        const offset = this.offsetIn(off.readBigUInt64BE(0), h.length - 8, o);
        this.header = null;
        this.cover(o, offset, h.length - 8);
        this.dataLeft = h.length - 8;
        this.dataCookie = h.cookie;
        this.dataOffset = offset;
        this.dataDone = done;
        if (this.dataLeft === 0) throw nbdError('empty data chunk');
        continue;
      }
      // every other chunk type is read whole: bound its size first
      const max = h.type === NBD_REPLY_TYPE_BLOCK_STATUS ? MAX_STATUS_PAYLOAD : MAX_OPTION_REPLY;
      if (h.length > max) throw nbdError(`reply chunk type ${h.type} of ${h.length} bytes exceeds ${max}`);
      const p = this.q.take(h.length);
      if (!p) return;
      this.header = null;
      switch (h.type) {
        case NBD_REPLY_TYPE_NONE:
          if (h.length !== 0 || !done) throw nbdError('malformed NONE chunk');
          break;
        case NBD_REPLY_TYPE_OFFSET_HOLE: {
          if (o.type !== NBD_CMD_READ) throw nbdError('hole chunk for a request that is not a read');
          if (h.length !== 12) throw nbdError('hole chunk of wrong length');
          const size = p.readUInt32BE(8);
          if (size === 0) throw nbdError('empty hole chunk');
          const offset = this.offsetIn(p.readBigUInt64BE(0), size, o);
          this.cover(o, offset, size);
          out.push({ kind: 'hole', cookie: h.cookie, offset, length: size });
          break;
        }
        case NBD_REPLY_TYPE_BLOCK_STATUS: {
          if (o.type !== NBD_CMD_BLOCK_STATUS) throw nbdError('block status chunk for a request that is not block status');
          if (h.length < 12 || (h.length - 4) % 8 !== 0) throw nbdError('block status chunk of wrong length');
          const id = p.readUInt32BE(0);
          if (!this.contextIds.has(id)) throw nbdError(`block status for unknown context id ${id}`);
          if (o.statusSeen.has(id)) throw nbdError(`two block status chunks for context ${id}`);
          o.statusSeen.add(id);
          out.push({ kind: 'status', cookie: h.cookie, contextId: id, extents: this.extents(p, o) });
          break;
        }
        case NBD_REPLY_TYPE_ERROR:
        case NBD_REPLY_TYPE_ERROR_OFFSET: {
          if (h.length < 6) throw nbdError('error chunk too short');
          const errno = p.readUInt32BE(0);
          const ml = p.readUInt16BE(4);
          if (6 + ml > h.length) throw nbdError('error chunk message overruns the chunk');
          const message = p.subarray(6, 6 + ml).toString('utf8').replace(/[^\x20-\x7e]/g, '?').slice(0, 200);
          if (errno === 0) throw nbdError('error chunk with error 0');
          o.failed = true;
          out.push({ kind: 'error', cookie: h.cookie, errno, message });
          break;
        }
        default:
          throw nbdError(`unknown reply chunk type ${h.type}`);
      }
      if (done) this.finish(h.cookie, out);
    }
  }

  /** takes `n` more bytes after an already-taken prefix; puts the prefix back when they are not there yet */
  private takeOrUnshift(prefix: Buffer, n: number): Buffer | null {
    const rest = this.q.take(n);
    if (rest) return rest;
    const saved = Buffer.concat([prefix, this.q.take(this.q.length)!]);
    this.q.push(saved);
    return null;
  }

  private req(cookie: bigint): Outstanding {
    const o = this.outstanding.get(cookie);
    if (!o) throw nbdError(`reply for unknown cookie ${cookie}`);
    return o;
  }

  private offsetIn(big: bigint, len: number, o: Outstanding): number {
    if (big > BigInt(Number.MAX_SAFE_INTEGER)) throw nbdError('chunk offset out of range');
    const offset = Number(big);
    if (offset < o.offset || offset + len > o.offset + o.length) throw nbdError(`chunk [${offset}, +${len}) outside its request [${o.offset}, +${o.length})`);
    return offset;
  }

  private cover(o: Outstanding, offset: number, len: number): void {
    for (const [s, e] of o.ranges) if (offset < e && s < offset + len) throw nbdError('overlapping read chunks');
    o.ranges.push([offset, offset + len]);
    o.covered += len;
  }

  private extents(p: Buffer, o: Outstanding): Extent[] {
    const out: Extent[] = [];
    let at = o.offset;
    const end = o.offset + o.length;
    for (let i = 4; i < p.length && at < end; i += 8) {
      const len = p.readUInt32BE(i);
      const flags = p.readUInt32BE(i + 4);
      if (len === 0) throw nbdError('zero-length extent');
      if (at + len > this.exportSize) throw nbdError(`extent [${at}, +${len}) beyond the end of the export (${this.exportSize})`);
      // a server may describe more than was asked; keep to the request
      const take = Math.min(len, end - at);
      out.push({ offset: at, length: take, flags });
      at += take;
    }
    if (out.length === 0) throw nbdError('block status without extents');
    return out;
  }

  private finish(cookie: bigint, out: ReplyEvent[], errored = false): void {
    const o = this.req(cookie);
    this.outstanding.delete(cookie);
    if (!errored && !o.failed) {
      if (o.type === NBD_CMD_READ && o.covered !== o.length) throw nbdError(`read of ${o.length} bytes answered with ${o.covered}`);
      if (o.type === NBD_CMD_BLOCK_STATUS && o.statusSeen.size === 0) throw nbdError('block status answered without extents');
    }
    out.push({ kind: 'done', cookie });
  }
}
