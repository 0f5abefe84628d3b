/**
 * Pure cores of the monitoring probes: agent state (+ discovery, + filesystem figures) in, OpenNebula
 * template lines out. No I/O here; agent/probe.ts gathers the inputs under a deadline.
 *
 * State is read with a small hand-written check instead of the zod schema in state.ts: loading zod
 * costs ~65 ms on a 2-core host and the probe runs every minute on every host. Only the fields the
 * probe prints are checked; anything else in the file is ignored.
 */
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import { singleAttribute, vectorAttribute, type TemplateScalar } from './one-template.js';
import type { AgentState, DiskState } from '../cycle/state.js';
import { effectiveCacheLimitMb, type BookkeepingSummary, type CacheSummary, type FsFigures, type SnapsSummary } from './usage.js';
import type { TakeoverSummary, WriterRecord } from '../shared/ledger.js';

export { DEFAULT_STATE_FILE, DEFAULT_DATASTORE_LOCATION } from '../shared/defaults.js';
/** The daemon is taken for dead when its heartbeat is older than this (seconds). */
export const DEFAULT_HEARTBEAT_MAX_AGE_S = 180;

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/** Pure: DATASTORE_LOCATION from the monitord config XML that probes get on stdin. */
export function dsLocationFromMonitordXml(xml: string): string | null {
  const m = /<DATASTORE_LOCATION>\s*(?:<!\[CDATA\[([\s\S]*?)\]\]>|([^<]*))\s*<\/DATASTORE_LOCATION>/.exec(xml);
  const raw = (m?.[1] ?? m?.[2] ?? '').trim();
  if (!raw) return null;
  const v = raw.replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&quot;/g, '"').replace(/&apos;/g, "'").replace(/&amp;/g, '&');
  // only an absolute path is usable; anything else falls back to the default
  return v.startsWith('/') && !v.includes('\0') ? v : null;
}

function fail(file: string, field: string, msg: string): never {
  throw new OnestorError(ErrorCodes.STATE, msg, { file, field });
}
const isObj = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const isNum = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v);

/** Pure: the state file's text, checked for what the probe prints. Throws E_STATE naming file and field. */
export function parseProbeState(text: string, file: string): AgentState {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new OnestorError(ErrorCodes.STATE, `not valid JSON (${(e as Error).message})`, { file });
  }
  if (!isObj(raw)) fail(file, '', 'expected a JSON object');
  if (raw.version !== 1) fail(file, 'version', `unsupported state version ${JSON.stringify(raw.version)}`);
  if (raw.daemon !== undefined) {
    if (!isObj(raw.daemon) || !isNum(raw.daemon.heartbeatAt)) fail(file, 'daemon.heartbeatAt', 'expected a number');
    if (raw.daemon.version !== undefined && typeof raw.daemon.version !== 'string') fail(file, 'daemon.version', 'expected a string');
  }
  if (!isObj(raw.disks)) fail(file, 'disks', 'expected an object');
  for (const [key, d] of Object.entries(raw.disks)) {
    const f = `disks.${key}`;
    if (!isObj(d)) fail(file, f, 'expected an object');
    for (const k of ['vmId', 'diskId'] as const) {
      if (!Number.isInteger(d[k]) || (d[k] as number) < 0) fail(file, `${f}.${k}`, 'expected a non-negative integer');
    }
    if (!Number.isInteger(d.failCount)) d.failCount = 0;
    for (const k of ['freqSeconds', 'nextDueAt'] as const) if (d[k] !== undefined && !isNum(d[k])) fail(file, `${f}.${k}`, 'expected a number');
    if (d.lastSuccess !== undefined) {
      const s = d.lastSuccess;
      if (!isObj(s)) fail(file, `${f}.lastSuccess`, 'expected an object');
      for (const k of ['capturedAt', 'finishedAt', 'durationMs', 'bytes'] as const) if (!isNum(s[k])) fail(file, `${f}.lastSuccess.${k}`, 'expected a number');
    }
    if (d.lineageAlert !== undefined) {
      const a = d.lineageAlert;
      if (!isObj(a) || typeof a.kind !== 'string' || typeof a.reason !== 'string' || !isNum(a.at)) fail(file, `${f}.lineageAlert`, 'expected {kind, reason, at}');
    }
    if (d.lastError !== undefined) {
      const e = d.lastError;
      if (!isObj(e) || typeof e.code !== 'string' || typeof e.message !== 'string' || !isNum(e.at)) fail(file, `${f}.lastError`, 'expected {code, message, at}');
    }
  }
  return raw as unknown as AgentState;
}

/** A disk that discovery (vm.xml/ds.xml on this host) says should be protected. */
export interface ProtectedDisk {
  vmId: number;
  diskId: number;
  freqSeconds?: number;
}

export interface VmProbeInput {
  now: number; // epoch seconds
  stateFile: string;
  /** null when the state could not be read; stateError says why */
  state: AgentState | null;
  stateError?: string;
  heartbeatMaxAgeS?: number;
  /** consulted when the daemon is not running (or state is unreadable); undefined = not consulted */
  discovered?: ProtectedDisk[];
  discoveryError?: string;
}

// ---------------------------------------------------------------------------------------------
// Per-disk verdict (shared by the VM probe, the host lines and Prometheus)
// ---------------------------------------------------------------------------------------------

export type DiskVerdict =
  | { kind: 'ok'; capturedAt: number }
  | { kind: 'error'; message: string; code: string };

export interface DiskReport {
  vmId: number;
  diskId: number;
  verdict: DiskVerdict;
  disk?: DiskState;
  ageS?: number;
  overdue: boolean;
}

export function agentDownReason(state: AgentState | null, stateError: string | undefined, now: number, maxAge: number, stateFile: string): string | null {
  if (!state) return `onestor-agent state unreadable: ${stateError ?? 'unknown error'}`;
  if (!state.daemon) return `onestor-agent is not running (no daemon record in ${stateFile})`;
  const age = Math.round(now - state.daemon.heartbeatAt);
  if (age > maxAge) return `onestor-agent is not running (last heartbeat ${age} s ago, limit ${maxAge} s; state ${stateFile})`;
  return null;
}

/** How late a snapshot may be before it counts as overdue: its frequency plus a cycle's worth. */
export function overdueAfterS(d: DiskState): number | null {
  if (d.freqSeconds === undefined) return null;
  const cycle = d.lastSuccess ? d.lastSuccess.durationMs / 1000 : 0;
  return d.freqSeconds + Math.max(60, 2 * cycle);
}

export function assessDisk(d: DiskState, now: number, downReason: string | null): DiskReport {
  const base = { vmId: d.vmId, diskId: d.diskId, disk: d };
  const s = d.lastSuccess;
  const ageS = s ? Math.max(0, Math.round(now - s.capturedAt)) : undefined;
  const limit = overdueAfterS(d);
  const overdue = ageS !== undefined && limit !== null && ageS > limit;
  if (downReason) return { ...base, ageS, overdue, verdict: { kind: 'error', code: 'E_AGENT_DOWN', message: downReason } };
  const e = d.lastError;
  if (e && (!s || e.at >= s.finishedAt)) {
    return { ...base, ageS, overdue, verdict: { kind: 'error', code: e.code, message: `${e.code}: ${e.message}` } };
  }
  if (!s) {
    const what = d.progress && d.progress.total > 0 ? `first snapshot in progress (${Math.floor((100 * d.progress.sent) / d.progress.total)}% sent)` : `no recovery snapshot yet${d.phase ? ` (phase ${d.phase})` : ''}`;
    return { ...base, overdue: false, verdict: { kind: 'error', code: 'E_NO_SNAPSHOT', message: what } };
  }
  if (overdue) {
    return { ...base, ageS, overdue, verdict: { kind: 'error', code: 'E_OVERDUE', message: `snapshot overdue: last one ${ageS} s old, frequency ${d.freqSeconds} s` } };
  }
  return { ...base, ageS, overdue, verdict: { kind: 'ok', capturedAt: s.capturedAt } };
}

/** The disks to report and what to say about each. Sorted by VM then disk. */
export function assessAll(input: VmProbeInput): { reports: DiskReport[]; downReason: string | null } {
  const maxAge = input.heartbeatMaxAgeS ?? DEFAULT_HEARTBEAT_MAX_AGE_S;
  let downReason = agentDownReason(input.state, input.stateError, input.now, maxAge, input.stateFile);
  const known = new Map<string, DiskState>();
  for (const d of Object.values(input.state?.disks ?? {})) known.set(`${d.vmId}.${d.diskId}`, d);
  let list: DiskState[];
  if (downReason && input.discovered) {
    // the daemon cannot prune state, so discovery decides which disks exist; state adds the history
    list = input.discovered.map((p) => known.get(`${p.vmId}.${p.diskId}`) ?? { vmId: p.vmId, diskId: p.diskId, freqSeconds: p.freqSeconds, checkpoint: null, base1Identity: null, failCount: 0 });
  } else {
    list = [...known.values()];
  }
  if (downReason && input.discoveryError) downReason = `${downReason}; discovery: ${input.discoveryError}`;
  const reports = list.map((d) => assessDisk(d, input.now, downReason)).sort((a, b) => a.vmId - b.vmId || a.diskId - b.diskId);
  return { reports, downReason };
}

// ---------------------------------------------------------------------------------------------
// vm/snapshot probe
// ---------------------------------------------------------------------------------------------

/** The lines inside one VM's MONITOR (before base64). */
export function diskRecoveryLine(r: DiskReport): string {
  const d = r.disk;
  const s = d?.lastSuccess;
  const extra: Array<[string, TemplateScalar | undefined]> = [];
  if (s) {
    extra.push(
      ['MODE', s.mode],
      ['CONSISTENCY', s.consistency],
      ['BYTES', s.bytes],
      ['DURATION', Math.round(s.durationMs) / 1000],
      ['AGE', r.ageS],
    );
  }
  if (d?.freqSeconds !== undefined) extra.push(['FREQ', d.freqSeconds]);
  if (d?.nextDueAt !== undefined) extra.push(['NEXT_DUE', String(Math.round(d.nextDueAt))]);
  if (d?.phase) extra.push(['PHASE', d.phase]);
  // Someone else's publish (take-over, tampering) forced a full: keep it visible (state keeps the last one).
  if (d?.lineageAlert) extra.push(['LINEAGE_ALERT', d.lineageAlert.kind], ['LINEAGE_ALERT_AT', String(Math.round(d.lineageAlert.at))], ['LINEAGE_ALERT_REASON', d.lineageAlert.reason]);
  if (r.verdict.kind === 'ok') {
    return vectorAttribute('DISK_RECOVERY_SNAPSHOT', [['ID', r.diskId], ['TIMESTAMP', String(Math.round(r.verdict.capturedAt))], ...extra]);
  }
  const errExtra: Array<[string, TemplateScalar | undefined]> = [['ERROR_CODE', r.verdict.code]];
  if (s) errExtra.push(['LAST_TIMESTAMP', String(Math.round(s.capturedAt))]);
  if (d && d.failCount > 0) errExtra.push(['FAIL_COUNT', d.failCount]);
  return vectorAttribute('DISK_RECOVERY_SNAPSHOT', [['ID', r.diskId], ['MSG', `ERROR ${r.verdict.message}`], ...errExtra, ...extra]);
}

/** `VM = [ ID="n", MONITOR="<base64>" ]` for every VM with protected disks. */
export function vmSnapshotLines(input: VmProbeInput): string[] {
  const { reports, downReason } = assessAll(input);
  const byVm = new Map<number, string[]>();
  for (const r of reports) {
    const lines = byVm.get(r.vmId) ?? [];
    lines.push(diskRecoveryLine(r));
    byVm.set(r.vmId, lines);
  }
  const out: string[] = [];
  for (const [vmId, lines] of byVm) {
    const b64 = Buffer.from(lines.join('\n'), 'utf8').toString('base64');
    out.push(vectorAttribute('VM', [['ID', String(vmId)], ['MONITOR', b64]]));
  }
  // Nothing names a VM (no state, no discovery): say why in a comment, which the lexer skips.
  if (out.length === 0 && downReason && !input.state) out.push(commentLine(`onestor-agent probe: ERROR ${downReason}`));
  return out;
}

/** A `#` comment line: ignored by OpenNebula's parser, visible to whoever runs the probe by hand. */
/**
 * A `#` comment line. Line breaks become spaces and other control characters `\xNN`: OpenNebula reads the
 * probe output as a C string, so a raw NUL (a zero-filled state file puts them in the error text) would cut
 * the comment short and make the whole message a syntax error.
 */
export function commentLine(text: string): string {
  const clean = text
    .replace(/[\r\n]+/g, ' ')
    // eslint-disable-next-line no-control-regex
    .replace(/[\x00-\x08\x0b-\x1f\x7f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
  return `# ${clean}`;
}

// ---------------------------------------------------------------------------------------------
// host/system lines about the agent itself
// ---------------------------------------------------------------------------------------------

export interface HostProbeInput extends VmProbeInput {
  probeVersion: string;
  /** window for "bytes sent recently" (seconds) */
  recentWindowS?: number;
}

export interface AgentSummary {
  up: boolean;
  heartbeatAgeS?: number;
  protectedDisks: number;
  failingDisks: number;
  overdueDisks: number;
  oldestSnapshotAgeS?: number;
  /** bytes of the last cycle of each disk that finished within the window (state keeps one cycle per disk) */
  bytesSentRecent: number;
  /** disks where someone else's publish forced a full within the last day */
  lineageAlertsRecent: number;
  downReason: string | null;
}

export function summarizeAgent(input: HostProbeInput): AgentSummary & { reports: DiskReport[] } {
  const { reports, downReason } = assessAll(input);
  const window = input.recentWindowS ?? 3600;
  let oldest: number | undefined;
  let bytes = 0;
  for (const r of reports) {
    if (r.ageS !== undefined) oldest = oldest === undefined ? r.ageS : Math.max(oldest, r.ageS);
    const s = r.disk?.lastSuccess;
    if (s && input.now - s.finishedAt <= window) bytes += s.bytes;
  }
  return {
    reports,
    up: downReason === null,
    heartbeatAgeS: input.state?.daemon ? Math.max(0, Math.round(input.now - input.state.daemon.heartbeatAt)) : undefined,
    protectedDisks: reports.length,
    failingDisks: reports.filter((r) => r.verdict.kind === 'error').length,
    overdueDisks: reports.filter((r) => r.overdue).length,
    oldestSnapshotAgeS: oldest,
    bytesSentRecent: bytes,
    lineageAlertsRecent: reports.filter((r) => r.disk?.lineageAlert && input.now - r.disk.lineageAlert.at <= 86_400).length,
    downReason,
  };
}

/** `ONESTOR_AGENT = [ ... ]` for the host template (host/system: the only probe dir whose custom keys OpenNebula keeps). */
export function hostAgentLines(input: HostProbeInput): string[] {
  const s = summarizeAgent(input);
  return [
    vectorAttribute('ONESTOR_AGENT', [
      ['STATUS', s.up ? 'RUNNING' : 'DOWN'],
      ['VERSION', input.state?.daemon?.version ?? input.probeVersion],
      ['PROBE_VERSION', input.probeVersion],
      ['HEARTBEAT_AGE', s.heartbeatAgeS],
      ['PROTECTED_DISKS', s.protectedDisks],
      ['FAILING_DISKS', s.failingDisks],
      ['OVERDUE_DISKS', s.overdueDisks],
      ['OLDEST_SNAPSHOT_AGE', s.oldestSnapshotAgeS],
      ['BYTES_SENT_RECENT', s.bytesSentRecent],
      ['RECENT_WINDOW', input.recentWindowS ?? 3600],
      ['LINEAGE_ALERTS_24H', s.lineageAlertsRecent],
      ['MSG', s.downReason ? `ERROR ${s.downReason}` : undefined],
    ]),
  ];
}

// ---------------------------------------------------------------------------------------------
// host/system datastore lines (replacement of upstream monitor_ds.rb)
// ---------------------------------------------------------------------------------------------

export type Measured<T> = { ok: true; value: T } | { ok: false; error: string };

export interface DsFigures {
  id: number;
  /** content of the DS dir's `.monitor` (ssh, replica, ...) */
  tm: string;
  fs: Measured<FsFigures>;
  /** only for tm === 'replica' */
  cache?: Measured<CacheSummary & { measuredAt: number }>;
}

export interface ReplicaDsInput {
  location: Measured<FsFigures>;
  datastores: DsFigures[];
  settings: { REPLICA_MAX_SIZE_MB: number | null; REPLICA_MAX_USED_PERC: number; REPLICA_RECOVERY_SNAPS_DIR: string };
  settingsError?: string;
  /** undefined when the snaps dir does not exist on this host */
  snaps?: {
    fs: Measured<FsFigures>;
    usage: Measured<SnapsSummary & { measuredAt: number }>;
    /** SNAPS/.onestor: what the receiver's bookkeeping holds beside the snapshots (absent: not measured) */
    bookkeeping?: Measured<BookkeepingSummary & { measuredAt: number }>;
  };
  /** who writes to this replica and the lineage take-overs (SNAPS/.onestor/ownership, written by the receiver) */
  ledger?: { writers: Measured<WriterRecord[]>; takeovers: Measured<TakeoverSummary>; /** hand-overs on an owner's release (live migration); absent: not measured */ handovers?: Measured<TakeoverSummary> };
}

/** At most this many writer lines (a cluster has one per hypervisor key). */
export const MAX_WRITER_LINES = 64;

/** One line per writer (authenticated identity, how, last publish) and one with the take-over counts. */
export function ledgerLines(ledger: NonNullable<ReplicaDsInput['ledger']>): string[] {
  const out: string[] = [];
  if (ledger.writers.ok) {
    const ws = [...ledger.writers.value].sort((a, b) => (a.identity < b.identity ? -1 : a.identity > b.identity ? 1 : 0));
    for (const w of ws.slice(0, MAX_WRITER_LINES)) {
      out.push(
        vectorAttribute('ONESTOR_REPLICA_WRITER', [
          ['NAME', w.identity],
          ['AUTH', w.auth],
          ['LAST_PUBLISH', String(Math.round(w.lastPublishAt))],
          ['LAST_VM', w.lastVm],
          ['LAST_DISK', w.lastDisk],
          ['LAST_MODE', w.lastMode],
        ]),
      );
    }
  }
  const pairs: Array<[string, TemplateScalar | undefined]> = [];
  const msgs: string[] = [];
  if (!ledger.writers.ok) msgs.push(`writers: ${ledger.writers.error}`);
  else pairs.push(['WRITERS', ledger.writers.value.length]);
  if (ledger.takeovers.ok) {
    const t = ledger.takeovers.value;
    pairs.push(['TAKEOVERS_24H', t.recent], ['TAKEOVERS_LOGGED', t.logged]);
    // hand-overs (an owner's release honoured, live migration) are counted apart: expected, not alarming
    if (ledger.handovers?.ok) pairs.push(['HANDOVERS_24H', ledger.handovers.value.recent], ['HANDOVERS_LOGGED', ledger.handovers.value.logged]);
    if (t.last) {
      pairs.push(['LAST_AT', String(Math.round(t.last.at))], ['LAST_VM', t.last.vm], ['LAST_DISK', t.last.disk], ['LAST_FROM', t.last.from], ['LAST_TO', t.last.to]);
    }
  } else msgs.push(`take-overs: ${ledger.takeovers.error}`);
  if (ledger.handovers && !ledger.handovers.ok) msgs.push(`hand-overs: ${ledger.handovers.error}`);
  if (msgs.length) pairs.push(['MSG', `ERROR ${msgs.join('; ')}`]);
  out.push(vectorAttribute('ONESTOR_REPLICA_OWNERSHIP', pairs));
  return out;
}

export function replicaDsLines(input: ReplicaDsInput): string[] {
  const out: string[] = [];
  if (input.location.ok) {
    out.push(singleAttribute('DS_LOCATION_USED_MB', input.location.value.usedMb));
    out.push(singleAttribute('DS_LOCATION_TOTAL_MB', input.location.value.totalMb));
    out.push(singleAttribute('DS_LOCATION_FREE_MB', input.location.value.freeMb));
  }
  const errors: string[] = [];
  if (!input.location.ok) errors.push(`datastore location: ${input.location.error}`);
  if (input.settingsError) errors.push(`driver settings: ${input.settingsError}`);
  for (const ds of [...input.datastores].sort((a, b) => a.id - b.id)) {
    const pairs: Array<[string, TemplateScalar | undefined]> = [['ID', ds.id]];
    const msgs: string[] = [];
    if (ds.tm === 'replica') {
      pairs.push(['REPLICA_CACHE', 'YES']);
      if (ds.cache?.ok) {
        pairs.push(['REPLICA_CACHE_SIZE', ds.cache.value.usedMb], ['REPLICA_IMAGES', ds.cache.value.images]);
        if (ds.cache.value.truncated) pairs.push(['REPLICA_CACHE_PARTIAL', 'YES']);
        pairs.push(['REPLICA_CACHE_MEASURED_AT', String(Math.round(ds.cache.value.measuredAt))]);
        if (ds.fs.ok) {
          const lim = effectiveCacheLimitMb(input.settings, ds.fs.value, ds.cache.value.usedMb);
          pairs.push(['REPLICA_CACHE_LIMIT_MB', lim.limitMb], ['REPLICA_CACHE_LIMIT_FROM', lim.from], ['REPLICA_CACHE_OVER_LIMIT', ds.cache.value.usedMb > lim.limitMb]);
        }
      } else if (ds.cache && !ds.cache.ok) {
        msgs.push(`cache walk: ${ds.cache.error}`);
      }
    }
    // upstream prints zeros when df fails; zero free space also keeps the scheduler away from a dead mount
    const fs = ds.fs.ok ? ds.fs.value : { usedMb: 0, totalMb: 0, freeMb: 0 };
    if (!ds.fs.ok) msgs.push(`statfs: ${ds.fs.error}`);
    pairs.push(['USED_MB', fs.usedMb], ['TOTAL_MB', fs.totalMb], ['FREE_MB', fs.freeMb]);
    if (msgs.length) pairs.push(['MSG', `ERROR ${msgs.join('; ')}`]);
    out.push(vectorAttribute('DS', pairs));
  }
  if (input.snaps) {
    const pairs: Array<[string, TemplateScalar | undefined]> = [['PATH', input.settings.REPLICA_RECOVERY_SNAPS_DIR]];
    const msgs: string[] = [];
    if (input.snaps.usage.ok) {
      const u = input.snaps.usage.value;
      pairs.push(['USED_MB', u.usedMb], ['VMS', u.vms], ['DISKS', u.completeDisks], ['INCOMPLETE_DISKS', u.incompleteDisks], ['MEASURED_AT', String(Math.round(u.measuredAt))]);
      if (u.truncated) pairs.push(['PARTIAL', 'YES']);
    } else msgs.push(`walk: ${input.snaps.usage.error}`);
    const bk = input.snaps.bookkeeping;
    if (bk?.ok) {
      pairs.push(['BOOKKEEPING_MB', bk.value.totalMb], ['BOOKKEEPING_WORK_MB', bk.value.workMb], ['BOOKKEEPING_TMP_MB', bk.value.tmpMb]);
      if (bk.value.truncated) pairs.push(['BOOKKEEPING_PARTIAL', 'YES']);
    } else if (bk) msgs.push(`bookkeeping walk: ${bk.error}`);
    if (input.snaps.fs.ok) pairs.push(['FS_TOTAL_MB', input.snaps.fs.value.totalMb], ['FS_FREE_MB', input.snaps.fs.value.freeMb], ['FS_USED_MB', input.snaps.fs.value.usedMb]);
    else msgs.push(`statfs: ${input.snaps.fs.error}`);
    if (msgs.length) pairs.push(['MSG', `ERROR ${msgs.join('; ')}`]);
    out.push(vectorAttribute('ONESTOR_REPLICA_SNAPS', pairs));
  }
  if (input.ledger) out.push(...ledgerLines(input.ledger));
  if (errors.length) out.push(singleAttribute('ONESTOR_PROBE_ERROR', `ERROR ${errors.join('; ')}`));
  return out;
}
