#!/usr/bin/env node
/**
 * onestor-agent entry (the launcher install.sh writes runs this file). Parsing and dispatch are in
 * agent/dispatch.ts; this file only picks the command table, runs it and sets the exit code.
 *
 * `onestor-agent probe KIND` (how OpenNebula's probe wrappers call it, every minute on every host) goes to
 * agent/probe-cli.ts, which the build makes into one file: nothing else of the agent is loaded for it.
 * `onestor-agent run` (the daemon, as the systemd unit starts it) goes to agent/daemon-cli.ts, which the
 * build makes into one minified module with its packages (plus chunks the first cycle loads).
 * `onestor-agent receive` (the replica side, started by sshd for every connection) goes to
 * agent/receive-cli.ts, which the build makes into one minified CommonJS file with its packages
 * (receive-cli.cjs), run with V8's code cache of it (lib/shared/script-bundle.ts); without that file (a build
 * without esbuild), tsc's module.
 * Any other shape of command line goes to agent/cli.ts, which knows every command (probe and run included).
 * No static import here but built-ins: the entry loads exactly one of the four.
 */
import { existsSync } from 'node:fs';
import module from 'node:module';
import { fileURLToPath } from 'node:url';

// Node >= 22.1 can keep the compiled code of the modules loaded below in a cache on disk (its default
// directory, or NODE_COMPILE_CACHE); Node 18 and 20 have no such call. A cache it cannot use is ignored.
(module as { enableCompileCache?: () => unknown }).enableCompileCache?.();

interface Cli {
  runCli(argv: string[]): Promise<number>;
}

async function receiveCli(): Promise<Cli> {
  const bundle = new URL('./receive-cli.cjs', import.meta.url);
  if (!existsSync(bundle)) return import('./receive-cli.js');
  const { loadScriptBundle } = await import('../lib/shared/script-bundle.js');
  return loadScriptBundle(fileURLToPath(bundle)).exports as unknown as Cli;
}

const argv = process.argv.slice(2);
const cli: Promise<Cli> = argv[0] === 'probe' ? import('./probe-cli.js') : argv[0] === 'run' ? import('./daemon-cli.js') : argv[0] === 'receive' ? receiveCli() : import('./cli.js');

cli
  .then((c) => c.runCli(argv))
  .then(
    (code) => {
      process.exitCode = code;
    },
    async (e: unknown) => {
      process.stderr.write(`onestor-agent: ${e instanceof Error ? e.message : String(e)}\n`);
      process.exitCode = (await import('./exit-codes.js')).Exit.FAILED;
    },
  );
