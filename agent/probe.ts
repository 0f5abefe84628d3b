/**
 * Probe entry points (`onestor-agent probe vm-snapshot|host-monitor|replica-ds`). They read the agent's
 * state and a few filesystem figures, print OpenNebula template lines, and always exit 0 within a
 * deadline: monitord treats a non-zero exit as the failure of every probe in the directory, and a
 * hung probe stalls the host's monitoring. All I/O that can block goes through lib/usage.ts (bounded
 * children); this file only wires inputs to the pure builders in lib/probe.ts.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { describeError } from '../lib/shared/errors.js';
import { AGENT_VERSION } from '../lib/shared/version.js';
import { agentMetrics, formatMetrics, writeTextfile } from '../lib/monitor/prometheus.js';
import {
  DEFAULT_DATASTORE_LOCATION,
  DEFAULT_HEARTBEAT_MAX_AGE_S,
  DEFAULT_STATE_FILE,
  commentLine,
  dsLocationFromMonitordXml,
  hostAgentLines,
  parseProbeState,
  replicaDsLines,
  summarizeAgent,
  vmSnapshotLines,
  type DsFigures,
  type Measured,
  type ProtectedDisk,
  type ReplicaDsInput,
} from '../lib/monitor/probe-lines.js';
import { LEDGER_DIR, HANDOVERS_FILE, TAKEOVERS_FILE, TAKEOVERS_ROTATE_BYTES, WRITERS_DIR, parseTakeoverLines, parseWriterRecord, summarizeTakeovers } from '../lib/shared/ledger.js';
import { DEFAULT_DRIVER_SETTINGS, DEFAULT_SSHRC_PATHS, parseSshrc } from '../lib/config/sshrc.js';
import type { AgentState } from '../lib/cycle/state.js';
import { readFileBounded, runBounded, statfsBounded, summarizeCache, summarizeSnaps, walkBookkeepingBounded, walkBounded, writeFileAtomicBounded, type BookkeepingSummary } from '../lib/monitor/usage.js';

export type ProbeKind = 'vm-snapshot' | 'host-monitor' | 'replica-ds';
export const PROBE_KINDS: readonly ProbeKind[] = ['vm-snapshot', 'host-monitor', 'replica-ds'];

export interface ProbeOptions {
  stateFile?: string;
  /** monitord's config XML (the probe's stdin); gives DATASTORE_LOCATION */
  stdinXml?: string;
  /** overrides what stdin says */
  datastoreLocation?: string;
  /** budget for the whole run; each step gets what is left (default 5000 ms) */
  deadlineMs?: number;
  heartbeatMaxAgeS?: number;
  now?: number;
  sshrcPaths?: readonly string[];
  /** where walk results are kept between runs (replica-ds) */
  cacheFile?: string;
  /** walks of the cache and snaps dirs are redone after this many seconds (default 300) */
  walkTtlS?: number;
  maxWalkEntries?: number;
  /** write a Prometheus textfile here (vm-snapshot and host-monitor) */
  prometheusFile?: string;
  /** command that prints discovery as JSON; null disables discovery. Default: this module in a child. */
  discoverCommand?: readonly string[] | null;
}

export interface ProbeResult {
  lines: string[];
  /** what went wrong while gathering (also reflected in the lines) */
  errors: string[];
  timings: Record<string, number>;
}

const DEFAULT_CACHE_FILE = '/var/tmp/onestor-agent/probe-walk-cache.json';
const SELF = fileURLToPath(import.meta.url);

/** one version source: lib/shared/version.ts */
function probeVersion(): string {
  return AGENT_VERSION;
}

class Budget {
  private readonly end: number;
  constructor(readonly totalMs: number) {
    this.end = performance.now() + totalMs;
  }
  /** a step that must leave time for later ones gets at most this share of the whole budget */
  share(fraction: number): number {
    return Math.min(this.left(), Math.round(this.totalMs * fraction));
  }
  /** what is left, never below a small floor so a late step still gets a chance to answer */
  left(floor = 50): number {
    return Math.max(floor, Math.round(this.end - performance.now()));
  }
}

async function loadState(file: string, budget: Budget, errors: string[]): Promise<{ state: AgentState | null; stateError?: string }> {
  // a blocked state read must leave time for discovery, which then names the disks
  const r = await readFileBounded(file, budget.share(0.4));
  if (!r.ok) {
    errors.push(r.error);
    return { state: null, stateError: r.timedOut ? `reading ${file} timed out after ${Math.round(r.ms)} ms` : r.error };
  }
  if (r.value === null) return { state: null, stateError: `no state file ${file} (agent not installed or never started)` };
  try {
    return { state: parseProbeState(r.value, file) };
  } catch (e) {
    errors.push(describeError(e));
    return { state: null, stateError: describeError(e) };
  }
}

/** Discovery runs in a child (it reads vm.xml/ds.xml of every VM: blocking I/O we must be able to abandon). */
async function discoverBounded(cmd: readonly string[], dsLocation: string, budget: Budget): Promise<Measured<ProtectedDisk[]>> {
  const [file, ...args] = cmd;
  const r = await runBounded(file!, [...args, dsLocation], { deadlineMs: budget.left(), maxBytes: 16 * 1024 * 1024 });
  if (!r.ok) return { ok: false, error: r.timedOut ? `discovery timed out after ${Math.round(r.ms)} ms` : r.error };
  if (r.value.code !== 0) return { ok: false, error: `discovery failed: ${r.value.stderr.split('\n').pop() || `exit ${r.value.code}`}` };
  try {
    const parsed = JSON.parse(r.value.stdout.toString('utf8')) as { eligible?: unknown };
    if (!Array.isArray(parsed.eligible)) throw new Error('no "eligible" array');
    const list: ProtectedDisk[] = [];
    for (const d of parsed.eligible as Array<Record<string, unknown>>) {
      if (Number.isInteger(d.vmId) && Number.isInteger(d.diskId)) {
        list.push({ vmId: d.vmId as number, diskId: d.diskId as number, freqSeconds: typeof d.freqSeconds === 'number' ? d.freqSeconds : undefined });
      }
    }
    return { ok: true, value: list };
  } catch (e) {
    return { ok: false, error: `discovery output unreadable: ${(e as Error).message}` };
  }
}

function dsLocationOf(opts: ProbeOptions): string {
  return opts.datastoreLocation ?? (opts.stdinXml ? dsLocationFromMonitordXml(opts.stdinXml) : null) ?? DEFAULT_DATASTORE_LOCATION;
}

async function maybeWritePrometheus(opts: ProbeOptions, state: AgentState | null, input: Parameters<typeof summarizeAgent>[0], budget: Budget, errors: string[]): Promise<void> {
  if (!opts.prometheusFile) return;
  const s = summarizeAgent(input);
  const text = formatMetrics(agentMetrics(s, s.reports, input.now, state?.host));
  const w = await writeTextfile(opts.prometheusFile, text, budget.left());
  if (!w.ok) errors.push(`prometheus textfile: ${w.error}`);
}

async function agentInputs(opts: ProbeOptions, budget: Budget, errors: string[], timings: Record<string, number>) {
  const now = opts.now ?? Date.now() / 1000;
  const stateFile = opts.stateFile ?? DEFAULT_STATE_FILE;
  const heartbeatMaxAgeS = opts.heartbeatMaxAgeS ?? DEFAULT_HEARTBEAT_MAX_AGE_S;
  let t = performance.now();
  const { state, stateError } = await loadState(stateFile, budget, errors);
  timings.state = performance.now() - t;
  const down = !state || !state.daemon || now - state.daemon.heartbeatAt > heartbeatMaxAgeS;
  let discovered: ProtectedDisk[] | undefined;
  let discoveryError: string | undefined;
  const cmd = opts.discoverCommand === undefined ? [process.execPath, SELF, '--onestor-discover'] : opts.discoverCommand;
  // Only a dead agent needs discovery: a live one keeps the list of protected disks in its state.
  if (down && cmd) {
    t = performance.now();
    const d = await discoverBounded(cmd, dsLocationOf(opts), budget);
    timings.discovery = performance.now() - t;
    if (d.ok) discovered = d.value;
    else {
      discoveryError = d.error;
      errors.push(d.error);
    }
  }
  return { now, stateFile, state, stateError, heartbeatMaxAgeS, discovered, discoveryError };
}

// ---------------------------------------------------------------------------------------------
// replica-ds
// ---------------------------------------------------------------------------------------------

interface WalkCache {
  version: 1;
  walks: Record<string, { at: number; result: { entries: Array<{ type: string; allocated: number; depth: number; rel: string }>; truncated: boolean; missing: boolean } }>;
  /** SNAPS/.onestor summaries by snaps dir (only the figures are kept: the walk may hold many temps) */
  bookkeeping?: Record<string, { at: number; value: BookkeepingSummary & { missing: boolean } }>;
}

async function replicaInputs(opts: ProbeOptions, budget: Budget, errors: string[], timings: Record<string, number>): Promise<ReplicaDsInput> {
  const now = opts.now ?? Date.now() / 1000;
  const loc = dsLocationOf(opts);
  const ttl = opts.walkTtlS ?? 300;
  const maxEntries = opts.maxWalkEntries ?? 100_000;
  const cacheFile = opts.cacheFile ?? DEFAULT_CACHE_FILE;

  let t = performance.now();
  // driver settings: first existing sshrc (upstream keeps it in two places)
  let settings = { ...DEFAULT_DRIVER_SETTINGS };
  let settingsError: string | undefined;
  for (const p of opts.sshrcPaths ?? DEFAULT_SSHRC_PATHS) {
    const r = await readFileBounded(p, budget.left(), 1024 * 1024);
    if (!r.ok) {
      settingsError = r.error;
      break;
    }
    if (r.value === null) continue;
    try {
      settings = parseSshrc(r.value, p).settings;
    } catch (e) {
      settingsError = describeError(e);
    }
    break;
  }
  timings.sshrc = performance.now() - t;

  // which datastores are monitored locally: numeric dirs with a .monitor file (as upstream)
  t = performance.now();
  const list = await runBounded('find', [loc, '-mindepth', '2', '-maxdepth', '2', '-name', '.monitor', '-type', 'f', '-printf', '%h\\0'], { deadlineMs: budget.left(), maxBytes: 1024 * 1024 });
  const dsIds: number[] = [];
  if (list.ok) {
    for (const dir of list.value.stdout.toString('utf8').split('\0')) {
      const id = path.basename(dir);
      if (/^\d+$/.test(id) && path.dirname(dir) === loc.replace(/\/+$/, '')) dsIds.push(Number(id));
    }
  } else errors.push(list.error);
  const marks = await Promise.all(dsIds.map((id) => readFileBounded(path.join(loc, String(id), '.monitor'), budget.left(), 4096)));
  const snapsDir = settings.REPLICA_RECOVERY_SNAPS_DIR;
  const fsPaths = [loc, ...dsIds.map((id) => path.join(loc, String(id))), snapsDir];
  const figures = await statfsBounded(fsPaths, budget.left());
  timings.statfs = performance.now() - t;

  // walks: cached, redone after ttl; a failed refresh keeps reporting the error (not an old figure)
  t = performance.now();
  const cacheRead = await readFileBounded(cacheFile, budget.left(), 64 * 1024 * 1024);
  let cache: WalkCache = { version: 1, walks: {} };
  if (cacheRead.ok && cacheRead.value) {
    try {
      const c = JSON.parse(cacheRead.value) as WalkCache;
      if (c.version === 1 && c.walks && typeof c.walks === 'object') cache = c;
    } catch {
      /* a corrupt cache is just a cold cache */
    }
  }
  let cacheDirty = false;
  const walk = async (root: string, depth: number): Promise<Measured<{ result: WalkCache['walks'][string]['result']; at: number }>> => {
    const key = `${depth}:${root}`;
    const hit = cache.walks[key];
    if (hit && now - hit.at < ttl && now >= hit.at) return { ok: true, value: hit };
    const w = await walkBounded(root, depth, maxEntries, budget.left());
    if (!w.ok) return { ok: false, error: w.error };
    cache.walks[key] = { at: now, result: w.value };
    cacheDirty = true;
    return { ok: true, value: { at: now, result: w.value } };
  };
  const bookkeepingOf = async (snaps: string): Promise<Measured<BookkeepingSummary & { missing: boolean; measuredAt: number }>> => {
    const hit = cache.bookkeeping?.[snaps];
    if (hit && now - hit.at < ttl && now >= hit.at) return { ok: true, value: { ...hit.value, measuredAt: hit.at } };
    const w = await walkBookkeepingBounded(snaps, maxEntries, budget.left());
    if (!w.ok) return { ok: false, error: w.error };
    (cache.bookkeeping ??= {})[snaps] = { at: now, value: w.value };
    cacheDirty = true;
    return { ok: true, value: { ...w.value, measuredAt: now } };
  };
  const fsOf = (p: string): Measured<import('../lib/monitor/usage.js').FsFigures> => {
    const f = figures.get(p);
    return f?.ok ? { ok: true, value: f.value } : { ok: false, error: f ? f.error : 'not measured' };
  };
  const datastores: DsFigures[] = await Promise.all(
    dsIds.map(async (id, i): Promise<DsFigures> => {
      const m = marks[i]!;
      const tm = m.ok && m.value !== null ? m.value.trim() : '';
      const dir = path.join(loc, String(id));
      const ds: DsFigures = { id, tm, fs: fsOf(dir) };
      if (tm === 'replica') {
        const w = await walk(dir, 1);
        ds.cache = w.ok ? { ok: true, value: { ...summarizeCache(w.value.result), measuredAt: w.value.at } } : w;
      }
      return ds;
    }),
  );
  let snaps: ReplicaDsInput['snaps'];
  const snapsFs = figures.get(snapsDir);
  const snapsWalk = await walk(snapsDir, 3);
  if (!(snapsWalk.ok && snapsWalk.value.result.missing)) {
    snaps = {
      fs: snapsFs?.ok ? { ok: true, value: snapsFs.value } : { ok: false, error: snapsFs && !snapsFs.ok ? snapsFs.error : 'not measured' },
      usage: snapsWalk.ok ? { ok: true, value: { ...summarizeSnaps(snapsWalk.value.result), measuredAt: snapsWalk.value.at } } : snapsWalk,
    };
    const bk = await bookkeepingOf(snapsDir);
    if (!(bk.ok && bk.value.missing)) snaps.bookkeeping = bk;
  }
  timings.walks = performance.now() - t;
  if (cacheDirty) {
    const w = await writeFileAtomicBounded(cacheFile, JSON.stringify(cache), budget.left());
    if (!w.ok) {
      // the directory may simply not exist yet
      await runBounded('mkdir', ['-p', '--', path.dirname(cacheFile)], { deadlineMs: budget.left() });
      const again = await writeFileAtomicBounded(cacheFile, JSON.stringify(cache), budget.left());
      if (!again.ok) errors.push(`walk cache: ${again.error}`);
    }
  }
  t = performance.now();
  const ledger = snaps ? await readLedger(snapsDir, now, budget) : undefined;
  timings.ledger = performance.now() - t;
  const location = fsOf(loc);
  return { location, datastores, settings, settingsError, snaps, ...(ledger ? { ledger } : {}) };
}

/** The receiver's ownership ledger: one child per file group (each writer file is one JSON line). */
async function readLedger(snapsDir: string, now: number, budget: Budget): Promise<NonNullable<ReplicaDsInput['ledger']>> {
  const dir = path.join(snapsDir, LEDGER_DIR);
  const catAll = async (where: string, name: string, maxBytes: number): Promise<Measured<string>> => {
    const r = await runBounded('find', [where, '-maxdepth', '1', '-type', 'f', '-name', name, '-exec', 'cat', '--', '{}', '+'], { deadlineMs: budget.left(), maxBytes });
    if (!r.ok) return { ok: false, error: r.error };
    // find fails when the dir does not exist yet: nothing written, nothing to report
    if (r.value.code !== 0 && !/No such file or directory/.test(r.value.stderr)) return { ok: false, error: r.value.stderr || `find exited ${r.value.code}` };
    return { ok: true, value: r.value.stdout.toString('utf8') };
  };
  const [w, t, h] = await Promise.all([
    catAll(path.join(dir, WRITERS_DIR), '*.json', 1024 * 1024),
    catAll(dir, `${TAKEOVERS_FILE}*`, 4 * TAKEOVERS_ROTATE_BYTES),
    catAll(dir, `${HANDOVERS_FILE}*`, 4 * TAKEOVERS_ROTATE_BYTES),
  ]);
  return {
    writers: w.ok ? { ok: true, value: w.value.split('\n').map(parseWriterRecord).filter((x): x is NonNullable<typeof x> => x !== null) } : w,
    takeovers: t.ok ? { ok: true, value: summarizeTakeovers(parseTakeoverLines(t.value), now) } : t,
    handovers: h.ok ? { ok: true, value: summarizeTakeovers(parseTakeoverLines(h.value), now) } : h,
  };
}

// ---------------------------------------------------------------------------------------------

/** Runs one probe and returns its lines; never throws (an unexpected failure becomes an ERROR line). */
export async function runProbe(kind: ProbeKind, opts: ProbeOptions = {}): Promise<ProbeResult> {
  const budget = new Budget(opts.deadlineMs ?? 5000);
  const errors: string[] = [];
  const timings: Record<string, number> = {};
  try {
    if (kind === 'vm-snapshot') {
      const input = await agentInputs(opts, budget, errors, timings);
      const lines = vmSnapshotLines(input);
      await maybeWritePrometheus(opts, input.state, { ...input, probeVersion: probeVersion() }, budget, errors);
      return { lines, errors, timings };
    }
    if (kind === 'host-monitor') {
      const input = { ...(await agentInputs(opts, budget, errors, timings)), probeVersion: probeVersion() };
      const lines = hostAgentLines(input);
      await maybeWritePrometheus(opts, input.state, input, budget, errors);
      return { lines, errors, timings };
    }
    const input = await replicaInputs(opts, budget, errors, timings);
    return { lines: replicaDsLines(input), errors, timings };
  } catch (e) {
    errors.push(describeError(e));
    return { lines: [commentLine(`onestor-agent probe ${kind}: ERROR ${describeError(e)}`)], errors, timings };
  }
}

/** Reads stdin when it is a pipe or file, for at most `ms` (monitord writes the config XML then closes). */
function readStdin(ms: number): Promise<string> {
  if (process.stdin.isTTY) return Promise.resolve('');
  return new Promise((resolve) => {
    let buf = '';
    const done = (): void => {
      clearTimeout(timer);
      process.stdin.removeAllListeners();
      process.stdin.destroy();
      resolve(buf);
    };
    const timer = setTimeout(done, ms);
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', (c: string) => {
      if (buf.length < 1024 * 1024) buf += c;
    });
    process.stdin.on('end', done);
    process.stdin.on('error', done);
  });
}

/**
 * CLI body for `onestor-agent probe KIND [--state FILE] [--deadline-ms N] [--prometheus FILE]`.
 * Extra arguments (monitord passes its own) are ignored. Always exits 0.
 */
export async function probeMain(argv: readonly string[]): Promise<never> {
  const kind = argv[0] as ProbeKind;
  const opts: ProbeOptions = {};
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i];
    const v = argv[i + 1];
    if (a === '--state' && v) (opts.stateFile = v), i++;
    else if (a === '--deadline-ms' && v && /^\d+$/.test(v)) (opts.deadlineMs = Number(v)), i++;
    else if (a === '--prometheus' && v) (opts.prometheusFile = v), i++;
    else if (a === '--datastore-location' && v) (opts.datastoreLocation = v), i++;
  }
  if (!opts.stateFile && process.env.ONESTOR_STATE_FILE) opts.stateFile = process.env.ONESTOR_STATE_FILE;
  if (!opts.prometheusFile && process.env.ONESTOR_PROMETHEUS_FILE) opts.prometheusFile = process.env.ONESTOR_PROMETHEUS_FILE;
  let out: string;
  if (!PROBE_KINDS.includes(kind)) {
    process.stderr.write(`onestor-agent probe: unknown kind ${JSON.stringify(argv[0] ?? '')} (expected ${PROBE_KINDS.join(', ')})\n`);
    out = '';
  } else {
    opts.stdinXml = await readStdin(300);
    const r = await runProbe(kind, opts);
    for (const e of r.errors) process.stderr.write(`onestor-agent probe ${kind}: ${e}\n`);
    // end with a newline: monitord concatenates the outputs of all probes of a directory
    out = r.lines.length ? `${r.lines.join('\n')}\n` : '';
  }
  // exit only once stdout is flushed; exit() does not wait for abandoned children
  await new Promise<void>((resolve) => process.stdout.write(out, () => resolve()));
  process.exit(0);
}

/**
 * `onestor-agent probe KIND` through the CLI (agent/main.ts): flags --state-dir and --datastores,
 * env ONESTOR_PROMETHEUS_FILE. Prints the lines; the exit code is always 0 (see file comment).
 */
export async function runProbeCommand(f: Readonly<Record<string, unknown>>, positionals: readonly string[], _log?: unknown): Promise<number> {
  const kind = positionals[0] as ProbeKind;
  if (!PROBE_KINDS.includes(kind)) {
    process.stderr.write(`onestor-agent probe: unknown kind ${JSON.stringify(positionals[0] ?? '')} (expected ${PROBE_KINDS.join(', ')})\n`);
    return 0;
  }
  const opts: ProbeOptions = { stdinXml: await readStdin(300) };
  if (typeof f['state-dir'] === 'string') opts.stateFile = path.join(f['state-dir'], 'state.json');
  if (typeof f.datastores === 'string') opts.datastoreLocation = f.datastores;
  if (process.env.ONESTOR_PROMETHEUS_FILE) opts.prometheusFile = process.env.ONESTOR_PROMETHEUS_FILE;
  const r = await runProbe(kind, opts);
  for (const e of r.errors) process.stderr.write(`onestor-agent probe ${kind}: ${e}\n`);
  const out = r.lines.length ? `${r.lines.join('\n')}\n` : '';
  await new Promise<void>((resolve) => process.stdout.write(out, () => resolve()));
  return 0;
}

/** Child mode: discovery as JSON on stdout (see discoverBounded). */
async function discoverChild(dsLocation: string): Promise<void> {
  // the module is resolved at run time so the probe works (with an error line) before it exists
  const spec = '../lib/discover/discover.js';
  const mod = (await import(spec)) as { discover: (o: { datastoreLocation: string }) => Promise<{ eligible: Array<{ vmId: number; diskId: number; freqSeconds?: number }> }> };
  const r = await mod.discover({ datastoreLocation: dsLocation });
  process.stdout.write(JSON.stringify({ eligible: r.eligible.map((d) => ({ vmId: d.vmId, diskId: d.diskId, freqSeconds: d.freqSeconds })) }));
}

const invokedDirectly = process.argv[1] !== undefined && pathToFileURL(path.resolve(process.argv[1])).href === import.meta.url;
if (invokedDirectly) {
  if (process.argv[2] === '--onestor-discover') {
    discoverChild(process.argv[3] ?? DEFAULT_DATASTORE_LOCATION).catch((e: unknown) => {
      process.stderr.write(`${describeError(e)}\n`);
      process.exitCode = 1;
    });
  } else {
    void probeMain(process.argv.slice(2));
  }
}

