/**
 * Builds dist/ (`npm run build`: tsc and the bundle steps) when it is missing or older than a source of
 * lib/, agent/ or dev/: tests that spawn dist/ entries need it current. `npm test` builds first, so there
 * this only checks; a plain `vitest run` after an edit builds once: two test files run at a time, and the
 * check and the build run under one lock (flock), so a second file waits and then finds dist current
 * instead of rewriting files the first may already be running.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { run } from '../../lib/shared/exec.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

const CHECK_AND_BUILD = [
  'set -e',
  'cd "$1"',
  // dist/agent/main.js is rewritten by every build (tsc emits every file)
  'if [ -f dist/agent/main.js ] && [ -z "$(find lib agent dev -name "*.ts" -newer dist/agent/main.js -print -quit)" ]; then exit 0; fi',
  'npm run -s build >&2',
].join('\n');

export async function ensureDistBuilt(): Promise<void> {
  const r = await run('flock', [path.join(repoRoot, 'node_modules', '.onestor-build.lock'), 'sh', '-c', CHECK_AND_BUILD, 'build-dist', repoRoot], { timeoutMs: 300_000 });
  if (r.code !== 0) throw new Error(`npm run build failed (exit ${r.code}): ${r.stderr.slice(-2000)}`);
}
