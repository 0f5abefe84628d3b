/**
 * The one place that decides what to say about a protected disk and about the daemon. `onestor-agent
 * status`, the OpenNebula probes (vm/snapshot lines, host ONESTOR_AGENT line) and the Prometheus textfile
 * all call this module, so they cannot disagree about the same state. Pure: state in, verdicts out.
 *
 * Rules (each was two or three rules before; see the README "Monitoring"):
 *  - Overdue: the last snapshot's point in time is older than
 *      freq + duration of the last cycle + grace,  grace = max(graceMinSec, freq * gracePercent / 100)
 *    DESIGN §1 promises an age within "N plus the duration of one cycle"; the grace is the scheduler's
 *    configured tolerance (schedule.graceMinSec / gracePercent, defaults 60 s / 10 %). The daemon writes
 *    the grace it runs with into the state file, so the probe (which loads no config) uses the same one.
 *  - Daemon alive: its heartbeat in the state file is at most 180 s old. The daemon writes it at least
 *    every 30 s (min(30 s, rescanSec)), so this is six missed heartbeats; 180 s was the probe's limit
 *    and also what `status` computed at the default rescanSec (60 s).
 *  - Verdict precedence: daemon down > failing (last error newer than last success) > never snapshotted
 *    > overdue > ok. A cycle in progress changes nothing: the disk is as protected as its last snapshot.
 */
import type { AgentState, DiskState } from '../cycle/state.js';

export interface GraceRule {
  graceMinSec: number;
  gracePercent: number;
}

/** Same values as the config schema's schedule defaults; used only when the state names no grace. */
export const DEFAULT_GRACE: Readonly<GraceRule> = Object.freeze({ graceMinSec: 60, gracePercent: 10 });

/** The daemon is taken for dead when its heartbeat is older than this (seconds). */
export const HEARTBEAT_MAX_AGE_SEC = 180;

/** A lineage alert (someone else's publish forced a full) counts as recent for this long (seconds). */
export const LINEAGE_ALERT_WINDOW_SEC = 86_400;

export type VerdictKind = 'ok' | 'overdue' | 'failing' | 'never' | 'daemon-down';

/** Stable codes for the non-ok verdicts, as the probe prints them in ERROR_CODE. */
export const VERDICT_CODES = {
  overdue: 'E_OVERDUE',
  never: 'E_NO_SNAPSHOT',
  'daemon-down': 'E_AGENT_DOWN',
} as const;

export interface DiskAssessment {
  vmId: number;
  diskId: number;
  kind: VerdictKind;
  /** E_OVERDUE, E_NO_SNAPSHOT, E_AGENT_DOWN, or the cycle's own error code when failing */
  code?: string;
  /** human text for non-ok verdicts (the probe prints `ERROR <message>`) */
  message?: string;
  /** the state record (history: last success, last error, phase, progress) when the agent has one */
  disk?: DiskState;
  freqSeconds?: number;
  /** seconds since the point in time of the last published snapshot */
  ageS?: number;
  /** age beyond which the disk is overdue (null when the frequency is unknown) */
  limitS: number | null;
  overdue: boolean;
  /** the last cycle's error when it is newer than the last success (also while the daemon is down) */
  lastFailure?: { code: string; message: string };
}

export interface DaemonAssessment {
  alive: boolean;
  heartbeatAgeS?: number;
  /** why the daemon is taken for dead (null when alive) */
  downReason: string | null;
}

/** The grace the daemon recorded in the state, else the defaults. */
export function graceOf(state: AgentState | null | undefined): GraceRule {
  const g = state?.daemon?.grace;
  return g ? { graceMinSec: g.minSec, gracePercent: g.percent } : { ...DEFAULT_GRACE };
}

export function graceSeconds(freqSeconds: number, g: GraceRule): number {
  return Math.max(g.graceMinSec, (freqSeconds * g.gracePercent) / 100);
}

/** Pure: the age (s) beyond which a snapshot is overdue. */
export function overdueLimitSec(freqSeconds: number, lastCycleMs: number, g: GraceRule): number {
  return freqSeconds + lastCycleMs / 1000 + graceSeconds(freqSeconds, g);
}

export function assessDaemon(state: AgentState | null, stateError: string | undefined, now: number, stateFile: string): DaemonAssessment {
  if (!state) return { alive: false, downReason: `onestor-agent state unreadable: ${stateError ?? 'unknown error'}` };
  if (!state.daemon) return { alive: false, downReason: `onestor-agent is not running (no daemon record in ${stateFile})` };
  const age = Math.max(0, Math.round(now - state.daemon.heartbeatAt));
  if (now - state.daemon.heartbeatAt > HEARTBEAT_MAX_AGE_SEC) {
    return { alive: false, heartbeatAgeS: age, downReason: `onestor-agent is not running (last heartbeat ${age} s ago, limit ${HEARTBEAT_MAX_AGE_SEC} s; state ${stateFile})` };
  }
  return { alive: true, heartbeatAgeS: age, downReason: null };
}

export function assessDisk(input: { vmId: number; diskId: number; disk?: DiskState; freqSeconds?: number; now: number; grace: GraceRule; downReason: string | null }): DiskAssessment {
  const d = input.disk;
  const freq = input.freqSeconds ?? d?.freqSeconds;
  const s = d?.lastSuccess;
  const ageS = s ? Math.max(0, Math.round(input.now - s.capturedAt)) : undefined;
  const limitS = freq === undefined ? null : overdueLimitSec(freq, s?.durationMs ?? 0, input.grace);
  const overdue = ageS !== undefined && limitS !== null && ageS > limitS;
  const e = d?.lastError;
  // the last cycle failed: its error is newer than the last success
  const lastFailure = e && (!s || e.at >= s.finishedAt) ? { code: e.code, message: `${e.code}: ${e.message}` } : undefined;
  const base = { vmId: input.vmId, diskId: input.diskId, disk: d, freqSeconds: freq, ageS, limitS, overdue, ...(lastFailure ? { lastFailure } : {}) };
  if (input.downReason) return { ...base, kind: 'daemon-down', code: VERDICT_CODES['daemon-down'], message: input.downReason };
  if (lastFailure) return { ...base, kind: 'failing', ...lastFailure };
  if (!s) {
    const p = d?.progress;
    const message = p && p.total > 0 ? `first snapshot in progress (${Math.floor((100 * p.sent) / p.total)}% sent)` : `no recovery snapshot yet${d?.phase ? ` (phase ${d.phase})` : ''}`;
    return { ...base, kind: 'never', code: VERDICT_CODES.never, message };
  }
  if (overdue) return { ...base, kind: 'overdue', code: VERDICT_CODES.overdue, message: `snapshot overdue: last one ${ageS} s old, frequency ${freq} s` };
  return { ...base, kind: 'ok' };
}

/** A disk that discovery (vm.xml/ds.xml on this host) says should be protected. */
export interface ProtectedDisk {
  vmId: number;
  diskId: number;
  freqSeconds?: number;
}

export interface AssessInput {
  now: number; // epoch seconds
  stateFile: string;
  /** null when the state could not be read; stateError says why */
  state: AgentState | null;
  stateError?: string;
  /**
   * Which disks exist. Given: these disks are assessed (state adds their history). Absent: the disks in
   * the state are. The probe passes discovery only when the daemon is down (it then cannot trust the
   * state to list what exists); `status` always passes it.
   */
  discovered?: readonly ProtectedDisk[];
  discoveryError?: string;
}

export interface Assessment {
  daemon: DaemonAssessment;
  disks: DiskAssessment[];
}

/** Every disk to report and what to say about it, sorted by VM then disk. */
export function assess(input: AssessInput): Assessment {
  const daemon = assessDaemon(input.state, input.stateError, input.now, input.stateFile);
  const grace = graceOf(input.state);
  const known = new Map<string, DiskState>();
  for (const d of Object.values(input.state?.disks ?? {})) known.set(`${d.vmId}.${d.diskId}`, d);
  let downReason = daemon.downReason;
  if (downReason && input.discoveryError) downReason = `${downReason}; discovery: ${input.discoveryError}`;
  const list: ProtectedDisk[] = input.discovered ? [...input.discovered] : [...known.values()].map((d) => ({ vmId: d.vmId, diskId: d.diskId }));
  const disks = list
    .map((p) => assessDisk({ vmId: p.vmId, diskId: p.diskId, disk: known.get(`${p.vmId}.${p.diskId}`), freqSeconds: p.freqSeconds, now: input.now, grace, downReason }))
    .sort((a, b) => a.vmId - b.vmId || a.diskId - b.diskId);
  return { daemon: { ...daemon, downReason }, disks };
}

export interface AgentSummary {
  up: boolean;
  heartbeatAgeS?: number;
  protectedDisks: number;
  /** disks whose verdict is not ok (failing, never snapshotted, overdue, daemon down) */
  failingDisks: number;
  overdueDisks: number;
  oldestSnapshotAgeS?: number;
  /** bytes of the last cycle of each disk that finished within the window (state keeps one cycle per disk) */
  bytesSentRecent: number;
  /** disks where someone else's publish forced a full within LINEAGE_ALERT_WINDOW_SEC */
  lineageAlertsRecent: number;
  downReason: string | null;
}

export function summarize(a: Assessment, now: number, recentWindowS = 3600): AgentSummary {
  let oldest: number | undefined;
  let bytes = 0;
  for (const r of a.disks) {
    if (r.ageS !== undefined) oldest = oldest === undefined ? r.ageS : Math.max(oldest, r.ageS);
    const s = r.disk?.lastSuccess;
    if (s && now - s.finishedAt <= recentWindowS) bytes += s.bytes;
  }
  return {
    up: a.daemon.alive,
    heartbeatAgeS: a.daemon.heartbeatAgeS,
    protectedDisks: a.disks.length,
    failingDisks: a.disks.filter((r) => r.kind !== 'ok').length,
    overdueDisks: a.disks.filter((r) => r.overdue).length,
    oldestSnapshotAgeS: oldest,
    bytesSentRecent: bytes,
    lineageAlertsRecent: a.disks.filter((r) => r.disk?.lineageAlert && now - r.disk.lineageAlert.at <= LINEAGE_ALERT_WINDOW_SEC).length,
    downReason: a.daemon.downReason,
  };
}
