/**
 * Gathering for the replica-ds probe (system datastore lines, replica cache and snaps area): driver
 * settings, statfs figures and directory walks, each through a bounded child (usage.ts). Walks are
 * slow on a big cache, so their results are kept in a small cache file and redone after a TTL.
 */
import path from 'node:path';
import { describeError } from '../shared/errors.js';
import { LEDGER_DIR, HANDOVERS_FILE, TAKEOVERS_FILE, TAKEOVERS_ROTATE_BYTES, WRITERS_DIR, parseTakeoverLines, parseWriterRecord, summarizeTakeovers } from '../shared/ledger.js';
import { parseSshrc } from '../config/sshrc.js';
import { DEFAULT_DRIVER_SETTINGS, DEFAULT_SSHRC_PATHS } from '../shared/defaults.js';
import type { DriverSettings } from '../shared/model.js';
import type { DsFigures, Measured, ReplicaDsInput } from './probe-lines.js';
import { dsLocationOf, type Budget } from './gather.js';
import { readFileBounded, runBounded, statfsBounded, summarizeCache, summarizeSnaps, walkBookkeepingBounded, walkBounded, writeFileAtomicBounded, type BookkeepingSummary, type Bounded, type FsFigures } from './usage.js';

export const DEFAULT_WALK_CACHE_FILE = '/var/tmp/onestor-agent/probe-walk-cache.json';

export interface ReplicaProbeOptions {
  stdinXml?: string;
  datastoreLocation?: string;
  now?: number;
  sshrcPaths?: readonly string[];
  /** where walk results are kept between runs */
  cacheFile?: string;
  /** walks of the cache and snaps dirs are redone after this many seconds (default 300) */
  walkTtlS?: number;
  maxWalkEntries?: number;
}

interface WalkCache {
  version: 1;
  walks: Record<string, { at: number; result: { entries: Array<{ type: string; allocated: number; depth: number; rel: string }>; truncated: boolean; missing: boolean } }>;
  /** SNAPS/.onestor summaries by snaps dir (only the figures are kept: the walk may hold many temps) */
  bookkeeping?: Record<string, { at: number; value: BookkeepingSummary & { missing: boolean } }>;
}

export async function replicaInputs(opts: ReplicaProbeOptions, budget: Budget, errors: string[]): Promise<ReplicaDsInput> {
  const now = opts.now ?? Date.now() / 1000;
  const loc = dsLocationOf(opts);
  const ttl = opts.walkTtlS ?? 300;
  const maxEntries = opts.maxWalkEntries ?? 100_000;
  const cacheFile = opts.cacheFile ?? DEFAULT_WALK_CACHE_FILE;

  // Two independent branches run together (each child is a fork and a scheduling round trip; in sequence
  // they were most of this probe's time, and a blocked read in one must not starve the other): the
  // datastores (numeric dirs with a .monitor file, as upstream: statfs and the cache walk), and the driver
  // settings (first existing sshrc, upstream keeps it in two places), which name the snaps dir measured
  // after them. The settings read gets at most 40 % of the budget, so a hung sshrc still leaves the snaps
  // figures time to answer; the datastores never wait for it.
  const cacheLoad = readFileBounded(cacheFile, budget.left(), 64 * 1024 * 1024).then((r) => {
    if (r.ok && r.value) {
      try {
        const c = JSON.parse(r.value) as WalkCache;
        if (c.version === 1 && c.walks && typeof c.walks === 'object') return c;
      } catch {
        /* a corrupt cache is just a cold cache */
      }
    }
    return { version: 1, walks: {} } as WalkCache;
  });
  let cacheDirty = false;
  // walks: cached, redone after ttl; a failed refresh keeps reporting the error (not an old figure)
  const walk = async (root: string, depth: number): Promise<Measured<{ result: WalkCache['walks'][string]['result']; at: number }>> => {
    const cache = await cacheLoad;
    const key = `${depth}:${root}`;
    const hit = cache.walks[key];
    if (hit && now - hit.at < ttl && now >= hit.at) return { ok: true, value: hit };
    const w = await walkBounded(root, depth, maxEntries, budget.left());
    if (!w.ok) return { ok: false, error: w.error };
    cache.walks[key] = { at: now, result: w.value };
    cacheDirty = true;
    return { ok: true, value: { at: now, result: w.value } };
  };
  const bookkeepingOf = async (snaps: string): Promise<Measured<BookkeepingSummary & { missing: boolean; measuredAt: number }>> => {
    const cache = await cacheLoad;
    const hit = cache.bookkeeping?.[snaps];
    if (hit && now - hit.at < ttl && now >= hit.at) return { ok: true, value: { ...hit.value, measuredAt: hit.at } };
    const w = await walkBookkeepingBounded(snaps, maxEntries, budget.left());
    if (!w.ok) return { ok: false, error: w.error };
    (cache.bookkeeping ??= {})[snaps] = { at: now, value: w.value };
    cacheDirty = true;
    return { ok: true, value: { ...w.value, measuredAt: now } };
  };
  const measured = <T>(f: Bounded<T> | undefined): Measured<T> => (f?.ok ? { ok: true, value: f.value } : { ok: false, error: f ? f.error : 'not measured' });

  const datastoresBranch = async (): Promise<{ location: Measured<FsFigures>; datastores: DsFigures[] }> => {
    const list = await runBounded('find', [loc, '-mindepth', '2', '-maxdepth', '2', '-name', '.monitor', '-type', 'f', '-printf', '%h\\0'], { deadlineMs: budget.left(), maxBytes: 1024 * 1024 });
    const dsIds: number[] = [];
    if (list.ok) {
      for (const dir of list.value.stdout.toString('utf8').split('\0')) {
        const id = path.basename(dir);
        if (/^\d+$/.test(id) && path.dirname(dir) === loc.replace(/\/+$/, '')) dsIds.push(Number(id));
      }
    } else errors.push(list.error);
    const [marks, figures] = await Promise.all([
      Promise.all(dsIds.map((id) => readFileBounded(path.join(loc, String(id), '.monitor'), budget.left(), 4096))),
      statfsBounded([loc, ...dsIds.map((id) => path.join(loc, String(id)))], budget.left()),
    ]);
    const datastores = await Promise.all(
      dsIds.map(async (id, i): Promise<DsFigures> => {
        const m = marks[i]!;
        const tm = m.ok && m.value !== null ? m.value.trim() : '';
        const dir = path.join(loc, String(id));
        const ds: DsFigures = { id, tm, fs: measured(figures.get(dir)) };
        if (tm === 'replica') {
          const w = await walk(dir, 1);
          ds.cache = w.ok ? { ok: true, value: { ...summarizeCache(w.value.result), measuredAt: w.value.at } } : w;
        }
        return ds;
      }),
    );
    return { location: measured(figures.get(loc)), datastores };
  };

  const settingsBranch = async (): Promise<{ settings: DriverSettings; settingsError?: string; snaps?: ReplicaDsInput['snaps']; ledger?: ReplicaDsInput['ledger'] }> => {
    const sshrcPaths = opts.sshrcPaths ?? DEFAULT_SSHRC_PATHS;
    const settingsDeadline = budget.share(0.4);
    const sshrcReads = await Promise.all(sshrcPaths.map((p) => readFileBounded(p, settingsDeadline, 1024 * 1024)));
    let settings = { ...DEFAULT_DRIVER_SETTINGS };
    let settingsError: string | undefined;
    for (const [i, r] of sshrcReads.entries()) {
      if (!r.ok) {
        settingsError = r.error;
        break;
      }
      if (r.value === null) continue;
      try {
        settings = parseSshrc(r.value, sshrcPaths[i]!).settings;
      } catch (e) {
        settingsError = describeError(e);
      }
      break;
    }
    const snapsDir = settings.REPLICA_RECOVERY_SNAPS_DIR;
    const [snapsFs, snapsWalk] = await Promise.all([statfsBounded([snapsDir], budget.left()), walk(snapsDir, 3)]);
    if (snapsWalk.ok && snapsWalk.value.result.missing) return { settings, settingsError };
    const snaps: NonNullable<ReplicaDsInput['snaps']> = {
      fs: measured(snapsFs.get(snapsDir)),
      usage: snapsWalk.ok ? { ok: true, value: { ...summarizeSnaps(snapsWalk.value.result), measuredAt: snapsWalk.value.at } } : snapsWalk,
    };
    const [bk, ledger] = await Promise.all([bookkeepingOf(snapsDir), readLedger(snapsDir, now, budget)]);
    if (!(bk.ok && bk.value.missing)) snaps.bookkeeping = bk;
    return { settings, settingsError, snaps, ledger };
  };

  const [{ location, datastores }, { settings, settingsError, snaps, ledger }] = await Promise.all([datastoresBranch(), settingsBranch()]);
  if (cacheDirty) {
    const cache = await cacheLoad;
    const w = await writeFileAtomicBounded(cacheFile, JSON.stringify(cache), budget.left());
    if (!w.ok) {
      // the directory may simply not exist yet
      await runBounded('mkdir', ['-p', '--', path.dirname(cacheFile)], { deadlineMs: budget.left() });
      const again = await writeFileAtomicBounded(cacheFile, JSON.stringify(cache), budget.left());
      if (!again.ok) errors.push(`walk cache: ${again.error}`);
    }
  }
  return { location, datastores, settings, settingsError, snaps, ...(ledger ? { ledger } : {}) };
}

/** The receiver's ownership ledger: one child per file group (each writer file is one JSON line). */
async function readLedger(snapsDir: string, now: number, budget: Budget): Promise<NonNullable<ReplicaDsInput['ledger']>> {
  const dir = path.join(snapsDir, LEDGER_DIR);
  const catAll = async (where: string, name: string, maxBytes: number): Promise<Measured<string>> => {
    const r = await runBounded('find', [where, '-maxdepth', '1', '-type', 'f', '-name', name, '-exec', 'cat', '--', '{}', '+'], { deadlineMs: budget.left(), maxBytes });
    if (!r.ok) return { ok: false, error: r.error };
    // find fails when the dir does not exist yet: nothing written, nothing to report
    if (r.value.code !== 0 && !/No such file or directory/.test(r.value.stderr)) return { ok: false, error: r.value.stderr || `find exited ${r.value.code}` };
    return { ok: true, value: r.value.stdout.toString('utf8') };
  };
  const [w, tk, h] = await Promise.all([
    catAll(path.join(dir, WRITERS_DIR), '*.json', 1024 * 1024),
    catAll(dir, `${TAKEOVERS_FILE}*`, 4 * TAKEOVERS_ROTATE_BYTES),
    catAll(dir, `${HANDOVERS_FILE}*`, 4 * TAKEOVERS_ROTATE_BYTES),
  ]);
  return {
    writers: w.ok ? { ok: true, value: w.value.split('\n').map(parseWriterRecord).filter((x): x is NonNullable<typeof x> => x !== null) } : w,
    takeovers: tk.ok ? { ok: true, value: summarizeTakeovers(parseTakeoverLines(tk.value), now) } : tk,
    handovers: h.ok ? { ok: true, value: summarizeTakeovers(parseTakeoverLines(h.value), now) } : h,
  };
}

