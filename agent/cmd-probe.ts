/** `onestor-agent probe KIND`: OpenNebula monitoring output (agent/probe.ts). */
import type { Logger } from 'pino';
import type { Flags } from './flags.js';

export async function run(f: Flags, pos: string[], log: Logger): Promise<number> {
  const { runProbeCommand } = await import('./probe.js');
  return runProbeCommand(f, pos, log);
}
