/** Compiles dist/ when it is missing or older than the sources (tests that spawn dist/ entries need it current). */
import { existsSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { run } from '../../lib/shared/exec.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

export async function ensureDistBuilt(entries: string[]): Promise<void> {
  const sources = ['lib', 'test/harness'].flatMap((d) =>
    (readdirSync(path.join(repoRoot, d), { recursive: true }) as string[]).filter((n) => n.endsWith('.ts')).map((n) => path.join(repoRoot, d, n)),
  );
  const newest = Math.max(...sources.map((s) => statSync(s).mtimeMs));
  if (entries.every((e) => existsSync(e) && statSync(e).mtimeMs >= newest)) return;
  await run(process.execPath, [path.join(repoRoot, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', path.join(repoRoot, 'tsconfig.build.json')], { timeoutMs: 300_000 });
  for (const e of entries) if (!existsSync(e)) throw new Error(`build did not produce ${e}`);
}
