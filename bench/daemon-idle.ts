/**
 * Idle RSS of the REAL daemon (`onestor-agent run` through dist/agent/main.js, all production wiring),
 * with 200 protected disks (50 VMs x 4) known and nothing due. Goal (issue 5): idle RSS <= 60 MB.
 * bench/schedule.ts measures the loop alone; this one measures what the installed daemon loads.
 *
 *   npm run build && node dist/bench/daemon-idle.js [idleSec=30] [entry=dist/agent/main.js]
 *
 * No libvirtd needed: libvirt's built-in test driver (`test:///node.xml`) lists the 50 domains as
 * running, so discovery finds the disks; every disk has a snapshot a minute old and a 1 h frequency,
 * so no cycle runs (the replica is never contacted). RSS is read from /proc/PID/status every second.
 */
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { renderDsXml, renderVmXml } from '../dev/one-layout.js';

const idleSec = Number(process.argv[2] ?? 30);
const here = path.dirname(fileURLToPath(import.meta.url));
const mainJs = path.resolve(process.argv[3] ?? path.join(here, '..', 'agent', 'main.js'));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function statusKb(pid: number, field = 'VmRSS'): number {
  try {
    return Number(new RegExp(`${field}:\\s+(\\d+)`).exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
  } catch {
    return 0;
  }
}
const rssKb = (pid: number): number => statusKb(pid);

const root = mkdtempSync(path.join(tmpdir(), 'onestor-bench-idle-'));
try {
  const dsRoot = path.join(root, 'datastores');
  const ds = path.join(dsRoot, '0');
  mkdirSync(ds, { recursive: true });
  writeFileSync(path.join(ds, '.monitor'), 'ssh');
  const now = Math.floor(Date.now() / 1000);
  const disks: Record<string, unknown> = {};
  const domains: string[] = [];
  for (let vm = 100; vm < 150; vm++) {
    const vmDir = path.join(ds, String(vm));
    for (let d = 0; d < 4; d++) {
      const snap = path.join(vmDir, `disk.${d}.snap`);
      mkdirSync(snap, { recursive: true });
      writeFileSync(path.join(snap, 'base'), '');
      writeFileSync(path.join(snap, 'base.1'), '');
      symlinkSync('.', path.join(snap, `disk.${d}.snap`));
      symlinkSync(`disk.${d}.snap/base.1`, path.join(vmDir, `disk.${d}`));
      disks[`${vm}.${d}`] = { vmId: vm, diskId: d, failCount: 0, checkpoint: 'ck', base1Identity: null, freqSeconds: 3600, lastSuccess: { capturedAt: now - 60, finishedAt: now - 59, durationMs: 1000, bytes: 1, mode: 'incremental', consistency: 'crash-consistent' } };
    }
    writeFileSync(path.join(vmDir, 'vm.xml'), renderVmXml({ vmId: vm, dsId: 0, dsRoot, deployId: `one-${vm}`, hostname: 'bench', memoryMiB: 64, stime: 1, disks: [0, 1, 2, 3].map((d) => ({ diskId: d, target: `vd${'abcd'[d]}`, sizeMiB: 1, freq: 3600 })) }));
    writeFileSync(path.join(vmDir, 'ds.xml'), renderDsXml({ dsId: 0, dsRoot, replicaHost: 'replica.invalid' }));
    domains.push(`<domain type='test'><name>one-${vm}</name><memory>65536</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>`);
  }
  writeFileSync(path.join(root, 'node.xml'), `<node>${domains.join('')}</node>`);
  const stateDir = path.join(root, 'state');
  mkdirSync(stateDir);
  writeFileSync(path.join(stateDir, 'state.json'), JSON.stringify({ version: 1, updatedAt: now, disks, baseDigests: {} }));
  const args = [mainJs, 'run', '--datastores', dsRoot, '--state-dir', stateDir, '--libvirt-uri', `test://${path.join(root, 'node.xml')}`, '--sshrc', path.join(root, 'no-sshrc'), '--log-level', 'warn'];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, NOTIFY_SOCKET: '' } });
  let stderr = '';
  child.stderr.on('data', (b) => (stderr += b));
  // ready = the first heartbeat names the 200 disks
  for (let i = 0; i < 300; i++) {
    await sleep(100);
    try {
      const s = JSON.parse(readFileSync(path.join(stateDir, 'state.json'), 'utf8')) as { daemon?: unknown; disks: Record<string, { nextDueAt?: number }> };
      if (s.daemon && Object.values(s.disks).filter((d) => d.nextDueAt).length === 200) break;
    } catch {
      /* mid-rename */
    }
    if (child.exitCode !== null) throw new Error(`daemon exited ${child.exitCode}: ${stderr}`);
  }
  await sleep(3000); // start-up garbage
  let max = 0;
  const samples: number[] = [];
  for (let t = 0; t < idleSec; t++) {
    const kb = rssKb(child.pid!);
    samples.push(kb);
    max = Math.max(max, kb);
    await sleep(1000);
  }
  // what the resident set is made of: anonymous (heaps, malloc arenas, thread stacks) vs file pages (the node binary, shared libraries)
  const parts = ['RssAnon', 'RssFile', 'VmHWM', 'Threads'].map((f) => `${f} ${f === 'Threads' ? statusKb(child.pid!, f) : (statusKb(child.pid!, f) / 1024).toFixed(1)}`).join(', ');
  child.kill('SIGTERM');
  await new Promise((r) => child.on('exit', r));
  samples.sort((a, b) => a - b);
  console.log(`entry: ${mainJs}`);
  console.log(`real daemon idle, 200 disks / 50 VMs known, ${idleSec} s: RSS max ${(max / 1024).toFixed(1)} MiB, median ${(samples[Math.floor(samples.length / 2)]! / 1024).toFixed(1)} MiB (goal <= 60 MB); at the end: ${parts}; NODE_OPTIONS=${process.env.NODE_OPTIONS ?? ''}; load average ${loadavg().map((x) => x.toFixed(2)).join(' ')}`);
  if (/"level":(50|60)/.test(stderr)) console.log(`daemon errors:\n${stderr.split('\n').filter((l) => /"level":(50|60)/.test(l)).slice(0, 5).join('\n')}`);
} finally {
  rmSync(root, { recursive: true, force: true });
}
