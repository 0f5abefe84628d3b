/**
 * Build step (run by dev/bundle-receive.ts): V8's code cache of the receiver bundle, BUNDLE.v8cache, which
 * lib/shared/script-bundle.ts reads at every receiver start. Made after one real session: the bundle runs as
 * `receive` in a child process (its stdin/stdout are the protocol, as under sshd), this step plays the agent
 * (hello, open a disk, close, bye) against a throwaway snaps dir, and the child writes the cache once its
 * session ended with exit 0. The cache then holds the code of every function that session ran, not only
 * the top level. A failed session throws (bundle-receive.ts then removes the bundle and warns).
 *
 * The cache is only valid for the Node that made it (lib/shared/script-bundle.ts checks): install.sh builds with
 * the Node that runs the agent. The child runs with no extra Node flags, as the launcher starts the receiver.
 *
 *   node dist/dev/code-cache.js BUNDLE              make BUNDLE.v8cache
 *   node dist/dev/code-cache.js --child BUNDLE ARGS  (internal) the child: run the bundle, write the cache
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rename, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { codeCachePath, encodeCodeCache, loadScriptBundle } from '../lib/shared/script-bundle.js';
import { ReceiverConnection } from '../lib/transfer/replica-client.js';

const SESSION_TIMEOUT_MS = 60_000;

/** The child: the bundle compiled from source, one `receive` session, then its code cache written. */
async function child(bundle: string, argv: string[]): Promise<number> {
  const loaded = loadScriptBundle(bundle, { codeCache: false });
  const code = await (loaded.exports as { runCli(a: string[]): Promise<number> }).runCli(argv);
  if (code !== 0) {
    process.stderr.write(`code-cache: the receiver session ended with exit ${code}; no cache written\n`);
    return 1;
  }
  const file = codeCachePath(bundle);
  const tmp = `${file}.${process.pid}.tmp`;
  await writeFile(tmp, encodeCodeCache(loaded.sourceSha256, process.version, loaded.script.createCachedData()));
  await rename(tmp, file);
  return 0;
}

/** Makes BUNDLE.v8cache; returns its size. Throws when the session or the child fails. */
export async function makeCodeCache(bundle: string): Promise<number> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'onestor-code-cache-'));
  try {
    const snaps = path.join(dir, 'snaps');
    const config = path.join(dir, 'config.json');
    await writeFile(config, '{}\n');
    const self = fileURLToPath(import.meta.url);
    const args = ['receive', '--snaps-dir', snaps, '--host', 'build', '--config', config, '--sshrc', path.join(dir, 'no-sshrc'), '--log-level', 'error'];
    const proc = spawn(process.execPath, [self, '--child', bundle, ...args], { stdio: ['pipe', 'pipe', 'inherit'] });
    const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
    const timer = setTimeout(() => proc.kill('SIGKILL'), SESSION_TIMEOUT_MS);
    try {
      const conn = new ReceiverConnection(proc.stdout, proc.stdin);
      await conn.hello('build', 'code-cache');
      const disk = await conn.openDisk(1, 0);
      await disk.close();
      await conn.bye();
      proc.stdin.end();
      const code = await exited;
      if (code !== 0) throw new Error(`the receiver bundle's session ended with exit ${code}`);
    } finally {
      clearTimeout(timer);
      proc.kill('SIGKILL');
    }
    return (await stat(codeCachePath(bundle))).size;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const [first, ...rest] = process.argv.slice(2);
  const run = first === '--child' ? child(rest[0]!, rest.slice(1)) : makeCodeCache(path.resolve(first ?? '')).then((n) => (process.stdout.write(`code-cache: ${codeCachePath(first!)} ${(n / 1024).toFixed(0)} KiB\n`), 0));
  run.then(
    (code) => {
      process.exitCode = code;
    },
    (e: unknown) => {
      process.stderr.write(`code-cache: ${e instanceof Error ? e.message : String(e)}\n`);
      process.exitCode = 1;
    },
  );
}
