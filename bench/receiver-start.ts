/**
 * How long a replica connection waits for the receiver: spawn of `onestor-agent receive` to the reply of
 * its hello, as sshd starts it for every connection (without the SSH part, which is the same either way).
 *   A. the built entry: dist/agent/main.js -> receive-cli.cjs, one file (dev/bundle-receive.ts) compiled from
 *      its code cache (lib/shared/script-bundle.ts);
 *   B. the same bundle compiled from source (no code cache);
 *   C. the same command through the unbundled command table (dist/agent/cli.js, tsc's output of every module).
 * Rotating order, a throwaway SNAPS dir, a quiet machine wanted.
 * Usage: npm run build && node dist/bench/receiver-start.js [reps=15]
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { agentMain } from '../dev/agent-env.js';
import { encodeControl, FrameDecoder, PROTOCOL_VERSION } from '../lib/protocol/protocol.js';
import { median, medianSpread, table } from './lib/stats.js';

const REPS = Number(process.argv[2] ?? 15);
const cliModule = path.join(path.dirname(agentMain()), 'cli.js');
const bundle = path.join(path.dirname(agentMain()), 'receive-cli.cjs');
const loader = path.join(path.dirname(agentMain()), '..', 'lib', 'shared', 'script-bundle.js');

/** ms from spawn to the hello's reply */
function helloMs(args: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(process.execPath, args, { stdio: ['pipe', 'pipe', 'ignore'] });
    const decoder = new FrameDecoder();
    let answeredMs: number | null = null;
    child.stdout.on('data', (chunk: Buffer) => {
      if (answeredMs === null && decoder.push(chunk).some((f) => f.type === 'control')) {
        answeredMs = performance.now() - t0;
        child.stdin.end();
      }
    });
    child.once('error', reject);
    // the next run starts once this receiver is gone
    child.once('exit', (code) => (answeredMs === null ? reject(new Error(`receiver exited (${code}) before answering hello`)) : resolve(answeredMs)));
    child.stdin.write(encodeControl({ type: 'hello', protocol: PROTOCOL_VERSION, agentVersion: 'bench', host: 'bench' }));
  });
}

const snaps = await mkdtemp(path.join(os.tmpdir(), 'onestor-bench-rx-'));
try {
  const flags = ['receive', '--snaps-dir', snaps, '--allow-unidentified', '--log-level', 'error'];
  const methods: [string, string[]][] = [
    ['built entry (bundle + code cache)', [agentMain(), ...flags]],
    [
      'bundle, compiled from source',
      ['--input-type=module', '-e', `import(${JSON.stringify(loader)}).then((l) => l.loadScriptBundle(${JSON.stringify(bundle)}, { codeCache: false }).exports.runCli(${JSON.stringify(flags)})).then((code) => { process.exitCode = code; })`],
    ],
    ['unbundled command table', ['--input-type=module', '-e', `import(${JSON.stringify(cliModule)}).then((c) => c.runCli(${JSON.stringify(flags)})).then((code) => { process.exitCode = code; })`]],
  ];
  const samples = methods.map(() => [] as number[]);
  for (const [, args] of methods) await helloMs(args); // warm the page cache for all
  for (let i = 0; i < REPS; i++) {
    for (let k = 0; k < methods.length; k++) {
      const m = (i + k) % methods.length;
      samples[m]!.push(await helloMs(methods[m]![1]));
    }
  }
  const ref = median(samples[methods.length - 1]!);
  process.stdout.write(`Receiver start to hello reply, ${REPS} runs each, load ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}\n\n`);
  process.stdout.write(
    table(
      ['entry', 'ms, median (min-max)', 'vs unbundled'],
      methods.map(([name], m) => [name, medianSpread(samples[m]!, 0), `${(median(samples[m]!) / ref).toFixed(2)}x`]),
    ) + '\n',
  );
} finally {
  await rm(snaps, { recursive: true, force: true });
}
