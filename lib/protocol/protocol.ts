/**
 * Wire protocol between the agent (client) and the replica receiver. PURE: no I/O.
 *
 * Frame: [u32 BE payload length][u8 type][payload]. The length counts the payload only.
 *   type 1 = control message: UTF-8 JSON object, payload <= 64 KiB
 *   type 2 = data chunk: raw bytes, payload <= 4 MiB
 * Anything else (unknown type, oversize, a stream that ends inside a frame, bad JSON, a message that does
 * not match its schema) is E_PROTOCOL.
 *
 * Data carries no meaning per frame (it is a byte stream of the current upload), so the decoder hands data
 * out as it arrives — possibly several pieces per frame — instead of copying it into one buffer first.
 * Those pieces are views of the chunk given to push(): valid as long as that chunk is, which for a reused
 * read buffer means until the next read. Nothing of a chunk is kept across calls without a copy.
 */
import { z } from 'zod';
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import { DIGEST_ALGS, DIGEST_HEX } from './digest.js';
import { checkpointSchema, consistencySchema, epochSchema, idSchema, lineageReleaseSchema, OWNER_HISTORY_MAX, ownerChangeSchema, publishTokenSchema, RELEASE_MAX_TTL_SEC, replicaManifestSchema, sha256Schema, shortText, sizeSchema, type LineageRelease, type OwnerChange } from '../shared/manifest-schema.js';

// the manifest and its field schemas are shared with the model (one type): lib/shared/manifest-schema.ts
export { checkpointSchema, consistencySchema, epochSchema, idSchema, lineageReleaseSchema, OWNER_HISTORY_MAX, ownerChangeSchema, publishTokenSchema, RELEASE_MAX_TTL_SEC, replicaManifestSchema, sha256Schema, sizeSchema, type LineageRelease, type OwnerChange };

/**
 * Still 1 after ownership (issue 11), on purpose: the receiver refuses any other version, so a bump would cut
 * off every host not yet upgraded. What changed is additive and optional (manifest owner/token/history, hello
 * reply identity, publish.sourceHost no longer required) and old peers drop unknown keys. The new rules are
 * enforced by the receiver whatever the client's version; an old agent only misses the host-side token check,
 * and sees the new codes E_OWNER/E_IDENTITY as E_PROTOCOL (it did not know them). Bump when a field becomes
 * required or changes meaning. Likewise `release` (issue 13): a receiver that predates it answers E_PROTOCOL
 * and ends that session; the agent then logs that the destination will take a full.
 */
export const PROTOCOL_VERSION = 1;
export const FRAME_HEADER_BYTES = 5;
export const FRAME_CONTROL = 1;
export const FRAME_DATA = 2;
export const MAX_CONTROL_BYTES = 64 * 1024;
export const MAX_DATA_BYTES = 4 * 1024 * 1024;

export type DecodedFrame =
  | { type: 'control'; message: unknown }
  /** A piece of a data frame; `frameEnd` is true on the last piece of that frame. */
  | { type: 'data'; chunk: Buffer; frameEnd: boolean };

function protocolError(message: string, field?: string): OnestorError {
  return new OnestorError(ErrorCodes.PROTOCOL, message, field ? { field } : {});
}

/** Streaming frame decoder: feed it whatever the transport delivers, frames may be split anywhere. */
export class FrameDecoder {
  private header = Buffer.alloc(FRAME_HEADER_BYTES);
  private headerFill = 0;
  /** Bytes of the current frame's payload still expected; -1 while reading a header. */
  private remaining = -1;
  private frameType = 0;
  private controlParts: Buffer[] = [];
  private failed: OnestorError | null = null;

  /** Decodes everything complete in `chunk`. Throws E_PROTOCOL; once failed, every later call throws too. */
  push(chunk: Buffer): DecodedFrame[] {
    if (this.failed) throw this.failed;
    try {
      return this.decode(chunk);
    } catch (e) {
      this.failed = e instanceof OnestorError ? e : protocolError(String(e));
      throw this.failed;
    }
  }

  /** True when the stream is between frames (nothing partial buffered). */
  get idle(): boolean {
    return this.remaining === -1 && this.headerFill === 0;
  }

  /** Call at end of stream: a partial frame means the peer was cut mid-frame. */
  end(): void {
    if (this.failed) throw this.failed;
    if (!this.idle) {
      this.failed = protocolError('stream ended inside a frame (truncated)');
      throw this.failed;
    }
  }

  private decode(chunk: Buffer): DecodedFrame[] {
    const out: DecodedFrame[] = [];
    let pos = 0;
    while (pos < chunk.length) {
      if (this.remaining === -1) {
        const take = Math.min(FRAME_HEADER_BYTES - this.headerFill, chunk.length - pos);
        chunk.copy(this.header, this.headerFill, pos, pos + take);
        this.headerFill += take;
        pos += take;
        if (this.headerFill < FRAME_HEADER_BYTES) break;
        this.headerFill = 0;
        const length = this.header.readUInt32BE(0);
        const type = this.header.readUInt8(4);
        if (type === FRAME_CONTROL) {
          if (length > MAX_CONTROL_BYTES) throw protocolError(`control frame of ${length} bytes exceeds ${MAX_CONTROL_BYTES}`);
        } else if (type === FRAME_DATA) {
          if (length > MAX_DATA_BYTES) throw protocolError(`data frame of ${length} bytes exceeds ${MAX_DATA_BYTES}`);
        } else {
          throw protocolError(`unknown frame type ${type}`);
        }
        this.frameType = type;
        this.remaining = length;
        if (length === 0) this.finishEmpty(out);
        continue;
      }
      const take = Math.min(this.remaining, chunk.length - pos);
      const piece = chunk.subarray(pos, pos + take);
      pos += take;
      this.remaining -= take;
      if (this.frameType === FRAME_DATA) {
        out.push({ type: 'data', chunk: piece, frameEnd: this.remaining === 0 });
      } else {
        // copied: the caller may reuse `chunk` for its next read (the receiver's stdin does)
        this.controlParts.push(Buffer.from(piece));
      }
      if (this.remaining === 0) {
        this.remaining = -1;
        if (this.frameType === FRAME_CONTROL) {
          const payload = this.controlParts.length === 1 ? this.controlParts[0]! : Buffer.concat(this.controlParts);
          this.controlParts = [];
          out.push({ type: 'control', message: parseControlPayload(payload) });
        }
      }
    }
    return out;
  }

  private finishEmpty(out: DecodedFrame[]): void {
    this.remaining = -1;
    if (this.frameType === FRAME_DATA) out.push({ type: 'data', chunk: Buffer.alloc(0), frameEnd: true });
    else out.push({ type: 'control', message: parseControlPayload(Buffer.alloc(0)) });
  }
}

function parseControlPayload(payload: Buffer): unknown {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(payload);
  } catch {
    throw protocolError('control frame is not valid UTF-8');
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw protocolError('control frame is not valid JSON');
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw protocolError('control frame is not a JSON object');
  }
  return value;
}

/** Header for a frame; data is sent as header + the caller's buffer so the payload is never copied. */
export function encodeFrameHeader(type: number, length: number): Buffer {
  const header = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  header.writeUInt32BE(length, 0);
  header.writeUInt8(type, 4);
  return header;
}

export function encodeControl(message: object): Buffer {
  const payload = Buffer.from(JSON.stringify(message), 'utf8');
  if (payload.length > MAX_CONTROL_BYTES) throw protocolError(`control message of ${payload.length} bytes exceeds ${MAX_CONTROL_BYTES}`);
  return Buffer.concat([encodeFrameHeader(FRAME_CONTROL, payload.length), payload]);
}

/**
 * A reply of the receiver. Too big is the receiver's own bug, never the client's protocol violation:
 * E_INTERNAL, so the session reports it and goes on.
 */
export function encodeReply(message: object): Buffer {
  try {
    return encodeControl(message);
  } catch (e) {
    throw new OnestorError(ErrorCodes.INTERNAL, `receiver bug: ${(e as Error).message} (reply to the agent)`);
  }
}

/** Header and payload of one data frame (write both, in order). */
export function encodeData(chunk: Buffer): [Buffer, Buffer] {
  if (chunk.length > MAX_DATA_BYTES) throw protocolError(`data chunk of ${chunk.length} bytes exceeds ${MAX_DATA_BYTES}`);
  return [encodeFrameHeader(FRAME_DATA, chunk.length), chunk];
}

// ---------------------------------------------------------------------------------------------------------
// Message schemas. Unknown extra keys are dropped (newer peers may add fields); known ones are strict.

export const uploadKeySchema = z
  .string()
  .regex(/^[A-Za-z0-9._-]{1,128}$/, 'key must match [A-Za-z0-9._-]{1,128}')
  .refine((k) => !/^\.+$/.test(k), 'key must not be only dots');
export const uploadKindSchema = z.enum(['base', 'base1', 'inc']);
export type UploadKind = z.infer<typeof uploadKindSchema>;

export const helloSchema = z.object({
  type: z.literal('hello'),
  protocol: z.number().int(),
  agentVersion: shortText(64),
  host: shortText(255),
});
export const openSchema = z.object({ type: z.literal('open'), vm: idSchema, disk: idSchema });
const xxh64Schema = z.string().regex(DIGEST_HEX.xxh64, 'xxh64 must be 16 lowercase hex digits');
export const putSchema = z.object({
  type: z.literal('put'),
  kind: uploadKindSchema,
  size: sizeSchema,
  key: uploadKeySchema,
  /** the digest `end` carries (lib/protocol/digest.ts); absent: sha256, as agents before the choice send */
  digest: z.enum(DIGEST_ALGS).optional(),
  sha256: sha256Schema.optional(),
});
/** `end` carries the digest of the put's algorithm (exactly one); the receiver checks which. */
export const endSchema = z
  .object({ type: z.literal('end'), sha256: sha256Schema.optional(), xxh64: xxh64Schema.optional() })
  .refine((m) => (m.sha256 === undefined) !== (m.xxh64 === undefined), 'end carries exactly one digest (sha256 or xxh64)');
const publishCommon = {
  type: z.literal('publish'),
  checkpoint: checkpointSchema.nullable(),
  capturedAt: epochSchema,
  consistency: consistencySchema,
  /** Ignored by the receiver (it records the authenticated writer); still sent because older receivers require it. */
  sourceHost: shortText(255).optional(),
};
export const publishFullSchema = z.object({
  ...publishCommon,
  mode: z.literal('full'),
  base: uploadKeySchema.optional(),
  base1: uploadKeySchema,
});
export const publishIncrementalSchema = z.object({
  ...publishCommon,
  mode: z.literal('incremental'),
  checkpoint: checkpointSchema,
  parentCheckpoint: checkpointSchema,
  inc: uploadKeySchema,
});
/** Position in the (vm, disk) order of `status`: the next page starts after it. */
export const statusCursorSchema = z.object({ vm: idSchema, disk: idSchema });
export type StatusCursor = z.infer<typeof statusCursorSchema>;
/**
 * `after` present (null for the first page) asks for one page that fits a control frame; the reply's
 * `next` is where to continue (null: that was the last page). Without `after` (agents before paging) the
 * whole list is sent when it fits, else the request fails with E_INTERNAL (never blamed on the client).
 */
export const statusSchema = z.object({ type: z.literal('status'), vm: idSchema.optional(), after: statusCursorSchema.nullable().optional() });
/**
 * The open disk's lineage is released by its owner to the host `to` (a live migration's destination) for
 * `ttlSec` seconds. Who releases is the session's authenticated identity, never a field of this message.
 */
export const releaseSchema = z.object({
  type: z.literal('release'),
  to: shortText(255).refine((v) => v.length > 0, 'recipient must not be empty'),
  ttlSec: z.number().int().min(1).max(RELEASE_MAX_TTL_SEC),
});
export const closeSchema = z.object({ type: z.literal('close') });
export const byeSchema = z.object({ type: z.literal('bye') });

export type HelloMessage = z.infer<typeof helloSchema>;
export type OpenMessage = z.infer<typeof openSchema>;
export type PutMessage = z.infer<typeof putSchema>;
export type EndMessage = z.infer<typeof endSchema>;
export type PublishFullMessage = z.infer<typeof publishFullSchema>;
export type PublishIncrementalMessage = z.infer<typeof publishIncrementalSchema>;
export type StatusMessage = z.infer<typeof statusSchema>;
export type ReleaseMessage = z.infer<typeof releaseSchema>;
export type ClientMessage =
  | HelloMessage
  | OpenMessage
  | PutMessage
  | EndMessage
  | PublishFullMessage
  | PublishIncrementalMessage
  | StatusMessage
  | ReleaseMessage
  | z.infer<typeof closeSchema>
  | z.infer<typeof byeSchema>;

function describeZodError(err: z.ZodError): string {
  return err.issues.map((i) => `${i.path.join('.') || '(message)'}: ${i.message}`).join('; ');
}

function parseWith<T>(schema: z.ZodType<T>, value: unknown, what: string): T {
  const r = schema.safeParse(value);
  if (!r.success) {
    const first = r.error.issues[0];
    throw new OnestorError(ErrorCodes.PROTOCOL, `invalid ${what}: ${describeZodError(r.error)}`, {
      field: first ? first.path.join('.') : undefined,
    });
  }
  return r.data;
}

/** Validates a decoded control message sent by the agent. */
export function parseClientMessage(value: unknown): ClientMessage {
  const type = (value as { type?: unknown } | null)?.type;
  switch (type) {
    case 'hello':
      return parseWith(helloSchema, value, 'hello');
    case 'open':
      return parseWith(openSchema, value, 'open');
    case 'put':
      return parseWith(putSchema, value, 'put');
    case 'end':
      return parseWith(endSchema, value, 'end');
    case 'publish': {
      const mode = (value as { mode?: unknown }).mode;
      if (mode === 'full') return parseWith(publishFullSchema, value, 'publish');
      if (mode === 'incremental') return parseWith(publishIncrementalSchema, value, 'publish');
      throw new OnestorError(ErrorCodes.PROTOCOL, `invalid publish: unknown mode ${JSON.stringify(mode)}`, { field: 'mode' });
    }
    case 'status':
      return parseWith(statusSchema, value, 'status');
    case 'release':
      return parseWith(releaseSchema, value, 'release');
    case 'close':
      return parseWith(closeSchema, value, 'close');
    case 'bye':
      return parseWith(byeSchema, value, 'bye');
    default:
      throw new OnestorError(ErrorCodes.PROTOCOL, `unknown message type ${JSON.stringify(type)}`, { field: 'type' });
  }
}

// Replies (receiver -> agent)
const errorCodeValues = Object.values(ErrorCodes) as [string, ...string[]];
export const errorReplySchema = z.object({
  type: z.literal('error'),
  // Any code-shaped value: a newer receiver may answer with a code this agent does not know yet.
  code: z.string().regex(/^E_[A-Z_]{1,40}$/),
  message: z.string().max(8192),
});
export const helloOkSchema = z.object({
  type: z.literal('ok'),
  protocol: z.literal(PROTOCOL_VERSION),
  receiverVersion: z.string().max(64),
  maxChunk: z.number().int().min(1).max(MAX_DATA_BYTES),
  snapsDirFree: sizeSchema,
  snapsDirUsedPercent: z.number().min(0).max(100),
  /** The writer as the replica authenticated it; absent from receivers that predate ownership. */
  identity: shortText(255).optional(),
  /** digests it verifies besides sha256 (names it does not know are ignored); absent: sha256 only */
  digests: z.array(z.string().max(32)).max(16).optional(),
});
export const fileDigestSchema = z.object({ size: sizeSchema, sha256: sha256Schema });
export const openOkSchema = z.object({
  type: z.literal('ok'),
  manifest: replicaManifestSchema.nullable(),
  baseOnReplica: fileDigestSchema.nullable(),
});
export const putOkSchema = z.object({ type: z.literal('ok'), offset: sizeSchema });
export const endOkSchema = z.object({ type: z.literal('ok'), bytes: sizeSchema, sha256: sha256Schema.optional(), xxh64: xxh64Schema.optional() });
export const publishOkSchema = z.object({ type: z.literal('ok'), manifest: replicaManifestSchema });
export const statusOkSchema = z.object({
  type: z.literal('ok'),
  manifests: z.array(replicaManifestSchema).max(100_000),
  next: statusCursorSchema.nullable().optional(),
});
export const plainOkSchema = z.object({ type: z.literal('ok') });
export const releaseOkSchema = z.object({ type: z.literal('ok'), release: lineageReleaseSchema });

export type ErrorReply = z.infer<typeof errorReplySchema>;
export type HelloOk = z.infer<typeof helloOkSchema>;
export type OpenOk = z.infer<typeof openOkSchema>;
export type PutOk = z.infer<typeof putOkSchema>;
export type EndOk = z.infer<typeof endOkSchema>;
export type PublishOk = z.infer<typeof publishOkSchema>;
export type StatusOk = z.infer<typeof statusOkSchema>;
export type ReleaseOk = z.infer<typeof releaseOkSchema>;

/**
 * Validates a reply against the expected ok-schema. An error reply becomes the OnestorError it names
 * (the receiver's code), so callers catch the same codes on both sides of the wire.
 */
export function parseReply<T>(schema: z.ZodType<T>, value: unknown, what: string): T {
  if ((value as { type?: unknown } | null)?.type === 'error') {
    const err = parseWith(errorReplySchema, value, `error reply to ${what}`);
    if (!(errorCodeValues as string[]).includes(err.code)) throw new OnestorError(ErrorCodes.PROTOCOL, `replica: [${err.code}] ${err.message}`);
    throw new OnestorError(err.code as OnestorError['code'], `replica: ${err.message}`);
  }
  return parseWith(schema, value, `reply to ${what}`);
}

export function errorReply(code: string, message: string): ErrorReply {
  return { type: 'error', code: code as ErrorReply['code'], message: message.slice(0, 8192) };
}
