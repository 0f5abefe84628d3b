/**
 * The streamed qcow2 overlay writer: laid out front to back, then judged by the real qemu-img (check,
 * info, contents through the backing chain), and refused on hostile plans.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { run } from '../../lib/shared/exec.js';
import { overlayRuns, planQcow2Overlay, type OverlayRun } from '../../lib/libvirt/qcow2-writer.js';

const MiB = 1 << 20;
/** the image alone, its backing file not opened (as the replica checks an upload) */
const noBacking = (file: string) => `json:${JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: file } })}`;
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'qcow2w-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function sh(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args, { timeoutMs: 120_000 });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.code} ${r.stderr}`);
  return r.stdout;
}

/** guest byte at `off` written by the "source": a function of the offset so every cluster differs */
const srcByte = (off: number) => ((off >>> 16) * 7 + 1) & 0xff;

async function writeStream(file: string, runs: OverlayRun[], virtualSize: number, backing: string): Promise<ReturnType<typeof planQcow2Overlay>> {
  const plan = planQcow2Overlay({ virtualSize, backingFile: backing, backingFormat: 'qcow2', runs });
  const fh = await open(file, 'w');
  let pos = 0;
  for (const b of plan.metadata()) {
    await fh.write(b, 0, b.length, pos);
    pos += b.length;
  }
  expect(pos).toBe(plan.metadataBytes);
  for (const r of plan.dataRuns) {
    const clusters = Math.ceil(r.length / plan.clusterSize);
    const buf = Buffer.alloc(clusters * plan.clusterSize);
    for (let i = 0; i < r.length; i++) buf[i] = srcByte(r.start + i);
    await fh.write(buf, 0, buf.length, pos);
    pos += buf.length;
  }
  await fh.close();
  expect(pos).toBe(plan.fileSize);
  return plan;
}

describe('streamed qcow2 overlay, checked by qemu-img', () => {
  it('is a clean qcow2 with the stored backing name; data, zero and backing show through where they should', async () => {
    const vsize = 1536 * MiB + 12800; // three L2 tables, a partial last cluster
    // backing: 0xbb everywhere it is allocated (first 4 MiB and around the L2 boundary)
    await sh('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, 'base'), String(vsize)]);
    await sh('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xbb 0 4M', '-c', `write -P 0xbb ${511 * MiB} 2M`, path.join(dir, 'base')]);
    await sh('ln', ['-sfn', '.', path.join(dir, 'snap')]);
    const cs = 65536;
    const runs: OverlayRun[] = [
      { start: 0, length: 2 * cs, kind: 'data' },
      { start: 1 * MiB, length: 1 * MiB, kind: 'zero' }, // hides the backing's 0xbb
      { start: 512 * MiB - 3 * cs, length: 6 * cs, kind: 'data' }, // across the first L2 boundary
      { start: Math.floor(vsize / cs) * cs, length: vsize - Math.floor(vsize / cs) * cs, kind: 'data' }, // partial tail
    ];
    const file = path.join(dir, 'over.qcow2');
    const plan = await writeStream(file, runs, vsize, 'snap/base');
    expect(plan.dataClusters).toBe(2 + 6 + 1);

    const check = await run('qemu-img', ['check', '-f', 'qcow2', file]);
    expect(check.stdout + check.stderr).toMatch(/No errors were found/);
    expect(check.code).toBe(0);
    const info = JSON.parse(await sh('qemu-img', ['info', '--output=json', '-f', 'qcow2', file])) as Record<string, unknown>;
    expect(info['virtual-size']).toBe(vsize);
    expect(info['backing-filename']).toBe('snap/base');
    expect(info['backing-filename-format']).toBe('qcow2');

    // the guest view through the chain, read back as raw
    const raw = path.join(dir, 'view.raw');
    await sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', file, raw]);
    const fh = await open(raw, 'r');
    const at = async (off: number, len: number) => {
      const b = Buffer.alloc(len);
      await fh.read(b, 0, len, off);
      return b;
    };
    const expectSrc = async (off: number, len: number) => {
      const b = await at(off, len);
      for (let i = 0; i < len; i += 4093) expect(b[i], `byte ${off + i}`).toBe(srcByte(off + i));
    };
    await expectSrc(0, 2 * cs);
    expect((await at(2 * cs, cs)).every((x) => x === 0xbb)).toBe(true); // not in the overlay: backing
    expect((await at(1 * MiB, 1 * MiB)).every((x) => x === 0)).toBe(true); // zero run hides backing
    expect((await at(2 * MiB, 2 * MiB)).every((x) => x === 0xbb)).toBe(true);
    await expectSrc(512 * MiB - 3 * cs, 6 * cs);
    expect((await at(511 * MiB, cs)).every((x) => x === 0xbb)).toBe(true);
    await expectSrc(Math.floor(vsize / cs) * cs, vsize - Math.floor(vsize / cs) * cs);
    await fh.close();

    // a map of the overlay alone: exactly the runs, no more
    const map = JSON.parse(await sh('qemu-img', ['map', '--output=json', '-f', 'qcow2', file])) as Array<{ start: number; length: number; depth: number; zero: boolean; data: boolean }>;
    const top = map.filter((m) => m.depth === 0 && (m.data || m.zero) && m.start < vsize);
    expect(top.map((m) => [m.start, m.length, m.data ? 'data' : 'zero'])).toEqual(runs.map((r) => [r.start, r.length, r.kind]));
  });

  it('an overlay with no runs at all is valid and shows the backing file', async () => {
    const file = path.join(dir, 'empty.qcow2');
    const plan = await writeStream(file, [], 10 * MiB, 'snap/base');
    expect(plan.dataClusters).toBe(0);
    const check = await run('qemu-img', ['check', '-f', 'qcow2', file]);
    expect(check.code).toBe(0);
  });

  it('refcounts stay right when the refcount table needs several blocks (many data clusters)', async () => {
    // 512-byte clusters: 256 refcounts per block, so 2000 clusters need several blocks
    const cs = 512;
    const vsize = 4 * MiB;
    const plan = planQcow2Overlay({ virtualSize: vsize, clusterBits: 9, backingFile: 'b', backingFormat: 'qcow2', runs: [{ start: 0, length: 2000 * cs, kind: 'data' }] });
    const file = path.join(dir, 'small-clusters.qcow2');
    const bufs = [...plan.metadata(), Buffer.alloc(plan.dataClusters * cs, 0x42)];
    await writeFile(file, Buffer.concat(bufs));
    expect((await readFile(file)).length).toBe(plan.fileSize);
    const check = await run('qemu-img', ['check', noBacking(file)]);
    expect(check.stdout + check.stderr).toMatch(/No errors were found/);
    expect(check.code).toBe(0);
  });
});

describe('hostile or broken plans are refused', () => {
  const base = { virtualSize: 64 * MiB, backingFile: 'disk.0.snap/base', backingFormat: 'qcow2' };
  const cases: Array<[string, OverlayRun[], RegExp]> = [
    ['unaligned start', [{ start: 512, length: 65536, kind: 'data' }], /not aligned/],
    ['unaligned end', [{ start: 0, length: 1000, kind: 'data' }], /not aligned/],
    ['overlap', [{ start: 0, length: 131072, kind: 'data' }, { start: 65536, length: 65536, kind: 'zero' }], /overlapping/],
    ['unsorted', [{ start: 131072, length: 65536, kind: 'data' }, { start: 0, length: 65536, kind: 'data' }], /not sorted/],
    ['beyond the disk', [{ start: 64 * MiB, length: 65536, kind: 'data' }], /beyond the virtual size/],
    ['negative', [{ start: -65536, length: 65536, kind: 'data' }], /not aligned|invalid/],
    ['zero length', [{ start: 0, length: 0, kind: 'data' }], /invalid/],
    ['not a number', [{ start: Number.NaN, length: 65536, kind: 'data' }], /invalid/],
    ['unknown kind', [{ start: 0, length: 65536, kind: 'trim' as 'data' }], /unknown/],
  ];
  for (const [name, runs, re] of cases) it(name, () => expect(() => planQcow2Overlay({ ...base, runs })).toThrow(re));

  it('sizes and names out of range', () => {
    expect(() => planQcow2Overlay({ ...base, virtualSize: 0, runs: [] })).toThrow(/virtual size/);
    expect(() => planQcow2Overlay({ ...base, virtualSize: 1000, runs: [] })).toThrow(/virtual size/);
    expect(() => planQcow2Overlay({ ...base, virtualSize: 2 ** 60, runs: [] })).toThrow(/virtual size/);
    expect(() => planQcow2Overlay({ ...base, backingFile: 'x'.repeat(2000), runs: [] })).toThrow(/backing file name/);
    expect(() => planQcow2Overlay({ ...base, clusterBits: 30, runs: [] })).toThrow(/cluster bits/);
  });
});

describe('overlayRuns: guest ranges to cluster runs', () => {
  const cs = 65536;
  it('widens to clusters, merges, and turns wholly-zero clusters into zero runs', () => {
    const runs = overlayRuns(
      10 * cs,
      cs,
      [
        { offset: 100, length: 10 }, // inside cluster 0
        { offset: cs, length: 3 * cs }, // clusters 1..3
        { offset: 6 * cs + 5, length: 4 * cs - 5 }, // clusters 6..9
      ],
      [{ offset: 2 * cs - 1, length: 2 * cs + 1 }, { offset: 8 * cs, length: 100 * cs }],
    );
    expect(runs).toEqual([
      { start: 0, length: 2 * cs, kind: 'data' },
      { start: 2 * cs, length: 2 * cs, kind: 'zero' },
      { start: 6 * cs, length: 2 * cs, kind: 'data' },
      { start: 8 * cs, length: 2 * cs, kind: 'zero' },
    ]);
  });

  it('clips to the virtual size and keeps the partial tail cluster', () => {
    expect(overlayRuns(cs + 100, cs, [{ offset: 0, length: 10 * cs }])).toEqual([{ start: 0, length: cs + 100, kind: 'data' }]);
  });
});
