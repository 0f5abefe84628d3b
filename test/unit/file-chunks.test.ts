/** lentFileChunks: a file's bytes in lent chunks from two reused buffers, read ahead while one is lent. */
import { randomBytes } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { lentFileChunks } from '../../lib/transfer/file-chunks.js';

let root: string;
let file: string;
let data: Buffer;
beforeAll(async () => {
  root = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-filechunks-'));
  file = path.join(root, 'f');
  data = randomBytes(1_000_003);
  await fsp.writeFile(file, data);
});
afterAll(async () => {
  await fsp.rm(root, { recursive: true, force: true });
});

async function lentCopy(start: number, end: number, chunk: number): Promise<{ bytes: Buffer; changed: number; buffers: number }> {
  const parts: Buffer[] = [];
  const seen = new Set<ArrayBufferLike>();
  let changed = 0;
  for await (const c of lentFileChunks(file, start, end, chunk)) {
    const copy = Buffer.from(c);
    seen.add(c.buffer);
    // let the read-ahead land: it must go into the other buffer, never this one
    await new Promise((r) => setTimeout(r, 1));
    if (!copy.equals(c)) changed++;
    parts.push(copy);
  }
  return { bytes: Buffer.concat(parts), changed, buffers: seen.size };
}

describe('lentFileChunks', () => {
  it('yields exactly [start, end) in order, a lent chunk never changes, two buffers in all', async () => {
    for (const [start, end, chunk] of [
      [0, data.length, 65536],
      [12345, data.length, 100_000],
      [0, 65536, 65536],
      [7, 8, 4096],
    ] as const) {
      const r = await lentCopy(start, end, chunk);
      expect(r.bytes.equals(data.subarray(start, end))).toBe(true);
      expect(r.changed).toBe(0);
      expect(r.buffers).toBeLessThanOrEqual(2);
    }
  });

  it('nothing for an empty range; ends early without error when the file is shorter than asked', async () => {
    expect((await lentCopy(10, 10, 4096)).bytes.length).toBe(0);
    const r = await lentCopy(0, data.length + 500_000, 65536);
    expect(r.bytes.equals(data)).toBe(true);
  });

  it('a missing file fails with ENOENT', async () => {
    const it = lentFileChunks(path.join(root, 'missing'), 0, 10, 4096);
    await expect(it.next()).rejects.toMatchObject({ code: 'ENOENT' });
  });
});
