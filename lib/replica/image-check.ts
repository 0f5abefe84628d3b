/**
 * qemu-img checks of what a client sent, before anything is published. Always `-f qcow2`: never let qemu-img
 * probe the format of a client's file.
 */
import type { PutMessage } from '../protocol/protocol.js';
import { ErrorCodes, OnestorError, type ErrorContext } from '../shared/errors.js';
import { run } from '../shared/exec.js';
import { ctx, expectedBackingName, type ReplicaPaths } from './layout.js';
import { checkOverlayAlone } from './overlay-check.js';

export interface QemuInfo {
  format?: string;
  'virtual-size'?: number;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific'?: { type?: string; data?: { 'data-file'?: string; corrupt?: boolean } };
}

export async function qemuInfo(qemuImg: string, file: string, c: ErrorContext): Promise<QemuInfo> {
  // -f qcow2: never let qemu-img probe the format of a file a client sent.
  const r = await run(qemuImg, ['info', '--output=json', '-f', 'qcow2', file], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new OnestorError(ErrorCodes.QEMU_IMG, `not a usable qcow2 image: ${r.stderr.trim()}`, { ...c, file });
  try {
    return JSON.parse(r.stdout) as QemuInfo;
  } catch {
    throw new OnestorError(ErrorCodes.QEMU_IMG, 'qemu-img info printed invalid JSON', { ...c, file });
  }
}

export function refuseExternalData(info: QemuInfo, file: string, c: ErrorContext): void {
  if (info['format-specific']?.data?.['data-file'] !== undefined) {
    throw new OnestorError(ErrorCodes.QEMU_IMG, 'qcow2 with an external data file refused', { ...c, file });
  }
  if (info['format-specific']?.data?.corrupt) throw new OnestorError(ErrorCodes.QEMU_IMG, 'qcow2 marked corrupt', { ...c, file });
}

/** base.1 must be a qcow2 whose stored backing is exactly `disk.N.snap/base` (qcow2): what recovery expects. */
export async function checkUploadedBase1(p: ReplicaPaths, qemuImg: string, file: string): Promise<QemuInfo> {
  const c = ctx(p);
  const info = await qemuInfo(qemuImg, file, c);
  refuseExternalData(info, file, c);
  if (info.format !== 'qcow2') throw new OnestorError(ErrorCodes.QEMU_IMG, `base.1 is ${info.format}, not qcow2`, { ...c, file });
  const want = expectedBackingName(p.disk);
  if (info['backing-filename'] !== want) {
    throw new OnestorError(ErrorCodes.QEMU_IMG, `base.1 backing name is ${JSON.stringify(info['backing-filename'] ?? null)}, expected ${want}`, {
      ...c,
      file,
      field: 'backing-filename',
    });
  }
  if (info['backing-filename-format'] !== 'qcow2') {
    throw new OnestorError(ErrorCodes.QEMU_IMG, `base.1 backing format is ${JSON.stringify(info['backing-filename-format'] ?? null)}, expected qcow2`, {
      ...c,
      file,
      field: 'backing-filename-format',
    });
  }
  return info;
}

/** base is the image copy: a qcow2 with no backing file of its own (a backing would point anywhere). */
export async function checkUploadedBase(p: ReplicaPaths, qemuImg: string, file: string): Promise<void> {
  const c = ctx(p);
  const info = await qemuInfo(qemuImg, file, c);
  refuseExternalData(info, file, c);
  if (info['backing-filename'] !== undefined) {
    throw new OnestorError(ErrorCodes.QEMU_IMG, `base has a backing file (${info['backing-filename']}); refused`, { ...c, file });
  }
}

export async function checkIncrement(p: ReplicaPaths, qemuImg: string, file: string): Promise<void> {
  const c = ctx(p);
  const info = await qemuInfo(qemuImg, file, c);
  refuseExternalData(info, file, c);
}

export async function qemu(qemuImg: string, args: string[], c: ErrorContext, what: string): Promise<void> {
  const r = await run(qemuImg, args, { timeoutMs: 3_600_000 });
  if (r.code !== 0) throw new OnestorError(ErrorCodes.QEMU_IMG, `${what} failed (exit ${r.code}): ${r.stderr.trim()}`, c);
}


export async function checkImage(p: ReplicaPaths, qemuImg: string, file: string): Promise<void> {
  const r = await run(qemuImg, ['check', '-f', 'qcow2', file], { timeoutMs: 3_600_000 });
  // 0 = clean, 3 = leaked clusters only (wasted space, data intact); anything else is corruption or failure.
  if (r.code !== 0 && r.code !== 3) {
    throw new OnestorError(ErrorCodes.QEMU_IMG, `qemu-img check failed (exit ${r.code}): ${(r.stdout + r.stderr).trim().slice(0, 500)}`, ctx(p, { file }));
  }
}

/**
 * Every check publish needs of one verified upload, by its kind: base.1 is checked alone (metadata) and for
 * its backing name (its info is returned: the manifest records the virtual size); base has no backing; an
 * increment has no external data file. The two checks of base.1 run side by side; when both fail, the
 * check's error is the one reported (as when they ran one after the other).
 */
export async function checkUploadedImage(p: ReplicaPaths, qemuImg: string, kind: PutMessage['kind'], file: string): Promise<QemuInfo | null> {
  if (kind === 'base') {
    await checkUploadedBase(p, qemuImg, file);
    return null;
  }
  if (kind === 'inc') {
    await checkIncrement(p, qemuImg, file);
    return null;
  }
  const [alone, info] = await Promise.allSettled([checkOverlayAlone(p, qemuImg, file), checkUploadedBase1(p, qemuImg, file)]);
  if (alone.status === 'rejected') throw alone.reason;
  if (info.status === 'rejected') throw info.reason;
  return info.value;
}

/**
 * checkUploadedImage started now, for publish to await later: a rejection nobody awaits (the session ended
 * before its publish) must not count as unhandled, so one handler is attached here; awaiting the returned
 * promise still throws the error.
 */
export function startImageCheck(p: ReplicaPaths, qemuImg: string, kind: PutMessage['kind'], file: string): Promise<QemuInfo | null> {
  const verdict = checkUploadedImage(p, qemuImg, kind, file);
  verdict.catch(() => {});
  return verdict;
}
