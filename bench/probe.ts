/**
 * Probe run time with 500 protected disks in state (goal: <= 50 ms beyond Node start-up) and with the
 * replica unreachable (every disk failing with E_SSH). Runs the built probe as monitord would: a fresh
 * process per run, XML on stdin; compares medians with `node -e 0`.
 * Usage: node dist/bench/probe.js [runs]   (after `npm run build`)
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const runs = Number(process.argv[2] ?? 15);
const here = path.dirname(fileURLToPath(import.meta.url));
const probeJs = path.resolve(here, '..', 'agent', 'probe.js');
const GOAL_MS = 50;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function time(args: string[], input = ''): number {
  const t0 = performance.now();
  const r = spawnSync(process.execPath, args, { input, stdio: ['pipe', 'pipe', 'pipe'] });
  const ms = performance.now() - t0;
  if (r.status !== 0) throw new Error(`exit ${r.status}: ${String(r.stderr)}`);
  return ms;
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
  const xml = '<MONITORD_CONFIG><DATASTORE_LOCATION>/nonexistent</DATASTORE_LOCATION></MONITORD_CONFIG>';
  const cases: Array<[string, string[]]> = [];
  for (const [name, failing] of [['500 disks, all ok', false], ['500 disks, replica unreachable (all E_SSH)', true]] as const) {
    const f = path.join(dir, `${failing ? 'fail' : 'ok'}.json`);
    writeFileSync(f, stateWith(500, failing));
    cases.push([name, [probeJs, 'vm-snapshot', '--state', f]]);
    cases.push([`${name} (host-monitor)`, [probeJs, 'host-monitor', '--state', f]]);
  }
  // warm the page cache once
  time(['-e', '0']);
  for (const [, a] of cases) time(a, xml);
  const base: number[] = [];
  const results = new Map<string, number[]>(cases.map(([n]) => [n, []]));
  for (let i = 0; i < runs; i++) {
    base.push(time(['-e', '0']));
    for (const [n, a] of cases) results.get(n)!.push(time(a, xml));
  }
  const b = median(base);
  console.log(`node start-up (node -e 0), median of ${runs}: ${b.toFixed(1)} ms`);
  for (const [n, xs] of results) {
    const m = median(xs);
    const extra = m - b;
    console.log(`${n}: median ${m.toFixed(1)} ms, beyond start-up ${extra.toFixed(1)} ms (goal <= ${GOAL_MS} ms) ${extra <= GOAL_MS ? 'OK' : 'OVER'}`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
