/** `onestor-agent snapshot --vm ID [--disk N] [--full]`: one cycle now, outcome printed, exit code. */
import type { Logger } from 'pino';
import { buildContext, runningDomains } from '../context.js';
import { Exit } from '../exit-codes.js';
import { overridesFrom, type Flags } from '../flags.js';
import { discover } from '../../lib/discover/discover.js';
import { runVmCycle, type DiskOutcome } from '../../lib/cycle/cycle.js';
import { OnestorError, ErrorCodes } from '../../lib/shared/errors.js';
import { humanBytes } from '../../lib/monitor/status.js';

export async function run(f: Flags, _pos: string[], log: Logger): Promise<number> {
  if (f.vm === undefined || !/^\d+$/.test(f.vm)) throw new OnestorError(ErrorCodes.CONFIG, '--vm ID (numeric) is required', { field: '--vm' });
  if (f.disk !== undefined && !/^\d+$/.test(f.disk)) throw new OnestorError(ErrorCodes.CONFIG, '--disk must be numeric', { field: '--disk' });
  const vmId = Number(f.vm);
  const diskId = f.disk === undefined ? undefined : Number(f.disk);
  const ac = new AbortController();
  const onSignal = () => ac.abort();
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const ctx = await buildContext({ configFile: f.config, overrides: overridesFrom(f), log, signal: ac.signal });
  try {
    const running = await runningDomains(ctx.virsh);
    const found = await discover({ datastoreLocation: ctx.config.datastoreLocation, runningDomains: running });
    const disks = found.eligible.filter((d) => d.vmId === vmId && (diskId === undefined || d.diskId === diskId));
    if (disks.length === 0) {
      const why = found.ineligible.filter((i) => i.vmId === vmId && (diskId === undefined || i.diskId === undefined || i.diskId === diskId));
      const lines = why.length ? why.map((i) => `  ${i.diskId === undefined ? 'vm' : `disk ${i.diskId}`}: ${i.reason}`) : [`  no VM ${vmId} in any ssh system datastore under ${ctx.config.datastoreLocation}`];
      process.stderr.write(`nothing to snapshot for VM ${vmId}${diskId === undefined ? '' : ` disk ${diskId}`}:\n${lines.join('\n')}\n`);
      return Exit.FAILED;
    }
    const tty = process.stderr.isTTY && !f.json;
    let lastDraw = 0;
    const outcomes = await runVmCycle(await ctx.cycleDeps(), {
      vmId,
      domainName: disks[0]!.domainName,
      dsDir: disks[0]!.dsDir,
      disks,
      forceFull: Boolean(f.full),
      signal: ac.signal,
      onProgress: tty
        ? (d, sent, total) => {
            const t = Date.now();
            if (t - lastDraw < 200 && sent < total) return;
            lastDraw = t;
            const pct = total > 0 ? Math.floor((100 * sent) / total) : 100;
            process.stderr.write(`\r  disk ${d}: ${humanBytes(sent)} / ${humanBytes(total)} (${pct}%)   `);
            if (sent >= total) process.stderr.write('\n');
          }
        : undefined,
    });
    if (f.json) process.stdout.write(JSON.stringify(outcomes, null, 2) + '\n');
    else process.stdout.write(outcomes.map(describeOutcome).join('\n') + '\n');
    if (ac.signal.aborted) return Exit.INTERRUPTED;
    return outcomes.every((o) => o.ok) ? Exit.OK : Exit.FAILED;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await ctx.replicas.closeAll();
  }
}

export function describeOutcome(o: DiskOutcome): string {
  if (!o.ok) return `vm ${o.vmId} disk ${o.diskId}: FAILED ${o.error?.message ?? ''}`;
  return `vm ${o.vmId} disk ${o.diskId}: ${o.mode} snapshot published, ${humanBytes(o.bytes ?? 0)} sent in ${((o.durationMs ?? 0) / 1000).toFixed(1)} s, ${o.consistency}, checkpoint ${o.checkpoint}${o.reason && (o.mode === 'full' || o.reason !== 'lineage intact') ? ` (${o.reason})` : ''}`;
}
