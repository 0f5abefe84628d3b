/**
 * Pure cores of the monitoring probes: agent state (+ discovery, + filesystem figures) in, OpenNebula
 * template lines out. No I/O here; lib/monitor/gather.ts gathers the inputs under a deadline, and what
 * to say about each disk comes from assessment.ts (shared with `status` and Prometheus).
 *
 * State is read with a small hand-written check instead of the zod schema in state.ts: loading zod
 * costs ~65 ms on a 2-core host and the probe runs every minute on every host. Only the fields the
 * probe prints are checked; anything else in the file is ignored.
 */
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import { singleAttribute, vectorAttribute, type TemplateScalar } from './one-template.js';
import type { AgentState } from '../cycle/state.js';
import { assess, summarize, type AssessInput, type Assessment, type DiskAssessment } from './assessment.js';
import { effectiveCacheLimitMb, type BookkeepingSummary, type CacheSummary, type FsFigures, type SnapsSummary } from './usage.js';
import type { TakeoverSummary, WriterRecord } from '../shared/ledger.js';

export { DEFAULT_STATE_FILE, DEFAULT_DATASTORE_LOCATION } from '../shared/defaults.js';

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
    const g = raw.daemon.grace;
    if (g !== undefined && (!isObj(g) || !isNum(g.minSec) || !isNum(g.percent))) fail(file, 'daemon.grace', 'expected {minSec, percent}');
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

/** What the vm/snapshot and host lines are built from (gather.ts fills it). */
export type VmProbeInput = AssessInput;

// ---------------------------------------------------------------------------------------------
// vm/snapshot probe
// ---------------------------------------------------------------------------------------------

/** The lines inside one VM's MONITOR (before base64). */
export function diskRecoveryLine(r: DiskAssessment): string {
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
  if (r.kind === 'ok') {
    return vectorAttribute('DISK_RECOVERY_SNAPSHOT', [['ID', r.diskId], ['TIMESTAMP', String(Math.round(s!.capturedAt))], ...extra]);
  }
  const errExtra: Array<[string, TemplateScalar | undefined]> = [['ERROR_CODE', r.code]];
  if (s) errExtra.push(['LAST_TIMESTAMP', String(Math.round(s.capturedAt))]);
  if (d && d.failCount > 0) errExtra.push(['FAIL_COUNT', d.failCount]);
  return vectorAttribute('DISK_RECOVERY_SNAPSHOT', [['ID', r.diskId], ['MSG', `ERROR ${r.message}`], ...errExtra, ...extra]);
}

/** `VM = [ ID="n", MONITOR="<base64>" ]` for every VM with protected disks. */
export function vmSnapshotLines(input: VmProbeInput, a: Assessment = assess(input)): string[] {
  const byVm = new Map<number, string[]>();
  for (const r of a.disks) {
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
  if (out.length === 0 && a.daemon.downReason && !input.state) out.push(commentLine(`onestor-agent probe: ERROR ${a.daemon.downReason}`));
  return out;
}

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

/** `ONESTOR_AGENT = [ ... ]` for the host template (host/system: the only probe dir whose custom keys OpenNebula keeps). */
export function hostAgentLines(input: HostProbeInput, a: Assessment = assess(input)): string[] {
  const s = summarize(a, input.now, input.recentWindowS);
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
