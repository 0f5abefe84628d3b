/** `onestor-agent list`: discovery only — which disks are protected, which are not and why. */
import type { Logger } from 'pino';
import { Exit } from '../exit-codes.js';
import { overridesFrom, type Flags } from '../flags.js';
import { loadConfig } from '../../lib/config/config.js';
import { discover } from '../../lib/discover/discover.js';
import { Virsh } from '../../lib/libvirt/virsh.js';
import { describeError } from '../../lib/shared/errors.js';

/** Config + discovery on this host; libvirt unreachable only makes domain states unknown. */
export async function discoverHere(f: Flags, log: Logger) {
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

export async function run(f: Flags, _pos: string[], log: Logger): Promise<number> {
  const { found } = await discoverHere(f, log);
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
