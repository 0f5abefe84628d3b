/** `onestor-agent run`: the daemon (wiring in agent/daemon.ts). */
import type { Logger } from 'pino';
import type { Flags } from './flags.js';

export async function run(f: Flags, pos: string[], log: Logger): Promise<number> {
  const { runDaemonCommand } = await import('./daemon.js');
  return runDaemonCommand(f, pos, log);
}
