/**
 * The pure pieces of identity and ownership (issue 11): how the writer is named from what sshd gives the
 * forced command, hostile --host values and SSH_USER_AUTH contents, the bounded owner history, who may
 * publish an incremental, and the ledger parsers the replica probe uses.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { errorCodeOf } from '../../lib/shared/errors.js';
import { run } from '../../lib/shared/exec.js';
import { claimMatches, fingerprintFromUserAuth, identityKind, identityTag, isValidIdentity, parseHostFlag, resolveIdentity, UNIDENTIFIED } from '../../lib/replica/identity.js';
import { appendHistory, assertMayIncrement, ownershipForPublish, uploadKeyFor } from '../../lib/replica/ownership.js';
import { replicaPaths } from '../../lib/replica/layout.js';
import { OWNER_HISTORY_MAX, parseReply, plainOkSchema, replicaManifestSchema } from '../../lib/protocol/protocol.js';
import { parseTakeoverLines, parseWriterRecord, summarizeTakeovers } from '../../lib/shared/ledger.js';
import { ledgerLines } from '../../lib/monitor/probe-lines.js';
import { buildStatus } from '../../lib/monitor/status.js';
import type { EligibleDisk } from '../../lib/shared/model.js';

let dir: string;
let keyLine: string; // "ssh-ed25519 AAAA... comment"
let keygenFingerprint: string; // as ssh-keygen -l prints it
let otherKeyLine: string;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'onestor-ident-'));
  for (const name of ['a', 'b']) {
    const r = await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', `c-${name}`, '-f', path.join(dir, name)]);
    expect(r.code, r.stderr).toBe(0);
  }
  keyLine = (await readFile(path.join(dir, 'a.pub'), 'utf8')).trim();
  otherKeyLine = (await readFile(path.join(dir, 'b.pub'), 'utf8')).trim();
  const l = await run('ssh-keygen', ['-l', '-E', 'sha256', '-f', path.join(dir, 'a.pub')]);
  keygenFingerprint = l.stdout.split(' ')[1]!;
  expect(keygenFingerprint).toMatch(/^SHA256:/);
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const authLine = (pub: string) => `publickey ${pub.split(' ').slice(0, 2).join(' ')}\n`;

describe('--host', () => {
  it.each(['hvA', 'hv-b', 'node07.cluster.example.com', 'a', '10-0-0-1', 'hv_1', 'a'.repeat(253)])('accepts the host name %s', (h) => {
    expect(parseHostFlag(h)).toBe(h);
    expect(identityKind(h)).toBe('host');
    expect(isValidIdentity(h)).toBe(true);
  });
  it.each([
    ['empty', ''],
    ['newline', 'hvA\nhvB'],
    ['space', 'hv A'],
    ['shell', 'hvA;rm -rf /'],
    ['quote', 'hvA",restrict'],
    ['path', '../hvA'],
    ['leading hyphen', '-hvA'],
    ['colon (fingerprint namespace)', 'SHA256:abc'],
    ['parenthesis (unidentified namespace)', '(unidentified)'],
    ['NUL', 'hv\u0000A'],
    ['too long', 'a'.repeat(254)],
    ['leading dot', '.hvA'],
    ['leading underscore', '_hvA'],
    ['slash', 'hv/A'],
    ['equals (option injection)', 'hvA=1'],
    ['tab', 'hv\tA'],
    ['unicode', 'hvÄ'],
  ])('refuses %s', (_name, h) => {
    let err: unknown;
    try {
      parseHostFlag(h);
    } catch (e) {
      err = e;
    }
    expect(errorCodeOf(err)).toBe('E_CONFIG');
  });
});

describe('SSH_USER_AUTH', () => {
  it('gives the fingerprint ssh-keygen prints for the authenticated key', () => {
    expect(fingerprintFromUserAuth(authLine(keyLine))).toEqual({ fingerprint: keygenFingerprint });
    expect(identityKind(keygenFingerprint)).toBe('key');
  });
  it('ignores other methods around the key', () => {
    expect(fingerprintFromUserAuth(`keyboard-interactive\n${authLine(keyLine)}`)).toEqual({ fingerprint: keygenFingerprint });
  });
  it.each<[string, () => string, RegExp]>([
    ['empty file', () => '', /no public key/],
    ['only another method', () => 'password\n', /no public key/],
    ['two different keys', () => authLine(keyLine) + authLine(otherKeyLine), /several public keys/],
    ['type not matching the blob', () => `publickey ssh-rsa ${keyLine.split(' ')[1]}\n`, /does not match/],
    ['not base64', () => 'publickey ssh-ed25519 !!!notbase64\n', /malformed/],
    ['extra field', () => `publickey ${keyLine.split(' ').slice(0, 2).join(' ')} extra\n`, /malformed/],
    ['certificate', () => `publickey ssh-ed25519-cert-v01@openssh.com ${keyLine.split(' ')[1]}\n`, /certificate/],
    ['huge', () => 'x'.repeat(70 * 1024), /larger/],
    ['truncated blob', () => 'publickey ssh-ed25519 AAAA\n', /malformed|does not match/],
  ])('names no writer for %s', (_name, text, why) => {
    const r = fingerprintFromUserAuth(text());
    expect(r.fingerprint).toBeNull();
    expect('reason' in r ? r.reason : '').toMatch(why);
  });
  it('the same key listed twice is still one key', () => {
    expect(fingerprintFromUserAuth(authLine(keyLine) + authLine(keyLine))).toEqual({ fingerprint: keygenFingerprint });
  });
});

describe('hello.host compared with the bound name (warning only)', () => {
  it.each([
    ['hvA', 'hvA', true],
    ['HVA', 'hvA', true],
    ['hvA.cluster.example', 'hvA', true],
    ['hvA', 'hvA.cluster.example', true],
    ['hvB', 'hvA', false],
    ['hvA-evil', 'hvA', false],
    ['hvB.cluster.example', 'hvA.cluster.example', false],
  ])('%s vs %s: %s', (claimed, bound, same) => {
    expect(claimMatches(claimed, bound)).toBe(same);
  });
});

describe('resolveIdentity', () => {
  it('--host wins and the key fingerprint is kept beside it', () => {
    expect(resolveIdentity({ host: 'hvA', userAuthText: authLine(keyLine) })).toEqual({ identity: 'hvA', kind: 'host', keyFingerprint: keygenFingerprint });
  });
  it('without --host the key names the writer', () => {
    expect(resolveIdentity({ userAuthText: authLine(keyLine) })).toMatchObject({ identity: keygenFingerprint, kind: 'key' });
  });
  it('a hostile --host is refused even with a good key', () => {
    expect(() => resolveIdentity({ host: 'hvA\nhvB', userAuthText: authLine(keyLine) })).toThrow(/--host must be a host name/);
  });
  it('neither: refused with E_IDENTITY and the fix in the message', () => {
    let err: unknown;
    try {
      resolveIdentity({});
    } catch (e) {
      err = e;
    }
    expect(errorCodeOf(err)).toBe('E_IDENTITY');
    expect(String((err as Error).message)).toMatch(/--host NAME.*ExposeAuthInfo.*--allow-unidentified/);
  });
  it('an unusable SSH_USER_AUTH is not silently accepted either', () => {
    expect(() => resolveIdentity({ userAuthText: authLine(keyLine) + authLine(otherKeyLine) })).toThrow(/several public keys/);
  });
  it('neither but explicitly allowed: one shared "(unidentified)" writer, with a note saying so', () => {
    const r = resolveIdentity({ allowUnidentified: true, userAuthError: 'SSH_USER_AUTH is not set' });
    expect(r).toMatchObject({ identity: UNIDENTIFIED, kind: 'unidentified' });
    expect(r.note).toMatch(/all such keys count as one writer/);
    expect(isValidIdentity(UNIDENTIFIED)).toBe(true);
    expect(() => parseHostFlag(UNIDENTIFIED)).toThrow();
  });
});

describe('ownership', () => {
  const p = replicaPaths('/snaps', 7, 0);
  it('first publish claims the lineage (history from nobody), no take-over', () => {
    const r = ownershipForPublish(null, 'hvA', 'ck1', 100, 'a'.repeat(32));
    expect(r).toEqual({ fields: { owner: 'hvA', token: 'a'.repeat(32), history: [{ at: 100, from: null, to: 'hvA', checkpoint: 'ck1', kind: 'claim' }] }, takeover: null, handover: null });
  });
  it('the owner publishing again keeps history and gets a new token each time', () => {
    const prev = { owner: 'hvA', history: [{ at: 100, from: null, to: 'hvA', checkpoint: 'ck1' }] };
    const a = ownershipForPublish(prev, 'hvA', 'ck2', 200);
    const b = ownershipForPublish(prev, 'hvA', 'ck2', 200);
    expect(a.takeover).toBeNull();
    expect(a.fields.history).toEqual(prev.history);
    expect(a.fields.token).toMatch(/^[0-9a-f]{32}$/);
    expect(a.fields.token).not.toBe(b.fields.token);
  });
  it('another writer is a take-over A -> B', () => {
    const prev = { owner: 'hvA', history: [{ at: 100, from: null, to: 'hvA', checkpoint: 'ck1' }] };
    const r = ownershipForPublish(prev, 'hvB', 'ckB', 300);
    expect(r.takeover).toEqual({ from: 'hvA', to: 'hvB' });
    expect(r.fields.history.map((h) => `${h.from}->${h.to}`)).toEqual(['null->hvA', 'hvA->hvB']);
  });
  it('a lineage without a recorded owner is claimed, not "taken over"', () => {
    expect(ownershipForPublish({}, 'hvB', 'x', 1).takeover).toBeNull();
  });
  it('history is bounded to the newest OWNER_HISTORY_MAX entries and stays valid for the manifest schema', () => {
    let h: ReturnType<typeof appendHistory> = [];
    for (let i = 0; i < 3 * OWNER_HISTORY_MAX; i++) h = appendHistory(h, { at: i, from: `h${i}`, to: `h${i + 1}`, checkpoint: null });
    expect(h).toHaveLength(OWNER_HISTORY_MAX);
    expect(h[0]!.at).toBe(2 * OWNER_HISTORY_MAX);
    expect(h.at(-1)!.to).toBe(`h${3 * OWNER_HISTORY_MAX}`);
    const m = { version: 1, vmId: 7, diskId: 0, checkpoint: null, capturedAt: 1, publishedAt: 1, consistency: 'crash-consistent', mode: 'full', base: { size: 1, sha256: 'a'.repeat(64) }, base1: { size: 1 }, owner: 'h', token: 'b'.repeat(32) };
    expect(replicaManifestSchema.safeParse({ ...m, history: h }).success).toBe(true);
    expect(replicaManifestSchema.safeParse({ ...m, history: [...h, h[0]] }).success).toBe(false);
    expect(replicaManifestSchema.safeParse({ ...m, token: 'not-a-token' }).success).toBe(false);
  });
  it('only the owner may publish an incremental; an unowned lineage takes a full', () => {
    expect(() => assertMayIncrement({ owner: 'hvA' }, 'hvA', p)).not.toThrow();
    expect(() => assertMayIncrement(null, 'hvB', p)).not.toThrow(); // left to the parent check
    for (const [m, who, why] of [[{ owner: 'hvA' }, 'hvB', /belongs to hvA/], [{}, 'hvA', /no recorded owner/]] as const) {
      let err: unknown;
      try {
        assertMayIncrement(m, who, p);
      } catch (e) {
        err = e;
      }
      expect(errorCodeOf(err)).toBe('E_OWNER');
      expect((err as Error).message).toMatch(why);
    }
  });
  it('upload temp names are per writer and stay plain file names', () => {
    const a = uploadKeyFor('hvA', 'ck.inc');
    const b = uploadKeyFor('SHA256:' + 'x'.repeat(43), 'ck.inc');
    expect(a).not.toBe(b);
    expect(a).toMatch(/^[0-9a-f]{16}\.ck\.inc$/);
    expect(b).not.toContain('/');
    expect(identityTag('hvA')).toHaveLength(16);
  });
});

describe('ledger parsers and probe lines', () => {
  it('counts take-overs, skips garbage, finds the last one', () => {
    const text = [
      JSON.stringify({ at: 1000, vm: 7, disk: 0, from: 'hvA', to: 'hvB', checkpoint: 'c' }),
      '{"at": 5, "vm": -1}',
      'not json',
      JSON.stringify({ at: 90_000, vm: 8, disk: 1, from: 'hvB', to: 'hvC', checkpoint: null }),
      '{"at": 1, "vm": 1, "disk": 1, "from": "x", "to"', // cut by a bounded read
    ].join('\n');
    const ev = parseTakeoverLines(text);
    expect(ev).toHaveLength(2);
    const s = summarizeTakeovers(ev, 90_100);
    expect(s).toMatchObject({ logged: 2, recent: 1, last: { vm: 8, from: 'hvB', to: 'hvC' } });
    const lines = ledgerLines({ writers: { ok: true, value: [parseWriterRecord(JSON.stringify({ identity: 'hvB', auth: 'host', lastPublishAt: 90_000, lastVm: 8, lastDisk: 1, lastMode: 'full' }))!] }, takeovers: { ok: true, value: s } });
    expect(lines[0]).toBe('ONESTOR_REPLICA_WRITER = [ NAME="hvB", AUTH="host", LAST_PUBLISH="90000", LAST_VM=8, LAST_DISK=1, LAST_MODE="full" ]');
    expect(lines[1]).toMatch(/^ONESTOR_REPLICA_OWNERSHIP = \[ WRITERS=1, TAKEOVERS_24H=1, TAKEOVERS_LOGGED=2, LAST_AT="90000", LAST_VM=8, LAST_DISK=1, LAST_FROM="hvB", LAST_TO="hvC" \]$/);
    // hand-overs (handovers.jsonl, same line format) are counted apart from take-overs
    const h = summarizeTakeovers(parseTakeoverLines(JSON.stringify({ at: 90_050, vm: 9, disk: 0, from: 'hvC', to: 'hvD', checkpoint: 'k' })), 90_100);
    const withH = ledgerLines({ writers: { ok: true, value: [] }, takeovers: { ok: true, value: s }, handovers: { ok: true, value: h } });
    expect(withH.at(-1)).toMatch(/^ONESTOR_REPLICA_OWNERSHIP = \[ WRITERS=0, TAKEOVERS_24H=1, TAKEOVERS_LOGGED=2, HANDOVERS_24H=1, HANDOVERS_LOGGED=1, LAST_AT="90000", .*LAST_FROM="hvB", LAST_TO="hvC" \]$/);
    const failed = ledgerLines({ writers: { ok: true, value: [] }, takeovers: { ok: true, value: s }, handovers: { ok: false, error: 'timed out' } });
    expect(failed.at(-1)).toMatch(/MSG="ERROR hand-overs: timed out" \]$/);
  });
  it('a writer record that is not one is ignored; a failed read is an ERROR in the line', () => {
    expect(parseWriterRecord('{"identity":"x"}')).toBeNull();
    expect(parseWriterRecord('garbage')).toBeNull();
    const lines = ledgerLines({ writers: { ok: false, error: 'timed out' }, takeovers: { ok: true, value: { logged: 0, recent: 0 } } });
    expect(lines).toEqual(['ONESTOR_REPLICA_OWNERSHIP = [ TAKEOVERS_24H=0, TAKEOVERS_LOGGED=0, MSG="ERROR writers: timed out" ]']);
  });
});

describe('error replies across versions', () => {
  const codeOf = (v: unknown) => {
    try {
      parseReply(plainOkSchema, v, 'publish');
    } catch (e) {
      return { code: errorCodeOf(e), message: (e as Error).message };
    }
    return null;
  };
  it('the new codes reach the agent as themselves', () => {
    expect(codeOf({ type: 'error', code: 'E_OWNER', message: 'belongs to hvA' })).toEqual({ code: 'E_OWNER', message: 'replica: belongs to hvA' });
    expect(codeOf({ type: 'error', code: 'E_IDENTITY', message: 'x' })?.code).toBe('E_IDENTITY');
  });
  it('a code this agent does not know yet is E_PROTOCOL that still names it, not an unreadable reply', () => {
    expect(codeOf({ type: 'error', code: 'E_FROM_THE_FUTURE', message: 'later' })).toEqual({ code: 'E_PROTOCOL', message: 'replica: [E_FROM_THE_FUTURE] later' });
    expect(codeOf({ type: 'error', code: 'not a code', message: 'x' })?.message).toMatch(/invalid error reply/);
  });
});

describe('onestor-agent status', () => {
  it('shows a lineage alert of the last day beside the disk\'s health, and forgets it after', () => {
    const NOW = 2_000_000_000;
    const disk = { vmId: 7, diskId: 0, freqSeconds: 600 } as EligibleDisk;
    const state = (alertAt: number) => ({
      version: 1 as const,
      updatedAt: NOW,
      daemon: { pid: 1, startedAt: NOW - 1000, heartbeatAt: NOW - 5, version: '0.1.0' },
      baseDigests: {},
      disks: {
        '7.0': {
          vmId: 7, diskId: 0, checkpoint: 'c', base1Identity: null, failCount: 0,
          lastSuccess: { capturedAt: NOW - 60, finishedAt: NOW - 50, durationMs: 1000, bytes: 1, mode: 'full' as const, consistency: 'crash-consistent' as const },
          lineageAlert: { at: alertAt, kind: 'foreign-owner', reason: 'replica lineage was last published by hvB' },
        },
      },
    });
    const detail = (at: number) => buildStatus({ now: NOW, state: state(at), eligible: [disk], ineligible: [] }).rows[0]!.detail;
    expect(detail(NOW - 100)).toBe('crash-consistent; lineage alert (foreign-owner): replica lineage was last published by hvB');
    expect(detail(NOW - 90_000)).toBe('crash-consistent');
  });
});
