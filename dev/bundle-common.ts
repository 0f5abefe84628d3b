/**
 * What the build's bundle steps (bundle-probe.ts, bundle-daemon.ts, bundle-receive.ts) share: each bundles
 * one entry of dist/agent/ (buildAgentBundle: probe and daemon replace tsc's file, receive writes a .cjs
 * beside it) and checks the bundle's rules (endBundleStep).
 * esbuild is a devDependency, so a production-only install has none, and then a step leaves tsc's output as
 * it is (it works the same) after saying so; tsc's map of the replaced file goes (it would describe the wrong
 * file); every bundle is built with the same options.
 */
import { rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export type Esbuild = typeof import('esbuild');

/** esbuild, or null after telling why the step does nothing (`effect`: what the user loses). */
async function optionalEsbuild(step: string, entry: string, effect: string): Promise<Esbuild | null> {
  try {
    return await import('esbuild');
  } catch {
    process.stderr.write(`${step}: esbuild is not installed; ${entry} stays as tsc wrote it (${effect})\n`);
    return null;
  }
}

/** tsc's source map of a file a bundle replaces (the bundles have none): a stale map would mislead. */
function dropStaleMap(file: string): void {
  rmSync(`${file}.map`, { force: true });
}

/** The dist directory a step works on: its first argument, else the dist the step itself was built into. */
export function distDir(stepUrl: string): string {
  return path.resolve(process.argv[2] ?? path.join(path.dirname(fileURLToPath(stepUrl)), '..'));
}

/** Every bundle: ESM for Node 18+ (a step may ask for CommonJS), no map, a metafile for the step's checks. */
const NODE_ESM_BUNDLE = {
  bundle: true,
  format: 'esm',
  platform: 'node',
  target: 'node18',
  allowOverwrite: true,
  sourcemap: false,
  legalComments: 'none',
  logLevel: 'warning',
  metafile: true,
} as const;

/**
 * zod's `z` namespace re-exports every locale it ships (`z.locales`, ~40 languages, ~260 KiB minified),
 * which a bundle cannot drop by itself. The agent's messages are English and nothing uses `z.locales`: the
 * namespace gets English only, and a receiver or daemon compiles 40 % less code at start.
 */
export const ZOD_ENGLISH_ONLY: import('esbuild').Plugin = {
  name: 'zod-english-only',
  setup(b) {
    b.onResolve({ filter: /^\.\.\/locales\/index\.js$/ }, (a) =>
      /[/\\]node_modules[/\\]zod[/\\]/.test(a.importer) ? { path: path.join(a.resolveDir, '..', 'locales', 'index.js'), namespace: 'zod-english-only' } : undefined,
    );
    b.onLoad({ filter: /.*/, namespace: 'zod-english-only' }, (a) => ({ contents: "export { default as en } from './en.js';", resolveDir: path.dirname(a.path), loader: 'js' }));
  },
};

/**
 * The banner of a bundle holding CommonJS packages: pino and its helpers require() Node built-ins, which an
 * ESM module has no `require` for.
 */
export function bannerWithRequire(step: string, entrySource: string): string {
  return `// Built by dev/${step}.ts from ${entrySource}: edit the sources, not this file.\nimport { createRequire as __onestorCreateRequire } from 'node:module';\nconst require = __onestorCreateRequire(import.meta.url);`;
}

/**
 * One step's bundle of dist/agent/NAME.js (into tsc's file unless `options` names another outfile):
 * esbuild with NODE_ESM_BUNDLE, the entry and the step's own `options(entry)`. Without esbuild the step says so and exits 0 (tsc's file stays).
 * `beforeBuild` runs only when the bundle is made (the daemon removes its old chunks).
 */
export async function buildAgentBundle(o: {
  step: string;
  stepUrl: string;
  name: string;
  /** what a production-only install loses without the bundle */
  effect: string;
  options: (entry: string) => import('esbuild').BuildOptions;
  beforeBuild?: (entry: string) => void;
}): Promise<{ entry: string; outputs: import('esbuild').Metafile['outputs'] }> {
  const entry = path.join(distDir(o.stepUrl), 'agent', `${o.name}.js`);
  const esbuild = await optionalEsbuild(o.step, `dist/agent/${o.name}.js`, o.effect);
  if (!esbuild) process.exit(0);
  o.beforeBuild?.(entry);
  const options = o.options(entry);
  // a bundle that replaces tsc's file makes tsc's map of it wrong
  if ((options.outfile ?? entry) === entry) dropStaleMap(entry);
  const result = await esbuild.build({ ...NODE_ESM_BUNDLE, entryPoints: [entry], ...options, plugins: [ZOD_ENGLISH_ONLY, ...(options.plugins ?? [])] });
  // NODE_ESM_BUNDLE asks for the metafile
  return { entry, outputs: result.metafile!.outputs };
}

/** Fails the build when the bundle breaks its rules (`broken`), else prints `summary`. */
export function endBundleStep(step: string, what: string, broken: string[], summary: string): void {
  if (broken.length) {
    process.stderr.write(`${step}: the ${what} bundle breaks its rules:\n  ${broken.join('\n  ')}\n`);
    process.exit(1);
  }
  process.stdout.write(`${step}: ${summary}\n`);
}
