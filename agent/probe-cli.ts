/**
 * `onestor-agent probe KIND`, which OpenNebula's probe wrappers run every minute on every host: the same
 * parsing, help and exit codes as every command (agent/dispatch.ts), with a table that holds `probe` only.
 * agent/main.ts comes here when the first argument is `probe`. The build turns this file and the whole probe
 * path into ONE module (dev/bundle-probe.ts): Node's ESM loader costs about half a millisecond of CPU and a
 * thread-pool round trip per module, and the probe path is some twenty of them.
 */
import { dispatch, type CliIo, type CommandLoaders } from './dispatch.js';

export const PROBE_LOADERS: CommandLoaders = {
  probe: () => import('./commands/probe.js'),
};

export function runCli(argv: string[], io: CliIo = process): Promise<number> {
  return dispatch(PROBE_LOADERS, argv, io);
}
