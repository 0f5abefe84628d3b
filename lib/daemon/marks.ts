/**
 * Pure: what the daemon writes into the state file at each heartbeat — its own record (pid, heartbeat,
 * the grace it runs with) and, per disk it schedules, next-due / queued / running marks and transfer
 * progress. Outcomes (last success, last error) are written by the cycle itself and kept as they are.
 */
import { getDisk, diskKey, type AgentState } from '../cycle/state.js';
import type { EligibleDisk } from '../shared/model.js';
import type { DiskView } from './schedule.js';

export interface Marks {
  host?: string;
  daemon: NonNullable<AgentState['daemon']>;
  view: readonly DiskView[];
  eligible: ReadonlyMap<string, EligibleDisk>;
  progress: ReadonlyMap<string, { sent: number; total: number; at: number }>;
}

export function applyMarks(s: AgentState, m: Marks): AgentState {
  s.host = m.host ?? s.host;
  s.daemon = m.daemon;
  for (const v of m.view) {
    const k = diskKey(v.vmId, v.diskId);
    const e = m.eligible.get(k);
    const cur = getDisk(s, v.vmId, v.diskId);
    // a phase the daemon did not set (a CLI snapshot's) stays; its own stale marks are cleared
    const phase = v.running ? 'running' : v.queuedSince !== undefined ? 'queued' : cur.phase === 'running' || cur.phase === 'queued' ? undefined : cur.phase;
    s.disks[k] = {
      ...cur,
      progress: v.running ? m.progress.get(k) : undefined,
      ...(e ? { domainName: e.domainName, freqSeconds: e.freqSeconds, replicaHost: e.replicaHost } : {}),
      nextDueAt: v.nextDueAt,
      queuedSince: v.queuedSince,
      phase,
    };
  }
  return s;
}
