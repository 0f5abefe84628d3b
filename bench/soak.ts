/**
 * Fault soak: SIGKILL the agent at random points of real snapshot cycles (capture, thinning, transfer,
 * publish, or a random delay) and check after each kill that nothing was lost or harmed:
 *  - the replica passes the recover drill with the previous or the new snapshot (references are made by
 *    this script from the live chain, never by the agent);
 *  - the VM's chain is unchanged (disk sections of dumpxml, domblklist, bytes of base);
 *  - no filesystem left frozen, the backup job does not outlive the kill by more than it takes to finish;
 *  - the next cycle succeeds, leaves exactly one onestor- checkpoint, an empty staging dir, and a drill
 *    equal to its own point in time.
 * Prints the reliability table (fault, injected, recovered, data lost, command to reproduce).
 *
 * Usage (after `npm run build`): node dist/bench/soak.js [kills=50] [seed]
 *
 * The helpers are exported for test/integration/faults.test.ts, which runs a handful of the same kills in CI.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { readdir, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { agentMain, agentProcessEnv, startAgentEnv, type AgentEnv } from '../dev/agent-env.js';
import type { OneVm } from '../dev/one-layout.js';
import { guestWrite, guestViewSha256, sha256File } from '../dev/guest.js';
import { recoverDrill } from '../dev/recover.js';
import { run } from '../lib/shared/exec.js';

export type KillPhase = 'capture' | 'thin' | 'transfer' | 'publish' | 'random';
export const KILL_PHASES: readonly KillPhase[] = ['capture', 'thin', 'transfer', 'publish', 'random'];

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A running agent CLI process whose stderr (pino JSON) and stdout are collected. */
export interface AgentProc {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** Messages ('msg') of the JSON log lines seen so far. */
  messages(): string[];
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Replaces (or appends) `--name value` in a flag list: flags given twice would otherwise depend on parser rules. */
export function withFlag(flags: string[], name: string, value: string): string[] {
  const out = [...flags];
  const i = out.indexOf(name);
  if (i >= 0) out[i + 1] = value;
  else out.push(name, value);
  return out;
}

export function spawnAgent(args: string[], flags: string[]): AgentProc {
  const child = spawn(process.execPath, [agentMain(), ...args, ...flags], { stdio: ['ignore', 'pipe', 'pipe'], env: agentProcessEnv(flags) });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('close', (code, signal) => resolve({ code, signal })));
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    messages: () =>
      err
        .split('\n')
        .map((l) => {
          try {
            return String((JSON.parse(l) as { msg?: unknown }).msg ?? '');
          } catch {
            return '';
          }
        })
        .filter(Boolean),
    exited,
  };
}

function filesIn(dir: string): Array<{ name: string; size: number }> {
  try {
    return readdirSync(dir).map((name) => {
      try {
        return { name, size: statSync(path.join(dir, name)).size };
      } catch {
        return { name, size: -1 };
      }
    });
  } catch {
    return [];
  }
}

/** Where each phase of a cycle shows itself on disk (observed from outside, never from agent internals). */
export function phaseProbe(env: AgentEnv, vm: OneVm, diskId = 0): Record<Exclude<KillPhase, 'random'>, () => boolean> {
  const staging = path.join(vm.dsDir, '.onestor', String(vm.vmId));
  const tmp = path.join(env.snapsDir, '.onestor', 'tmp', `${vm.vmId}-${diskId}`);
  const work = path.join(env.snapsDir, '.onestor', 'work', String(vm.vmId), `disk.${diskId}`);
  let sawUpload = false;
  return {
    // push mode: the capture target exists from just before backup-begin until the job has written it;
    // pull mode (fulls): the scratch files exist from backup-begin until the job ends
    capture: () =>
      existsSync(path.join(staging, `disk.${diskId}.full.qcow2`)) || existsSync(path.join(staging, `disk.${diskId}.inc.qcow2`)) || filesIn(staging).some((f) => f.name.endsWith('.scratch')),
    // push mode: the thin overlay is made only after QEMU released the full target; pull mode has no
    // thinning: its counterpart is the export open (NBD socket) before any byte reached the replica
    thin: () => existsSync(path.join(staging, `disk.${diskId}.base.1`)) || (existsSync(path.join(staging, 'nbd.sock')) && !filesIn(tmp).some((f) => f.size > 0)),
    transfer: () => filesIn(tmp).some((f) => f.size > 0),
    // uploads leave the receiver's tmp dir when publish moves them into place / into the merge work dir
    publish: () => {
      const up = filesIn(tmp).some((f) => f.size > 0);
      if (up) sawUpload = true;
      return (sawUpload && !up) || existsSync(path.join(work, 'journal.json'));
    },
  };
}

export interface KillResult {
  phase: KillPhase;
  /** true when the process was still alive when SIGKILL was sent */
  killed: boolean;
  /** the phase's sign was observed before the kill */
  phaseSeen: boolean;
  afterMs: number;
  exit: { code: number | null; signal: NodeJS.Signals | null };
  messages: string[];
}

/** Runs `snapshot --vm` and SIGKILLs it once `phase` is seen (+ delayMs), or after delayMs for 'random'. */
export async function snapshotKilledAt(env: AgentEnv, vm: OneVm, phase: KillPhase, opts: { delayMs?: number; flags?: string[]; timeoutMs?: number } = {}): Promise<KillResult> {
  const t0 = Date.now();
  const p = spawnAgent(['snapshot', '--vm', String(vm.vmId), '--log-level', 'debug'], opts.flags ?? env.flags);
  let done = false;
  void p.exited.then(() => (done = true));
  const probe = phase === 'random' ? null : phaseProbe(env, vm)[phase];
  let seen = phase === 'random';
  const deadline = t0 + (opts.timeoutMs ?? 120_000);
  while (!done && !seen && Date.now() < deadline) {
    if (probe!()) seen = true;
    else await sleep(2);
  }
  if (opts.delayMs) await sleep(opts.delayMs);
  const killed = !done;
  if (killed) p.child.kill('SIGKILL');
  const exit = await p.exited;
  return { phase, killed, phaseSeen: seen, afterMs: Date.now() - t0, exit, messages: p.messages() };
}

/** Facts of the VM's live chain that no cycle may change. */
export async function chainFacts(env: AgentEnv, vm: OneVm): Promise<{ disks: string[]; blk: string; baseSums: string[] }> {
  const xml = await env.lv.virshOk(['dumpxml', vm.domainName]);
  const disks = xml.match(/<disk[\s\S]*?<\/disk>/g) ?? [];
  const blk = await env.lv.virshOk(['domblklist', vm.domainName, '--details']);
  const baseSums = await Promise.all(vm.disks.map((d) => sha256File(d.basePath)));
  return { disks, blk, baseSums };
}

/** sha256 of the guest view of the live disk (qemu-img -U of the running chain), taken by the test. */
export function liveReference(env: AgentEnv, vm: OneVm, diskIndex = 0): Promise<string> {
  return guestViewSha256(vm.disks[diskIndex]!.base1Path, env.root);
}

/** sha256 of the recovered guest view, or null when the replica holds no complete snapshot. */
export async function drillSum(env: AgentEnv, vmId: number, diskId = 0): Promise<{ sum: string | null; checkOk: boolean; backing?: string; why?: string }> {
  let d;
  try {
    d = await recoverDrill(env.snapsDir, vmId, diskId, env.root);
  } catch (e) {
    return { sum: null, checkOk: false, why: (e as Error).message };
  }
  try {
    return { sum: await sha256File(d.rawPath), checkOk: d.check.ok, backing: d.backingName, why: d.check.ok ? undefined : d.check.raw };
  } finally {
    await rm(d.dir, { recursive: true, force: true });
  }
}

export async function ourCheckpoints(env: AgentEnv, vm: OneVm): Promise<string[]> {
  const out = await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name']);
  return out.split('\n').map((s) => s.trim()).filter((s) => s.startsWith('onestor-'));
}

/** Waits until libvirt reports no job on the domain; false when one is still there after timeoutMs. */
export async function waitNoJob(env: AgentEnv, vm: OneVm, timeoutMs = 30_000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await env.lv.virsh(['domjobinfo', vm.domainName]);
    if (/Job type:\s+None/.test(r.stdout)) return true;
    if (Date.now() > deadline) return false;
    await sleep(100);
  }
}

/** True when a thaw reports filesystems that were still frozen. */
export async function frozenLeft(env: AgentEnv, vm: OneVm): Promise<boolean> {
  const r = await env.lv.virsh(['domfsthaw', vm.domainName]);
  return /Thawed [1-9]/.test(r.stdout);
}

export interface FaultCheck {
  /** problems found; empty = recovered */
  problems: string[];
  /** the replica lost data: the drill matched neither the previous nor the new point in time */
  dataLost: boolean;
  /** what the drill right after the fault held */
  heldAfterFault: 'previous' | 'new' | 'none' | 'other';
  nextMode?: string;
}

/**
 * The invariants after a fault, then one clean cycle. `prev` is the drill sum of the last snapshot known
 * complete before the fault (null: none yet), `candidate` the live reference taken just before the faulted
 * cycle (no guest writes in between).
 */
export async function checkAfterFault(env: AgentEnv, vm: OneVm, baseline: Awaited<ReturnType<typeof chainFacts>>, prev: string | null, candidate: string, opts: { flags?: string[]; nextWrite?: { offsetMiB: number; pattern: number } } = {}): Promise<FaultCheck & { newPrev: string | null }> {
  const problems: string[] = [];
  let dataLost = false;
  // A pull-mode job (a seed) never ends by itself: the export stays until someone aborts it, and a dead
  // agent cannot. Expected when its scratch files are in our staging dir: the next cycle must abort it
  // (checked below: no job, no staging left after it), so there is nothing to wait for. A push job ends
  // by itself; any other job still running after 30 s is a problem.
  const ourPullJob = async (): Promise<boolean> => {
    const dump = await env.lv.virsh(['backup-dumpxml', vm.domainName]);
    const staging = path.join(vm.dsDir, '.onestor', String(vm.vmId));
    return /<domainbackup mode='pull'/.test(dump.stdout) && [...dump.stdout.matchAll(/<scratch file='([^']*)'/g)].every((m) => m[1]!.startsWith(staging + '/'));
  };
  if (!(await ourPullJob()) && !(await waitNoJob(env, vm)) && !(await ourPullJob())) problems.push('backup job still running 30 s after the fault');
  // A receiver outlives a killed agent and finishes its publish: recovery (minutes later in real life)
  // starts after that. tar reports "file changed as we read it" when a rename lands mid-read (the old
  // base.1 loses a link), so the drill waits for the disk's receiver lock like a careful admin would.
  const lockFile = path.join(env.snapsDir, '.onestor', 'locks', `${vm.vmId}-0.lock`);
  if (existsSync(lockFile)) await run('flock', ['-w', '60', lockFile, 'true']);
  const drill = await drillSum(env, vm.vmId);
  let held: FaultCheck['heldAfterFault'];
  if (drill.sum === null) held = 'none';
  else if (drill.sum === candidate) held = 'new';
  else if (drill.sum === prev) held = 'previous';
  else held = 'other';
  if (held === 'other') {
    dataLost = true;
    problems.push('replica holds neither the previous nor the new snapshot');
  }
  if (held === 'none' && prev !== null) {
    dataLost = true;
    problems.push(`replica lost its previous snapshot: ${drill.why ?? ''}`);
  }
  if (drill.sum !== null && !drill.checkOk) problems.push(`qemu-img check failed: ${drill.why ?? ''}`);
  const after = await chainFacts(env, vm);
  if (JSON.stringify(after) !== JSON.stringify(baseline)) problems.push('VM chain changed (dumpxml disks / domblklist / base bytes)');
  if (await frozenLeft(env, vm)) problems.push('filesystem left frozen');

  // The next cycle must succeed by itself and leave a clean picture.
  const w = opts.nextWrite ?? { offsetMiB: 1 + Math.floor(Math.random() * 40), pattern: 1 + Math.floor(Math.random() * 250) };
  await guestWrite(env.lv, vm.domainName, { target: vm.disks[0]!.target, offsetMiB: w.offsetMiB, lengthMiB: 1, pattern: w.pattern });
  const nextRef = await liveReference(env, vm);
  const next = spawnAgent(['snapshot', '--vm', String(vm.vmId), '--json'], opts.flags ?? env.flags);
  const ex = await next.exited;
  let nextMode: string | undefined;
  if (ex.code !== 0) problems.push(`next cycle failed (exit ${ex.code}): ${next.stdout().slice(0, 400)} ${next.stderr().slice(-600)}`);
  else {
    try {
      nextMode = (JSON.parse(next.stdout()) as Array<{ mode?: string }>)[0]?.mode;
    } catch {
      problems.push('next cycle printed no JSON');
    }
  }
  const d2 = await drillSum(env, vm.vmId);
  let newPrev: string | null = d2.sum;
  if (ex.code === 0 && d2.sum !== nextRef) {
    dataLost = true;
    problems.push('drill after the next cycle differs from its point in time');
  }
  if (ex.code !== 0) newPrev = drill.sum;
  const cks = await ourCheckpoints(env, vm);
  if (cks.length !== 1) problems.push(`expected one onestor- checkpoint after the next cycle, found ${cks.length}: ${cks.join(' ')}`);
  if (!(await waitNoJob(env, vm, 5_000))) problems.push('job left after the next cycle');
  const staging = path.join(vm.dsDir, '.onestor', String(vm.vmId));
  if (existsSync(staging) && (await readdir(staging)).length > 0) problems.push('staging not cleaned after the next cycle');
  const snapList = (await readdir(path.join(env.snapsDir, String(vm.vmId), 'disk.0.snap')).catch(() => [] as string[])).sort();
  if (JSON.stringify(snapList) !== JSON.stringify(['base', 'base.1', 'disk.0.snap'])) problems.push(`disk.0.snap holds ${snapList.join(',')}`);
  return { problems, dataLost, heldAfterFault: held, nextMode, newPrev };
}

/** Config file slowing transfers so that each phase lasts long enough to be hit. */
export async function throttleConfig(dir: string, mbps: number): Promise<string> {
  const f = path.join(dir, `agent-config-${mbps}.json`);
  await writeFile(f, JSON.stringify({ limits: { bandwidthMBps: mbps } }));
  return f;
}

// ---------------------------------------------------------------------------------------------------------

interface Row {
  fault: string;
  injected: number;
  recovered: number;
  dataLost: number;
  phaseHit: number;
  reproduce: string;
}

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 4294967296;
  };
}

async function soak(kills: number, seed: number): Promise<void> {
  const random = rng(seed);
  const env = await startAgentEnv({ name: 'soak' });
  const rows = new Map<string, Row>();
  const failures: string[] = [];
  try {
    const vm = await env.createVm({
      vmId: 77,
      guestAgentChannel: true,
      disks: [{ diskId: 0, sizeMiB: 96, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 24, pattern: 0x31 }] }],
    });
    await guestWrite(env.lv, vm.domainName, { offsetMiB: 24, lengthMiB: 32, pattern: 0x32 });
    const flags = [...env.flags, '--config', await throttleConfig(env.root, 24)];
    const baseline = await chainFacts(env, vm);
    let prev: string | null = null;
    const t0 = Date.now();
    for (let i = 0; i < kills; i++) {
      const phase = KILL_PHASES[Math.floor(random() * KILL_PHASES.length)]!;
      // Thinning exists only in full cycles; every 4th kill forces a full too, so base/base.1 publish is exercised.
      const full = phase === 'thin' || i % 4 === 0;
      const delayMs = phase === 'random' ? Math.floor(random() * 2500) : Math.floor(random() * 150);
      await guestWrite(env.lv, vm.domainName, { offsetMiB: 1 + Math.floor(random() * 90), lengthMiB: 1 + Math.floor(random() * 4), pattern: 1 + Math.floor(random() * 250) });
      const candidate = await liveReference(env, vm);
      const k = await snapshotKilledAt(env, vm, phase, { delayMs, flags: full ? [...flags, '--full'] : flags });
      const check = await checkAfterFault(env, vm, baseline, prev, candidate, { flags });
      const name = `SIGKILL agent at ${phase}${full ? ' (full)' : ' (incremental)'}`;
      const row = rows.get(name) ?? { fault: name, injected: 0, recovered: 0, dataLost: 0, phaseHit: 0, reproduce: `node dist/bench/soak.js ${kills} ${seed}` };
      row.injected++;
      if (k.phaseSeen && k.killed) row.phaseHit++;
      if (check.problems.length === 0) row.recovered++;
      if (check.dataLost) row.dataLost++;
      rows.set(name, row);
      if (check.problems.length) failures.push(`#${i} ${name} +${delayMs}ms: ${check.problems.join('; ')}`);
      prev = check.newPrev;
      process.stderr.write(`#${i} ${name} delay=${delayMs}ms killed=${k.killed} seen=${k.phaseSeen} held=${check.heldAfterFault} next=${check.nextMode ?? '-'} ${check.problems.length ? 'PROBLEMS: ' + check.problems.join('; ') : 'ok'} (${Math.round((Date.now() - t0) / 1000)} s)\n`);
    }
    await vm.destroy();
  } finally {
    await env.stop();
  }
  const list = [...rows.values()].sort((a, b) => a.fault.localeCompare(b.fault));
  const tot = list.reduce((a, r) => ({ i: a.i + r.injected, r: a.r + r.recovered, l: a.l + r.dataLost, h: a.h + r.phaseHit }), { i: 0, r: 0, l: 0, h: 0 });
  process.stdout.write(`\n| fault | injected | killed in phase | recovered | data lost | reproduce |\n|---|---|---|---|---|---|\n`);
  for (const r of list) process.stdout.write(`| ${r.fault} | ${r.injected} | ${r.phaseHit} | ${r.recovered} | ${r.dataLost} | \`${r.reproduce}\` |\n`);
  process.stdout.write(`| **total** | ${tot.i} | ${tot.h} | ${tot.r} | ${tot.l} | |\n`);
  if (failures.length) process.stdout.write(`\nProblems:\n${failures.map((f) => `- ${f}`).join('\n')}\n`);
  process.exitCode = tot.l > 0 || tot.r < tot.i ? 1 : 0;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const kills = Number(process.argv[2] ?? 50);
  const seed = Number(process.argv[3] ?? Date.now() % 100000);
  process.stderr.write(`soak: ${kills} kills, seed ${seed}\n`);
  soak(kills, seed).catch((e) => {
    process.stderr.write(`soak failed: ${(e as Error).stack ?? e}\n`);
    process.exitCode = 2;
  });
}
