/**
 * `onestor-agent probe KIND`: what the OpenNebula probe wrappers run (probes/). Reads monitord's XML
 * from stdin, prints template lines, and always exits 0 (monitord drops the output of every probe of a
 * directory when one exits non-zero). The work is in lib/monitor/run-probe.ts. Kept light: this runs
 * every minute on every host, so it imports nothing that loads pino, zod, ssh2 or fast-xml-parser.
 */
import path from 'node:path';
import type { Flags } from '../flags.js';
import { Exit } from '../exit-codes.js';
import { PROBE_KINDS, runProbe, type ProbeKind, type ProbeOptions } from '../../lib/monitor/run-probe.js';

/** Reads stdin when it is a pipe or file, for at most `ms` (monitord writes the config XML then closes). */
function readStdin(ms: number): Promise<string> {
  if (process.stdin.isTTY) return Promise.resolve('');
  return new Promise((resolve) => {
    let buf = '';
    const done = (): void => {
      clearTimeout(timer);
      process.stdin.removeAllListeners();
      process.stdin.destroy();
      resolve(buf);
    };
    const timer = setTimeout(done, ms);
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', (c: string) => {
      if (buf.length < 1024 * 1024) buf += c;
    });
    process.stdin.on('end', done);
    process.stdin.on('error', done);
  });
}

/** Flags and environment -> probe options (pure). */
export function probeOptions(f: Flags, env: NodeJS.ProcessEnv = process.env): ProbeOptions {
  const opts: ProbeOptions = {};
  const stateFile = f.state ?? env.ONESTOR_STATE_FILE ?? (f['state-dir'] ? path.join(f['state-dir'], 'state.json') : undefined);
  if (stateFile) opts.stateFile = stateFile;
  if (f.datastores) opts.datastoreLocation = f.datastores;
  if (f['deadline-ms'] && /^\d+$/.test(f['deadline-ms'])) opts.deadlineMs = Number(f['deadline-ms']);
  const prom = f.prometheus ?? env.ONESTOR_PROMETHEUS_FILE;
  if (prom) opts.prometheusFile = prom;
  return opts;
}

export async function run(f: Flags, positionals: string[]): Promise<number> {
  const kind = positionals[0] as ProbeKind;
  let out = '';
  if (!PROBE_KINDS.includes(kind)) {
    process.stderr.write(`onestor-agent probe: unknown kind ${JSON.stringify(positionals[0] ?? '')} (expected ${PROBE_KINDS.join(', ')})\n`);
  } else {
    const r = await runProbe(kind, { ...probeOptions(f), stdinXml: await readStdin(300) });
    for (const e of r.errors) process.stderr.write(`onestor-agent probe ${kind}: ${e}\n`);
    // end with a newline: monitord concatenates the outputs of all probes of a directory
    out = r.lines.length ? `${r.lines.join('\n')}\n` : '';
  }
  await new Promise<void>((resolve) => process.stdout.write(out, () => resolve()));
  // exit now: a child abandoned at the deadline (hung filesystem) must not keep us alive
  process.exit(Exit.OK);
}
