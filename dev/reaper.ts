/**
 * Removes what a SIGKILLed test run left behind. Its processes are already gone (the PID namespace dies
 * with the runner, see libvirtd.ts) but a temp root cannot delete itself. Each root records its owner;
 * a root is stale only when its owner ran in our PID namespace and is provably dead (pid gone, or reused
 * by a process that started at another time). Roots of owners we cannot judge are left alone.
 */
import { readFileSync, readdirSync, readlinkSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { removeTree, TEMP_DIR_TAG } from './tmp.js';

export const LIBVIRTD_ROOT_TAG = 'onestor-lv-';
export const OWNER_FILE = 'owner.json';

export interface RootOwner {
  ownerPid: number;
  ownerStartTicks: number | null;
  ownerPidNamespace: string;
  /** Host pid of the private namespace's init. */
  initPid: number;
  /** readlink /proc/INIT/ns/pid */
  pidNamespace: string;
}

/** A root that never got its owner file (start crashed before it) is stale after this long. */
const ORPHAN_ROOT_AGE_MS = 60 * 60 * 1000;

export async function reapStaleLibvirtdRoots(baseDir: string = tmpdir()): Promise<string[]> {
  const ourNamespace = readlinkSync('/proc/self/ns/pid');
  const reaped: string[] = [];
  let entries: string[];
  try {
    entries = readdirSync(baseDir);
  } catch {
    return reaped;
  }
  for (const entry of entries) {
    if (!entry.startsWith(LIBVIRTD_ROOT_TAG)) continue;
    const root = join(baseDir, entry);
    let owner: RootOwner | undefined;
    try {
      owner = JSON.parse(readFileSync(join(root, OWNER_FILE), 'utf8')) as RootOwner;
    } catch {
      owner = undefined;
    }
    if (owner === undefined) {
      let ageMs = 0;
      try {
        ageMs = Date.now() - statSync(root).mtimeMs;
      } catch {
        continue;
      }
      if (ageMs < ORPHAN_ROOT_AGE_MS) continue;
    } else {
      if (owner.ownerPidNamespace !== ourNamespace) continue;
      if (isAlive(owner.ownerPid, owner.ownerStartTicks)) continue;
      // Normally already dead through pdeathsig; kill the namespace if that ever failed.
      if (sameNamespace(owner.initPid, owner.pidNamespace)) {
        try {
          process.kill(owner.initPid, 'SIGKILL');
        } catch {
          /* gone meanwhile */
        }
        for (let i = 0; i < 100 && sameNamespace(owner.initPid, owner.pidNamespace); i++) await sleep(50);
      }
    }
    await removeTree(root);
    reaped.push(root);
  }
  return reaped;
}

/**
 * makeTempDir dirs carry no owner file (tests list them), only the owner pid in their name:
 * `onestor-t-<prefix>-<pid36>-<rand>`. A dead pid alone is not proof (a run in another PID namespace may
 * share this /tmp), so they must also be untouched for a while.
 */
const TEMP_DIR_MIN_AGE_MS = 30 * 60 * 1000;

export async function reapStaleTempDirs(baseDir: string = tmpdir(), minAgeMs = TEMP_DIR_MIN_AGE_MS): Promise<string[]> {
  const reaped: string[] = [];
  let entries: string[];
  try {
    entries = readdirSync(baseDir);
  } catch {
    return reaped;
  }
  for (const entry of entries) {
    if (!entry.startsWith(TEMP_DIR_TAG)) continue;
    const m = /-([0-9a-z]+)-[0-9a-z]{7}$/.exec(entry);
    if (!m) continue;
    const pid = parseInt(m[1]!, 36);
    if (!Number.isSafeInteger(pid) || pid <= 0 || isAlive(pid, null)) continue;
    const dir = join(baseDir, entry);
    try {
      if (Date.now() - statSync(dir).mtimeMs < minAgeMs) continue;
    } catch {
      continue;
    }
    await removeTree(dir);
    reaped.push(dir);
  }
  return reaped;
}

function isAlive(pid: number, startTicks: number | null): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const after = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (after[0] === 'Z') return false;
    return startTicks === null || Number(after[19]) === startTicks;
  } catch {
    return false;
  }
}

function sameNamespace(pid: number, ns: string): boolean {
  try {
    return readlinkSync(`/proc/${pid}/ns/pid`) === ns;
  } catch {
    return false;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
