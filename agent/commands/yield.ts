/**
 * `onestor-agent yield --vm ID [--seconds N]`: let a live migration of the VM through (issue 13).
 *
 * Run on the VM's current (source) host, by the front-end's migration hook or by hand, before or while
 * OpenNebula migrates the VM. It writes a yield marker (lib/cycle/migration.ts) that holds new cycles of the
 * VM off until the domain has left this host (or N seconds pass, default 600), and makes sure no backup job
 * of ours holds the domain's job lock: a running capture sees the marker and aborts its job itself within
 * a poll (~50 ms); if it does not (a hung agent), the job is aborted here. Exit 0 once no job of ours runs.
 *
 * With `--to HOST` (the hook passes the destination of the migration) it then releases the lineage of each of
 * the VM's disks this host owns on the replica to HOST (lib/cycle/release.ts): HOST's next cycle continues it
 * with an incremental (a hand-over) instead of a full (a take-over). After the job is gone, so the release
 * never delays the migration; a release that fails only costs the destination a full (exit stays 0).
 */
import type { Logger } from 'pino';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { buildContext, runningDomains } from '../context.js';
import { Exit } from '../exit-codes.js';
import { overridesFrom, type Flags } from '../flags.js';
import { discover } from '../../lib/discover/discover.js';
import { writeYieldMarker } from '../../lib/cycle/migration.js';
import { releaseVmDisks } from '../../lib/cycle/release.js';
import { isReleaseRecipient } from '../../lib/shared/release.js';
import { OnestorError, ErrorCodes, describeError } from '../../lib/shared/errors.js';

const DEFAULT_SECONDS = 600;

export async function run(f: Flags, _pos: string[], log: Logger): Promise<number> {
  if (f.vm === undefined || !/^\d+$/.test(f.vm)) throw new OnestorError(ErrorCodes.CONFIG, '--vm ID (numeric) is required', { field: '--vm' });
  if (f.seconds !== undefined && !/^\d+$/.test(f.seconds)) throw new OnestorError(ErrorCodes.CONFIG, '--seconds must be a number of seconds', { field: '--seconds' });
  if (f.to !== undefined && !isReleaseRecipient(f.to)) throw new OnestorError(ErrorCodes.CONFIG, `--to must be a host name, got ${JSON.stringify(String(f.to).slice(0, 80))}`, { field: '--to' });
  const vmId = Number(f.vm);
  const seconds = f.seconds === undefined ? DEFAULT_SECONDS : Number(f.seconds);
  const ctx = await buildContext({ configFile: f.config, overrides: overridesFrom(f), log });
  try {
    const running = await runningDomains(ctx.virsh);
    const found = await discover({ datastoreLocation: ctx.config.datastoreLocation, runningDomains: running });
    const domain = found.eligible.find((d) => d.vmId === vmId)?.domainName ?? `one-${vmId}`;
    let domainId: number | null = null;
    try {
      domainId = await ctx.virsh.domainId(domain, { vm: vmId });
    } catch {
      domainId = null;
    }
    if (domainId === null) {
      process.stdout.write(`VM ${vmId}: domain ${domain} does not run on this host; nothing to yield\n`);
      // a late hook (the migration already done): the lineage is still ours until someone publishes
      await release();
      return Exit.OK;
    }
    const now = Math.floor(Date.now() / 1000);
    const reason = process.env.ONESTOR_YIELD_REASON?.slice(0, 200) || 'onestor-agent yield';
    const file = await writeYieldMarker(ctx.config.stateDir, { vmId, until: now + seconds, domainId, domainName: domain, setAt: now, reason });
    log.warn({ vm: vmId, domain, seconds, file, reason }, 'yield: cycles of this VM held off for a live migration');

    // Our jobs write into DS/<staging>/VMID/; anyone else's (OpenNebula's own backups) is not ours to stop.
    const ours = (t: string) => t.split(path.sep).join('/').includes(`/${ctx.config.stagingDirName}/${vmId}/`);
    const t0 = Date.now();
    let aborted = false;
    let foreign: string[] = [];
    // Watch a little longer than the capture's own poll, to catch a job that started just before the marker.
    while (Date.now() - t0 < 3000 || (await ctx.libvirt.jobActive(domain).catch(() => false))) {
      const targets = await ctx.virsh.backupTargets(domain).catch(() => [] as string[]);
      const active = await ctx.libvirt.jobActive(domain).catch(() => false);
      if (active && targets.length > 0 && targets.every(ours)) {
        // give the capture ~1 s to abort and clean up by itself, then do it here
        if (Date.now() - t0 > 1000 && !aborted) {
          await ctx.virsh.domJobAbort(domain, { vm: vmId }).catch((e) => log.warn({ err: describeError(e) }, 'domjobabort failed'));
          aborted = true;
          log.warn({ vm: vmId, targets: targets.join(',') }, 'yield: backup job aborted');
        }
      } else if (active) {
        foreign = targets;
        if (Date.now() - t0 >= 3000) break; // not ours (or not a backup): nothing more to do here
      }
      if (Date.now() - t0 > 15_000) {
        process.stderr.write(`VM ${vmId}: a job still runs on ${domain} after 15 s\n`);
        return Exit.FAILED;
      }
      await sleep(100);
    }
    const note = foreign.length ? `; a job that is not ours runs (${foreign.join(', ')})` : '';
    process.stdout.write(`VM ${vmId}: yielding until the domain leaves this host or for ${seconds} s; no backup job of ours runs${aborted ? ' (aborted one)' : ''}${note}\n`);
    await release();
    return Exit.OK;

    async function release(): Promise<void> {
      const to = f.to;
      if (to === undefined) return;
      const disks = found.eligible.filter((d) => d.vmId === vmId);
      if (disks.length === 0) process.stdout.write(`VM ${vmId}: no protected disk here; no lineage to release\n`);
      const outcomes = await releaseVmDisks({ vmId, disks, to, replicaFor: (h) => ctx.replicas.get(h), log });
      for (const o of outcomes) process.stdout.write(`VM ${vmId} disk ${o.diskId}: ${o.released ? o.note : `not released (${o.note}); ${to} will take a full`}\n`);
    }
  } finally {
    await ctx.replicas.closeAll();
  }
}
