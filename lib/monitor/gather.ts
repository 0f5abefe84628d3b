/**
 * Gathering for the agent probes (vm-snapshot, host-monitor): the state file and, when the daemon is
 * down, which disks asked for protection. Every read that can block goes through a bounded child
 * (usage.ts), under one time budget, so a hung filesystem cannot hang OpenNebula's monitoring.
 */
import path from 'node:path';
import { describeError } from '../shared/errors.js';
import { AGENT_VERSION } from '../shared/version.js';
import type { AgentState } from '../cycle/state.js';
import { assessDaemon, type AssessInput, type ProtectedDisk } from './assessment.js';
import { DEFAULT_DATASTORE_LOCATION, DEFAULT_STATE_FILE, dsLocationFromMonitordXml, parseProbeState, type Measured } from './probe-lines.js';
import { PROTECTED_DISKS_SCRIPT, parseProtectedDisks } from './shell-discover.js';
import { readFileBounded, runBounded } from './usage.js';

export interface AgentProbeOptions {
  stateFile?: string;
  /** monitord's config XML (the probe's stdin); gives DATASTORE_LOCATION */
  stdinXml?: string;
  /** overrides what stdin says */
  datastoreLocation?: string;
  now?: number;
}

/** The version of the installed probe code: the one version source (lib/shared/version.ts). */
export function probeVersion(): string {
  return AGENT_VERSION;
}

export class Budget {
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

export async function loadState(file: string, budget: Budget, errors: string[]): Promise<{ state: AgentState | null; stateError?: string }> {
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

/** Which disks asked for protection, by the shell reader in a bounded child (no second Node process). */
export async function discoverBounded(dsLocation: string, budget: Budget): Promise<Measured<ProtectedDisk[]>> {
  const r = await runBounded('sh', ['-c', PROTECTED_DISKS_SCRIPT, 'sh', dsLocation], { deadlineMs: budget.left(), maxBytes: 16 * 1024 * 1024 });
  if (!r.ok) return { ok: false, error: r.timedOut ? `discovery timed out after ${Math.round(r.ms)} ms` : r.error };
  if (r.value.code !== 0) return { ok: false, error: `discovery failed: ${r.value.stderr.split('\n').pop() || `exit ${r.value.code}`}` };
  return { ok: true, value: parseProtectedDisks(r.value.stdout.toString('utf8')) };
}

export function dsLocationOf(opts: { datastoreLocation?: string; stdinXml?: string }): string {
  return opts.datastoreLocation ?? (opts.stdinXml ? dsLocationFromMonitordXml(opts.stdinXml) : null) ?? DEFAULT_DATASTORE_LOCATION;
}

/** State, and discovery when the daemon is down: the input of assessment.assess(). */
export async function agentInputs(opts: AgentProbeOptions, budget: Budget, errors: string[], timings: Record<string, number>): Promise<AssessInput> {
  const now = opts.now ?? Date.now() / 1000;
  const stateFile = opts.stateFile ?? DEFAULT_STATE_FILE;
  let t = performance.now();
  const { state, stateError } = await loadState(stateFile, budget, errors);
  timings.state = performance.now() - t;
  let discovered: ProtectedDisk[] | undefined;
  let discoveryError: string | undefined;
  // Only a dead daemon needs discovery: a live one keeps the list of protected disks in its state.
  if (!assessDaemon(state, stateError, now, stateFile).alive) {
    t = performance.now();
    const d = await discoverBounded(dsLocationOf(opts), budget);
    timings.discovery = performance.now() - t;
    if (d.ok) discovered = d.value;
    else {
      discoveryError = d.error;
      errors.push(d.error);
    }
  }
  return { now, stateFile, state, stateError, discovered, discoveryError };
}
