/**
 * Simulated guest I/O on a running test domain (the guests have no OS). HMP `qemu-io` on the disk's
 * virtio backend goes through the same block node the guest uses, so writes land in the live chain exactly
 * as guest writes would (and taint the domain, which is fine for tests).
 *
 * HMP's reply is empty even when the I/O fails: qemu-io prints its result ("wrote N/N bytes at offset X",
 * "write failed: ...") to QEMU's stderr, i.e. the domain log (stdio_handler=file). So every call reads the
 * log from where it was before the command and fails unless the expected success line is there.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { open, rm, stat } from 'node:fs/promises';
import { run } from '../lib/shared/exec.js';
import type { Libvirtd } from './libvirtd.js';
import { assertRegion, domainDisks } from './one-layout.js';

export interface GuestRegion {
  /** vda (default), vdb, ... */
  target?: string;
  offsetMiB: number;
  lengthMiB: number;
  /**
   * Leave the write in QEMU's caches. By default each call flushes, because QEMU keeps qcow2 metadata
   * (L2 tables) in memory: without a flush, `qemu-img -U` readers of the file (readGuestView) miss the
   * write. The guest's own view and the backup API, which read through QEMU, see it either way.
   */
  noFlush?: boolean;
}

const MiB = 1024 * 1024;

/** Fills [offset, offset+length) of the guest disk with `pattern`. */
export async function guestWrite(lv: Libvirtd, domain: string, r: GuestRegion & { pattern: number }): Promise<void> {
  assertRegion(r);
  const p = `0x${r.pattern.toString(16).padStart(2, '0')}`;
  await qemuIo(lv, domain, r.target ?? 'vda', `write -P ${p} ${r.offsetMiB}M ${r.lengthMiB}M`, wroteLine(r));
  if (!r.noFlush) await guestFlush(lv, domain, r.target ?? 'vda');
}

/** Writes zeroes the way a guest's WRITE ZEROES does (`write -z`): may leave zero clusters, not data. */
export async function guestZero(lv: Libvirtd, domain: string, r: GuestRegion): Promise<void> {
  assertRegion({ ...r, pattern: 0 });
  await qemuIo(lv, domain, r.target ?? 'vda', `write -z ${r.offsetMiB}M ${r.lengthMiB}M`, wroteLine(r));
  if (!r.noFlush) await guestFlush(lv, domain, r.target ?? 'vda');
}

/** Discards (TRIM) the region. */
export async function guestDiscard(lv: Libvirtd, domain: string, r: GuestRegion): Promise<void> {
  assertRegion({ ...r, pattern: 0 });
  const bytes = r.lengthMiB * MiB;
  const expect = new RegExp(`^discard ${bytes}/${bytes} bytes at offset ${r.offsetMiB * MiB}$`, 'm');
  await qemuIo(lv, domain, r.target ?? 'vda', `discard ${r.offsetMiB}M ${r.lengthMiB}M`, expect);
  if (!r.noFlush) await guestFlush(lv, domain, r.target ?? 'vda');
}

/** Flushes the disk's cache down to the image file. */
export async function guestFlush(lv: Libvirtd, domain: string, target = 'vda'): Promise<void> {
  await qemuIo(lv, domain, target, 'flush', null);
}

function wroteLine(r: GuestRegion): RegExp {
  const bytes = r.lengthMiB * MiB;
  return new RegExp(`^wrote ${bytes}/${bytes} bytes at offset ${r.offsetMiB * MiB}$`, 'm');
}

/** QOM path of the virtio backend of `target`, from the alias libvirt gave the device in the live XML. */
export async function qomBackendPath(lv: Libvirtd, domain: string, target: string): Promise<string> {
  const disks = await domainDisks(lv, domain);
  const disk = disks.find((d) => d.target === target);
  if (!disk) throw new Error(`domain ${domain} has no disk ${target} (has ${disks.map((d) => d.target).join(', ') || 'none'})`);
  if (!/^virtio-disk\d+$/.test(disk.alias)) throw new Error(`domain ${domain} disk ${target}: unexpected alias '${disk.alias}'`);
  return `/machine/peripheral/${disk.alias}/virtio-backend`;
}

async function qemuIo(lv: Libvirtd, domain: string, target: string, command: string, success: RegExp | null): Promise<void> {
  const device = await qomBackendPath(lv, domain, target);
  const logPath = lv.qemuLogPath(domain);
  const before = await fileSize(logPath);
  const hmp = `qemu-io -d ${device} "${command}"`;
  const r = await lv.virsh(['qemu-monitor-command', domain, '--hmp', hmp], { timeoutMs: 60_000 });
  const reply = (r.stdout + r.stderr).trim();
  if (r.code !== 0 || /error|not found|failed/i.test(reply)) {
    throw new Error(`${domain} ${target}: HMP ${hmp} failed: ${reply}`);
  }
  // stderr is unbuffered and the command ran synchronously, but give the file a moment anyway.
  let output = '';
  for (let i = 0; i < 40; i++) {
    output = await readFrom(logPath, before);
    if (/failed|error|not found/i.test(output)) break;
    if (success === null || success.test(output)) break;
    await new Promise((res) => setTimeout(res, 50));
  }
  if (/failed|error|not found/i.test(output) || (success !== null && !success.test(output))) {
    throw new Error(`${domain} ${target}: qemu-io "${command}" did not succeed; QEMU said: ${output.trim() || '(nothing)'}`);
  }
}

async function fileSize(path: string): Promise<number> {
  try {
    return (await stat(path)).size;
  } catch {
    return 0;
  }
}

async function readFrom(path: string, offset: number): Promise<string> {
  const fh = await open(path, 'r');
  try {
    const size = (await fh.stat()).size;
    if (size <= offset) return '';
    const buf = Buffer.alloc(size - offset);
    await fh.read(buf, 0, buf.length, offset);
    return buf.toString('utf8');
  } finally {
    await fh.close();
  }
}

/**
 * What the guest would read: the whole (possibly live, hence -U) chain flattened to a raw file.
 * Relative backing names resolve from the image's own directory, as QEMU does.
 */
export async function readGuestView(imagePath: string, outRawPath: string): Promise<void> {
  const r = await run('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', imagePath, outRawPath], { timeoutMs: 300_000 });
  if (r.code !== 0) throw new Error(`qemu-img convert of ${imagePath} failed: ${r.stderr.trim()}`);
}

export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 4 * MiB })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** Bytes [offsetMiB, offsetMiB+lengthMiB) of a raw file, for region comparisons. */
export async function readRegion(rawPath: string, offsetMiB: number, lengthMiB: number): Promise<Buffer> {
  const fh = await open(rawPath, 'r');
  try {
    const buf = Buffer.alloc(lengthMiB * MiB);
    const { bytesRead } = await fh.read(buf, 0, buf.length, offsetMiB * MiB);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** True when every byte of `buf` is `value` (and buf is not empty). */
export function isFilledWith(buf: Buffer, value: number): boolean {
  if (buf.length === 0) return false;
  for (const b of buf) if (b !== value) return false;
  return true;
}

/** sha256 of what the guest sees now (a reference for one point in time); the raw copy is removed. */
export async function guestViewSha256(imagePath: string, scratchDir: string): Promise<string> {
  const raw = `${scratchDir.replace(/\/$/, '')}/view-${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2, 8)}.raw`;
  await readGuestView(imagePath, raw);
  try {
    return await sha256File(raw);
  } finally {
    await rm(raw, { force: true });
  }
}
