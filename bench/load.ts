/**
 * Load: N "hosts" (agent instances, each with its own state dir) push a seed and then an incremental at
 * once to one replica whose receiver allows fewer sessions than N. All must complete, every drill must
 * equal its point in time, and the queue must be visible: more receivers connected than slots held.
 * Usage (after `npm run build`): node dist/bench/load.js [hosts=16] [maxSessions=4] [mbps=32]
 */
import { readdirSync, readFileSync, statfsSync } from 'node:fs';
import path from 'node:path';
import { startAgentEnv } from '../dev/agent-env.js';
import type { OneVm } from '../dev/one-layout.js';
import { guestWrite } from '../dev/guest.js';
import { drillSum, liveReference, spawnAgent, throttleConfig, withFlag } from './soak.js';

const hosts = Number(process.argv[2] ?? 16);
const maxSessions = Number(process.argv[3] ?? 4);
const mbps = Number(process.argv[4] ?? 32);

function procs(): Array<{ pid: string; ppid: string; cmd: string[] }> {
  const out = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const cmd = readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0');
      const ppid = readFileSync(`/proc/${d}/stat`, 'utf8').replace(/^.*\) /, '').split(' ')[1]!;
      out.push({ pid: d, ppid, cmd });
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

async function main(): Promise<void> {
  const env = await startAgentEnv({ name: 'load', receiverArgs: ['--max-sessions', String(maxSessions)] });
  const vms: OneVm[] = [];
  let failures = 0;
  try {
    const cfg = await throttleConfig(env.root, mbps);
    for (let i = 0; i < hosts; i++) {
      vms.push(await env.createVm({ vmId: 500 + i, disks: [{ diskId: 0, sizeMiB: 64, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 16, pattern: 1 + i }] }] }));
    }
    const slots = path.join(env.snapsDir, '.onestor', 'slots');
    for (const round of ['seed', 'incremental']) {
      if (round === 'incremental') for (const [i, v] of vms.entries()) await guestWrite(env.lv, v.domainName, { offsetMiB: 20, lengthMiB: 8, pattern: 100 + i });
      const refs = await Promise.all(vms.map((v) => liveReference(env, v)));
      let maxReceivers = 0;
      let maxHeld = 0;
      let maxUsedPct = 0;
      const t0 = Date.now();
      const ps = vms.map((v, i) => spawnAgent(['snapshot', '--vm', String(v.vmId), '--json'], [...withFlag(env.flags, '--state-dir', path.join(env.root, `state-${i}`)), '--config', cfg]));
      let running = true;
      const all = Promise.all(ps.map((p) => p.exited)).then((r) => ((running = false), r));
      while (running) {
        const list = procs();
        const parents = new Set(list.map((p) => p.ppid));
        maxReceivers = Math.max(maxReceivers, list.filter((p) => p.cmd.includes('receive') && p.cmd.includes(env.snapsDir)).length);
        maxHeld = Math.max(maxHeld, list.filter((p) => p.cmd[0] === 'flock' && p.cmd.some((a) => a.startsWith(path.join(slots, 'slot.'))) && parents.has(p.pid)).length);
        const fs = statfsSync(env.snapsDir);
        maxUsedPct = Math.max(maxUsedPct, (100 * (Number(fs.blocks) - Number(fs.bfree))) / Number(fs.blocks));
        await new Promise((r) => setTimeout(r, 50));
      }
      const exits = await all;
      const secs = (Date.now() - t0) / 1000;
      let ok = 0;
      for (const [i, ex] of exits.entries()) {
        const drill = await drillSum(env, vms[i]!.vmId);
        if (ex.code === 0 && drill.sum === refs[i]) ok++;
        else {
          failures++;
          process.stderr.write(`vm ${vms[i]!.vmId}: exit ${ex.code} drill ${drill.sum === refs[i] ? 'ok' : 'MISMATCH'} ${ps[i]!.stdout().slice(0, 300)}\n`);
        }
      }
      process.stdout.write(`${round}: ${hosts} hosts, --max-sessions ${maxSessions}, ${mbps} MB/s each: ${ok}/${hosts} ok in ${secs.toFixed(1)} s; receivers connected at once max ${maxReceivers}, sessions held at once max ${maxHeld}, SNAPS fs used max ${maxUsedPct.toFixed(1)} %\n`);
      if (maxHeld > maxSessions) {
        failures++;
        process.stdout.write(`  session cap exceeded: ${maxHeld} > ${maxSessions}\n`);
      }
    }
  } finally {
    for (const v of vms) await v.destroy().catch(() => {});
    await env.stop();
  }
  process.exitCode = failures ? 1 : 0;
}

main().catch((e) => {
  process.stderr.write(`load failed: ${(e as Error).stack ?? e}\n`);
  process.exitCode = 2;
});
