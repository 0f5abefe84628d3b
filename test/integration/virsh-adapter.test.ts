/**
 * The Virsh adapter against a private libvirtd and real QEMU guests laid out as OpenNebula's ssh driver
 * does: every method on a real domain, a real push backup with a checkpoint, checkpoint redefinition after a
 * transient re-create, guest-agent outcomes, and error classification.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { OnestorError } from '../../lib/shared/errors.js';
import { run } from '../../lib/shared/exec.js';
import { Virsh, virshErrorKind } from '../../lib/libvirt/virsh.js';
import type { JobInfo } from '../../lib/libvirt/virsh-parse.js';
import { startLibvirtd, type Libvirtd } from '../../dev/libvirtd.js';
import { createOneVm, createSystemDatastore, type OneVm } from '../../dev/one-layout.js';
import { guestWrite } from '../../dev/guest.js';
import { makeTempDir, removeTree } from '../../dev/tmp.js';

const MiB = 1024 * 1024;

let lv: Libvirtd;
let dsRoot: string;
let staging: string;
let withAgent: OneVm; // guest-agent channel, nobody behind it; two disks
let plain: OneVm; // no channel; a name with spaces and a quote
let virsh: Virsh;

beforeAll(async () => {
  lv = await startLibvirtd({ name: 'virsh-adapter' });
  dsRoot = await makeTempDir('virsh-ds');
  staging = join(dsRoot, '0', '.onestor');
  await createSystemDatastore(dsRoot, 0, { replicaHost: 'replica.test' });
  withAgent = await createOneVm(lv, {
    dsRoot,
    dsId: 0,
    vmId: 7,
    replicaHost: 'replica.test',
    disks: [
      { diskId: 0, sizeMiB: 64, freq: 60 },
      { diskId: 1, sizeMiB: 16 },
    ],
    guestAgentChannel: true,
  });
  plain = await createOneVm(lv, {
    dsRoot,
    dsId: 0,
    vmId: 8,
    replicaHost: 'replica.test',
    disks: [{ diskId: 0, sizeMiB: 16 }],
    deployId: "vm 8 'quoted'",
  });
  await mkdir(staging, { recursive: true });
  virsh = new Virsh({ uri: lv.uri, timeoutMs: 60_000 });
});

afterAll(async () => {
  await withAgent?.destroy().catch(() => undefined);
  await plain?.destroy().catch(() => undefined);
  await lv?.stop();
  if (dsRoot) await removeTree(dsRoot);
});

async function waitJobNone(dom: string, timeoutMs = 60_000): Promise<JobInfo> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await virsh.domJobInfo(dom);
    if (info.type === 'None') return info;
    if (Date.now() > deadline) throw new Error(`job on ${dom} still ${info.type} after ${timeoutMs} ms`);
    await sleep(20);
  }
}

async function expectVirshError(p: Promise<unknown>, code: string, kind: string, message: RegExp): Promise<OnestorError> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(OnestorError);
    const oe = e as OnestorError;
    expect({ code: oe.code, kind: virshErrorKind(oe) }).toEqual({ code, kind });
    expect(oe.message).toMatch(message);
    return oe;
  }
  throw new Error('expected the call to fail');
}

function fullBackupXml(target: string, file: string, skip: string[]): string {
  return (
    `<domainbackup mode='push'><disks>` +
    `<disk name='${target}' backup='yes' type='file'><target file='${file}'/><driver type='qcow2'/></disk>` +
    skip.map((t) => `<disk name='${t}' backup='no'/>`).join('') +
    `</disks></domainbackup>`
  );
}

function checkpointXml(name: string, target: string, skip: string[]): string {
  return (
    `<domaincheckpoint><name>${name}</name><disks><disk name='${target}' checkpoint='bitmap'/>` +
    skip.map((t) => `<disk name='${t}' checkpoint='no'/>`).join('') +
    `</disks></domaincheckpoint>`
  );
}

describe('Virsh adapter on a real libvirtd', () => {
  it('version and capabilities', async () => {
    const v = await virsh.version();
    expect(v.library).toMatch(/^libvirt \d+\.\d+\.\d+$/);
    expect(v.hypervisor).toMatch(/^QEMU \d+\.\d+/);
    const caps = await virsh.capabilities();
    expect(caps.kvm).toBe(lv.kvm);
    expect(caps.domainTypes).toContain('qemu');
  });

  it('lists domains, their state and persistence', async () => {
    const list = await virsh.listDomains();
    const byName = new Map(list.map((d) => [d.name, d]));
    expect(byName.get('one-7')).toMatchObject({ state: 'running' });
    expect(byName.get("vm 8 'quoted'")).toMatchObject({ state: 'running' });
    expect(typeof byName.get('one-7')?.id).toBe('number');
    expect(await virsh.domainState("vm 8 'quoted'")).toEqual({ state: 'running', reason: 'booted' });
    const info = await virsh.domainInfo('one-7');
    expect(info).toMatchObject({ name: 'one-7', state: 'running', persistent: false }); // virsh create = transient
    expect(info.id).toBe(byName.get('one-7')?.id);
  });

  it('dumpxml names the real base.1 path and its backing chain; blklist agrees', async () => {
    const { parsed, xml } = await virsh.dumpXml('one-7');
    expect(xml).toContain('<domain');
    expect(parsed.name).toBe('one-7');
    expect(parsed.type).toBe(lv.domainType);
    expect(parsed.hasGuestAgentChannel).toBe(true);
    const [d0, d1] = withAgent.disks;
    expect(parsed.disks.map((d) => [d.target, d.source, d.driverType, d.bus])).toEqual([
      [d0!.target, d0!.base1Path, 'qcow2', 'virtio'],
      [d1!.target, d1!.base1Path, 'qcow2', 'virtio'],
    ]);
    // base.1 stores the relative name disk.N.snap/base, resolved through the self-link
    expect(parsed.disks[0]!.backingChain).toEqual([{ source: join(d0!.snapDir, 'disk.0.snap', 'base'), format: 'qcow2' }]);
    expect(parsed.disks[0]!.alias).toMatch(/^virtio-disk\d$/);

    const inactive = (await virsh.dumpXml('one-7', { inactive: true })).parsed;
    expect(inactive.id).toBeNull();
    // a transient domain has no separate inactive definition: the rest is the live one (aliases included)
    expect(inactive.disks.map((d) => d.source)).toEqual(parsed.disks.map((d) => d.source));

    expect((await virsh.dumpXml("vm 8 'quoted'")).parsed.hasGuestAgentChannel).toBe(false);

    expect(await virsh.blockList('one-7')).toEqual([
      { type: 'file', device: 'disk', target: d0!.target, source: d0!.base1Path },
      { type: 'file', device: 'disk', target: d1!.target, source: d1!.base1Path },
    ]);
  });

  it('push backup with a new checkpoint, jobinfo until None, completed stats, target equals the disk', async () => {
    await guestWrite(lv, 'one-7', { offsetMiB: 8, lengthMiB: 4, pattern: 0x5a });
    const target = join(staging, 'vda.full.qcow2');
    const started = Date.now();
    await virsh.backupBegin('one-7', fullBackupXml('vda', target, ['vdb']), checkpointXml('ck-1', 'vda', ['vdb']));
    await waitJobNone('one-7');
    // QEMU released the target: qemu-img may take its lock (no -U)
    const info = await run('qemu-img', ['info', '--output=json', target]);
    expect(info.code, info.stderr).toBe(0);
    expect(JSON.parse(info.stdout)['virtual-size']).toBe(64 * MiB);

    const kept = await virsh.domJobInfo('one-7', { completed: true, keepCompleted: true });
    expect(kept).toMatchObject({ type: 'Completed', operation: 'Backup', exact: true, diskTotal: 64 * MiB, diskRemaining: 0 });
    expect(kept.errorMessage).toBeUndefined();
    expect(kept.timeElapsedMs).toBeLessThanOrEqual(Date.now() - started);
    expect((await virsh.domJobInfo('one-7', { completed: true })).type).toBe('Completed');
    expect((await virsh.domJobInfo('one-7', { completed: true })).type).toBe('None'); // read without keep: cleared

    // point-in-time copy of what the guest sees (the firmware-only guest does not write by itself)
    const cmp = await run('qemu-img', ['compare', '-U', target, withAgent.disks[0]!.base1Path]);
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
  });

  it('checkpoint list, dumpxml --size follows guest writes, incremental backup from it', async () => {
    expect(await virsh.checkpointNames('one-7')).toEqual(['ck-1']);
    const [entry] = await virsh.checkpointList('one-7');
    expect(entry).toMatchObject({ name: 'ck-1', parent: null });
    expect(Math.abs(entry!.creationTime - Date.now() / 1000)).toBeLessThan(300);

    const before = await virsh.checkpointXml('one-7', 'ck-1', { noDomain: true, size: true });
    expect(before.parsed.hasDomain).toBe(false);
    const vdaBefore = before.parsed.disks.find((d) => d.name === 'vda');
    expect(vdaBefore).toMatchObject({ checkpoint: 'bitmap', bitmap: 'ck-1' });
    expect(vdaBefore!.size).toBe(0);
    expect(before.parsed.disks.find((d) => d.name === 'vdb')).toMatchObject({ checkpoint: 'no' });

    await guestWrite(lv, 'one-7', { offsetMiB: 32, lengthMiB: 2, pattern: 0x11 });
    const after = await virsh.checkpointXml('one-7', 'ck-1', { size: true });
    expect(after.parsed.hasDomain).toBe(true);
    expect(after.parsed.disks.find((d) => d.name === 'vda')!.size).toBe(2 * MiB);

    const inc = join(staging, 'vda.inc.qcow2');
    const mk = await run('qemu-img', ['create', '-q', '-f', 'qcow2', inc, '64M']);
    expect(mk.code, mk.stderr).toBe(0);
    const incXml = fullBackupXml('vda', inc, ['vdb']).replace('<disks>', '<incremental>ck-1</incremental><disks>');
    await virsh.backupBegin('one-7', incXml, checkpointXml('ck-2', 'vda', ['vdb']), { reuseExternal: true });
    await waitJobNone('one-7');
    const done = await virsh.domJobInfo('one-7', { completed: true });
    expect(done).toMatchObject({ type: 'Completed', diskTotal: 2 * MiB });
    const list = await virsh.checkpointList('one-7');
    expect(list.map((c) => [c.name, c.parent])).toEqual([
      ['ck-1', null],
      ['ck-2', 'ck-1'],
    ]);
  });

  it('after destroy + create of the transient domain, checkpoints are gone and can be redefined', async () => {
    const saved1 = (await virsh.checkpointXml('one-7', 'ck-1', { noDomain: true })).xml;
    const saved2 = (await virsh.checkpointXml('one-7', 'ck-2', { noDomain: true })).xml;
    await withAgent.destroy();
    await expectVirshError(virsh.fsFreeze('one-7'), 'E_DOMAIN', 'no-domain', /failed to get domain 'one-7'.*virsh .*domfsfreeze one-7/);
    await withAgent.start();

    expect(await virsh.checkpointNames('one-7')).toEqual([]);
    expect(await virsh.checkpointList('one-7')).toEqual([]);
    const missing = await expectVirshError(
      virsh.checkpointXml('one-7', 'ck-2', { noDomain: true, size: true }),
      'E_CHECKPOINT',
      'no-checkpoint',
      /no domain checkpoint with matching name 'ck-2'/,
    );
    expect(missing.context.checkpoint).toBe('ck-2');

    await virsh.checkpointCreateRedefine('one-7', saved1);
    await virsh.checkpointCreateRedefine('one-7', saved2);
    expect(await virsh.checkpointNames('one-7')).toEqual(['ck-1', 'ck-2']);
    // the bitmap survived in base.1: libvirt can size it again
    const ck2 = await virsh.checkpointXml('one-7', 'ck-2', { noDomain: true, size: true });
    expect(ck2.parsed.parent).toBe('ck-1');
    expect(ck2.parsed.disks.find((d) => d.name === 'vda')!.size).toBe(0);

    // one at a time, never --children; the older one first (its bitmap merges away), then metadata only
    await virsh.checkpointDelete('one-7', 'ck-1');
    expect(await virsh.checkpointNames('one-7')).toEqual(['ck-2']);
    await virsh.checkpointDelete('one-7', 'ck-2', { metadataOnly: true });
    expect(await virsh.checkpointNames('one-7')).toEqual([]);
    await expectVirshError(virsh.checkpointDelete('one-7', 'ck-2'), 'E_CHECKPOINT', 'no-checkpoint', /ck-2/);
  });

  it('after a QEMU crash the bitmap is broken: no size, incremental refused, delete needs --metadata', async () => {
    const vm = await createOneVm(lv, { dsRoot, dsId: 0, vmId: 9, replicaHost: 'replica.test', disks: [{ diskId: 0, sizeMiB: 16 }], noStart: true });
    try {
      // persistent, so the checkpoint metadata survives the crash (as it would for a defined domain)
      await lv.virshOk(['define', join(vm.vmDir, 'deployment.0')]);
      await lv.virshOk(['start', 'one-9']);
      expect((await virsh.domainInfo('one-9')).persistent).toBe(true);
      const full = join(staging, 'one-9.full.qcow2');
      await virsh.backupBegin('one-9', fullBackupXml('vda', full, []), checkpointXml('ck-9', 'vda', []));
      await waitJobNone('one-9');
      expect((await virsh.checkpointXml('one-9', 'ck-9', { noDomain: true, size: true })).parsed.disks[0]!.size).toBe(0);

      const qemu = lv.processes().filter((p) => p.cmdline.includes('guest=one-9,'));
      expect(qemu).toHaveLength(1);
      process.kill(qemu[0]!.pid, 'SIGKILL');
      const deadline = Date.now() + 15_000;
      while ((await virsh.domainState('one-9')).state !== 'shut off' && Date.now() < deadline) await sleep(50);
      expect(await virsh.domainState('one-9')).toEqual({ state: 'shut off', reason: 'crashed' });
      await lv.virshOk(['start', 'one-9']);

      expect(await virsh.checkpointNames('one-9')).toEqual(['ck-9']);
      const broken = (await virsh.checkpointXml('one-9', 'ck-9', { noDomain: true, size: true })).parsed.disks[0]!;
      expect(broken).toMatchObject({ name: 'vda', checkpoint: 'bitmap', bitmap: 'ck-9' });
      expect(broken.size).toBeUndefined();

      const inc = join(staging, 'one-9.inc.qcow2');
      expect((await run('qemu-img', ['create', '-q', '-f', 'qcow2', inc, '16M'])).code).toBe(0);
      const incXml = fullBackupXml('vda', inc, []).replace('<disks>', '<incremental>ck-9</incremental><disks>');
      await expectVirshError(virsh.backupBegin('one-9', incXml, undefined, { reuseExternal: true }), 'E_CHECKPOINT', 'checkpoint-inconsistent', /missing or broken bitmap 'ck-9'/);
      await expectVirshError(virsh.checkpointDelete('one-9', 'ck-9'), 'E_CHECKPOINT', 'checkpoint-inconsistent', /not found in backing chain/);
      await virsh.checkpointDelete('one-9', 'ck-9', { metadataOnly: true });
      expect(await virsh.checkpointNames('one-9')).toEqual([]);
    } finally {
      await vm.destroy();
    }
  });

  it('guest agent: channel without agent -> agent-not-connected; no channel -> no-agent', async () => {
    const withChannel = await virsh.fsFreeze('one-7');
    expect(withChannel).toMatchObject({ ok: false, kind: 'agent-not-connected' });
    expect(withChannel.ok === false && withChannel.message).toMatch(/QEMU guest agent is not connected/);
    expect(await virsh.fsFreeze("vm 8 'quoted'")).toMatchObject({ ok: false, kind: 'no-agent' });
    expect(await virsh.fsThaw("vm 8 'quoted'")).toMatchObject({ ok: false, kind: 'no-agent' });
  });

  it('a second job while one runs is job-active; abort of a running job; abort without a job is false', async () => {
    const sock = join(staging, 'nbd.sock');
    const scratch = join(staging, 'scratch.qcow2');
    const pullXml =
      `<domainbackup mode='pull'><server transport='unix' socket='${sock}'/><disks>` +
      `<disk name='vda' backup='yes' type='file'><scratch file='${scratch}'/></disk><disk name='vdb' backup='no'/>` +
      `</disks></domainbackup>`;
    await virsh.backupBegin('one-7', pullXml);
    const running = await virsh.domJobInfo('one-7');
    expect(running).toMatchObject({ type: 'Unbounded', operation: 'Backup', diskTempTotal: 64 * MiB });
    // a second job is not refused at once: libvirtd waits ~30 s for the job lock, then gives up
    const t0 = Date.now();
    await expectVirshError(
      virsh.backupBegin('one-7', fullBackupXml('vda', join(staging, 'never.qcow2'), ['vdb'])),
      'E_VIRSH',
      'job-active',
      /cannot acquire state change lock/,
    );
    expect(Date.now() - t0).toBeGreaterThan(20_000);
    expect(await virsh.domJobAbort('one-7')).toBe(true);
    await waitJobNone('one-7');
    const stats = await virsh.domJobInfo('one-7', { completed: true });
    expect(stats.errorMessage).toBe('Operation canceled'); // libvirt 9.0 still calls the type Completed
    expect(await virsh.domJobAbort('one-7')).toBe(false);
  });

  it('classifies failures: missing domain, not running, bad XML, no connection', async () => {
    const e = await expectVirshError(virsh.domainState('no-such-vm', { vm: 99 }), 'E_DOMAIN', 'no-domain', /failed to get domain 'no-such-vm' \(virsh domstate no-such-vm --reason, exit 1\)/);
    expect(e.context).toMatchObject({ vm: 99, domain: 'no-such-vm', exitCode: 1 });
    expect(e.describe()).toMatch(/^E_DOMAIN vm 99: /);
    await expectVirshError(virsh.dumpXml('no-such-vm'), 'E_DOMAIN', 'no-domain', /no-such-vm/);
    await expectVirshError(virsh.checkpointCreateRedefine('one-7', '<domaincheckpoint><name>x</name'), 'E_VIRSH', 'other', /checkpoint-create one-7 .*--redefine/);

    await run('virsh', ['-c', lv.uri, 'suspend', "vm 8 'quoted'"]);
    await expectVirshError(virsh.fsFreeze("vm 8 'quoted'"), 'E_DOMAIN', 'not-running', /domain is not running/);
    expect(await virsh.domainState("vm 8 'quoted'")).toEqual({ state: 'paused', reason: 'user' });
    await plain.destroy();
    // a transient domain that was destroyed is gone entirely
    await expectVirshError(virsh.domJobInfo("vm 8 'quoted'"), 'E_DOMAIN', 'no-domain', /failed to get domain 'vm 8 'quoted''/);

    const nowhere = new Virsh({ uri: `qemu:///system?socket=${join(dsRoot, 'no-such-socket')}` });
    await expectVirshError(nowhere.version(), 'E_VIRSH', 'connection', /failed to connect to the hypervisor/);
    const noBinary = new Virsh({ uri: lv.uri, virshPath: join(dsRoot, 'no-virsh') });
    await expectVirshError(noBinary.listDomains(), 'E_VIRSH', 'connection', /cannot run/);
  });

  it('an aborted signal stops the call', async () => {
    const ac = new AbortController();
    ac.abort();
    const aborted = new Virsh({ uri: lv.uri, signal: ac.signal });
    const err = await aborted.version().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OnestorError);
    expect((err as OnestorError).code).toBe('E_ABORTED');
  });
});
