/**
 * lib/shared/script-bundle.ts: the code cache's file format (pure, on hostile input) and the loader on real
 * files. V8 runs in child processes: a cache only fits the Node flags it was made with, and the test worker's
 * are not the launcher's.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { codeCachePath, commonJsWrapper, decodeCodeCache, encodeCodeCache, sourceDigest } from '../../lib/shared/script-bundle.js';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const dist = path.join(repo, 'dist');
const SHA = 'a'.repeat(64);
const OTHER_SHA = 'b'.repeat(64);
const V = 'v20.20.2';
const DATA = Buffer.from([1, 2, 3, 0x0a, 4, 5]);

describe('code cache file format', () => {
  it('round-trips V8 data (newlines and all) for the same source and Node version', () => {
    const file = encodeCodeCache(SHA, V, DATA);
    expect(decodeCodeCache(file, SHA, V)?.equals(DATA)).toBe(true);
  });

  it('refuses a cache of another source, another Node version, or with nothing after its header', () => {
    const file = encodeCodeCache(SHA, V, DATA);
    expect(decodeCodeCache(file, OTHER_SHA, V)).toBeNull();
    expect(decodeCodeCache(file, SHA, 'v20.20.3')).toBeNull();
    expect(decodeCodeCache(encodeCodeCache(SHA, V, Buffer.alloc(0)), SHA, V)).toBeNull();
  });

  it('refuses foreign, truncated and malformed files', () => {
    const good = encodeCodeCache(SHA, V, DATA);
    const header = good.subarray(0, good.indexOf(0x0a) + 1).toString('latin1');
    const cases: Buffer[] = [
      Buffer.alloc(0),
      Buffer.from('\n'),
      good.subarray(0, 10), // truncated inside the header
      good.subarray(0, header.length - 1), // header without its newline
      Buffer.from(`onestor-code-cache/2 ${V} ${SHA}\n\x01`), // a future format
      Buffer.from(`onestor-code-cache/1 ${V} ${SHA} extra\n\x01`),
      Buffer.from(`onestor-code-cache/1 ${V}  ${SHA}\n\x01`), // double space
      Buffer.from(`onestor-code-cache/1 ${V}\n\x01`),
      Buffer.from(`ONESTOR-CODE-CACHE/1 ${V} ${SHA}\n\x01`),
      Buffer.concat([Buffer.alloc(600, 0x41), Buffer.from(`\n${header}\x01`)]), // newline beyond the header's room
      Buffer.from(DATA), // V8 data alone, as an older writer might have left it
    ];
    for (const c of cases) expect(decodeCodeCache(c, SHA, V)).toBeNull();
  });

  it('will not write a header it could not read back', () => {
    expect(() => encodeCodeCache('A'.repeat(64), V, DATA)).toThrow(/sha256/);
    expect(() => encodeCodeCache(SHA.slice(1), V, DATA)).toThrow(/sha256/);
    expect(() => encodeCodeCache(SHA, '20.1.0', DATA)).toThrow(/Node version/);
    expect(() => encodeCodeCache(SHA, 'v20.1.0 x', DATA)).toThrow(/Node version/);
  });
});

describe('loadScriptBundle on real files', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'onestor-script-bundle-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const loader = path.join(dist, 'lib', 'shared', 'script-bundle.js');

  /** In a fresh `node`: load `bundle`, print which cache path was taken and what the bundle's code says. */
  function load(bundle: string, makeCache = false): { codeCache: string; says: string } {
    const script = `
      const { loadScriptBundle, codeCachePath, encodeCodeCache } = await import(${JSON.stringify(loader)});
      const b = loadScriptBundle(${JSON.stringify(bundle)});
      const says = b.exports.say();
      if (${makeCache}) (await import('node:fs')).writeFileSync(codeCachePath(${JSON.stringify(bundle)}), encodeCodeCache(b.sourceSha256, process.version, b.script.createCachedData()));
      console.log(JSON.stringify({ codeCache: b.codeCache, says }));`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`child failed: ${r.stderr}`);
    return JSON.parse(r.stdout) as { codeCache: string; says: string };
  }

  it('runs CommonJS with its own __filename and require, and uses a cache made from the same source', () => {
    const bundle = path.join(dir, 'one.cjs');
    writeFileSync(bundle, "const path = require('node:path');\nexports.say = () => 'one:' + path.basename(__filename) + ':' + path.basename(__dirname);\n");
    expect(load(bundle)).toEqual({ codeCache: 'none', says: `one:one.cjs:${path.basename(dir)}` });
    load(bundle, true);
    expect(load(bundle)).toEqual({ codeCache: 'used', says: `one:one.cjs:${path.basename(dir)}` });
  });

  it('never runs the code a cache remembers for another source of the same length (V8 itself would)', () => {
    const bundle = path.join(dir, 'same-length.cjs');
    const a = "exports.say = () => 'AAAA';\n";
    const b = "exports.say = () => 'BBBB';\n";
    expect(a.length).toBe(b.length);
    writeFileSync(bundle, a);
    load(bundle, true);
    writeFileSync(bundle, b);
    expect(load(bundle)).toEqual({ codeCache: 'none', says: 'BBBB' });
    // why the header carries the source's sha256: handed straight to V8, the stale cache is accepted and
    // its compiled code runs in place of the new source
    const stale = decodeCodeCache(readFileSync(codeCachePath(bundle)), sourceDigest(Buffer.from(a)), process.version)!;
    const direct = `
      const vm = await import('node:vm');
      const s = new vm.Script(${JSON.stringify(commonJsWrapper(b))}, { filename: ${JSON.stringify(bundle)}, cachedData: Buffer.from(${JSON.stringify(stale.toString('base64'))}, 'base64') });
      const m = {}; s.runInThisContext()(m, null, { exports: m }); console.log(s.cachedDataRejected ? 'rejected' : m.say());`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', direct], { encoding: 'utf8' });
    expect(r.stdout.trim()).toBe('AAAA');
  });

  it('compiles from source when the cache is garbage, or was made under other V8 flags', () => {
    const bundle = path.join(dir, 'garbage.cjs');
    writeFileSync(bundle, "exports.say = () => 'fine';\n");
    writeFileSync(codeCachePath(bundle), encodeCodeCache(sourceDigest(readFileSync(bundle)), process.version, Buffer.alloc(4096, 0x5a)));
    expect(load(bundle)).toEqual({ codeCache: 'rejected', says: 'fine' });
    // a cache V8 made under --no-opt is refused by the plain launcher's V8
    const made = spawnSync(process.execPath, ['--no-opt', '--input-type=module', '-e', `
      const { loadScriptBundle, codeCachePath, encodeCodeCache } = await import(${JSON.stringify(loader)});
      const b = loadScriptBundle(${JSON.stringify(bundle)}, { codeCache: false }); b.exports.say();
      (await import('node:fs')).writeFileSync(codeCachePath(${JSON.stringify(bundle)}), encodeCodeCache(b.sourceSha256, process.version, b.script.createCachedData()));`]);
    expect(made.status).toBe(0);
    expect(load(bundle)).toEqual({ codeCache: 'rejected', says: 'fine' });
  });

  it('the build left the receiver bundle with a code cache the launcher\'s Node uses', () => {
    const bundle = path.join(dist, 'agent', 'receive-cli.cjs');
    const script = `
      const { loadScriptBundle } = await import(${JSON.stringify(loader)});
      const b = loadScriptBundle(${JSON.stringify(bundle)});
      console.log(b.codeCache, typeof b.exports.runCli);`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.stdout.trim()).toBe('used function');
  });
});
