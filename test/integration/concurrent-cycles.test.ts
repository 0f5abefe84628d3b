/**
 * Cycles of several VMs at once on one replica, as the daemon runs them (limits.concurrency, default 2):
 * the production wiring (buildContext's cycle ports and replica pool) against real libvirtd, QEMU and sshd.
 * A receiver session serves one request and one open disk at a time, so each cycle must get a session of
 * its own; before the pool leased them, the second cycle failed with "concurrent requests on one receiver
 * connection".
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { buildContext, type AgentContext } from '../../agent/context.js';
import { discover } from '../../lib/discover/discover.js';
import { runVmCycle } from '../../lib/cycle/cycle.js';
import { startAgentEnv, type AgentEnv } from '../../dev/agent-env.js';
import type { OneVm } from '../../dev/one-layout.js';
import { guestViewSha256, sha256File } from '../../dev/guest.js';
import { recoverDrill } from '../../dev/recover.js';

let env: AgentEnv;
let ctx: AgentContext;
const vms: OneVm[] = [];

beforeAll(async () => {
  env = await startAgentEnv({ name: 'conc' });
  ctx = await buildContext({
    log: pino({ level: 'silent' }),
    overrides: env.contextOverrides(),
  });
  for (const [i, vmId] of [71, 72, 73].entries()) {
    vms.push(await env.createVm({ vmId, disks: [{ diskId: 0, sizeMiB: 32, freq: 60, baseData: [{ offsetMiB: i, lengthMiB: 4, pattern: 0x21 + i }] }] }));
  }
}, 120_000);

afterAll(async () => {
  await ctx?.replicas.closeAll();
  for (const vm of vms) await vm.destroy().catch(() => {});
  await env?.stop();
});

describe('several VMs at once on one replica', () => {
  it('each cycle gets a receiver session of its own: all succeed, twice (sessions reused), and recover to their instant', async () => {
    const found = await discover({ datastoreLocation: env.dsRoot });
    const deps = await ctx.cycleDeps();
    const cycle = (vm: OneVm) => {
      const disks = found.eligible.filter((d) => d.vmId === vm.vmId);
      return runVmCycle(deps, { vmId: vm.vmId, domainName: disks[0]!.domainName, dsDir: disks[0]!.dsDir, disks });
    };
    for (const round of ['full', 'incremental'] as const) {
      const outcomes = (await Promise.all(vms.map(cycle))).flat();
      expect(outcomes.map((o) => (o.ok ? `${o.vmId} ${o.mode}` : `${o.vmId} ${o.error?.message}`))).toEqual(vms.map((v) => `${v.vmId} ${round}`));
    }
    for (const vm of vms) {
      const drill = await recoverDrill(env.snapsDir, vm.vmId, 0, env.root);
      expect(await sha256File(drill.rawPath)).toBe(await guestViewSha256(vm.disks[0]!.base1Path, env.root));
    }
  }, 180_000);
});
