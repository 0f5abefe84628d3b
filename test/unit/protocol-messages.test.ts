/**
 * Outgoing messages come from the builders of lib/protocol/messages.ts: each one must pass the schema its
 * peer parses it with, and the receiver and client send nothing built by hand. The manifest is one type:
 * the schema's (model.ts derives it; a hand-written twin would fail the type assertions below).
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, expectTypeOf, it } from 'vitest';
import type { z } from 'zod';
import { clientMessage, receiverReply } from '../../lib/protocol/messages.js';
import {
  endOkSchema,
  helloOkSchema,
  openOkSchema,
  parseClientMessage,
  parseReply,
  plainOkSchema,
  publishOkSchema,
  putOkSchema,
  releaseOkSchema,
  replicaManifestSchema,
  statusOkSchema,
} from '../../lib/protocol/protocol.js';
import type { ReplicaManifest } from '../../lib/shared/model.js';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const sha = 'c'.repeat(64);
const manifest: ReplicaManifest = { version: 1, vmId: 7, diskId: 0, checkpoint: 'onestor-7-1-abc', capturedAt: 10, publishedAt: 11, consistency: 'crash-consistent', mode: 'full', base: { size: 1, sha256: sha }, base1: { size: 2 }, sourceHost: 'h' };
/** what JSON on the wire turns a message into */
const wire = (m: unknown) => JSON.parse(JSON.stringify(m)) as unknown;

describe('client builders pass the receiver\'s schemas', () => {
  const cases = [
    clientMessage.hello('0.1.0', 'host-a'),
    clientMessage.status(),
    clientMessage.status(7),
    clientMessage.status(7, { vm: 7, disk: 2 }),
    clientMessage.open(7, 0),
    clientMessage.put({ kind: 'base1', size: 10, key: 'k.base1' }),
    clientMessage.put({ kind: 'base', size: 10, key: 'base-x', sha256: sha }),
    clientMessage.end('sha256', sha),
    clientMessage.put({ kind: 'base1', size: 10, key: 'k.base1', digest: 'xxh64' }),
    clientMessage.end('xxh64', '0123456789abcdef'),
    clientMessage.publishFull({ checkpoint: 'onestor-7-1-abc', capturedAt: 10, consistency: 'crash-consistent', sourceHost: 'h', base1: 'k.base1' }),
    clientMessage.publishIncremental({ parentCheckpoint: 'a', checkpoint: 'b', capturedAt: 10, consistency: 'filesystem-frozen', sourceHost: 'h', inc: 'b.inc' }),
    clientMessage.release('hv-b', 86_400),
    clientMessage.close(),
    clientMessage.bye(),
  ];
  it.each(cases.map((c) => [c.type, c] as const))('%s', (_t, m) => {
    expect(parseClientMessage(wire(m))).toEqual(wire(m));
  });
  it('an optional field left out is absent on the wire, not undefined', () => {
    expect(Object.keys(clientMessage.put({ kind: 'inc', size: 1, key: 'k', sha256: undefined }))).not.toContain('sha256');
    // sha256 is the default: a put that uses it says nothing, as agents before the choice did
    expect(Object.keys(clientMessage.put({ kind: 'inc', size: 1, key: 'k', digest: 'sha256' }))).not.toContain('digest');
    expect(clientMessage.end('xxh64', '0123456789abcdef')).toEqual({ type: 'end', xxh64: '0123456789abcdef' });
    // first page: `after: null` says this agent follows the receiver's cursor
    expect(clientMessage.status()).toEqual({ type: 'status', after: null });
    expect(Object.keys(receiverReply.status([]))).toEqual(['type', 'manifests']);
  });
});

describe('receiver builders pass the client\'s schemas', () => {
  it.each([
    ['hello', helloOkSchema, receiverReply.hello({ receiverVersion: '0.1.0', maxChunk: 1 << 20, snapsDirFree: 5, snapsDirUsedPercent: 12.5 })],
    ['open', openOkSchema, receiverReply.open(manifest, { size: 1, sha256: sha })],
    ['open (empty)', openOkSchema, receiverReply.open(null, null)],
    ['put', putOkSchema, receiverReply.put(4096)],
    ['end', endOkSchema, receiverReply.end(10, 'sha256', sha)],
    ['end (xxh64)', endOkSchema, receiverReply.end(10, 'xxh64', '00000000000000ff')],
    ['hello (digests)', helloOkSchema, receiverReply.hello({ receiverVersion: '0.1.0', maxChunk: 1 << 20, snapsDirFree: 5, snapsDirUsedPercent: 12.5, digests: ['sha256', 'xxh64'] })],
    ['publish', publishOkSchema, receiverReply.publish(manifest)],
    ['status', statusOkSchema, receiverReply.status([manifest])],
    ['status page', statusOkSchema, receiverReply.status([manifest], { vm: 7, disk: 0 })],
    ['status last page', statusOkSchema, receiverReply.status([], null)],
    ['ok', plainOkSchema, receiverReply.ok()],
    ['release', releaseOkSchema, receiverReply.release({ from: 'hv-a', to: 'hv-b', at: 10, until: 86_410, token: 'a'.repeat(32), checkpoint: 'onestor-7-1-abc' })],
    ['open (released)', openOkSchema, receiverReply.open({ ...manifest, owner: 'hv-a', token: 'a'.repeat(32), release: { from: 'hv-a', to: 'hv-b', at: 10, until: 20, token: 'a'.repeat(32), checkpoint: null } }, null)],
  ] as const)('%s', (what, schema, m) => {
    expect(parseReply(schema as z.ZodType<unknown>, wire(m), what)).toEqual(wire(m));
  });
  it('an error reply becomes the coded error on the client', () => {
    expect(() => parseReply(plainOkSchema, wire(receiverReply.error('E_NOSPACE', 'full')), 'x')).toThrow(expect.objectContaining({ code: 'E_NOSPACE' }));
  });
  it('open copies only size and digest of what the replica holds', () => {
    const extra = { size: 1, sha256: sha, path: '/secret' } as { size: number; sha256: string };
    expect(receiverReply.open(null, extra).baseOnReplica).toEqual({ size: 1, sha256: sha });
  });
});

describe('no hand-built messages', () => {
  it('receiver and client send only builder output', () => {
    const raw: string[] = [];
    for (const f of ['lib/replica/receiver.ts', 'lib/transfer/replica-client.ts']) {
      const text = readFileSync(path.join(repo, f), 'utf8');
      for (const m of text.matchAll(/(?:send|sendSafe|request|encodeControl)\(\s*\{/g)) raw.push(`${f}: ${m[0]}`);
    }
    expect(raw).toEqual([]);
  });

  // a compile-time assertion: `npm run typecheck` (tsconfig includes test/) fails when the types differ
  it('ReplicaManifest is the schema\'s type', () => {
    expectTypeOf<ReplicaManifest>().toEqualTypeOf<z.infer<typeof replicaManifestSchema>>();
  });
});
