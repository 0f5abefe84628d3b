/**
 * `onestor-agent status`: am I protected? Discovery (what should be protected) joined with the state
 * (what the agent did), judged by lib/monitor/assessment.ts like the probes and Prometheus.
 */
import type { Logger } from 'pino';
import { Exit } from '../exit-codes.js';
import type { Flags } from '../flags.js';
import { discoverHere } from './list.js';
import { StateStore } from '../../lib/cycle/state.js';
import { buildStatus, renderStatusTable } from '../../lib/monitor/status.js';

export async function run(f: Flags, _pos: string[], log: Logger): Promise<number> {
  const { config, found } = await discoverHere(f, log);
  const store = new StateStore(config.stateDir);
  const loaded = await store.loadOrReadOnly();
  if (loaded.error) log.warn({ file: store.file }, `state unreadable: ${loaded.error}`);
  const now = Math.floor(Date.now() / 1000);
  const report = buildStatus({ now, state: loaded.state, stateError: loaded.error, stateFile: store.file, eligible: found.eligible, ineligible: found.ineligible });
  if (f.json) process.stdout.write(JSON.stringify(report, null, 2) + '\n');
  else process.stdout.write(renderStatusTable(report, now));
  if (report.protectedDisks > 0 && !report.daemon.alive) return Exit.DAEMON_DOWN;
  return report.rows.some((r) => r.overdue || r.health === 'failing') ? Exit.NOT_PROTECTED : Exit.OK;
}
