/**
 * The bytes of a streamed qcow2 overlay: the plan's metadata, then every data run read through `read`
 * (the NBD export of the point-in-time view), a few reads in flight so the source and the link both stay
 * busy. Exactly plan.fileSize bytes come out, or an error: a reader that returns the wrong length is refused.
 *
 * With `lend`, data chunks are LENT: the stream reads into a fixed set of buffers (depth + 1) and reuses a
 * chunk's buffer once the consumer asks for the next chunk, so the consumer must be done with it by then
 * (written out, not just queued; ReceiverConnection.uploadStream is). A fresh 1 MiB buffer per read made
 * V8 run a full mark-compact every few dozen MiB (external memory): a tenth of a seed's CPU here.
 */
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import type { Qcow2StreamPlan } from '../libvirt/qcow2-writer.js';

/** Reads [offset, offset+length): into `into` (returning its first `length` bytes) when given, else a new buffer. */
export type RangeReader = (offset: number, length: number, into?: Buffer) => Promise<Buffer>;

/** below the 1 MiB at which QEMU's NBD server starts faulting in a fresh buffer per request (see below) */
export const DEFAULT_READ_BYTES = 512 * 1024;

export interface OverlayStreamOptions {
  /** bytes per read (rounded down to whole clusters; <= the protocol's 4 MiB data frame) */
  readSize?: number;
  /** reads in flight */
  depth?: number;
  signal?: AbortSignal;
  /** lend data chunks from a fixed set of buffers (see above) instead of a new buffer per read */
  lend?: boolean;
}

export async function* overlayStream(plan: Qcow2StreamPlan, read: RangeReader, o: OverlayStreamOptions = {}): AsyncGenerator<Buffer> {
  const cs = plan.clusterSize;
  // 16 reads in flight (QEMU serves up to 16 requests per NBD client at once) of 512 KiB: QEMU 7.2 gives
  // every read of 1 MiB or more a buffer of fresh pages (1 GiB read as 1 MiB requests: 240 000 minor
  // faults in QEMU, 4.0 CPU-s; as 512 KiB: 2 400 faults, 0.6 CPU-s; 992 KiB still fine). bench/README.md
  const readSize = Math.max(cs, Math.floor((o.readSize ?? DEFAULT_READ_BYTES) / cs) * cs);
  const depth = Math.max(1, o.depth ?? 16);
  let produced = 0;
  for (const b of plan.metadata()) {
    produced += b.length;
    yield b;
  }
  // the read requests in file order: each piece of each data run; the tail of a run padded to its cluster
  function* pieces(): Generator<{ offset: number; length: number; padded: number }> {
    for (const r of plan.dataRuns) {
      for (let at = r.start; at < r.start + r.length; at += readSize) {
        const length = Math.min(readSize, r.start + r.length - at);
        yield { offset: at, length, padded: Math.ceil(length / cs) * cs };
      }
    }
  }
  // lent buffers: one per read in flight and the one the consumer holds; each is a whole number of clusters
  const free: Buffer[] = o.lend ? Array.from({ length: depth + 1 }, () => Buffer.allocUnsafe(readSize)) : [];
  const inflight: Array<{ p: Promise<Buffer>; length: number; padded: number; offset: number; into?: Buffer }> = [];
  const it = pieces();
  const fill = () => {
    while (inflight.length < depth) {
      const into = o.lend ? free.pop() : undefined;
      if (o.lend && !into) return;
      const n = it.next();
      if (n.done) {
        if (into) free.push(into);
        return;
      }
      const p = into ? read(n.value.offset, n.value.length, into) : read(n.value.offset, n.value.length);
      p.catch(() => {}); // awaited in order below; keep an early rejection from being unhandled
      inflight.push({ p, ...n.value, ...(into ? { into } : {}) });
    }
  };
  try {
    fill();
    while (inflight.length > 0) {
      if (o.signal?.aborted) throw new OnestorError(ErrorCodes.ABORTED, 'stream aborted');
      const head = inflight.shift()!;
      const buf = await head.p;
      fill();
      if (buf.length !== head.length) throw new OnestorError(ErrorCodes.NBD, `read of [${head.offset}, +${head.length}) returned ${buf.length} bytes`);
      let out: Buffer;
      if (head.into) {
        // the reader filled our buffer (a reader that answers with its own buffer is copied in)
        if (buf.buffer !== head.into.buffer || buf.byteOffset !== head.into.byteOffset) buf.copy(head.into);
        head.into.fill(0, head.length, head.padded);
        out = head.into.subarray(0, head.padded);
      } else {
        out = head.padded === head.length ? buf : Buffer.concat([buf, Buffer.alloc(head.padded - head.length)]);
      }
      produced += out.length;
      yield out;
      // the consumer asked for the next chunk: it is done with this one
      if (head.into) {
        free.push(head.into);
        fill();
      }
    }
  } finally {
    inflight.length = 0;
  }
  if (produced !== plan.fileSize) throw new OnestorError(ErrorCodes.INTERNAL, `overlay stream produced ${produced} bytes, planned ${plan.fileSize}`);
}
