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

/**
 * One `<disk>` of a backup job, push or pull: validated the same way (target name, absolute file, the
 * parent of an incremental); `body` renders what sits inside it (push: target + driver, pull: scratch).
 */
function diskElement(d: { target: string; mode: 'full' | 'incremental' | null; incrementalFrom?: string }, file: string | undefined, what: 'target' | 'scratch', body: (file: string) => string[]): string[] {
  if (!TARGET_RE.test(d.target)) throw new OnestorError(ErrorCodes.DOMAIN, `invalid disk target ${JSON.stringify(d.target)}`);
  if (!d.mode) return [`    <disk name='${esc(d.target)}' backup='no'/>`];
  if (!file || !file.startsWith('/')) throw new OnestorError(ErrorCodes.INTERNAL, `disk ${d.target}: ${what} file must be absolute`);
  let attrs = `name='${esc(d.target)}' backup='yes' type='file' backupmode='${d.mode}'`;
  if (d.mode === 'incremental') {
    if (!d.incrementalFrom) throw new OnestorError(ErrorCodes.INTERNAL, `disk ${d.target}: incremental without parent checkpoint`);
    checkName('checkpoint', d.incrementalFrom);
    attrs += ` incremental='${esc(d.incrementalFrom)}'`;
  }
  return [`    <disk ${attrs}>`, ...body(esc(file)), '    </disk>'];
}

export function buildBackupXml(disks: readonly BackupDiskPlan[]): string {
  if (!disks.some((d) => d.mode)) throw new OnestorError(ErrorCodes.INTERNAL, 'backup job without any disk');
  const lines = ["<domainbackup mode='push'>", '  <disks>'];
  for (const d of disks) lines.push(...diskElement(d, d.targetFile, 'target', (f) => [`      <target file='${f}'/>`, "      <driver type='qcow2'/>"]));
  lines.push('  </disks>', '</domainbackup>', '');
  return lines.join('\n');
}

export interface PullDiskPlan {
  target: string;
  /** null: not part of this job. */
  mode: 'full' | 'incremental' | null;
  incrementalFrom?: string;
  /** absolute path of the scratch file QEMU creates (old contents of blocks the guest overwrites meanwhile) */
  scratchFile?: string;
}

/**
 * Pull mode: libvirt exports the point-in-time view of each disk over NBD on a unix socket; QEMU keeps
 * only what the guest overwrites meanwhile (copy-before-write into the scratch file).
 */
export function buildPullBackupXml(disks: readonly PullDiskPlan[], socketPath: string): string {
  if (!disks.some((d) => d.mode)) throw new OnestorError(ErrorCodes.INTERNAL, 'backup job without any disk');
  if (!socketPath.startsWith('/')) throw new OnestorError(ErrorCodes.INTERNAL, 'NBD socket path must be absolute');
  // sun_path holds 108 bytes including the NUL: a longer path cannot be bound at all
  if (Buffer.byteLength(socketPath) > 107) throw new OnestorError(ErrorCodes.PATH, `NBD socket path is longer than 107 bytes: ${socketPath}`);
  const lines = ["<domainbackup mode='pull'>", `  <server transport='unix' socket='${esc(socketPath)}'/>`, '  <disks>'];
  for (const d of disks) lines.push(...diskElement(d, d.scratchFile, 'scratch', (f) => [`      <scratch file='${f}'/>`]));
  lines.push('  </disks>', '</domainbackup>', '');
  return lines.join('\n');
}

export interface PullExport {
  target: string;
  exportName: string;
  /** dirty bitmap exported for an incremental (meta context `qemu:dirty-bitmap:NAME`) */
  bitmap?: string;
}

/** Pure: export names of a running pull-mode job, from `virsh backup-dumpxml`. */
export function parsePullExports(xml: string): { socket: string | null; exports: PullExport[] } {
  const attr = (tag: string, name: string): string | undefined => {
    const m = new RegExp(`\\s${name}=(?:'([^']*)'|"([^"]*)")`).exec(tag);
    return m ? unesc(m[1] ?? m[2] ?? '') : undefined;
  };
  const server = /<server\b[^>]*>/.exec(xml)?.[0];
  const out: PullExport[] = [];
  for (const m of xml.matchAll(/<disk\b[^>]*>/g)) {
    const tag = m[0];
    if (attr(tag, 'backup') !== 'yes') continue;
    const target = attr(tag, 'name');
    const exportName = attr(tag, 'exportname') ?? target;
    if (!target || !exportName) continue;
    const bitmap = attr(tag, 'exportbitmap');
    out.push({ target, exportName, ...(bitmap ? { bitmap } : {}) });
  }
  return { socket: server ? (attr(server, 'socket') ?? null) : null, exports: out };
}

function unesc(s: string): string {
  return s.replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&apos;/g, "'").replace(/&quot;/g, '"').replace(/&amp;/g, '&');
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
