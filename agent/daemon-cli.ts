/**
 * `onestor-agent run`, the daemon (how the systemd unit starts it): the same parsing, help and exit codes as
 * every command (agent/dispatch.ts), with a table that holds `run` only. agent/main.ts comes here when the
 * first argument is `run`. The build turns this file and the daemon's modules, with zod, pino and
 * fast-xml-parser, into one minified module plus chunks that load only with the first cycle
 * (dev/bundle-daemon.ts): a daemon that sits idle most of the time keeps less code in memory.
 */
import { config as zodConfig } from 'zod';
import { dispatch, type CliIo, type CommandLoaders } from './dispatch.js';

// zod compiles a parser per object schema (new Function) on first use; interpreted parsing costs the
// daemon about 1 MiB less resident, and what it validates (config, state, replica messages) is small.
zodConfig({ jitless: true });

export const DAEMON_LOADERS: CommandLoaders = {
  run: () => import('./commands/run.js'),
};

export function runCli(argv: string[], io: CliIo = process): Promise<number> {
  return dispatch(DAEMON_LOADERS, argv, io);
}
