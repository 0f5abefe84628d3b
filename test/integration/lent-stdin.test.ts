/**
 * lentStdin (lib/replica/stdio.ts), the receiver's stdin reader, on a real pipe in a real process (the
 * built module, as `receive` runs it): every byte arrives once and in order, a chunk is never overwritten
 * while it is lent (the next read waits until the consumer asks again), EOF ends the iteration, and
 * destroy(err) ends it with that error.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { projectRoot } from '../../dev/agent-env.js';

const stdioModule = path.join(projectRoot(), 'dist', 'lib', 'replica', 'stdio.js');

/** Child: reads fd 0 with lentStdin, checks each chunk is unchanged after yielding to the event loop. */
const CHILD = `
const { lentStdin } = await import(process.argv[1]);
const { createHash } = await import('node:crypto');
const input = lentStdin(Number(process.argv[2]));
const h = createHash('sha256');
let chunks = 0, bytes = 0, changed = 0, maxChunk = 0;
const destroyAt = Number(process.argv[3]);
try {
  for await (const chunk of input) {
    const copy = Buffer.from(chunk);
    // let the event loop run (more data is arriving): a read into the lent buffer now would change it
    await new Promise((r) => setImmediate(r));
    if (chunks % 8 === 0) await new Promise((r) => setTimeout(r, 1));
    if (!copy.equals(chunk)) changed++;
    h.update(chunk);
    chunks++;
    bytes += chunk.length;
    maxChunk = Math.max(maxChunk, chunk.length);
    if (destroyAt && bytes >= destroyAt) input.destroy(new Error('stop here'));
  }
  console.log(JSON.stringify({ sha: h.digest('hex'), chunks, bytes, changed, maxChunk }));
} catch (e) {
  console.log(JSON.stringify({ error: e.message, bytes, changed }));
}
`;

async function feed(data: Buffer, readBytes: number, destroyAt = 0): Promise<Record<string, unknown>> {
  const child = spawn(process.execPath, ['--input-type=module', '-e', CHILD, stdioModule, String(readBytes), String(destroyAt)], { stdio: ['pipe', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stdin.on('error', () => {}); // the child may stop reading (destroy case)
  const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  // irregular writes, some with a pause, so reads see every size from a few bytes to a full pipe
  let at = 0;
  let i = 0;
  while (at < data.length && child.stdin.writable) {
    const n = Math.min(data.length - at, [3, 4096, 65536, 200_000, 1_500_000][i++ % 5]!);
    if (!child.stdin.write(data.subarray(at, at + n))) await new Promise((r) => child.stdin.once('drain', r).once('close', r));
    at += n;
    if (i % 7 === 0) await new Promise((r) => setTimeout(r, 2));
  }
  child.stdin.end();
  expect(await exited).toBe(0);
  return JSON.parse(out) as Record<string, unknown>;
}

describe('lentStdin on a real pipe', () => {
  it('delivers every byte in order, never overwrites a lent chunk, and ends at EOF', async () => {
    const data = randomBytes(24 * 1024 * 1024);
    const r = await feed(data, 1024 * 1024);
    expect(r.changed).toBe(0);
    expect(r.bytes).toBe(data.length);
    expect(r.sha).toBe(createHash('sha256').update(data).digest('hex'));
    expect(r.chunks as number).toBeGreaterThan(24);
  });

  it('reads no more than its buffer at a time', async () => {
    const r = await feed(randomBytes(4 * 1024 * 1024), 1000);
    expect(r.changed).toBe(0);
    expect(r.maxChunk).toBe(1000);
  });

  it('ends with an empty input at once', async () => {
    const r = await feed(Buffer.alloc(0), 65536);
    expect(r).toMatchObject({ bytes: 0, chunks: 0, changed: 0 });
  });

  it('destroy(err) ends the iteration with that error', async () => {
    const r = await feed(randomBytes(16 * 1024 * 1024), 65536, 1024 * 1024);
    expect(r.error).toBe('stop here');
    expect(r.bytes as number).toBeLessThan(16 * 1024 * 1024);
  });
});
