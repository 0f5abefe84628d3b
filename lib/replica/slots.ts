/**
 * Receiver session slots, fair across hosts. Each receiver is its own process (one per ssh exec), so the
 * bookkeeping lives in SNAPS/.onestor/slots/:
 *   slot.N        flock'ed by the holder for as long as it holds the slot (the kernel drops it on death)
 *   slot.N.owner  "identity\npid" of the holder, written after the flock is taken (who holds what)
 *   wait.PID.N    "identity" of a receiver waiting for a slot, removed when it stops waiting
 * The flock is the truth about whether a slot is free; owner and wait files only steer who may take a free
 * one. Files of dead processes (pid gone) are ignored and removed.
 *
 * Rule: an identity may take a free slot when it holds fewer than maxPerHost slots and no OTHER waiting
 * identity holds fewer slots than it does. So a host that is alone may use up to maxPerHost slots, and as
 * soon as another host waits, every freed slot goes to whoever holds the fewest (ties race).
 */
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import * as fsp from 'node:fs/promises';
import path from 'node:path';
import { ErrorCodes, OnestorError, errorCodeOf } from '../shared/errors.js';
import { acquireFileLock, type FileLock } from '../shared/file-lock.js';

/**
 * The identity of a key authorized without `--host` (no name to tell hosts apart by): every such session
 * is the same "host", so no per-host cap applies to it (it would cap all of them together).
 */
export const UNNAMED_IDENTITY = 'unnamed';

/** A host name bound into the forced command (`receive --host NAME`): the writer's identity. */
export const HOST_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export interface SlotOptions {
  dir: string;
  identity: string;
  maxSessions: number;
  /** most slots one identity may hold at once */
  maxPerHost: number;
  busyWaitSec: number;
  pollMs?: number;
  log?: (obj: object, msg: string) => void;
}

export interface SlotView {
  /** identity -> slots held (live holders only) */
  held: Map<string, number>;
  /** identities waiting (live waiters only) */
  waiting: Set<string>;
  /** slot indexes whose owner file names a live holder */
  busy: Set<number>;
}

/** Default per-host cap: half the slots, rounded up, so one host alone never holds all of them (when > 1). */
export function defaultMaxPerHost(maxSessions: number): number {
  return maxSessions <= 1 ? 1 : Math.ceil(maxSessions / 2);
}

/** Pure decision (exported for unit tests): may `me` take a free slot now? */
export function mayTake(me: string, view: SlotView, maxPerHost: number): boolean {
  const mine = view.held.get(me) ?? 0;
  if (mine >= maxPerHost) return false;
  for (const other of view.waiting) {
    if (other === me) continue;
    if ((view.held.get(other) ?? 0) < mine) return false;
  }
  return true;
}

function alive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    // EPERM: exists but belongs to someone else (still alive)
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Reads who holds and who waits; removes files left by dead processes. */
export async function readSlotView(dir: string, maxSessions: number): Promise<SlotView> {
  const held = new Map<string, number>();
  const waiting = new Set<string>();
  const busy = new Set<number>();
  let names: string[];
  try {
    names = await fsp.readdir(dir);
  } catch {
    return { held, waiting, busy };
  }
  for (const name of names) {
    const w = /^wait\.(\d+)\.\w+$/.exec(name);
    const o = /^slot\.(\d+)\.owner$/.exec(name);
    if (!w && !o) continue;
    const file = path.join(dir, name);
    const text = await fsp.readFile(file, 'utf8').catch(() => null);
    if (text === null) continue;
    const [identity = '', pidText = ''] = text.split('\n');
    const pid = Number(w ? w[1] : pidText);
    if (!alive(pid)) {
      // a new holder may have just rewritten this owner file: remove it only if it still names the dead pid
      if ((await fsp.readFile(file, 'utf8').catch(() => null)) === text) await fsp.rm(file, { force: true }).catch(() => {});
      continue;
    }
    if (!identity) continue;
    if (w) {
      waiting.add(identity);
    } else {
      const index = Number(o![1]);
      if (index >= maxSessions) continue;
      busy.add(index);
      held.set(identity, (held.get(identity) ?? 0) + 1);
    }
  }
  return { held, waiting, busy };
}

const FULL_TRY_MS = 5_000;

export interface Slot {
  index: number;
  release(): Promise<void>;
}

/**
 * Waits up to busyWaitSec for a slot this identity may take (see the rule above); E_BUSY otherwise.
 * The caller holds no slot while it waits (a receiver holds at most one, from open to close).
 */
export async function acquireFairSlot(o: SlotOptions): Promise<Slot> {
  // o.dir was checked component by component by the caller (privateDir): no recursive mkdir through links here
  const waitFile = path.join(o.dir, `wait.${process.pid}.${randomBytes(4).toString('hex')}`);
  const deadline = Date.now() + o.busyWaitSec * 1000;
  const pollMs = o.pollMs ?? 200;
  let registered = false;
  let lastReason = '';
  let lastFullTry = 0;
  try {
    for (;;) {
      const view = await readSlotView(o.dir, o.maxSessions);
      if (mayTake(o.identity, view, o.maxPerHost)) {
        // slots that look free; every few seconds the others too, since an owner file may outlive its holder
        // when the holder's pid was reused (the flock is the truth). Each try spawns a flock process.
        const full = Date.now() - lastFullTry >= FULL_TRY_MS;
        if (full) lastFullTry = Date.now();
        const order = [...Array(o.maxSessions).keys()].filter((i) => full || !view.busy.has(i));
        for (const i of order) {
          let lock: FileLock;
          try {
            // flock(1) follows symlinks: the slot file must be absent or a regular file
            const slotFile = path.join(o.dir, `slot.${i}`);
            const st = await fsp.lstat(slotFile).catch(() => null);
            if (st && !st.isFile()) throw new OnestorError(ErrorCodes.PATH, `refusing slot file ${slotFile}: not a regular file`, { file: slotFile });
            lock = await acquireFileLock(slotFile, { timeoutSec: 0 });
          } catch (e) {
            if (errorCodeOf(e) !== ErrorCodes.LOCK_TIMEOUT) throw e;
            continue;
          }
          const ownerFile = path.join(o.dir, `slot.${i}.owner`);
          await writeNoFollow(ownerFile, `${o.identity}\n${process.pid}\n`);
          return {
            index: i,
            release: async () => {
              // owner file first: a slot must never look held by us once the flock is gone
              await fsp.rm(ownerFile, { force: true }).catch(() => {});
              await lock.release();
            },
          };
        }
        lastReason = `all ${o.maxSessions} receiver sessions busy`;
      } else {
        const mine = view.held.get(o.identity) ?? 0;
        lastReason =
          mine >= o.maxPerHost
            ? `host ${o.identity} already holds ${mine} of its ${o.maxPerHost} sessions`
            : `host ${o.identity} holds ${mine} sessions and other hosts holding fewer are waiting`;
      }
      if (!registered) {
        // announce that we wait, so holders of more slots than us leave the next free one to us
        await writeNoFollow(waitFile, `${o.identity}\n`);
        registered = true;
        o.log?.({ identity: o.identity, reason: lastReason }, 'waiting for a session slot');
      }
      if (Date.now() >= deadline) {
        throw new OnestorError(ErrorCodes.BUSY, `${lastReason} for ${o.busyWaitSec} s; try again later`, { field: 'receiver.maxSessions' });
      }
      await new Promise((r) => setTimeout(r, Math.min(pollMs, Math.max(10, deadline - Date.now()))));
    }
  } finally {
    if (registered) await fsp.rm(waitFile, { force: true }).catch(() => {});
  }
}

/** Small bookkeeping files are never written through a symlink someone planted in the slots dir. */
async function writeNoFollow(file: string, data: string): Promise<void> {
  const c = fsConstants;
  await fsp.writeFile(file, data, { mode: 0o600, flag: c.O_WRONLY | c.O_CREAT | c.O_TRUNC | (c.O_NOFOLLOW ?? 0) });
}
