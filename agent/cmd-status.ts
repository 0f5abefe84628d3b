/** `onestor-agent status` and `list`: read-only views an admin (or a check script) runs any time. */
import type { Logger } from 'pino';
import { Exit } from './exit-codes.js';
import { overridesFrom, type Flags } from './flags.js';
import { loadConfig } from '../lib/config/config.js';
import { discover } from '../lib/discover/discover.js';
import { Virsh } from '../lib/libvirt/virsh.js';
import { StateStore } from '../lib/cycle/state.js';
import { buildStatus, renderStatusTable } from '../lib/monitor/status.js';
import { describeError } from '../lib/shared/errors.js';

async function setup(f: Flags, log: Logger) {
  const config = await loadConfig({ file: f.config, overrides: overridesFrom(f) as never });
  let running: Set<string> | null = null;
  try {
    const list = await new Virsh({ uri: config.libvirtUri, virshPath: config.virsh, timeoutMs: 10_000 }).listDomains();
    running = new Set(list.filter((d) => d.state === 'running').map((d) => d.name));
  } catch (e) {
    log.warn({ err: describeError(e) }, 'libvirt unreachable; domain states unknown');
  }
  const found = await discover({ datastoreLocation: config.datastoreLocation, runningDomains: running });
  return { config, found };
}

export async function runStatus(f: Flags, _pos: string[], log: Logger): Promise<number> {
  const { config, found } = await setup(f, log);
  const store = new StateStore(config.stateDir);
  const loaded = await store.loadOrReadOnly();
  if (loaded.error) log.warn({ file: store.file }, `state unreadable: ${loaded.error}`);
  const now = Math.floor(Date.now() / 1000);
  const report = buildStatus({
    now,
    state: loaded.state,
    eligible: found.eligible,
    ineligible: found.ineligible,
    graceMinSec: config.schedule.graceMinSec,
    gracePercent: config.schedule.gracePercent,
    heartbeatMaxAgeSec: Math.max(120, 3 * config.schedule.rescanSec),
  });
  if (f.json) process.stdout.write(JSON.stringify(report, null, 2) + '\n');
  else process.stdout.write(renderStatusTable(report, now));
  if (report.protectedDisks > 0 && !report.daemon.alive) return Exit.DAEMON_DOWN;
  return report.rows.some((r) => r.overdue || r.health === 'failing') ? Exit.NOT_PROTECTED : Exit.OK;
}

export async function runList(f: Flags, _pos: string[], log: Logger): Promise<number> {
  const { found } = await setup(f, log);
  if (f.json) {
    process.stdout.write(JSON.stringify({ eligible: found.eligible, ineligible: found.ineligible }, null, 2) + '\n');
    return Exit.OK;
  }
  const out: string[] = [];
  for (const d of found.eligible) out.push(`protected      vm ${d.vmId} disk ${d.diskId}  every ${d.freqSeconds}s -> ${d.replicaHost}  (${d.domainName}, ${d.base1Path})`);
  for (const i of found.ineligible) out.push(`${i.protectionRequested ? 'NOT ELIGIBLE ' : 'not protected'}  vm ${i.vmId}${i.diskId === undefined ? '' : ` disk ${i.diskId}`}  ${i.reason}`);
  process.stdout.write((out.length ? out.join('\n') : 'no disks found') + '\n');
  return Exit.OK;
}
