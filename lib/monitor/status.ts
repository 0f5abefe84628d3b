/**
 * Pure: what `onestor-agent status` shows. Joins discovery (what should be protected) with state (what
 * the agent did) at a given wall time; no I/O.
 */
import type { EligibleDisk } from '../shared/model.js';
import type { AgentState } from '../cycle/state.js';
import { assess, LINEAGE_ALERT_WINDOW_SEC, type VerdictKind } from './assessment.js';

/** The disk's verdict (assessment.ts, the same as the probes and Prometheus), or why it is not eligible. */
export type DiskHealth = VerdictKind | 'not-eligible';

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
  /** cycle in progress (queued, running, ...), shown beside the verdict */
  phase: string | null;
  detail: string;
  /** the stable code of a non-ok verdict (the cycle's error code, E_OVERDUE, ...), as the probe prints it */
  code: string | null;
  failCount: number;
}

export interface StatusReport {
  rows: StatusRow[];
  daemon: { alive: boolean; heartbeatAge: number | null; pid: number | null };
  protectedDisks: number;
  problems: number;
}

export function buildStatus(input: {
  now: number; // epoch s
  state: AgentState;
  /** why the state file could not be read (the daemon then counts as down, as in the probe) */
  stateError?: string;
  stateFile?: string;
  eligible: readonly EligibleDisk[];
  ineligible: ReadonlyArray<{ vmId: number; diskId?: number; reason: string; protectionRequested?: boolean }>;
}): StatusReport {
  const a = assess({
    now: input.now,
    state: input.stateError ? null : input.state,
    stateError: input.stateError,
    stateFile: input.stateFile ?? 'state.json',
    discovered: input.eligible.map((d) => ({ vmId: d.vmId, diskId: d.diskId, freqSeconds: d.freqSeconds })),
  });
  const rows: StatusRow[] = [];
  for (const v of a.disks) {
    const s = input.state.disks[`${v.vmId}.${v.diskId}`];
    const last = s?.lastSuccess;
    const phase = s?.phase ?? null;
    let detail: string;
    if (v.kind === 'failing') detail = `${s?.failCount ?? 0}x ${v.message ?? ''}`; // "CODE: message", as the probe says it
    else if (v.kind === 'overdue') detail = `older than ${v.freqSeconds}s + last cycle + grace`;
    else if (v.kind === 'never') detail = 'no snapshot yet';
    // the verdict is the daemon's, but a failure the last cycle recorded (a CLI snapshot) still shows
    else if (v.kind === 'daemon-down') detail = v.lastFailure ? `daemon not running; last cycle failed ${s?.failCount ?? 0}x ${v.lastFailure.message}` : 'daemon not running';
    else detail = last?.consistency ?? '';
    if (phase) detail = `${s?.progress ? `${phase} ${pct(s.progress.sent, s.progress.total)}` : phase}; ${detail}`;
    // someone else's publish forced a full within the last day: say so beside whatever else is shown
    if (s?.lineageAlert && input.now - s.lineageAlert.at <= LINEAGE_ALERT_WINDOW_SEC) detail += `; lineage alert (${s.lineageAlert.kind}): ${s.lineageAlert.reason}`;
    rows.push({
      vm: v.vmId,
      disk: v.diskId,
      freq: v.freqSeconds ?? null,
      age: last ? Math.max(0, input.now - last.capturedAt) : null,
      overdue: v.overdue,
      nextDue: s?.nextDueAt ?? null,
      lastMode: last?.mode ?? null,
      lastBytes: last?.bytes ?? null,
      lastMs: last?.durationMs ?? null,
      consistency: last?.consistency ?? null,
      health: v.kind,
      phase,
      detail,
      code: v.code ?? null,
      failCount: s?.failCount ?? 0,
    });
  }
  for (const i of input.ineligible) {
    if (i.protectionRequested === false) continue;
    rows.push({ vm: i.vmId, disk: i.diskId ?? -1, freq: null, age: null, overdue: false, nextDue: null, lastMode: null, lastBytes: null, lastMs: null, consistency: null, health: 'not-eligible', phase: null, detail: i.reason, code: 'E_NOT_ELIGIBLE', failCount: 0 });
  }
  rows.sort((a, b) => a.vm - b.vm || a.disk - b.disk);
  const problems = rows.filter((r) => r.overdue || r.health === 'failing' || r.health === 'not-eligible').length;
  return {
    rows,
    daemon: { alive: a.daemon.alive, heartbeatAge: a.daemon.heartbeatAgeS ?? null, pid: input.state.daemon?.pid ?? null },
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
