/**
 * Build step (package.json "build", after tsc and bundle-probe): makes dist/agent/daemon-cli.js, the entry of
 * `onestor-agent run`, into one minified module holding the daemon's modules with zod, pino and
 * fast-xml-parser, plus chunks under dist/agent/daemon-chunks/ for what only a cycle needs (the cycle,
 * capture, the replica client, xxhash-wasm for the upload digest), loaded by import() as before. Why: the idle daemon's resident set is
 * mostly code; V8 keeps every module's source text and module record, and a hundred modules of packages
 * (mostly zod's) cost more than one minified file (bench/daemon-idle.ts measures it).
 *
 * Rules the bundle must keep (checked here, the build fails otherwise):
 *  - ssh2 (native crypto, loaded with the first replica connection) and node-unix-socket (an optional
 *    native addon, loaded by createRequire in lib/daemon/sd-notify.ts) stay packages, resolved from
 *    node_modules at run time; every other import is a Node built-in or a file of the bundle itself: no
 *    second copy of an agent module (an error class loaded twice would break instanceof);
 *  - what the entry loads statically (what an idle daemon keeps) holds neither ssh2 nor the cycle's code.
 * Without esbuild (a production-only install) the step says so and leaves tsc's output, which works the
 * same, only with a larger idle footprint.
 *
 *   node dist/dev/bundle-daemon.js [dist dir, default: the dist this file was built into]
 */
import { rmSync } from 'node:fs';
import { isBuiltin } from 'node:module';
import path from 'node:path';
import { bannerWithRequire, buildAgentBundle, endBundleStep } from './bundle-common.js';

const CHUNKS = 'daemon-chunks';
const EXTERNAL = ['ssh2', 'node-unix-socket'];
/** modules of the cycle: never in what the entry loads statically */
const CYCLE_ONLY = /(^|[/\\])(lib[/\\]cycle[/\\](cycle|ports|digest|rebuild)|lib[/\\]transfer[/\\]replica-client|lib[/\\]protocol[/\\]protocol)\.js$|node_modules[/\\]ssh2[/\\]/;

const { entry, outputs } = await buildAgentBundle({
  step: 'bundle-daemon',
  stepUrl: import.meta.url,
  name: 'daemon-cli',
  effect: 'larger idle daemon',
  beforeBuild: (file) => rmSync(path.join(path.dirname(file), CHUNKS), { recursive: true, force: true }),
  options: (file) => ({
    outdir: path.dirname(file),
    entryNames: '[name]',
    chunkNames: `${CHUNKS}/[name]-[hash]`,
    splitting: true,
    minify: true,
    external: EXTERNAL,
    // every chunk gets the require (a chunk may hold a CommonJS package)
    banner: { js: bannerWithRequire('bundle-daemon', 'agent/daemon-cli.ts') },
  }),
});

const rel = (f: string) => path.relative(process.cwd(), f);
const bad: string[] = [];
for (const [file, out] of Object.entries(outputs)) {
  for (const i of out.imports) {
    if (isBuiltin(i.path) || i.path in outputs) continue;
    if (i.external && EXTERNAL.includes(i.path)) continue;
    bad.push(`${rel(file)} imports ${i.path} (${i.kind})`);
  }
}
// what the idle daemon loads: the entry, the `run` command and the logger, with what they import statically
const startOuts = Object.keys(outputs).filter((f) => path.resolve(f) === entry || /[/\\](agent[/\\]commands[/\\]run|lib[/\\]shared[/\\]log)\.js$/.test(outputs[f]!.entryPoint ?? ''));
if (startOuts.length !== 3) bad.push(`expected the entry, the run command and the logger as outputs, found ${startOuts.map(rel).join(', ')}`);
const idle = new Set<string>();
const walk = (f: string) => {
  if (idle.has(f)) return;
  idle.add(f);
  for (const i of outputs[f]!.imports) {
    if (i.kind !== 'import-statement') continue;
    if (i.path in outputs) walk(i.path);
    else if (!isBuiltin(i.path)) bad.push(`the idle daemon would load ${i.path} (static import in ${rel(f)})`);
  }
};
for (const f of startOuts) walk(f);
for (const f of idle) for (const input of Object.keys(outputs[f]!.inputs)) if (CYCLE_ONLY.test(input)) bad.push(`the idle daemon would load ${input} (in ${rel(f)})`);
const kib = (files: Iterable<string>) => ([...files].reduce((n, f) => n + outputs[f]!.bytes, 0) / 1024).toFixed(0);
const inputs = new Set(Object.values(outputs).flatMap((o) => Object.keys(o.inputs)));
endBundleStep('bundle-daemon', 'daemon', bad, `${rel(entry)} + ${Object.keys(outputs).length - 1} chunks from ${inputs.size} modules; ${kib(idle)} KiB load at start, ${kib(Object.keys(outputs))} KiB in all`);
