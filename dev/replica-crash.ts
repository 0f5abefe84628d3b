/**
 * Crash scenarios for the replica: a seeded SNAPS, then one publish (full with a new base, full without one,
 * incremental) driven against a receiver PROCESS that gets killed — at one of its own named steps
 * (crash-receiver.js) or from outside by strace at the Nth call of one syscall. After each run:
 *   1. the recover drill (dev/recover.ts): previous or new guest view, never neither;
 *   2. the next session (the real receiver, in-process) opens the disk and finishes or rolls back by itself;
 *      if the publish did not survive, the client's retry completes it; the drill then shows the new view;
 *   3. nothing of the dead session is left in the disk's tmp and work dirs, nor in the trash.
 * Used by test/integration/replica-crash.test.ts and bench/crash-sweep.ts.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import * as fsp from 'node:fs/promises';
import path from 'node:path';
import { PassThrough, type Readable, type Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { run } from '../lib/shared/exec.js';
import { runReceiver } from '../lib/replica/receiver.js';
import { ReceiverConnection } from '../lib/transfer/replica-client.js';
import { recoverDrill } from './recover.js';

export type ScenarioKind = 'full-new-base' | 'full-same-base' | 'incremental';
export const SCENARIOS: readonly ScenarioKind[] = ['full-new-base', 'full-same-base', 'incremental'];

const here = path.dirname(fileURLToPath(import.meta.url));
/** dist/ root whichever way this module runs (vitest from dev/, node from dist/dev/). */
const distRoot = here.includes(`${path.sep}dist${path.sep}`) ? path.resolve(here, '..') : path.resolve(here, '..', 'dist');
export const RECEIVER_MAIN = path.join(distRoot, 'agent', 'receiver-main.js');
export const CRASH_RECEIVER = path.join(distRoot, 'dev', 'crash-receiver.js');

export const VM = 31;
export const DISK = 0;

async function q(args: string[]): Promise<string> {
  const r = await run(args[0]!, args.slice(1), { timeoutMs: 600_000 });
  if (r.code !== 0) throw new Error(`${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

export async function sha256Of(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(file)) h.update(c as Buffer);
  return h.digest('hex');
}

/** Digest of an image's guest view (raw). */
export async function viewOf(image: string, scratch: string): Promise<string> {
  const out = path.join(scratch, `view-${process.pid}-${Math.random().toString(36).slice(2)}.raw`);
  await q(['qemu-img', 'convert', '-O', 'raw', image, out]);
  try {
    return await sha256Of(out);
  } finally {
    await fsp.rm(out, { force: true });
  }
}

/** A disk in OpenNebula's layout: DIR/disk.N.snap/{base, base.1, disk.N.snap -> .}; each op is a qemu-io command. */
async function sourceDisk(dir: string, sizeMiB: number, baseOps: string[], base1Ops: string[]): Promise<{ base: string; base1: string }> {
  const snap = path.join(dir, `disk.${DISK}.snap`);
  await fsp.mkdir(snap, { recursive: true });
  await fsp.symlink('.', path.join(snap, `disk.${DISK}.snap`));
  const base = path.join(snap, 'base');
  const base1 = path.join(snap, 'base.1');
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', base, `${sizeMiB}M`]);
  for (const op of baseOps) await q(['qemu-io', '-f', 'qcow2', '-c', op, base]);
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', `disk.${DISK}.snap/base`, '-F', 'qcow2', base1]);
  for (const op of base1Ops) await q(['qemu-io', '-f', 'qcow2', '-c', op, base1]);
  return { base, base1 };
}

export interface Scenario {
  kind: ScenarioKind;
  dir: string;
  prev: { base: string; base1: string };
  next: { base?: string; base1?: string; inc?: string };
  prevView: string;
  newView: string;
}

/** Source images and expected views for one scenario kind (built once, reused by every run). */
export async function makeScenario(root: string, kind: ScenarioKind, sizeMiB = 8): Promise<Scenario> {
  const dir = path.join(root, `scenario-${kind}`);
  await fsp.mkdir(dir, { recursive: true });
  const prev = await sourceDisk(path.join(dir, 'prev'), sizeMiB, ['write -P 0x11 0 4M'], ['write -P 0x22 1M 1M']);
  const prevView = await viewOf(prev.base1, dir);
  let next: Scenario['next'];
  let newView: string;
  if (kind === 'full-new-base') {
    // A different image, 4 MiB larger: half of the old base's data is still there, the rest differs.
    const n = await sourceDisk(
      path.join(dir, 'next'),
      sizeMiB + 4,
      ['write -P 0x11 0 2M', 'write -P 0x44 2M 1M', `write -P 0x45 ${sizeMiB + 1}M 1M`],
      ['write -P 0x33 1M 1M', 'write -P 0x34 6M 64k'],
    );
    next = n;
    newView = await viewOf(n.base1, dir);
  } else if (kind === 'full-same-base') {
    const n = await sourceDisk(path.join(dir, 'next'), sizeMiB, ['write -P 0x11 0 4M'], ['write -P 0x22 1M 1M', 'write -P 0x35 3M 1M']);
    await fsp.copyFile(prev.base, n.base); // byte-identical base: the publish sends base.1 only
    next = { base1: n.base1 };
    newView = await viewOf(n.base1, dir);
  } else {
    const inc = path.join(dir, 'inc.qcow2');
    const after = path.join(dir, 'after');
    await fsp.cp(path.join(dir, 'prev'), after, { recursive: true, verbatimSymlinks: true });
    await q(['qemu-img', 'create', '-q', '-f', 'qcow2', inc, `${sizeMiB}M`]);
    for (const op of ['write -P 0x71 3M 192k', 'write -z 1M 64k']) {
      await q(['qemu-io', '-f', 'qcow2', '-c', op, inc]);
      await q(['qemu-io', '-f', 'qcow2', '-c', op, path.join(after, `disk.${DISK}.snap`, 'base.1')]);
    }
    await q(['qemu-img', 'rebase', '-u', '-f', 'qcow2', '-b', '/nonexistent/capture-target', '-F', 'qcow2', inc]);
    next = { inc };
    newView = await viewOf(path.join(after, `disk.${DISK}.snap`, 'base.1'), dir);
  }
  if (newView === prevView) throw new Error('scenario views must differ');
  return { kind, dir, prev, next, prevView, newView };
}

/** In-process session against the real receiver (the "next session" after a crash, and the seed). */
async function inProcess<T>(snaps: string, fn: (conn: ReceiverConnection) => Promise<T>): Promise<T> {
  const toReceiver = new PassThrough();
  const fromReceiver = new PassThrough();
  const done = runReceiver(toReceiver, fromReceiver, { snapsDir: snaps, identity: 'hv-crash', lockTimeoutSec: 10, maxSessions: 8, busyWaitSec: 5, maxUsedPercent: 100, spaceCheck: false }).finally(() =>
    fromReceiver.end(),
  );
  const conn = new ReceiverConnection(fromReceiver, toReceiver);
  try {
    await conn.hello('hv-crash', 'test');
    const r = await fn(conn);
    await conn.bye();
    return r;
  } finally {
    conn.destroy();
    await done;
  }
}

export async function seed(sc: Scenario, snaps: string): Promise<void> {
  await inProcess(snaps, async (conn) => {
    const d = await conn.openDisk(VM, DISK);
    await d.upload('base', sc.prev.base, { key: 'ck1.base' });
    await d.upload('base1', sc.prev.base1, { key: 'ck1.base1' });
    await d.publishFull({ checkpoint: 'ck1', capturedAt: 1700000000, consistency: 'crash-consistent', sourceHost: 'hv-crash', base: 'ck1.base', base1: 'ck1.base1' });
    await d.close();
  });
}

/** The publish under test (upload + publish of ck2), as the agent does it. */
async function drive(sc: Scenario, conn: ReceiverConnection): Promise<void> {
  await conn.hello('hv-crash', 'test');
  const d = await conn.openDisk(VM, DISK);
  const meta = { checkpoint: 'ck2', capturedAt: 1700000100, consistency: 'crash-consistent' as const, sourceHost: 'hv-crash' };
  if (sc.kind === 'incremental') {
    await d.upload('inc', sc.next.inc!, { key: 'ck2.inc' });
    await d.publishIncremental({ ...meta, parentCheckpoint: 'ck1', inc: 'ck2.inc' });
  } else {
    if (sc.next.base) await d.upload('base', sc.next.base, { key: 'ck2.base' });
    await d.upload('base1', sc.next.base1!, { key: 'ck2.base1' });
    await d.publishFull({ ...meta, base1: 'ck2.base1', ...(sc.next.base ? { base: 'ck2.base' } : {}) });
  }
  await d.close();
  await conn.bye();
}

export type Outcome = 'completed' | 'receiver-killed' | 'failed';

export interface RunOptions {
  /** Kill at the `when`-th call of `syscall` (strace counts per syscall and per thread/process). */
  strace?: { syscall: string; when: number };
  /** Named step to SIGKILL at (crash-receiver.js); with stepLog, the steps passed are recorded there. */
  crashAt?: string;
  stepLog?: string;
}

/** One publish against a receiver process that may be killed. */
export async function runPublish(sc: Scenario, snaps: string, opts: RunOptions): Promise<{ outcome: Outcome; detail: string }> {
  let cmd: string;
  let args: string[];
  const env: NodeJS.ProcessEnv = { ...process.env, UV_THREADPOOL_SIZE: '1' };
  if (opts.strace) {
    const { syscall, when } = opts.strace;
    cmd = 'strace';
    args = ['-f', '-qq', '-o', '/dev/null', '-e', `trace=${syscall}`, '-e', `inject=${syscall}:signal=KILL:when=${when}`];
    args.push(process.execPath, RECEIVER_MAIN, '--snaps-dir', snaps, '--host', 'hv-crash', '--lock-timeout', '10', '--idle-timeout', '60', '--max-used-percent', '100');
  } else {
    cmd = process.execPath;
    args = [CRASH_RECEIVER, snaps];
    if (opts.crashAt) env.ONESTOR_CRASH_AT = opts.crashAt;
    if (opts.stepLog) env.ONESTOR_STEP_LOG = opts.stepLog;
  }
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-4000)));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  child.stdin!.on('error', () => {});
  const conn = new ReceiverConnection(child.stdout as Readable, child.stdin as Writable);
  let error: unknown = null;
  try {
    await drive(sc, conn);
  } catch (e) {
    error = e;
  }
  conn.destroy();
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  const ex = await exited;
  clearTimeout(timer);
  if (ex.signal === 'SIGKILL' || ex.code === 137) return { outcome: 'receiver-killed', detail: String(error ?? '') };
  if (error) return { outcome: 'failed', detail: `${String(error)} | ${stderr.slice(-500)}` };
  return { outcome: 'completed', detail: '' };
}

export interface Verdict {
  /** the view recovery got right after the run */
  afterCrash: 'prev' | 'new';
  /** the checkpoint the next session's open reported (finished or rolled back by itself) */
  openedAt: string | null;
  /** the next session had to publish again */
  retried: boolean;
}

/** Recover drill (previous or new, never neither), then a next session that completes, then no leftovers. */
export async function verifyAfterRun(sc: Scenario, snaps: string, scratch: string): Promise<Verdict> {
  const drill = await recoverDrill(snaps, VM, DISK, scratch);
  const view = await sha256Of(drill.rawPath);
  await fsp.rm(drill.dir, { recursive: true, force: true });
  if (!drill.check.ok) throw new Error(`recovered image fails qemu-img check: ${drill.check.raw}`);
  if (drill.backingName !== `disk.${DISK}.snap/base`) throw new Error(`recovered base.1 names backing ${drill.backingName}`);
  if (view !== sc.prevView && view !== sc.newView) throw new Error('recovery got NEITHER the previous nor the new snapshot');
  const afterCrash = view === sc.prevView ? 'prev' : 'new';

  const openedAt = await inProcess(snaps, async (conn) => {
    const d = await conn.openDisk(VM, DISK);
    await d.close();
    return d.manifest?.checkpoint ?? null;
  });
  if (openedAt !== 'ck1' && openedAt !== 'ck2') throw new Error(`next session found no valid lineage (manifest ${openedAt})`);
  // What the next open saw must be what recovery reads.
  const drill2 = await recoverDrill(snaps, VM, DISK, scratch);
  const view2 = await sha256Of(drill2.rawPath);
  await fsp.rm(drill2.dir, { recursive: true, force: true });
  if (view2 !== (openedAt === 'ck2' ? sc.newView : sc.prevView)) throw new Error(`manifest says ${openedAt} but recovery reads the other snapshot`);
  let retried = false;
  if (openedAt === 'ck1') {
    retried = true;
    await inProcess(snaps, async (conn) => {
      const d = await conn.openDisk(VM, DISK);
      const meta = { checkpoint: 'ck2', capturedAt: 1700000100, consistency: 'crash-consistent' as const, sourceHost: 'hv-crash' };
      if (sc.kind === 'incremental') {
        await d.upload('inc', sc.next.inc!, { key: 'ck2.inc' });
        await d.publishIncremental({ ...meta, parentCheckpoint: 'ck1', inc: 'ck2.inc' });
      } else {
        if (sc.next.base) await d.upload('base', sc.next.base, { key: 'ck2.base' });
        await d.upload('base1', sc.next.base1!, { key: 'ck2.base1' });
        await d.publishFull({ ...meta, base1: 'ck2.base1', ...(sc.next.base ? { base: 'ck2.base' } : {}) });
      }
      await d.close();
    });
    const drill3 = await recoverDrill(snaps, VM, DISK, scratch);
    const view3 = await sha256Of(drill3.rawPath);
    await fsp.rm(drill3.dir, { recursive: true, force: true });
    if (view3 !== sc.newView) throw new Error('the retried publish did not reach the new snapshot');
  }
  await assertNoLeftovers(snaps);
  return { afterCrash, openedAt, retried };
}

/** After a completed session: disk.N.snap holds only the recovery files; tmp and trash hold nothing; work only the A/B state. */
export async function assertNoLeftovers(snaps: string): Promise<void> {
  const snapDir = path.join(snaps, String(VM), `disk.${DISK}.snap`);
  const inSnap = (await fsp.readdir(snapDir)).sort();
  if (inSnap.join(',') !== ['base', 'base.1', `disk.${DISK}.snap`].join(',')) throw new Error(`disk.N.snap holds ${inSnap.join(',')}`);
  const tmp = path.join(snaps, '.onestor', 'tmp', `${VM}-${DISK}`);
  const tmpLeft = await fsp.readdir(tmp).catch(() => [] as string[]);
  if (tmpLeft.length) throw new Error(`tmp holds leftovers: ${tmpLeft.join(',')}`);
  const work = path.join(snaps, '.onestor', 'work', String(VM), `disk.${DISK}`);
  const allowed = /^(copy\.a|copy\.b|state\.json|disk\.\d+\.snap|inc\.\d+)$/;
  const workLeft = (await fsp.readdir(work).catch(() => [] as string[])).filter((n) => !allowed.test(n));
  if (workLeft.length) throw new Error(`work dir holds leftovers: ${workLeft.join(',')}`);
  // old A/B copies a full moved aside (by the dead session or the completed one) are deleted by then
  const trashLeft = await fsp.readdir(path.join(snaps, '.onestor', 'trash')).catch(() => [] as string[]);
  if (trashLeft.length) throw new Error(`trash holds leftovers: ${trashLeft.join(',')}`);
}

/** A fresh seeded SNAPS for one run. */
export async function freshSnaps(sc: Scenario, root: string, tag: string): Promise<string> {
  const snaps = path.join(root, `snaps-${sc.kind}-${tag}`);
  await fsp.rm(snaps, { recursive: true, force: true });
  await fsp.mkdir(snaps, { recursive: true });
  await seed(sc, snaps);
  return snaps;
}

export interface SweepResult {
  syscall: string;
  runs: number;
  killed: number;
  failed: number;
  /** N at which the run completed (the sweep's end) */
  completedAt: number | null;
  afterCrash: { prev: number; new: number };
  retried: number;
}

/**
 * Kills the receiver at the 1st, 2nd, ... call of `syscall` (every `stride`-th N) until a run completes,
 * verifying after each. Throws at the first violation, naming N.
 */
export async function sweepSyscall(sc: Scenario, root: string, syscall: string, opts: { stride?: number; maxN?: number; onRun?: (n: number, o: Outcome, v: Verdict) => void } = {}): Promise<SweepResult> {
  const res: SweepResult = { syscall, runs: 0, killed: 0, failed: 0, completedAt: null, afterCrash: { prev: 0, new: 0 }, retried: 0 };
  const stride = opts.stride ?? 1;
  for (let n = 1; n <= (opts.maxN ?? 500); n += stride) {
    const snaps = await freshSnaps(sc, root, `${syscall}-${n}`);
    const r = await runPublish(sc, snaps, { strace: { syscall, when: n } });
    let v: Verdict;
    try {
      v = await verifyAfterRun(sc, snaps, root);
    } catch (e) {
      throw new Error(`${sc.kind}, ${syscall} #${n} (${r.outcome} ${r.detail.slice(0, 300)}): ${(e as Error).message}`);
    }
    res.runs++;
    if (r.outcome === 'receiver-killed') res.killed++;
    if (r.outcome === 'failed') res.failed++;
    res.afterCrash[v.afterCrash]++;
    if (v.retried) res.retried++;
    opts.onRun?.(n, r.outcome, v);
    await fsp.rm(snaps, { recursive: true, force: true });
    if (r.outcome === 'completed') {
      res.completedAt = n;
      break;
    }
  }
  return res;
}

