/**
 * Seed without staging (issue 14): a pull-mode backup job exports the point-in-time view of every due disk
 * of the VM over NBD (one instant for all, a new checkpoint created atomically with it); each disk's thin
 * base.1 is streamed from that export as a qcow2 overlay built on the fly, so nothing of disk size is written
 * on the hypervisor. QEMU keeps in a scratch file only what the guest overwrites while the job runs.
 *
 * What goes into the overlay. libvirt 9.0 exports `base:allocation` only (not `qemu:allocation-depth`), so
 * which ranges live in base.1 itself comes from `qemu-img map -U` of the running base.1, read right after the
 * job started. That map may show more than at the instant (clusters the guest allocated since): harmless,
 * their content is read from the point-in-time view, which there equals what base shows. It may show less
 * only for clusters whose L2 entry QEMU had not yet written to the file — writes the guest has not flushed,
 * which a crash at that instant could lose as well; with the guest agent, the freeze flushes them first.
 * Zero ranges of the point-in-time view (`base:allocation`) become zero clusters: no data read or sent.
 * Incrementals in the same job (a VM with one disk due for a full and another for an incremental) use the
 * exported dirty bitmap (`qemu:dirty-bitmap:NAME`) and the same writer, with the placeholder backing name
 * the replica rebases.
 *
 * A pull job never ends by itself: end() aborts it, and libvirt then removes the NBD socket and the
 * scratch files. A job left by a killed agent is recognised by its scratch files in our staging dir and
 * aborted by the next cycle (checksBeforeJob).
 */
import { mkdir, statfs, readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { buildCheckpointXml, buildPullBackupXml, parsePullExports, type PullDiskPlan } from '../libvirt/backup-xml.js';
import { NbdClient, type Extent } from '../libvirt/nbd-client.js';
import { NBD_STATE_ZERO } from '../libvirt/nbd-protocol.js';
import { overlayRuns, planQcow2Overlay, type Qcow2StreamPlan } from '../libvirt/qcow2-writer.js';
import type { QemuImg } from '../libvirt/qemu-img.js';
import { OnestorError, ErrorCodes, describeError } from '../shared/errors.js';
import { anySignal } from '../shared/abort.js';
import type { Consistency, CycleMode } from '../shared/model.js';
import { abortOwnJob, beginJobAtInstant, checksBeforeJob, cleanStagingDir, diskTargets, mayHaveBegun, waitOwnJobGone, type CaptureLibvirt, type CaptureRequest } from './capture.js';
import { overlayStream } from './overlay-stream.js';

/** What must stay free beyond minFreePercent for the scratch files: guest writes during the seed. */
export const PULL_SCRATCH_RESERVE = 64 * 1024 * 1024;

export interface PulledDisk {
  diskId: number;
  target: string;
  mode: CycleMode;
  virtualSize: number;
  /** exact size of the overlay stream */
  size: number;
  dataBytes: number;
  zeroBytes: number;
  /** the overlay bytes; call once. Chunks are lent: each is valid until the next is asked for (overlay-stream.ts) */
  stream(signal?: AbortSignal): AsyncIterable<Buffer>;
}

export interface PullCapture {
  checkpoint: string;
  consistency: Consistency;
  freezeNote?: string;
  capturedAtMs: number;
  /** backup-begin + maps + plans */
  jobMs: number;
  disks: PulledDisk[];
  /** peak bytes of the staging dir seen by the watchdog (scratch files) */
  stagingPeak(): number;
  /**
   * Fires when the watchdog stops the seed, its reason the OnestorError to end with (E_YIELDED for a live
   * migration, E_NOSPACE for the scratch files). Every transfer made while the export exists must end on
   * it, not only the overlay streams: the export holds the domain's job until the cycle ends it.
   */
  signal: AbortSignal;
  /** Ends the job (abort is how a pull job ends), waits until libvirt dropped it, removes staging. Idempotent. */
  end(): Promise<void>;
}

export async function capturePull(lv: CaptureLibvirt, qemuImg: QemuImg, req: CaptureRequest): Promise<PullCapture> {
  const log = req.log ?? (() => {});
  const now = req.now ?? Date.now;
  const dom = req.domainName;
  const ctx = { vm: req.vmId };
  const view = req.domain ?? (await lv.domainView(dom));
  const allTargets = view.disks.map((d) => d.target);
  const plans = (await diskTargets(view, req)).map((d) => ({ ...d, scratch: path.join(req.stagingDir, `${d.target}.scratch`) }));
  const socketPath = path.join(req.stagingDir, 'nbd.sock');

  await checksBeforeJob(lv, req);
  await cleanStagingDir(req.stagingDir);
  await mkdir(req.stagingDir, { recursive: true, mode: 0o750 });

  let jobStarted = false;
  const clients: NbdClient[] = [];
  let peak = 0;
  let watchdog: NodeJS.Timeout | null = null;
  const disposers: Array<() => void> = [];
  // one ending, however many ask for it: a second caller waits for the same (the job must be gone for both)
  let ending: Promise<void> | null = null;
  const end = (): Promise<void> => (ending ??= endOnce());
  const endOnce = async (): Promise<void> => {
    if (watchdog) clearInterval(watchdog);
    disposers.splice(0).forEach((d) => d());
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    if (jobStarted) {
      // only while the job is still ours: `yield` may have aborted it and a migration may hold the domain now
      await abortOwnJob(lv, dom, req.stagingDir).catch(() => false);
      await waitOwnJobGone(lv, dom, req.stagingDir, 200);
    }
    await cleanStagingDir(req.stagingDir).catch(() => {});
  };

  try {
    // Only the scratch files need room: what the guest overwrites while the seed runs.
    const fs = await statfs(req.stagingDir);
    const bsize = Number(fs.bsize);
    const free = Number(fs.bavail) * bsize;
    const keepFree = Math.ceil((Number(fs.blocks) * bsize * req.minFreePercent) / 100);
    if (free - PULL_SCRATCH_RESERVE < keepFree) {
      throw new OnestorError(ErrorCodes.NOSPACE, `staging ${req.stagingDir} has ${mib(free)} MiB free; a seed needs ${mib(PULL_SCRATCH_RESERVE)} MiB for scratch and ${mib(keepFree)} MiB (${req.minFreePercent}%) must stay free`, ctx);
    }

    const pullPlans: PullDiskPlan[] = allTargets.map((t) => ({ target: t, mode: null }));
    for (const p of plans) {
      const pp = pullPlans.find((x) => x.target === p.target)!;
      pp.mode = p.mode;
      pp.scratchFile = p.scratch;
      if (p.mode === 'incremental') {
        if (!p.parentCheckpoint) throw new OnestorError(ErrorCodes.INTERNAL, 'incremental without parent', { ...ctx, disk: p.diskId });
        pp.incrementalFrom = p.parentCheckpoint;
      }
    }
    let backupXml: string;
    try {
      backupXml = buildPullBackupXml(pullPlans, socketPath);
    } catch (e) {
      throw new OnestorError(ErrorCodes.CAPTURE, describeError(e), ctx);
    }
    const checkpointXml = buildCheckpointXml(req.checkpointName, plans.map((p) => p.target), allTargets);

    const { consistency, freezeNote, t0 } = await beginJobAtInstant(lv, req, backupXml, checkpointXml, false, view).catch((e: unknown) => {
      jobStarted = mayHaveBegun(e);
      throw e;
    });
    jobStarted = true;

    // The export holds the domain's job for the whole transfer, and a live migration waits for that job at
    // most 30 s: stop streaming when a migration wants the domain (E_YIELDED), as the push job is aborted.
    // The scratch files grow with guest writes: stop the seed before they eat what must stay free (E_NOSPACE).
    const abortOnSpace = new AbortController();
    let stopWith: OnestorError | null = null;
    let polling = false;
    watchdog = setInterval(() => {
      if (polling || stopWith) return;
      polling = true;
      void (async () => {
        const used = await dirBytes(req.stagingDir);
        peak = Math.max(peak, used);
        const s = await statfs(req.stagingDir).catch(() => null);
        if (s && Number(s.bavail) * Number(s.bsize) < keepFree) {
          stopWith = new OnestorError(ErrorCodes.NOSPACE, `staging filesystem fell below ${mib(keepFree)} MiB free while the guest wrote during the seed; seed stopped`, ctx);
        } else {
          const why = await req.shouldYield?.().catch(() => null);
          if (why) {
            log({ vm: req.vmId, reason: why }, 'ending the pull-mode export to let a migration through');
            stopWith = new OnestorError(ErrorCodes.YIELDED, `seed stopped: ${why}`, ctx);
          }
        }
        if (stopWith) abortOnSpace.abort(stopWith);
      })()
        .catch(() => {})
        .finally(() => (polling = false));
    }, 250);
    watchdog.unref();

    const nbdStop = anySignal([req.signal, abortOnSpace.signal]);
    disposers.push(nbdStop.dispose);
    const xml = await lv.backupDumpXml(dom);
    if (!xml) throw new OnestorError(ErrorCodes.CAPTURE, 'pull-mode backup job vanished right after it started', ctx);
    const exported = parsePullExports(xml);
    const out: PulledDisk[] = [];
    for (const p of plans) {
      const ex = exported.exports.find((e) => e.target === p.target);
      if (!ex) throw new OnestorError(ErrorCodes.CAPTURE, `backup job exports no ${p.target}`, { ...ctx, disk: p.diskId });
      const dirtyCtx = ex.bitmap ? `qemu:dirty-bitmap:${ex.bitmap}` : null;
      if (p.mode === 'incremental' && !dirtyCtx) throw new OnestorError(ErrorCodes.CAPTURE, `incremental export of ${p.target} has no dirty bitmap`, { ...ctx, disk: p.diskId });
      // The overlay's ranges: right after the instant (see the header comment).
      const allocated = p.mode === 'full' ? await qemuImg.topAllocation(p.base1Path) : null;
      // reads fail at once on a shutdown or when the watchdog stops the seed (the export may be gone then)
      const client = await NbdClient.connect({ socketPath, exportName: ex.exportName, metaContexts: ['base:allocation', ...(dirtyCtx ? [dirtyCtx] : [])], signal: nbdStop.signal });
      clients.push(client);
      if (client.size !== p.virtualSize) log({ vm: req.vmId, disk: p.diskId, export: client.size, planned: p.virtualSize }, 'export size differs from qemu-img info; using the export');
      const zero = (await client.map('base:allocation')).filter((e) => e.flags & NBD_STATE_ZERO);
      const ranges: Array<{ offset: number; length: number }> = allocated ?? (await client.map(dirtyCtx!)).filter((e: Extent) => e.flags & 1);
      const runs = overlayRuns(client.size, 65536, ranges, zero);
      const plan: Qcow2StreamPlan = planQcow2Overlay({
        virtualSize: client.size,
        backingFile: p.mode === 'full' ? `disk.${p.diskId}.snap/base` : 'base.1.next',
        backingFormat: 'qcow2',
        runs,
      });
      const zeroBytes = runs.filter((r) => r.kind === 'zero').reduce((n, r) => n + r.length, 0);
      let used = false;
      out.push({
        diskId: p.diskId,
        target: p.target,
        mode: p.mode,
        virtualSize: client.size,
        size: plan.fileSize,
        dataBytes: plan.dataClusters * plan.clusterSize,
        zeroBytes,
        stream: (signal?: AbortSignal) => {
          if (used) throw new OnestorError(ErrorCodes.INTERNAL, 'overlay stream opened twice');
          used = true;
          // the NBD client already fails every read on req.signal and the watchdog's; the stream also stops on the caller's
          const stop = anySignal([abortOnSpace.signal, signal]);
          disposers.push(stop.dispose); // detached from the caller's signal when the capture ends
          // lent chunks: uploadStream writes each out before it asks for the next
          return stoppable(overlayStream(plan, (o, l, into) => client.read(o, l, into), { signal: stop.signal, lend: true }), abortOnSpace.signal, () => stopWith);
        },
      });
    }
    return { checkpoint: req.checkpointName, consistency, freezeNote, capturedAtMs: t0, jobMs: now() - t0, disks: out, stagingPeak: () => peak, signal: abortOnSpace.signal, end };
  } catch (e) {
    await end();
    if (jobStarted) {
      const names = await lv.checkpointNames(dom).catch(() => [] as string[]);
      if (names.includes(req.checkpointName)) {
        await lv.checkpointDelete(dom, req.checkpointName).catch(() => lv.checkpointDelete(dom, req.checkpointName, { metadataOnly: true }).catch(() => {}));
      }
    }
    throw e;
  }
}

/** Turns the watchdog's abort into its reason (E_NOSPACE, E_YIELDED) instead of a generic abort. */
async function* stoppable(src: AsyncGenerator<Buffer>, stop: AbortSignal, reason: () => OnestorError | null): AsyncGenerator<Buffer> {
  try {
    for await (const b of src) {
      if (stop.aborted) break;
      yield b;
    }
  } catch (e) {
    if (!stop.aborted) throw e;
  }
  if (stop.aborted) throw reason() ?? new OnestorError(ErrorCodes.ABORTED, 'seed stopped');
}

/** Allocated bytes of the files directly in `dir` (the scratch files). */
async function dirBytes(dir: string): Promise<number> {
  let n = 0;
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    const st = await stat(path.join(dir, name)).catch(() => null);
    if (st?.isFile()) n += st.blocks * 512;
  }
  return n;
}

function mib(n: number): number {
  return Math.round(n / 1048576);
}
