/**
 * The command line with every command: agent/dispatch.ts does the parsing, help and exit codes; this
 * file is the table of commands, one import() each, so the module graph of the others is never loaded.
 * `onestor-agent probe ...` does not come through here at all (agent/main.ts -> agent/probe-cli.ts).
 */
import { dispatch, type CliIo, type CommandLoaders } from './dispatch.js';

export type { CliIo, CommandModule } from './dispatch.js';

/** One import() per command: the module graph of the others is never loaded. */
export const LOADERS: CommandLoaders = {
  run: () => import('./commands/run.js'),
  status: () => import('./commands/status.js'),
  list: () => import('./commands/list.js'),
  snapshot: () => import('./commands/snapshot.js'),
  receive: () => import('./commands/receive.js'),
  probe: () => import('./commands/probe.js'),
  demo: () => import('./commands/demo.js'),
  yield: () => import('./commands/yield.js'),
};

export function runCli(argv: string[], io: CliIo = process): Promise<number> {
  return dispatch(LOADERS, argv, io);
}
