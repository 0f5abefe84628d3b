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

describe('decideMode: owner and token (tamper evidence)', () => {
  const T = 'a'.repeat(32);
  const owned: ModeFacts = { ...healthy, selfIdentity: 'hvA', replicaOwner: 'hvA', replicaToken: T, stateToken: T, uncertainCheckpoint: null };

  it('own lineage, same token: incremental', () => {
    expect(decideMode(owned)).toEqual({ mode: 'incremental', parent: 'onestor-7-1-a', reason: 'lineage intact' });
  });
  it('another host published last: full, never on its data', () => {
    const d = decideMode({ ...owned, replicaOwner: 'hvB', replicaToken: 'b'.repeat(32) });
    expect(d).toMatchObject({ mode: 'full', alert: 'foreign-owner' });
    expect(d.reason).toMatch(/last published by hvB, not by this host \(hvA\)/);
  });
  it('same owner name but a token this host never got (copied key, unidentified keys): full with the reason', () => {
    const d = decideMode({ ...owned, replicaToken: 'c'.repeat(32) });
    expect(d).toMatchObject({ mode: 'full', alert: 'token-mismatch' });
    expect(d.reason).toMatch(/token mismatch.*replica token cccccccc, ours aaaaaaaa/);
  });
  it('even when the checkpoint name is the one this host published (the reproduced attack)', () => {
    const d = decideMode({ ...owned, replicaToken: 'd'.repeat(32), stateCheckpoint: owned.replicaCheckpoint });
    expect(d.mode).toBe('full');
  });
  it('a lineage with no recorded owner (written before ownership) is claimed by a full', () => {
    expect(decideMode({ ...owned, replicaOwner: null, replicaToken: null })).toMatchObject({ mode: 'full', alert: 'unowned' });
  });
  it('state from an older agent (no token): accepted when the replica says it is ours and names a checkpoint of ours', () => {
    expect(decideMode({ ...owned, stateToken: null }).mode).toBe('incremental');
    // no state at all (lost, not rebuilt), but the replica's checkpoint is one libvirt has: ours
    expect(decideMode({ ...owned, stateToken: null, stateCheckpoint: null }).mode).toBe('incremental');
    // a checkpoint this host never made is not accepted on the owner name alone
    expect(decideMode({ ...owned, stateToken: null, stateCheckpoint: 'onestor-7-0-z', libvirtCheckpoints: ['onestor-7-0-z'] })).toMatchObject({ mode: 'full', alert: 'token-mismatch' });
  });
  it('our own publish whose reply was lost (uncertain checkpoint) is built on', () => {
    const d = decideMode({ ...owned, replicaToken: 'e'.repeat(32), stateCheckpoint: 'onestor-7-0-z', uncertainCheckpoint: 'onestor-7-1-a' });
    expect(d.mode).toBe('incremental');
  });
  it('agent killed between publish and state write: the replica names a newer checkpoint of ours (in libvirt), no false alert', () => {
    const d = decideMode({ ...owned, replicaToken: 'e'.repeat(32), stateCheckpoint: 'onestor-7-0-z', libvirtCheckpoints: ['onestor-7-0-z', 'onestor-7-1-a'] });
    expect(d.mode).toBe('incremental');
    // ...but a checkpoint libvirt does not have is not ours
    expect(decideMode({ ...owned, replicaToken: 'e'.repeat(32), stateCheckpoint: 'onestor-7-0-z', replicaCheckpoint: 'onestor-9-9-x', libvirtCheckpoints: ['onestor-7-0-z', 'onestor-7-1-a'] })).toMatchObject({ mode: 'full', alert: 'token-mismatch' });
    // nor is a foreign checkpoint libvirt happens to have (an OpenNebula backup's name can be guessed)
    expect(decideMode({ ...owned, replicaToken: 'e'.repeat(32), stateCheckpoint: 'onestor-7-0-z', replicaCheckpoint: 'one-7-0', libvirtCheckpoints: ['one-7-0', 'onestor-7-0-z'] })).toMatchObject({ mode: 'full', alert: 'token-mismatch' });
  });
  it('unidentified keys: the owner name proves nothing, only the token does', () => {
    const u: ModeFacts = { ...owned, selfIdentity: '(unidentified)', replicaOwner: '(unidentified)' };
    expect(decideMode(u).mode).toBe('incremental');
    expect(decideMode({ ...u, stateToken: null }).mode).toBe('full');
    expect(decideMode({ ...u, replicaToken: 'f'.repeat(32), uncertainCheckpoint: 'onestor-7-1-a' }).mode).toBe('full');
  });
  it('a receiver without ownership (no identity in hello): the earlier rules alone', () => {
    expect(decideMode({ ...owned, selfIdentity: null, replicaOwner: null, replicaToken: null, stateToken: null }).mode).toBe('incremental');
  });
  it('lineage reasons come before local ones (the alert is what matters)', () => {
    expect(decideMode({ ...owned, replicaOwner: 'hvB', bitmapHealthy: false })).toMatchObject({ alert: 'foreign-owner' });
  });
});
