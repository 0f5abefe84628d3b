/**
 * `onestor-agent receive`, which the agent starts over SSH on the replica for every connection: the same
 * parsing, help and exit codes as every command (agent/dispatch.ts), with a table that holds `receive` only.
 * agent/main.ts comes here when the first argument is `receive`. The build turns this file and the whole
 * receiver, with its packages, into ONE minified module (dev/bundle-receive.ts): a connection waits for the
 * receiver's hello, and Node's ESM loader took ~170 ms to load the receiver's hundred-odd modules.
 */
import { dispatch, type CliIo, type CommandLoaders } from './dispatch.js';

export const RECEIVE_LOADERS: CommandLoaders = {
  receive: () => import('./commands/receive.js'),
};

export function runCli(argv: string[], io: CliIo = process): Promise<number> {
  return dispatch(RECEIVE_LOADERS, argv, io);
}
