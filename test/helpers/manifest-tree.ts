/**
 * Many valid manifests on a real SNAPS tree without publishing each one: tiny base/base.1 files and a
 * manifest naming their identities, exactly what readValidManifest checks. For status/paging tests.
 */
import * as fsp from 'node:fs/promises';
import { replicaPaths } from '../../lib/replica/layout.js';
import { identityOf } from '../../lib/replica/manifest.js';

/** Writes vms x disks manifests (VM ids vm*7, disk ids d*3: sparse on purpose); returns [vm, disk] sorted. */
export async function writeManifestTree(snaps: string, vms: number, disks: number): Promise<Array<[number, number]>> {
  const out: Array<[number, number]> = [];
  for (let vm = 1; vm <= vms; vm++) {
    for (let disk = 0; disk < disks; disk++) {
      const p = replicaPaths(snaps, vm * 7, disk * 3);
      await fsp.mkdir(p.snapDir, { recursive: true });
      await fsp.mkdir(p.metaDir, { recursive: true });
      await fsp.writeFile(p.base, 'b');
      await fsp.writeFile(p.base1, 'b1');
      const [b, b1] = await Promise.all([fsp.lstat(p.base), fsp.lstat(p.base1)]);
      const m = {
        version: 1,
        vmId: p.vm,
        diskId: p.disk,
        // long fields, as a real agent may send them: ~600 bytes of JSON per manifest
        checkpoint: `onestor-${'c'.repeat(120)}-${vm}-${disk}`,
        capturedAt: 1700000000 + vm,
        publishedAt: 1700000001 + vm,
        consistency: 'crash-consistent',
        mode: 'incremental',
        base: { size: 1, sha256: 'a'.repeat(64) },
        base1: { size: 2, sha256: 'b'.repeat(64), virtualSize: 1 << 30 },
        sourceHost: `hypervisor-with-a-rather-long-name-${vm}.example.org`,
        files: { base: identityOf(b), base1: identityOf(b1) },
      };
      await fsp.writeFile(p.manifest, JSON.stringify(m));
      out.push([p.vm, p.disk]);
    }
  }
  return out.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
}
