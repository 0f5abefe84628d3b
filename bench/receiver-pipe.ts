/**
 * The receiver alone: the real `onestor-agent receive` of one or more builds on a pipe (no SSH, no sshd),
 * the real client (ReceiverConnection) uploading one random file, runs interleaved build by build. Prints
 * wall time and the CPU of both ends split into user and system (system is mostly the kernel's page-cache
 * copy of the writes, which swings between runs on a VM; user is the receiver's own work).
 *
 *   npm run build && node dist/bench/receiver-pipe.js [sizeMiB=1024] [reps=3] [dist ...]   (default: this build)
 */
import { spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const sizeMiB = Number(process.argv[2] ?? 1024);
const reps = Number(process.argv[3] ?? 3);
const here = path.dirname(fileURLToPath(import.meta.url));
const dists = process.argv.length > 4 ? process.argv.slice(4).map((d) => path.resolve(d)) : [path.resolve(here, '..')];
const TICKS = 100;

function cpuOf(pid: number): { user: number; sys: number } {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return { user: Number(fields[11]) / TICKS, sys: Number(fields[12]) / TICKS };
}

async function once(dist: string, file: string, root: string, key: string): Promise<string> {
  const { ReceiverConnection } = (await import(path.join(dist, 'lib', 'transfer', 'replica-client.js'))) as typeof import('../lib/transfer/replica-client.js');
  const snaps = mkdtempSync(path.join(root, 'snaps-'));
  const child = spawn(process.execPath, [path.join(dist, 'agent', 'main.js'), 'receive', '--snaps-dir', snaps, '--sshrc', path.join(root, 'no-sshrc'), '--log-level', 'warn', '--allow-unidentified'], { stdio: ['pipe', 'pipe', 'ignore'] });
  try {
    const conn = new ReceiverConnection(child.stdout, child.stdin);
    await conn.hello('bench', 'bench');
    const disk = await conn.openDisk(1, 0);
    const c0 = process.cpuUsage();
    const t0 = performance.now();
    await disk.upload('base', file, { key });
    const sec = (performance.now() - t0) / 1000;
    const c = process.cpuUsage(c0);
    const r = cpuOf(child.pid!);
    await disk.close();
    await conn.bye();
    return `${sec.toFixed(2).padStart(6)} s ${((sizeMiB / sec) | 0).toString().padStart(5)} MB/s   client user ${(c.user / 1e6).toFixed(2)} sys ${(c.system / 1e6).toFixed(2)}   receiver user ${r.user.toFixed(2)} sys ${r.sys.toFixed(2)}`;
  } finally {
    child.stdin.end();
    await new Promise((r) => (child.exitCode !== null ? r(null) : child.once('exit', r)));
    rmSync(snaps, { recursive: true, force: true });
  }
}

const root = mkdtempSync(path.join(tmpdir(), 'onestor-bench-rpipe-'));
try {
  const file = path.join(root, 'payload');
  const chunk = Buffer.allocUnsafe(1 << 20);
  writeFileSync(file, '');
  for (let i = 0; i < sizeMiB; i++) writeFileSync(file, randomFillSync(chunk), { flag: 'a' });
  console.log(`receiver on a pipe, ${sizeMiB} MiB random upload, ${reps} runs per build, interleaved`);
  for (let r = 0; r < reps; r++) {
    for (const d of dists) console.log(`${path.basename(path.dirname(d)).padEnd(12)} ${await once(d, file, root, `k${r}`)}`);
  }
  console.log(`load average ${readFileSync('/proc/loadavg', 'utf8').trim()}`);
} finally {
  rmSync(root, { recursive: true, force: true });
}
