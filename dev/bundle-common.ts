/**
 * What the build's bundle steps (bundle-probe.ts, bundle-daemon.ts, bundle-receive.ts) share: esbuild is a
 * devDependency, so a production-only install has none, and then a step leaves tsc's output as it is (it
 * works the same) after saying so; the map tsc wrote for the file a step replaces, which would describe the
 * wrong file; and the options every bundle is built with.
 */
import { rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export type Esbuild = typeof import('esbuild');

/** esbuild, or null after telling why the step does nothing (`effect`: what the user loses). */
export async function optionalEsbuild(step: string, entry: string, effect: string): Promise<Esbuild | null> {
  try {
    return await import('esbuild');
  } catch {
    process.stderr.write(`${step}: esbuild is not installed; ${entry} stays as tsc wrote it (${effect})\n`);
    return null;
  }
}

/** tsc's source map of a file a bundle replaces (the bundles have none): a stale map would mislead. */
export function dropStaleMap(file: string): void {
  rmSync(`${file}.map`, { force: true });
}

/** The dist directory a step works on: its first argument, else the dist the step itself was built into. */
export function distDir(stepUrl: string): string {
  return path.resolve(process.argv[2] ?? path.join(path.dirname(fileURLToPath(stepUrl)), '..'));
}

/** Every bundle: ESM for Node 18+, replacing tsc's file in place, no map, a metafile for the step's checks. */
export const NODE_ESM_BUNDLE = {
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
 * The banner of a bundle holding CommonJS packages: pino and its helpers require() Node built-ins, which an
 * ESM module has no `require` for.
 */
export function bannerWithRequire(step: string, entrySource: string): string {
  return `// Built by dev/${step}.ts from ${entrySource}: edit the sources, not this file.\nimport { createRequire as __onestorCreateRequire } from 'node:module';\nconst require = __onestorCreateRequire(import.meta.url);`;
}
