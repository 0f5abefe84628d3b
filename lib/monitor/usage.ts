/**
 * Filesystem figures for the probes (statfs, bounded directory walks, small file reads and writes),
 * done so that a hung filesystem (dead NFS, a FIFO where a file should be) cannot hang the probe.
 *
 * WHY child processes and not fs calls: measured on Node 20, a process whose libuv threadpool or a
 * worker thread is blocked in open()/read() never exits — process.exit() and even process.reallyExit()
 * wait for those threads. So every access that can block runs in a small disposable child (`cat`,
 * `stat -f`, `find`) whose output comes back over a pipe; at the deadline the child is SIGKILLed and
 * abandoned (unref'd, pipes closed), and the probe reports an error instead. The child never gets
 * the probe's own stdout, so a child stuck in uninterruptible sleep cannot keep monitord waiting.
 */
import { spawn } from 'node:child_process';

export type Bounded<T> = { ok: true; value: T; ms: number } | { ok: false; error: string; timedOut: boolean; ms: number };

export interface BoundedRunOptions {
  deadlineMs: number;
  /** stop reading (and kill the child) after this many bytes of stdout */
  maxBytes?: number;
  input?: string;
}

interface RawRun {
  stdout: Buffer;
  stderr: string;
  code: number | null;
  truncated: boolean;
}

/** Runs a program with a hard deadline; never waits for a child past it, never rejects. */
export function runBounded(file: string, args: readonly string[], opts: BoundedRunOptions): Promise<Bounded<RawRun>> {
  const t0 = performance.now();
  const ms = (): number => Math.round((performance.now() - t0) * 10) / 10;
  return new Promise((resolve) => {
    let settled = false;
    const chunks: Buffer[] = [];
    let size = 0;
    let truncated = false;
    let stderr = '';
    const child = spawn(file, args as string[], {
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
      env: { ...process.env, LC_ALL: 'C', LANG: 'C' },
    });
    const abandon = (): void => {
      try {
        child.kill('SIGKILL');
      } catch {
        /* already gone */
      }
      child.stdout?.destroy();
      child.stderr?.destroy();
      child.stdin?.destroy();
      child.unref();
    };
    const finish = (r: Bounded<RawRun>): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(r);
    };
    const timer = setTimeout(() => {
      abandon();
      finish({ ok: false, timedOut: true, error: `${file} ${args.join(' ')}: no answer within ${opts.deadlineMs} ms (hung filesystem?)`, ms: ms() });
    }, opts.deadlineMs);
    child.stdout!.on('data', (b: Buffer) => {
      if (opts.maxBytes !== undefined && size + b.length > opts.maxBytes) {
        chunks.push(b.subarray(0, opts.maxBytes - size));
        size = opts.maxBytes;
        truncated = true;
        abandon();
        finish({ ok: true, value: { stdout: Buffer.concat(chunks), stderr, code: null, truncated }, ms: ms() });
        return;
      }
      chunks.push(b);
      size += b.length;
    });
    child.stderr!.on('data', (b: Buffer) => {
      if (stderr.length < 4096) stderr += b.toString('utf8');
    });
    child.on('error', (e) => finish({ ok: false, timedOut: false, error: `${file}: ${e.message}`, ms: ms() }));
    child.on('close', (code) => finish({ ok: true, value: { stdout: Buffer.concat(chunks), stderr: stderr.trim(), code, truncated }, ms: ms() }));
    if (opts.input !== undefined) {
      child.stdin!.on('error', () => {});
      child.stdin!.end(opts.input);
    }
  });
}

/** Reads a small file through `cat`; ENOENT is reported as value null. */
export async function readFileBounded(file: string, deadlineMs: number, maxBytes = 64 * 1024 * 1024): Promise<Bounded<string | null>> {
  // `--` so a path can never be taken for an option
  const r = await runBounded('cat', ['--', file], { deadlineMs, maxBytes: maxBytes + 1 });
  if (!r.ok) return r;
  if (r.value.code !== 0) {
    if (/No such file or directory|Not a directory/.test(r.value.stderr)) return { ok: true, value: null, ms: r.ms };
    return { ok: false, timedOut: false, error: `cannot read ${file}: ${r.value.stderr || `cat exited ${r.value.code}`}`, ms: r.ms };
  }
  if (r.value.truncated) return { ok: false, timedOut: false, error: `${file} is larger than ${maxBytes} bytes`, ms: r.ms };
  return { ok: true, value: r.value.stdout.toString('utf8'), ms: r.ms };
}

/** Atomic replace (temp in the same dir, then rename) done by a child, so a hung target cannot hang us. */
export async function writeFileAtomicBounded(file: string, data: string, deadlineMs: number): Promise<Bounded<void>> {
  const script = 'umask 022; t="$1.tmp.$$"; cat > "$t" && mv -f -- "$t" "$1" || { rm -f -- "$t"; exit 1; }';
  const r = await runBounded('sh', ['-c', script, 'sh', file], { deadlineMs, input: data });
  if (!r.ok) return r;
  if (r.value.code !== 0) return { ok: false, timedOut: false, error: `cannot write ${file}: ${r.value.stderr || `exit ${r.value.code}`}`, ms: r.ms };
  return { ok: true, value: undefined, ms: r.ms };
}

export interface FsFigures {
  /** MiB, rounded up like `df -B1M` */
  totalMb: number;
  usedMb: number;
  /** available to unprivileged users (df's "Available") */
  freeMb: number;
}

const MIB = 1024 * 1024;

/** Pure: one line of `stat -f -c '%S %b %f %a'` to figures in MiB. */
export function parseStatfsLine(line: string): FsFigures | null {
  const m = /^(\d+) (\d+) (\d+) (\d+)$/.exec(line.trim());
  if (!m) return null;
  const [bs, blocks, bfree, bavail] = [Number(m[1]), Number(m[2]), Number(m[3]), Number(m[4])];
  return {
    totalMb: Math.ceil((blocks * bs) / MIB),
    usedMb: Math.ceil(((blocks - bfree) * bs) / MIB),
    freeMb: Math.ceil((bavail * bs) / MIB),
  };
}

/** statfs of several paths, each in its own child so one dead mount does not cost the others. */
export async function statfsBounded(paths: readonly string[], deadlineMs: number): Promise<Map<string, Bounded<FsFigures>>> {
  const out = new Map<string, Bounded<FsFigures>>();
  await Promise.all(
    paths.map(async (p) => {
      const r = await runBounded('stat', ['-f', '-c', '%S %b %f %a', '--', p], { deadlineMs, maxBytes: 4096 });
      if (!r.ok) return out.set(p, r);
      const fig = r.value.code === 0 ? parseStatfsLine(r.value.stdout.toString('utf8')) : null;
      out.set(p, fig ? { ok: true, value: fig, ms: r.ms } : { ok: false, timedOut: false, error: `statfs ${p}: ${r.value.stderr || 'unexpected output'}`, ms: r.ms });
    }),
  );
  return out;
}

export interface WalkEntry {
  type: string; // find %y: f, d, l, ...
  /** bytes allocated (512-byte blocks * 512), what du counts */
  allocated: number;
  depth: number;
  rel: string;
}

export interface WalkResult {
  entries: WalkEntry[];
  /** the walk stopped at maxEntries (figures are a lower bound) */
  truncated: boolean;
  missing: boolean;
}

/** Pure: NUL-separated `find -printf '%y %b %d %P\0'` records. A last partial record is dropped. */
export function parseFindOutput(buf: Buffer): WalkEntry[] {
  const text = buf.toString('utf8');
  const recs = text.split('\0');
  // complete output ends with a NUL (the last piece is ''); cut output ends mid-record: drop it either way
  recs.pop();
  const out: WalkEntry[] = [];
  for (const r of recs) {
    const m = /^(\S) (\d+) (\d+) ([\s\S]*)$/.exec(r);
    if (m) out.push({ type: m[1]!, allocated: Number(m[2]) * 512, depth: Number(m[3]), rel: m[4]! });
  }
  return out;
}

/** A walk with bounded depth, entry count and time. */
export async function walkBounded(root: string, maxDepth: number, maxEntries: number, deadlineMs: number): Promise<Bounded<WalkResult>> {
  // one record is ~40 bytes + name; the byte cap is what actually stops find
  const r = await runBounded('find', [root, '-mindepth', '1', '-maxdepth', String(maxDepth), '-printf', '%y %b %d %P\\0'], {
    deadlineMs,
    maxBytes: maxEntries * 320,
  });
  if (!r.ok) return r;
  if (r.value.code !== 0 && !r.value.truncated) {
    if (/No such file or directory/.test(r.value.stderr) && r.value.stdout.length === 0) return { ok: true, value: { entries: [], truncated: false, missing: true }, ms: r.ms };
    if (r.value.stdout.length === 0) return { ok: false, timedOut: false, error: `walk ${root}: ${r.value.stderr || `find exited ${r.value.code}`}`, ms: r.ms };
  }
  let entries = parseFindOutput(r.value.stdout);
  let truncated = r.value.truncated;
  if (entries.length > maxEntries) {
    entries = entries.slice(0, maxEntries);
    truncated = true;
  }
  return { ok: true, value: { entries, truncated, missing: false }, ms: r.ms };
}

// ---------------------------------------------------------------------------------------------
// Pure summaries of walks
// ---------------------------------------------------------------------------------------------

/** Upstream counts cache images as top-level regular files named only with hex digits and dashes. */
const IMAGE_NAME = /^[-a-f0-9]*$/;

export interface CacheSummary {
  usedMb: number;
  images: number;
  truncated: boolean;
}

export function summarizeCache(w: WalkResult): CacheSummary {
  let bytes = 0;
  let images = 0;
  for (const e of w.entries) {
    bytes += e.allocated;
    if (e.depth === 1 && e.type === 'f' && IMAGE_NAME.test(e.rel)) images++;
  }
  return { usedMb: Math.ceil(bytes / MIB), images, truncated: w.truncated };
}

export interface SnapsSummary {
  usedMb: number;
  vms: number;
  /** disks whose base and base.1 are both regular files (what recovery accepts) */
  completeDisks: number;
  /** disk.N.snap dirs that lack base or base.1 */
  incompleteDisks: number;
  truncated: boolean;
}

export function summarizeSnaps(w: WalkResult): SnapsSummary {
  let bytes = 0;
  const vms = new Set<string>();
  const snapDirs = new Map<string, { base: boolean; base1: boolean }>();
  for (const e of w.entries) {
    // the receiver's own SNAPS/.onestor is reported apart (summarizeBookkeeping)
    if (e.rel === '.onestor' || e.rel.startsWith('.onestor/')) continue;
    bytes += e.allocated;
    const parts = e.rel.split('/');
    if (e.depth === 1 && e.type === 'd' && /^\d+$/.test(parts[0]!)) vms.add(parts[0]!);
    if (!/^\d+$/.test(parts[0] ?? '')) continue;
    if (e.depth === 2 && e.type === 'd' && /^disk\.\d+\.snap$/.test(parts[1]!)) {
      if (!snapDirs.has(e.rel)) snapDirs.set(e.rel, { base: false, base1: false });
    }
    if (e.depth === 3 && e.type === 'f' && /^disk\.\d+\.snap$/.test(parts[1]!)) {
      const key = `${parts[0]}/${parts[1]}`;
      const s = snapDirs.get(key) ?? { base: false, base1: false };
      if (parts[2] === 'base') s.base = true;
      if (parts[2] === 'base.1') s.base1 = true;
      snapDirs.set(key, s);
    }
  }
  let complete = 0;
  for (const s of snapDirs.values()) if (s.base && s.base1) complete++;
  return { usedMb: Math.ceil(bytes / MIB), vms: vms.size, completeDisks: complete, incompleteDisks: snapDirs.size - complete, truncated: w.truncated };
}

// ---------------------------------------------------------------------------------------------
// The receiver's bookkeeping in SNAPS/.onestor: merge spares, journals and increments awaiting the next
// merge (work/), uploads in flight and temps (tmp/), locks, slots, ledger (the rest).
// ---------------------------------------------------------------------------------------------

export interface BookkeepingEntry {
  type: string;
  allocated: number;
  ino: number;
  nlink: number;
  rel: string;
}

/** Pure: NUL-separated `find -printf '%y %b %i %n %P\0'` records; a last partial record is dropped. */
export function parseBookkeepingFind(buf: Buffer): BookkeepingEntry[] {
  const recs = buf.toString('utf8').split('\0');
  recs.pop();
  const out: BookkeepingEntry[] = [];
  for (const r of recs) {
    const m = /^(\S) (\d+) (\d+) (\d+) ([\s\S]*)$/.exec(r);
    if (m) out.push({ type: m[1]!, allocated: Number(m[2]) * 512, ino: Number(m[3]), nlink: Number(m[4]), rel: m[5]! });
  }
  return out;
}

export interface BookkeepingSummary {
  /** everything the receiver holds beside the published snapshots, MiB */
  totalMb: number;
  /** work/: merge spares, journals, increments kept for the next merge */
  workMb: number;
  /** tmp/: uploads in flight or kept for a resume, temps of sessions */
  tmpMb: number;
  /** hard links to files also linked outside .onestor (the published base.1): not counted above */
  sharedMb: number;
  truncated: boolean;
}

/**
 * Sums what only the bookkeeping holds. A file with more links than the walk saw is also linked outside
 * .onestor — the published base.1 (work/copy.a is a hard link to it) — so it costs nothing extra; a link
 * whose base.1 upstream deleted has nlink 1 and counts in full (that is an orphan for the sweep).
 */
export function summarizeBookkeeping(entries: readonly BookkeepingEntry[], truncated: boolean): BookkeepingSummary {
  const seen = new Map<number, number>();
  for (const e of entries) if (e.type === 'f' && e.nlink > 1) seen.set(e.ino, (seen.get(e.ino) ?? 0) + 1);
  const counted = new Set<number>();
  let work = 0;
  let tmp = 0;
  let other = 0;
  let shared = 0;
  for (const e of entries) {
    if (e.type === 'f' && e.nlink > 1) {
      if (counted.has(e.ino)) continue;
      counted.add(e.ino);
      if (e.nlink > (seen.get(e.ino) ?? 0)) {
        shared += e.allocated;
        continue;
      }
    }
    const top = e.rel.split('/')[0];
    if (top === 'work') work += e.allocated;
    else if (top === 'tmp') tmp += e.allocated;
    else other += e.allocated;
  }
  const mb = (b: number) => Math.ceil(b / MIB);
  return { totalMb: mb(work + tmp + other), workMb: mb(work), tmpMb: mb(tmp), sharedMb: mb(shared), truncated };
}

/** Walk of SNAPS/.onestor (bounded like walkBounded); `missing` when there is none yet. */
export async function walkBookkeepingBounded(snapsDir: string, maxEntries: number, deadlineMs: number): Promise<Bounded<BookkeepingSummary & { missing: boolean }>> {
  const root = `${snapsDir.replace(/\/+$/, '')}/.onestor`;
  const r = await runBounded('find', [root, '-mindepth', '1', '-maxdepth', '5', '-printf', '%y %b %i %n %P\\0'], { deadlineMs, maxBytes: maxEntries * 320 });
  if (!r.ok) return r;
  if (r.value.code !== 0 && !r.value.truncated) {
    if (/No such file or directory/.test(r.value.stderr) && r.value.stdout.length === 0) {
      return { ok: true, value: { ...summarizeBookkeeping([], false), missing: true }, ms: r.ms };
    }
    if (r.value.stdout.length === 0) return { ok: false, timedOut: false, error: `walk ${root}: ${r.value.stderr || `find exited ${r.value.code}`}`, ms: r.ms };
  }
  let entries = parseBookkeepingFind(r.value.stdout);
  let truncated = r.value.truncated;
  if (entries.length > maxEntries) {
    entries = entries.slice(0, maxEntries);
    truncated = true;
  }
  return { ok: true, value: { ...summarizeBookkeeping(entries, truncated), missing: false }, ms: r.ms };
}

/**
 * The cache limit the ssh driver enforces (its clean_cache): REPLICA_MAX_SIZE_MB when set, otherwise
 * what keeps the filesystem under REPLICA_MAX_USED_PERC: perc% of the size, minus what is used,
 * plus what the cache already holds.
 */
export function effectiveCacheLimitMb(
  settings: { REPLICA_MAX_SIZE_MB: number | null; REPLICA_MAX_USED_PERC: number },
  fs: FsFigures,
  cacheMb: number,
): { limitMb: number; from: 'REPLICA_MAX_SIZE_MB' | 'REPLICA_MAX_USED_PERC' } {
  if (settings.REPLICA_MAX_SIZE_MB !== null) return { limitMb: settings.REPLICA_MAX_SIZE_MB, from: 'REPLICA_MAX_SIZE_MB' };
  return { limitMb: Math.floor((settings.REPLICA_MAX_USED_PERC * fs.totalMb) / 100) - fs.usedMb + cacheMb, from: 'REPLICA_MAX_USED_PERC' };
}
