/**
 * End to end against real daemons: private libvirtd + QEMU, VMs in the OpenNebula layout, the replica
 * behind a real sshd with the restricted key, the agent CLI as a separate process. The reference for
 * each point in time is made here, by test code (qemu-img convert -U of the live chain), never by the agent.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { readFile, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { startAgentEnv, type AgentEnv } from '../../dev/agent-env.js';
import type { OneVm } from '../../dev/one-layout.js';
import { guestWrite, guestFlush, guestViewSha256, sha256File } from '../../dev/guest.js';
import { recoverDrill } from '../../dev/recover.js';
import { run } from '../../lib/shared/exec.js';
import { freezeMarkerPath } from '../../lib/cycle/capture.js';
import { DEFAULT_STAGING_DIR_NAME } from '../../lib/shared/defaults.js';

let env: AgentEnv;
let vm: OneVm;

beforeAll(async () => {
  env = await startAgentEnv({ name: 'e2e' });
  vm = await env.createVm({
    vmId: 42,
    disks: [
      { diskId: 0, sizeMiB: 64, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 8, pattern: 0x11 }] },
      { diskId: 1, sizeMiB: 32, freq: 60, baseData: [{ offsetMiB: 4, lengthMiB: 4, pattern: 0x12 }] },
      { diskId: 2, sizeMiB: 16 },
    ],
  });
});

afterAll(async () => {
  await vm?.destroy().catch(() => {});
  await env?.stop();
});

async function chainFacts() {
  const xml = await env.lv.virshOk(['dumpxml', vm.domainName]);
  const disks = xml.match(/<disk[\s\S]*?<\/disk>/g) ?? [];
  const blk = await env.lv.virshOk(['domblklist', vm.domainName, '--details']);
  const baseSums = await Promise.all(vm.disks.map((d) => sha256File(d.basePath)));
  const ck = await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name']);
  return { disks, blk, baseSums, checkpoints: ck.trim().split('\n').filter(Boolean) };
}

const reference = (diskIndex: number, _tag: string): Promise<string> => guestViewSha256(vm.disks[diskIndex]!.base1Path, env.root);

describe('snapshot: full cycle, recover drill, chain untouched', () => {
  it('protects both marked disks; the recovered disks equal the point in time, not the live disk', async () => {
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 16, lengthMiB: 4, pattern: 0x22 });
    await guestWrite(env.lv, vm.domainName, { target: 'vdb', offsetMiB: 0, lengthMiB: 2, pattern: 0x23 });
    await guestFlush(env.lv, vm.domainName, 'vda');
    await guestFlush(env.lv, vm.domainName, 'vdb');
    const ref0 = await reference(0, 'a');
    const ref1 = await reference(1, 'a');
    const before = await chainFacts();

    const r = await env.agent(['snapshot', '--vm', '42']);
    expect(r.stderr + r.stdout).toMatch(/vm 42 disk 0: full snapshot published/);
    expect(r.stdout).toMatch(/vm 42 disk 1: full snapshot published/);
    expect(r.code).toBe(0);

    // The guest moves on after the point in time.
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 16, lengthMiB: 4, pattern: 0x33 });
    await guestFlush(env.lv, vm.domainName, 'vda');
    const live0 = await reference(0, 'live');
    expect(live0).not.toBe(ref0);

    for (const [i, ref] of [[0, ref0], [1, ref1]] as const) {
      const drill = await recoverDrill(env.snapsDir, 42, i, env.root);
      expect(drill.backingName).toBe(`disk.${i}.snap/base`);
      expect(drill.check.ok, drill.check.raw).toBe(true);
      expect(await sha256File(drill.rawPath)).toBe(ref);
      await rm(drill.dir, { recursive: true, force: true });
    }
    // The unprotected disk was not sent.
    await expect(readFile(path.join(env.snapsDir, '42', 'disk.2.snap', 'base'))).rejects.toThrow();
    // Nothing but the backing chain inside disk.N.snap/ (recovery tars the whole directory).
    const ls = await run('ls', ['-A', path.join(env.snapsDir, '42', 'disk.0.snap')]);
    expect(ls.stdout.trim().split('\n').sort()).toEqual(['base', 'base.1', 'disk.0.snap']);

    const after = await chainFacts();
    expect(after.disks).toEqual(before.disks);
    expect(after.blk).toBe(before.blk);
    expect(after.baseSums).toEqual(before.baseSums);
    // One rolling checkpoint of ours, nothing half-made, no job left.
    expect(after.checkpoints.filter((c) => c.startsWith('onestor-'))).toHaveLength(1);
    expect((await env.lv.virshOk(['domjobinfo', vm.domainName])).trim()).toMatch(/Job type:\s+None/);
  });

  it('a recovered disk boots as a new domain', async () => {
    const drill = await recoverDrill(env.snapsDir, 42, 0, env.root);
    const name = `recovered-${process.pid}`;
    const xml = `<domain type='${env.lv.domainType}'><name>${name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
      <os><type arch='x86_64' machine='pc'>hvm</type></os><devices><memballoon model='none'/>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${drill.base1Path}'/><target dev='vda' bus='virtio'/></disk>
      </devices></domain>`;
    const f = path.join(drill.dir, 'domain.xml');
    await import('node:fs/promises').then((m) => m.writeFile(f, xml));
    await env.lv.virshOk(['create', f]);
    try {
      expect(await env.lv.virshOk(['domstate', name])).toMatch(/running/);
      const blk = await env.lv.virshOk(['domblklist', name]);
      expect(blk).toContain(drill.base1Path);
    } finally {
      await env.lv.virsh(['destroy', name]);
      await rm(drill.dir, { recursive: true, force: true });
    }
  });

  it('a guest-agent channel without an agent: crash-consistent, said so in state, nothing left frozen', async () => {
    const gvm = await env.createVm({ vmId: 43, guestAgentChannel: true, disks: [{ diskId: 0, sizeMiB: 16, freq: 120 }] });
    try {
      const r = await env.agent(['snapshot', '--vm', '43', '--json']);
      expect(r.code, r.stderr).toBe(0);
      const [o] = JSON.parse(r.stdout) as Array<{ ok: boolean; consistency: string }>;
      expect(o).toMatchObject({ ok: true, consistency: 'crash-consistent' });
      expect(r.stderr).toMatch(/agent-not-connected|not connected/);
      const state = JSON.parse(await readFile(path.join(env.stateDir, 'state.json'), 'utf8'));
      expect(state.disks['43.0'].lastSuccess.consistency).toBe('crash-consistent');
      // a thaw must not report frozen filesystems left behind
      const thaw = await env.lv.virsh(['domfsthaw', gvm.domainName]);
      expect(thaw.stdout).not.toMatch(/Thawed [1-9]/);
      // the freeze marker lives only from before a freeze until a thaw answered
      const marker = freezeMarkerPath(path.join(env.dsRoot, String(env.dsId), DEFAULT_STAGING_DIR_NAME, '43'));
      await expect(stat(marker)).rejects.toThrow(/ENOENT/);
      // what an agent killed between freeze and thaw leaves: the next capture thaws first, then goes on
      await writeFile(marker, `${gvm.domainName}\n`);
      const again = await env.agent(['snapshot', '--vm', '43', '--json']);
      expect(again.code, again.stderr).toBe(0);
      expect(again.stderr).toMatch(/thawing the guest: a previous capture was interrupted/);
      await expect(stat(marker)).rejects.toThrow(/ENOENT/);
    } finally {
      await gvm.destroy();
    }
  });

  it('the bandwidth limit holds for a whole cycle', async () => {
    const bvm = await env.createVm({ vmId: 44, disks: [{ diskId: 0, sizeMiB: 64, freq: 120, baseData: [{ offsetMiB: 0, lengthMiB: 12, pattern: 0x44 }] }] });
    try {
      const t0 = Date.now();
      const r = await env.agent(['snapshot', '--vm', '44', '--json', '--bandwidth-mbps', '4']);
      const ms = Date.now() - t0;
      expect(r.code, r.stderr).toBe(0);
      const [o] = JSON.parse(r.stdout) as Array<{ bytes: number }>;
      expect(o!.bytes).toBeGreaterThan(12 * 1048576);
      // a lower bound only: at 4 MB/s (minus the one burst allowance) the bytes cannot go faster
      expect(ms).toBeGreaterThan(((o!.bytes - 1_000_000) / 4_000_000) * 1000);
    } finally {
      await bvm.destroy();
    }
  });

  it('a backup job left in our staging area is aborted; someone else\'s job is left alone', async () => {
    const jvm = await env.createVm({ vmId: 45, disks: [{ diskId: 0, sizeMiB: 64, freq: 120, baseData: [{ offsetMiB: 0, lengthMiB: 8, pattern: 0x45 }] }] });
    const { mkdir, writeFile } = await import('node:fs/promises');
    // a pull-mode job stays until aborted: a deterministic stand-in for a job whose agent was killed
    const pullJob = async (dir: string) => {
      await mkdir(dir, { recursive: true });
      const xml = path.join(dir, 'pull.xml');
      await writeFile(xml, `<domainbackup mode='pull'><server transport='unix' socket='${dir}/nbd.sock'/><disks><disk name='vda' backup='yes' type='file'><scratch file='${dir}/scratch.qcow2'/></disk></disks></domainbackup>`);
      await env.lv.virshOk(['backup-begin', jvm.domainName, xml]);
    };
    try {
      const foreign = path.join(env.root, 'someone-else');
      await pullJob(foreign);
      let r = await env.agent(['snapshot', '--vm', '45']);
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(/another job is running on domain one-45 \(backup to .*someone-else/);
      expect((await env.lv.virshOk(['domjobinfo', jvm.domainName]))).toMatch(/Job type:\s+Unbounded/);
      await env.lv.virshOk(['domjobabort', jvm.domainName]);
      for (let i = 0; i < 100 && /Unbounded/.test(await env.lv.virshOk(['domjobinfo', jvm.domainName])); i++) await new Promise((res) => setTimeout(res, 50));

      await pullJob(path.join(env.dsRoot, String(env.dsId), '.onestor', '45'));
      r = await env.agent(['snapshot', '--vm', '45']);
      expect(r.code, r.stdout + r.stderr).toBe(0);
      expect(r.stderr).toMatch(/aborting a backup job left by a previous run/);
      expect((await env.lv.virshOk(['domjobinfo', jvm.domainName])).trim()).toMatch(/Job type:\s+None/);
      const drill = await recoverDrill(env.snapsDir, 45, 0, env.root);
      expect(drill.check.ok).toBe(true);
      await rm(drill.dir, { recursive: true, force: true });
    } finally {
      await env.lv.virsh(['domjobabort', jvm.domainName]);
      await jvm.destroy();
    }
  });

  it('two cycles of one VM at once (a CLI run beside the daemon): the second waits its turn, both succeed', async () => {
    const [a, b] = await Promise.all([env.agent(['snapshot', '--vm', '42', '--json']), env.agent(['snapshot', '--vm', '42', '--json'])]);
    expect(a.code, a.stderr).toBe(0);
    expect(b.code, b.stderr).toBe(0);
    const checkpoints = [...(JSON.parse(a.stdout) as Array<{ checkpoint: string }>), ...(JSON.parse(b.stdout) as Array<{ checkpoint: string }>)].map((o) => o.checkpoint);
    expect(new Set(checkpoints).size).toBe(2); // two distinct, sequential captures
    expect((await env.lv.virshOk(['domjobinfo', vm.domainName])).trim()).toMatch(/Job type:\s+None/);
    const ours = (await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name'])).split('\n').filter((c) => c.startsWith('onestor-'));
    expect(ours).toHaveLength(1);
  });

  it('reports a clear reason for a VM that is not protected and exits non-zero', async () => {
    const r = await env.agent(['snapshot', '--vm', '4242']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/nothing to snapshot for VM 4242/);
  });
});
