/** The end-to-end digests (lib/protocol/digest.ts): known vectors, streaming = one shot, and who uses which. */
import { createHash, randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { digestFor, newDigest } from '../../lib/protocol/digest.js';

describe('digests', () => {
  it('known vectors (XXH64 seed 0, sha256)', async () => {
    const x = await newDigest('xxh64');
    expect(x.hex()).toBe('ef46db3751d8e999');
    const x2 = await newDigest('xxh64');
    x2.update(Buffer.from('abc'));
    expect(x2.hex()).toBe('44bc2cf5ad770999');
    const s = await newDigest('sha256');
    s.update(Buffer.from('abc'));
    expect(s.hex()).toBe('ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad');
  });

  it('fed in pieces of any size, the digest is that of the whole', async () => {
    const data = randomBytes(3 * 1024 * 1024 + 17);
    const whole = await newDigest('xxh64');
    whole.update(data);
    const expected = whole.hex();
    for (const piece of [1, 7, 4096, 65_537, 1 << 20]) {
      const d = await newDigest('xxh64');
      for (let at = 0; at < data.length; at += piece) d.update(data.subarray(at, at + piece));
      expect(d.hex()).toBe(expected);
    }
    const s = await newDigest('sha256');
    s.update(data);
    expect(s.hex()).toBe(createHash('sha256').update(data).digest('hex'));
  });

  it('base always with sha256; base.1 and increments with xxh64 only when the receiver offers it', () => {
    expect(digestFor('base', ['sha256', 'xxh64'])).toBe('sha256');
    expect(digestFor('base1', ['sha256', 'xxh64'])).toBe('xxh64');
    expect(digestFor('inc', ['xxh64'])).toBe('xxh64');
    // a receiver from before the choice says nothing; one with only names we do not know, the same
    expect(digestFor('base1', undefined)).toBe('sha256');
    expect(digestFor('inc', ['blake3'])).toBe('sha256');
  });
});
