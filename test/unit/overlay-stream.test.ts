/** The overlay byte stream over a fake range reader: exact bytes, order, padding, reader faults. */
import { describe, expect, it } from 'vitest';
import { DEFAULT_READ_BYTES, overlayStream } from '../../lib/cycle/overlay-stream.js';
import { planQcow2Overlay } from '../../lib/libvirt/qcow2-writer.js';

const cs = 65536;
const plan = planQcow2Overlay({
  virtualSize: 40 * cs + 512,
  backingFile: 'disk.0.snap/base',
  backingFormat: 'qcow2',
  runs: [
    { start: 0, length: 5 * cs, kind: 'data' },
    { start: 8 * cs, length: 2 * cs, kind: 'zero' },
    { start: 40 * cs, length: 512, kind: 'data' }, // partial tail cluster
  ],
});
const byteAt = (off: number) => (off * 31 + (off >> 16)) & 0xff;
const reader = async (offset: number, length: number) => {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = byteAt(offset + i);
  return b;
};

async function collect(it: AsyncIterable<Buffer>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const b of it) parts.push(b);
  return Buffer.concat(parts);
}

describe('overlayStream', () => {
  it('emits metadata then each data cluster in guest order, the tail zero-padded, exactly fileSize bytes', async () => {
    const reads: Array<[number, number]> = [];
    const out = await collect(overlayStream(plan, async (o, l) => (reads.push([o, l]), reader(o, l)), { readSize: 2 * cs, depth: 3 }));
    expect(out.length).toBe(plan.fileSize);
    expect(reads).toEqual([
      [0, 2 * cs],
      [2 * cs, 2 * cs],
      [4 * cs, cs],
      [40 * cs, 512],
    ]);
    const data = out.subarray(plan.metadataBytes);
    for (let i = 0; i < 5 * cs; i += 997) expect(data[i]).toBe(byteAt(i));
    expect(data.subarray(5 * cs, 5 * cs + 512)).toEqual(await reader(40 * cs, 512));
    expect(data.subarray(5 * cs + 512).every((b) => b === 0)).toBe(true);
  });

  it('by default asks for reads of 512 KiB: below the 1 MiB at which QEMU faults in a fresh buffer per request', async () => {
    const big = planQcow2Overlay({ virtualSize: 64 * 1048576, backingFile: 'disk.0.snap/base', backingFormat: 'qcow2', runs: [{ start: 0, length: 3 * 1048576 + cs, kind: 'data' }] });
    const lengths: number[] = [];
    const out = await collect(overlayStream(big, async (o, l) => (lengths.push(l), Buffer.alloc(l))));
    expect(out.length).toBe(big.fileSize);
    expect(DEFAULT_READ_BYTES).toBe(512 * 1024);
    expect(lengths).toEqual([...Array(6).fill(512 * 1024), cs]);
  });

  it('a reader returning the wrong length fails the stream', async () => {
    await expect(collect(overlayStream(plan, async (o, l) => reader(o, l - 1)))).rejects.toThrow(/returned/);
  });

  it('a reader failure propagates, and reads already in flight do not become unhandled rejections', async () => {
    let n = 0;
    const failing = async (o: number, l: number) => {
      if (n++ === 1) throw new Error('EIO from the export');
      return reader(o, l);
    };
    await expect(collect(overlayStream(plan, failing, { readSize: cs, depth: 4 }))).rejects.toThrow(/EIO/);
  });

  it('stops with E_ABORTED when the signal fires', async () => {
    const ac = new AbortController();
    const consume = async () => {
      for await (const b of overlayStream(plan, reader, { readSize: cs, signal: ac.signal })) if (b.length) ac.abort();
    };
    await expect(consume()).rejects.toMatchObject({ code: 'E_ABORTED' });
  });
});

describe('overlayStream with lent chunks', () => {
  // a reader that fills `into` a little later (as the NBD client does when the reply arrives)
  const intoReader = (calls: Buffer[]) => async (o: number, l: number, into?: Buffer) => {
    await new Promise((r) => setImmediate(r));
    const b = await reader(o, l);
    if (!into) return b;
    calls.push(into);
    b.copy(into);
    return into.subarray(0, l);
  };

  it('a chunk stays as yielded until the next is asked for; the bytes equal the unlent stream; depth + 1 buffers', async () => {
    const expected = await collect(overlayStream(plan, reader, { readSize: cs, depth: 3 }));
    const used: Buffer[] = [];
    const parts: Buffer[] = [];
    let changed = 0;
    for await (const chunk of overlayStream(plan, intoReader(used), { readSize: cs, depth: 3, lend: true })) {
      const copy = Buffer.from(chunk);
      // let every read in flight complete: one that wrote into the lent buffer would change it now
      for (let i = 0; i < 4; i++) await new Promise((r) => setImmediate(r));
      if (!copy.equals(chunk)) changed++;
      parts.push(copy);
    }
    expect(changed).toBe(0);
    expect(Buffer.concat(parts)).toEqual(expected);
    expect(new Set(used.map((b) => b.buffer)).size).toBeLessThanOrEqual(4);
  });

  it('pads a partial tail cluster with zeros inside a reused buffer (no stale bytes from an earlier read)', async () => {
    const used: Buffer[] = [];
    const parts: Buffer[] = [];
    // one buffer in flight: the 512-byte tail is read into the buffer that held a full cluster before
    for await (const chunk of overlayStream(plan, intoReader(used), { readSize: cs, depth: 1, lend: true })) parts.push(Buffer.from(chunk));
    const out = Buffer.concat(parts);
    expect(out.length).toBe(plan.fileSize);
    const tail = out.subarray(plan.metadataBytes + 5 * cs);
    expect(tail.subarray(0, 512)).toEqual(await reader(40 * cs, 512));
    expect(tail.subarray(512).every((b) => b === 0)).toBe(true);
  });
});
