/**
 * Probe run time through the REAL entry, as OpenNebula runs it: a launcher script like the one
 * install.sh writes (`exec node .../dist/agent/main.js "$@"`), `onestor-agent probe KIND` with monitord's
 * XML on stdin, a fresh process per run. Goal: <= 50 ms beyond Node start-up (`node -e 0`).
 * Cases: an empty state dir (agent never started: the probe looks for protected disks itself) for each of
 * the three kinds (replica-ds with its default walk cache, warm after the first run as every 60 s), 500
 * protected disks all ok, and 500 disks with the replica unreachable (every disk failing with E_SSH).
 * Wall and CPU (user + system, children included) are medians, each beside `node -e 0` of the same run.
 *
 *   npm run build && node dist/bench/probe.js [runs=15] [entry=dist/agent/main.js ...]
 *
 * More entries time other builds (e.g. the previous release) side by side, interleaved run by run.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const runs = Number(process.argv[2] ?? 15);
const here = path.dirname(fileURLToPath(import.meta.url));
// one or more entries: with several (e.g. the previous build's), every case runs for each entry in the same
// round, so a change of load on the shared machine hits them alike
const entries = (process.argv.length > 3 ? process.argv.slice(3) : [path.join(here, '..', 'agent', 'main.js')]).map((e) => path.resolve(e));
const GOAL_MS = 50;

const signed = (x: number, digits = 0): string => `${x >= 0 ? '+' : ''}${x.toFixed(digits)}`;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

/**
 * Wall ms of one run, and CPU ms (user + system of the process and its children, from bash's `time`, which
 * reads getrusage: millisecond resolution): on a shared machine the wall time swings with the load, the
 * CPU time less.
 */
function time(file: string, args: string[], input = ''): { wall: number; cpu: number } {
  const t0 = performance.now();
  const r = spawnSync('bash', ['-c', 'TIMEFORMAT="%3U %3S"; time "$@" >/dev/null 2>/dev/null || exit 1', 'bash', file, ...args], { input, stdio: ['pipe', 'pipe', 'pipe'] });
  const wall = performance.now() - t0;
  if (r.status !== 0) throw new Error(`${file} ${args.join(' ')}: exit ${r.status}: ${String(r.stderr)}`);
  const m = /([\d.]+) ([\d.]+)\s*$/.exec(String(r.stderr));
  if (!m) throw new Error(`no times from bash: ${String(r.stderr)}`);
  return { wall, cpu: (Number(m[1]) + Number(m[2])) * 1000 };
}

function stateWith(n: number, failing: boolean): string {
  const now = Math.floor(Date.now() / 1000);
  const disks: Record<string, unknown> = {};
  for (let i = 0; i < n; i++) {
    const vmId = 1000 + Math.floor(i / 2);
    const diskId = i % 2;
    disks[`${vmId}.${diskId}`] = {
      vmId,
      diskId,
      failCount: failing ? 4 : 0,
      freqSeconds: 600,
      nextDueAt: now + 300,
      lastSuccess: { capturedAt: now - 200, finishedAt: now - 190, durationMs: 9000, bytes: 16_000_000, mode: 'incremental', consistency: 'crash-consistent' },
      ...(failing ? { lastError: { code: 'E_SSH', message: 'connect ECONNREFUSED 10.0.0.9:22 (replica "replica-1" unreachable)', at: now - 10 } } : {}),
    };
  }
  return JSON.stringify({ version: 1, updatedAt: now, daemon: { pid: 1, startedAt: now - 1000, heartbeatAt: now - 5, version: 'bench' }, disks, baseDigests: {} });
}

const dir = mkdtempSync(path.join(tmpdir(), 'onestor-bench-probe-'));
try {
  // the launcher install.sh writes to /usr/local/bin/onestor-agent, one per entry
  const launchers = entries.map((mainJs, i) => {
    const launcher = path.join(dir, `onestor-agent-${i}`);
    writeFileSync(launcher, `#!/bin/sh\nexec node "${mainJs}" "$@"\n`);
    chmodSync(launcher, 0o755);
    return launcher;
  });
  const dsLoc = path.join(dir, 'datastores');
  mkdirSync(dsLoc);
  const xml = `<MONITORD_CONFIG><DATASTORE_LOCATION>${dsLoc}</DATASTORE_LOCATION></MONITORD_CONFIG>`;
  const cases: Array<[string, string[]]> = [];
  const empty = path.join(dir, 'empty-state');
  mkdirSync(empty);
  for (const kind of ['vm-snapshot', 'host-monitor', 'replica-ds']) cases.push([`empty state (never started), ${kind}`, ['probe', kind, '--state-dir', empty]]);
  for (const [name, failing] of [['500 disks, all ok', false], ['500 disks, replica unreachable (all E_SSH)', true]] as const) {
    const sd = path.join(dir, failing ? 'fail' : 'ok');
    mkdirSync(sd);
    writeFileSync(path.join(sd, 'state.json'), stateWith(500, failing));
    cases.push([`${name}, vm-snapshot`, ['probe', 'vm-snapshot', '--state-dir', sd]]);
    cases.push([`${name}, host-monitor`, ['probe', 'host-monitor', '--state-dir', sd]]);
  }
  const load0 = loadavg().map((x) => x.toFixed(2)).join(' ');
  // warm the page cache once
  time(process.execPath, ['-e', '0']);
  for (const l of launchers) for (const [, a] of cases) time(l, a, xml);
  const base: Array<{ wall: number; cpu: number }> = [];
  const results = launchers.map(() => new Map<string, Array<{ wall: number; cpu: number }>>(cases.map(([n]) => [n, []])));
  for (let i = 0; i < runs; i++) {
    base.push(time(process.execPath, ['-e', '0']));
    for (const [n, a] of cases) launchers.forEach((l, e) => results[e]!.get(n)!.push(time(l, a, xml)));
  }
  const bw = median(base.map((x) => x.wall));
  const bc = median(base.map((x) => x.cpu));
  console.log(`medians of ${runs} runs through a launcher script (as installed); load average before/after: ${load0} / ${loadavg().map((x) => x.toFixed(2)).join(' ')}`);
  console.log(`node start-up (node -e 0): wall ${bw.toFixed(1)} ms, cpu ${bc.toFixed(0)} ms`);
  entries.forEach((mainJs, e) => {
    console.log(`entry: ${mainJs}`);
    for (const [n, xs] of results[e]!) {
      const w = median(xs.map((x) => x.wall));
      const c = median(xs.map((x) => x.cpu));
      const extra = w - bw;
      console.log(`  ${n}: wall ${w.toFixed(1)} ms, beyond start-up ${signed(extra, 1)} ms (goal <= ${GOAL_MS} ms) ${extra <= GOAL_MS ? 'OK' : 'OVER'}; cpu ${c.toFixed(0)} ms (${signed(c - bc)} ms)`);
    }
  });
} finally {
  rmSync(dir, { recursive: true, force: true });
}
