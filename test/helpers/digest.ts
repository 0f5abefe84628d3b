/** XXH64 of a file, computed here with xxhash-wasm's one-shot API (not the streaming one the code uses). */
import { readFile } from 'node:fs/promises';
import xxhash from 'xxhash-wasm';

export async function xxh64Of(file: string): Promise<string> {
  const { h64Raw } = await xxhash();
  return h64Raw(new Uint8Array(await readFile(file))).toString(16).padStart(16, '0');
}
