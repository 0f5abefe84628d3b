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
import { PROTECTED_DISKS_SCRIPT, PROTECTED_DISKS_SH, parseProtectedDisks } from './shell-discover.js';
import { runBounded } from './usage.js';

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

/** Printed by STATE_OR_DISCOVER_SCRIPT, instead of the state, when there is no state file. */
export const NO_STATE_MARK = '#onestor-agent:no-state';

/**
 * One child for the common probe start: `sh -c SCRIPT sh STATE_FILE DATASTORE_LOCATION` prints the state
 * file, or, when there is none (agent never started: the daemon cannot be alive), the mark and then the
 * discovery lines. One process instead of a `cat` then a `sh`: each child costs a fork of this process and a
 * scheduling round trip, most of a probe's time beyond Node's start-up on a loaded host.
 */
export const STATE_OR_DISCOVER_SCRIPT = `if [ -e "$1" ]; then exec cat -- "$1"; fi
printf '%s\\n' '${NO_STATE_MARK}'
${PROTECTED_DISKS_SH}
onestor_protected_disks "$2"
`;

/** State, and discovery when the daemon is down: the input of assessment.assess(). */
export async function agentInputs(opts: AgentProbeOptions, budget: Budget, errors: string[]): Promise<AssessInput> {
  const now = opts.now ?? Date.now() / 1000;
  const stateFile = opts.stateFile ?? DEFAULT_STATE_FILE;
  const dsLocation = dsLocationOf(opts);
  let loaded: { state: AgentState | null; stateError?: string } | undefined;
  let discovered: ProtectedDisk[] | undefined;
  let discoveryError: string | undefined;
  // a blocked state read must leave time for discovery, which then names the disks (below)
  const r = await runBounded('sh', ['-c', STATE_OR_DISCOVER_SCRIPT, 'sh', stateFile, dsLocation], { deadlineMs: budget.share(0.4), maxBytes: 64 * 1024 * 1024 + 1 });
  if (r.ok && r.value.stdout.subarray(0, NO_STATE_MARK.length + 1).toString('latin1') === `${NO_STATE_MARK}\n`) {
    loaded = { state: null, stateError: `no state file ${stateFile} (agent not installed or never started)` };
    if (r.value.code === 0 && !r.value.truncated) discovered = parseProtectedDisks(r.value.stdout.subarray(NO_STATE_MARK.length + 1).toString('utf8'));
    else {
      discoveryError = r.value.truncated ? 'discovery failed: output too large' : `discovery failed: ${r.value.stderr.split('\n').pop() || `exit ${r.value.code}`}`;
      errors.push(discoveryError);
    }
  } else if (r.ok && r.value.code === 0 && !r.value.truncated) {
    try {
      loaded = { state: parseProbeState(r.value.stdout.toString('utf8'), stateFile) };
    } catch (e) {
      errors.push(describeError(e));
      loaded = { state: null, stateError: describeError(e) };
    }
  } else {
    const error = !r.ok
      ? r.timedOut
        ? `reading ${stateFile} timed out after ${Math.round(r.ms)} ms`
        : r.error
      : r.value.truncated
        ? `${stateFile} is larger than ${64 * 1024 * 1024} bytes`
        : `cannot read ${stateFile}: ${r.value.stderr || `exit ${r.value.code}`}`;
    errors.push(!r.ok ? r.error : error);
    loaded = { state: null, stateError: error };
  }
  const { state, stateError } = loaded;
  // Only a dead daemon needs discovery: a live one keeps the list of protected disks in its state.
  if (!discovered && !discoveryError && !assessDaemon(state, stateError, now, stateFile).alive) {
    const d = await discoverBounded(dsLocation, budget);
    if (d.ok) discovered = d.value;
    else {
      discoveryError = d.error;
      errors.push(d.error);
    }
  }
  return { now, stateFile, state, stateError, discovered, discoveryError };
}
