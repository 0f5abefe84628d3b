/**
 * The daemon loop (`onestor-agent run`). Decisions live in schedule.ts (what is due) and
 * monitor/assessment.ts (what to report); this file turns them into timers, cycles, state writes,
 * sd_notify messages, the Prometheus textfile and signal handling. Every side effect goes through
 * DaemonDeps, so tests drive it with fakes; agent/commands/run.ts wires the real adapters.
 *
 * Timers: one setTimeout to the next thing to do (a due disk, the next rescan, the next heartbeat).
 * Node timers run on the monotonic clock, and every duration here is measured with performance.now(),
 * so a wall-clock step changes nothing but the epochs written for display.
 */
import type { Logger } from 'pino';
import { Scheduler, type ScheduleSettings, type KnownDisk, type VmStart, type DiskResult } from './schedule.js';
import { SdNotify } from './sd-notify.js';
import { applyMarks } from './marks.js';
import { cleanAllStaging } from './staging.js';
import { describeError, ErrorCodes } from '../shared/errors.js';
import { getDisk, diskKey, type AgentState } from '../cycle/state.js';
import type { EligibleDisk } from '../shared/model.js';
import type { VmCycleRequest, DiskOutcome } from '../cycle/cycle.js';
import { assess } from '../monitor/assessment.js';
import { metricsText } from '../monitor/prometheus.js';

/** The state file as the loop uses it (StateStore implements it). */
export interface DaemonStatePort {
  readonly file: string;
  loadOrReset(): Promise<{ state: AgentState; reset?: string }>;
  /** read-modify-write; resolves with the state written */
  update(fn: (s: AgentState) => AgentState | void): Promise<AgentState>;
}

/** The parts of lib/config.ts's Config the loop reads (Config is assignable to it). */
export interface DaemonConfig {
  readonly datastoreLocation: string;
  readonly stagingDirName: string;
  readonly schedule: Readonly<ScheduleSettings & { rescanSec: number }>;
  readonly limits: Readonly<{ concurrency: number }>;
}

export interface DiscoveryView {
  eligible: EligibleDisk[];
  ineligible: ReadonlyArray<{ vmId: number; diskId?: number; reason: string }>;
}

export interface CycleStartInfo {
  vmId: number;
  diskIds: number[];
  forced: boolean;
  dueMono: number;
  startMono: number;
  slipMs: number;
}

export interface DaemonDeps {
  discover(): Promise<DiscoveryView>;
  /** production: (req, signal) => runVmCycle(cycleDeps, { ...req, signal }) */
  runCycle(req: VmCycleRequest, signal: AbortSignal): Promise<DiskOutcome[]>;
  state: DaemonStatePort;
  /** remove staging left by a crashed run; returns the VM ids cleaned (default: cleanAllStaging) */
  cleanStaleStaging?(): Promise<number[]>;
  /** replace the Prometheus textfile with this text (atomically); absent = no textfile */
  writeMetrics?(text: string): Promise<void>;
  /** SIGHUP: re-read the configuration (the loop keeps the old one when this throws) */
  reloadConfig?(): Promise<DaemonConfig>;
  notifier?: SdNotify;
  /** monotonic ms; default performance.now() */
  monoNow?: () => number;
  /** epoch ms; default Date.now() (tests fake wall-clock jumps here) */
  wallNow?: () => number;
  hostName?: string;
  version?: string;
  onCycleStart?(info: CycleStartInfo): void;
  /** when the state file was corrupt or missing: refill it from the replicas' manifests; returns disks rebuilt */
  rebuildState?(): Promise<number>;
}

export interface DaemonOptions {
  config: DaemonConfig;
  log: Logger;
  deps: DaemonDeps;
  /** aborting it stops the daemon like SIGTERM */
  signal?: AbortSignal;
  /** install SIGTERM/SIGINT/SIGHUP handlers (the CLI does; tests drive stop()/reload() directly) */
  handleSignals?: boolean;
  /** how long running cycles get to wind down after SIGTERM (default 30 s) */
  shutdownTimeoutMs?: number;
  /** heartbeat/state refresh period (default min(30 s, rescanSec)) */
  heartbeatMs?: number;
}

export interface DaemonHandle {
  /** resolves once stopped (cycles finished or given up on, state written) */
  readonly done: Promise<void>;
  /** resolves once the first discovery ran and READY=1 was sent */
  readonly ready: Promise<void>;
  /** snapshot-now */
  force(vmId: number, opts?: { diskIds?: number[]; full?: boolean }): number;
  rescan(): Promise<void>;
  reload(): Promise<void>;
  stop(): void;
  /** for status/tests: VMs in flight now */
  inFlight(): number[];
}

interface Running {
  ac: AbortController;
  promise: Promise<void>;
}

const MAX_TIMER_MS = 2 ** 31 - 1;

export function runDaemon(opts: DaemonOptions): Promise<void> {
  return startDaemon(opts).done;
}

export function startDaemon(opts: DaemonOptions): DaemonHandle {
  const { log, deps } = opts;
  const mono = deps.monoNow ?? (() => performance.now());
  const wall = deps.wallNow ?? (() => Date.now());
  const notifier = deps.notifier ?? new SdNotify({ onError: (e, m) => log.warn({ err: describeError(e), message: m.split('\n')[0] }, 'sd_notify failed') });
  let config = opts.config;
  const schedulerOptions = (c: DaemonConfig) => ({ ...c.schedule, concurrency: c.limits.concurrency, host: deps.hostName ?? 'localhost' });
  const scheduler = new Scheduler(schedulerOptions(config));
  const running = new Map<number, Running>();
  let eligible = new Map<string, EligibleDisk>();
  let ineligibleCount = 0;
  let stopping = false;
  let timer: NodeJS.Timeout | null = null;
  let nextRescanMono = 0;
  let nextHeartbeatMono = 0;
  let lastLoopMono = mono();
  let rescanning: Promise<void> | null = null;
  let writeChain: Promise<void> = Promise.resolve();
  let writeQueued = false;
  const startedAt = Math.floor(wall() / 1000);
  const heartbeatMs = () => opts.heartbeatMs ?? Math.min(30_000, config.schedule.rescanSec * 1000);

  let readyResolve!: () => void;
  const ready = new Promise<void>((r) => (readyResolve = r));
  let stopResolve!: () => void;
  const stopRequested = new Promise<void>((r) => (stopResolve = r));

  // ---- state -------------------------------------------------------------------------------------
  const progress = new Map<string, { sent: number; total: number; at: number }>();
  /** the state as last written: status text and metrics are computed from it, not re-read */
  let held: AgentState | null = null;
  /** Serialized: the heartbeat, next-due, queued and running marks of every known disk. */
  function persist(): Promise<void> {
    // coalesce: one queued write already picks up everything that changed until it starts
    if (writeQueued) return writeChain;
    writeQueued = true;
    writeChain = writeChain.then(async () => {
      writeQueued = false;
      const m = mono();
      const w = wall();
      const view = scheduler.view(m, w);
      try {
        held = await deps.state.update((s: AgentState) =>
          applyMarks(s, {
            host: deps.hostName,
            daemon: { pid: process.pid, startedAt, heartbeatAt: Math.floor(w / 1000), ...(deps.version ? { version: deps.version } : {}), grace: { minSec: config.schedule.graceMinSec, percent: config.schedule.gracePercent } },
            view,
            eligible,
            progress,
          }),
        );
        // from memory: the state just written, through the same assessment as the probe and `status`
        if (deps.writeMetrics) {
          const text = metricsText(assess({ now: w / 1000, state: held, stateFile: deps.state.file }), w / 1000, held.host);
          await deps.writeMetrics(text).catch((e: unknown) => log.warn({ err: describeError(e) }, 'prometheus textfile not written'));
        }
      } catch (e) {
        log.error({ err: describeError(e) }, 'state write failed');
      }
    });
    return writeChain;
  }

  /** Failing/overdue counts of the disks the scheduler knows, by the shared assessment. */
  function verdictCounts(): { failing: number; overdue: number; overdueFirst?: string } {
    if (!held) return { failing: 0, overdue: 0 };
    const known = new Set(scheduler.view(mono(), wall()).map((v) => diskKey(v.vmId, v.diskId)));
    const a = assess({ now: wall() / 1000, state: held, stateFile: deps.state.file }).disks.filter((d) => known.has(diskKey(d.vmId, d.diskId)));
    const overdue = a.filter((d) => d.overdue);
    return { failing: a.filter((d) => d.kind === 'failing').length, overdue: overdue.length, overdueFirst: overdue[0] ? `${overdue[0].vmId}/${overdue[0].diskId}` : undefined };
  }

  function statusText(): string {
    const { failing, overdue } = verdictCounts();
    const parts = [`${scheduler.size()} disks protected`, `${failing} failing`];
    if (overdue) parts.push(`${overdue} overdue`);
    if (running.size) parts.push(`${running.size} VM cycles running`);
    if (ineligibleCount) parts.push(`${ineligibleCount} not eligible`);
    return parts.join(', ');
  }

  // ---- discovery ---------------------------------------------------------------------------------
  async function doRescan(): Promise<void> {
    let found: DiscoveryView;
    try {
      found = await deps.discover();
    } catch (e) {
      // keep the previous view: a transient error must not drop every disk's cadence
      log.error({ err: describeError(e) }, 'discovery failed; keeping the previous view');
      return;
    }
    const { state } = await deps.state.loadOrReset().catch(() => ({ state: null as AgentState | null }));
    const next = new Map<string, EligibleDisk>();
    const known: KnownDisk[] = [];
    for (const d of found.eligible) {
      next.set(diskKey(d.vmId, d.diskId), d);
      const ds = state ? getDisk(state, d.vmId, d.diskId) : null;
      known.push({ vmId: d.vmId, diskId: d.diskId, freqSeconds: d.freqSeconds, lastSuccessAt: ds?.lastSuccess?.capturedAt ?? null, lastCycleMs: ds?.lastSuccess?.durationMs, failCount: ds?.failCount ?? 0 });
    }
    const r = scheduler.sync(known, mono(), wall());
    for (const e of r.rejected) log.error({ vm: e.context.vm, disk: e.context.disk, code: e.code }, e.message);
    eligible = next;
    ineligibleCount = found.ineligible.length;
    if (r.added || r.removed) log.info({ disks: scheduler.size(), added: r.added, removed: r.removed, ineligible: ineligibleCount }, 'discovery');
  }

  function rescan(): Promise<void> {
    rescanning ??= doRescan().finally(() => {
      rescanning = null;
    });
    return rescanning;
  }

  // ---- cycles ------------------------------------------------------------------------------------
  function launch(st: VmStart): void {
    const disks = st.diskIds.map((id) => eligible.get(diskKey(st.vmId, id))).filter((d): d is EligibleDisk => d !== undefined);
    const startedMono = mono();
    const startedWallMs = wall();
    const ac = new AbortController();
    const slipMs = Math.max(0, startedMono - st.dueMono);
    deps.onCycleStart?.({ vmId: st.vmId, diskIds: st.diskIds, forced: st.forced, dueMono: st.dueMono, startMono: startedMono, slipMs });
    log.debug({ vm: st.vmId, disks: st.diskIds.join(','), forced: st.forced, slipMs: Math.round(slipMs) }, 'cycle due');
    const first = disks[0];
    const work: Promise<DiskOutcome[]> = first
      ? Promise.resolve().then(() =>
          deps.runCycle(
            {
              vmId: st.vmId,
              domainName: first.domainName,
              dsDir: first.dsDir,
              disks,
              forceFull: st.forceFull,
              signal: ac.signal,
              // long transfers show in `status` (written at most every 5 s)
              onProgress: (diskId, sent, total) => {
                const k = diskKey(st.vmId, diskId);
                const prev = progress.get(k);
                const at = Math.floor(wall() / 1000);
                progress.set(k, { sent, total, at });
                if (!prev || at - prev.at >= 5) void persist();
              },
            },
            ac.signal,
          ),
        )
      : Promise.resolve([]);
    const promise = work
      .catch((e: unknown): DiskOutcome[] => {
        log.error({ vm: st.vmId, err: describeError(e) }, 'cycle threw');
        return st.diskIds.map((diskId) => ({ vmId: st.vmId, diskId, ok: false, durationMs: mono() - startedMono, error: { code: ErrorCodes.INTERNAL, message: describeError(e) } }));
      })
      .then((outcomes) => {
        const results: DiskResult[] = outcomes.map((o) => ({
          diskId: o.diskId,
          ok: o.ok,
          capturedAt: o.capturedAt,
          aborted: !o.ok && (stopping || o.error?.code === ErrorCodes.ABORTED),
        }));
        scheduler.finished(st.vmId, results, { startedMono, finishedMono: mono(), startedWallMs });
        for (const id of st.diskIds) progress.delete(diskKey(st.vmId, id));
        running.delete(st.vmId);
        void persist();
        void notifier.status(statusText());
        if (!stopping) tick();
      });
    running.set(st.vmId, { ac, promise });
  }

  // ---- loop --------------------------------------------------------------------------------------
  function tick(): void {
    if (stopping) return;
    if (timer) clearTimeout(timer);
    timer = null;
    const m = mono();
    lastLoopMono = m;
    if (m >= nextRescanMono) {
      nextRescanMono = m + config.schedule.rescanSec * 1000;
      void rescan().then(() => tick());
    }
    const starts = scheduler.takeDue(m);
    for (const st of starts) launch(st);
    if (starts.length || m >= nextHeartbeatMono) {
      nextHeartbeatMono = m + heartbeatMs();
      void persist();
      void notifier.status(statusText());
      const v = verdictCounts();
      if (v.overdue && starts.length === 0) log.warn({ overdue: v.overdue, first: v.overdueFirst }, 'disks overdue');
    }
    const wake = Math.min(scheduler.nextWake(m) ?? Infinity, nextRescanMono, nextHeartbeatMono);
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, Math.ceil(wake - m)));
    timer = setTimeout(tick, delay);
  }

  async function reload(): Promise<void> {
    if (!deps.reloadConfig) {
      log.info('reload requested; no config source to re-read');
      return;
    }
    await notifier.reloading();
    try {
      const next = await deps.reloadConfig();
      scheduler.setOptions(schedulerOptions(next));
      config = next;
      log.info({ concurrency: next.limits.concurrency, rescanSec: next.schedule.rescanSec }, 'configuration reloaded');
    } catch (e) {
      log.error({ err: describeError(e) }, 'configuration reload failed; keeping the running one');
    }
    await notifier.ready(statusText());
    nextRescanMono = 0; // a reload may change what is discovered
    tick();
  }

  function stop(): void {
    if (stopping) return;
    stopping = true;
    stopResolve();
  }

  // ---- signals -----------------------------------------------------------------------------------
  const onTerm = () => {
    log.info('SIGTERM: stopping');
    stop();
  };
  const onHup = () => {
    void reload();
  };
  if (opts.handleSignals) {
    process.on('SIGTERM', onTerm);
    process.on('SIGINT', onTerm);
    process.on('SIGHUP', onHup);
  }
  const onAbort = () => stop();
  if (opts.signal?.aborted) stop();
  opts.signal?.addEventListener('abort', onAbort, { once: true });

  // ---- life --------------------------------------------------------------------------------------
  const done = (async () => {
    let stopWatchdog = () => {};
    try {
      await notifier.status('starting');
      const loaded = await deps.state.loadOrReset();
      if (loaded.reset) log.warn({ file: deps.state.file, reason: loaded.reset }, 'state file unreadable; rebuilding from the replica manifests');
      if ((loaded.reset || Object.keys(loaded.state.disks).length === 0) && deps.rebuildState) {
        const n = await deps.rebuildState().catch((e: unknown) => {
          log.warn({ err: describeError(e) }, 'state rebuild from the replicas failed');
          return 0;
        });
        if (n > 0) log.info({ disks: n }, 'state rebuilt from the replica manifests');
      }
      const cleaned = await (deps.cleanStaleStaging ?? (() => cleanAllStaging(config.datastoreLocation, config.stagingDirName)))().catch((e: unknown) => {
        log.warn({ err: describeError(e) }, 'stale staging cleanup failed');
        return [] as number[];
      });
      if (cleaned.length) log.info({ vms: cleaned.join(',') }, 'removed stale staging left by a previous run');
      if (!stopping) {
        nextRescanMono = mono() + config.schedule.rescanSec * 1000;
        await rescan();
        await persist();
        await notifier.ready(statusText());
        log.info({ disks: scheduler.size(), concurrency: config.limits.concurrency, notify: notifier.transport?.name ?? 'off', watchdogMs: notifier.watchdogMs }, 'daemon ready');
        readyResolve();
        // the watchdog is fed only while the loop keeps turning (it wakes at least every heartbeat)
        stopWatchdog = notifier.startWatchdog(() => mono() - lastLoopMono < 3 * heartbeatMs() + 10_000);
        tick();
      }
      await stopRequested;
    } finally {
      stopping = true;
      readyResolve();
      if (timer) clearTimeout(timer);
      timer = null;
      await notifier.stopping(`stopping, ${running.size} VM cycles to abort`);
      for (const r of running.values()) r.ac.abort();
      const all = Promise.all([...running.values()].map((r) => r.promise));
      let t: NodeJS.Timeout | undefined;
      const timedOut = await Promise.race([all.then(() => false), new Promise<boolean>((res) => (t = setTimeout(() => res(true), opts.shutdownTimeoutMs ?? 30_000)))]);
      if (t) clearTimeout(t);
      if (timedOut) log.error({ vms: [...running.keys()].join(',') }, 'cycles did not wind down in time; exiting anyway');
      await (rescanning as Promise<void> | null)?.catch(() => {});
      await persist();
      stopWatchdog();
      notifier.close();
      opts.signal?.removeEventListener('abort', onAbort);
      if (opts.handleSignals) {
        process.off('SIGTERM', onTerm);
        process.off('SIGINT', onTerm);
        process.off('SIGHUP', onHup);
      }
      log.info('daemon stopped');
    }
  })();

  return {
    done,
    ready,
    force: (vmId, o) => {
      const n = scheduler.force(vmId, o);
      if (n && !stopping) tick();
      return n;
    },
    rescan: async () => {
      // a discovery already under way may predate what the caller knows changed: run a fresh one
      if (rescanning) await rescanning.catch(() => {});
      await rescan();
      tick();
    },
    reload,
    stop,
    inFlight: () => [...running.keys()],
  };
}

