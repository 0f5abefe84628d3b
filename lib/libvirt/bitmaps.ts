/**
 * Dirty bitmaps of a running domain's disk, as QEMU has them (pure parsing + the stray rule).
 *
 * Why QEMU and not the file: a persistent bitmap created or migrated into a running QEMU reaches the qcow2
 * file only when QEMU closes the image, so `qemu-img info -U` of a live base.1 does not list it (measured on
 * QEMU 7.2: empty right after `checkpoint-create` and on a migration destination). libvirt 9.0 has no API
 * that lists bitmaps, so the list comes from QMP `query-named-block-nodes`.
 */
import path from 'node:path';
import { CHECKPOINT_PREFIX } from './backup-xml.js';

export interface DiskBitmap {
  name: string;
  recording: boolean;
  persistent: boolean;
  busy: boolean;
  inconsistent: boolean;
  count?: number;
}

export interface NodeBitmaps {
  /** QEMU node name of base.1's qcow2 format node (e.g. libvirt-1-format) */
  node: string;
  bitmaps: DiskBitmap[];
}

interface QmpNode {
  'node-name'?: string;
  drv?: string;
  file?: string;
  'dirty-bitmaps'?: Array<{ name?: string; recording?: boolean; persistent?: boolean; busy?: boolean; inconsistent?: boolean; count?: number }>;
}

/** The file a format node reads: its `file` field is the path, or `json:{...,"file":{"filename":PATH}}`. */
function nodeImageFile(n: QmpNode): string | null {
  const f = n.file;
  if (!f) return null;
  if (!f.startsWith('json:')) return f;
  try {
    const j = JSON.parse(f.slice(5)) as { file?: { filename?: string } };
    return j.file?.filename ?? null;
  } catch {
    return null;
  }
}

/** Pure: the qcow2 node of `file` in a `query-named-block-nodes` (flat) reply, with its bitmaps. */
export function parseNodeBitmaps(reply: unknown, file: string): NodeBitmaps | null {
  if (!Array.isArray(reply)) return null;
  const want = path.resolve(file);
  for (const n of reply as QmpNode[]) {
    if (n.drv !== 'qcow2' || !n['node-name']) continue;
    const f = nodeImageFile(n);
    if (f === null || path.resolve(f) !== want) continue;
    return {
      node: n['node-name'],
      bitmaps: (n['dirty-bitmaps'] ?? []).filter((b) => typeof b.name === 'string').map((b) => ({
        name: b.name!,
        recording: b.recording === true,
        persistent: b.persistent === true,
        busy: b.busy === true,
        inconsistent: b.inconsistent === true,
        count: b.count,
      })),
    };
  }
  return null;
}

/**
 * Pure: our bitmaps nobody builds on any more. Ours = named like this VM's checkpoints
 * (`onestor-VMID-...`); never anything else (OpenNebula's own backups, an admin's bitmaps), never one
 * in `keep` (checkpoints libvirt lists, the agent's state, the replica's lineage), never a busy one
 * (a running job uses it).
 */
export function strayBitmaps(bitmaps: readonly DiskBitmap[], vmId: number, keep: ReadonlySet<string>): DiskBitmap[] {
  const ours = `${CHECKPOINT_PREFIX}${vmId}-`;
  return bitmaps.filter((b) => b.name.startsWith(ours) && !keep.has(b.name) && !b.busy);
}
