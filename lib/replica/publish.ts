/** Full publish: a seed (or a re-seed) of base.1, with or without a new base. */
import * as fsp from 'node:fs/promises';
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import { step, type PublishContext, type PublishMeta } from './publish-context.js';
import { fsyncPath } from './durable.js';
import { checkUploadedBase, checkUploadedBase1 } from './image-check.js';
import { assertSameVmDir, ctx, ensureDir, ensureSymlink, errno, lstatOrNull, mapVanished, mkdirIn, tmpName, vmDirIdOf, type ReplicaPaths, type VmDirId } from './layout.js';
import { identityOf, writeManifest, type BaseOnReplica, type StoredManifest } from './manifest.js';
import type { UploadedFile } from './uploads.js';
import { setupWorkCopies } from './merge.js';

export type { PublishContext, PublishMeta } from './publish-context.js';

/**
 * Full publish. Order keeps the invariant "base + base.1 is the previous or the new complete snapshot":
 * when base changes, the old base.1 leaves first (so no base.1 is ever paired with a foreign base), then base,
 * then base.1; the manifest comes last and is only trusted while the file identities it names still match.
 * Returns the new manifest and the (possibly new) VM dir inode.
 */
export async function publishFull(
  c: PublishContext,
  up: { base?: UploadedFile; base1: UploadedFile },
  meta: PublishMeta,
): Promise<{ manifest: StoredManifest; vmDirId: VmDirId }> {
  const p = c.paths;
  const info = await checkUploadedBase1(p, c.qemuImg, up.base1.file);
  if (up.base) await checkUploadedBase(p, c.qemuImg, up.base.file);

  // A stale journal must never republish an older lineage over this seed.
  await fsp.rm(p.workDir, { recursive: true, force: true });
  await step(c, 'full:work-reset');

  let vmDirId = c.vmDirId;
  try {
    if (vmDirId === null) {
      try {
        await fsp.mkdir(p.vmDir);
      } catch (e) {
        if (errno(e) !== 'EEXIST') throw e;
      }
      const st = await fsp.lstat(p.vmDir);
      if (!st.isDirectory()) throw new OnestorError(ErrorCodes.PATH, 'refusing a VM dir that is not a directory', ctx(p, { file: p.vmDir }));
      vmDirId = vmDirIdOf(st);
    } else {
      await assertSameVmDir(p, vmDirId);
    }
    await mkdirIn(p, p.snapDir);
    await ensureSymlink(p, p.selfLink, '.');
    await ensureSymlink(p, p.diskLink, `${p.snapDirName}/base.1`);
    await step(c, 'full:layout');

    if (up.base) {
      if (await lstatOrNull(p.base1)) {
        await ensureDir(p.tmpDir);
        const away = tmpName(p, 'old-base1');
        await fsp.rename(p.base1, away);
        await fsyncPath(p.snapDir);
        await fsp.rm(away, { force: true });
        await step(c, 'full:old-base1-moved');
      }
      await fsp.rename(up.base.file, p.base);
      await step(c, 'full:base-renamed');
    } else {
      const st = await lstatOrNull(p.base);
      const was = c.baseAtOpen?.identity;
      if (!st?.isFile() || !was || st.ino !== was.ino || st.size !== was.size || st.mtimeMs !== was.mtimeMs) {
        throw new OnestorError(ErrorCodes.PARENT, 'base on the replica is missing or changed since open; send base with the publish', ctx(p, { file: p.base }));
      }
    }
    await fsp.rename(up.base1.file, p.base1);
    await fsyncPath(p.snapDir);
    await fsyncPath(p.vmDir);
    await step(c, 'full:base1-renamed');

    const [bSt, b1St] = await Promise.all([fsp.lstat(p.base), fsp.lstat(p.base1)]);
    const baseSha = up.base ? up.base.sha256 : c.baseAtOpen!.sha256;
    const manifest: StoredManifest = {
      version: 1,
      vmId: p.vm,
      diskId: p.disk,
      checkpoint: meta.checkpoint,
      capturedAt: meta.capturedAt,
      publishedAt: Math.floor(Date.now() / 1000),
      consistency: meta.consistency,
      mode: 'full',
      base: { size: bSt.size, sha256: baseSha },
      base1: { size: b1St.size, sha256: up.base1.sha256, ...(info['virtual-size'] !== undefined ? { virtualSize: info['virtual-size'] } : {}) },
      sourceHost: meta.sourceHost,
      ...meta.ownership,
      files: { base: identityOf(bSt), base1: identityOf(b1St) },
    };
    await writeManifest(p, manifest);
    await step(c, 'full:manifest');
    try {
      await setupWorkCopies(p);
    } catch (e) {
      // Not fatal: the snapshot is published; the next incremental rebuilds the spare.
      c.log?.({ vm: p.vm, disk: p.disk, err: String(e) }, 'could not prepare the A/B copies for incremental merges');
      await fsp.rm(p.workDir, { recursive: true, force: true }).catch(() => {});
    }
    return { manifest, vmDirId };
  } catch (e) {
    throw mapVanished(p, e, p.snapDir);
  }
}

