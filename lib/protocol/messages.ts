/**
 * Outgoing messages, built by typed builders as incoming ones are parsed by schemas (protocol.ts); the
 * model is pg-protocol's serializer. Builders return Built<T>, a type only they can produce, and the
 * receiver's send() and the client's request() accept nothing else: an object literal sent raw does not
 * compile. test/unit/protocol-messages.test.ts checks that every builder's output passes the peer's schema.
 */
import type { DigestAlg } from './digest.js';
import type { z } from 'zod';
import type { ErrorCode } from '../shared/errors.js';
import type { ReplicaManifest } from '../shared/model.js';
import {
  PROTOCOL_VERSION,
  errorReply,
  type EndOk,
  type EndMessage,
  type ErrorReply,
  type HelloMessage,
  type HelloOk,
  type OpenMessage,
  type OpenOk,
  type PublishFullMessage,
  type PublishIncrementalMessage,
  type PublishOk,
  type PutMessage,
  type PutOk,
  type StatusMessage,
  type StatusOk,
  type ReleaseMessage,
  type ReleaseOk,
  type LineageRelease,
  type ClientMessage,
  type plainOkSchema,
  type StatusCursor,
} from './protocol.js';

declare const built: unique symbol;
/** A message made by a builder of this module (compile-time mark only; nothing is added on the wire). */
export type Built<T> = T & { readonly [built]: true };
const mark = <T>(m: T): Built<T> => m as Built<T>;

export type PlainOk = z.infer<typeof plainOkSchema>;
export type ReceiverReply = ErrorReply | HelloOk | OpenOk | PutOk | EndOk | PublishOk | StatusOk | PlainOk | ReleaseOk;

/** agent -> receiver */
export const clientMessage = {
  hello: (agentVersion: string, host: string) => mark<HelloMessage>({ type: 'hello', protocol: PROTOCOL_VERSION, agentVersion, host }),
  /** `after` is the paging cursor: null asks for the first page (and tells the receiver this agent pages) */
  status: (vm?: number, after: StatusCursor | null = null) => mark<StatusMessage>({ type: 'status', ...(vm !== undefined ? { vm } : {}), after }),
  open: (vm: number, disk: number) => mark<OpenMessage>({ type: 'open', vm, disk }),
  // no `digest` key for sha256: what receivers from before the choice expect
  put: (a: Omit<PutMessage, 'type'>) =>
    mark<PutMessage>({ type: 'put', kind: a.kind, size: a.size, key: a.key, ...(a.digest && a.digest !== 'sha256' ? { digest: a.digest } : {}), ...(a.sha256 ? { sha256: a.sha256 } : {}) }),
  end: (alg: DigestAlg, hex: string) => mark<EndMessage>({ type: 'end', [alg]: hex }),
  publishFull: (a: Omit<PublishFullMessage, 'type' | 'mode'>) => mark<PublishFullMessage>({ type: 'publish', mode: 'full', ...a }),
  publishIncremental: (a: Omit<PublishIncrementalMessage, 'type' | 'mode'>) => mark<PublishIncrementalMessage>({ type: 'publish', mode: 'incremental', ...a }),
  /** release the open disk's lineage to host `to` for `ttlSec` s (the releasing owner is the authenticated session) */
  release: (to: string, ttlSec: number) => mark<ReleaseMessage>({ type: 'release', to, ttlSec }),
  close: () => mark<Extract<ClientMessage, { type: 'close' }>>({ type: 'close' }),
  bye: () => mark<Extract<ClientMessage, { type: 'bye' }>>({ type: 'bye' }),
};

/** receiver -> agent */
export const receiverReply = {
  ok: () => mark<PlainOk>({ type: 'ok' }),
  error: (code: ErrorCode, message: string) => mark<ErrorReply>(errorReply(code, message)),
  hello: (a: Omit<HelloOk, 'type' | 'protocol'>) => mark<HelloOk>({ type: 'ok', protocol: PROTOCOL_VERSION, ...a }),
  open: (manifest: ReplicaManifest | null, baseOnReplica: { size: number; sha256: string } | null) =>
    mark<OpenOk>({ type: 'ok', manifest, baseOnReplica: baseOnReplica ? { size: baseOnReplica.size, sha256: baseOnReplica.sha256 } : null }),
  put: (offset: number) => mark<PutOk>({ type: 'ok', offset }),
  end: (bytes: number, alg: DigestAlg, hex: string) => mark<EndOk>({ type: 'ok', bytes, [alg]: hex }),
  publish: (manifest: ReplicaManifest) => mark<PublishOk>({ type: 'ok', manifest }),
  release: (release: LineageRelease) => mark<ReleaseOk>({ type: 'ok', release }),
  /** next: undefined for an agent that does not page (no key on the wire), null on the last page */
  status: (manifests: ReplicaManifest[], next?: StatusCursor | null) => mark<StatusOk>({ type: 'ok', manifests, ...(next !== undefined ? { next } : {}) }),
};
