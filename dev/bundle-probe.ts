/**
 * Build step (package.json "build", after tsc): makes dist/agent/probe-cli.js, the `probe` command's entry,
 * into ONE self-contained module holding the whole probe path (agent/dispatch, flags, spec, commands/probe,
 * lib/monitor/*, lib/shared/{errors,defaults,version,exit-codes}). Why: Node's ESM loader pays about half a
 * millisecond of CPU and a thread-pool round trip per module, and the probe, which OpenNebula runs every
 * minute on every host, loaded some twenty of them (bench/probe.ts measures the difference).
 *
 * Rules the bundle must keep (checked here, the build fails otherwise):
 *  - it imports nothing statically but Node built-ins: no package (pino, zod, ssh2, fast-xml-parser) and
 *    no second copy of an agent module;
 *  - dynamic imports of the probe path (commands/probe, replica-gather, prometheus, version) are inside;
 *    the other dynamic imports (the logger, for commands that log; never reached by `probe`) stay as they
 *    are, which is right because the bundle replaces a file of the same directory.
 * Without esbuild (a production-only install) the step says so and leaves tsc's output, which works the
 * same, only slower to load.
 *
 *   node dist/dev/bundle-probe.js [dist dir, default: the dist this file was built into]
 */
import path from 'node:path';
import { buildAgentBundle, endBundleStep } from './bundle-common.js';

const INSIDE = /[/\\](agent[/\\]commands[/\\]probe|lib[/\\]monitor[/\\](replica-gather|prometheus)|lib[/\\]shared[/\\]version)\.js$/;

const { entry, outputs } = await buildAgentBundle({
  step: 'bundle-probe',
  stepUrl: import.meta.url,
  name: 'probe-cli',
  effect: 'slower probe start-up',
  options: (file) => ({
    outfile: file,
    packages: 'external',
    banner: { js: '// Built by dev/bundle-probe.ts from agent/probe-cli.ts and the probe path: edit the sources, not this file.' },
    plugins: [
      {
        name: 'probe-path-only',
        setup(b) {
          b.onResolve({ filter: /^\.\.?\// }, (args) => {
            if (args.kind !== 'dynamic-import') return undefined;
            if (INSIDE.test(path.resolve(args.resolveDir, args.path))) return undefined;
            // left as a dynamic import of the same relative path: valid only from the bundle's own directory
            if (path.resolve(args.resolveDir) !== path.dirname(file)) {
              return { errors: [{ text: `${args.importer} imports ${args.path} dynamically: add it to the bundle or keep such imports in agent/` }] };
            }
            return { path: args.path, external: true };
          });
        },
      },
    ],
  }),
});

const out = Object.values(outputs)[0]!;
endBundleStep(
  'bundle-probe',
  'probe',
  out.imports.filter((i) => (i.kind === 'dynamic-import' ? !i.external || !/^\.\.?\//.test(i.path) : !i.path.startsWith('node:'))).map((i) => `imports ${i.path} (${i.kind}): only Node built-ins statically, only the probe path inside`),
  `${path.relative(process.cwd(), entry)} ${(out.bytes / 1024).toFixed(0)} KiB from ${Object.keys(out.inputs).length} modules`,
);
