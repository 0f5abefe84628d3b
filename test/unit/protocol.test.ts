import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { errorCodeOf } from '../../lib/shared/errors.js';
import {
  FrameDecoder,
  MAX_CONTROL_BYTES,
  MAX_DATA_BYTES,
  encodeControl,
  encodeData,
  encodeFrameHeader,
  parseClientMessage,
  parseReply,
  putOkSchema,
  type DecodedFrame,
} from '../../lib/protocol/protocol.js';

function decodeAll(decoder: FrameDecoder, parts: Buffer[]): DecodedFrame[] {
  return parts.flatMap((p) => decoder.push(p));
}

/** Data pieces joined back per frame, controls as they are: what a consumer sees. */
function collapse(frames: DecodedFrame[]): unknown[] {
  const out: unknown[] = [];
  let pending: Buffer[] = [];
  for (const f of frames) {
    if (f.type === 'control') out.push(f.message);
    else {
      pending.push(f.chunk);
      if (f.frameEnd) {
        out.push(Buffer.concat(pending).toString('hex'));
        pending = [];
      }
    }
  }
  return out;
}

function codeOf(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    return errorCodeOf(e);
  }
  return 'no error';
}

describe('frame decoder', () => {
  const hello = { type: 'hello', protocol: 1, agentVersion: '0.1.0', host: 'hv1' };
  const payload = randomBytes(100_000);
  const stream = Buffer.concat([encodeControl(hello), ...encodeData(payload), encodeControl({ type: 'end', sha256: 'a'.repeat(64) })]);
  const expected = [hello, payload.toString('hex'), { type: 'end', sha256: 'a'.repeat(64) }];

  it('decodes a stream delivered whole, byte by byte, and split at every header offset', () => {
    expect(collapse(decodeAll(new FrameDecoder(), [stream]))).toEqual(expected);
    const bytes: Buffer[] = [];
    for (let i = 0; i < stream.length; i += 1) bytes.push(stream.subarray(i, i + 1));
    expect(collapse(decodeAll(new FrameDecoder(), bytes))).toEqual(expected);
    for (let cut = 1; cut < 80; cut++) {
      const d = new FrameDecoder();
      expect(collapse(decodeAll(d, [stream.subarray(0, cut), stream.subarray(cut)]))).toEqual(expected);
      expect(d.idle).toBe(true);
    }
  });

  it('hands data out without copying when a frame arrives whole', () => {
    const frames = new FrameDecoder().push(stream);
    const data = frames.find((f) => f.type === 'data');
    expect(data?.type === 'data' && data.chunk.buffer).toBe(stream.buffer);
  });

  it('accepts the maximum sizes and refuses one byte more, before buffering the payload', () => {
    expect(codeOf(() => new FrameDecoder().push(encodeFrameHeader(2, MAX_DATA_BYTES)))).toBe('no error');
    expect(codeOf(() => new FrameDecoder().push(encodeFrameHeader(2, MAX_DATA_BYTES + 1)))).toBe('E_PROTOCOL');
    expect(codeOf(() => new FrameDecoder().push(encodeFrameHeader(1, MAX_CONTROL_BYTES + 1)))).toBe('E_PROTOCOL');
    expect(codeOf(() => new FrameDecoder().push(encodeFrameHeader(1, 0xffffffff)))).toBe('E_PROTOCOL');
    expect(codeOf(() => encodeData(Buffer.alloc(MAX_DATA_BYTES + 1)))).toBe('E_PROTOCOL');
    expect(codeOf(() => encodeControl({ big: 'x'.repeat(MAX_CONTROL_BYTES) }))).toBe('E_PROTOCOL');
  });

  it('refuses unknown types, bad UTF-8, bad JSON, non-objects; stays failed afterwards', () => {
    for (const type of [0, 3, 255]) expect(codeOf(() => new FrameDecoder().push(encodeFrameHeader(type, 0)))).toBe('E_PROTOCOL');
    const control = (b: Buffer) => Buffer.concat([encodeFrameHeader(1, b.length), b]);
    for (const bad of [Buffer.from([0xff, 0xfe]), Buffer.from('{"a":'), Buffer.from('[1,2]'), Buffer.from('null'), Buffer.from('"s"'), Buffer.alloc(0)]) {
      expect(codeOf(() => new FrameDecoder().push(control(bad)))).toBe('E_PROTOCOL');
    }
    const d = new FrameDecoder();
    expect(codeOf(() => d.push(encodeFrameHeader(7, 1)))).toBe('E_PROTOCOL');
    expect(codeOf(() => d.push(encodeControl(hello)))).toBe('E_PROTOCOL');
  });

  it('reports a stream cut inside a header or a payload as truncated', () => {
    for (const cut of [1, 4, 5, 30, stream.length - 1]) {
      const d = new FrameDecoder();
      d.push(stream.subarray(0, cut));
      expect(codeOf(() => d.end())).toBe('E_PROTOCOL');
    }
    const d = new FrameDecoder();
    d.push(stream);
    expect(codeOf(() => d.end())).toBe('no error');
  });

  it('fuzz: random bytes and mutated valid streams only ever raise E_PROTOCOL, and always terminate', () => {
    for (let i = 0; i < 3000; i++) {
      const input = i % 2 === 0 ? randomBytes(1 + (i % 300)) : Buffer.from(stream.subarray(0, 200 + (i % 500)));
      if (i % 2 === 1) for (let k = 0; k < 3; k++) input[(i * 7 + k * 13) % input.length] = (i * 31 + k) & 0xff;
      const d = new FrameDecoder();
      let pos = 0;
      try {
        while (pos < input.length) {
          const step = 1 + ((i + pos) % 17);
          for (const f of d.push(input.subarray(pos, pos + step))) {
            if (f.type === 'control') {
              try {
                parseClientMessage(f.message);
              } catch (e) {
                expect(errorCodeOf(e)).toBe('E_PROTOCOL');
              }
            }
          }
          pos += step;
        }
        d.end();
      } catch (e) {
        expect(errorCodeOf(e)).toBe('E_PROTOCOL');
      }
    }
  });
});

describe('message schemas', () => {
  const ok = (m: unknown) => codeOf(() => parseClientMessage(m));
  it('accepts well-formed messages and drops unknown extra keys', () => {
    expect(parseClientMessage({ type: 'open', vm: 12, disk: 0, extra: 1 })).toEqual({ type: 'open', vm: 12, disk: 0 });
    expect(ok({ type: 'put', kind: 'base1', size: 2 ** 53 - 1, key: 'base1-ck_1.2', sha256: 'ab'.repeat(32) })).toBe('no error');
    expect(ok({ type: 'publish', mode: 'full', checkpoint: null, capturedAt: 1, consistency: 'crash-consistent', sourceHost: 'h', base1: 'k' })).toBe('no error');
    expect(
      ok({ type: 'publish', mode: 'incremental', parentCheckpoint: 'a', checkpoint: 'b', capturedAt: 1, consistency: 'filesystem-frozen', sourceHost: 'h', inc: 'k' }),
    ).toBe('no error');
  });

  it('refuses ids that are not integers 0..2^31-1 (no strings, no traversal)', () => {
    for (const vm of ['1', '../1', -1, 1.5, 2 ** 31, NaN, null, [1], { a: 1 }, 1e300]) expect(ok({ type: 'open', vm, disk: 0 })).toBe('E_PROTOCOL');
    expect(ok({ type: 'open', vm: 2 ** 31 - 1, disk: 0 })).toBe('no error');
  });

  it('refuses bad keys, sizes, digests, kinds, modes, types', () => {
    const put = { type: 'put', kind: 'inc', size: 1, key: 'k' };
    for (const key of ['', '.', '..', '../x', 'a/b', 'a b', 'x'.repeat(129), 'ü']) expect(ok({ ...put, key })).toBe('E_PROTOCOL');
    for (const size of [-1, 1.5, 2 ** 53 + 2, '1']) expect(ok({ ...put, size })).toBe('E_PROTOCOL');
    for (const sha256 of ['A'.repeat(64), 'a'.repeat(63), 'g'.repeat(64)]) expect(ok({ ...put, sha256 })).toBe('E_PROTOCOL');
    expect(ok({ ...put, kind: 'disk' })).toBe('E_PROTOCOL');
    // digests: only the known names; `end` carries exactly one digest, well-formed
    for (const digest of ['md5', 'XXH64', '', 'sha256 ', 7]) expect(ok({ ...put, digest })).toBe('E_PROTOCOL');
    expect(ok({ ...put, digest: 'xxh64' })).toBe('no error');
    for (const end of [{}, { sha256: 'a'.repeat(64), xxh64: 'a'.repeat(16) }, { xxh64: 'a'.repeat(15) }, { xxh64: 'A'.repeat(16) }, { xxh64: 'a'.repeat(64) }, { sha256: 'a'.repeat(16) }]) {
      expect(ok({ type: 'end', ...end })).toBe('E_PROTOCOL');
    }
    expect(ok({ type: 'end', xxh64: '0123456789abcdef' })).toBe('no error');
    expect(ok({ type: 'publish', mode: 'other' })).toBe('E_PROTOCOL');
    expect(ok({ type: 'rm -rf' })).toBe('E_PROTOCOL');
    expect(ok({ type: 'publish', mode: 'incremental', parentCheckpoint: 'a/../b', checkpoint: 'b', capturedAt: 1, consistency: 'crash-consistent', sourceHost: 'h', inc: 'k' })).toBe(
      'E_PROTOCOL',
    );
    expect(ok({ type: 'hello', protocol: 1, agentVersion: 'x', host: 'evil\nline' })).toBe('E_PROTOCOL');
  });

  it('turns an error reply into the OnestorError with the receiver code', () => {
    expect(codeOf(() => parseReply(putOkSchema, { type: 'error', code: 'E_NOSPACE', message: 'full' }, 'put'))).toBe('E_NOSPACE');
    expect(codeOf(() => parseReply(putOkSchema, { type: 'error', code: 'E_MADE_UP', message: 'x' }, 'put'))).toBe('E_PROTOCOL');
    expect(parseReply(putOkSchema, { type: 'ok', offset: 5 }, 'put')).toEqual({ type: 'ok', offset: 5 });
    expect(codeOf(() => parseReply(putOkSchema, { type: 'ok', offset: -5 }, 'put'))).toBe('E_PROTOCOL');
  });
});
