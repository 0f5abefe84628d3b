/**
 * Pure scheduling core of the daemon: which VMs to capture now, when to wake next, what is overdue.
 * No timers, no I/O: the caller passes the MONOTONIC time (ms, process.hrtime-based) and, where an
 * epoch is involved, the wall clock (epoch ms) separately.
 *
 * Clock rules. The wall clock is read only to translate persisted epochs (last success from the
 * state file) into monotonic time, once, when a disk becomes known (or when another process, e.g.
 * a CLI `snapshot`, recorded a newer success). From then on every due time is monotonic, so an NTP
 * step or an admin's `date -s` (+1 day, -1 hour) neither replays missed runs nor silences a disk.
 *
 * Cadence. A disk is due freq seconds after its last successful snapshot STARTED (the point in time
 * of the copy), so the replica's copy ages at most freq + one cycle. Disks of one VM that are due
 * within a small window of each other (min(10 s, 5 % of freq)) join one capture: same-freq disks
 * then share a point in time and stay aligned for good.
 *
 * Spreading. The first run after a disk becomes known is delayed by a FIXED offset derived from a
 * hash of (host, vm, disk) within spreadSec (0 = min(freq/10, 60 s)). Hosts restarted together (power
 * cut, fleet upgrade) therefore do not hit one replica in the same second. Later runs follow the
 * cadence exactly: no per-cycle jitter. A daemon restart re-applies the same offset once.
 *
 * Failures. A failed disk is retried after backoffBaseSec * 2^(n-1), capped at backoffMaxSec AND at
 * its own frequency: backoff protects the replica and the host from a hot retry loop but must never
 * make a failing disk wait longer than a healthy one would (a 60 s disk retries at least every 60 s).
 *
 * Concurrency. At most `concurrency` VMs are in flight. Among due VMs, forced runs go first, then the
 * earliest due: earliest-deadline-first cannot starve a disk.
 */
import { createHash } from 'node:crypto';
import { OnestorError, ErrorCodes } from '../shared/errors.js';
import { overdueLimitSec as assessedLimitSec } from '../monitor/assessment.js';

export interface ScheduleSettings {
  graceMinSec: number;
  gracePercent: number;
  backoffBaseSec: number;
  backoffMaxSec: number;
  /** 0 = per-disk min(freq/10, 60 s) */
  spreadSec: number;
}

export interface SchedulerOptions extends ScheduleSettings {
  /** VMs in flight at once on this host */
  concurrency: number;
  /** host identity for the spread hash (hostname) */
  host: string;
}

/** A disk as discovery + state know it. */
export interface KnownDisk {
  vmId: number;
  diskId: number;
  freqSeconds: number;
  /** epoch seconds the last successful snapshot was captured (state.lastSuccess.capturedAt) */
  lastSuccessAt?: number | null;
  /** how long the cycle that made that snapshot took (state.lastSuccess.durationMs) */
  lastCycleMs?: number;
  failCount?: number;
}

export interface VmStart {
  vmId: number;
  diskIds: number[];
  forced: boolean;
  forceFull: boolean;
  /** monotonic time the earliest of these disks became due (slip = start - dueMono) */
  dueMono: number;
}

export interface DiskResult {
  diskId: number;
  ok: boolean;
  /** epoch seconds of the snapshot's point in time, for ok results */
  capturedAt?: number;
  /** a cancelled cycle (shutdown) is not a failure of the disk */
  aborted?: boolean;
}

export interface DiskView {
  vmId: number;
  diskId: number;
  freqSeconds: number;
  running: boolean;
  forced: boolean;
  /** monotonic ms the disk is next due (meaningless while running) */
  dueMono: number;
  /** epoch seconds for display/state: wall + (dueMono - mono) */
  nextDueAt: number;
  /** epoch seconds since when the disk waits for a free slot */
  queuedSince?: number;
  ageSec: number | null;
  overdue: boolean;
  failCount: number;
}

export interface OverdueDisk {
  vmId: number;
  diskId: number;
  /** seconds since the last success started (or since the disk became known when it never succeeded) */
  ageSec: number;
  limitSec: number;
  neverSucceeded: boolean;
}

interface Entry {
  vmId: number;
  diskId: number;
  freqMs: number;
  lastSuccessMono: number | null;
  lastCycleMs: number;
  /** epochs of successes this scheduler already knows (its own and adopted ones): a persisted epoch
   *  not among them was recorded by another process. A set, not a comparison: after a backward wall
   *  step a newer success has a smaller epoch, and a state read that raced a finish shows an older one. */
  seenWalls: number[];
  knownSinceMono: number;
  failCount: number;
  retryAtMono: number | null;
  firstRun: boolean;
  offsetMs: number;
  forced: boolean;
  forceFull: boolean;
}

const key = (vmId: number, diskId: number) => `${vmId}.${diskId}`;

/** Pure: fixed offset in [0, spreadMs) from a hash of (host, vm, disk). */
export function spreadOffsetMs(host: string, vmId: number, diskId: number, spreadMs: number): number {
  if (spreadMs <= 0) return 0;
  const h = createHash('sha256').update(`${host}\0${vmId}\0${diskId}`).digest();
  return Math.floor((h.readUInt32BE(0) / 0x1_0000_0000) * spreadMs);
}

/** Pure: delay before retry number n (n = consecutive failures, >= 1). */
export function backoffMs(failCount: number, freqMs: number, s: Pick<ScheduleSettings, 'backoffBaseSec' | 'backoffMaxSec'>): number {
  const n = Math.max(1, failCount);
  // 2^(n-1) overflows to Infinity for large n, which the min() below absorbs.
  const grown = s.backoffBaseSec * 1000 * 2 ** (n - 1);
  return Math.min(grown, s.backoffMaxSec * 1000, freqMs);
}

/** Pure: the age beyond which a disk is overdue, in seconds (the rule of monitor/assessment.ts). */
export function overdueLimitSec(freqSeconds: number, s: Pick<ScheduleSettings, 'graceMinSec' | 'gracePercent'>, lastCycleMs = 0): number {
  return assessedLimitSec(freqSeconds, lastCycleMs, s);
}

/** Pure: how early a disk may join a capture of its VM that is starting anyway. */
export function alignWindowMs(freqMs: number): number {
  return Math.min(10_000, freqMs * 0.05);
}

export function validateSchedulerOptions(o: SchedulerOptions): void {
  const bad = (field: string, why: string) => new OnestorError(ErrorCodes.CONFIG, `schedule: ${field} ${why}`, { field });
  const nonNeg = ['graceMinSec', 'gracePercent', 'backoffBaseSec', 'backoffMaxSec', 'spreadSec'] as const;
  for (const f of nonNeg) {
    if (!Number.isFinite(o[f]) || o[f] < 0) throw bad(f, `must be a finite number >= 0, got ${String(o[f])}`);
  }
  if (o.backoffBaseSec <= 0) throw bad('backoffBaseSec', 'must be > 0');
  if (o.backoffMaxSec < o.backoffBaseSec) throw bad('backoffMaxSec', `must be >= backoffBaseSec (${o.backoffBaseSec})`);
  if (!Number.isInteger(o.concurrency) || o.concurrency < 1) throw bad('concurrency', `must be an integer >= 1, got ${String(o.concurrency)}`);
}

export class Scheduler {
  private opts: SchedulerOptions;
  private readonly entries = new Map<string, Entry>();
  /** VMs in flight, with the disks taken for each */
  private readonly running = new Map<number, Set<number>>();
  /** VM -> monotonic ms since when it has been due but blocked by the concurrency limit */
  private readonly queued = new Map<number, number>();

  constructor(opts: SchedulerOptions) {
    validateSchedulerOptions(opts);
    this.opts = { ...opts };
  }

  /** Config reload: rules apply to every later decision; cadence anchors are kept. */
  setOptions(opts: SchedulerOptions): void {
    validateSchedulerOptions(opts);
    this.opts = { ...opts };
  }

  get options(): Readonly<SchedulerOptions> {
    return this.opts;
  }

  /**
   * Replaces the set of known disks (after discovery). New disks are anchored from their persisted
   * epoch (the only use of the wall clock); vanished ones are dropped; a changed frequency re-plans.
   * Disks with an unusable frequency are left out and returned as errors naming VM and disk.
   */
  sync(disks: readonly KnownDisk[], mono: number, wallMs: number): { added: number; removed: number; rejected: OnestorError[] } {
    const seen = new Set<string>();
    const rejected: OnestorError[] = [];
    let added = 0;
    for (const d of disks) {
      if (!Number.isFinite(d.freqSeconds) || d.freqSeconds <= 0) {
        rejected.push(new OnestorError(ErrorCodes.VM_XML, `RECOVERY_SNAPSHOT_FREQ must be a positive number of seconds, got ${String(d.freqSeconds)}`, { vm: d.vmId, disk: d.diskId, field: 'RECOVERY_SNAPSHOT_FREQ' }));
        continue;
      }
      const k = key(d.vmId, d.diskId);
      if (seen.has(k)) continue;
      seen.add(k);
      const freqMs = d.freqSeconds * 1000;
      const at = d.lastSuccessAt ?? null;
      const existing = this.entries.get(k);
      if (!existing) {
        added++;
        this.entries.set(k, {
          vmId: d.vmId,
          diskId: d.diskId,
          freqMs,
          lastSuccessMono: at === null ? null : mapEpochToMono(at, mono, wallMs),
          lastCycleMs: d.lastCycleMs ?? 0,
          seenWalls: at === null ? [] : [at],
          knownSinceMono: mono,
          failCount: d.failCount ?? 0,
          retryAtMono: null,
          firstRun: true,
          offsetMs: this.offsetFor(d.vmId, d.diskId, freqMs),
          forced: false,
          forceFull: false,
        });
        continue;
      }
      if (existing.freqMs !== freqMs) {
        existing.freqMs = freqMs;
        if (existing.firstRun) existing.offsetMs = this.offsetFor(d.vmId, d.diskId, freqMs);
        if (existing.retryAtMono !== null && existing.lastSuccessMono !== null) {
          existing.retryAtMono = Math.min(existing.retryAtMono, existing.lastSuccessMono + freqMs);
        }
      }
      // A newer success recorded by someone else (CLI snapshot): re-anchor on it.
      const running = this.running.get(d.vmId)?.has(d.diskId) ?? false;
      if (!running && at !== null && !existing.seenWalls.includes(at)) {
        existing.lastSuccessMono = mapEpochToMono(at, mono, wallMs);
        existing.lastCycleMs = d.lastCycleMs ?? existing.lastCycleMs;
        remember(existing, at);
        existing.retryAtMono = null;
        existing.failCount = 0;
        existing.firstRun = false;
      }
    }
    let removed = 0;
    for (const [k, e] of this.entries) {
      if (!seen.has(k)) {
        this.entries.delete(k);
        removed++;
        if (!this.vmHasEntries(e.vmId)) this.queued.delete(e.vmId);
      }
    }
    return { added, removed, rejected };
  }

  /** snapshot-now: the VM's disks (all, or the given ones) run as soon as a slot is free. */
  force(vmId: number, opts: { diskIds?: readonly number[]; full?: boolean } = {}): number {
    let n = 0;
    for (const e of this.entries.values()) {
      if (e.vmId !== vmId || (opts.diskIds && !opts.diskIds.includes(e.diskId))) continue;
      e.forced = true;
      e.forceFull ||= Boolean(opts.full);
      n++;
    }
    return n;
  }

  /**
   * Takes the VMs to start now (marking them in flight) and remembers the ones the concurrency
   * limit holds back (queued). Call again after every finish and at every wake.
   */
  takeDue(mono: number): VmStart[] {
    const dueVms: Array<{ vmId: number; due: number; forced: boolean }> = [];
    const byVm = this.groupByVm();
    for (const [vmId, list] of byVm) {
      if (this.running.has(vmId)) continue;
      let due = Infinity;
      let forced = false;
      for (const e of list) {
        const d = this.dueOf(e);
        if (d <= mono) {
          due = Math.min(due, d);
          forced ||= e.forced;
        }
      }
      if (due !== Infinity) dueVms.push({ vmId, due, forced });
    }
    dueVms.sort((a, b) => Number(b.forced) - Number(a.forced) || a.due - b.due || a.vmId - b.vmId);
    const starts: VmStart[] = [];
    const stillQueued = new Set<number>();
    for (const v of dueVms) {
      if (this.running.size >= this.opts.concurrency) {
        stillQueued.add(v.vmId);
        if (!this.queued.has(v.vmId)) this.queued.set(v.vmId, mono);
        continue;
      }
      const list = byVm.get(v.vmId)!;
      // A disk whose only reason to wait is its first-run spread offset joins too: disks of one VM
      // share one instant from the first capture on.
      const take = list.filter((e) => e.forced || this.dueOf(e) <= mono + alignWindowMs(e.freqMs) || (e.firstRun && e.retryAtMono === null && this.regularDue(e) <= mono + alignWindowMs(e.freqMs)));
      take.sort((a, b) => a.diskId - b.diskId);
      this.running.set(v.vmId, new Set(take.map((e) => e.diskId)));
      this.queued.delete(v.vmId);
      const forceFull = take.some((e) => e.forceFull);
      for (const e of take) {
        e.forced = false;
        e.forceFull = false;
      }
      starts.push({ vmId: v.vmId, diskIds: take.map((e) => e.diskId), forced: v.forced, forceFull, dueMono: v.due });
    }
    for (const vmId of [...this.queued.keys()]) if (!stillQueued.has(vmId)) this.queued.delete(vmId);
    return starts;
  }

  /**
   * A VM's cycle ended. startedMono/finishedMono bracket it on the monotonic clock; startedWallMs is
   * the wall clock at its start. The new cadence anchor is the capture instant, mapped through the
   * wall clock of the SAME cycle and clamped into the bracket, so a wall jump during the cycle
   * cannot move it outside the cycle.
   */
  finished(vmId: number, results: readonly DiskResult[], t: { startedMono: number; finishedMono: number; startedWallMs: number }): void {
    const taken = this.running.get(vmId);
    this.running.delete(vmId);
    for (const r of results) {
      if (taken && !taken.has(r.diskId)) continue;
      const e = this.entries.get(key(vmId, r.diskId));
      if (!e) continue; // dropped by a rescan while in flight
      e.firstRun = false;
      if (r.aborted) {
        e.retryAtMono = null;
        continue;
      }
      if (r.ok) {
        const capturedAt = r.capturedAt ?? t.startedWallMs / 1000;
        const mapped = t.startedMono + (capturedAt * 1000 - t.startedWallMs);
        e.lastSuccessMono = clamp(mapped, t.startedMono, t.finishedMono);
        e.lastCycleMs = t.finishedMono - t.startedMono;
        remember(e, capturedAt);
        e.failCount = 0;
        e.retryAtMono = null;
      } else {
        e.failCount++;
        e.retryAtMono = t.finishedMono + backoffMs(e.failCount, e.freqMs, this.opts);
      }
    }
    // Disks taken but missing from the results: count them as failed rather than losing track.
    if (taken) {
      for (const diskId of taken) {
        if (results.some((r) => r.diskId === diskId)) continue;
        const e = this.entries.get(key(vmId, diskId));
        if (!e) continue;
        e.firstRun = false;
        e.failCount++;
        e.retryAtMono = t.finishedMono + backoffMs(e.failCount, e.freqMs, this.opts);
      }
    }
  }

  /** When the caller should call takeDue() next (monotonic ms), or null when nothing is known. */
  nextWake(mono: number): number | null {
    let next = Infinity;
    const slotFree = this.running.size < this.opts.concurrency;
    for (const e of this.entries.values()) {
      if (this.running.has(e.vmId)) continue;
      const d = this.dueOf(e);
      // A due VM that waits for a slot is woken by the next finish, not by a timer.
      if (d <= mono && !slotFree) continue;
      next = Math.min(next, Math.max(d, mono));
    }
    return next === Infinity ? null : next;
  }

  inFlight(): number[] {
    return [...this.running.keys()];
  }

  /**
   * The scheduler's own view on the monotonic clock (same limit as monitor/assessment.ts; a disk that
   * never succeeded counts from when it became known). Nothing reports it: status, probes, Prometheus
   * and the daemon's STATUS= line use the assessment of the state file. Tests use it to check that a
   * wall-clock step makes nothing overdue.
   */
  overdue(mono: number): OverdueDisk[] {
    const out: OverdueDisk[] = [];
    for (const e of this.entries.values()) {
      const age = this.ageMs(e, mono);
      const limitSec = overdueLimitSec(e.freqMs / 1000, this.opts, e.lastCycleMs);
      if (age / 1000 > limitSec) out.push({ vmId: e.vmId, diskId: e.diskId, ageSec: age / 1000, limitSec, neverSucceeded: e.lastSuccessMono === null });
    }
    return out.sort((a, b) => a.vmId - b.vmId || a.diskId - b.diskId);
  }

  /** Everything the state file and `status` show, per disk. */
  view(mono: number, wallMs: number): DiskView[] {
    const out: DiskView[] = [];
    for (const e of this.entries.values()) {
      const running = this.running.get(e.vmId)?.has(e.diskId) ?? false;
      const dueMono = this.dueOf(e);
      const q = this.queued.get(e.vmId);
      const age = e.lastSuccessMono === null ? null : (mono - e.lastSuccessMono) / 1000;
      out.push({
        vmId: e.vmId,
        diskId: e.diskId,
        freqSeconds: e.freqMs / 1000,
        running,
        forced: e.forced,
        dueMono,
        nextDueAt: Math.round((wallMs + (dueMono - mono)) / 1000),
        queuedSince: q !== undefined && dueMono <= mono && !running ? Math.floor((wallMs - (mono - q)) / 1000) : undefined,
        ageSec: age,
        overdue: this.ageMs(e, mono) / 1000 > overdueLimitSec(e.freqMs / 1000, this.opts, e.lastCycleMs),
        failCount: e.failCount,
      });
    }
    return out.sort((a, b) => a.vmId - b.vmId || a.diskId - b.diskId);
  }

  size(): number {
    return this.entries.size;
  }

  private dueOf(e: Entry): number {
    // forced: due since it became known, i.e. now, whatever the cadence says
    if (e.forced) return Math.min(e.knownSinceMono, this.regularDue(e));
    if (e.retryAtMono !== null) return e.retryAtMono;
    const regular = this.regularDue(e);
    return e.firstRun ? Math.max(regular, e.knownSinceMono) + e.offsetMs : regular;
  }

  private regularDue(e: Entry): number {
    return e.lastSuccessMono === null ? e.knownSinceMono : e.lastSuccessMono + e.freqMs;
  }

  private ageMs(e: Entry, mono: number): number {
    return mono - (e.lastSuccessMono ?? e.knownSinceMono);
  }

  private offsetFor(vmId: number, diskId: number, freqMs: number): number {
    const spreadMs = this.opts.spreadSec > 0 ? this.opts.spreadSec * 1000 : Math.min(freqMs / 10, 60_000);
    return spreadOffsetMs(this.opts.host, vmId, diskId, spreadMs);
  }

  private groupByVm(): Map<number, Entry[]> {
    const m = new Map<number, Entry[]>();
    for (const e of this.entries.values()) {
      const l = m.get(e.vmId);
      if (l) l.push(e);
      else m.set(e.vmId, [e]);
    }
    return m;
  }

  private vmHasEntries(vmId: number): boolean {
    for (const e of this.entries.values()) if (e.vmId === vmId) return true;
    return false;
  }
}

/** Persisted epoch (s) -> monotonic ms. A success stamped in the future (wall clock stepped back
 *  since) counts as just taken: no burst, and at most one freq of waiting. */
function mapEpochToMono(epochSec: number, mono: number, wallMs: number): number {
  const ageMs = Math.max(0, wallMs - epochSec * 1000);
  return mono - ageMs;
}

function remember(e: Entry, epoch: number): void {
  e.seenWalls.push(epoch);
  if (e.seenWalls.length > 4) e.seenWalls.shift();
}

function clamp(v: number, lo: number, hi: number): number {
  return Math.min(Math.max(v, lo), hi);
}
