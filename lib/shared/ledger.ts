/**
 * The replica's ownership ledger, shared by the receiver (writes it) and the replica probe (reads it).
 * PURE: names and parsers only. Lives in SNAPS/.onestor/ownership/, outside every SNAPS/VMID (upstream's
 * `rm -rf SNAPS/VMID` must not take the record of who wrote what with it):
 *   takeovers.jsonl (+ takeovers.jsonl.1)  one JSON object per take-over, appended; rotated at a size cap
 *   handovers.jsonl (+ .1)                 the same per hand-over (owner's release honoured), counted apart
 *   writers/TAG.json                       per writer: who, how authenticated, last publish
 * Parsers are hand-written (the probe avoids loading zod) and skip anything malformed.
 */
/** The writer name of a key the receiver could not identify (not a valid host name, so never a real host's). */
export const UNIDENTIFIED_WRITER = '(unidentified)';

export const LEDGER_DIR = '.onestor/ownership';
export const TAKEOVERS_FILE = 'takeovers.jsonl';
/** hand-overs (an incremental by the recipient of the owner's release), same line format, counted apart */
export const HANDOVERS_FILE = 'handovers.jsonl';
export const WRITERS_DIR = 'writers';
/** takeovers.jsonl is rotated to .1 past this size: the two files hold at least this much history. */
export const TAKEOVERS_ROTATE_BYTES = 256 * 1024;

export interface TakeoverEvent {
  at: number;
  vm: number;
  disk: number;
  from: string;
  to: string;
  checkpoint: string | null;
}

export interface WriterRecord {
  identity: string;
  /** how the receiver knows it: 'host' (--host), 'key' (fingerprint), 'unidentified' */
  auth: string;
  lastPublishAt: number;
  lastVm: number;
  lastDisk: number;
  lastMode: string;
}

const isObj = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const isInt = (v: unknown): v is number => Number.isInteger(v) && (v as number) >= 0;
const isStr = (v: unknown, max = 255): v is string => typeof v === 'string' && v.length > 0 && v.length <= max;

export function parseTakeoverLines(text: string): TakeoverEvent[] {
  const out: TakeoverEvent[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    let v: unknown;
    try {
      v = JSON.parse(line);
    } catch {
      continue; // a line cut by a crash or by a bounded read
    }
    if (!isObj(v) || !Number.isFinite(v.at) || !isInt(v.vm) || !isInt(v.disk) || !isStr(v.from) || !isStr(v.to)) continue;
    if (v.checkpoint !== null && !isStr(v.checkpoint, 200)) continue;
    out.push({ at: v.at as number, vm: v.vm, disk: v.disk, from: v.from, to: v.to, checkpoint: v.checkpoint as string | null });
  }
  return out;
}

export interface TakeoverSummary {
  /** take-overs in the ledger files (the current and the rotated one) */
  logged: number;
  /** take-overs within the window */
  recent: number;
  last?: TakeoverEvent;
}

export function summarizeTakeovers(events: readonly TakeoverEvent[], now: number, windowS = 86_400): TakeoverSummary {
  let last: TakeoverEvent | undefined;
  let recent = 0;
  for (const e of events) {
    if (now - e.at <= windowS && e.at <= now + 300) recent++;
    if (!last || e.at >= last.at) last = e;
  }
  return { logged: events.length, recent, ...(last ? { last } : {}) };
}

export function parseWriterRecord(text: string): WriterRecord | null {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return null;
  }
  if (!isObj(v) || !isStr(v.identity) || !isStr(v.auth, 32) || !Number.isFinite(v.lastPublishAt) || !isInt(v.lastVm) || !isInt(v.lastDisk) || !isStr(v.lastMode, 32)) {
    return null;
  }
  return { identity: v.identity, auth: v.auth, lastPublishAt: v.lastPublishAt as number, lastVm: v.lastVm, lastDisk: v.lastDisk, lastMode: v.lastMode };
}
