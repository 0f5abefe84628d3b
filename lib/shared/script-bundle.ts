/**
 * Runs a CommonJS bundle the build made (dist/agent/receive-cli.cjs) with V8's code cache of it (the file
 * BUNDLE.v8cache next to it). sshd starts a receiver for every connection and the agent waits for its
 * hello; compiling the receiver's bundle from source was ~50 ms of that, and the functions its first session
 * runs were compiled again on every start (bench/receiver-start.ts). Node 18 and 20 keep no compile cache
 * of their own; Node >= 22.1 does for ES modules (main.ts turns it on), not for a script run this way.
 *
 * The cache is made by the build after one real session of the bundle (dev/code-cache.ts) and only read
 * here. V8 checks a cache against its own version and flags, but knows the source only by its length: a
 * cache is used only when the sha256 of the source it was made from (its header) is the bundle's, and it was
 * made by this Node version. Any doubt means compiling from source: slower, the same code.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import vm from 'node:vm';
import { ErrorCodes, OnestorError } from './errors.js';

const MAGIC = 'onestor-code-cache/1';
/** a header is one short line: refuse to look further for its end in a file that is not ours */
const MAX_HEADER_BYTES = 512;

export function codeCachePath(bundle: string): string {
  return `${bundle}.v8cache`;
}

export function sourceDigest(source: Buffer): string {
  return createHash('sha256').update(source).digest('hex');
}

/** The cache file: `MAGIC NODE_VERSION SHA256\n` then V8's data. */
export function encodeCodeCache(sourceSha256: string, nodeVersion: string, data: Buffer): Buffer {
  if (!/^[0-9a-f]{64}$/.test(sourceSha256)) throw new OnestorError(ErrorCodes.INTERNAL, 'encodeCodeCache: sha256 must be 64 hex digits');
  if (!/^v\d+\.\d+\.\d+\S*$/.test(nodeVersion)) throw new OnestorError(ErrorCodes.INTERNAL, `encodeCodeCache: not a Node version: ${nodeVersion}`);
  return Buffer.concat([Buffer.from(`${MAGIC} ${nodeVersion} ${sourceSha256}\n`, 'latin1'), data]);
}

/**
 * V8's data from a cache file, or null when the file is not a cache of exactly this source made by this
 * Node version (anything else: truncated, foreign, stale, empty data). Pure.
 */
export function decodeCodeCache(file: Buffer, sourceSha256: string, nodeVersion: string): Buffer | null {
  const end = file.subarray(0, MAX_HEADER_BYTES).indexOf(0x0a);
  if (end < 0) return null;
  const [magic, version, sha, ...rest] = file.subarray(0, end).toString('latin1').split(' ');
  if (magic !== MAGIC || rest.length !== 0 || version !== nodeVersion || sha !== sourceSha256) return null;
  const data = file.subarray(end + 1);
  return data.length > 0 ? data : null;
}

/** What V8 compiles: the source as the body of CommonJS's module function. */
export function commonJsWrapper(source: string): string {
  // opens on the source's first line: line numbers in stack traces stay the bundle's
  return `(function (exports, require, module, __filename, __dirname) {${source}\n})`;
}

export interface LoadedBundle {
  exports: Record<string, unknown>;
  /** the compiled bundle (dev/code-cache.ts makes the cache from it after a session) */
  script: vm.Script;
  /** used: V8 took the cache; rejected: V8 refused it (compiled from source); none: no usable cache */
  codeCache: 'used' | 'rejected' | 'none';
  sourceSha256: string;
}

/**
 * Compiles and runs `file` as CommonJS (exports, require, module, __filename, __dirname), with its code
 * cache unless `codeCache: false`. A missing or unreadable cache is no error; a missing bundle is.
 */
export function loadScriptBundle(file: string, o: { codeCache?: boolean } = {}): LoadedBundle {
  const source = readFileSync(file);
  const sourceSha256 = sourceDigest(source);
  let cachedData: Buffer | null = null;
  if (o.codeCache !== false) {
    try {
      cachedData = decodeCodeCache(readFileSync(codeCachePath(file)), sourceSha256, process.version);
    } catch {
      cachedData = null;
    }
  }
  const script = new vm.Script(commonJsWrapper(source.toString('utf8')), {
    filename: file,
    ...(cachedData ? { cachedData } : {}),
  });
  const module: { exports: Record<string, unknown> } = { exports: {} };
  (script.runInThisContext() as (...a: unknown[]) => void).call(module.exports, module.exports, createRequire(file), module, file, path.dirname(file));
  return { exports: module.exports, script, codeCache: cachedData ? (script.cachedDataRejected ? 'rejected' : 'used') : 'none', sourceSha256 };
}
