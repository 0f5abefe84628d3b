/**
 * The harness itself, against the real libvirtd + QEMU + qemu-img: the OpenNebula layout is what libvirt
 * really sees, guest writes really change the live chain, and a private libvirtd leaves nothing behind,
 * neither through stop() nor when its owner is SIGKILLed.
 */
import { spawn } from 'node:child_process';
import { lstat, mkdir, readFile, readlink, realpath, stat, utimes, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { XMLParser } from 'fast-xml-parser';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from '../../lib/shared/exec.js';
import { guestDiscard, guestFlush, guestWrite, guestZero, isFilledWith, readGuestView, readRegion, sha256File } from '../../dev/guest.js';
import { processesInNamespace, startLibvirtd, type Libvirtd } from '../../dev/libvirtd.js';
import { createOneVm, createSystemDatastore, domainDisks, domainDiskSources, type OneVm } from '../../dev/one-layout.js';
import { LIBVIRTD_ROOT_TAG, reapStaleLibvirtdRoots, reapStaleTempDirs } from '../../dev/reaper.js';
import { makeTempDir, removeTree, TEMP_DIR_TAG, uniqueName } from '../../dev/tmp.js';

const REPO_ROOT = resolve(fileURLToPath(new URL('.', import.meta.url)), '../..');
const HARNESS_DIR = resolve(REPO_ROOT, 'dev');

let lv: Libvirtd;
let dsRoot: string;
let work: string;
let vmA: OneVm; // 2 disks, freq on disk 0 only
let vmB: OneVm; // 1 disk, guest-agent channel, custom DEPLOY_ID

async function qemuImgInfo(path: string): Promise<Record<string, unknown>> {
  const r = await run('qemu-img', ['info', '--output=json', '-U', path]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

/** Live qemu-system* / libvirtd processes (by executable name) whose command line mentions `needle`. */
async function psMatching(needle: string): Promise<string[]> {
  const r = await run('ps', ['-eo', 'pid=,stat=,comm=,args=']);
  expect(r.code).toBe(0);
  return r.stdout.split('\n').filter((l) => {
    const m = /^\s*\d+\s+(\S+)\s+(\S+)\s/.exec(l);
    return m !== null && !m[1]!.startsWith('Z') && /^(qemu-system|libvirtd$)/.test(m[2]!) && l.includes(needle);
  });
}

beforeAll(async () => {
  lv = await startLibvirtd({ name: 'layout' });
  work = await makeTempDir('layout');
  dsRoot = join(work, 'datastores');
  await createSystemDatastore(dsRoot, 0, { replicaHost: 'replica-1.example' });
  vmA = await createOneVm(lv, {
    dsRoot,
    dsId: 0,
    vmId: 7,
    replicaHost: 'replica-1.example',
    disks: [
      {
        diskId: 0,
        sizeMiB: 64,
        freq: 60,
        baseData: [{ offsetMiB: 0, lengthMiB: 4, pattern: 0x11 }],
        overlayData: [{ offsetMiB: 4, lengthMiB: 2, pattern: 0x22 }],
      },
      { diskId: 1, sizeMiB: 32, baseData: [{ offsetMiB: 1, lengthMiB: 1, pattern: 0x33 }] },
    ],
  });
  vmB = await createOneVm(lv, {
    dsRoot,
    dsId: 0,
    vmId: 8,
    replicaHost: 'replica-1.example',
    deployId: 'one-8-redeployed',
    guestAgentChannel: true,
    disks: [{ diskId: 0, sizeMiB: 16, freq: 30 }],
  });
});

afterAll(async () => {
  await lv?.stop();
  if (work) await removeTree(work);
});

describe('private libvirtd', () => {
  it('answers on its own socket and runs QEMU in the detected mode', async () => {
    expect(lv.uri).toBe(`qemu:///system?socket=${lv.rootDir}/run/libvirt/libvirt-sock`);
    expect((await stat(join(lv.rootDir, 'run/libvirt/libvirt-sock'))).isSocket()).toBe(true);
    const caps = await lv.virshOk(['capabilities']);
    expect(lv.kvm).toBe(caps.includes("<domain type='kvm'/>"));
    const live = await lv.virshOk(['dumpxml', vmA.domainName]);
    expect(live).toMatch(new RegExp(`<domain type='${lv.domainType}'`));
    const names = lv.processes().map((p) => p.comm);
    expect(names).toContain('libvirtd');
    expect(names.filter((n) => n.startsWith('qemu-system'))).toHaveLength(2);
  });

  it('does not see the host default connection nor other instances', async () => {
    const other = await startLibvirtd({ name: 'layout-other' });
    try {
      expect(other.uri).not.toBe(lv.uri);
      expect(other.pidNamespace).not.toBe(lv.pidNamespace);
      expect((await other.virshOk(['list', '--all', '--name'])).trim()).toBe('');
      expect((await lv.virshOk(['list', '--name'])).split('\n').filter(Boolean).sort()).toEqual(['one-7', 'one-8-redeployed']);
    } finally {
      await other.stop();
    }
    expect(processesInNamespace(other.pidNamespace)).toEqual([]);
  });
});

describe('OpenNebula ssh system datastore layout', () => {
  it('marks the datastore as ssh-driven', async () => {
    expect(await readFile(join(dsRoot, '0', '.monitor'), 'utf8')).toBe('ssh\n');
  });

  it('links disk.N -> disk.N.snap/base.1 and disk.N.snap/disk.N.snap -> .', async () => {
    for (const vm of [vmA, vmB]) {
      for (const d of vm.disks) {
        expect(await readlink(d.diskPath)).toBe(`disk.${d.diskId}.snap/base.1`);
        expect(await readlink(join(d.snapDir, `disk.${d.diskId}.snap`))).toBe('.');
        expect((await lstat(d.basePath)).isFile()).toBe(true);
        expect((await lstat(d.base1Path)).isFile()).toBe(true);
        expect(await realpath(d.diskPath)).toBe(await realpath(d.base1Path));
        expect(d.diskPath).toBe(join(dsRoot, '0', String(vm.vmId), `disk.${d.diskId}`));
      }
    }
  });

  it('stores the relative backing name disk.N.snap/base in base.1', async () => {
    for (const d of [...vmA.disks, ...vmB.disks]) {
      const info = await qemuImgInfo(d.base1Path);
      expect(info.format).toBe('qcow2');
      expect(info['backing-filename']).toBe(`disk.${d.diskId}.snap/base`);
      expect(info['backing-filename-format']).toBe('qcow2');
      const base = await qemuImgInfo(d.basePath);
      expect(base.format).toBe('qcow2');
      expect(base['backing-filename']).toBeUndefined();
    }
  });

  it('libvirt runs each disk from the real base.1 path and discovers base behind it', async () => {
    const blk = await domainDiskSources(lv, vmA.domainName);
    expect([...blk.entries()]).toEqual([
      ['vda', vmA.disks[0]!.base1Path],
      ['vdb', vmA.disks[1]!.base1Path],
    ]);
    const live = await domainDisks(lv, vmA.domainName);
    for (const [i, disk] of live.entries()) {
      expect(disk.alias).toBe(`virtio-disk${i}`);
      expect(disk.backingChain).toHaveLength(1);
      expect(await realpath(disk.backingChain[0]!)).toBe(await realpath(vmA.disks[i]!.basePath));
    }
    expect([...(await domainDiskSources(lv, vmB.domainName)).values()]).toEqual([vmB.disks[0]!.base1Path]);
  });

  it('starts transient domains, named by DEPLOY_ID', async () => {
    expect(vmA.domainName).toBe('one-7');
    expect(vmB.domainName).toBe('one-8-redeployed');
    for (const vm of [vmA, vmB]) {
      expect(await lv.virshOk(['dominfo', vm.domainName])).toMatch(/^Persistent:\s+no$/m);
    }
  });

  it('writes vm.xml and ds.xml a front-end would send, with the frequency on the chosen disk only', async () => {
    const raw = await readFile(join(vmA.vmDir, 'vm.xml'), 'utf8');
    expect(raw).toContain('<RECOVERY_SNAPSHOT_FREQ><![CDATA[60]]></RECOVERY_SNAPSHOT_FREQ>');
    const parser = new XMLParser({ isArray: (n) => n === 'DISK' || n === 'HISTORY', parseTagValue: false });
    const vm = parser.parse(raw).VM;
    expect(vm.ID).toBe('7');
    expect(vm.DEPLOY_ID).toBe('one-7');
    expect(vm.STATE).toBe('3');
    expect(vm.LCM_STATE).toBe('3');
    const disks = vm.TEMPLATE.DISK as Array<Record<string, string>>;
    expect(disks.map((d) => [d.DISK_ID, d.TARGET, d.DRIVER, d.TYPE, d.TM_MAD])).toEqual([
      ['0', 'vda', 'qcow2', 'FILE', 'ssh'],
      ['1', 'vdb', 'qcow2', 'FILE', 'ssh'],
    ]);
    expect(disks[0]!.RECOVERY_SNAPSHOT_FREQ).toBe('60');
    expect(disks[1]!).not.toHaveProperty('RECOVERY_SNAPSHOT_FREQ');
    expect(vm.HISTORY_RECORDS.HISTORY[0].DS_ID).toBe('0');
    expect(vm.TEMPLATE.TM_MAD_SYSTEM).toBe('ssh');

    const vmBDoc = parser.parse(await readFile(join(vmB.vmDir, 'vm.xml'), 'utf8')).VM;
    expect(vmBDoc.DEPLOY_ID).toBe('one-8-redeployed');

    const ds = parser.parse(await readFile(join(vmA.vmDir, 'ds.xml'), 'utf8')).DATASTORE;
    expect(ds.ID).toBe('0');
    expect(ds.TM_MAD).toBe('ssh');
    expect(ds.TYPE).toBe('1');
    expect(ds.TEMPLATE).toMatchObject({ REPLICA_HOST: 'replica-1.example', TM_MAD: 'ssh', TYPE: 'SYSTEM_DS', SHARED: 'NO' });
  });

  it('reproduces the guest-agent situations: no channel vs channel without an agent', async () => {
    const noChannel = await lv.virsh(['domfsfreeze', vmA.domainName]);
    expect(noChannel.code).not.toBe(0);
    expect(noChannel.stderr).toMatch(/guest agent is not configured/i);
    expect(await lv.virshOk(['dumpxml', vmB.domainName])).toContain("name='org.qemu.guest_agent.0'");
    const silent = await lv.virsh(['domfsfreeze', vmB.domainName], { timeoutMs: 60_000 });
    expect(silent.code).not.toBe(0);
    expect(silent.stderr).toMatch(/guest agent is not (connected|responding)/i);
  });
});

describe('guest I/O', () => {
  it('base and overlay data are what the guest sees before it writes', async () => {
    const view = join(work, 'a0-initial.raw');
    await readGuestView(vmA.disks[0]!.base1Path, view);
    expect(isFilledWith(await readRegion(view, 0, 4), 0x11)).toBe(true);
    expect(isFilledWith(await readRegion(view, 4, 2), 0x22)).toBe(true);
    expect(isFilledWith(await readRegion(view, 6, 58), 0)).toBe(true);
    expect((await stat(view)).size).toBe(64 * 1024 * 1024);
  });

  it('a guest write changes the live chain view at that offset only, in base.1 only', async () => {
    const disk = vmA.disks[0]!;
    const before = join(work, 'a0-before.raw');
    const after = join(work, 'a0-after.raw');
    const baseSha = await sha256File(disk.basePath);
    await readGuestView(disk.base1Path, before);

    await guestWrite(lv, vmA.domainName, { target: 'vda', offsetMiB: 8, lengthMiB: 2, pattern: 0x77, noFlush: true });
    await guestFlush(lv, vmA.domainName, 'vda');
    await readGuestView(disk.base1Path, after);

    expect(await sha256File(after)).not.toBe(await sha256File(before));
    expect(isFilledWith(await readRegion(after, 8, 2), 0x77)).toBe(true);
    expect((await readRegion(after, 0, 8)).equals(await readRegion(before, 0, 8))).toBe(true);
    expect((await readRegion(after, 10, 54)).equals(await readRegion(before, 10, 54))).toBe(true);
    expect(await sha256File(disk.basePath)).toBe(baseSha);
  });

  it('targets the right disk by name', async () => {
    const view = join(work, 'a1.raw');
    await guestWrite(lv, vmA.domainName, { target: 'vdb', offsetMiB: 3, lengthMiB: 1, pattern: 0x5a });
    await readGuestView(vmA.disks[1]!.base1Path, view);
    expect(isFilledWith(await readRegion(view, 1, 1), 0x33)).toBe(true);
    expect(isFilledWith(await readRegion(view, 3, 1), 0x5a)).toBe(true);
    const vdaView = join(work, 'a0-vdb-check.raw');
    await readGuestView(vmA.disks[0]!.base1Path, vdaView);
    expect(isFilledWith(await readRegion(vdaView, 3, 1), 0x11)).toBe(true);
  });

  it('zero and discard read back as zeroes, including over base data', async () => {
    const view = join(work, 'a0-zero.raw');
    await guestZero(lv, vmA.domainName, { offsetMiB: 0, lengthMiB: 1 });
    await guestDiscard(lv, vmA.domainName, { offsetMiB: 8, lengthMiB: 1 });
    await readGuestView(vmA.disks[0]!.base1Path, view);
    expect(isFilledWith(await readRegion(view, 0, 1), 0)).toBe(true);
    expect(isFilledWith(await readRegion(view, 1, 3), 0x11)).toBe(true);
    // A discard over data that base also lacks must read as zero (qcow2 leaves a zero cluster or unallocates).
    expect(isFilledWith(await readRegion(view, 8, 1), 0)).toBe(true);
    expect(isFilledWith(await readRegion(view, 9, 1), 0x77)).toBe(true);
  });

  it('fails loudly on a write past the end, an unknown disk or a missing domain', async () => {
    await expect(guestWrite(lv, vmB.domainName, { offsetMiB: 16, lengthMiB: 1, pattern: 1 })).rejects.toThrow(/did not succeed|failed/);
    await expect(guestWrite(lv, vmB.domainName, { target: 'vdz', offsetMiB: 0, lengthMiB: 1, pattern: 1 })).rejects.toThrow(/no disk vdz/);
    await expect(guestWrite(lv, 'one-404', { offsetMiB: 0, lengthMiB: 1, pattern: 1 })).rejects.toThrow(/one-404/);
    await expect(guestWrite(lv, vmB.domainName, { offsetMiB: 0, lengthMiB: 1, pattern: 256 })).rejects.toThrow(/pattern/);
  });
});

describe('lifecycle', () => {
  it('destroy() removes the transient domain and keeps the files; start() recreates it', async () => {
    await vmB.destroy();
    expect((await lv.virshOk(['list', '--all', '--name'])).split('\n').filter(Boolean)).toEqual(['one-7']);
    expect((await lstat(vmB.disks[0]!.base1Path)).isFile()).toBe(true);
    await vmB.start();
    expect((await lv.virshOk(['domstate', vmB.domainName])).trim()).toBe('running');
  });

  it('stop() leaves no domain, daemon, QEMU or temp root behind', async () => {
    const ns = lv.pidNamespace;
    expect(await psMatching(dsRoot)).toHaveLength(2); // the two QEMUs name their disks under dsRoot
    expect(await psMatching(lv.rootDir)).toHaveLength(1); // libvirtd -p ROOT/libvirtd.pid
    await lv.stop();
    expect(processesInNamespace(ns)).toEqual([]);
    expect(await psMatching(dsRoot)).toEqual([]);
    expect(await psMatching(lv.rootDir)).toEqual([]);
    await expect(stat(lv.rootDir)).rejects.toThrow(/ENOENT/);
    // The VM files belong to the test, not to the daemon.
    expect((await lstat(vmA.disks[0]!.base1Path)).isFile()).toBe(true);
  });

  it('a SIGKILLed owner takes its libvirtd and QEMU with it; the reaper removes its root', async () => {
    const script = join(work, 'owner.ts');
    // A private TMPDIR for the doomed owner and the reaper calls below: a libvirtd started by another test
    // file at the same moment reaps the shared tmpdir and could take these dead-owner dirs first.
    const reapBase = join(work, 'reap-tmp');
    await mkdir(reapBase, { mode: 0o755 });
    await writeFile(
      script,
      [
        `import { startLibvirtd } from ${JSON.stringify(join(HARNESS_DIR, 'libvirtd.ts'))};`,
        `import { createOneVm } from ${JSON.stringify(join(HARNESS_DIR, 'one-layout.ts'))};`,
        `const lv = await startLibvirtd({ name: 'doomed' });`,
        `await createOneVm(lv, { dsRoot: ${JSON.stringify(join(work, 'doomed-ds'))}, dsId: 0, vmId: 9, replicaHost: 'r', disks: [{ diskId: 0, sizeMiB: 8 }] });`,
        `console.log(JSON.stringify({ rootDir: lv.rootDir, ns: lv.pidNamespace, procs: lv.processes().map((p) => p.comm) }));`,
        `setInterval(() => {}, 1000);`,
      ].join('\n'),
    );
    const child = spawn(process.execPath, [join(REPO_ROOT, 'node_modules/vite-node/vite-node.mjs'), script], {
      cwd: REPO_ROOT,
      env: { ...process.env, TMPDIR: reapBase },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    const line = await new Promise<string>((res, rej) => {
      let out = '';
      child.stdout.on('data', (b: Buffer) => {
        out += b.toString();
        const l = out.split('\n').find((x) => x.startsWith('{'));
        if (l) res(l);
      });
      child.once('exit', (code) => rej(new Error(`owner exited ${code} before reporting: ${stderr}`)));
    });
    const info = JSON.parse(line) as { rootDir: string; ns: string; procs: string[] };
    expect(info.procs).toContain('libvirtd');
    expect(info.procs.some((p) => p.startsWith('qemu-system'))).toBe(true);
    expect(processesInNamespace(info.ns).length).toBeGreaterThanOrEqual(3);

    const exited = new Promise((res) => child.once('exit', res));
    child.kill('SIGKILL');
    await exited;
    const deadline = Date.now() + 15_000;
    while (processesInNamespace(info.ns).length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    expect(processesInNamespace(info.ns)).toEqual([]);
    expect(await psMatching(info.rootDir)).toEqual([]);
    expect(await psMatching(join(work, 'doomed-ds'))).toEqual([]);

    expect(info.rootDir).toContain(LIBVIRTD_ROOT_TAG);
    expect(info.rootDir.startsWith(reapBase + '/')).toBe(true);
    expect((await stat(info.rootDir)).isDirectory()).toBe(true);
    expect(await reapStaleLibvirtdRoots(reapBase)).toContain(info.rootDir);
    await expect(stat(info.rootDir)).rejects.toThrow(/ENOENT/);

    // Temp dirs of a dead owner go once they are old; fresh ones and ours stay.
    const deadPid = child.pid!.toString(36);
    const oldDead = join(reapBase, `${TEMP_DIR_TAG}reap-${deadPid}-aaaaaaa`);
    const freshDead = join(reapBase, `${TEMP_DIR_TAG}reap-${deadPid}-bbbbbbb`);
    const oldOurs = join(reapBase, TEMP_DIR_TAG + uniqueName('reap'));
    for (const d of [oldDead, freshDead, oldOurs]) await mkdir(d);
    const twoHoursAgo = new Date(Date.now() - 2 * 3600 * 1000);
    for (const d of [oldDead, oldOurs]) await utimes(d, twoHoursAgo, twoHoursAgo);
    try {
      const reaped = await reapStaleTempDirs(reapBase);
      expect(reaped).toContain(oldDead);
      expect(reaped).not.toContain(freshDead);
      expect(reaped).not.toContain(oldOurs);
      await expect(stat(oldDead)).rejects.toThrow(/ENOENT/);
      expect((await stat(oldOurs)).isDirectory()).toBe(true);
    } finally {
      for (const d of [oldDead, freshDead, oldOurs]) await removeTree(d);
    }
  });
});
