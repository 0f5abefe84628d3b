/**
 * The bytes of a streamed qcow2 overlay: the plan's metadata, then every data run read through `read`
 * (the NBD export of the point-in-time view), a few reads in flight so the source and the link both stay
 * busy. Exactly plan.fileSize bytes come out, or an error: a reader that returns the wrong length is refused.
 */
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import type { Qcow2StreamPlan } from '../libvirt/qcow2-writer.js';

export type RangeReader = (offset: number, length: number) => Promise<Buffer>;

export interface OverlayStreamOptions {
  /** bytes per read (rounded down to whole clusters; <= the protocol's 4 MiB data frame) */
  readSize?: number;
  /** reads in flight */
  depth?: number;
  signal?: AbortSignal;
}

export async function* overlayStream(plan: Qcow2StreamPlan, read: RangeReader, o: OverlayStreamOptions = {}): AsyncGenerator<Buffer> {
  const cs = plan.clusterSize;
  // 16 x 1 MiB in flight: QEMU serves up to 16 requests per NBD client at once; measured on a pull-mode
  // export (1 GiB, loaded machine) 250-280 MB/s against 150-180 MB/s with 4 x 2 MiB
  const readSize = Math.max(cs, Math.floor((o.readSize ?? 1024 * 1024) / cs) * cs);
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
  const inflight: Array<{ p: Promise<Buffer>; length: number; padded: number; offset: number }> = [];
  const it = pieces();
  const fill = () => {
    while (inflight.length < depth) {
      const n = it.next();
      if (n.done) return;
      const p = read(n.value.offset, n.value.length);
      p.catch(() => {}); // awaited in order below; keep an early rejection from being unhandled
      inflight.push({ p, ...n.value });
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
      const out = head.padded === head.length ? buf : Buffer.concat([buf, Buffer.alloc(head.padded - head.length)]);
      produced += out.length;
      yield out;
    }
  } finally {
    inflight.length = 0;
  }
  if (produced !== plan.fileSize) throw new OnestorError(ErrorCodes.INTERNAL, `overlay stream produced ${produced} bytes, planned ${plan.fileSize}`);
}
