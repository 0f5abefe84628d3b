/**
 * The recover drill, written from OpenNebula's recovery path and NOT from agent code: check both
 * files exist (`test -f`), tar `disk.N` and the WHOLE `disk.N.snap/` directory to a fresh place the way
 * the driver ships them to a new host, then check the image and read the guest view.
 */
import { mkdir, stat, lstat, readlink } from 'node:fs/promises';
import path from 'node:path';
import { run } from '../lib/shared/exec.js';
import { readGuestView } from './guest.js';

export interface DrillResult {
  dir: string;
  /** DEST/disk.N as recovery leaves it */
  diskPath: string;
  base1Path: string;
  backingName: string | undefined;
  check: { ok: boolean; raw: string };
  /** raw guest view of the recovered disk */
  rawPath: string;
}

export async function recoverDrill(snapsDir: string, vmId: number, diskId: number, destRoot: string): Promise<DrillResult> {
  const src = path.join(snapsDir, String(vmId));
  const snap = `disk.${diskId}.snap`;
  for (const f of ['base', 'base.1']) {
    const st = await stat(path.join(src, snap, f));
    if (!st.isFile()) throw new Error(`${snap}/${f} is not a regular file on the replica`);
  }
  const dir = path.join(destRoot, `recovered-${vmId}-${diskId}-${Date.now()}`);
  await mkdir(dir, { recursive: true });
  const tar = await run('bash', ['-c', 'set -o pipefail; tar -C "$1" -cf - "$2" "$3" | tar -C "$4" -xf -', 'drill', src, `disk.${diskId}`, snap, dir]);
  if (tar.code !== 0) throw new Error(`tar failed: ${tar.stderr}`);
  const diskPath = path.join(dir, `disk.${diskId}`);
  if (!(await lstat(diskPath)).isSymbolicLink() || (await readlink(diskPath)) !== `${snap}/base.1`) {
    throw new Error(`disk.${diskId} is not a link to ${snap}/base.1`);
  }
  const base1Path = path.join(dir, snap, 'base.1');
  const info = await run('qemu-img', ['info', '--output=json', base1Path]);
  if (info.code !== 0) throw new Error(`qemu-img info: ${info.stderr}`);
  const backingName = (JSON.parse(info.stdout) as { 'backing-filename'?: string })['backing-filename'];
  const chk = await run('qemu-img', ['check', diskPath]);
  const rawPath = path.join(dir, `guest-${diskId}.raw`);
  await readGuestView(diskPath, rawPath);
  return { dir, diskPath, base1Path, backingName, check: { ok: chk.code === 0, raw: chk.stdout + chk.stderr }, rawPath };
}
