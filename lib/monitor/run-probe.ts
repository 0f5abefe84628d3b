/**
 * One probe run: gather under a deadline (gather.ts, replica-gather.ts), assess (assessment.ts), print
 * OpenNebula template lines (probe-lines.ts) and optionally the Prometheus textfile. Never throws: an
 * unexpected failure becomes an ERROR comment line, because monitord drops the output of every probe in
 * a directory when one fails. The CLI around it is agent/commands/probe.ts.
 */
import { describeError } from '../shared/errors.js';
import { assess } from './assessment.js';
import { agentInputs, Budget, probeVersion, type AgentProbeOptions } from './gather.js';
import { commentLine, hostAgentLines, replicaDsLines, vmSnapshotLines } from './probe-lines.js';
import type { ReplicaProbeOptions } from './replica-gather.js';

export type ProbeKind = 'vm-snapshot' | 'host-monitor' | 'replica-ds';
export const PROBE_KINDS: readonly ProbeKind[] = ['vm-snapshot', 'host-monitor', 'replica-ds'];

export interface ProbeOptions extends AgentProbeOptions, ReplicaProbeOptions {
  /** budget for the whole run; each step gets what is left (default 5000 ms) */
  deadlineMs?: number;
  /** write a Prometheus textfile here (vm-snapshot and host-monitor) */
  prometheusFile?: string;
}

export interface ProbeResult {
  lines: string[];
  /** what went wrong while gathering (also reflected in the lines) */
  errors: string[];
}

export async function runProbe(kind: ProbeKind, opts: ProbeOptions = {}): Promise<ProbeResult> {
  const budget = new Budget(opts.deadlineMs ?? 5000);
  const errors: string[] = [];
  try {
    // each kind loads only its own gathering (start-up time is most of a probe run)
    if (kind === 'replica-ds') {
      const { replicaInputs } = await import('./replica-gather.js');
      const input = await replicaInputs(opts, budget, errors);
      return { lines: replicaDsLines(input), errors };
    }
    const input = await agentInputs(opts, budget, errors);
    const a = assess(input);
    const lines = kind === 'vm-snapshot' ? vmSnapshotLines(input, a) : hostAgentLines({ ...input, probeVersion: probeVersion() }, a);
    if (opts.prometheusFile) {
      const { metricsText, writeTextfile } = await import('./prometheus.js');
      const w = await writeTextfile(opts.prometheusFile, metricsText(a, input.now, input.state?.host), budget.left());
      if (!w.ok) errors.push(`prometheus textfile: ${w.error}`);
    }
    return { lines, errors };
  } catch (e) {
    errors.push(describeError(e));
    return { lines: [commentLine(`onestor-agent probe ${kind}: ERROR ${describeError(e)}`)], errors };
  }
}
