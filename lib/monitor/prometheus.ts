/**
 * Prometheus textfile (node_exporter's textfile collector) with the figures of assessment.ts (the same
 * verdicts as `status` and the probes), labelled by vm and disk. Pure formatting plus one adapter that
 * replaces the file atomically (a scrape never sees a half-written file) through a bounded child, like
 * every other probe write.
 */
import { summarize, type AgentSummary, type Assessment, type DiskAssessment } from './assessment.js';
import { writeFileAtomicBounded, type Bounded } from './usage.js';

export interface Sample {
  labels?: Record<string, string | number>;
  value: number;
}

export interface Metric {
  name: string;
  help: string;
  type: 'gauge' | 'counter';
  samples: Sample[];
}

const NAME_RE = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_RE = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

/** Label values: backslash, double quote and newline are the three escapes the format defines. */
export function escapeLabelValue(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

/** HELP text escapes backslash and newline only. */
function escapeHelp(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n');
}

function formatNumber(v: number): string {
  if (Number.isNaN(v)) return 'NaN';
  if (v === Infinity) return '+Inf';
  if (v === -Infinity) return '-Inf';
  return String(v);
}

export function formatMetrics(metrics: readonly Metric[]): string {
  const out: string[] = [];
  for (const m of metrics) {
    if (!NAME_RE.test(m.name)) throw new RangeError(`invalid metric name ${JSON.stringify(m.name)}`);
    out.push(`# HELP ${m.name} ${escapeHelp(m.help)}`, `# TYPE ${m.name} ${m.type}`);
    for (const s of m.samples) {
      const labels = Object.entries(s.labels ?? {}).map(([k, v]) => {
        if (!LABEL_RE.test(k) || k.startsWith('__')) throw new RangeError(`invalid label name ${JSON.stringify(k)}`);
        return `${k}="${escapeLabelValue(String(v))}"`;
      });
      out.push(`${m.name}${labels.length ? `{${labels.join(',')}}` : ''} ${formatNumber(s.value)}`);
    }
  }
  return out.length ? `${out.join('\n')}\n` : '';
}

/** The agent figures as metrics. `now` becomes onestor_probe_timestamp_seconds (alert on its age). */
export function agentMetrics(summary: AgentSummary, reports: readonly DiskAssessment[], now: number, host?: string): Metric[] {
  const hostLabel: Record<string, string> = host ? { host } : {};
  const per = (fn: (r: DiskAssessment) => number | undefined): Sample[] =>
    reports.flatMap((r) => {
      const v = fn(r);
      return v === undefined ? [] : [{ labels: { ...hostLabel, vm: r.vmId, disk: r.diskId }, value: v }];
    });
  return [
    { name: 'onestor_probe_timestamp_seconds', help: 'When these figures were written (epoch s); stale means the probe stopped running.', type: 'gauge', samples: [{ labels: hostLabel, value: Math.round(now) }] },
    { name: 'onestor_agent_up', help: '1 when the agent daemon heartbeat is fresh.', type: 'gauge', samples: [{ labels: hostLabel, value: summary.up ? 1 : 0 }] },
    ...(summary.heartbeatAgeS !== undefined
      ? [{ name: 'onestor_agent_heartbeat_age_seconds', help: 'Age of the daemon heartbeat.', type: 'gauge' as const, samples: [{ labels: hostLabel, value: summary.heartbeatAgeS }] }]
      : []),
    { name: 'onestor_protected_disks', help: 'Disks set up for recovery snapshots.', type: 'gauge', samples: [{ labels: hostLabel, value: summary.protectedDisks }] },
    { name: 'onestor_failing_disks', help: 'Protected disks whose snapshot is failing, missing or overdue.', type: 'gauge', samples: [{ labels: hostLabel, value: summary.failingDisks }] },
    { name: 'onestor_disk_ok', help: '1 when the disk has a current recovery snapshot.', type: 'gauge', samples: per((r) => (r.kind === 'ok' ? 1 : 0)) },
    { name: 'onestor_disk_snapshot_timestamp_seconds', help: 'Point in time of the last published snapshot.', type: 'gauge', samples: per((r) => r.disk?.lastSuccess?.capturedAt) },
    { name: 'onestor_disk_snapshot_age_seconds', help: 'Age of the last published snapshot.', type: 'gauge', samples: per((r) => r.ageS) },
    { name: 'onestor_disk_snapshot_frequency_seconds', help: 'RECOVERY_SNAPSHOT_FREQ of the disk.', type: 'gauge', samples: per((r) => r.disk?.freqSeconds) },
    { name: 'onestor_disk_last_bytes', help: 'Bytes sent by the last successful cycle.', type: 'gauge', samples: per((r) => r.disk?.lastSuccess?.bytes) },
    { name: 'onestor_disk_last_duration_seconds', help: 'Duration of the last successful cycle.', type: 'gauge', samples: per((r) => (r.disk?.lastSuccess ? r.disk.lastSuccess.durationMs / 1000 : undefined)) },
    { name: 'onestor_disk_fail_count', help: 'Consecutive failed cycles.', type: 'gauge', samples: per((r) => r.disk?.failCount ?? 0) },
    {
      name: 'onestor_disk_lineage_alert_timestamp_seconds',
      help: 'Last time the replica held a publish this host did not make (take-over or token mismatch) and a full was forced.',
      type: 'gauge',
      samples: per((r) => r.disk?.lineageAlert?.at),
    },
  ];
}

/** The textfile's text for one assessment (probe and daemon both call this). */
export function metricsText(a: Assessment, now: number, host?: string): string {
  return formatMetrics(agentMetrics(summarize(a, now), a.disks, now, host));
}

/** Writes the textfile atomically (temp in the same dir + rename); bounded in time. */
export function writeTextfile(file: string, text: string, deadlineMs = 2000): Promise<Bounded<void>> {
  return writeFileAtomicBounded(file, text, deadlineMs);
}
