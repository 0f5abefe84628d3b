/**
 * Pure builders of libvirt backup and checkpoint XML (DESIGN §3). Every disk of the domain is listed
 * explicitly: libvirt's default for an unlisted disk is to include it, which would back up (and
 * checkpoint) disks nobody asked for.
 */
import { ErrorCodes, OnestorError } from '../shared/errors.js';

export interface BackupDiskPlan {
  /** libvirt target dev (vda). */
  target: string;
  /** null: not part of this job. */
  mode: 'full' | 'incremental' | null;
  /** parent checkpoint for an incremental. */
  incrementalFrom?: string;
  /** absolute path of the pre-created qcow2 target. */
  targetFile?: string;
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const TARGET_RE = /^[a-z]{2,4}[a-z0-9]{1,6}$/;

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;').replace(/"/g, '&quot;');
}

function checkName(kind: string, name: string): void {
  if (!NAME_RE.test(name)) throw new OnestorError(ErrorCodes.CHECKPOINT, `invalid ${kind} name ${JSON.stringify(name)}`);
}

export function buildBackupXml(disks: readonly BackupDiskPlan[]): string {
  if (!disks.some((d) => d.mode)) throw new OnestorError(ErrorCodes.INTERNAL, 'backup job without any disk');
  const lines = ["<domainbackup mode='push'>", '  <disks>'];
  for (const d of disks) {
    if (!TARGET_RE.test(d.target)) throw new OnestorError(ErrorCodes.DOMAIN, `invalid disk target ${JSON.stringify(d.target)}`);
    if (!d.mode) {
      lines.push(`    <disk name='${esc(d.target)}' backup='no'/>`);
      continue;
    }
    if (!d.targetFile || !d.targetFile.startsWith('/')) throw new OnestorError(ErrorCodes.INTERNAL, `disk ${d.target}: target file must be absolute`);
    let attrs = `name='${esc(d.target)}' backup='yes' type='file' backupmode='${d.mode}'`;
    if (d.mode === 'incremental') {
      if (!d.incrementalFrom) throw new OnestorError(ErrorCodes.INTERNAL, `disk ${d.target}: incremental without parent checkpoint`);
      checkName('checkpoint', d.incrementalFrom);
      attrs += ` incremental='${esc(d.incrementalFrom)}'`;
    }
    lines.push(`    <disk ${attrs}>`);
    lines.push(`      <target file='${esc(d.targetFile)}'/>`);
    lines.push("      <driver type='qcow2'/>");
    lines.push('    </disk>');
  }
  lines.push('  </disks>', '</domainbackup>', '');
  return lines.join('\n');
}

export function buildCheckpointXml(name: string, bitmapTargets: readonly string[], allTargets: readonly string[], description = 'onestor-agent recovery snapshot'): string {
  checkName('checkpoint', name);
  const lines = ['<domaincheckpoint>', `  <name>${esc(name)}</name>`, `  <description>${esc(description)}</description>`, '  <disks>'];
  for (const t of allTargets) {
    if (!TARGET_RE.test(t)) throw new OnestorError(ErrorCodes.DOMAIN, `invalid disk target ${JSON.stringify(t)}`);
    lines.push(`    <disk name='${esc(t)}' checkpoint='${bitmapTargets.includes(t) ? 'bitmap' : 'no'}'/>`);
  }
  lines.push('  </disks>', '</domaincheckpoint>', '');
  return lines.join('\n');
}

/** Our checkpoints are recognisable by prefix; we never touch others (OpenNebula backups use their own). */
export const CHECKPOINT_PREFIX = 'onestor-';

export function newCheckpointName(vmId: number, nowMs: number, rand: string): string {
  return `${CHECKPOINT_PREFIX}${vmId}-${nowMs}-${rand}`;
}

export function isOurCheckpoint(name: string): boolean {
  return name.startsWith(CHECKPOINT_PREFIX);
}
