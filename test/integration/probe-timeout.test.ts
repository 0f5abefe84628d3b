/**
 * The probes as OpenNebula runs them: a real process, monitord's XML on stdin, output parsed with the
 * lexer-faithful parser. The hang cases are real: the state file (or sshrc) is a FIFO nobody writes, so
 * open() blocks in the kernel exactly like a read on a dead mount would.
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, rm, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseOneTemplate } from '../../lib/monitor/one-template.js';
import { renderDsXml, renderVmXml } from '../../dev/one-layout.js';
import { makeTempDir } from '../../dev/tmp.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
let work: string;
let mainJs: string;

function build(outDir: string): Promise<void> {
  return new Promise((resolve) => {
    // type errors elsewhere in the tree must not stop the emit of our files
    execFile(path.join(ROOT, 'node_modules', '.bin', 'tsc'), ['-p', path.join(ROOT, 'tsconfig.build.json'), '--outDir', outDir], { cwd: ROOT }, () => resolve());
  });
}

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

function runProbe(args: string[], stdin: string, env: Record<string, string> = {}): Promise<Run> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    // the real entry, as the probe wrappers run it: `onestor-agent probe KIND ...`
    const child = spawn(process.execPath, [mainJs, 'probe', ...args], { env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (b) => (stdout += b));
    child.stderr.on('data', (b) => (stderr += b));
    // 'close' = exit AND stdout at EOF: what monitord's Open3 waits for
    child.on('close', (code) => resolve({ code, stdout, stderr, ms: performance.now() - t0 }));
    child.stdin.end(stdin);
  });
}

const monitordXml = (dsLoc: string): string => `<MONITORD_CONFIG><DATASTORE_LOCATION>${dsLoc}</DATASTORE_LOCATION><HOST_ID>0</HOST_ID></MONITORD_CONFIG>`;

function vmDisks(stdout: string): Map<number, Array<Record<string, string>>> {
  const out = new Map<number, Array<Record<string, string>>>();
  for (const a of parseOneTemplate(stdout)) {
    const v = a.value as Record<string, string>;
    out.set(Number(v.ID), parseOneTemplate(Buffer.from(v.MONITOR!, 'base64').toString()).map((x) => x.value as Record<string, string>));
  }
  return out;
}

/** An ssh system datastore with VM 42, disk 0 protected (layout as the ssh driver leaves it). */
async function makeLayout(dsRoot: string): Promise<void> {
  const ds = path.join(dsRoot, '100');
  const vm = path.join(ds, '42');
  await mkdir(path.join(vm, 'disk.0.snap'), { recursive: true });
  await writeFile(path.join(ds, '.monitor'), 'ssh');
  await writeFile(path.join(vm, 'disk.0.snap', 'base'), 'x');
  await writeFile(path.join(vm, 'disk.0.snap', 'base.1'), 'x');
  await symlink('.', path.join(vm, 'disk.0.snap', 'disk.0.snap'));
  await symlink('disk.0.snap/base.1', path.join(vm, 'disk.0'));
  await writeFile(path.join(vm, 'vm.xml'), renderVmXml({ vmId: 42, dsId: 100, dsRoot, deployId: 'one-42', hostname: 'h', memoryMiB: 64, stime: 1, disks: [{ diskId: 0, target: 'vda', sizeMiB: 1, freq: 600 }] }));
  await writeFile(path.join(vm, 'ds.xml'), renderDsXml({ dsId: 100, dsRoot, replicaHost: 'replica.example' }));
}

beforeAll(async () => {
  work = await makeTempDir('probe-timeout');
  await build(path.join(work, 'build'));
  mainJs = path.join(work, 'build', 'agent', 'main.js');
  await writeFile(path.join(work, 'build', 'package.json'), JSON.stringify({ name: 'onestor-agent', version: '0.0.0-test', type: 'module' }));
  await symlink(path.join(ROOT, 'node_modules'), path.join(work, 'build', 'node_modules'));
  await makeLayout(path.join(work, 'ds'));
}, 120_000);

afterAll(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

describe('probe time bound', () => {
  it('built entry exists', () => {
    expect(existsSync(mainJs)).toBe(true);
  });

  it('state file blocks (FIFO): exits 0 within the deadline, with ERROR lines naming the discovered disk', async () => {
    const fifo = path.join(work, 'state-fifo.json');
    await new Promise<void>((resolve, reject) => execFile('mkfifo', [fifo], (e) => (e ? reject(e) : resolve())));
    const r = await runProbe(['vm-snapshot', '--state', fifo, '--deadline-ms', '2500', 'extra', 'monitord', 'args'], monitordXml(path.join(work, 'ds')));
    expect(r.code).toBe(0);
    // deadline + Node start-up + exit; a hang would take forever (the FIFO never gets a writer)
    expect(r.ms).toBeLessThan(2500 + 2000);
    expect(r.stderr).toMatch(/no answer within \d+ ms/);
    const disks = vmDisks(r.stdout);
    expect([...disks.keys()]).toEqual([42]);
    expect(disks.get(42)![0]).toMatchObject({ ID: '0', ERROR_CODE: 'E_AGENT_DOWN' });
    expect(disks.get(42)![0]!.MSG).toMatch(/^ERROR onestor-agent state unreadable: reading .*state-fifo\.json timed out/);
  });

  it('stale heartbeat: ERROR lines for protected disks, not nothing', async () => {
    const stateFile = path.join(work, 'stale.json');
    const now = Math.floor(Date.now() / 1000);
    await writeFile(stateFile, JSON.stringify({ version: 1, updatedAt: now, daemon: { pid: 1, startedAt: now - 9000, heartbeatAt: now - 7200 }, disks: { '42.0': { vmId: 42, diskId: 0, failCount: 0, lastSuccess: { capturedAt: now - 7300, finishedAt: now - 7290, durationMs: 10000, bytes: 5, mode: 'full', consistency: 'crash-consistent' } } } }));
    const r = await runProbe(['vm-snapshot', '--state', stateFile], monitordXml(path.join(work, 'ds')));
    expect(r.code).toBe(0);
    const d = vmDisks(r.stdout).get(42)![0]!;
    expect(d.MSG).toMatch(/^ERROR onestor-agent is not running \(last heartbeat 72\d\d s ago/);
    expect(d.LAST_TIMESTAMP).toBe(String(now - 7300));
  });

  it('running agent: TIMESTAMP line from state, no discovery needed', async () => {
    const stateFile = path.join(work, 'fresh.json');
    const now = Math.floor(Date.now() / 1000);
    await writeFile(stateFile, JSON.stringify({ version: 1, updatedAt: now, daemon: { pid: 1, startedAt: now - 100, heartbeatAt: now - 2 }, disks: { '42.0': { vmId: 42, diskId: 0, failCount: 0, freqSeconds: 600, lastSuccess: { capturedAt: now - 30, finishedAt: now - 20, durationMs: 10000, bytes: 5, mode: 'incremental', consistency: 'filesystem-frozen' } } } }));
    const r = await runProbe(['vm-snapshot', '--state', stateFile], monitordXml('/nonexistent'));
    expect(r.code).toBe(0);
    expect(vmDisks(r.stdout).get(42)![0]).toMatchObject({ ID: '0', TIMESTAMP: String(now - 30), MODE: 'incremental', CONSISTENCY: 'filesystem-frozen' });
  });

  // The datastore figures never wait for the settings read (under load, a cache walk given only what a hung
  // sshrc left of the budget timed out and the DS line came without REPLICA_CACHE; seen in CI).
  it('replica-ds with a blocked sshrc read still answers in time with DS lines and an error attribute', async () => {
    const fifo = path.join(work, 'sshrc-fifo');
    await new Promise<void>((resolve, reject) => execFile('mkfifo', [fifo], (e) => (e ? reject(e) : resolve())));
    const dsLoc = path.join(work, 'ds');
    await mkdir(path.join(dsLoc, '101'), { recursive: true });
    await writeFile(path.join(dsLoc, '101', '.monitor'), 'replica');
    await writeFile(path.join(dsLoc, '101', '0123abcd'), Buffer.alloc(3 * 1024 * 1024, 1));
    // the probe takes sshrc paths from its options only; drive it through a tiny module
    const driver = path.join(work, 'build', 'drive-replica.mjs');
    await writeFile(driver, `import { runProbe } from './lib/monitor/run-probe.js';\nconst r = await runProbe('replica-ds', { datastoreLocation: ${JSON.stringify(dsLoc)}, sshrcPaths: [${JSON.stringify(fifo)}], deadlineMs: 2000, cacheFile: ${JSON.stringify(path.join(work, 'walk-cache.json'))} });\nprocess.stdout.write(r.lines.join('\\n') + '\\n');\nprocess.exit(0);\n`);
    const t0 = performance.now();
    const out = await new Promise<{ stdout: string; code: number | null }>((resolve) => {
      const c = spawn(process.execPath, [driver], { stdio: ['ignore', 'pipe', 'inherit'] });
      let s = '';
      c.stdout.on('data', (b) => (s += b));
      c.on('close', (code) => resolve({ stdout: s, code }));
    });
    expect(out.code).toBe(0);
    expect(performance.now() - t0).toBeLessThan(2000 + 2000);
    const a = parseOneTemplate(out.stdout);
    const ds = a.filter((x) => x.name === 'DS').map((x) => x.value as Record<string, string>);
    expect(ds.map((d) => d.ID)).toEqual(['100', '101']);
    // the same figure as the ssh driver's own size_mb (du -s -BM), image count as upstream counts them
    const du = await new Promise<string>((resolve) => execFile('du', ['-s', '-BM', path.join(dsLoc, '101')], (_e, so) => resolve(String(so))));
    expect(ds[1]).toMatchObject({ REPLICA_CACHE: 'YES', REPLICA_IMAGES: '1', REPLICA_CACHE_SIZE: /^(\d+)M/.exec(du)![1] });
    expect(Number(ds[1]!.TOTAL_MB)).toBeGreaterThan(0);
    const err = String(a.find((x) => x.name === 'ONESTOR_PROBE_ERROR')?.value);
    expect(err).toMatch(/^ERROR driver settings: .*no answer within \d+ ms/);
    // the settings read gets at most 40 % of the budget: the snaps figures after it still get time
    expect(Number(/no answer within (\d+) ms/.exec(err)![1])).toBeLessThanOrEqual(800);
  });
});
