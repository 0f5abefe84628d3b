/**
 * Lineage release and hand-over (issue 13 vs issue 11), the pure parts: who may release, to whom, for how long;
 * when a release holds (owner, token, expiry, recipient); how a publish on it changes ownership; what the
 * receiver tells hosts; what the host plans; the destination named by a migration's command line. Hostile input
 * throughout: the recipient is a name from OpenNebula or /proc, the release comes back in a manifest.
 */
import { describe, expect, it } from 'vitest';
import { activeRelease, handedOverBy, isReleaseRecipient, recipientMatches, releaseAllows } from '../../lib/shared/release.js';
import { assertMayIncrement, makeRelease, ownershipForPublish } from '../../lib/replica/ownership.js';
import { replicaPaths } from '../../lib/replica/layout.js';
import { toWireManifest, type StoredManifest } from '../../lib/replica/manifest.js';
import { parseClientMessage, RELEASE_MAX_TTL_SEC, replicaManifestSchema } from '../../lib/protocol/protocol.js';
import { decideMode, lineageCheck, type ModeFacts } from '../../lib/cycle/plan.js';
import { migrationDestination } from '../../lib/cycle/migration.js';
import { errorCodeOf } from '../../lib/shared/errors.js';

const TOK = 'a'.repeat(32);
const TOK2 = 'b'.repeat(32);
const FP = `SHA256:${'A'.repeat(43)}`;
const p = replicaPaths('/snaps', 7, 0);
const codeOf = (f: () => unknown): string | null => {
  try {
    f();
    return null;
  } catch (e) {
    return errorCodeOf(e);
  }
};

describe('recipient names', () => {
  it('host names and fingerprints only; never the unidentified writer, empty, odd characters or oversize', () => {
    for (const ok of ['hv-b', 'hv1.example.org', 'HV_2', FP]) expect(isReleaseRecipient(ok), ok).toBe(true);
    for (const bad of ['', '(unidentified)', 'hv b', 'hv;rm -rf /', '$(id)', '-hv', '.hv', 'hv\n', 'hv\u0000', '../x', 'a'.repeat(254), `SHA256:${'A'.repeat(42)}`, 42, null, undefined, {}, ['hv']]) {
      expect(isReleaseRecipient(bad), JSON.stringify(bad)).toBe(false);
    }
  });
  it('match: equal ignoring case, or a short name and its own FQDN; fingerprints exactly', () => {
    expect(recipientMatches('hv-b', 'hv-b')).toBe(true);
    expect(recipientMatches('HV-B', 'hv-b')).toBe(true);
    expect(recipientMatches('hv-b.example', 'hv-b')).toBe(true);
    expect(recipientMatches('hv-b', 'hv-b.example')).toBe(true);
    expect(recipientMatches(FP, FP)).toBe(true);
  });
  it('no match: other hosts, same short name in other domains, prefixes, fingerprints loosely, unidentified', () => {
    expect(recipientMatches('hv-b', 'hv-a')).toBe(false);
    expect(recipientMatches('hv-b.dc1', 'hv-b.dc2')).toBe(false);
    expect(recipientMatches('hv-b', 'hv-bb')).toBe(false);
    expect(recipientMatches('hv', 'hv-b')).toBe(false);
    expect(recipientMatches(FP, FP.toLowerCase())).toBe(false);
    expect(recipientMatches(FP.slice(7), FP)).toBe(false);
    expect(recipientMatches('(unidentified)', '(unidentified)')).toBe(false);
    expect(recipientMatches('', '')).toBe(false);
  });
});

describe('when a release holds', () => {
  const rel = { from: 'hv-a', to: 'hv-b', at: 100, until: 200, token: TOK, checkpoint: 'ck' };
  const m = { owner: 'hv-a', token: TOK, release: rel };
  it('made by the owner, on the lineage it released, before it expires', () => {
    expect(activeRelease(m, 150)).toEqual(rel);
    expect(releaseAllows(m, 'hv-b', 150)).toBe(true);
    expect(releaseAllows(m, 'HV-B.example', 150)).toBe(true);
  });
  it('expired (at until, after), voided by a later publish (token), not the owner\'s, inverted times, absent', () => {
    expect(activeRelease(m, 200)).toBeNull();
    expect(activeRelease(m, 1e10)).toBeNull();
    expect(activeRelease({ ...m, token: TOK2 }, 150)).toBeNull();
    expect(activeRelease({ ...m, owner: 'hv-c' }, 150)).toBeNull();
    expect(activeRelease({ token: TOK, release: rel }, 150)).toBeNull();
    expect(activeRelease({ owner: 'hv-a', release: rel }, 150)).toBeNull();
    expect(activeRelease({ ...m, release: { ...rel, at: 300 } }, 150)).toBeNull();
    expect(activeRelease({ owner: 'hv-a', token: TOK }, 150)).toBeNull();
    expect(activeRelease(null, 150)).toBeNull();
    expect(activeRelease(m, Number.NaN)).toBeNull();
  });
  it('only for the named recipient; never for the owner itself or anyone else', () => {
    expect(releaseAllows(m, 'hv-a', 150)).toBe(false);
    expect(releaseAllows(m, 'hv-c', 150)).toBe(false);
    expect(releaseAllows(m, '(unidentified)', 150)).toBe(false);
    expect(releaseAllows(m, FP, 150)).toBe(false);
  });
});

describe('making a release (receiver, under the disk lock)', () => {
  const prev = { owner: 'hv-a', token: TOK, checkpoint: 'ck', history: [] };
  it('the owner releases to another host, bound to the current token, for at most a day', () => {
    expect(makeRelease(prev, 'hv-a', 'hv-b', 3600, 1000, p)).toEqual({ from: 'hv-a', to: 'hv-b', at: 1000, until: 4600, token: TOK, checkpoint: 'ck' });
    expect(makeRelease(prev, 'hv-a', 'hv-b', RELEASE_MAX_TTL_SEC, 0, p).until).toBe(RELEASE_MAX_TTL_SEC);
  });
  it('refused (E_RELEASE): no lineage, a non-owner, an unowned lineage, unidentified writers, no token', () => {
    expect(codeOf(() => makeRelease(null, 'hv-a', 'hv-b', 60, 0, p))).toBe('E_RELEASE');
    expect(codeOf(() => makeRelease(prev, 'hv-b', 'hv-b', 60, 0, p))).toBe('E_RELEASE');
    expect(codeOf(() => makeRelease(prev, 'hv-c', 'hv-c', 60, 0, p))).toBe('E_RELEASE');
    expect(codeOf(() => makeRelease({ token: TOK }, 'hv-a', 'hv-b', 60, 0, p))).toBe('E_RELEASE');
    expect(codeOf(() => makeRelease({ ...prev, owner: '(unidentified)' }, '(unidentified)', 'hv-b', 60, 0, p))).toBe('E_RELEASE');
    expect(codeOf(() => makeRelease({ owner: 'hv-a' }, 'hv-a', 'hv-b', 60, 0, p))).toBe('E_RELEASE');
  });
  it('refused (E_RELEASE): to itself (any spelling), to a bad name, for no time or too long', () => {
    for (const to of ['hv-a', 'HV-A', 'hv-a.example', '(unidentified)', '', 'hv b', '$(reboot)', 'x'.repeat(300)]) {
      expect(codeOf(() => makeRelease(prev, 'hv-a', to, 60, 0, p)), to).toBe('E_RELEASE');
    }
    for (const ttl of [0, -1, 1.5, RELEASE_MAX_TTL_SEC + 1, Number.NaN, Number.POSITIVE_INFINITY]) {
      expect(codeOf(() => makeRelease(prev, 'hv-a', 'hv-b', ttl, 0, p)), String(ttl)).toBe('E_RELEASE');
    }
  });
  it('the message: the releasing owner is never a field; bad recipients and durations are E_PROTOCOL', () => {
    expect(parseClientMessage({ type: 'release', to: 'hv-b', ttlSec: 60, from: 'hv-a', owner: 'hv-a' })).toEqual({ type: 'release', to: 'hv-b', ttlSec: 60 });
    for (const bad of [
      { type: 'release' },
      { type: 'release', to: 'hv-b' },
      { type: 'release', to: '', ttlSec: 60 },
      { type: 'release', to: 'hv\u0001b', ttlSec: 60 },
      { type: 'release', to: 'x'.repeat(256), ttlSec: 60 },
      { type: 'release', to: 'hv-b', ttlSec: '60' },
      { type: 'release', to: 'hv-b', ttlSec: 0 },
      { type: 'release', to: 'hv-b', ttlSec: RELEASE_MAX_TTL_SEC + 1 },
      { type: 'release', to: ['hv-b'], ttlSec: 60 },
    ]) {
      expect(codeOf(() => parseClientMessage(bad)), JSON.stringify(bad).slice(0, 80)).toBe('E_PROTOCOL');
    }
  });
});

describe('publishing on a released lineage', () => {
  const rel = { from: 'hv-a', to: 'hv-b', at: 100, until: 200, token: TOK, checkpoint: 'ck' };
  const prev = { owner: 'hv-a', token: TOK, checkpoint: 'ck', history: [{ at: 1, from: null, to: 'hv-a', checkpoint: 'c0' }], release: rel };
  it('the recipient\'s publish is a hand-over (history kind, not a take-over)', () => {
    const r = ownershipForPublish(prev, 'hv-b', 'ck2', 150, TOK2);
    expect(r.handover).toEqual({ from: 'hv-a', to: 'hv-b' });
    expect(r.takeover).toBeNull();
    expect(r.fields).toMatchObject({ owner: 'hv-b', token: TOK2 });
    expect(r.fields.history.at(-1)).toEqual({ at: 150, from: 'hv-a', to: 'hv-b', checkpoint: 'ck2', kind: 'handover' });
  });
  it('anyone else, or the recipient after expiry or a later publish, is a take-over', () => {
    expect(ownershipForPublish(prev, 'hv-c', 'x', 150)).toMatchObject({ takeover: { from: 'hv-a', to: 'hv-b'.replace('b', 'c') }, handover: null });
    expect(ownershipForPublish(prev, 'hv-b', 'x', 200)).toMatchObject({ takeover: { from: 'hv-a', to: 'hv-b' }, handover: null });
    expect(ownershipForPublish({ ...prev, token: TOK2 }, 'hv-b', 'x', 150).fields.history.at(-1)!.kind).toBe('takeover');
  });
  it('incrementals: the recipient may, the old owner after the hand-over may not, others may not (E_OWNER says why)', () => {
    expect(() => assertMayIncrement(prev, 'hv-b', p, 150)).not.toThrow();
    expect(() => assertMayIncrement(prev, 'hv-a', p, 150)).not.toThrow(); // still the owner until the hand-over
    const after = { owner: 'hv-b', token: TOK2, history: [] };
    expect(codeOf(() => assertMayIncrement(after, 'hv-a', p, 150))).toBe('E_OWNER');
    expect(() => assertMayIncrement(prev, 'hv-c', p, 150)).toThrow(/released to hv-b, not to this host/);
    expect(() => assertMayIncrement(prev, 'hv-b', p, 250)).toThrow(/no longer holds/);
    expect(codeOf(() => assertMayIncrement({ ...prev, token: TOK2 }, 'hv-b', p, 150))).toBe('E_OWNER');
  });
  it('the manifest schema takes the release and the history kind; garbage in them makes the manifest invalid', () => {
    const base = { version: 1, vmId: 7, diskId: 0, checkpoint: 'ck', capturedAt: 1, publishedAt: 1, consistency: 'crash-consistent', mode: 'full', base: { size: 1, sha256: 'c'.repeat(64) }, base1: { size: 1 }, owner: 'hv-a', token: TOK };
    expect(replicaManifestSchema.safeParse({ ...base, release: rel }).success).toBe(true);
    expect(replicaManifestSchema.safeParse({ ...base, release: { ...rel, token: 'x' } }).success).toBe(false);
    expect(replicaManifestSchema.safeParse({ ...base, release: { ...rel, to: 'a\nb' } }).success).toBe(false);
    expect(replicaManifestSchema.safeParse({ ...base, history: [{ at: 1, from: null, to: 'a', checkpoint: null, kind: 'stolen' }] }).success).toBe(false);
  });
  it('hosts are told of a release only while it holds (receiver clock)', () => {
    const stored = { version: 1, vmId: 7, diskId: 0, checkpoint: 'ck', capturedAt: 1, publishedAt: 1, consistency: 'crash-consistent', mode: 'full', base: { size: 1, sha256: 'c'.repeat(64) }, base1: { size: 1 }, owner: 'hv-a', token: TOK, release: rel, files: { base: { ino: 1, size: 1, mtimeMs: 1 }, base1: { ino: 2, size: 1, mtimeMs: 1 } } } as StoredManifest;
    expect(toWireManifest(stored, 150).release).toEqual(rel);
    expect(toWireManifest(stored, 200).release).toBeUndefined();
    expect(toWireManifest({ ...stored, token: TOK2 }, 150).release).toBeUndefined();
    expect(toWireManifest(stored, 150)).not.toHaveProperty('files');
  });
});

describe('the host plans on a release', () => {
  const facts: ModeFacts = {
    forceFull: false,
    stateCheckpoint: null,
    replicaCheckpoint: 'onestor-7-2-bbbbbb',
    libvirtCheckpoints: ['onestor-7-2-bbbbbb'],
    bitmapHealthy: true,
    base1IdentityThen: null,
    base1IdentityNow: '1:200',
    replicaBaseMatches: true,
    lineageFromAnotherHost: true,
    selfIdentity: 'hv-b',
    replicaOwner: 'hv-a',
    replicaToken: TOK,
    stateToken: null,
    replicaRelease: { from: 'hv-a', to: 'hv-b', token: TOK },
  };
  it('released to this host, on the lineage the replica holds: incremental, the reason names the releasing host', () => {
    expect(lineageCheck(facts)).toBeNull();
    expect(decideMode(facts)).toEqual({ mode: 'incremental', parent: 'onestor-7-2-bbbbbb', reason: 'lineage handed over by hv-a (its release names this host)' });
    expect(handedOverBy(facts)).toBe('hv-a');
  });
  it('the bitmap still has to prove continuity', () => {
    expect(decideMode({ ...facts, bitmapHealthy: false }).mode).toBe('full');
    expect(decideMode({ ...facts, libvirtCheckpoints: [] }).mode).toBe('full');
    expect(decideMode({ ...facts, replicaBaseMatches: false }).mode).toBe('full');
  });
  it('a release to another host, by someone else than the owner, on another token, or none: full, foreign owner', () => {
    for (const replicaRelease of [{ from: 'hv-a', to: 'hv-c', token: TOK }, { from: 'hv-c', to: 'hv-b', token: TOK }, { from: 'hv-a', to: 'hv-b', token: TOK2 }, null]) {
      expect(decideMode({ ...facts, replicaRelease }), JSON.stringify(replicaRelease)).toMatchObject({ mode: 'full', alert: 'foreign-owner' });
    }
    expect(decideMode({ ...facts, replicaToken: null }).mode).toBe('full');
    expect(decideMode({ ...facts, selfIdentity: null }).mode).toBe('incremental'); // receiver without ownership: earlier rules
  });
});

describe('the destination named by a migration command line', () => {
  it('virsh migrate: the host of the destination URI (not the --migrateuri, not a local URI)', () => {
    expect(migrationDestination(['virsh', '--connect', 'qemu:///system', 'migrate', '--live', '--suspend', 'one-7', 'qemu+ssh://hv-b/system', '--copy-storage-all'])).toBe('hv-b');
    expect(migrationDestination(['/usr/bin/virsh', 'migrate', '--live', '--migrateuri', 'tcp://10.0.0.2', 'one-7', 'qemu+ssh://oneadmin@hv-b.example:2222/system'])).toBe('hv-b.example');
    expect(migrationDestination(['virsh', 'migrate', 'one-7', 'qemu+tls://hv-c/system?pkipath=/x'])).toBe('hv-c');
    expect(migrationDestination(['virsh', '-c', 'qemu:///system', 'migrate', 'one-7', 'qemu:///system?socket=/run/x'])).toBeNull();
    expect(migrationDestination(['bash', '-c', 'virsh --connect qemu:///system migrate --live one-7 qemu+ssh://hv-d/system'])).toBe('hv-d');
  });
  it('rsync: the host of the last argument', () => {
    expect(migrationDestination(['rsync', '-az', '/ds/0/7/disk.0.snap', 'hv-b:/ds/0/7/'])).toBe('hv-b');
    expect(migrationDestination(['rsync', '-az', '-e', 'ssh -p 22', '/ds/0/7/disk.0.snap', 'oneadmin@hv-b.example:/ds/0/7/'])).toBe('hv-b.example');
    expect(migrationDestination(['rsync', '-az', '/ds/0/7/disk.0.snap', '/local/dir/'])).toBeNull();
    expect(migrationDestination(['rsync', '-az', '/ds/0/7/disk.0.snap', 'hv-b::module/x'])).toBeNull();
    expect(migrationDestination(['rsync', '/ds/0/7/disk.0.snap', 'rsync://hv-b/x'])).toBeNull();
  });
  it('hostile or odd command lines name nobody', () => {
    for (const argv of [
      [],
      ['rsync'],
      ['rsync', 'hv-b:/x'],
      ['rsync', '/a', '$(reboot):/x'],
      ['rsync', '/a', 'hv b:/x'],
      ['rsync', '/a', '-hv:/x'],
      ['rsync', '/a', '..:/x'],
      ['rsync', '/a', `${'h'.repeat(300)}:/x`],
      ['virsh', 'migrate', 'one-7', 'qemu+ssh://[::1]/system'],
      ['virsh', 'migrate', 'one-7', 'qemu+ssh://hv;id/system'],
      ['virsh', 'migrate', 'one-7', 'qemu+ssh:///system'],
      ['virsh', 'list'],
      ['cat', 'hv-b:/x'],
      ['sh', '-c', ''],
      Array.from({ length: 5000 }, () => 'hv-b:/x'),
    ]) {
      expect(migrationDestination(argv), JSON.stringify(argv).slice(0, 80)).toBeNull();
    }
  });
});

describe('the receiver answers release in process (no lineage, no open disk)', () => {
  it('release before open is a protocol violation; on a disk without a lineage it is E_RELEASE and the session goes on', async () => {
    const { mkdtemp, rm } = await import('node:fs/promises');
    const os = await import('node:os');
    const path = await import('node:path');
    const { rawPeer } = await import('../helpers/receiver-session.js');
    const dir = await mkdtemp(path.join(os.tmpdir(), 'onestor-release-'));
    try {
      const a = rawPeer(dir, { identity: 'hv-a' });
      expect(await a.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'hv-a' })).toMatchObject({ type: 'ok', identity: 'hv-a' });
      expect(await a.ask({ type: 'open', vm: 7, disk: 0 })).toMatchObject({ type: 'ok', manifest: null });
      expect(await a.ask({ type: 'release', to: 'hv-b', ttlSec: 60 })).toMatchObject({ type: 'error', code: 'E_RELEASE' });
      expect(await a.ask({ type: 'close' })).toEqual({ type: 'ok' });
      expect(await a.ask({ type: 'bye' })).toEqual({ type: 'ok' });
      expect(await a.done).toBe(0);

      const b = rawPeer(dir, { identity: 'hv-b' });
      await b.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'hv-b' });
      expect(await b.ask({ type: 'release', to: 'hv-a', ttlSec: 60 })).toMatchObject({ type: 'error', code: 'E_PROTOCOL' });
      expect(await b.done).not.toBe(0);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('the migrate hook passes only a plain destination name to the remote shell', () => {
  it('a hostile HOSTNAME in the history is not sent (no --to); a plain one is', async () => {
    const { mkdtemp, rm, writeFile, readFile } = await import('node:fs/promises');
    const os = await import('node:os');
    const path = await import('node:path');
    const { run } = await import('../../lib/shared/exec.js');
    const dir = await mkdtemp(path.join(os.tmpdir(), 'onestor-hook-'));
    try {
      const ssh = path.join(dir, 'ssh');
      await writeFile(ssh, `#!/bin/sh\nprintf '%s\\n' "$@" > ${dir}/args\n`, { mode: 0o755 });
      const hook = path.resolve('hooks', 'yield-on-migrate');
      const xml = (dst: string) => `<VM><ID>7</ID><HISTORY_RECORDS><HISTORY><HOSTNAME>hv-a</HOSTNAME></HISTORY><HISTORY><HOSTNAME><![CDATA[${dst}]]></HOSTNAME></HISTORY></HISTORY_RECORDS></VM>`;
      const go = async (dst: string) => {
        await rm(path.join(dir, 'args'), { force: true });
        const r = await run(hook, [Buffer.from(xml(dst)).toString('base64')], { env: { ONESTOR_HOOK_SSH: ssh, PATH: process.env.PATH ?? '' }, timeoutMs: 20_000 });
        expect(r.code, r.stderr).toBe(0);
        return { args: (await readFile(path.join(dir, 'args'), 'utf8')).split('\n').filter(Boolean), stderr: r.stderr };
      };
      expect((await go('hv-b')).args.slice(-2)).toEqual(['--to', 'hv-b']);
      for (const hostile of ['hv-b;touch pwned', '$(id)', 'hv b', '-x']) {
        const r = await go(hostile);
        expect(r.args, hostile).not.toContain('--to');
        expect(r.args.join(' '), hostile).not.toContain(hostile);
        expect(r.stderr).toMatch(/no lineage release/);
      }
      // the source is ssh's host argument: an option-looking name is refused outright
      const bad = await run(hook, [Buffer.from(xml('hv-b').replace('<HOSTNAME>hv-a<', '<HOSTNAME>-oProxyCommand=id<')).toString('base64')], { env: { ONESTOR_HOOK_SSH: ssh, PATH: process.env.PATH ?? '' }, timeoutMs: 20_000 });
      expect(bad.code).not.toBe(0);
      expect(bad.stderr).toMatch(/not a plain host name/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
