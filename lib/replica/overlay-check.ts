/**
 * `qemu-img check` of an uploaded base.1 before it is published. A seed's overlay is written by the agent's
 * own qcow2 writer as it streams (not by qemu-img), so its metadata is checked here, on the file as received:
 * refcounts, L1/L2 tables, overlaps. The backing file is not opened (`backing: null`): the upload sits in a
 * temp dir where `disk.N.snap/base` does not resolve, and the check is about this file alone.
 */
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import { run } from '../shared/exec.js';
import { ctx, type ReplicaPaths } from './layout.js';

export function imageAloneSpec(file: string): string {
  return `json:${JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: file } })}`;
}

export async function checkOverlayAlone(p: ReplicaPaths, qemuImg: string, file: string): Promise<void> {
  const r = await run(qemuImg, ['check', '--output=json', imageAloneSpec(file)], { timeoutMs: 3_600_000 });
  // 0 = clean; 3 = leaked clusters only (space wasted, data intact); anything else is corruption or failure
  if (r.code !== 0 && r.code !== 3) {
    throw new OnestorError(ErrorCodes.QEMU_IMG, `qemu-img check of base.1 failed (exit ${r.code}): ${(r.stdout + r.stderr).trim().slice(0, 500)}`, ctx(p, { file }));
  }
}
