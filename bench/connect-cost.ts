/**
 * What a cold replica connection costs, piece by piece, on an idle machine (a seed's start waits for it):
 *   ssh true          OpenSSH session running `true` (the SSH floor: key exchange, auth, sshd's session);
 *   ssh + receiver    the agent's connection: ssh, the receiver's start and its hello answer;
 *   + status          the same and the status of one VM (what a cycle's plan waits for).
 * Usage: npm run build && node dist/bench/connect-cost.js [reps=5]
 */
import { spawn } from 'node:child_process';
import { pino } from 'pino';
import { buildContext } from '../agent/context.js';
import { startAgentEnv } from '../dev/agent-env.js';
import { plainSshAccess } from './lib/cluster.js';
import { median } from './lib/stats.js';

const REPS = Number(process.argv[2] ?? 5);

async function main(): Promise<void> {
  const env = await startAgentEnv({ name: 'connect-cost' });
  const ctx = await buildContext({ log: pino({ level: 'warn' }), overrides: env.contextOverrides() });
  try {
    const plain = await plainSshAccess(env);
    const times: Record<string, number[]> = { 'ssh true': [], 'ssh + receiver hello': [], 'ssh + receiver hello + status': [] };
    for (let r = 0; r < REPS; r++) {
      let t0 = performance.now();
      await new Promise<void>((resolve, reject) => {
        const c = spawn('ssh', [...plain.args, plain.target, 'true'], { stdio: 'ignore' });
        c.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`ssh true exited ${code}`))));
      });
      times['ssh true']!.push(performance.now() - t0);
      await ctx.replicas.closeAll();
      t0 = performance.now();
      const rep = await ctx.replicas.get('127.0.0.1');
      times['ssh + receiver hello']!.push(performance.now() - t0);
      await rep.status(1);
      times['ssh + receiver hello + status']!.push(performance.now() - t0);
      await ctx.replicas.closeAll();
    }
    console.log(`\nCold connection to the replica on 127.0.0.1, median (min-max) of ${REPS}, ms\n`);
    for (const [k, v] of Object.entries(times)) console.log(`${k.padEnd(32)} ${median(v).toFixed(0).padStart(6)} (${Math.min(...v).toFixed(0)}-${Math.max(...v).toFixed(0)})`);
  } finally {
    await ctx.replicas.closeAll().catch(() => {});
    await env.stop();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
