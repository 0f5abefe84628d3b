/**
 * Pure: what `onestor-agent status` shows. Joins discovery (what should be protected) with state (what
 * the agent did) at a given wall time; no I/O.
 */
import type { EligibleDisk } from '../shared/model.js';
import type { AgentState, DiskState } from '../cycle/state.js';

export type DiskHealth = 'ok' | 'running' | 'failing' | 'overdue' | 'never' | 'not-eligible';

export interface StatusRow {
  vm: number;
  disk: number;
  freq: number | null;
  /** seconds since the point in time of the last published snapshot */
  age: number | null;
  overdue: boolean;
  nextDue: number | null; // epoch s
  lastMode: string | null;
  lastBytes: number | null;
  lastMs: number | null;
  consistency: string | null;
  health: DiskHealth;
  detail: string;
  failCount: number;
}

export interface StatusReport {
  rows: StatusRow[];
  daemon: { alive: boolean; heartbeatAge: number | null; pid: number | null };
  protectedDisks: number;
  problems: number;
}

export function graceSeconds(freq: number, graceMinSec: number, gracePercent: number): number {
  return Math.max(graceMinSec, (freq * gracePercent) / 100);
}

export function buildStatus(input: {
  now: number; // epoch s
  state: AgentState;
  eligible: readonly EligibleDisk[];
  ineligible: ReadonlyArray<{ vmId: number; diskId?: number; reason: string; protectionRequested?: boolean }>;
  graceMinSec: number;
  gracePercent: number;
  heartbeatMaxAgeSec: number;
}): StatusReport {
  const rows: StatusRow[] = [];
  for (const d of input.eligible) {
    const s: DiskState | undefined = input.state.disks[`${d.vmId}.${d.diskId}`];
    const last = s?.lastSuccess;
    const age = last ? Math.max(0, input.now - last.capturedAt) : null;
    const overdue = age === null ? false : age > d.freqSeconds + graceSeconds(d.freqSeconds, input.graceMinSec, input.gracePercent);
    let health: DiskHealth;
    let detail = '';
    if (s?.phase) {
      health = 'running';
      detail = s.progress ? `${s.phase} ${pct(s.progress.sent, s.progress.total)}` : s.phase;
    } else if (s && s.failCount > 0) {
      health = 'failing';
      detail = `${s.failCount}x ${s.lastError?.message ?? s.lastError?.code ?? ''}`;
    } else if (!last) {
      health = 'never';
      detail = 'no snapshot yet';
    } else if (overdue) {
      health = 'overdue';
      detail = `older than ${d.freqSeconds}s + grace`;
    } else {
      health = 'ok';
      detail = last.consistency;
    }
    if (overdue && health === 'running') detail += ' (overdue)';
    // someone else's publish forced a full within the last day: say so beside whatever else is shown
    if (s?.lineageAlert && input.now - s.lineageAlert.at <= 86_400) detail += `; lineage alert (${s.lineageAlert.kind}): ${s.lineageAlert.reason}`;
    rows.push({
      vm: d.vmId,
      disk: d.diskId,
      freq: d.freqSeconds,
      age,
      overdue,
      nextDue: s?.nextDueAt ?? null,
      lastMode: last?.mode ?? null,
      lastBytes: last?.bytes ?? null,
      lastMs: last?.durationMs ?? null,
      consistency: last?.consistency ?? null,
      health,
      detail,
      failCount: s?.failCount ?? 0,
    });
  }
  for (const i of input.ineligible) {
    if (i.protectionRequested === false) continue;
    rows.push({ vm: i.vmId, disk: i.diskId ?? -1, freq: null, age: null, overdue: false, nextDue: null, lastMode: null, lastBytes: null, lastMs: null, consistency: null, health: 'not-eligible', detail: i.reason, failCount: 0 });
  }
  rows.sort((a, b) => a.vm - b.vm || a.disk - b.disk);
  const hb = input.state.daemon?.heartbeatAt;
  const heartbeatAge = hb === undefined ? null : Math.max(0, input.now - hb);
  const problems = rows.filter((r) => r.overdue || r.health === 'failing' || r.health === 'not-eligible').length;
  return {
    rows,
    daemon: { alive: heartbeatAge !== null && heartbeatAge <= input.heartbeatMaxAgeSec, heartbeatAge, pid: input.state.daemon?.pid ?? null },
    protectedDisks: input.eligible.length,
    problems,
  };
}

function pct(a: number, b: number): string {
  return b > 0 ? `${Math.floor((100 * a) / b)}%` : '';
}

export function humanDuration(sec: number | null): string {
  if (sec === null) return '-';
  const s = Math.round(sec);
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  if (s < 172800) return `${(s / 3600).toFixed(1)}h`;
  return `${(s / 86400).toFixed(1)}d`;
}

export function humanBytes(n: number | null): string {
  if (n === null) return '-';
  if (n < 1024) return `${n}B`;
  const u = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < u.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v >= 100 ? v.toFixed(0) : v.toFixed(1)}${u[i]}`;
}

/** Plain-text table: fixed columns, the detail last so long reasons never misalign the rest. */
export function renderStatusTable(r: StatusReport, now: number): string {
  const head = ['VM', 'DISK', 'FREQ', 'AGE', 'NEXT', 'LAST', 'BYTES', 'TOOK', 'STATE', 'DETAIL'];
  const body = r.rows.map((x) => [
    String(x.vm),
    x.disk < 0 ? '-' : String(x.disk),
    x.freq === null ? '-' : humanDuration(x.freq),
    x.age === null ? '-' : humanDuration(x.age) + (x.overdue ? '!' : ''),
    x.nextDue === null ? '-' : x.nextDue <= now ? 'due' : `in ${humanDuration(x.nextDue - now)}`,
    x.lastMode ?? '-',
    humanBytes(x.lastBytes),
    x.lastMs === null ? '-' : `${(x.lastMs / 1000).toFixed(1)}s`,
    x.health,
    x.detail,
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((row) => row[i]!.length)));
  const fmt = (row: string[]) => row.map((c, i) => (i === row.length - 1 ? c : c.padEnd(widths[i]!))).join('  ').trimEnd();
  const daemon = r.daemon.alive ? `daemon: running (pid ${r.daemon.pid}, heartbeat ${humanDuration(r.daemon.heartbeatAge)} ago)` : r.daemon.heartbeatAge === null ? 'daemon: never ran' : `daemon: NOT RUNNING (last heartbeat ${humanDuration(r.daemon.heartbeatAge)} ago)`;
  const summary = `${r.protectedDisks} protected disk(s), ${r.problems} problem(s); ${daemon}`;
  if (r.rows.length === 0) return `no protected disks found\n${summary}\n`;
  return [fmt(head), ...body.map(fmt), '', summary, ''].join('\n');
}
