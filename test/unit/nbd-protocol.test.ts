/**
 * The sans-IO NBD client core on a byte stream captured from a real `qemu-nbd -r -A` session
 * (test/fixtures/nbd/qemu-nbd-session.bin: everything the server sent) and on hostile input.
 */
import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_READ,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_STRUCTURED_REPLY_MAGIC,
  NbdHandshake,
  NbdReplyParser,
  type ReplyEvent,
} from '../../lib/libvirt/nbd-protocol.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const capture = readFileSync(path.join(here, '..', 'fixtures', 'nbd', 'qemu-nbd-session.bin'));
const CONTEXTS = ['base:allocation', 'qemu:allocation-depth'];
const SIZE = 64 << 20;

/** Feeds `bytes` in pieces of `step` (1 = byte by byte): a stream may be split anywhere. */
function handshake(bytes: Buffer, step: number) {
  const hs = new NbdHandshake('e1', CONTEXTS);
  const sent: Buffer[] = [];
  let used = 0;
  while (!hs.result && used < bytes.length) {
    const n = Math.min(step, bytes.length - used);
    sent.push(...hs.push(bytes.subarray(used, used + n)));
    used += n;
  }
  return { hs, sent, used };
}

/** The requests the recording client made, in order (cookies 1..5). */
function expectCaptured(p: NbdReplyParser) {
  p.expect(1n, NBD_CMD_BLOCK_STATUS, 0, SIZE);
  p.expect(2n, NBD_CMD_BLOCK_STATUS, 0, SIZE);
  p.expect(3n, NBD_CMD_READ, (1 << 20) - 2048, 4096);
  p.expect(4n, NBD_CMD_READ, 0, 1024);
  p.expect(5n, NBD_CMD_READ, 8 << 20, 1024);
}

function chunkHeader(flags: number, type: number, cookie: bigint, length: number): Buffer {
  const b = Buffer.alloc(20);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(length, 16);
  return b;
}
function dataChunk(cookie: bigint, offset: number, data: Buffer, done = true): Buffer {
  const o = Buffer.alloc(8);
  o.writeBigUInt64BE(BigInt(offset));
  return Buffer.concat([chunkHeader(done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + data.length), o, data]);
}
function holeChunk(cookie: bigint, offset: number, len: number, done = true): Buffer {
  const p = Buffer.alloc(12);
  p.writeBigUInt64BE(BigInt(offset));
  p.writeUInt32BE(len, 8);
  return Buffer.concat([chunkHeader(done ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12), p]);
}
function statusChunk(cookie: bigint, id: number, extents: Array<[number, number]>): Buffer {
  const p = Buffer.alloc(4 + 8 * extents.length);
  p.writeUInt32BE(id, 0);
  extents.forEach(([l, f], i) => {
    p.writeUInt32BE(l, 4 + i * 8);
    p.writeUInt32BE(f, 8 + i * 8);
  });
  return Buffer.concat([chunkHeader(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, p.length), p]);
}

describe('NBD handshake (captured from qemu-nbd)', () => {
  for (const step of [1, 7, 4096]) {
    it(`negotiates structured replies, both meta contexts and the export, fed ${step} byte(s) at a time`, () => {
      const { hs, sent } = handshake(capture, step);
      expect(hs.result).not.toBeNull();
      expect(hs.result!.size).toBe(SIZE);
      expect([...hs.result!.contexts.entries()]).toEqual([
        ['base:allocation', 0],
        ['qemu:allocation-depth', 1],
      ]);
      expect(hs.result!.blockSize).toEqual({ minimum: 1, preferred: 4096, maximum: 32 << 20 });
      // client flags, then STRUCTURED_REPLY (8), SET_META_CONTEXT (10), GO (7)
      const opts = sent.filter((b) => b.length >= 16 && b.readBigUInt64BE(0) === 0x49484156454f5054n).map((b) => b.readUInt32BE(8));
      expect(opts).toEqual([8, 10, 7]);
      expect(sent[0]!.readUInt32BE(0)).toBe(3);
    });
  }

  it('refuses a server that is not NBD', () => {
    const bad = Buffer.from(capture);
    bad.write('SSH-2.0-', 0);
    expect(() => new NbdHandshake('e1', CONTEXTS).push(bad)).toThrow(/bad greeting magic/);
  });

  it('refuses old-style negotiation and servers without fixed newstyle', () => {
    const g = Buffer.from(capture.subarray(0, 18));
    g.writeBigUInt64BE(0x00420281861253n, 8);
    expect(() => new NbdHandshake('e1', CONTEXTS).push(g)).toThrow(/newstyle/);
    const g2 = Buffer.from(capture.subarray(0, 18));
    g2.writeUInt16BE(0, 16);
    expect(() => new NbdHandshake('e1', CONTEXTS).push(g2)).toThrow(/fixed newstyle/);
  });

  it('refuses an option reply with a wrong magic or an oversized length', () => {
    const m = Buffer.from(capture.subarray(0, 38));
    m.writeUInt32BE(0xdeadbeef, 18);
    expect(() => new NbdHandshake('e1', CONTEXTS).push(m)).toThrow(/bad option reply magic/);
    const l = Buffer.from(capture.subarray(0, 38));
    l.writeUInt32BE(0x7fffffff, 34);
    expect(() => new NbdHandshake('e1', CONTEXTS).push(l)).toThrow(/exceeds/);
  });

  it('reports the server refusing the export by name, and stays failed', () => {
    const hs = new NbdHandshake('nope', []);
    hs.push(capture.subarray(0, 18));
    const ack = Buffer.alloc(20);
    ack.writeBigUInt64BE(0x3e889045565a9n, 0);
    ack.writeUInt32BE(8, 8);
    ack.writeUInt32BE(1, 12);
    hs.push(ack);
    const ack2 = Buffer.from(ack);
    ack2.writeUInt32BE(10, 8);
    hs.push(ack2);
    const err = Buffer.alloc(20 + 7);
    err.writeBigUInt64BE(0x3e889045565a9n, 0);
    err.writeUInt32BE(7, 8);
    err.writeUInt32BE(0x80000006, 12); // NBD_REP_ERR_UNKNOWN
    err.writeUInt32BE(7, 16);
    err.write('unknown', 20);
    expect(() => hs.push(err)).toThrow(/refused export "nope".*unknown/);
    expect(() => hs.push(Buffer.alloc(1))).toThrow(/already failed/);
  });

  it('refuses a meta context it did not ask for', () => {
    const hs = new NbdHandshake('e1', ['base:allocation']);
    expect(() => hs.push(capture)).toThrow(/did not ask for/);
  });
});

describe('NBD transmission replies (captured from qemu-nbd)', () => {
  const { hs } = handshake(capture, capture.length);
  const replies = hs.leftover();

  for (const step of [1, 13, 1 << 20]) {
    it(`decodes block status and reads fed ${step} byte(s) at a time`, () => {
      const p = new NbdReplyParser(SIZE, new Set([0, 1]));
      expectCaptured(p);
      const ev: ReplyEvent[] = [];
      for (let i = 0; i < replies.length; i += step) ev.push(...p.push(replies.subarray(i, i + step)));
      p.end();
      const status = ev.filter((e) => e.kind === 'status') as Extract<ReplyEvent, { kind: 'status' }>[];
      const alloc = status.find((s) => s.cookie === 1n && s.contextId === 0)!;
      expect(alloc.extents).toEqual([
        { offset: 0, length: 1 << 20, flags: 3 },
        { offset: 1 << 20, length: 3 << 20, flags: 0 },
        { offset: 4 << 20, length: 60 << 20, flags: 3 },
      ]);
      const depth = status.find((s) => s.cookie === 1n && s.contextId === 1)!;
      expect(depth.extents.map((e) => e.flags)).toEqual([0, 1, 0, 1, 0]);
      // read 3 straddles the start of the 0x55 region: 2048 zero bytes then 2048 x 0x55
      const buf = Buffer.alloc(4096, 0xee);
      for (const e of ev) {
        if (e.cookie !== 3n) continue;
        if (e.kind === 'data') e.data.copy(buf, e.offset - ((1 << 20) - 2048));
        if (e.kind === 'hole') buf.fill(0, e.offset - ((1 << 20) - 2048), e.offset - ((1 << 20) - 2048) + e.length);
      }
      expect(buf.subarray(0, 2048).every((b) => b === 0)).toBe(true);
      expect(buf.subarray(2048).every((b) => b === 0x55)).toBe(true);
      expect(ev.filter((e) => e.kind === 'done').map((e) => e.cookie)).toEqual([1n, 2n, 3n, 4n, 5n]);
      expect(p.pending).toBe(0);
    });
  }

  it('keeps nothing of a pushed buffer: a socket may read every reply into one reused buffer', () => {
    const p = new NbdReplyParser(SIZE, new Set([0, 1]));
    expectCaptured(p);
    const shared = Buffer.alloc(37); // odd size: headers and payloads straddle pushes
    const read3 = Buffer.alloc(4096, 0xee);
    const done: bigint[] = [];
    for (let i = 0; i < replies.length; i += shared.length) {
      const n = replies.copy(shared, 0, i, i + shared.length);
      for (const e of p.push(shared.subarray(0, n))) {
        if (e.kind === 'data' && e.cookie === 3n) e.data.copy(read3, e.offset - ((1 << 20) - 2048));
        if (e.kind === 'hole' && e.cookie === 3n) read3.fill(0, e.offset - ((1 << 20) - 2048), e.offset - ((1 << 20) - 2048) + e.length);
        if (e.kind === 'done') done.push(e.cookie);
      }
      shared.fill(0xa5); // the "socket" overwrites its buffer before the next read
    }
    p.end();
    expect(done).toEqual([1n, 2n, 3n, 4n, 5n]);
    expect(read3.subarray(0, 2048).every((b) => b === 0)).toBe(true);
    expect(read3.subarray(2048).every((b) => b === 0x55)).toBe(true);
  });

  it('a reply cut short is an error at end of stream (truncated)', () => {
    const p = new NbdReplyParser(SIZE, new Set([0, 1]));
    expectCaptured(p);
    p.push(replies.subarray(0, replies.length - 5));
    expect(() => p.end()).toThrow(/truncated/);
  });

  it('wrong reply magic', () => {
    const p = new NbdReplyParser(SIZE, new Set([0]));
    p.expect(1n, NBD_CMD_READ, 0, 512);
    const bad = dataChunk(1n, 0, Buffer.alloc(512));
    bad.writeUInt32BE(0x12345678, 0);
    expect(() => p.push(bad)).toThrow(/bad reply magic/);
    expect(() => p.push(Buffer.alloc(4))).toThrow(/bad reply magic/);
  });

  it('a reply for a cookie never sent', () => {
    const p = new NbdReplyParser(SIZE, new Set([0]));
    p.expect(1n, NBD_CMD_READ, 0, 512);
    expect(() => p.push(dataChunk(9n, 0, Buffer.alloc(512)))).toThrow(/unknown cookie/);
  });

  it('data outside the request, oversized data, overlapping and missing data', () => {
    const outside = new NbdReplyParser(SIZE, new Set([0]));
    outside.expect(1n, NBD_CMD_READ, 4096, 512);
    expect(() => outside.push(dataChunk(1n, 0, Buffer.alloc(512)))).toThrow(/outside its request/);

    const big = new NbdReplyParser(SIZE, new Set([0]));
    big.expect(1n, NBD_CMD_READ, 0, 512);
    // the header alone must be refused: a hostile length may not make us wait for (or buffer) gigabytes
    expect(() => big.push(chunkHeader(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 1n, 0xfffffff0))).toThrow(/data chunk of/);

    const overlap = new NbdReplyParser(SIZE, new Set([0]));
    overlap.expect(1n, NBD_CMD_READ, 0, 1024);
    expect(() => overlap.push(Buffer.concat([dataChunk(1n, 0, Buffer.alloc(600), false), holeChunk(1n, 512, 512)]))).toThrow(/overlapping/);

    const gap = new NbdReplyParser(SIZE, new Set([0]));
    gap.expect(1n, NBD_CMD_READ, 0, 1024);
    expect(() => gap.push(dataChunk(1n, 0, Buffer.alloc(512)))).toThrow(/answered with 512/);
  });

  it('block status: extents beyond the export, zero-length extents, unknown context, oversized payload', () => {
    const beyond = new NbdReplyParser(SIZE, new Set([0]));
    beyond.expect(1n, NBD_CMD_BLOCK_STATUS, SIZE - 4096, 4096);
    expect(() => beyond.push(statusChunk(1n, 0, [[8192, 0]]))).toThrow(/beyond the end of the export/);

    const zero = new NbdReplyParser(SIZE, new Set([0]));
    zero.expect(1n, NBD_CMD_BLOCK_STATUS, 0, 4096);
    expect(() => zero.push(statusChunk(1n, 0, [[0, 0]]))).toThrow(/zero-length extent/);

    const ctx = new NbdReplyParser(SIZE, new Set([0]));
    ctx.expect(1n, NBD_CMD_BLOCK_STATUS, 0, 4096);
    expect(() => ctx.push(statusChunk(1n, 7, [[4096, 0]]))).toThrow(/unknown context id 7/);

    const huge = new NbdReplyParser(SIZE, new Set([0]));
    huge.expect(1n, NBD_CMD_BLOCK_STATUS, 0, 4096);
    expect(() => huge.push(chunkHeader(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, 1n, 0x7ffffff0))).toThrow(/exceeds/);

    // more than asked is clipped to the request (servers may describe further)
    const more = new NbdReplyParser(SIZE, new Set([0]));
    more.expect(1n, NBD_CMD_BLOCK_STATUS, 0, 4096);
    const ev = more.push(statusChunk(1n, 0, [[65536, 2]]));
    expect(ev[0]).toEqual({ kind: 'status', cookie: 1n, contextId: 0, extents: [{ offset: 0, length: 4096, flags: 2 }] });
  });

  it('an error chunk fails only its request, with the server message', () => {
    const p = new NbdReplyParser(SIZE, new Set([0]));
    p.expect(1n, NBD_CMD_READ, 0, 512);
    const msg = Buffer.from('I/O error');
    const pay = Buffer.alloc(6 + msg.length);
    pay.writeUInt32BE(5, 0);
    pay.writeUInt16BE(msg.length, 4);
    msg.copy(pay, 6);
    const ev = p.push(Buffer.concat([chunkHeader(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 1n, pay.length), pay]));
    expect(ev).toEqual([
      { kind: 'error', cookie: 1n, errno: 5, message: 'I/O error' },
      { kind: 'done', cookie: 1n },
    ]);
    p.end();
  });

  it('refuses requests outside the export before sending them', () => {
    const p = new NbdReplyParser(SIZE, new Set([0]));
    expect(() => p.expect(1n, NBD_CMD_READ, SIZE - 10, 20)).toThrow(/outside the export/);
    expect(() => p.expect(2n, NBD_CMD_READ, 0, 0)).toThrow(/outside the export/);
  });
});
