/**
 * Build step (package.json "build", after tsc): makes dist/agent/receive-cli.js, the entry of
 * `onestor-agent receive`, into ONE minified module holding the whole receiver with zod, pino and
 * xxhash-wasm. Why: sshd starts a receiver for every connection the agent opens, and the agent waits for its
 * hello; loading the receiver's modules one by one took ~170 ms of that (bench/receiver-start.ts measures it).
 *
 * Rules the bundle must keep (checked here, the build fails otherwise):
 *  - it imports only Node built-ins: every package and agent module the receiver reaches, statically or by
 *    import(), is inside (one copy of each module: an error class loaded twice would break instanceof);
 *  - it holds nothing of the host side (lib/cycle, lib/transfer, lib/libvirt, ssh2).
 * Without esbuild (a production-only install) the step says so and leaves tsc's output, which works the
 * same, only slower to start.
 *
 *   node dist/dev/bundle-receive.js [dist dir, default: the dist this file was built into]
 */
import { isBuiltin } from 'node:module';
import path from 'node:path';
import { bannerWithRequire, buildAgentBundle, endBundleStep } from './bundle-common.js';

const HOST_SIDE = /(^|[/\\])(lib[/\\](cycle|transfer|libvirt)[/\\]|node_modules[/\\]ssh2[/\\])/;

const { entry, outputs } = await buildAgentBundle({
  step: 'bundle-receive',
  stepUrl: import.meta.url,
  name: 'receive-cli',
  effect: 'slower receiver start',
  options: (file) => ({ outfile: file, minify: true, banner: { js: bannerWithRequire('bundle-receive', 'agent/receive-cli.ts') } }),
});

const [out] = Object.values(outputs);
endBundleStep(
  'bundle-receive',
  'receiver',
  [
    ...out!.imports.filter((i) => !isBuiltin(i.path)).map((i) => `imports ${i.path} (${i.kind})`),
    ...Object.keys(out!.inputs).filter((i) => HOST_SIDE.test(i)).map((i) => `holds ${i} (host side)`),
  ],
  `${path.relative(process.cwd(), entry)} ${(out!.bytes / 1024).toFixed(0)} KiB from ${Object.keys(out!.inputs).length} modules`,
);
