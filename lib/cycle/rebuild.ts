/**
 * Rebuilds the agent's state from what the replicas hold, when the state file was corrupt or lost:
 * the manifest beside each disk.N.snap/ says which checkpoint base.1 corresponds to and when it was
 * captured, which is what the schedule (next due) and the lineage (incremental or full) need.
 */
import type { Logger } from 'pino';
import type { EligibleDisk, ReplicaManifest } from '../shared/model.js';
import type { ReplicaPort } from './cycle.js';
import { describeError } from '../shared/errors.js';
import { diskKey, getDisk, type AgentState, type StateStore } from './state.js';

/** Pure: fold replica manifests into a state, for the disks discovery found. Returns how many. */
export function applyManifests(state: AgentState, eligible: readonly EligibleDisk[], manifests: readonly ReplicaManifest[]): number {
  let n = 0;
  for (const d of eligible) {
    const m = manifests.find((x) => x.vmId === d.vmId && x.diskId === d.diskId);
    if (!m || !m.checkpoint) continue;
    const cur = getDisk(state, d.vmId, d.diskId);
    if (cur.lastSuccess && cur.lastSuccess.capturedAt >= m.capturedAt) continue;
    state.disks[diskKey(d.vmId, d.diskId)] = {
      ...cur,
      domainName: d.domainName,
      freqSeconds: d.freqSeconds,
      replicaHost: d.replicaHost,
      checkpoint: m.checkpoint,
      // unknown until the next cycle: the base.1 identity check is skipped once, the replica lineage rules
      base1Identity: null,
      lastSuccess: { capturedAt: m.capturedAt, finishedAt: m.publishedAt, durationMs: 0, bytes: 0, mode: m.mode, consistency: m.consistency, reason: 'rebuilt from the replica manifest' },
    };
    n++;
  }
  return n;
}

export async function rebuildFromReplicas(deps: { eligible: readonly EligibleDisk[]; replicaFor(host: string): Promise<ReplicaPort>; state: StateStore; log: Logger }): Promise<number> {
  const byVm = new Map<string, EligibleDisk[]>();
  for (const d of deps.eligible) {
    const k = `${d.replicaHost}\u0000${d.vmId}`;
    byVm.set(k, [...(byVm.get(k) ?? []), d]);
  }
  const manifests: ReplicaManifest[] = [];
  for (const disks of byVm.values()) {
    const first = disks[0]!;
    try {
      const replica = await deps.replicaFor(first.replicaHost);
      manifests.push(...(await replica.status(first.vmId)));
    } catch (e) {
      deps.log.warn({ vm: first.vmId, replica: first.replicaHost, err: describeError(e) }, 'cannot read replica manifests; this VM starts from an empty record');
    }
  }
  let n = 0;
  await deps.state.update((s) => {
    n = applyManifests(s, deps.eligible, manifests);
  });
  return n;
}
