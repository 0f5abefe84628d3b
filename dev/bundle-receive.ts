/**
 * Build step (package.json "build", after tsc): makes dist/agent/receive-cli.cjs, what `onestor-agent
 * receive` runs (agent/main.ts), ONE minified CommonJS file holding the whole receiver with zod and
 * xxhash-wasm, and then V8's code cache of it after one real session (dev/code-cache.ts). Why: sshd starts
 * a receiver for every connection the agent opens, and the agent waits for its hello; loading the receiver's
 * modules one by one took ~170 ms of that, compiling the bundle from source ~50 ms more
 * (bench/receiver-start.ts measures it). CommonJS because a script, unlike an ES module, can be compiled
 * from a code cache on Node 18 and 20 (lib/shared/script-bundle.ts).
 *
 * Rules the bundle must keep (checked here, the build fails otherwise):
 *  - it requires only Node built-ins: every package and agent module the receiver reaches, statically or by
 *    import(), is inside (one copy of each module: an error class loaded twice would break instanceof);
 *  - it holds nothing of the host side (lib/cycle, lib/transfer, lib/libvirt, ssh2).
 * The code cache is made from a real session; a bundle that cannot hold one (broken, or no room in the temp
 * dir) is removed with a warning and `receive` runs tsc's modules.
 * tsc's dist/agent/receive-cli.js stays: without esbuild (a production-only install) the step says so,
 * removes any bundle and cache an earlier build left (they would be stale), and main.ts runs tsc's output,
 * which works the same, only slower to start.
 *
 *   node dist/dev/bundle-receive.js [dist dir, default: the dist this file was built into]
 */
import { isBuiltin } from 'node:module';
import { rmSync } from 'node:fs';
import path from 'node:path';
import { codeCachePath } from '../lib/shared/script-bundle.js';
import { buildAgentBundle, distDir, endBundleStep } from './bundle-common.js';
import { makeCodeCache } from './code-cache.js';

const HOST_SIDE = /(^|[/\\])(lib[/\\](cycle|transfer|libvirt)[/\\]|node_modules[/\\]ssh2[/\\])/;

const bundle = path.join(distDir(import.meta.url), 'agent', 'receive-cli.cjs');
// before anything: a bundle and cache of an earlier build must not outlive a build that makes none
rmSync(bundle, { force: true });
rmSync(codeCachePath(bundle), { force: true });

const { outputs } = await buildAgentBundle({
  step: 'bundle-receive',
  stepUrl: import.meta.url,
  name: 'receive-cli',
  effect: 'slower receiver start',
  options: () => ({
    outfile: bundle,
    format: 'cjs',
    minify: true,
    // lib/shared/version.ts finds package.json from its own URL: in the bundle, the bundle's
    define: { 'import.meta.url': '__onestorBundleUrl' },
    banner: { js: "// Built by dev/bundle-receive.ts from agent/receive-cli.ts: edit the sources, not this file.\nconst __onestorBundleUrl = require('node:url').pathToFileURL(__filename).href;" },
  }),
});

const [out] = Object.values(outputs);
endBundleStep(
  'bundle-receive',
  'receiver',
  [
    ...out!.imports.filter((i) => !isBuiltin(i.path)).map((i) => `imports ${i.path} (${i.kind})`),
    ...Object.keys(out!.inputs).filter((i) => HOST_SIDE.test(i)).map((i) => `holds ${i} (host side)`),
  ],
  `${path.relative(process.cwd(), bundle)} ${(out!.bytes / 1024).toFixed(0)} KiB from ${Object.keys(out!.inputs).length} modules`,
);
try {
  const size = await makeCodeCache(bundle);
  process.stdout.write(`bundle-receive: ${path.relative(process.cwd(), codeCachePath(bundle))} ${(size / 1024).toFixed(0)} KiB after one session\n`);
} catch (e) {
  // tsc's modules work the same: a build machine with a full /tmp must not stop an install (the test suite
  // fails on a build that left no bundle and cache: test/unit/script-bundle.test.ts)
  rmSync(bundle, { force: true });
  rmSync(codeCachePath(bundle), { force: true });
  process.stderr.write(`bundle-receive: the receiver bundle failed its session (${e instanceof Error ? e.message : String(e)}); bundle removed, \`receive\` runs tsc's modules (slower start)\n`);
}
