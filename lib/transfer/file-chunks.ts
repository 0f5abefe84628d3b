/**
 * A file's bytes [start, end) as LENT chunks read into two buffers: one is lent to the consumer while the
 * next read fills the other, and a buffer is reused once the consumer asks for the chunk after it (the
 * upload writes each chunk out first, replica-client.ts sendFrames). A read stream would allocate a new
 * buffer per read. Ends early, without error, if the file is shorter than `end` (the caller checks sizes).
 */
import * as fsp from 'node:fs/promises';

export async function* lentFileChunks(file: string, start: number, end: number, chunkBytes: number): AsyncGenerator<Buffer> {
  if (start >= end) return;
  const fh = await fsp.open(file, 'r');
  const buffers = [Buffer.allocUnsafe(Math.min(chunkBytes, end - start)), Buffer.allocUnsafe(Math.min(chunkBytes, end - start))];
  const readAt = async (i: number, at: number): Promise<Buffer> => {
    const buf = buffers[i]!;
    const want = Math.min(buf.length, end - at);
    let got = 0;
    while (got < want) {
      const { bytesRead } = await fh.read(buf, got, want - got, at + got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    return buf.subarray(0, got);
  };
  let pending: Promise<Buffer> | null = null;
  try {
    let at = start;
    let i = 0;
    pending = readAt(i, at);
    for (;;) {
      const chunk = await pending;
      pending = null;
      if (chunk.length === 0) return;
      at += chunk.length;
      // read ahead into the other buffer while this one is lent
      if (at < end && chunk.length === buffers[i]!.length) {
        pending = readAt(i ^ 1, at);
        pending.catch(() => {}); // awaited on the next round; an early failure must not go unhandled
      }
      yield chunk;
      if (!pending) return;
      i ^= 1;
    }
  } finally {
    // a read still in flight must end before its file handle closes
    await pending?.catch(() => {});
    await fh.close();
  }
}
