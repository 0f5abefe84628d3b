/**
 * Where a pull-mode seed's stream spends its time, one piece at a time on the same 1 GiB base.1 (in-process),
 * the pieces interleaved rep by rep (order reversed every other rep), the page cache levelled before each:
 *   ssh cat < file     OpenSSH `ssh -c aes128-gcm host 'cat > f' < base.1`: the SSH floor here;
 *   node -> ssh cat    this process writing a reused 1 MiB buffer into the same: any process in front of ssh;
 *   gen -> receiver    a generated stream through our upload and the receiver (no file, no NBD);
 *   file -> receiver   base.1 as a file through our upload path;
 *   export -> receiver the pull-mode export streamed as a seed does it;
 *   export -> nowhere  the export read alone (capturePull + the overlay stream);
 *   export -> ssh cat (relay)  reads of the export passed by this process into `ssh host 'dd of=f'` (no receiver);
 *   export fd -> ssh cat       the same reads, ssh reading the NBD socket itself (what taking the agent
 *                              out of the data path would save; bench/README.md, tenth pass);
 *   export fd -> dd -> ssh cat the same, a `dd` process relaying the socket into ssh's stdin pipe (so one
 *                              session could carry the agent's frames and the data; prints dd's own CPU);
 *   export fd -> nbd sink      the same, the replica side doing the receiver's per-byte work on the NBD
 *                              replies (bench/lib/nbd-sink.ts, which prints its own CPU): against `export -> receiver`.
 * The last four run only when BENCH_PIECES names them.
 * CPU: this process (the agent side), the receiver and the sshd session processes, per piece.
 * Usage: npm run build && node dist/bench/seed-split.js [dataGiB=1] [reps=3]
 * BENCH_PIECES=name,name runs only the named pieces; BENCH_RECEIVER_ARGS='--no-direct-io' adds receiver flags.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { statSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { pino } from 'pino';
import { buildContext } from '../agent/context.js';
import { capturePull } from '../lib/cycle/capture-pull.js';
import { parsePullExports } from '../lib/libvirt/backup-xml.js';
import { NbdClient } from '../lib/libvirt/nbd-client.js';
import { encodeRequest, NBD_CMD_READ, NbdHandshake } from '../lib/libvirt/nbd-protocol.js';
import { startAgentEnv } from '../dev/agent-env.js';
import { descendants, fillDisk, levelPageCache, plainSshAccess, procCpu, q, sh, sshdPid } from './lib/cluster.js';
import { median } from './lib/stats.js';

const GIB = Number(process.argv[2] ?? 1);
const REPS = Number(process.argv[3] ?? 3);
const MiB = 1048576;
// BENCH_PIECES='export -> receiver,ssh cat < file' runs only those pieces (e.g. under a profiler)
const ONLY = process.env.BENCH_PIECES?.split(',').map((x) => x.trim());

/** reads of the two export -> ssh pieces: as the overlay stream reads (lib/cycle/overlay-stream.ts) */
const FD_READ = 512 * 1024;
const FD_DEPTH = 16;
const FD_TIMEOUT_MS = 120_000;
const NBD_SINK = fileURLToPath(new URL('./lib/nbd-sink.js', import.meta.url));

/** The child's exit code; kills it and rejects after `ms`. */
function exitWithin(c: ChildProcess, ms: number, why: string): Promise<number | null> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => (c.kill(), reject(new Error(`ssh still running after ${ms} ms: ${why}`))), ms);
    c.on('exit', (code) => (clearTimeout(t), resolve(code)));
  });
}
async function main(): Promise<void> {
  const receiverArgs = process.env.BENCH_RECEIVER_ARGS?.split(' ').filter(Boolean) ?? [];
  const env = await startAgentEnv({ name: 'seed-split', receiverArgs });
  const ctx = await buildContext({
    log: pino({ level: 'warn' }),
    overrides: env.contextOverrides(),
  });
  try {
    const plain = await plainSshAccess(env);
    const mib = Math.round(GIB * 1024);
    const vm = await env.createVm({ vmId: 9, disks: [{ diskId: 0, sizeMiB: mib + 1024, freq: 60 }], noStart: true });
    await fillDisk(vm.disks[0]!, mib + 1024, 0, mib, env.root);
    await vm.start();
    const deps = await ctx.cycleDeps();
    const base1 = vm.disks[0]!.base1Path;
    const base1Bytes = statSync(base1).size;
    let ck = 0;
    const pull = () =>
      capturePull(deps.libvirt, ctx.qemuImg, {
        vmId: 9,
        domainName: vm.domainName,
        stagingDir: path.join(env.dsRoot, String(env.dsId), '.onestor', '9'),
        checkpointName: `onestor-9-${ck++}-bench`,
        tryFreeze: false,
        timeoutMs: 600_000,
        minFreePercent: 1,
        disks: [{ diskId: 0, base1Path: base1, snapDir: vm.disks[0]!.snapDir, mode: 'full', virtualSize: (mib + 1024) * MiB }],
      });
    const dropCheckpoints = async () => {
      for (const c of (await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name'])).split('\n').map((x) => x.trim()).filter(Boolean).reverse()) await env.lv.virsh(['checkpoint-delete', vm.domainName, c]);
    };
    const block = Buffer.alloc(MiB);
    for (let i = 0; i < MiB; i += 4) block.writeUInt32LE((i * 2654435761) >>> 0, i);
    const blocks = Math.round(base1Bytes / MiB);
    const sshArgs = plain.args.map(q).join(' ');
    type Piece = (rep: number, replica: Awaited<ReturnType<typeof deps.replicaFor>>) => Promise<number>;
    const pieces: Record<string, Piece> = {
      'ssh cat < file': async () => {
        await sh(`ssh ${sshArgs} ${plain.target} 'cat > /tmp/seed-split-ref' < ${q(base1)}`);
        return base1Bytes;
      },
      'node -> ssh cat': async () => {
        const c = spawn('ssh', [...plain.args, plain.target, 'cat > /tmp/seed-split-ref'], { stdio: ['pipe', 'ignore', 'inherit'] });
        const exited = new Promise((r) => c.on('exit', r));
        for (let i = 0; i < blocks; i++) {
          block.writeUInt32LE(i, 0);
          await new Promise((r) => c.stdin.write(block, r));
        }
        c.stdin.end();
        await exited;
        return blocks * MiB;
      },
      'gen -> receiver': async (rep, replica) => {
        const s = await replica.openDisk(9, 0);
        async function* generated() {
          for (let i = 0; i < blocks; i++) {
            block.writeUInt32LE(i, 0);
            yield block;
          }
        }
        const n = (await s.uploadStream('base1', { size: blocks * MiB, chunks: generated() }, { key: `g${rep}` })).bytes;
        await s.close();
        return n;
      },
      'file -> receiver': async (rep, replica) => {
        const s = await replica.openDisk(9, 0);
        const n = (await s.upload('base1', base1, { key: `f${rep}` })).bytes;
        await s.close();
        return n;
      },
      'export -> receiver': async (rep, replica) => {
        const p = await pull();
        const s = await replica.openDisk(9, 0);
        const n = (await s.uploadStream('base1', { size: p.disks[0]!.size, chunks: p.disks[0]!.stream() }, { key: `e${rep}` })).bytes;
        await s.close();
        await p.end();
        await dropCheckpoints();
        return n;
      },
      // The next two pieces measure what the agent's relay costs: the same reads of the export, the bytes
      // either passed through this process into ssh, or read by ssh itself from the NBD socket (handed to
      // it as stdin after the handshake; this process only writes the requests). No receiver: `dd` in 1 MiB
      // reads, ending at the expected byte count (which the replica's file is checked against).
      'export -> ssh cat (relay)': async () => {
        const p = await pull();
        const { socket, name } = await exportOf();
        const client = await NbdClient.connect({ socketPath: socket, exportName: name });
        const total = mib * MiB;
        const c = spawn('ssh', [...plain.args, plain.target, `dd of=/tmp/seed-split-ref bs=1M iflag=fullblock,count_bytes count=${total} status=none`], { stdio: ['pipe', 'ignore', 'inherit'] });
        const exited = new Promise((r) => c.on('exit', r));
        const inflight: Array<Promise<Buffer>> = [];
        const free: Buffer[] = Array.from({ length: FD_DEPTH + 1 }, () => Buffer.allocUnsafe(FD_READ));
        let at = 0;
        const fill = () => {
          while (inflight.length < FD_DEPTH && at < total && free.length) {
            inflight.push(client.read(at, FD_READ, free.pop()!));
            at += FD_READ;
          }
        };
        fill();
        while (inflight.length) {
          const b = await inflight.shift()!;
          await new Promise((r) => c.stdin.write(b, r));
          free.push(b);
          fill();
        }
        c.stdin.end();
        await exited;
        await client.close();
        await p.end();
        await dropCheckpoints();
        await checkRef(total);
        return total;
      },
      'export fd -> ssh cat': () => exportRepliesToDd(false),
      // The same with a relay process in between (dd, not this process): ssh's stdin stays a pipe this process
      // could also write its own frames into, so one session would carry both (bench/README.md, eleventh pass).
      'export fd -> dd -> ssh cat': () => exportRepliesToDd(true),
      // The same as `export fd -> ssh cat` with a replica side that does the receiver's per-byte work on the
      // NBD replies (bench/lib/nbd-sink.ts): compare with `export -> receiver`.
      'export fd -> nbd sink': async () => {
        const total = mib * MiB;
        const reads = total / FD_READ;
        const direct = receiverArgs.includes('--no-direct-io') ? ' --no-direct-io' : '';
        const { code, said } = await sshReadsExport(total, `${q(process.execPath)} ${q(NBD_SINK)} /tmp/seed-split-ref ${reads} ${FD_READ}${direct}`, `the sink did not get ${reads} replies`);
        if (code !== 0 || Number(said.split(' ')[0]) !== total) throw new Error(`the sink exited ${code} saying ${JSON.stringify(said)}`);
        console.log(`   (the sink's own CPU: ${said.trim().split(' ')[2]} s)`);
        await checkRef(total);
        return total;
      },
      'export -> nowhere': async () => {
        const p = await pull();
        let n = 0;
        for await (const b of p.disks[0]!.stream()) n += b.length;
        await p.end();
        await dropCheckpoints();
        return n;
      },
    };
    /**
     * A pull-mode export's first `total` bytes read by `ssh host REMOTE` itself: ssh gets an NBD connection
     * past its handshake as stdin, this process only writes the read requests. Ends the export afterwards.
     */
    const sshReadsExport = async (total: number, remote: string, why: string, relayBytes?: number): Promise<{ code: number | null; said: string }> => {
      const p = await pull();
      const { socket, name } = await exportOf();
      const sock = net.createConnection({ path: socket });
      const hs = new NbdHandshake(name, []);
      await new Promise<void>((resolve, reject) => {
        sock.on('data', (b: Buffer) => {
          for (const out of hs.push(Buffer.from(b))) sock.write(out);
          if (hs.result) resolve();
        });
        sock.on('error', reject);
      });
      sock.removeAllListeners('data');
      sock.pause();
      if (hs.leftover().length) throw new Error('bytes after the handshake');
      // relayBytes: `dd` reads the socket and writes ssh's stdin pipe (its CPU printed from bash's `times`)
      const c = spawn('ssh', [...plain.args, plain.target, remote], { stdio: [relayBytes === undefined ? sock : 'pipe', 'pipe', 'inherit'] });
      let said = '';
      c.stdout!.on('data', (b: Buffer) => (said += b.toString()));
      const exited = exitWithin(c, FD_TIMEOUT_MS, why);
      if (relayBytes !== undefined) {
        const relay = spawn('bash', ['-c', `dd bs=1M iflag=fullblock,count_bytes count=${relayBytes} status=none; s=$?; times >&2; exit $s`], { stdio: [sock, c.stdin!, 'pipe'] });
        let times = '';
        relay.stderr!.on('data', (b: Buffer) => (times += b.toString()));
        void exitWithin(relay, FD_TIMEOUT_MS, why).then((rc) => {
          c.stdin!.end();
          // `times`: the shell's user/sys, then its children's (dd's)
          const cpu = times.trim().split('\n').pop()!.split(/\s+/).map((t) => { const m = /^(\d+)m([\d.]+)s$/.exec(t); return m ? Number(m[1]) * 60 + Number(m[2]) : 0; });
          console.log(`   (dd relay exited ${rc}, its CPU ${(cpu[0]! + cpu[1]!).toFixed(2)} s)`);
        }, () => c.kill());
      }
      const reads = total / FD_READ;
      sock.write(Buffer.concat(Array.from({ length: reads }, (_, i) => encodeRequest(NBD_CMD_READ, BigInt(i + 1), i * FD_READ, FD_READ))));
      const code = await exited;
      sock.destroy();
      await p.end();
      await dropCheckpoints();
      return { code, said };
    };
    /** The export's NBD replies into `dd` on the replica, read by ssh itself or relayed by a local `dd`. */
    const exportRepliesToDd = async (relayed: boolean): Promise<number> => {
      const total = mib * MiB;
      // every read of this fully allocated range is answered by one OFFSET_DATA chunk: 20 + 8 bytes of header
      const wire = total + (total / FD_READ) * 28;
      // a reply shaped otherwise (split chunks, holes) would leave dd waiting for bytes that never come
      await sshReadsExport(total, `dd of=/tmp/seed-split-ref bs=1M iflag=fullblock,count_bytes count=${wire} status=none`, `the replies were not ${wire} bytes`, relayed ? wire : undefined);
      await checkRef(wire);
      return total;
    };
    const checkRef = async (expected: number) => {
      const got = Number((await sh('stat -c %s /tmp/seed-split-ref')).trim());
      if (got !== expected) throw new Error(`the replica got ${got} bytes, expected ${expected}`);
    };
    const exportOf = async () => {
      const xml = await env.lv.virshOk(['backup-dumpxml', vm.domainName]);
      const ex = parsePullExports(xml);
      return { socket: ex.socket!, name: ex.exports[0]!.exportName };
    };
    const spid = await sshdPid(env);
    // the guest's QEMU serves the pull-mode export (its I/O threads read base.1 for every NBD request)
    const qemuPid = Number((await sh(`pgrep -f ${q(`guest=${vm.domainName},`)} | head -1`)).trim());
    const serverCpu = async () => {
      let recv = 0;
      let sshd = 0;
      for (const p of await descendants(spid, /receive/)) recv += (await procCpu(p))?.self ?? 0;
      for (const p of await descendants(spid, /sshd: /)) sshd += (await procCpu(p))?.self ?? 0;
      return { recv, sshd, qemu: (await procCpu(qemuPid))?.self ?? 0 };
    };
    const results: Record<string, Array<{ sec: number; bytes: number; agent: number; recv: number; qemu: number }>> = {};
    console.log(`load average ${(await sh('cat /proc/loadavg')).trim()}`);
    for (let r = 0; r < REPS; r++) {
      const names = Object.keys(pieces).filter((n) => (ONLY ? ONLY.includes(n) : !n.startsWith('export -> ssh') && !n.startsWith('export fd')));
      if (r % 2) names.reverse();
      for (const name of names) {
        // a fresh connection and an empty replica dir for every piece, the source back in the page cache
        await ctx.replicas.closeAll();
        await sh(`rm -rf ${q(path.join(env.snapsDir, '9'))} /tmp/seed-split-ref`);
        const replica = await deps.replicaFor('127.0.0.1');
        await levelPageCache([base1]);
        const c0 = process.cpuUsage();
        const s0 = await serverCpu();
        const t0 = performance.now();
        const bytes = await pieces[name]!(r, replica);
        const sec = (performance.now() - t0) / 1000;
        const c = process.cpuUsage(c0);
        const s1 = await serverCpu();
        (results[name] ??= []).push({ sec, bytes, agent: (c.user + c.system) / 1e6, recv: s1.recv - s0.recv, qemu: s1.qemu - s0.qemu });
        console.log(`#${r + 1} ${name.padEnd(20)} ${sec.toFixed(2).padStart(6)} s ${(bytes / MiB / sec).toFixed(0).padStart(5)} MB/s   cpu this process ${((c.user + c.system) / 1e6).toFixed(2)} s, receiver ${(s1.recv - s0.recv).toFixed(2)} s, sshd ${(s1.sshd - s0.sshd).toFixed(2)} s, qemu ${(s1.qemu - s0.qemu).toFixed(2)} s`);
      }
    }
    await sh('rm -f /tmp/seed-split-ref');
    console.log(`load average ${(await sh('cat /proc/loadavg')).trim()}`);
    console.log(`\nmedians of ${REPS} (base.1 ${(base1Bytes / MiB).toFixed(0)} MiB):`);
    for (const [name, xs] of Object.entries(results)) {
      const sec = median(xs.map((x) => x.sec));
      console.log(`${name.padEnd(20)} ${sec.toFixed(2).padStart(6)} s ${(xs[0]!.bytes / MiB / sec).toFixed(0).padStart(5)} MB/s   cpu this process ${median(xs.map((x) => x.agent)).toFixed(2)} s, receiver ${median(xs.map((x) => x.recv)).toFixed(2)} s, qemu ${median(xs.map((x) => x.qemu)).toFixed(2)} s`);
    }
    await dropCheckpoints();
    await vm.destroy();
  } finally {
    await ctx.replicas.closeAll();
    await env.stop();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
