/**
 * Issue 3, "Measure": full push of a 1 GiB disk holding ~300 MiB of data.
 *   A. our upload exactly as the cycle does it: ReplicaClient.connect + openDisk + upload(base, with its known
 *      digest) + upload(base1) (hashed while sent, verified by the receiver, fsynced) + publishFull + close;
 *   B. `cat base base.1 | ssh -c aes128-gcm@openssh.com host 'cat > f'` of the SAME bytes, same run;
 *   C. the same with `sync f` after the cat (the receiver fsyncs; plain cat does not) — for context;
 *   D. ssh2 alone: exec `cat > f`, 2 MiB reads, no framing, no hashing — the library's ceiling;
 *   E. the whole `snapshot --full` CLI (replica emptied first, so base travels too).
 * CPU seconds per side are read from /proc, to show where the time goes.
 * Usage: npx tsc -p tsconfig.build.json && node dist/bench/push.js [reps=3]
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { copyFile, mkdir, readdir, readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { Client } from 'ssh2';
import { ReplicaClient } from '../lib/transfer/replica-client.js';
import { agentMain, startAgentEnv, testHostName, type AgentEnv } from '../dev/agent-env.js';
import { formatSelfTimes, profileInProcess, selfTimes, type CpuProfile } from './lib/profile.js';
import { descendants, emptyReplicaFor, fileSize, fillDisk, levelPageCache, plainSshAccess, procCpu, q, serverCpuTotal, sshdPid, timedShell, type PlainSsh } from './lib/cluster.js';
import { mbps, median, medianSpread, mib, table } from './lib/stats.js';

const REPS = Number(process.argv[2] ?? 3);
const VM = 71;
const GOAL_RATIO = 0.9;

interface Sample {
  seconds: number;
  bytes: number;
  clientCpu: number;
  serverCpu: number;
  /** our receiver process alone (part of serverCpu) */
  receiverCpu?: number;
  uploadSeconds?: number;
  /** ours: seconds per phase */
  phases?: Record<string, number>;
  /** ours: what carried the session (client CPU includes the ssh child's when it is 'openssh') */
  transport?: string;
}

async function sha256(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(file, { highWaterMark: 4 << 20 })) h.update(c as Buffer);
  return h.digest('hex');
}

interface Login {
  keyPath: string;
  receiverCommand: string;
}

async function ours(env: AgentEnv, base: string, base1: string, baseSha: string, vmId: number, sshd: number, login?: Login): Promise<Sample> {
  const bytes = (await fileSize(base)) + (await fileSize(base1));
  const cpu0 = process.cpuUsage();
  // the openssh transport's `ssh` child: its CPU lands in ours once it is reaped (after close)
  const children0 = (await procCpu(process.pid))?.children ?? 0;
  const t0 = performance.now();
  const client = await ReplicaClient.connect({
    host: env.sshd.host,
    port: env.sshd.port,
    username: env.sshd.user,
    privateKey: login?.keyPath ?? env.sshd.clientKeyPath,
    knownHostsFile: env.sshd.knownHostsPath,
    acceptNewHostKey: false,
    receiverCommand: login?.receiverCommand ?? 'onestor-agent receive',
    connectTimeoutMs: 20_000,
    localHost: 'bench',
  });
  const tc = performance.now();
  const session = await client.openDisk(vmId, 0);
  const tu0 = performance.now();
  const ck = `onestor-bench-${vmId}-${Date.now()}`;
  await session.upload('base', base, { key: `base-${baseSha.slice(0, 32)}`, sha256: baseSha });
  const tb = performance.now();
  await session.upload('base1', base1, { key: `${ck}.base1` });
  const tu1 = performance.now();
  // The receiver may outlive its sshd session (then nobody accounts its CPU): sample the live session
  // processes now, while the connection is open. (Handshake CPU of the pre-auth child is left out.)
  let receiverCpu = 0;
  let serverCpu = 0;
  for (const p of await descendants(sshd, /./)) {
    const c = await procCpu(p);
    if (!c) continue;
    serverCpu += c.self;
    if (/\breceive\b/.test(await readFile(`/proc/${p}/cmdline`, 'utf8').catch(() => ''))) receiverCpu += c.self;
  }
  await session.publishFull({ checkpoint: ck, capturedAt: Math.floor(Date.now() / 1000), consistency: 'crash-consistent', sourceHost: 'bench', base: `base-${baseSha.slice(0, 32)}`, base1: `${ck}.base1` });
  const tp = performance.now();
  await session.close();
  await client.close();
  const tz = performance.now();
  const phases = { connect: (tc - t0) / 1000, open: (tu0 - tc) / 1000, 'upload base': (tb - tu0) / 1000, 'upload base.1': (tu1 - tb) / 1000, publish: (tp - tu1) / 1000, close: (tz - tp) / 1000 };
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  const childrenCpu = ((await procCpu(process.pid))?.children ?? 0) - children0;
  await waitSessionsGone(sshd);
  // the receiver outlives the connection while it makes the seed's spare: the next run starts on a quiet replica
  if (!(await env.sshd.sessionCommandsGone())) throw new Error('the receiver did not finish within 120 s');
  return { seconds, bytes, clientCpu: (cpu.user + cpu.system) / 1e6 + childrenCpu, serverCpu, receiverCpu, uploadSeconds: (tu1 - tu0) / 1000, phases, transport: client.transport };
}

async function openssh(ssh: PlainSsh, base: string, base1: string, dest: string, sshd: number, fsync: boolean): Promise<Sample> {
  const bytes = (await fileSize(base)) + (await fileSize(base1));
  const server0 = await serverCpuTotal(sshd);
  const remote = fsync ? `cat > ${q(dest)} && sync ${q(dest)}` : `cat > ${q(dest)}`;
  const r = await timedShell(`cat ${q(base)} ${q(base1)} | ssh ${ssh.args.map(q).join(' ')} ${ssh.target} ${q(remote)}`);
  await waitSessionsGone(sshd);
  const got = await fileSize(dest);
  if (got !== bytes) throw new Error(`openssh run wrote ${got} bytes, expected ${bytes}`);
  await rm(dest, { force: true });
  return { seconds: r.seconds, bytes, clientCpu: r.childCpu, serverCpu: (await serverCpuTotal(sshd)) - server0 };
}

/** ssh2 with nothing of ours: exec `cat > f`, file streamed with 2 MiB reads and backpressure. */
async function ssh2Alone(env: AgentEnv, ssh: PlainSsh, files: string[], dest: string, sshd: number): Promise<Sample> {
  let bytes = 0;
  for (const f of files) bytes += await fileSize(f);
  const server0 = await serverCpuTotal(sshd);
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const conn = new Client();
  await new Promise<void>((resolve, reject) => {
    conn.once('ready', () => resolve()).once('error', reject);
    void readFile(ssh.keyPath).then((privateKey) =>
      conn.connect({ host: env.sshd.host, port: env.sshd.port, username: env.sshd.user, privateKey, algorithms: { cipher: ['aes128-gcm@openssh.com'] as never } }),
    );
  });
  await new Promise<void>((resolve, reject) => {
    conn.exec(`cat > ${q(dest)}`, async (err, ch) => {
      if (err) return reject(err);
      ch.on('close', () => resolve());
      ch.resume(); // 'close' needs the (empty) output consumed
      ch.stderr.resume();
      try {
        for (const f of files) {
          for await (const chunk of createReadStream(f, { highWaterMark: 2 << 20 })) {
            if (!ch.write(chunk)) await new Promise((r) => ch.once('drain', r));
          }
        }
        ch.end();
      } catch (e) {
        reject(e as Error);
      }
    });
  });
  conn.end();
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  await waitSessionsGone(sshd);
  const got = await fileSize(dest);
  if (got !== bytes) throw new Error(`ssh2 run wrote ${got} bytes, expected ${bytes}`);
  await rm(dest, { force: true });
  return { seconds, bytes, clientCpu: (cpu.user + cpu.system) / 1e6, serverCpu: (await serverCpuTotal(sshd)) - server0 };
}

/** Session processes are reaped (and their CPU accounted to the listener) shortly after the client leaves. */
async function waitSessionsGone(sshd: number): Promise<void> {
  for (let i = 0; i < 100; i++) {
    if ((await descendants(sshd, /./)).length === 0) return;
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function main(): Promise<void> {
  const env = await startAgentEnv({ name: 'bench-push' });
  try {
    const sshd = await sshdPid(env);
    const plain = await plainSshAccess(env);
    const vm = await env.createVm({ vmId: VM, disks: [{ diskId: 0, sizeMiB: 1024, freq: 60 }], noStart: true });
    // ~300 MiB of incompressible data: 100 MiB in base (the image), 200 MiB written since (base.1)
    await fillDisk(vm.disks[0]!, 1024, 100, 200, env.root);
    await vm.start();

    // E. the whole CLI, replica emptied each time so base is sent too
    const cli: number[] = [];
    let cliBytes = 0;
    for (let i = 0; i < REPS; i++) {
      await emptyReplicaFor(env.snapsDir, VM);
      const t0 = performance.now();
      const r = await env.agent(['snapshot', '--vm', String(VM), '--full', '--json']);
      cli.push((performance.now() - t0) / 1000);
      if (r.code !== 0) throw new Error(`snapshot failed: ${r.stdout}${r.stderr}`);
      const [o] = JSON.parse(r.stdout) as Array<{ ok: boolean; mode: string; bytes: number }>;
      if (!o?.ok || o.mode !== 'full') throw new Error(`unexpected outcome ${r.stdout}`);
      cliBytes = o.bytes;
      // the CLI has returned; the receiver may still make the spare (not timed, but not overlapping the next run)
      if (!(await env.sshd.sessionCommandsGone())) throw new Error('the receiver did not finish within 120 s');
    }

    // The exact bytes the cycle sent: the thin base.1 and base as published on the replica.
    const payload = path.join(env.root, 'payload');
    await mkdir(payload);
    const base = path.join(payload, 'base');
    const base1 = path.join(payload, 'base.1');
    await copyFile(path.join(env.snapsDir, String(VM), 'disk.0.snap', 'base'), base);
    await copyFile(path.join(env.snapsDir, String(VM), 'disk.0.snap', 'base.1'), base1);
    const baseSha = await sha256(base); // the cycle has it from its digest cache
    const dest = path.join(env.root, 'openssh-copy');

    const A: Sample[] = [];
    const B: Sample[] = [];
    const C: Sample[] = [];
    const D: Sample[] = [];
    for (let i = 0; i < REPS; i++) {
      // interleaved, so drift of the machine hits every method alike
      await levelPageCache([base, base1]);
      A.push(await ours(env, base, base1, baseSha, 900 + i, sshd));
      await levelPageCache([base, base1]);
      B.push(await openssh(plain, base, base1, dest, sshd, false));
      await levelPageCache([base, base1]);
      C.push(await openssh(plain, base, base1, dest, sshd, true));
      await levelPageCache([base, base1]);
      D.push(await ssh2Alone(env, plain, [base, base1], dest, sshd));
      await emptyReplicaFor(env.snapsDir, 900 + i);
    }

    const bytes = A[0]!.bytes;
    const row = (name: string, s: Sample[]) => [
      name,
      medianSpread(s.map((x) => x.seconds)),
      medianSpread(s.map((x) => mbps(x.bytes, x.seconds)), 0),
      (median(s.map((x) => mbps(x.bytes, x.seconds))) / median(B.map((x) => mbps(x.bytes, x.seconds)))).toFixed(2) + 'x',
      median(s.map((x) => x.clientCpu)).toFixed(2),
      median(s.map((x) => x.serverCpu)).toFixed(2),
    ];
    console.log(`\nFull push, 1 GiB disk, ~300 MiB data; payload = thin base.1 ${mib(await fileSize(base1))} MiB + base ${mib(await fileSize(base))} MiB = ${mib(bytes)} MiB; ${REPS} reps, median (min–max)\n`);
    console.log(
      table(['method', 'seconds', 'MB/s', 'vs OpenSSH', 'client CPU s', 'server CPU s'], [
        row('ours: connect+open+upload base,base.1+publish+close', A),
        row('ssh -c aes128-gcm host "cat > f"', B),
        row('ssh ... "cat > f && sync f"', C),
        row('ssh2 alone: exec "cat > f", 2 MiB reads', D),
      ]),
    );
    const ratio = median(A.map((x) => mbps(x.bytes, x.seconds))) / median(B.map((x) => mbps(x.bytes, x.seconds)));
    console.log(`\nours / OpenSSH = ${ratio.toFixed(2)}x (goal >= ${GOAL_RATIO}x) ${ratio >= GOAL_RATIO ? 'MET' : 'NOT MET'}`);
    console.log(`ours, upload calls only (no connect/publish): ${medianSpread(A.map((x) => x.uploadSeconds!))} s, ${medianSpread(A.map((x) => mbps(x.bytes, x.uploadSeconds!)), 0)} MB/s`);
    console.log('ours, seconds per phase: ' + Object.keys(A[0]!.phases!).map((k) => `${k} ${medianSpread(A.map((x) => x.phases![k]!))}`).join(', '));
    console.log(`page cache dropped before every run (BENCH_DROP_CACHES=1): ${process.env.BENCH_DROP_CACHES === '1' ? 'yes' : 'no'}`);
    console.log(`ours, transport: ${[...new Set(A.map((x) => x.transport))].join(', ')} (client CPU includes the ssh process for openssh)`);
    console.log(`ours, receiver process CPU during uploads: ${medianSpread(A.map((x) => x.receiverCpu!))} s (of server CPU ${medianSpread(A.map((x) => x.serverCpu))} s; the rest is sshd)`);
    // One profiled run of ours: client in-process, receiver started with --cpu-prof through the plain login.
    const profDir = path.join(env.root, 'prof');
    await mkdir(profDir);
    const receiverCommand = [process.execPath, '--cpu-prof', `--cpu-prof-dir=${profDir}`, agentMain(), 'receive', '--snaps-dir', env.snapsDir, '--sshrc', path.join(env.root, 'no-sshrc'), '--log-level', 'warn', '--host', testHostName()].map(q).join(' ');
    const { result: P, profile } = await profileInProcess(() => ours(env, base, base1, baseSha, 990, sshd, { keyPath: plain.keyPath, receiverCommand }));
    let receiverProfile: CpuProfile | null = null;
    for (let i = 0; i < 100 && !receiverProfile; i++) {
      const f = (await readdir(profDir)).find((x) => x.endsWith('.cpuprofile'));
      if (f) receiverProfile = JSON.parse(await readFile(path.join(profDir, f), 'utf8')) as CpuProfile;
      else await new Promise((r) => setTimeout(r, 100));
    }
    console.log(`\nprofiled run (profilers on, slower): ${P.seconds.toFixed(2)} s, ${mbps(P.bytes, P.seconds).toFixed(0)} MB/s`);
    console.log('client (agent side) self time, top 12:\n' + formatSelfTimes(selfTimes(profile), 12));
    if (receiverProfile) console.log('receiver self time, top 12:\n' + formatSelfTimes(selfTimes(receiverProfile), 12));
    else console.log('receiver profile not written');

    console.log(`\nsnapshot --full CLI wall time (replica emptied, base + base.1 = ${mib(cliBytes)} MiB sent): ${medianSpread(cli)} s`);
  } finally {
    await env.stop();
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
