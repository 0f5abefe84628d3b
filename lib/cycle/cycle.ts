/**
 * One protection cycle for one VM: plan -> capture -> transfer -> publish -> record.
 * Data flows one way; every side effect goes through a port (libvirt, qemu-img, replica, state),
 * so the daemon, the `snapshot` command and the tests drive the same code.
 *
 * Failure rules: a disk that fails keeps its previous snapshot on the replica and its previous
 * checkpoint in libvirt; other disks of the VM go on; staging is always cleaned.
 */
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import type { Logger } from 'pino';
import { findDiskBySource, type CaptureLibvirt, type CaptureRequest, type CaptureResult, type DomainView } from './capture.js';
import type { PullCapture, PulledDisk } from './capture-pull.js';
import { newCheckpointName } from '../libvirt/backup-xml.js';
import { OnestorError, ErrorCodes, describeError, errorCodeOf, type ErrorCode } from '../shared/errors.js';
import { anySignal, throwIfAborted } from '../shared/abort.js';
import { decideMode, checkpointsToDelete, lineageCheck, type ModeDecision } from './plan.js';
import type { QemuImg } from '../libvirt/qemu-img.js';
import type { EligibleDisk, ReplicaManifest, Consistency, CycleMode } from '../shared/model.js';
import type { NodeBitmaps } from '../libvirt/bitmaps.js';
import { clearYieldMarker, migrationWatch, readYieldMarker, redefineCheckpointXml, yieldHolds, type MigrationWatch } from './migration.js';
import { releaseVmDisks } from './release.js';
import { strayBitmaps } from '../libvirt/bitmaps.js';
import { getDisk, recordFailure, recordSuccess, diskKey, type AgentState } from './state.js';
import type { CycleStatePort, DigestPort, LockPort, ReplicaDiskSession, ReplicaPort, StagingPort } from './ports.js';

export type { ReplicaDiskSession, ReplicaPort } from './ports.js';

/** Libvirt operations the cycle needs beyond capture. */
export interface CycleLibvirt extends CaptureLibvirt {
  /** true: bitmap for `target` present and consistent; false: broken/missing; */
  checkpointBitmapHealthy(dom: string, name: string, target: string): Promise<boolean>;
  checkpointXml(dom: string, name: string): Promise<string>;
  checkpointRedefine(dom: string, xml: string): Promise<void>;
  domainRunning(dom: string): Promise<boolean>;
  /** libvirt's numeric id of the running domain (null when not running) */
  domainId(dom: string): Promise<number | null>;
  /** dirty bitmaps QEMU has on the disk running on `file` (null: no such node) */
  diskBitmaps(dom: string, file: string): Promise<NodeBitmaps | null>;
  /** removes one bitmap from a running disk; returns how it was done */
  removeBitmap(dom: string, target: string, node: string, name: string): Promise<string>;
}

export interface CycleDeps {
  libvirt: CycleLibvirt;
  /** virtual size of base.1 (the capture's qemu-img work goes through `staging`) */
  qemuImg: Pick<QemuImg, 'info' | 'checkLive'>;
  /** a connected replica for a REPLICA_HOST (pooled by the caller) */
  replicaFor(replicaHost: string): Promise<ReplicaPort>;
  /**
   * A connection for this cycle alone until release() (a receiver session serves one request and one open
   * disk at a time, and cycles of several VMs run at once). runVmCycle leases one per host and releases
   * it when the cycle ends; without it, replicaFor is used (a caller that runs one cycle at a time).
   */
  leaseReplica?(replicaHost: string): Promise<{ port: ReplicaPort; release(): void }>;
  state: CycleStatePort;
  /** capture into staging, cleanup (production: localCyclePorts() in ports.ts) */
  staging: StagingPort;
  locks: LockPort;
  digests: DigestPort;
  log: Logger;
  hostName: string;
  stagingDirName: string;
  captureTimeoutMs: number;
  /** one disk's uploads (limits.transferTimeoutSec); past it the disk fails with E_TIMEOUT. Default: none. */
  transferTimeoutMs?: number;
  stagingMinFreePercent: number;
  tryFreeze: boolean;
  /**
   * How a cycle with a full takes it: 'pull' (default) streams each disk's thin base.1 from a pull-mode
   * backup export with nothing of disk size written locally; 'push' is the staged push-mode copy + thinning.
   * Cycles with only incrementals always use push mode (measured faster for small changes).
   */
  seedMode?: 'pull' | 'push';
  /** the libvirt URI the adapter uses: the /proc migration watch ignores `virsh -c OTHER migrate` */
  libvirtUri?: string;
  /** how long a cycle waits for another cycle of the same VM on this host (default 600 s) */
  vmLockWaitSec?: number;
  now?: () => number;
}

export interface VmCycleRequest {
  vmId: number;
  domainName: string;
  dsDir: string;
  disks: EligibleDisk[];
  forceFull?: boolean;
  signal?: AbortSignal;
  onProgress?: (diskId: number, sent: number, total: number) => void;
}

export interface DiskOutcome {
  vmId: number;
  diskId: number;
  ok: boolean;
  mode?: CycleMode;
  reason?: string;
  bytes?: number;
  durationMs: number;
  consistency?: Consistency;
  checkpoint?: string;
  capturedAt?: number;
  error?: { code: ErrorCode; message: string };
}

interface DiskWork {
  disk: EligibleDisk;
  target: string;
  replica: ReplicaPort;
  decision: ModeDecision;
  base1DevIno: string;
  baseSha: string;
  baseSize: number;
  virtualSize: number;
}

/**
 * One cycle of a VM, under a host-side per-VM lock (DS/.onestor/VMID.lock, released when the process dies):
 * a `snapshot` run beside the daemon waits for the daemon's cycle instead of racing it, and a backup job
 * found running while we hold the lock can only be a leftover of a dead agent.
 */
export async function runVmCycle(deps: CycleDeps, req: VmCycleRequest): Promise<DiskOutcome[]> {
  const root = path.join(req.dsDir, deps.stagingDirName);
  let lock: { release(): Promise<void> };
  try {
    lock = await deps.locks.lockVm(root, req.vmId, { timeoutSec: deps.vmLockWaitSec ?? 600, signal: req.signal });
  } catch (e) {
    const error = { code: errorCodeOf(e), message: `another cycle of VM ${req.vmId} is running on this host: ${describeError(e)}` };
    return req.disks.map((d) => ({ vmId: req.vmId, diskId: d.diskId, ok: false, durationMs: 0, error }));
  }
  // The cycle's own replica connections: leased at first use, given back when it ends.
  const leased = deps.leaseReplica ? cycleLeases(deps.leaseReplica) : null;
  const scoped: CycleDeps = leased ? { ...deps, replicaFor: leased.replicaFor } : deps;
  try {
    return await cycleUnderLock(scoped, req);
  } finally {
    await leased?.releaseAll();
    await lock.release();
  }
}

type Lease = { port: ReplicaPort; release(): void };

/**
 * One cycle's replica connections: one lease per host, taken at first use and kept for the cycle. A
 * session that ended meanwhile (an upload that failed or gave way drops its channel) goes back to the
 * pool, which discards it, and the next use leases a new one: releasing a lineage after a yield needs a
 * live session. A lease that failed holds nothing and is tried again by the next use.
 */
export function cycleLeases(lease: (host: string) => Promise<Lease>): { replicaFor(host: string): Promise<ReplicaPort>; releaseAll(): Promise<void> } {
  const leases = new Map<string, Promise<Lease>>();
  return {
    replicaFor: async (host) => {
      let l = leases.get(host);
      const held = l ? await l.catch(() => null) : null;
      if (held && held.port.connected === false) {
        leases.delete(host);
        held.release();
        l = undefined;
      }
      if (!l) {
        const fresh = lease(host);
        leases.set(host, fresh);
        fresh.catch(() => leases.get(host) === fresh && leases.delete(host));
        l = fresh;
      }
      return (await l).port;
    },
    releaseAll: async () => {
      for (const l of leases.values()) (await l.catch(() => null))?.release();
      leases.clear();
    },
  };
}

async function cycleUnderLock(deps: CycleDeps, req: VmCycleRequest): Promise<DiskOutcome[]> {
  const now = deps.now ?? Date.now;
  const t0 = now();
  const { vmId, domainName: dom } = req;
  const log = deps.log.child({ vm: vmId });
  const stagingDir = path.join(req.dsDir, deps.stagingDirName, String(vmId));
  const outcomes = new Map<number, DiskOutcome>();
  const uncertain = new Map<number, string>();
  /** fulls forced by someone else's publish: kept in state (lineageAlert) and shown by the probe */
  const alerts = new Map<number, { at: number; kind: string; reason: string }>();
  const fail = (diskId: number, e: unknown) => {
    if (outcomes.get(diskId)?.ok === false) return;
    outcomes.set(diskId, { vmId, diskId, ok: false, durationMs: now() - t0, error: { code: errorCodeOf(e), message: describeError(e) } });
  };
  let state: AgentState = (await deps.state.loadOrReset()).state;
  const work: DiskWork[] = [];
  let captured: (Omit<CaptureResult, 'disks'> & { disks: Array<{ diskId: number; mode: CycleMode; file?: string; pulled?: PulledDisk }> }) | null = null;
  let pull: PullCapture | null = null;
  /** the pull job's end, once started (endPullEarly) */
  let pullEnding: Promise<void> | null = null;
  let domDisks: DomainView['disks'] = [];
  let domView: DomainView | null = null;
  // Stray bitmaps can only appear when a lineage ends or changes hands: a full, a host change, a redefine.
  // Only then ask QEMU for the disk's bitmaps (QMP: libvirt marks the domain tainted on first use).
  let sweepBitmaps = false;
  /** the capture's migration watch: the destination of a migration seen in /proc, to release lineages to */
  let watch: MigrationWatch | null = null;
  let checkpoints: string[] = [];
  const manifestsByHost = new Map<string, ReplicaManifest[]>();
  const localFacts = new Map<number, ReturnType<typeof gatherLocalFacts>>();
  /** each disk's target and base.1 info, the part of its facts a capture needs (not the base digest) */
  const captureFacts = new Map<number, Promise<{ target: string; info: { virtualSize: number; bitmaps: string[] } }>>();
  const sourceChecks = new Map<number, Promise<void>>();
  /** a seed's capture begun before the replica answered (captureEarly), until adopted or discarded */
  let early: Promise<PullCapture | null> | null = null;
  // One connection attempt and one status per replica host and cycle, started at once: a cold connection
  // (SSH and the receiver's start) costs as much as the libvirt queries it now overlaps, and a replica that
  // is down costs one connect timeout, not one per use. A failure is each disk's own (when it asks).
  const perHost = new Map<string, Promise<{ replica: ReplicaPort; manifests: ReplicaManifest[] }>>();
  const manifestsFor = (host: string): Promise<{ replica: ReplicaPort; manifests: ReplicaManifest[] }> => {
    let p = perHost.get(host);
    if (!p) {
      p = (async () => {
        const replica = await deps.replicaFor(host);
        const manifests = await replica.status(vmId);
        manifestsByHost.set(host, manifests);
        return { replica, manifests };
      })();
      p.catch(() => {});
      perHost.set(host, p);
    }
    return p;
  };
  for (const d of req.disks) void manifestsFor(d.replicaHost);

  log.info({ disks: req.disks.map((d) => d.diskId).join(','), forceFull: Boolean(req.forceFull) }, 'cycle start');
  try {
    // The read-only queries a cycle starts with, made at once: one after the other they were 0.4-0.5 s of a
    // seed's critical path (each virsh call ~0.1 s here). Their answers are taken in the order below, so a
    // domain that does not run still fails as that, whatever else failed with it.
    const running = deps.libvirt.domainRunning(dom);
    const markerRead = readYieldMarker(deps.state.dir, vmId);
    const viewRead = deps.libvirt.domainView(dom);
    const checkpointsRead = deps.libvirt.checkpointNames(dom);
    for (const p of [markerRead, viewRead, checkpointsRead]) p.catch(() => {});
    if (!(await running)) {
      throw new OnestorError(ErrorCodes.DOMAIN, `domain ${dom} is not running`, { vm: vmId });
    }
    // Give way to a live migration (migration.ts): a yield marker holds cycles off while the domain is
    // still here; once it has left (or came back as a new QEMU) the marker is stale and goes.
    const marker = await markerRead;
    if (marker) {
      const domId = await deps.libvirt.domainId(dom).catch(() => null);
      if (yieldHolds(marker, now() / 1000, domId)) {
        throw new OnestorError(ErrorCodes.YIELDED, `held off for a live migration until ${new Date(marker.until * 1000).toISOString()} (${marker.reason})`, { vm: vmId });
      }
      await clearYieldMarker(deps.state.dir, vmId).catch(() => {});
    }
    const view = await viewRead;
    domView = view;
    domDisks = view.disks;
    // What each disk's plan needs from this host alone, gathered while the replica connection comes up
    // (its answer is what the plan waits for); a failure is that disk's own, when its turn comes.
    for (const disk of req.disks) {
      const facts = gatherLocalFacts(disk);
      facts.catch(() => {});
      localFacts.set(disk.diskId, facts);
    }
    checkpoints = await checkpointsRead;
    if (mayCaptureEarly()) early = captureEarly();

    // A capture begun early stands only when the replica holds nothing for any of the disks (the plan then
    // takes a full of each); otherwise it goes before anything else touches the domain's checkpoints.
    if (early) {
      const lineages = await Promise.all(req.disks.map((d) => manifestsFor(d.replicaHost).then((r) => r.manifests.some((m) => m.diskId === d.diskId), () => true)));
      if (lineages.some(Boolean)) await discardEarly('the replica holds a lineage');
    }

    // Learn where each disk's lineage stands on the replica (no lock yet: the lock is taken per disk
    // for the transfer, and the receiver refuses an incremental whose parent is no longer what it holds).
    await redefineFromManifests();
    for (const disk of req.disks) {
      try {
        const { replica, manifests } = await manifestsFor(disk.replicaHost);
        const manifest = manifests.find((m) => m.diskId === disk.diskId) ?? null;
        const ds = getDisk(state, vmId, disk.diskId);
        const { target, base1, baseDigest, info } = await localFacts.get(disk.diskId)!;

        const replicaCk = manifest?.checkpoint ?? null;
        // Transient domains (virsh create) lose checkpoint metadata on destroy+create while the bitmap
        // stays in base.1: put the saved definition back before deciding.
        if (replicaCk && !checkpoints.includes(replicaCk) && ds.checkpoint === replicaCk && ds.checkpointXml) {
          try {
            await deps.libvirt.checkpointRedefine(dom, withoutMissingParent(ds.checkpointXml, checkpoints));
            checkpoints = await deps.libvirt.checkpointNames(dom);
            log.info({ disk: disk.diskId, checkpoint: replicaCk }, 'checkpoint metadata redefined from saved XML');
          } catch (e) {
            log.warn({ disk: disk.diskId, checkpoint: replicaCk, err: describeError(e) }, 'could not redefine checkpoint; will take a full');
          }
        }
        const onReplica = manifest?.base ?? null;
        const replicaBaseMatches = onReplica !== null && onReplica.sha256 === baseDigest.sha256 && onReplica.size === baseDigest.size;
        let bitmapHealthy: boolean | null = null;
        if (replicaCk && checkpoints.includes(replicaCk)) {
          bitmapHealthy = await deps.libvirt.checkpointBitmapHealthy(dom, replicaCk, target).catch(() => false);
        }
        const lineageFromAnotherHost = manifest?.sourceHost !== undefined && manifest.sourceHost !== deps.hostName;
        const decision = decideMode({
          lineageFromAnotherHost,
          forceFull: Boolean(req.forceFull),
          stateCheckpoint: ds.checkpoint,
          replicaCheckpoint: replicaCk,
          libvirtCheckpoints: checkpoints,
          bitmapHealthy,
          base1IdentityThen: ds.checkpoint === replicaCk || ds.uncertainCheckpoint === replicaCk ? ds.base1Identity : null,
          base1IdentityNow: base1.devIno,
          replicaBaseMatches,
          selfIdentity: replica.writer ?? null,
          replicaOwner: manifest?.owner ?? null,
          replicaToken: manifest?.token ?? null,
          replicaRelease: manifest?.release ?? null,
          stateToken: ds.replicaToken ?? null,
          uncertainCheckpoint: ds.uncertainCheckpoint ?? null,
        });
        // Someone else's publish is an alert (state, probe); a lineage from before ownership existed is not
        // (its full is the one-time upgrade step, reason in the log and in lastSuccess.reason).
        if (decision.mode === 'full' && decision.alert && decision.alert !== 'unowned') {
          alerts.set(disk.diskId, { at: Math.floor(now() / 1000), kind: decision.alert, reason: decision.reason });
          log.warn({ disk: disk.diskId, owner: manifest?.owner ?? null, self: replica.writer ?? null, reason: decision.reason }, 'replica lineage is not ours: full snapshot');
        }
        // Never publish a damaged source over a good snapshot: after a host change (a live migration's
        // pre-sync can leave the destination's qcow2 metadata inconsistent) and before any full.
        const hostChanged = lineageFromAnotherHost || (ds.base1Identity !== null && ds.base1Identity !== base1.devIno);
        if (decision.mode === 'full' || hostChanged) sweepBitmaps = true;
        if (decision.mode === 'full' || hostChanged) await checkSourceOnce(disk.diskId, disk.base1Path, decision.mode === 'full' ? 'before a full' : 'after a host change');
        work.push({ disk, target, replica, decision, base1DevIno: base1.devIno, baseSha: baseDigest.sha256, baseSize: baseDigest.size, virtualSize: info.virtualSize });
        if (decision.mode === 'full' && !req.forceFull) log.info({ disk: disk.diskId, reason: decision.reason }, 'full snapshot');
      } catch (e) {
        fail(disk.diskId, e);
      }
    }
    // it holds every disk of the request: it stands if each of them is planned as a full
    if (early && !(work.length === req.disks.length && work.every((w) => w.decision.mode === 'full'))) {
      await discardEarly('the plan differs');
    }
    if (work.length === 0) return finish();

    const checkpointName = newCheckpointName(vmId, now(), randomBytes(3).toString('hex'));
    watch ??= newMigrationWatch();
    try {
      const captureReq: CaptureRequest = {
        vmId,
        domainName: dom,
        stagingDir,
        checkpointName,
        tryFreeze: deps.tryFreeze,
        timeoutMs: deps.captureTimeoutMs,
        minFreePercent: deps.stagingMinFreePercent,
        domain: view,
        signal: req.signal,
        shouldYield: watch,
        now,
        log: (o, m) => log.warn(o, m),
        disks: work.map((w) => ({
          diskId: w.disk.diskId,
          base1Path: w.disk.base1Path,
          target: w.target,
          snapDir: w.disk.snapDir,
          mode: w.decision.mode,
          parentCheckpoint: w.decision.mode === 'incremental' ? w.decision.parent : undefined,
          virtualSize: w.virtualSize,
        })),
      };
      // a capture begun early (captureEarly) that the plan confirmed; null when there is none
      const adopted = early ? await early.finally(() => (early = null)) : null;
      if (adopted || ((deps.seedMode ?? 'pull') === 'pull' && work.some((w) => w.decision.mode === 'full'))) {
        pull = adopted ?? (await deps.staging.capturePull(captureReq));
        captured = { ...pull, thinMs: 0, disks: pull.disks.map((d) => ({ diskId: d.diskId, mode: d.mode, pulled: d })) };
        for (const d of pull.disks) log.info({ disk: d.diskId, mode: d.mode, streamBytes: d.size, dataBytes: d.dataBytes, zeroBytes: d.zeroBytes, ...(adopted ? { beganEarly: true } : {}) }, 'streaming from the pull-mode export');
      } else {
        captured = await deps.staging.capture(captureReq);
      }
    } catch (e) {
      for (const w of work) fail(w.disk.diskId, e);
      return finish();
    }
    log.info({ checkpoint: captured.checkpoint, consistency: captured.consistency, ms: captured.jobMs, thinMs: captured.thinMs, note: captured.freezeNote }, 'captured');
    const capturedAt = Math.floor(captured.capturedAtMs / 1000);

    // Transfer and publish disk by disk, each under its replica lock: one disk's failure does not
    // stop the others.
    const lastStreamed = work.filter((w) => captured!.disks.some((d) => d.diskId === w.disk.diskId && d.pulled)).at(-1);
    for (const w of work) {
      const cd = captured.disks.find((d) => d.diskId === w.disk.diskId)!;
      const dt0 = now();
      let session: ReplicaDiskSession | null = null;
      let publishSent = false;
      // a pull-mode seed's watchdog stop ends every upload made while the export exists (the base too)
      const deadline = transferDeadline([req.signal, pull?.signal], deps.transferTimeoutMs);
      try {
        throwIfAborted(pull?.signal, 'seed stopped');
        session = await w.replica.openDisk(vmId, w.disk.diskId);
        const progress = (sent: number, total: number) => req.onProgress?.(w.disk.diskId, sent, total);
        let bytes = 0;
        let publishAt = 0;
        let manifest: ReplicaManifest;
        const baseOk = session.baseOnReplica !== null && session.baseOnReplica.sha256 === w.baseSha && session.baseOnReplica.size === w.baseSize;
        if (cd.mode === 'full') {
          let baseKey: string | undefined;
          if (!baseOk) {
            baseKey = `base-${w.baseSha.slice(0, 32)}`;
            const r = await session.upload('base', w.disk.basePath, { key: baseKey, sha256: w.baseSha, signal: deadline.signal, onProgress: progress });
            bytes += r.bytes - r.resumedFrom;
          }
          const r1 = cd.pulled
            ? await session.uploadStream('base1', { size: cd.pulled.size, chunks: cd.pulled.stream(deadline.signal) }, { key: `${captured.checkpoint}.base1`, signal: deadline.signal, onProgress: progress })
            : await session.upload('base1', cd.file!, { key: `${captured.checkpoint}.base1`, signal: deadline.signal, onProgress: progress });
          bytes += r1.bytes - r1.resumedFrom;
          if (w === lastStreamed) endPullEarly();
          publishSent = true;
          publishAt = now();
          manifest = await session.publishFull({ checkpoint: captured.checkpoint, capturedAt, consistency: captured.consistency, sourceHost: deps.hostName, base: baseKey, base1: `${captured.checkpoint}.base1` });
        } else {
          const parent = (w.decision as { parent: string }).parent;
          if (!baseOk || (session.manifest?.checkpoint ?? null) !== parent) {
            throw new OnestorError(ErrorCodes.PARENT, `replica changed since planning (holds ${session.manifest?.checkpoint ?? 'nothing'}, base ${baseOk ? 'same' : 'different'}); next cycle takes a full`, { vm: vmId, disk: w.disk.diskId });
          }
          // Planning read the manifest without the lock: check owner and token again under it.
          const ds = getDisk(state, vmId, w.disk.diskId);
          const again = lineageCheck({
            forceFull: false, stateCheckpoint: ds.checkpoint, replicaCheckpoint: parent, libvirtCheckpoints: checkpoints, bitmapHealthy: true,
            base1IdentityThen: null, base1IdentityNow: '', replicaBaseMatches: true,
            selfIdentity: w.replica.writer ?? null, replicaOwner: session.manifest?.owner ?? null, replicaToken: session.manifest?.token ?? null, replicaRelease: session.manifest?.release ?? null,
            stateToken: ds.replicaToken ?? null, uncertainCheckpoint: ds.uncertainCheckpoint ?? null,
          });
          if (again) throw new OnestorError(ErrorCodes.PARENT, `replica changed since planning (${again.reason}); next cycle takes a full`, { vm: vmId, disk: w.disk.diskId });
          const r = cd.pulled
            ? await session.uploadStream('inc', { size: cd.pulled.size, chunks: cd.pulled.stream(deadline.signal) }, { key: `${captured.checkpoint}.inc`, signal: deadline.signal, onProgress: progress })
            : await session.upload('inc', cd.file!, { key: `${captured.checkpoint}.inc`, signal: deadline.signal, onProgress: progress });
          bytes += r.bytes - r.resumedFrom;
          if (w === lastStreamed) endPullEarly();
          publishSent = true;
          publishAt = now();
          manifest = await session.publishIncremental({ parentCheckpoint: parent, checkpoint: captured.checkpoint, capturedAt, consistency: captured.consistency, sourceHost: deps.hostName, inc: `${captured.checkpoint}.inc` });
        }
        if (manifest.checkpoint !== captured.checkpoint) {
          throw new OnestorError(ErrorCodes.PROTOCOL, `replica confirmed ${manifest.checkpoint}, expected ${captured.checkpoint}`, { vm: vmId, disk: w.disk.diskId });
        }
        const durationMs = now() - t0;
        outcomes.set(w.disk.diskId, { vmId, diskId: w.disk.diskId, ok: true, mode: cd.mode, reason: w.decision.reason, bytes, durationMs, consistency: captured.consistency, checkpoint: captured.checkpoint, capturedAt });
        const k = diskKey(vmId, w.disk.diskId);
        state.disks[k] = recordSuccess({ ...getDisk(state, vmId, w.disk.diskId), domainName: dom, freqSeconds: w.disk.freqSeconds, replicaHost: w.disk.replicaHost }, {
          checkpoint: captured.checkpoint,
          base1Identity: w.base1DevIno,
          capturedAt,
          finishedAt: Math.floor(now() / 1000),
          durationMs,
          bytes,
          mode: cd.mode,
          consistency: captured.consistency,
          reason: w.decision.reason,
          ...(manifest.token ? { token: manifest.token } : {}),
        });
        log.info({ disk: w.disk.diskId, mode: cd.mode, bytes, ms: now() - dt0, transferMs: publishAt - dt0, publishMs: now() - publishAt, checkpoint: captured.checkpoint }, 'disk published');
      } catch (e) {
        // our own deadline is a failure of this disk, not a shutdown (which E_ABORTED means)
        fail(w.disk.diskId, deadline.expired() && errorCodeOf(e) === ErrorCodes.ABORTED ? new OnestorError(ErrorCodes.TIMEOUT, `transfer not done within ${deps.transferTimeoutMs! / 1000} s (limits.transferTimeoutSec)`, { vm: vmId, disk: w.disk.diskId, cause: describeError(e) }) : e);
        // The replica may have published before the link died: keep this checkpoint until it tells us.
        if (publishSent) uncertain.set(w.disk.diskId, captured.checkpoint);
      } finally {
        deadline.dispose();
        await session?.close().catch(() => {});
      }
    }
    return finish();
  } catch (e) {
    for (const d of req.disks) fail(d.diskId, e);
    // a status still in flight must end before the connection serves anyone else (one request at a time)
    await Promise.allSettled(perHost.values());
    return finish();
  }

  async function finish(): Promise<DiskOutcome[]> {
    // a disk that failed on the replica's side may still be hashing its base: let it end (and be cached)
    await Promise.allSettled(localFacts.values());
    if (early) await discardEarly('the cycle ended before using it');
    if (pull) {
      // the export must be gone before checkpoints are retired (and so that a migration can proceed)
      await (pullEnding ?? pull.end()).catch((e) => log.warn({ err: describeError(e) }, 'ending the pull-mode backup job failed'));
      log.info({ stagingPeakBytes: pull.stagingPeak() }, 'pull-mode backup job ended');
    }
    await deps.staging.clean(stagingDir).catch(() => {});
    // We gave way to a migration we saw in /proc (no hook ran `yield --to`), at capture or while a seed
    // streamed: release those disks' lineages to the destination it names, so that host continues them
    // with an incremental. Only now: the job is gone, so the release never delays the migration.
    const to = watch?.destination() ?? null;
    const gaveWay = work.filter((w) => outcomes.get(w.disk.diskId)?.error?.code === ErrorCodes.YIELDED);
    if (to && gaveWay.length) {
      await releaseVmDisks({ vmId, disks: gaveWay.map((w) => ({ diskId: w.disk.diskId, replicaHost: w.disk.replicaHost })), to, replicaFor: deps.replicaFor, log }).catch(() => {});
    }
    if (captured) {
      // Retire our checkpoints no disk of this VM builds on any more (leaf first, one at a time), then
      // save the new checkpoint's definition: dumped after retirement so it names no deleted parent,
      // ready for `checkpoint-create --redefine` when a transient domain loses its metadata.
      const left = await retireCheckpoints().catch((e) => {
        log.warn({ err: describeError(e) }, 'checkpoint cleanup failed');
        return null;
      });
      // The sweep and the dump touch different things (stray bitmaps belong to no checkpoint): made at once.
      const saveXml = async () => {
        if (![...outcomes.values()].some((o) => o.ok)) return;
        try {
          const xml = await deps.libvirt.checkpointXml(dom, captured!.checkpoint);
          for (const o of outcomes.values()) if (o.ok) state.disks[diskKey(vmId, o.diskId)]!.checkpointXml = xml;
        } catch (e) {
          log.warn({ err: describeError(e) }, 'could not save checkpoint XML (redefine after a transient restart will not be possible)');
        }
      };
      await Promise.all([sweepBitmaps ? removeStrayBitmaps(left).catch((e) => log.warn({ err: describeError(e) }, 'stray bitmap cleanup failed')) : null, saveXml()]);
    }
    // Merge into the latest file: another writer (daemon marks, a CLI run) may have updated other disks.
    state = await deps.state.update((fresh) => {
      for (const [p, v] of Object.entries(state.baseDigests)) fresh.baseDigests[p] = v;
      for (const d of req.disks) {
        const o = outcomes.get(d.diskId);
        const k = diskKey(vmId, d.diskId);
        if (o?.ok) fresh.disks[k] = { ...state.disks[k]!, nextDueAt: fresh.disks[k]?.nextDueAt, queuedSince: undefined };
        else if (o?.error && (o.error.code === ErrorCodes.ABORTED || o.error.code === ErrorCodes.YIELDED)) {
          // stopped by SIGTERM/SIGINT, or gave way to a live migration: not a failure of the disk; the
          // previous snapshot stands (the daemon retries later, on whichever host then runs the VM)
          fresh.disks[k] = { ...getDisk(fresh, vmId, d.diskId), phase: undefined, progress: undefined };
        } else if (o?.error) {
          fresh.disks[k] = recordFailure({ ...getDisk(fresh, vmId, d.diskId), domainName: dom, freqSeconds: d.freqSeconds, replicaHost: d.replicaHost, uncertainCheckpoint: uncertain.get(d.diskId) ?? getDisk(fresh, vmId, d.diskId).uncertainCheckpoint }, o.error, Math.floor(now() / 1000));
        }
        const alert = alerts.get(d.diskId);
        if (alert) fresh.disks[k] = { ...getDisk(fresh, vmId, d.diskId), lineageAlert: alert };
      }
      return fresh;
    });
    for (const o of outcomes.values()) {
      if (o.error?.code === ErrorCodes.ABORTED) log.info({ disk: o.diskId }, 'disk cycle aborted; previous snapshot stands');
      else if (o.error?.code === ErrorCodes.YIELDED) log.warn({ disk: o.diskId, code: o.error.code, err: o.error.message }, 'disk cycle gave way to a live migration; previous snapshot stands');
      else if (o.error) log.error({ disk: o.diskId, code: o.error.code, err: o.error.message }, 'disk failed');
    }
    const list = req.disks.map((d) => outcomes.get(d.diskId) ?? { vmId, diskId: d.diskId, ok: false, durationMs: now() - t0, error: { code: ErrorCodes.INTERNAL, message: 'no outcome' } });
    const aborted = list.filter((o) => o.error?.code === ErrorCodes.ABORTED || o.error?.code === ErrorCodes.YIELDED).length;
    log.info({ ok: list.filter((o) => o.ok).length, failed: list.filter((o) => !o.ok).length - aborted, ...(aborted ? { aborted } : {}), ms: now() - t0 }, 'cycle end');
    return list;
  }

  /**
   * After a migration libvirt on this host knows none of the VM's checkpoints, though their bitmaps came
   * with base.1. Rebuild the definition of the checkpoint the replica holds from its manifest (one
   * definition per checkpoint, covering every disk whose manifest names it), so the bitmap check below can
   * prove continuity. A disk whose saved definition matches is redefined from that instead (later).
   */
  async function redefineFromManifests(): Promise<void> {
    const groups = new Map<string, { capturedAt: number; targets: string[] }>();
    for (const disk of req.disks) {
      try {
        const { manifests } = await manifestsFor(disk.replicaHost);
        const m = manifests.find((x) => x.diskId === disk.diskId);
        const ds = getDisk(state, vmId, disk.diskId);
        if (!m?.checkpoint || checkpoints.includes(m.checkpoint)) continue;
        if (ds.checkpoint === m.checkpoint && ds.checkpointXml) continue;
        const target = (await findDiskBySource(domDisks, disk.base1Path))?.target;
        if (!target) continue;
        const g = groups.get(m.checkpoint) ?? { capturedAt: m.capturedAt, targets: [] };
        g.targets.push(target);
        groups.set(m.checkpoint, g);
      } catch {
        // that disk's own planning reports the problem
      }
    }
    for (const [name, g] of groups) {
      try {
        await deps.libvirt.checkpointRedefine(dom, redefineCheckpointXml(name, g.capturedAt, g.targets, domDisks.map((d) => d.target)));
        log.info({ checkpoint: name, targets: g.targets.join(',') }, 'checkpoint redefined from the replica manifest (its bitmap travels with the disk)');
      } catch (e) {
        log.warn({ checkpoint: name, err: describeError(e) }, 'could not redefine the replica\'s checkpoint; full');
      }
    }
    if (groups.size) {
      sweepBitmaps = true;
      checkpoints = await deps.libvirt.checkpointNames(dom);
    }
  }

  /**
   * Every export has been read to its end: the job can go while the replica verifies and publishes (it
   * needs nothing more from the domain, and a migration need not wait for that). finish() waits for it.
   */
  function endPullEarly(): void {
    if (pull && !pullEnding) {
      pullEnding = pull.end();
      pullEnding.catch(() => {});
    }
  }

  /** The disk's facts on this host: its target in the domain, base.1's identity, base's digest, base.1's info. */
  async function gatherLocalFacts(disk: VmCycleRequest['disks'][number]) {
    const forCapture = (async () => {
      const target = (await findDiskBySource(domDisks, disk.base1Path))?.target;
      if (!target) throw new OnestorError(ErrorCodes.DOMAIN, `domain ${dom} does not run on ${disk.base1Path}`, { vm: vmId, disk: disk.diskId, field: 'devices/disk/source' });
      return { target, info: await deps.qemuImg.info(disk.base1Path, { shared: true }) };
    })();
    forCapture.catch(() => {});
    captureFacts.set(disk.diskId, forCapture);
    const { target, info } = await forCapture;
    const [base1, baseDigest] = await Promise.all([
      deps.digests.identity(disk.base1Path),
      deps.digests.sha256(disk.basePath, state.baseDigests[disk.basePath], req.signal).then((d) => {
        // kept even when the replica then fails this cycle: the next one does not hash the image again
        if (!d.fromCache) state.baseDigests[disk.basePath] = { sha256: d.sha256, size: d.size, identity: d.identity };
        return d;
      }),
    ]);
    return { target, base1, baseDigest, info };
  }

  function newMigrationWatch(): MigrationWatch {
    return migrationWatch({ stateDir: deps.state.dir, vmId, domain: dom, vmDir: req.disks[0]!.vmDir, domainId: () => deps.libvirt.domainId(dom), ...(deps.libvirtUri ? { libvirtUri: deps.libvirtUri } : {}) });
  }

  /**
   * A VM this host has never protected, seeded in pull mode: nothing here says the replica holds anything
   * for it (no state, no checkpoint in libvirt, no bitmap in any base.1 file), so the plan will almost surely
   * take a full of every disk. Its capture can then begin while the replica connection comes up, which
   * costs as much (SSH, the receiver's start) and is what the plan waits for.
   */
  function mayCaptureEarly(): boolean {
    if ((deps.seedMode ?? 'pull') !== 'pull' || checkpoints.length > 0) return false;
    return req.disks.every((d) => {
      const ds = getDisk(state, vmId, d.diskId);
      return ds.checkpoint === null && !ds.uncertainCheckpoint;
    });
  }

  /** The full capture of every disk of the request, begun before the plan (mayCaptureEarly). */
  function captureEarly(): Promise<PullCapture | null> {
    const capture = (async () => {
      // the check the plan makes before any full, begun here (the plan reuses its outcome); the job begins
      // only once it passed (capturePull awaits it with its own checks)
      const checked = Promise.all(req.disks.map((d) => checkSourceOnce(d.diskId, d.base1Path, 'before a full')));
      checked.catch(() => {});
      const facts = await Promise.all(req.disks.map((d) => captureFacts.get(d.diskId)!));
      // a bitmap in a base.1 file: a lineage may go on from it (a migrated VM); leave it to the plan
      if (facts.some((f) => f.info.bitmaps.length > 0)) return null;
      watch ??= newMigrationWatch();
      const c = await deps.staging.capturePull({
        vmId,
        domainName: dom,
        stagingDir,
        checkpointName: newCheckpointName(vmId, now(), randomBytes(3).toString('hex')),
        tryFreeze: deps.tryFreeze,
        timeoutMs: deps.captureTimeoutMs,
        minFreePercent: deps.stagingMinFreePercent,
        domain: domView!,
        signal: req.signal,
        shouldYield: watch,
        now,
        log: (o, m) => log.warn(o, m),
        ready: checked,
        disks: req.disks.map((d, i) => ({ diskId: d.diskId, base1Path: d.base1Path, target: facts[i]!.target, snapDir: d.snapDir, mode: 'full' as const, virtualSize: facts[i]!.info.virtualSize })),
      });
      // The export holds the domain's job while the replica connection may still be coming up: when the
      // watchdog stops the seed (a migration wants the domain, scratch space) the job ends at once, not
      // when the plan gets to it (a migration waits at most 30 s for the job). Streaming then ends with
      // the watchdog's reason, as for any seed it stops.
      c.signal.addEventListener('abort', () => void c.end().catch(() => {}), { once: true });
      return c;
    })();
    capture.catch(() => {});
    return capture;
  }

  /** Ends a capture begun early that the plan does not use: its job, staging and checkpoint go. */
  async function discardEarly(why: string): Promise<void> {
    const e = early;
    early = null;
    // a capture that failed has ended its job and deleted its checkpoint itself (capturePull)
    const c = await e?.catch(() => null);
    if (!c) return;
    log.info({ checkpoint: c.checkpoint, why }, 'capture begun before the plan not used; ended');
    await c.end().catch((err) => log.warn({ err: describeError(err) }, 'ending the early pull-mode backup job failed'));
    // `checkpoints` was read before this capture made its checkpoint, and stays right once it is deleted
    await deps.libvirt.checkpointDelete(dom, c.checkpoint).catch(() => deps.libvirt.checkpointDelete(dom, c.checkpoint, { metadataOnly: true }).catch(() => {}));
  }

  /** checkSource once per disk and cycle (the early capture and the plan both need it before a full). */
  function checkSourceOnce(diskId: number, file: string, why: string): Promise<void> {
    let p = sourceChecks.get(diskId);
    if (!p) {
      p = checkSource(diskId, file, why);
      sourceChecks.set(diskId, p);
    }
    return p;
  }

  /** qemu-img check -U of the host's base.1, retried once (a write in flight can look like an error). */
  async function checkSource(diskId: number, file: string, why: string): Promise<void> {
    let r = await deps.qemuImg.checkLive(file);
    if (r.corruptions > 0) {
      await new Promise((res) => setTimeout(res, 1000));
      r = await deps.qemuImg.checkLive(file);
    }
    log.info({ disk: diskId, file, why, ms: r.ms, corruptions: r.corruptions, leaks: r.leaks }, 'source image checked');
    if (r.corruptions > 0) {
      throw new OnestorError(
        ErrorCodes.SOURCE_DAMAGED,
        `qemu-img check -U found ${r.corruptions} error(s) in the VM's running image (${why}), twice: ${r.errors.join('; ') || 'see qemu-img check'}; the replica keeps its last good snapshot. Check the image (e.g. qemu-img check after a shutdown) before the next cycle overwrites anything`,
        { vm: vmId, disk: diskId, file },
      );
    }
  }

  /**
   * Our bitmaps that no kept checkpoint owns (left by another host, an aborted job, a full after a migration).
   * `known`: the domain's checkpoint names as retireCheckpoints left them (null: ask libvirt).
   */
  async function removeStrayBitmaps(known: readonly string[] | null): Promise<void> {
    const keep = new Set<string>(known ?? (await deps.libvirt.checkpointNames(dom)));
    for (const d of Object.values(state.disks)) {
      if (d.vmId !== vmId) continue;
      if (d.checkpoint) keep.add(d.checkpoint);
      if (d.uncertainCheckpoint) keep.add(d.uncertainCheckpoint);
    }
    for (const c of uncertain.values()) keep.add(c);
    for (const ms of manifestsByHost.values()) for (const m of ms) if (m.checkpoint) keep.add(m.checkpoint);
    for (const disk of req.disks) {
      const target = (await findDiskBySource(domDisks, disk.base1Path))?.target;
      const nb = await deps.libvirt.diskBitmaps(dom, disk.base1Path);
      if (!target || !nb) continue;
      for (const b of strayBitmaps(nb.bitmaps, vmId, keep)) {
        const how = await deps.libvirt.removeBitmap(dom, target, nb.node, b.name);
        log.info({ disk: disk.diskId, bitmap: b.name, how }, 'stray bitmap removed');
      }
    }
  }

  async function retireCheckpoints(): Promise<string[]> {
    const needed = new Set<string>();
    for (const d of Object.values(state.disks)) {
      if (d.vmId !== vmId) continue;
      if (d.checkpoint) needed.add(d.checkpoint);
      if (d.uncertainCheckpoint) needed.add(d.uncertainCheckpoint);
    }
    for (const c of uncertain.values()) needed.add(c);
    const all = await deps.libvirt.checkpointNames(dom);
    const gone = new Set<string>();
    for (const name of checkpointsToDelete(all, needed)) {
      try {
        await deps.libvirt.checkpointDelete(dom, name);
      } catch {
        // a broken bitmap cannot be merged: drop the metadata only
        await deps.libvirt.checkpointDelete(dom, name, { metadataOnly: true });
      }
      gone.add(name);
      log.debug({ checkpoint: name }, 'checkpoint retired');
    }
    // the names left: what the stray-bitmap sweep keeps, without listing them again
    return all.filter((n) => !gone.has(n));
  }
}

/**
 * The caller's signal, the pull-mode seed's stop (E_YIELDED, E_NOSPACE as its reason) and a deadline in one
 * (Node 18 has no AbortSignal.any). Uploads end wherever they wait when it fires; expired() tells the
 * deadline apart from a shutdown or a stop.
 */
export function transferDeadline(outers: ReadonlyArray<AbortSignal | undefined>, ms: number | undefined): { signal: AbortSignal | undefined; expired(): boolean; dispose(): void } {
  const present = outers.filter((s): s is AbortSignal => s !== undefined);
  if (!ms && present.length <= 1) return { signal: present[0], expired: () => false, dispose: () => {} };
  const any = anySignal(present);
  const ac = new AbortController();
  let fired = false;
  const onAny = () => ac.abort(any.signal.reason);
  if (any.signal.aborted) ac.abort(any.signal.reason);
  else any.signal.addEventListener('abort', onAny, { once: true });
  const timer = ms
    ? setTimeout(() => {
        fired = true;
        ac.abort();
      }, ms)
    : null;
  timer?.unref?.();
  return {
    signal: ac.signal,
    expired: () => fired && !any.signal.aborted,
    dispose: () => {
      if (timer) clearTimeout(timer);
      any.signal.removeEventListener('abort', onAny);
      any.dispose();
    },
  };
}

/** Pure: drop `<parent>` from a checkpoint definition when libvirt no longer has that parent. */
export function withoutMissingParent(xml: string, existing: readonly string[]): string {
  const m = /<parent>\s*<name>([^<]*)<\/name>\s*<\/parent>\s*/.exec(xml);
  if (!m || existing.includes(m[1]!)) return xml;
  return xml.replace(m[0], '');
}
