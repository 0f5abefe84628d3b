/**
 * Capture: a point-in-time copy of one VM's due disks through libvirt's backup API, without ever
 * touching the VM's active chain (no overlays, no pivots, no block commits). DESIGN §3.
 *
 * One job per VM (all due disks at one instant), push mode into pre-created qcow2 targets in a
 * staging dir on the datastore's filesystem, a new checkpoint created atomically with the job.
 * Returns files ready to send: a thin base.1 overlay (full) or the dirty clusters (incremental).
 */
import { mkdir, rm, symlink, statfs, readdir, lstat, realpath, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { buildBackupXml, buildCheckpointXml, type BackupDiskPlan } from '../libvirt/backup-xml.js';
import { OnestorError, ErrorCodes, describeError } from '../shared/errors.js';
import type { QemuImg } from '../libvirt/qemu-img.js';
import type { Consistency, CycleMode } from '../shared/model.js';

/** What capture needs from libvirt; lib/libvirt-port.ts implements it over `virsh`. */
export interface CaptureLibvirt {
  /** the domain's disks and whether it has a guest-agent channel (one dumpxml) */
  domainView(dom: string): Promise<DomainView>;
  backupBegin(dom: string, backupXml: string, checkpointXml: string, reuseExternal: boolean): Promise<void>;
  /** true while a job (ours or another) runs on the domain. */
  jobActive(dom: string): Promise<boolean>;
  /** After the job ended: null when it completed, else the failure text. */
  completedJobError(dom: string): Promise<string | null>;
  abortJob(dom: string): Promise<void>;
  /** target files of the running backup job ([] when none) */
  backupTargets(dom: string): Promise<string[]>;
  /** the running backup job's definition (pull mode: export names), null when none runs */
  backupDumpXml(dom: string): Promise<string | null>;
  /** 'frozen' or why not (no channel / agent not answering). */
  fsFreeze(dom: string): Promise<{ frozen: true } | { frozen: false; why: string }>;
  fsThaw(dom: string): Promise<void>;
  checkpointNames(dom: string): Promise<string[]>;
  checkpointDelete(dom: string, name: string, opts?: { metadataOnly?: boolean }): Promise<void>;
}

export interface DomainView {
  disks: Array<{ target: string; source: string | null }>;
  hasGuestAgentChannel: boolean;
}

export interface CaptureDiskRequest {
  diskId: number;
  /** DS/VMID/disk.N.snap/base.1 */
  base1Path: string;
  /** libvirt target (vda) when the caller already matched it */
  target?: string;
  snapDir: string;
  mode: CycleMode;
  parentCheckpoint?: string;
  virtualSize: number;
}

export interface CaptureRequest {
  vmId: number;
  domainName: string;
  stagingDir: string;
  checkpointName: string;
  disks: CaptureDiskRequest[];
  /** freeze guest filesystems when the domain has an agent channel */
  tryFreeze: boolean;
  timeoutMs: number;
  /** share of the staging filesystem that must stay free beyond what the targets may take */
  minFreePercent: number;
  /** the domain view when the caller already read it (saves a dumpxml) */
  domain?: DomainView;
  signal?: AbortSignal;
  /**
   * Polled before the job starts and while it runs: a reason to give way to a live migration (the job
   * holds the domain's job lock, which a migration waits for only 30 s), or null. See migration.ts.
   */
  shouldYield?: () => Promise<string | null>;
  /**
   * A check of the caller's that must pass before any job begins (the source check before a full),
   * awaited together with the capture's own checks instead of before them.
   */
  ready?: Promise<unknown>;
  log?: (obj: Record<string, unknown>, msg: string) => void;
  now?: () => number;
}

export interface CapturedDisk {
  diskId: number;
  target: string;
  mode: CycleMode;
  /** file to send: thin base.1 (full) or dirty clusters (incremental) */
  file: string;
  virtualSize: number;
}

export interface CaptureResult {
  checkpoint: string;
  consistency: Consistency;
  freezeNote?: string;
  /** epoch ms of the point in time (job start) */
  capturedAtMs: number;
  jobMs: number;
  thinMs: number;
  disks: CapturedDisk[];
}

/** Pure: bytes a capture may need on the staging filesystem in the worst case. */
export function stagingBytesNeeded(disks: ReadonlyArray<{ mode: CycleMode; virtualSize: number }>): number {
  // full: flat target (up to virtual size) + thin copy (up to virtual size); incremental: up to virtual size
  return disks.reduce((n, d) => n + (d.mode === 'full' ? 2 * d.virtualSize : d.virtualSize), 0);
}

export function stagingPaths(stagingDir: string, diskId: number) {
  return {
    snapLink: path.join(stagingDir, `disk.${diskId}.snap`),
    full: path.join(stagingDir, `disk.${diskId}.full.qcow2`),
    thin: path.join(stagingDir, `disk.${diskId}.base.1`),
    inc: path.join(stagingDir, `disk.${diskId}.inc.qcow2`),
  };
}

/** Removes a staging dir; refuses anything that is not a plain dir named by a numeric VM id. */
export async function cleanStagingDir(stagingDir: string): Promise<void> {
  if (!/^\d+$/.test(path.basename(stagingDir))) throw new OnestorError(ErrorCodes.PATH, `refusing to clean ${stagingDir}`);
  await rm(stagingDir, { recursive: true, force: true });
}

/**
 * Beside the VM's staging dir, which every capture empties and the daemon's start removes: present from just
 * before a freeze until a thaw answered, so an agent killed in between (or whose thaws all failed) leaves
 * the next capture of the VM a reason to thaw first. A frozen guest stays frozen until someone thaws it.
 */
export function freezeMarkerPath(stagingDir: string): string {
  return `${stagingDir}.frozen`;
}

/** Leftovers of a crashed run: every numeric dir under DS/.onestor except the ones in use. */
export async function cleanStaleStaging(stagingRoot: string, inUse: ReadonlySet<number> = new Set()): Promise<number[]> {
  let names: string[];
  try {
    names = await readdir(stagingRoot);
  } catch {
    return [];
  }
  const removed: number[] = [];
  for (const n of names) {
    if (!/^\d+$/.test(n) || inUse.has(Number(n))) continue;
    const p = path.join(stagingRoot, n);
    const st = await lstat(p).catch(() => null);
    if (!st?.isDirectory()) continue;
    await rm(p, { recursive: true, force: true });
    removed.push(Number(n));
  }
  return removed;
}

export async function capture(lv: CaptureLibvirt, qemuImg: QemuImg, req: CaptureRequest): Promise<CaptureResult> {
  const log = req.log ?? (() => {});
  const now = req.now ?? Date.now;
  const dom = req.domainName;
  const ctx = { vm: req.vmId };

  // Map each disk to the target libvirt uses for it, by the path of base.1 (OpenNebula >= 6.8 names it).
  const view = req.domain ?? (await lv.domainView(dom));
  const allTargets = view.disks.map((d) => d.target);
  const plans = (await diskTargets(view, req)).map((d) => ({ ...d, paths: stagingPaths(req.stagingDir, d.diskId) }));

  await checksBeforeJob(lv, req);
  await cleanStagingDir(req.stagingDir);
  await mkdir(req.stagingDir, { recursive: true, mode: 0o750 });

  let jobStarted = false;
  let jobDone = false;
  try {
    // Free space first: a target that fills the datastore pauses every VM on it with ENOSPC.
    const need = stagingBytesNeeded(plans);
    const fs = await statfs(req.stagingDir);
    const free = Number(fs.bavail) * Number(fs.bsize);
    const keepFree = Math.ceil((Number(fs.blocks) * Number(fs.bsize) * req.minFreePercent) / 100);
    if (free - need < keepFree) {
      throw new OnestorError(ErrorCodes.NOSPACE, `staging ${req.stagingDir} has ${mib(free)} MiB free; capture may need ${mib(need)} MiB and ${mib(keepFree)} MiB (${req.minFreePercent}%) must stay free`, { ...ctx });
    }

    const backupPlans: BackupDiskPlan[] = allTargets.map((t) => ({ target: t, mode: null }));
    for (const p of plans) {
      await symlink(p.snapDir, p.paths.snapLink);
      const bp = backupPlans.find((b) => b.target === p.target)!;
      bp.mode = p.mode;
      if (p.mode === 'full') {
        bp.targetFile = p.paths.full;
        await qemuImg.create(p.paths.full, { size: p.virtualSize });
      } else {
        if (!p.parentCheckpoint) throw new OnestorError(ErrorCodes.INTERNAL, 'incremental without parent', { ...ctx, disk: p.diskId });
        bp.incrementalFrom = p.parentCheckpoint;
        bp.targetFile = p.paths.inc;
        // Backing name is a placeholder: QEMU writes only dirty clusters; the replica rebases it.
        await qemuImg.create(p.paths.inc, { size: p.virtualSize, backing: 'base.1.next', backingFormat: 'qcow2', unsafe: true });
      }
    }
    const backupXml = buildBackupXml(backupPlans);
    const checkpointXml = buildCheckpointXml(req.checkpointName, plans.map((p) => p.target), allTargets);

    const { consistency, freezeNote, t0 } = await beginJobAtInstant(lv, req, backupXml, checkpointXml, true, view).catch((e: unknown) => {
      jobStarted = mayHaveBegun(e);
      throw e;
    });
    jobStarted = true;
    const capturedAtMs = t0;

    // Wait for the job to end, then for QEMU to really release every target (job-completed comes
    // ~100 ms before QEMU closes the file; a copy taken then was missing data).
    const deadline = now() + req.timeoutMs;
    while (await lv.jobActive(dom)) {
      if (req.signal?.aborted) throw new OnestorError(ErrorCodes.ABORTED, 'capture aborted', ctx);
      const why = await req.shouldYield?.();
      if (why) {
        log({ vm: req.vmId, reason: why }, 'aborting the backup job to let a migration through');
        throw new OnestorError(ErrorCodes.YIELDED, `backup job aborted: ${why}`, ctx);
      }
      if (now() > deadline) throw new OnestorError(ErrorCodes.CAPTURE, `backup job still running after ${req.timeoutMs} ms`, ctx);
      await sleep(50);
    }
    jobDone = true;
    const failure = await lv.completedJobError(dom);
    if (failure) throw new OnestorError(ErrorCodes.CAPTURE, `backup job failed: ${failure}`, ctx);
    for (const p of plans) {
      const target = p.mode === 'full' ? p.paths.full : p.paths.inc;
      while (!(await qemuImg.tryInfoLocked(target))) {
        if (now() > deadline) throw new OnestorError(ErrorCodes.CAPTURE, `QEMU did not release ${target}`, { ...ctx, disk: p.diskId });
        await sleep(20);
      }
    }
    const jobMs = now() - t0;

    // Thin each full target into a base.1 overlay whose stored backing name is `disk.N.snap/base`
    // (resolved through the staging dir's disk.N.snap link). convert -B and --reuse-external are not thin.
    const t1 = now();
    const out: CapturedDisk[] = [];
    for (const p of plans) {
      if (p.mode === 'full') {
        const rel = `disk.${p.diskId}.snap/base`;
        await qemuImg.create(p.paths.thin, { size: p.virtualSize, backing: rel, backingFormat: 'qcow2' });
        await qemuImg.rebaseUnsafe(p.paths.thin, p.paths.full);
        await qemuImg.rebase(p.paths.thin, rel);
        await rm(p.paths.full, { force: true });
        out.push({ diskId: p.diskId, target: p.target, mode: 'full', file: p.paths.thin, virtualSize: p.virtualSize });
      } else {
        out.push({ diskId: p.diskId, target: p.target, mode: 'incremental', file: p.paths.inc, virtualSize: p.virtualSize });
      }
    }
    return { checkpoint: req.checkpointName, consistency, freezeNote, capturedAtMs, jobMs, thinMs: now() - t1, disks: out };
  } catch (e) {
    // Never leave a job running or a half-made checkpoint behind.
    if (jobStarted && !jobDone) await abortOwnJob(lv, dom, req.stagingDir).catch(() => false);
    if (jobStarted) {
      await waitOwnJobGone(lv, dom, req.stagingDir, 100);
      const names = await lv.checkpointNames(dom).catch(() => [] as string[]);
      if (names.includes(req.checkpointName)) {
        await lv.checkpointDelete(dom, req.checkpointName).catch(() => lv.checkpointDelete(dom, req.checkpointName, { metadataOnly: true }).catch(() => {}));
      }
    }
    await cleanStagingDir(req.stagingDir).catch(() => {});
    throw e;
  }
}

/** Each requested disk with the target libvirt uses for it, found by the path of base.1 (OpenNebula >= 6.8 names it). */
export async function diskTargets(view: DomainView, req: Pick<CaptureRequest, 'vmId' | 'domainName' | 'disks'>): Promise<Array<CaptureDiskRequest & { target: string }>> {
  const out: Array<CaptureDiskRequest & { target: string }> = [];
  for (const d of req.disks) {
    const hit = d.target ? view.disks.find((x) => x.target === d.target) : await findDiskBySource(view.disks, d.base1Path);
    if (!hit) {
      throw new OnestorError(ErrorCodes.DOMAIN, `domain ${req.domainName} has no disk on ${d.base1Path} (sources: ${view.disks.map((x) => x.source ?? '-').join(', ')})`, { vm: req.vmId, disk: d.diskId, field: 'devices/disk/source' });
    }
    out.push({ ...d, target: hit.target });
  }
  return out;
}

/**
 * True when a failed `backup-begin` may still have begun the job and made the checkpoint: libvirt's answer
 * never arrived (the connection dropped around the call, the call timed out or was aborted). The capture
 * then cleans up as after a begun job; that only ever touches a job whose files lie in this capture's
 * staging dir and the checkpoint of this capture's own name, so it is harmless when nothing was begun.
 */
export function mayHaveBegun(e: unknown): boolean {
  if (!(e instanceof OnestorError) || e.context.field !== 'backup-begin') return false;
  return e.code === ErrorCodes.ABORTED || e.context.virshKind === 'connection' || e.context.exitCode === 124;
}

/**
 * Starts the backup job at the point in time: freezes the guest's filesystems only around `backup-begin`
 * (when asked and a guest agent channel exists), thaws always (twice: a lost reply must not leave the guest
 * frozen; a freeze that failed may have frozen it too, and a kill in between leaves freezeMarkerPath for the
 * next capture), and gives way before starting when a migration wants the domain. Throws when `backup-begin`
 * fails, in which case libvirt created neither job nor checkpoint, unless its answer was lost
 * (mayHaveBegun). Shared by the push and pull captures.
 */
export async function beginJobAtInstant(
  lv: Pick<CaptureLibvirt, 'fsFreeze' | 'fsThaw' | 'backupBegin'>,
  req: Pick<CaptureRequest, 'vmId' | 'domainName' | 'stagingDir' | 'tryFreeze' | 'shouldYield' | 'now' | 'log'>,
  backupXml: string,
  checkpointXml: string,
  reuseExternal: boolean,
  view: { hasGuestAgentChannel: boolean },
): Promise<{ consistency: Consistency; freezeNote?: string; t0: number }> {
  const dom = req.domainName;
  const marker = freezeMarkerPath(req.stagingDir);
  let freezeNote: string | undefined;
  let frozen = false;
  // true from before the freeze until we know the guest is not frozen: a freeze whose answer is an error
  // (timeout, lost connection, unreadable output) may still have frozen it
  let mayBeFrozen = false;
  const hasAgent = req.tryFreeze && view.hasGuestAgentChannel;
  if (!req.tryFreeze) freezeNote = 'freeze disabled';
  else if (!hasAgent) freezeNote = 'no guest agent channel';
  const t0 = (req.now ?? Date.now)();
  giveWay(req, await req.shouldYield?.());
  try {
    if (hasAgent) {
      await writeFile(marker, `${dom}\n`);
      mayBeFrozen = true;
      const r = await lv.fsFreeze(dom).catch((e: unknown) => {
        freezeNote = `freeze failed, thawing after the job began: ${describeError(e)}`;
        return null;
      });
      if (r?.frozen) frozen = true;
      else if (r) {
        freezeNote = r.why;
        mayBeFrozen = false;
        await rm(marker, { force: true });
      }
    }
    await lv.backupBegin(dom, backupXml, checkpointXml, reuseExternal);
  } finally {
    if (mayBeFrozen) await thawGuest(lv, req, marker);
  }
  return { consistency: frozen ? 'filesystem-frozen' : 'crash-consistent', ...(freezeNote !== undefined ? { freezeNote } : {}), t0 };
}

/** Thaws twice (a lost reply must not leave the guest frozen); the marker goes once a thaw answered. */
async function thawGuest(lv: Pick<CaptureLibvirt, 'fsThaw'>, req: Pick<CaptureRequest, 'vmId' | 'domainName' | 'log'>, marker: string): Promise<void> {
  const log = req.log ?? (() => {});
  let answered = false;
  let lastError: unknown;
  for (let i = 0; i < 2; i++) {
    try {
      await lv.fsThaw(req.domainName);
      answered = true;
    } catch (e) {
      lastError = e;
    }
  }
  if (answered) await rm(marker, { force: true }).catch(() => {});
  else log({ vm: req.vmId, err: describeError(lastError) }, 'thaw failed twice; the guest may still be frozen: the next capture of this VM thaws it first');
}

/**
 * A capture interrupted between freeze and thaw (agent killed, both thaws failed) left its marker: thaw
 * before anything else. Fails the capture while the thaw fails, so it is retried and visible.
 */
async function thawAfterInterruptedFreeze(lv: Pick<CaptureLibvirt, 'fsThaw'>, req: Pick<CaptureRequest, 'vmId' | 'domainName' | 'stagingDir' | 'log'>): Promise<void> {
  const marker = freezeMarkerPath(req.stagingDir);
  if (!(await lstat(marker).catch(() => null))) return;
  req.log?.({ vm: req.vmId, domain: req.domainName }, 'thawing the guest: a previous capture was interrupted while its filesystems may have been frozen');
  try {
    await lv.fsThaw(req.domainName);
  } catch (e) {
    throw new OnestorError(ErrorCodes.CAPTURE, `the guest filesystems of domain ${req.domainName} may still be frozen by an interrupted capture and thawing them failed: ${describeError(e)}; will retry`, { vm: req.vmId, field: 'domfsthaw' });
  }
  await rm(marker, { force: true });
}

/**
 * Aborts the domain's job only while it is our backup job (its target or scratch files in our staging dir).
 * `virsh domjobabort` aborts whatever job the domain runs: once ours has ended (aborted by `yield`, or
 * finished), the next job may be the live migration that waited for it, and aborting that would fail the
 * migration ("canceled by client"). False when no job of ours runs.
 */
export async function abortOwnJob(lv: Pick<CaptureLibvirt, 'backupTargets' | 'abortJob'>, dom: string, stagingDir: string): Promise<boolean> {
  if (!isOwnJob(await lv.backupTargets(dom).catch(() => [] as string[]), stagingDir)) return false;
  await lv.abortJob(dom);
  return true;
}

/** Pure: a backup job is ours when every target/scratch file lies in this cycle's staging dir. */
export function isOwnJob(targets: readonly string[], stagingDir: string): boolean {
  const ours = path.resolve(stagingDir) + path.sep;
  return targets.length > 0 && targets.every((t) => path.resolve(t).startsWith(ours));
}

/** Waits until no backup job of ours runs (another job, e.g. a migration, may run: not ours to wait for). */
export async function waitOwnJobGone(lv: Pick<CaptureLibvirt, 'backupTargets'>, dom: string, stagingDir: string, polls: number): Promise<void> {
  for (let i = 0; i < polls && isOwnJob(await lv.backupTargets(dom).catch(() => [] as string[]), stagingDir); i++) await sleep(50);
}

/** A capture that must give way to a migration before its job begins (`reason` from shouldYield). */
function giveWay(req: Pick<CaptureRequest, 'vmId'>, reason: string | null | undefined): void {
  if (reason) throw new OnestorError(ErrorCodes.YIELDED, `capture not started: ${reason}`, { vm: req.vmId });
}

/**
 * What must hold before a capture's job begins, found out at once (one after the other they were 0.3-0.4 s
 * of a seed's critical path): no job of ours left by a killed run (clearStaleJob), no migration under way
 * (the watch scans /proc now; its call right before backup-begin then only re-reads the yield marker, the
 * scan being throttled), and the caller's own check (CaptureRequest.ready).
 */
export async function checksBeforeJob(lv: CaptureLibvirt, req: CaptureRequest): Promise<void> {
  const [, yieldReason] = await Promise.all([clearStaleJob(lv, req), req.shouldYield?.() ?? null, req.ready, thawAfterInterruptedFreeze(lv, req)]);
  giveWay(req, yieldReason);
}

/**
 * A backup job still running from an agent that was killed mid-capture (its targets are in our staging
 * area) is aborted, so this cycle can start; anyone else's job (OpenNebula's own backups) is left alone
 * and this cycle fails with a clear reason, to be retried.
 */
async function clearStaleJob(lv: CaptureLibvirt, req: CaptureRequest): Promise<void> {
  if (!(await lv.jobActive(req.domainName))) return;
  const targets = await lv.backupTargets(req.domainName);
  const ours = path.dirname(path.resolve(req.stagingDir)) + path.sep;
  if (targets.length === 0 || !targets.every((t) => path.resolve(t).startsWith(ours))) {
    throw new OnestorError(ErrorCodes.CAPTURE, `another job is running on domain ${req.domainName}${targets.length ? ` (backup to ${targets.join(', ')})` : ''}; will retry`, { vm: req.vmId });
  }
  req.log?.({ vm: req.vmId, targets: targets.join(',') }, 'aborting a backup job left by a previous run');
  await lv.abortJob(req.domainName);
  for (let i = 0; i < 200 && (await lv.jobActive(req.domainName)); i++) await sleep(50);
}

/**
 * The domain disk that runs on `base1Path`. OpenNebula >= 6.8 names the real path .../disk.N.snap/base.1;
 * older deployments name the DS/VMID/disk.N symlink: both resolve to the same file.
 */
export async function findDiskBySource<T extends { source: string | null }>(disks: readonly T[], base1Path: string): Promise<T | undefined> {
  const want = await realpath(base1Path).catch(() => path.resolve(base1Path));
  for (const x of disks) {
    if (x.source === null) continue;
    if (path.resolve(x.source) === path.resolve(base1Path)) return x;
    if ((await realpath(x.source).catch(() => null)) === want) return x;
  }
  return undefined;
}

function mib(n: number): number {
  return Math.round(n / 1048576);
}
