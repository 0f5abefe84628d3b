/**
 * `onestor-agent run`: the daemon. Wiring only — the loop is lib/daemon/loop.ts; this file gives it the
 * real adapters (discovery, the cycle, the state file, the Prometheus textfile, config reload). The
 * cycle's modules (and ssh2 with them) load at the first cycle, not at start: an idle daemon does not
 * carry them.
 */
import { rename, rm, writeFile } from 'node:fs/promises';
import type { Logger } from 'pino';
import { overridesFrom, type Flags } from '../flags.js';
import { buildContext, runningDomains, VERSION } from '../context.js';
import { startDaemon } from '../../lib/daemon/loop.js';
import { discover } from '../../lib/discover/discover.js';
import { loadConfig } from '../../lib/config/config.js';

/** Atomic replace (temp in the same dir + rename): a scrape never sees a half-written file. */
async function writeTextfile(file: string, text: string): Promise<void> {
  const tmp = `${file}.tmp-${process.pid}`;
  try {
    await writeFile(tmp, text, { mode: 0o644 });
    await rename(tmp, file);
  } catch (e) {
    await rm(tmp, { force: true });
    throw e;
  }
}

export async function run(f: Flags, _pos: string[], log: Logger): Promise<number> {
  const overrides = overridesFrom(f);
  const ctx = await buildContext({ configFile: f.config, overrides, log });
  const discoverNow = async () => discover({ datastoreLocation: ctx.config.datastoreLocation, runningDomains: await runningDomains(ctx.virsh) });
  const textfile = ctx.config.prometheusTextfile;
  try {
    const handle = startDaemon({
      config: ctx.config,
      log,
      handleSignals: true,
      deps: {
        state: ctx.state,
        hostName: ctx.hostName,
        version: VERSION,
        discover: discoverNow,
        runCycle: async (req, signal) => {
          const { runVmCycle } = await import('../../lib/cycle/cycle.js');
          return runVmCycle(await ctx.cycleDeps(), { ...req, signal });
        },
        reloadConfig: () =>
          loadConfig({ file: f.config, overrides: overrides as never }).then((c) => {
            log.level = c.log.level; // SIGHUP applies a changed log.level too
            return c;
          }),
        rebuildState: async () => {
          const { rebuildFromReplicas } = await import('../../lib/cycle/rebuild.js');
          const found = await discoverNow();
          return rebuildFromReplicas({ eligible: found.eligible, replicaFor: (h) => ctx.replicas.get(h), state: ctx.state, log });
        },
        // the textfile follows every state write (heartbeat and cycle ends), from the daemon's memory
        ...(textfile ? { writeMetrics: (text: string) => writeTextfile(textfile, text) } : {}),
      },
    });
    await handle.done;
    return 0;
  } finally {
    await ctx.replicas.closeAll();
  }
}
