import { describe, it, expect } from 'vitest';
import { applyManifests } from '../../lib/cycle/rebuild.js';
import { emptyState } from '../../lib/cycle/state.js';
import type { EligibleDisk, ReplicaManifest } from '../../lib/shared/model.js';

const disk = (vmId: number, diskId: number): EligibleDisk => ({
  vmId, diskId, dsId: 100, dsDir: '/ds/100', vmDir: `/ds/100/${vmId}`, domainName: `one-${vmId}`, freqSeconds: 300, replicaHost: 'replica',
  snapDir: `/ds/100/${vmId}/disk.${diskId}.snap`, basePath: 'b', base1Path: 'b1',
});
const manifest = (vmId: number, diskId: number, capturedAt: number, checkpoint: string | null = `onestor-${vmId}-${capturedAt}-x`): ReplicaManifest => ({
  version: 1, vmId, diskId, checkpoint, capturedAt, publishedAt: capturedAt + 5, consistency: 'crash-consistent', mode: 'incremental',
  base: { size: 1, sha256: 'a'.repeat(64) }, base1: { size: 2 },
});

describe('applyManifests', () => {
  it('fills checkpoint and last success from the replica for discovered disks only', () => {
    const s = emptyState(0);
    const n = applyManifests(s, [disk(1, 0), disk(2, 0)], [manifest(1, 0, 1000), manifest(3, 0, 1000)]);
    expect(n).toBe(1);
    expect(s.disks['1.0']).toMatchObject({ checkpoint: 'onestor-1-1000-x', base1Identity: null, lastSuccess: { capturedAt: 1000, finishedAt: 1005 } });
    expect(s.disks['2.0']).toBeUndefined();
    expect(s.disks['3.0']).toBeUndefined();
  });
  it('never moves a record backwards and ignores manifests without lineage', () => {
    const s = emptyState(0);
    applyManifests(s, [disk(1, 0)], [manifest(1, 0, 2000)]);
    expect(applyManifests(s, [disk(1, 0)], [manifest(1, 0, 1500)])).toBe(0);
    expect(s.disks['1.0']!.lastSuccess!.capturedAt).toBe(2000);
    expect(applyManifests(emptyState(0), [disk(1, 0)], [manifest(1, 0, 3000, null)])).toBe(0);
  });
});
