/**
 * What the build's bundle steps (bundle-probe.ts, bundle-daemon.ts) share: esbuild is a devDependency, so a
 * production-only install has none, and then a step leaves tsc's output as it is (it works the same) after
 * saying so; and the map tsc wrote for the file a step replaces, which would describe the wrong file.
 */
import { rmSync } from 'node:fs';

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
