import { describe, it, expect } from 'vitest';
import { decideMode, checkpointsToDelete, type ModeFacts } from '../../lib/cycle/plan.js';

const healthy: ModeFacts = {
  forceFull: false,
  stateCheckpoint: 'onestor-7-1-a',
  replicaCheckpoint: 'onestor-7-1-a',
  libvirtCheckpoints: ['one-7-0', 'onestor-7-1-a'],
  bitmapHealthy: true,
  base1IdentityThen: '2049:77',
  base1IdentityNow: '2049:77',
  replicaBaseMatches: true,
};

describe('decideMode', () => {
  it('goes incremental when the whole lineage holds', () => {
    expect(decideMode(healthy)).toEqual({ mode: 'incremental', parent: 'onestor-7-1-a', reason: 'lineage intact' });
  });
  it.each<[string, Partial<ModeFacts>, RegExp]>([
    ['forced', { forceFull: true }, /requested/],
    ['replica lost lineage (upstream delete, manifest removed)', { replicaCheckpoint: null }, /no snapshot lineage/],
    ['replica base differs', { replicaBaseMatches: false }, /base differs/],
    ['transient domain lost metadata', { libvirtCheckpoints: ['one-7-0'] }, /missing in libvirt/],
    ['QEMU crash broke the bitmap', { bitmapHealthy: false }, /broken or inconsistent/],
    ['bitmap not checked', { bitmapHealthy: null }, /unknown/],
    ['base.1 replaced by a recovery', { base1IdentityNow: '2049:99' }, /replaced/],
  ])('falls back to full: %s', (_name, patch, reason) => {
    const d = decideMode({ ...healthy, ...patch });
    expect(d.mode).toBe('full');
    expect(d.reason).toMatch(reason);
  });
  it('builds on what the replica holds, not on what local state remembers', () => {
    const d = decideMode({ ...healthy, stateCheckpoint: 'onestor-7-0-z', libvirtCheckpoints: ['onestor-7-1-a'] });
    expect(d).toMatchObject({ mode: 'incremental', parent: 'onestor-7-1-a' });
  });
  it('first time on this host (no local state) but replica and libvirt agree: incremental', () => {
    const d = decideMode({ ...healthy, stateCheckpoint: null, base1IdentityThen: null });
    expect(d.mode).toBe('incremental');
  });
});

describe('checkpointsToDelete', () => {
  it('keeps foreign and still-needed checkpoints and deletes leaf first', () => {
    const all = ['one-7-0', 'onestor-7-1-a', 'onestor-7-2-b', 'onestor-7-3-c'];
    expect(checkpointsToDelete(all, new Set(['onestor-7-3-c']))).toEqual(['onestor-7-2-b', 'onestor-7-1-a']);
  });
  it('never returns a foreign checkpoint even when nothing is needed', () => {
    expect(checkpointsToDelete(['one-1-0', 'backup-x'], new Set())).toEqual([]);
  });
});
