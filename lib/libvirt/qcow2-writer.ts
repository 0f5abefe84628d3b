/**
 * A qcow2 (v3) overlay laid out for streaming, PURE (sans-IO). The map of what the overlay holds is known
 * before any data is read, so every piece of metadata can come first and the file is produced front to
 * back in one pass: header | L1 | refcount table | refcount blocks | L2 tables | data clusters in guest order.
 * The receiver writes it sequentially like any upload and `qemu-img check`s it before publishing.
 *
 * Why not let qemu-img write it: qcow2 output needs a seekable local file (a full-size staging copy on the
 * hypervisor, which is what a seed must avoid), and qemu-img cannot write qcow2 to a pipe.
 *
 * Every cluster has refcount 1; L1/L2 entries carry QCOW_OFLAG_COPIED accordingly. Zero runs become
 * "all zeros" L2 entries (read as zeros, hiding the backing file) and take no space.
 */

export const QCOW2_MAGIC = 0x514649fb;
const OFLAG_COPIED = 1n << 63n;
const L2_ZERO_FLAG = 1n;
const HEADER_LENGTH = 104;
const EXT_BACKING_FORMAT = 0xe2792aca;
/** refcount_order 4: 16-bit refcounts, QEMU's default */
const REFCOUNT_BITS = 16;

export interface OverlayRun {
  /** guest byte offset, cluster-aligned */
  start: number;
  /** bytes, cluster-aligned (the last run may end at the virtual size instead) */
  length: number;
  /** data: content follows in the stream; zero: reads as zeros, no space taken */
  kind: 'data' | 'zero';
}

export interface OverlaySpec {
  virtualSize: number;
  clusterBits?: number;
  /** stored backing name, e.g. `disk.0.snap/base` */
  backingFile: string;
  backingFormat: string;
  /** sorted, non-overlapping, cluster-aligned; guest ranges absent from the list read from the backing file */
  runs: readonly OverlayRun[];
}

export interface Qcow2StreamPlan {
  clusterSize: number;
  /** exact size of the produced file */
  fileSize: number;
  /** bytes of metadata at the start of the file (header, tables) */
  metadataBytes: number;
  /** data runs in file order; each contributes ceil(length / clusterSize) clusters (the tail zero-padded) */
  dataRuns: OverlayRun[];
  dataClusters: number;
  /** yields the metadata, metadataBytes in total, in cluster-sized or larger buffers */
  metadata(): Generator<Buffer>;
}

export class Qcow2PlanError extends Error {}

const MAX_VIRTUAL_SIZE = 2 ** 53 - 2 ** 30; // beyond any real disk; keeps offsets exact in a JS number

function ceilDiv(a: number, b: number): number {
  return Math.floor((a + b - 1) / b);
}

export function planQcow2Overlay(spec: OverlaySpec): Qcow2StreamPlan {
  const bits = spec.clusterBits ?? 16;
  if (!Number.isInteger(bits) || bits < 9 || bits > 21) throw new Qcow2PlanError(`cluster bits ${bits} out of range 9..21`);
  const cs = 2 ** bits;
  const vs = spec.virtualSize;
  if (!Number.isSafeInteger(vs) || vs <= 0 || vs > MAX_VIRTUAL_SIZE || vs % 512 !== 0) throw new Qcow2PlanError(`virtual size ${vs} invalid (a positive multiple of 512)`);
  const backing = Buffer.from(spec.backingFile, 'utf8');
  const fmt = Buffer.from(spec.backingFormat, 'utf8');
  if (backing.length === 0 || backing.length > 1023) throw new Qcow2PlanError('backing file name must be 1..1023 bytes');
  if (fmt.length === 0 || fmt.length > 16) throw new Qcow2PlanError('backing format name must be 1..16 bytes');
  // header + extensions (backing format, end) + backing name must fit in cluster 0
  const extLen = 8 + ceilDiv(fmt.length, 8) * 8 + 8;
  const backingOffset = HEADER_LENGTH + extLen;
  if (backingOffset + backing.length > cs) throw new Qcow2PlanError('header does not fit in one cluster');

  const virtualClusters = ceilDiv(vs, cs);
  let prevEnd = 0;
  let dataClusters = 0;
  const dataRuns: OverlayRun[] = [];
  const firstData: number[] = [];
  for (const r of spec.runs) {
    if (!Number.isSafeInteger(r.start) || !Number.isSafeInteger(r.length) || r.start < 0 || r.length <= 0) throw new Qcow2PlanError(`run [${r.start}, +${r.length}) invalid`);
    if (r.start % cs !== 0) throw new Qcow2PlanError(`run start ${r.start} not aligned to ${cs}`);
    if (r.start < prevEnd) throw new Qcow2PlanError(`runs not sorted or overlapping at ${r.start}`);
    const end = r.start + r.length;
    if (end > vs) throw new Qcow2PlanError(`run [${r.start}, +${r.length}) beyond the virtual size ${vs}`);
    if (end % cs !== 0 && end !== vs) throw new Qcow2PlanError(`run end ${end} not aligned to ${cs}`);
    if (r.kind !== 'data' && r.kind !== 'zero') throw new Qcow2PlanError(`run kind ${String(r.kind)} unknown`);
    prevEnd = end;
    firstData.push(dataClusters);
    if (r.kind === 'data') {
      dataClusters += ceilDiv(r.length, cs);
      dataRuns.push(r);
    }
  }

  const entriesPerL2 = cs / 8;
  const l1Size = ceilDiv(virtualClusters, entriesPerL2);
  const l1Clusters = Math.max(1, ceilDiv(l1Size * 8, cs));
  // L2 tables: one per 'entriesPerL2' guest clusters touched by any run
  const l2Tables: number[] = [];
  for (const r of spec.runs) {
    const first = Math.floor(r.start / cs / entriesPerL2);
    const last = Math.floor((ceilDiv(r.start + r.length, cs) - 1) / entriesPerL2);
    for (let t = first; t <= last; t++) if (l2Tables[l2Tables.length - 1] !== t) l2Tables.push(t);
  }
  const fixed = 1 + l1Clusters + l2Tables.length + dataClusters;
  const perBlock = (cs * 8) / REFCOUNT_BITS;
  let rtClusters = 1;
  let rbClusters = 1;
  for (;;) {
    const total = fixed + rtClusters + rbClusters;
    const rb = ceilDiv(total, perBlock);
    const rt = Math.max(1, ceilDiv(rb * 8, cs));
    if (rb === rbClusters && rt === rtClusters) break;
    rbClusters = rb;
    rtClusters = rt;
  }
  const totalClusters = fixed + rtClusters + rbClusters;
  const l1Off = cs;
  const rtOff = l1Off + l1Clusters * cs;
  const rbOff = rtOff + rtClusters * cs;
  const l2Off = rbOff + rbClusters * cs;
  const dataOff = l2Off + l2Tables.length * cs;
  const runs = spec.runs;

  function* metadata(): Generator<Buffer> {
    const h = Buffer.alloc(cs);
    h.writeUInt32BE(QCOW2_MAGIC, 0);
    h.writeUInt32BE(3, 4);
    h.writeBigUInt64BE(BigInt(backingOffset), 8);
    h.writeUInt32BE(backing.length, 16);
    h.writeUInt32BE(bits, 20);
    h.writeBigUInt64BE(BigInt(vs), 24);
    h.writeUInt32BE(0, 32); // no encryption
    h.writeUInt32BE(l1Size, 36);
    h.writeBigUInt64BE(BigInt(l1Off), 40);
    h.writeBigUInt64BE(BigInt(rtOff), 48);
    h.writeUInt32BE(rtClusters, 56);
    // nb_snapshots, snapshots_offset, features: 0
    h.writeUInt32BE(4, 96); // refcount_order
    h.writeUInt32BE(HEADER_LENGTH, 100);
    let p = HEADER_LENGTH;
    h.writeUInt32BE(EXT_BACKING_FORMAT, p);
    h.writeUInt32BE(fmt.length, p + 4);
    fmt.copy(h, p + 8);
    p += 8 + ceilDiv(fmt.length, 8) * 8;
    p += 8; // end-of-extensions: type 0, length 0 (already zero)
    backing.copy(h, p);
    yield h;

    const l1 = Buffer.alloc(l1Clusters * cs);
    l2Tables.forEach((t, i) => l1.writeBigUInt64BE(BigInt(l2Off + i * cs) | OFLAG_COPIED, t * 8));
    yield l1;

    const rt = Buffer.alloc(rtClusters * cs);
    for (let i = 0; i < rbClusters; i++) rt.writeBigUInt64BE(BigInt(rbOff + i * cs), i * 8);
    yield rt;

    for (let b = 0; b < rbClusters; b++) {
      const blk = Buffer.alloc(cs);
      const from = b * perBlock;
      const n = Math.min(perBlock, totalClusters - from);
      for (let i = 0; i < n; i++) blk.writeUInt16BE(1, i * 2);
      yield blk;
    }

    let ri = 0;
    for (const t of l2Tables) {
      const l2 = Buffer.alloc(cs);
      const tFirst = t * entriesPerL2;
      const tEnd = tFirst + entriesPerL2;
      while (ri < runs.length && ceilDiv(runs[ri]!.start + runs[ri]!.length, cs) <= tFirst) ri++;
      for (let j = ri; j < runs.length; j++) {
        const r = runs[j]!;
        const c0 = r.start / cs;
        const c1 = ceilDiv(r.start + r.length, cs);
        if (c0 >= tEnd) break;
        const from = Math.max(c0, tFirst);
        const to = Math.min(c1, tEnd);
        for (let c = from; c < to; c++) {
          const e = r.kind === 'zero' ? L2_ZERO_FLAG : BigInt(dataOff + (firstData[j]! + (c - c0)) * cs) | OFLAG_COPIED;
          l2.writeBigUInt64BE(e, (c - tFirst) * 8);
        }
      }
      yield l2;
    }
  }

  return { clusterSize: cs, fileSize: totalClusters * cs, metadataBytes: dataOff, dataRuns, dataClusters, metadata };
}

/**
 * Pure: guest ranges -> overlay runs on clusters. `allocated` are the guest ranges the overlay must hold
 * (any alignment, sorted or not); each is widened to whole clusters (reading a whole cluster through the
 * point-in-time view is exact: the part outside the range reads what the backing file shows there).
 * `zero` are ranges known to read as zeros in the point-in-time view: a cluster wholly inside one is a
 * zero cluster instead of data.
 */
export function overlayRuns(
  virtualSize: number,
  clusterSize: number,
  allocated: ReadonlyArray<{ offset: number; length: number }>,
  zero: ReadonlyArray<{ offset: number; length: number }> = [],
): OverlayRun[] {
  const clusters = ceilDiv(virtualSize, clusterSize);
  // merged cluster intervals of `allocated`
  const alloc = allocated
    .filter((a) => a.length > 0)
    .map((a) => [Math.floor(a.offset / clusterSize), Math.min(clusters, ceilDiv(a.offset + a.length, clusterSize))] as [number, number])
    .filter(([s, e]) => e > s)
    .sort((a, b) => a[0] - b[0]);
  const merged: Array<[number, number]> = [];
  for (const [s, e] of alloc) {
    const last = merged[merged.length - 1];
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else merged.push([s, e]);
  }
  // clusters fully covered by zero ranges (shrink inward)
  const zc = zero
    .map((z) => [ceilDiv(z.offset, clusterSize), z.offset + z.length >= virtualSize ? clusters : Math.floor((z.offset + z.length) / clusterSize)] as [number, number])
    .filter(([s, e]) => e > s)
    .sort((a, b) => a[0] - b[0]);
  const out: OverlayRun[] = [];
  const push = (s: number, e: number, kind: 'data' | 'zero') => {
    if (e <= s) return;
    const start = s * clusterSize;
    const end = Math.min(e * clusterSize, virtualSize);
    const last = out[out.length - 1];
    if (last && last.kind === kind && last.start + last.length === start) last.length = end - last.start;
    else out.push({ start, length: end - start, kind });
  };
  let zi = 0;
  for (const [s, e] of merged) {
    let at = s;
    while (zi < zc.length && zc[zi]![1] <= at) zi++;
    let k = zi;
    while (at < e) {
      const z = zc[k];
      if (!z || z[0] >= e) {
        push(at, e, 'data');
        break;
      }
      if (z[0] > at) push(at, z[0], 'data');
      const zs = Math.max(at, z[0]);
      const ze = Math.min(e, z[1]);
      push(zs, ze, 'zero');
      at = ze;
      if (z[1] <= at) k++;
    }
  }
  return out;
}
