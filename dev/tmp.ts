/**
 * Unique names and temp dirs for integration tests. Several test files (and other engineers' runs) share
 * one machine, so every name carries our pid plus randomness.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, chmod, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** prefix-<pid36>-<rand>: short, and only [a-z0-9-] so it is valid as a libvirt domain name and a path part. */
export function uniqueName(prefix: string): string {
  const safePrefix = prefix.toLowerCase().replace(/[^a-z0-9-]+/g, '-').replace(/^-+|-+$/g, '') || 't';
  const rand = randomBytes(4).readUInt32BE(0).toString(36).padStart(7, '0');
  return `${safePrefix}-${process.pid.toString(36)}-${rand}`;
}

/** Prefix of every dir made by makeTempDir; the reaper recognises stale ones by it. */
export const TEMP_DIR_TAG = 'onestor-t-';

/**
 * A fresh dir under os.tmpdir(), mode 0755 so a QEMU running as another user could still traverse it
 * (mkdtemp gives 0700).
 */
export async function makeTempDir(prefix: string): Promise<string> {
  const dir = join(tmpdir(), TEMP_DIR_TAG + uniqueName(prefix));
  await mkdir(dir, { mode: 0o755 });
  // mkdir's mode is filtered by the umask; QEMU needs the exact bits.
  await chmod(dir, 0o755);
  return dir;
}

/** rm -rf that never throws for a missing path (cleanup paths must not mask the test's own failure). */
export async function removeTree(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true, maxRetries: 3 });
}
