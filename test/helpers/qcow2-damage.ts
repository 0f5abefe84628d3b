/**
 * Damage a test makes to a qcow2 image on purpose, the way `qemu-img check` reports it: the refcount of
 * cluster 0 (the header) set to 0 while the header still uses it ("refcount=0 reference=1").
 * Make it after the guest's last write: QEMU writes its cached refcount block back when it allocates.
 */
import { open } from 'node:fs/promises';

export async function unreferenceHeaderCluster(file: string): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    const hdr = Buffer.alloc(64);
    await fh.read(hdr, 0, 64, 0);
    const refTable = Number(hdr.readBigUInt64BE(48));
    const ent = Buffer.alloc(8);
    await fh.read(ent, 0, 8, refTable);
    const block0 = Number(ent.readBigUInt64BE(0));
    await fh.write(Buffer.from([0, 0]), 0, 2, block0);
    await fh.sync();
  } finally {
    await fh.close();
  }
}
