/**
 * Bench-only helpers around the test harness: disks filled with incompressible data, a plain (unrestricted)
 * SSH login to the replica for the OpenSSH and rsync reference runs, a byte-counting TCP relay in front of
 * the replica's sshd, and CPU accounting read from /proc.
 */
import { spawn } from 'node:child_process';
import { readFile, rename, rm, readdir } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { run } from '../../lib/shared/exec.js';
import { replicaPaths } from '../../lib/replica/layout.js';
import type { AgentEnv } from '../../dev/agent-env.js';
import type { OneVmDisk } from '../../dev/one-layout.js';

async function sh(script: string, timeoutMs = 600_000): Promise<string> {
  const r = await run('bash', ['-c', script], { timeoutMs });
  if (r.code !== 0) throw new Error(`bash -c '${script}' failed (${r.code}): ${r.stderr.trim()}`);
  return r.stdout;
}

const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

/** Writes `lengthMiB` of pseudo-random (incompressible, non-repeating) bytes at `offsetMiB` of a raw file. */
async function writeRandom(rawPath: string, offsetMiB: number, lengthMiB: number, seed: string): Promise<void> {
  // AES-CTR over zeroes: GB/s of data no block of which repeats, so rsync's block matching sees real-world-like content.
  await sh(
    `openssl enc -aes-128-ctr -nosalt -pass pass:${seed} -pbkdf2 -in /dev/zero 2>/dev/null | head -c ${lengthMiB}M | ` +
      `dd of=${q(rawPath)} bs=1M seek=${offsetMiB} conv=notrunc iflag=fullblock status=none`,
  );
}

/**
 * Replaces the harness's (empty) base and base.1 of a not yet started disk: `baseMiB` of random data in base,
 * `overlayMiB` more in base.1 right after it. base.1 keeps the OpenNebula layout (backing name disk.N.snap/base).
 */
export async function fillDisk(disk: OneVmDisk, sizeMiB: number, baseMiB: number, overlayMiB: number, scratchDir: string): Promise<void> {
  const raw = path.join(scratchDir, `fill-${disk.diskId}-${process.pid}.raw`);
  const snapName = path.basename(disk.snapDir);
  try {
    await sh(`truncate -s ${sizeMiB}M ${q(raw)}`);
    if (baseMiB > 0) await writeRandom(raw, 0, baseMiB, `base-${disk.base1Path}`);
    const newBase = path.join(disk.snapDir, 'base.new');
    await sh(`qemu-img convert -f raw -O qcow2 ${q(raw)} ${q(newBase)}`);
    await rename(newBase, disk.basePath);
    if (overlayMiB > 0) await writeRandom(raw, baseMiB, overlayMiB, `overlay-${disk.base1Path}`);
    // -B: only clusters that differ from base land in the overlay, as in a real base.1.
    const newBase1 = path.join(disk.snapDir, 'base.1.new');
    await sh(`cd ${q(disk.snapDir)} && qemu-img convert -f raw -O qcow2 -B ${q(`${snapName}/base`)} -F qcow2 ${q(raw)} base.1.new`);
    await rename(newBase1, disk.base1Path);
  } finally {
    await rm(raw, { force: true });
  }
}

export interface PlainSsh {
  /** arguments for `ssh` (before the host), cipher as in upstream's REPLICA_SSH_OPTS */
  args: string[];
  /** `user@host` */
  target: string;
  /** the whole ssh command as one string, for `rsync -e` */
  rsh: string;
  keyPath: string;
}

/**
 * A second client key with a normal (unrestricted) login, appended to the replica's authorized_keys: what
 * upstream has (oneadmin's full key). The agent's restricted key stays first and unchanged.
 */
export async function plainSshAccess(env: AgentEnv, port = env.sshd.port): Promise<PlainSsh> {
  const keyPath = path.join(env.root, 'plain_ed25519');
  await rm(keyPath, { force: true });
  await rm(`${keyPath}.pub`, { force: true });
  await sh(`ssh-keygen -q -t ed25519 -N '' -C bench-plain -f ${q(keyPath)}`);
  const pub = (await readFile(`${keyPath}.pub`, 'utf8')).trim();
  const existing = (await readFile(env.sshd.authorizedKeysPath, 'utf8')).split('\n').filter((l) => l.trim() !== '');
  if (!existing.includes(pub)) await env.sshd.setAuthorizedKeys([...existing, pub]);
  return plainSshFor(env, keyPath, port);
}

export function plainSshFor(env: AgentEnv, keyPath: string, port: number): PlainSsh {
  const args = [
    '-p', String(port),
    '-i', keyPath,
    '-o', 'IdentitiesOnly=yes',
    '-o', `UserKnownHostsFile=${env.sshd.knownHostsPath}`,
    '-o', 'StrictHostKeyChecking=yes',
    '-o', 'HostKeyAlias=' + `[127.0.0.1]:${env.sshd.port}`,
    '-o', 'BatchMode=yes',
    '-c', 'aes128-gcm@openssh.com',
    '-m', 'umac-64@openssh.com',
  ];
  return { args, target: `${env.sshd.user}@${env.sshd.host}`, rsh: ['ssh', ...args].map(q).join(' '), keyPath };
}

// ---------------------------------------------------------------------------------------------------------
// A TCP relay that counts bytes both ways: "bytes on the wire" including SSH framing, MACs and handshakes.

export interface TcpMeter {
  port: number;
  /** client -> server, server -> client, as of the last refresh() */
  counts(): { up: number; down: number };
  refresh(): Promise<{ up: number; down: number }>;
  reset(): Promise<void>;
  close(): Promise<void>;
}

/**
 * The relay runs in a process of its own: in this one it would share the event loop (and the garbage
 * collector) of the in-process agent a bench measures, slowing our method and not upstream's processes.
 * It reads into one reused buffer per direction and counts; stdin takes "reset" and "counts" lines.
 */
const METER_CHILD = `
import net from 'node:net';
import readline from 'node:readline';
const target = Number(process.argv[1]);
let up = 0, down = 0;
const sockets = new Set();
function pump(from, to, count) {
  from.on('data', (d) => { count(d.length); if (!to.write(d)) { from.pause(); to.once('drain', () => from.resume()); } });
  from.on('end', () => to.end());
}
const server = net.createServer((client) => {
  const upstream = net.connect({ host: '127.0.0.1', port: target });
  sockets.add(client).add(upstream);
  pump(client, upstream, (n) => (up += n));
  pump(upstream, client, (n) => (down += n));
  const done = () => { client.destroy(); upstream.destroy(); sockets.delete(client); sockets.delete(upstream); };
  client.on('error', done).on('close', done);
  upstream.on('error', done).on('close', done);
});
server.listen(0, '127.0.0.1', () => console.log(String(server.address().port)));
readline.createInterface({ input: process.stdin }).on('line', (l) => {
  if (l === 'reset') { up = 0; down = 0; console.log('ok'); }
  else if (l === 'counts') console.log(up + ' ' + down);
}).on('close', () => { for (const s of sockets) s.destroy(); server.close(() => process.exit(0)); });
`;

/** Bytes received on the loopback interface so far (every packet sent over lo is received once). */
async function loopbackBytes(): Promise<number> {
  const line = (await readFile('/proc/net/dev', 'utf8')).split('\n').find((l) => l.trim().startsWith('lo:'));
  if (!line) throw new Error('/proc/net/dev has no lo interface');
  return Number(line.split(':')[1]!.trim().split(/\s+/)[0]);
}

/**
 * "Bytes on the wire" without a relay in the path: the loopback interface's byte counter, which counts
 * every TCP segment both ways with its IP and TCP headers (and anything else sent over 127.0.0.1 meanwhile:
 * nothing else in these benches, libvirt and NBD use unix sockets). The relay costs ~1 CPU-s per GiB, which
 * on a 2-vCPU machine slows whichever method needs more CPU beside it; this counter costs nothing. Directions
 * are not told apart: `up` is the total, `down` 0.
 */
export async function loopbackMeter(targetPort: number): Promise<TcpMeter> {
  let base = await loopbackBytes();
  let counts = { up: 0, down: 0 };
  return {
    port: targetPort,
    counts: () => counts,
    refresh: async () => {
      counts = { up: (await loopbackBytes()) - base, down: 0 };
      return counts;
    },
    reset: async () => {
      base = await loopbackBytes();
      counts = { up: 0, down: 0 };
    },
    close: async () => {},
  };
}

export async function startTcpMeter(targetPort: number): Promise<TcpMeter> {
  const child = spawn(process.execPath, ['--input-type=module', '-e', METER_CHILD, String(targetPort)], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines: string[] = [];
  const waiters: Array<(l: string) => void> = [];
  let buf = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const l = buf.slice(0, i);
      buf = buf.slice(i + 1);
      const w = waiters.shift();
      if (w) w(l);
      else lines.push(l);
    }
  });
  const nextLine = () => new Promise<string>((resolve) => (lines.length ? resolve(lines.shift()!) : waiters.push(resolve)));
  const ask = async (cmd: string) => {
    child.stdin!.write(`${cmd}\n`);
    return nextLine();
  };
  const port = Number(await nextLine());
  let counts = { up: 0, down: 0 };
  return {
    port,
    // counts() is synchronous in the interface: the last answer, refreshed by refresh()
    counts: () => counts,
    refresh: async () => {
      const [u, d] = (await ask('counts')).split(' ').map(Number);
      counts = { up: u!, down: d! };
      return counts;
    },
    reset: async () => {
      await ask('reset');
      counts = { up: 0, down: 0 };
    },
    close: () =>
      new Promise<void>((resolve) => {
        child.once('exit', () => resolve());
        child.stdin!.end();
      }),
  };
}

// ---------------------------------------------------------------------------------------------------------
// CPU accounting from /proc (clock ticks -> seconds).

const TICKS_PER_SECOND = 100; // CLK_TCK on Linux x86_64

/** utime+stime (own) and cutime+cstime (reaped children) of a process, in seconds; null if it is gone. */
export async function procCpu(pid: number): Promise<{ self: number; children: number } | null> {
  let stat: string;
  try {
    stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  // comm may contain spaces and parentheses: fields start after the last ')'
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const n = (i: number) => Number(f[i - 3]);
  return { self: (n(14) + n(15)) / TICKS_PER_SECOND, children: (n(16) + n(17)) / TICKS_PER_SECOND };
}

/** Total CPU of a long-lived server and everything it has reaped (sessions that ended). */
export async function serverCpuTotal(pid: number): Promise<number> {
  const c = await procCpu(pid);
  if (!c) throw new Error(`process ${pid} is gone`);
  return c.self + c.children;
}

/** Live descendants of `pid` whose command line matches. */
export async function descendants(pid: number, match: RegExp): Promise<number[]> {
  const parent = new Map<number, number>();
  const cmd = new Map<number, string>();
  for (const e of await readdir('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = await readFile(`/proc/${e}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      parent.set(Number(e), Number(f[1]));
      cmd.set(Number(e), (await readFile(`/proc/${e}/cmdline`, 'utf8')).replace(/\0/g, ' '));
    } catch {
      // exited meanwhile
    }
  }
  const isUnder = (p: number): boolean => {
    for (let cur = parent.get(p); cur !== undefined && cur > 1; cur = parent.get(cur)) if (cur === pid) return true;
    return false;
  };
  return [...cmd.entries()].filter(([p, c]) => isUnder(p) && match.test(c)).map(([p]) => p);
}

export async function sshdPid(env: AgentEnv): Promise<number> {
  return Number((await readFile(path.join(env.sshd.rootDir, 'sshd.pid'), 'utf8')).trim());
}

/** Runs a shell pipeline; returns wall seconds and the CPU seconds (user+sys) of its children (bash `times`). */
export async function timedShell(script: string, timeoutMs = 600_000): Promise<{ seconds: number; childCpu: number; stdout: string }> {
  const t0 = performance.now();
  const out = await new Promise<string>((resolve, reject) => {
    const child = spawn('bash', ['-c', `${script}\ntimes`], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('close', (code) => {
      clearTimeout(timer);
      if (code !== 0) reject(new Error(`${script}: exit ${code}: ${stderr.trim()}`));
      else resolve(stdout);
    });
  });
  const seconds = (performance.now() - t0) / 1000;
  // `times` prints two lines: shell user/sys, then children user/sys, like "0m1.234s 0m0.567s"
  const lines = out.trim().split('\n');
  const childLine = lines[lines.length - 1] ?? '';
  const secs = [...childLine.matchAll(/(\d+)m([\d.]+)s/g)].map((m) => Number(m[1]) * 60 + Number(m[2]));
  return { seconds, childCpu: secs.reduce((a, b) => a + b, 0), stdout: lines.slice(0, -2).join('\n') };
}

export async function fileSize(p: string): Promise<number> {
  const r = await run('stat', ['-c', '%s', p]);
  if (r.code !== 0) throw new Error(`stat ${p}: ${r.stderr.trim()}`);
  return Number(r.stdout.trim());
}

/** Whether `cp --reflink=always` works in a directory (it does not on ext4 or tmpfs). */
export async function reflinkWorks(dir: string): Promise<boolean> {
  const a = path.join(dir, `.reflink-probe-${process.pid}`);
  try {
    await sh(`head -c 65536 /dev/zero > ${q(a)}`);
    const r = await run('cp', ['--reflink=always', a, `${a}.2`]);
    return r.code === 0;
  } finally {
    await rm(a, { force: true });
    await rm(`${a}.2`, { force: true });
  }
}

export async function fsType(dir: string): Promise<string> {
  return (await sh(`stat -f -c %T ${q(dir)}`)).trim();
}

export { sh, q };

/**
 * BENCH_DROP_CACHES=1 (root): before a method's run, write back and drop the page cache, then read the
 * sources back in. Why: on a VM whose memory the host backs lazily, a page the guest kernel has never used
 * costs a host fault on first touch — measured 1.5-2.7 s of system time per GiB written once the recycled
 * pages run out, 0.3 s before. A method that overwrites one file (the OpenSSH `cat > f` reference) recycles
 * its own pages; one that writes new files (our uploads) pays the faults. Dropping the cache before every
 * run starts each from the same memory state (not necessarily warm: with free page reporting the dropped
 * pages may go back to the host, and then every method pays the first touch alike). Returns whether it did.
 */
export async function levelPageCache(sources: string[]): Promise<boolean> {
  if (process.env.BENCH_DROP_CACHES !== '1') return false;
  await sh(`sync && echo 1 > /proc/sys/vm/drop_caches && cat ${sources.map(q).join(' ')} > /dev/null`);
  return true;
}

/**
 * Waits until the QEMU processes of the given domains use less than `maxCpu` CPUs (over 1 s), at most
 * `timeoutMs`: a guest that just started (firmware, boot) takes a core for seconds, which would slow
 * whichever method runs first. Returns their CPU use in the last second.
 */
export async function settleGuests(domainNames: string[], maxCpu = 0.5, timeoutMs = 60_000): Promise<number> {
  const pids = async () => {
    const out: number[] = [];
    for (const e of await readdir('/proc')) {
      if (!/^\d+$/.test(e)) continue;
      const cmd = await readFile(`/proc/${e}/cmdline`, 'utf8').catch(() => '');
      if (cmd.includes('qemu-system') && domainNames.some((d) => cmd.includes(`guest=${d},`) || cmd.includes(`guest=${d}\0`))) out.push(Number(e));
    }
    return out;
  };
  const total = async (ps: number[]) => {
    let n = 0;
    for (const p of ps) n += (await procCpu(p))?.self ?? 0;
    return n;
  };
  const t0 = Date.now();
  let rate = Infinity;
  const ps = await pids();
  while (Date.now() - t0 < timeoutMs) {
    const a = await total(ps);
    await new Promise((r) => setTimeout(r, 1000));
    rate = (await total(ps)) - a;
    if (rate < maxCpu) break;
  }
  return rate;
}

/**
 * The replica as if it never held the VM: its dir, the receiver's work dir of the VM (every disk) and the disk's uploads (paths
 * from the receiver's own layout). Removing the VM dir alone leaves the A/B copies, which the next open then
 * deletes inside the timed run (bench/README.md, issue 14 ninth pass).
 */
export async function emptyReplicaFor(snapsDir: string, vmId: number, diskId = 0): Promise<void> {
  const p = replicaPaths(snapsDir, vmId, diskId);
  for (const dir of [p.vmDir, path.dirname(p.workDir), p.tmpDir]) await rm(dir, { recursive: true, force: true });
}
