/**
 * Live migration support (issue 13): never hold the domain's job while OpenNebula migrates the VM.
 *
 * libvirt serialises a backup job and a migration on the domain's job lock; a migration waits for it
 * at most 30 s and then fails ("cannot acquire state change lock (held by
 * monitor=remoteDispatchDomainBackupBegin)"), and OpenNebula does not retry that. So a cycle gives way:
 * - a yield marker (`onestor-agent yield --vm ID`, run by the front-end's migration hook on the source)
 *   holds new cycles of the VM off until the domain has left this host or the marker expires, and a
 *   running capture aborts its job as soon as it sees the marker;
 * - without the hook, the capture sees the migration itself: OpenNebula's migrate driver runs on the source
 *   host (`rsync ... DS/VMID/disk.N.snap dst:...` then `virsh ... migrate --live ... DOM ...`), so both show
 *   in /proc while the migration still waits for our job.
 * The markers live in the state dir, one small JSON file per VM.
 */
import { readdir, readFile, mkdir, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { ErrorCodes, OnestorError } from '../shared/errors.js';

export interface YieldMarker {
  vmId: number;
  /** epoch seconds after which the marker no longer holds */
  until: number;
  /** libvirt's numeric id of the domain when the marker was set: a different id = the VM came back */
  domainId: number | null;
  domainName: string;
  setAt: number;
  reason: string;
}

export const yieldDir = (stateDir: string): string => path.join(stateDir, 'yield');
export const yieldFile = (stateDir: string, vmId: number): string => path.join(yieldDir(stateDir), `${vmId}.json`);

export async function writeYieldMarker(stateDir: string, m: YieldMarker): Promise<string> {
  await mkdir(yieldDir(stateDir), { recursive: true, mode: 0o750 });
  const file = yieldFile(stateDir, m.vmId);
  const tmp = `${file}.tmp-${process.pid}`;
  await writeFile(tmp, JSON.stringify(m), { mode: 0o640 });
  await rename(tmp, file);
  return file;
}

export async function readYieldMarker(stateDir: string, vmId: number): Promise<YieldMarker | null> {
  try {
    const m = JSON.parse(await readFile(yieldFile(stateDir, vmId), 'utf8')) as YieldMarker;
    return typeof m.until === 'number' ? m : null;
  } catch {
    return null;
  }
}

export async function clearYieldMarker(stateDir: string, vmId: number): Promise<void> {
  await rm(yieldFile(stateDir, vmId), { force: true });
}

/**
 * Pure: does a marker hold now? It stops holding when it expires, when the domain is no longer on this
 * host (it left: nothing to protect here), or when the domain runs with another id (it left and came back).
 */
export function yieldHolds(m: YieldMarker | null, nowSec: number, domainIdNow: number | null | undefined): boolean {
  if (!m) return false;
  if (nowSec >= m.until) return false;
  if (domainIdNow === undefined || domainIdNow === null) return false;
  if (m.domainId !== null && m.domainId !== domainIdNow) return false;
  return true;
}

/**
 * Pure: is this command line part of OpenNebula's migration of `domain` (whose VM dir is `vmDir`)?
 * - the driver's `virsh [-c URI] migrate --live ... DOM DEST ...` (KvmDomain#live_migrate[_disks]);
 * - its pre-sync `rsync -az DS/VMID/*.xml DS/VMID/disk.N.snap ... HOST:DS/VMID/`.
 */
export function isMigrationCommand(argv: readonly string[], domain: string, vmDir: string, libvirtUri?: string): boolean {
  if (argv.length === 0) return false;
  const prog = path.basename(argv[0]!);
  // the driver runs these through a shell (`bash -c "virsh ... migrate ..."`): look inside -c too
  if ((prog === 'sh' || prog === 'bash') && argv[1] === '-c' && argv[2]) {
    return isMigrationCommand(argv[2].trim().split(/\s+/), domain, vmDir, libvirtUri);
  }
  if (prog === 'virsh') {
    const i = argv.indexOf('migrate');
    if (!(i > 0 && argv.slice(i + 1).includes(domain))) return false;
    // a virsh connected to another libvirtd (another URI) migrates another daemon's domain of that name
    const uri = connectUri(argv.slice(1, i));
    return uri === null || libvirtUri === undefined || uri === libvirtUri;
  }
  if (prog === 'rsync') {
    const dir = vmDir.replace(/\/+$/, '') + '/';
    // sources only: the last argument is the destination
    return argv.slice(1, -1).some((a) => a.startsWith(dir) || a === dir.slice(0, -1));
  }
  return false;
}

/** Pure: the `-c URI` / `--connect URI` / `--connect=URI` given to virsh before its command, or null. */
export function connectUri(opts: readonly string[]): string | null {
  for (let k = 0; k < opts.length; k++) {
    const a = opts[k]!;
    if ((a === '-c' || a === '--connect') && k + 1 < opts.length) return opts[k + 1]!;
    if (a.startsWith('--connect=')) return a.slice('--connect='.length);
  }
  return null;
}

const DEST_HOST_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$/;
const hostOrNull = (h: string | undefined): string | null => (h && DEST_HOST_RE.test(h) && !/^\.|\.\.|\.$/.test(h) ? h : null);

/**
 * Pure: the destination host named by a migration command line (isMigrationCommand), or null when it names
 * none that is a plain host name:
 * - `virsh ... migrate ... DOM DESTURI ...`: the host of the first `driver+transport://[user@]HOST[:port]/...`
 *   argument after `migrate` (OpenNebula: `qemu+ssh://DEST/system`); `qemu:///system` names no host;
 * - `rsync ... SRC... [user@]HOST:PATH`: the host of the last argument (not `HOST::module`, not a local path).
 * Only a hint for whom to release the lineage to: the replica binds the name to an authenticated key.
 */
export function migrationDestination(argv: readonly string[]): string | null {
  if (argv.length === 0 || argv.length > 4096) return null;
  const prog = path.basename(argv[0]!);
  if ((prog === 'sh' || prog === 'bash') && argv[1] === '-c' && argv[2]) return migrationDestination(argv[2].trim().split(/\s+/));
  if (prog === 'virsh') {
    const i = argv.indexOf('migrate');
    if (i <= 0) return null;
    for (const a of argv.slice(i + 1)) {
      const m = /^[a-z][a-z0-9]*(?:\+[a-z0-9]+)?:\/\/(?:[^@/?#]*@)?([^/:?#[\]]*)(?::\d{1,5})?(?:[/?#]|$)/.exec(a);
      if (!m) continue;
      if (/^tcp:|^rdma:|^unix:/.test(a)) continue; // a --migrateuri value, not the destination libvirt
      return hostOrNull(m[1]);
    }
    return null;
  }
  if (prog === 'rsync') {
    const last = argv[argv.length - 1];
    if (argv.length < 3 || !last || last.startsWith('-') || last.startsWith('/') || last.includes('::') || /^rsync:\/\//.test(last)) return null;
    const m = /^(?:[^@/:]+@)?([^@/:]+):/.exec(last);
    return m ? hostOrNull(m[1]) : null;
  }
  return null;
}

/** cmdline files read at once by a /proc scan (one at a time, a scan of ~150 processes took 0.3 s here) */
const PROC_SCAN_PARALLEL = 32;

/**
 * Scans /proc for a migration of `domain` in progress on this host (see isMigrationCommand). Every capture
 * makes this scan right before its job begins, so it is on a seed's critical path: the cmdline files are
 * read PROC_SCAN_PARALLEL at a time. Of several matches, the lowest pid is returned.
 */
export async function findMigrationProcess(domain: string, vmDir: string, procDir = '/proc', libvirtUri?: string): Promise<{ pid: number; argv: string[] } | null> {
  let entries: string[];
  try {
    entries = await readdir(procDir);
  } catch {
    return null;
  }
  const pids = entries.filter((e) => /^\d+$/.test(e) && Number(e) !== process.pid).map(Number);
  let found: { pid: number; argv: string[] } | null = null;
  let next = 0;
  const worker = async () => {
    for (let i = next++; i < pids.length; i = next++) {
      const pid = pids[i]!;
      let raw: string;
      try {
        raw = await readFile(path.join(procDir, String(pid), 'cmdline'), 'utf8');
      } catch {
        continue; // exited, or hidden from us (hidepid)
      }
      if (!raw) continue;
      const argv = raw.split('\0').filter((s, j, a) => s !== '' || j < a.length - 1);
      if (isMigrationCommand(argv, domain, vmDir, libvirtUri) && (!found || pid < found.pid)) found = { pid, argv };
    }
  };
  await Promise.all(Array.from({ length: Math.min(PROC_SCAN_PARALLEL, pids.length) }, worker));
  return found;
}

/**
 * What a capture polls while its job runs: a reason to give way (marker or migration seen), or null.
 * The /proc scan is throttled (it reads every process's cmdline).
 */
export function migrationWatch(opts: {
  stateDir: string;
  vmId: number;
  domain: string;
  vmDir: string;
  domainId: () => Promise<number | null>;
  /** this agent's libvirt URI: a `virsh -c OTHER migrate` is not about our domain */
  libvirtUri?: string;
  now?: () => number;
  scanEveryMs?: number;
  procDir?: string;
}): MigrationWatch {
  const now = opts.now ?? Date.now;
  let lastScan = 0;
  let destination: string | null = null;
  const check = async () => {
    const m = await readYieldMarker(opts.stateDir, opts.vmId);
    if (m && yieldHolds(m, now() / 1000, await opts.domainId().catch(() => null))) return `yield requested (${m.reason})`;
    if (now() - lastScan >= (opts.scanEveryMs ?? 1000)) {
      lastScan = now();
      const p = await findMigrationProcess(opts.domain, opts.vmDir, opts.procDir, opts.libvirtUri);
      if (p) {
        destination = migrationDestination(p.argv);
        return `migration of ${opts.domain} in progress (pid ${p.pid}: ${p.argv.slice(0, 4).join(' ')} ...${destination ? `, to ${destination}` : ''})`;
      }
    }
    return null;
  };
  return Object.assign(check, { destination: () => destination });
}

/** The capture's poll (a reason to give way, or null) and the destination host of a migration it saw. */
export type MigrationWatch = (() => Promise<string | null>) & { destination(): string | null };

/**
 * Pure: a checkpoint definition for `checkpoint-create --redefine`, rebuilt from what the replica's manifest
 * holds (the checkpoint name, which is also the bitmap name, and its time). It is what
 * `checkpoint-dumpxml --no-domain` prints for our checkpoints, less the parent (libvirt on the new host
 * knows none) and the description. Whether the bitmap really is there and sound is checked afterwards
 * (`checkpoint-dumpxml --size`); the definition itself proves nothing.
 */
export function redefineCheckpointXml(name: string, creationTime: number, bitmapTargets: readonly string[], allTargets: readonly string[]): string {
  if (!/^[A-Za-z0-9._-]+$/.test(name)) throw new OnestorError(ErrorCodes.CHECKPOINT, `invalid checkpoint name ${JSON.stringify(name)}`);
  const disks = allTargets.map((t) => {
    if (!/^[a-z]{1,8}[a-z0-9]{0,8}$/.test(t)) throw new OnestorError(ErrorCodes.DOMAIN, `invalid disk target ${JSON.stringify(t)}`);
    return bitmapTargets.includes(t) ? `    <disk name='${t}' checkpoint='bitmap' bitmap='${name}'/>` : `    <disk name='${t}' checkpoint='no'/>`;
  });
  return ['<domaincheckpoint>', `  <name>${name}</name>`, `  <creationTime>${Math.floor(creationTime)}</creationTime>`, '  <disks>', ...disks, '  </disks>', '</domaincheckpoint>', ''].join('\n');
}
