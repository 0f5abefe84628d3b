/**
 * Space reservations across receiver sessions (each one a separate process): bytes a session has accepted
 * but not yet published count against REPLICA_MAX_USED_PERC for every other session, so four sessions each
 * declaring 25% of the filesystem cannot all be accepted against a 90% limit.
 *
 * Ledger: one file per live session beside its slot lock (SNAPS/.onestor/slots/slot.K.resv, JSON
 * {"bytes": n}). A reservation counts only while its slot is flock-held (read from /proc/locks, so checking
 * never takes anyone's slot): a SIGKILLed session's reservation is released with its slot lock by the
 * kernel, and the next holder of that slot removes the stale file. Check + reserve happen under one short
 * global lock (slots/ledger.lock), so two sessions cannot both take the last free bytes.
 */
import { constants } from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { ErrorCodes, OnestorError, type ErrorContext } from '../shared/errors.js';
import { acquireFileLock } from '../shared/file-lock.js';

export const RESERVATION_SUFFIX = '.resv';
const LEDGER_LOCK = 'ledger.lock';
const LEDGER_LOCK_WAIT_SEC = 30;

export interface FsSpace {
  total: number;
  used: number;
  avail: number;
}

/** Pure: the (major, minor, inode) of every flock currently HELD (not waited for) in /proc/locks text. */
export function heldFlocks(procLocks: string): Set<string> {
  const out = new Set<string>();
  for (const line of procLocks.split('\n')) {
    // "12: FLOCK  ADVISORY  WRITE 4242 fe:00:2148055 0 EOF"; a waiter reads "12: -> FLOCK ..."
    const m = /^\d+:\s+FLOCK\s+\S+\s+\S+\s+\S+\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s/.exec(line);
    if (m) out.add(`${parseInt(m[1]!, 16)}:${parseInt(m[2]!, 16)}:${m[3]}`);
  }
  return out;
}

/** Linux dev_t (as in stat) to the "major:minor" that /proc/locks prints. */
export function devKey(dev: number, ino: number): string {
  const d = BigInt(dev);
  const major = Number(((d >> 8n) & 0xfffn) | ((d >> 32n) & ~0xfffn));
  const minor = Number((d & 0xffn) | ((d >> 12n) & ~0xffn));
  return `${major}:${minor}:${ino}`;
}

async function readLedgerFile(file: string): Promise<number> {
  try {
    const v = JSON.parse(await fsp.readFile(file, 'utf8')) as { bytes?: unknown };
    return typeof v.bytes === 'number' && Number.isSafeInteger(v.bytes) && v.bytes > 0 ? v.bytes : 0;
  } catch {
    return 0; // half-written or gone: its writer holds the ledger lock when it matters
  }
}

/**
 * Bytes reserved by live sessions other than `ownSlot`. Without /proc/locks every ledger file counts
 * (conservative: refusing too early beats filling the disk).
 */
export async function reservedByOthers(slotsDir: string, ownSlot: string | null): Promise<number> {
  const names = await fsp.readdir(slotsDir).catch(() => [] as string[]);
  let held: Set<string> | null = null;
  try {
    held = heldFlocks(await fsp.readFile('/proc/locks', 'utf8'));
  } catch {
    held = null;
  }
  let sum = 0;
  for (const n of names) {
    if (!n.endsWith(RESERVATION_SUFFIX)) continue;
    const slot = path.join(slotsDir, n.slice(0, -RESERVATION_SUFFIX.length));
    if (slot === ownSlot) continue;
    if (held) {
      const st = await fsp.stat(slot).catch(() => null);
      if (!st || !held.has(devKey(st.dev, st.ino))) continue; // that session is gone
    }
    sum += await readLedgerFile(path.join(slotsDir, n));
  }
  return sum;
}

/** One session's reservations, by upload (key → bytes), mirrored in its ledger file. */
export class SpaceLedger {
  private readonly mine = new Map<string, number>();
  private readonly file: string;
  private readonly slotsDir: string;

  constructor(
    private readonly slotPath: string,
    private readonly statfs: () => Promise<FsSpace>,
    private readonly maxUsedPercent: number,
  ) {
    this.file = slotPath + RESERVATION_SUFFIX;
    this.slotsDir = path.dirname(slotPath);
  }

  /** A stale file of an earlier holder of our slot (that session died without cleaning up). */
  async reset(): Promise<void> {
    this.mine.clear();
    await fsp.rm(this.file, { force: true });
  }

  get total(): number {
    let s = 0;
    for (const v of this.mine.values()) s += v;
    return s;
  }

  /**
   * Reserves `bytes` for `key` (replacing what it held) if the filesystem, counting every live session's
   * reservations, stays under the limit; otherwise E_NOSPACE naming the figures.
   */
  async reserve(key: string, bytes: number, context: ErrorContext): Promise<void> {
    const lock = await acquireFileLock(path.join(this.slotsDir, LEDGER_LOCK), { timeoutSec: LEDGER_LOCK_WAIT_SEC, context });
    try {
      const [others, fs] = await Promise.all([reservedByOthers(this.slotsDir, this.slotPath), this.statfs()]);
      const own = this.total - (this.mine.get(key) ?? 0);
      const after = fs.used + others + own + bytes;
      const percent = fs.total > 0 ? (after / fs.total) * 100 : 100;
      if (percent > this.maxUsedPercent) {
        throw new OnestorError(
          ErrorCodes.NOSPACE,
          `accepting ${bytes} bytes would bring the replica filesystem to ${percent.toFixed(1)}% used (limit ${this.maxUsedPercent}%): ` +
            `${fs.used} bytes used, ${others} reserved by other sessions, ${own} by this one`,
          { ...context, field: 'REPLICA_MAX_USED_PERC' },
        );
      }
      this.mine.set(key, bytes);
      await this.write();
    } finally {
      await lock.release();
    }
  }

  /** Lowers (or drops, with 0) a reservation; never needs the global lock (it only frees room). */
  async lower(key: string, bytes: number): Promise<void> {
    const had = this.mine.get(key);
    if (had === undefined || bytes >= had) return;
    if (bytes > 0) this.mine.set(key, bytes);
    else this.mine.delete(key);
    await this.write();
  }

  async releaseAll(): Promise<void> {
    this.mine.clear();
    await fsp.rm(this.file, { force: true });
  }

  private async write(): Promise<void> {
    if (this.mine.size === 0) {
      await fsp.rm(this.file, { force: true });
      return;
    }
    // temp + rename: a reader sees the old or the new total, never half of one
    const tmp = `${this.file}.tmp`;
    const fh = await fsp.open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW, 0o644);
    try {
      await fh.writeFile(JSON.stringify({ bytes: this.total, pid: process.pid }) + '\n');
    } finally {
      await fh.close();
    }
    try {
      await fsp.rename(tmp, this.file);
    } catch (e) {
      await fsp.rm(tmp, { force: true });
      throw e;
    }
  }
}
