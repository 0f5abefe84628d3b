import { describe, it, expect } from 'vitest';
import { mkdtemp, mkdir, writeFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { connectUri, isMigrationCommand, yieldHolds, redefineCheckpointXml, findMigrationProcess, writeYieldMarker, readYieldMarker, clearYieldMarker, migrationWatch, type YieldMarker } from '../../lib/cycle/migration.js';
import { parseNodeBitmaps, strayBitmaps } from '../../lib/libvirt/bitmaps.js';
import { decideMode, type ModeFacts } from '../../lib/cycle/plan.js';

const VMDIR = '/var/lib/one/datastores/0/7';

describe('isMigrationCommand (what the source host runs during an OpenNebula live migration)', () => {
  it('connectUri: the URI given before the command, in each spelling', () => {
    expect(connectUri(['-c', 'a'])).toBe('a');
    expect(connectUri(['--connect', 'b', '-q'])).toBe('b');
    expect(connectUri(['--connect=c'])).toBe('c');
    expect(connectUri(['-q'])).toBeNull();
    expect(connectUri(['-c'])).toBeNull();
  });
  it('a virsh connected to another libvirtd migrates another daemon\'s domain of that name: not ours', () => {
    const argv = (c: string[]) => ['virsh', ...c, 'migrate', '--live', 'one-7', 'qemu+ssh://h2/system'];
    const ours = 'qemu:///system';
    expect(isMigrationCommand(argv(['-c', ours]), 'one-7', VMDIR, ours)).toBe(true);
    expect(isMigrationCommand(argv(['--connect', ours]), 'one-7', VMDIR, ours)).toBe(true);
    expect(isMigrationCommand(argv([`--connect=${ours}`]), 'one-7', VMDIR, ours)).toBe(true);
    expect(isMigrationCommand(argv([]), 'one-7', VMDIR, ours)).toBe(true); // default URI: could be ours
    expect(isMigrationCommand(argv(['-c', 'qemu:///system?socket=/run/other/libvirt-sock']), 'one-7', VMDIR, ours)).toBe(false);
    expect(isMigrationCommand(['bash', '-c', 'virsh -c qemu:///session migrate --live one-7 qemu+ssh://h2/system'], 'one-7', VMDIR, ours)).toBe(false);
    // without our URI (older callers) any connection counts, as before
    expect(isMigrationCommand(argv(['-c', 'qemu:///session']), 'one-7', VMDIR)).toBe(true);
  });
  it('virsh migrate of the domain, with or without -c, directly or through a shell', () => {
    expect(isMigrationCommand(['virsh', '--connect', 'qemu:///system', 'migrate', '--live', '--suspend', 'one-7', 'qemu+ssh://h2/system', '--copy-storage-all', '--migrate-disks', 'vda'], 'one-7', VMDIR)).toBe(true);
    expect(isMigrationCommand(['/usr/bin/virsh', 'migrate', '--live', 'one-7', 'qemu+ssh://h2/system'], 'one-7', VMDIR)).toBe(true);
    expect(isMigrationCommand(['bash', '-c', 'virsh --connect qemu:///system migrate --live --suspend one-7 qemu+ssh://h2/system'], 'one-7', VMDIR)).toBe(true);
  });
  it('not another domain, not another virsh command', () => {
    expect(isMigrationCommand(['virsh', 'migrate', '--live', 'one-70', 'qemu+ssh://h2/system'], 'one-7', VMDIR)).toBe(false);
    expect(isMigrationCommand(['virsh', 'dominfo', 'one-7'], 'one-7', VMDIR)).toBe(false);
    expect(isMigrationCommand(['virsh', 'migrate-setspeed', 'one-7', '10'], 'one-7', VMDIR)).toBe(false);
  });
  it('the pre-sync rsync of the VM dir (sources only, never the destination argument)', () => {
    expect(isMigrationCommand(['rsync', '-az', `${VMDIR}/vm.xml`, `${VMDIR}/disk.0.snap`, `h2:${VMDIR}/`], 'one-7', VMDIR)).toBe(true);
    expect(isMigrationCommand(['rsync', '-az', '/var/lib/one/datastores/0/70/disk.0.snap', `h2:/var/lib/one/datastores/0/70/`], 'one-7', VMDIR)).toBe(false);
    expect(isMigrationCommand(['rsync', '-az', '/elsewhere/x', VMDIR], 'one-7', VMDIR)).toBe(false);
    expect(isMigrationCommand([], 'one-7', VMDIR)).toBe(false);
  });
  it('finds such a process in a /proc-like tree', async () => {
    const proc = await mkdtemp(path.join(os.tmpdir(), 'onestor-proc-'));
    try {
      await mkdir(path.join(proc, '123'));
      await writeFile(path.join(proc, '123', 'cmdline'), ['virsh', 'list'].join('\0') + '\0');
      await mkdir(path.join(proc, '456'));
      await writeFile(path.join(proc, '456', 'cmdline'), ['rsync', '-az', `${VMDIR}/disk.0.snap`, `h2:${VMDIR}/`].join('\0') + '\0');
      await mkdir(path.join(proc, 'self'));
      expect((await findMigrationProcess('one-7', VMDIR, proc))?.pid).toBe(456);
      expect(await findMigrationProcess('one-8', '/var/lib/one/datastores/0/8', proc)).toBeNull();
    } finally {
      await rm(proc, { recursive: true, force: true });
    }
  });
  it('scans every process of a large tree (read in parallel) and answers the lowest matching pid', async () => {
    const proc = await mkdtemp(path.join(os.tmpdir(), 'onestor-proc-'));
    try {
      for (let pid = 2; pid < 300; pid++) {
        await mkdir(path.join(proc, String(pid)));
        // a process that exited between readdir and the read: no cmdline file; a kernel thread: empty cmdline
        if (pid % 17 === 0) continue;
        const argv = pid === 251 || pid === 97 ? ['virsh', 'migrate', '--live', 'one-7', 'qemu+ssh://h2/system'] : pid % 13 === 0 ? [] : ['sleep', String(pid)];
        await writeFile(path.join(proc, String(pid), 'cmdline'), argv.length ? argv.join('\0') + '\0' : '');
      }
      expect((await findMigrationProcess('one-7', VMDIR, proc))?.pid).toBe(97);
      await rm(path.join(proc, '97'), { recursive: true });
      // the last pid of the tree is found too (no worker stops early)
      expect((await findMigrationProcess('one-7', VMDIR, proc))?.pid).toBe(251);
      await rm(path.join(proc, '251'), { recursive: true });
      expect(await findMigrationProcess('one-7', VMDIR, proc)).toBeNull();
    } finally {
      await rm(proc, { recursive: true, force: true });
    }
  });
});

describe('yield marker', () => {
  const m: YieldMarker = { vmId: 7, until: 1000, domainId: 5, domainName: 'one-7', setAt: 400, reason: 'test' };
  it('holds until it expires, while the same domain runs here', () => {
    expect(yieldHolds(m, 500, 5)).toBe(true);
    expect(yieldHolds(m, 1000, 5)).toBe(false); // expired
    expect(yieldHolds(m, 500, null)).toBe(false); // the domain left
    expect(yieldHolds(m, 500, 9)).toBe(false); // it came back as another QEMU
    expect(yieldHolds(null, 500, 5)).toBe(false);
  });
  it('round-trips through the state dir and is polled by the capture watch', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'onestor-yield-'));
    try {
      const watch = migrationWatch({ stateDir: dir, vmId: 7, domain: 'one-7', vmDir: VMDIR, domainId: async () => 5, now: () => 500_000, procDir: path.join(dir, 'noproc') });
      expect(await watch()).toBeNull();
      await writeYieldMarker(dir, m);
      expect(await readYieldMarker(dir, 7)).toEqual(m);
      expect(await watch()).toMatch(/yield requested \(test\)/);
      await clearYieldMarker(dir, 7);
      expect(await readYieldMarker(dir, 7)).toBeNull();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('checkpoint definition rebuilt from the replica manifest', () => {
  it('names the bitmap on the disks it covers and no others', () => {
    const x = redefineCheckpointXml('onestor-7-1700000000000-abcdef', 1700000000, ['vda'], ['vda', 'vdb']);
    expect(x).toContain('<name>onestor-7-1700000000000-abcdef</name>');
    expect(x).toContain('<creationTime>1700000000</creationTime>');
    expect(x).toContain("<disk name='vda' checkpoint='bitmap' bitmap='onestor-7-1700000000000-abcdef'/>");
    expect(x).toContain("<disk name='vdb' checkpoint='no'/>");
    expect(() => redefineCheckpointXml("x'><evil", 1, ['vda'], ['vda'])).toThrow();
  });
});

describe('bitmaps of a running disk (QMP query-named-block-nodes)', () => {
  const file = '/ds/0/7/disk.0.snap/base.1';
  const reply = [
    { 'node-name': 'libvirt-2-format', drv: 'qcow2', file: '/ds/0/7/disk.0.snap/base', 'dirty-bitmaps': [{ name: 'onestor-7-1-aaaaaa', recording: true, persistent: true, busy: false, count: 1 }] },
    {
      'node-name': 'libvirt-1-format',
      drv: 'qcow2',
      file: `json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/ds/0/7/disk.0.snap/disk.0.snap/base"}}, "driver": "qcow2", "file": {"driver": "file", "filename": "${file}"}}`,
      'dirty-bitmaps': [
        { name: 'onestor-7-2-bbbbbb', recording: true, persistent: true, busy: false, count: 65536 },
        { name: 'onestor-7-3-cccccc', recording: true, persistent: true, busy: false, inconsistent: true },
        { name: 'onestor-7-4-dddddd', recording: true, persistent: true, busy: true },
        { name: 'onestor-70-5-eeeeee', recording: true, persistent: true, busy: false },
        { name: 'backup-one', recording: true, persistent: true, busy: false },
      ],
    },
    { 'node-name': 'libvirt-1-storage', drv: 'file', file },
  ];
  it("finds base.1's qcow2 node (its file may be a json: pseudo-filename)", () => {
    const nb = parseNodeBitmaps(reply, file)!;
    expect(nb.node).toBe('libvirt-1-format');
    expect(nb.bitmaps.map((b) => b.name)).toHaveLength(5);
    expect(nb.bitmaps.find((b) => b.name === 'onestor-7-3-cccccc')?.inconsistent).toBe(true);
    expect(parseNodeBitmaps(reply, '/other')).toBeNull();
    expect(parseNodeBitmaps({ error: 'x' }, file)).toBeNull();
  });
  it('strays: ours for this VM, not kept, not busy; never anyone else\'s', () => {
    const nb = parseNodeBitmaps(reply, file)!;
    expect(strayBitmaps(nb.bitmaps, 7, new Set(['onestor-7-2-bbbbbb'])).map((b) => b.name)).toEqual(['onestor-7-3-cccccc']);
    expect(strayBitmaps(nb.bitmaps, 7, new Set()).map((b) => b.name)).toEqual(['onestor-7-2-bbbbbb', 'onestor-7-3-cccccc']);
  });
});

describe('decideMode after a migration', () => {
  const base: ModeFacts = {
    forceFull: false,
    stateCheckpoint: null,
    replicaCheckpoint: 'onestor-7-2-bbbbbb',
    libvirtCheckpoints: ['onestor-7-2-bbbbbb'],
    bitmapHealthy: true,
    base1IdentityThen: '1:100',
    base1IdentityNow: '1:200',
    replicaBaseMatches: true,
  };
  it('a replaced base.1 on the same lineage host stays a full (a recovery)', () => {
    expect(decideMode({ ...base, lineageFromAnotherHost: false }).mode).toBe('full');
    expect(decideMode(base).reason).toMatch(/replaced/);
  });
  it('a new file from a migration continues when the lineage comes from another host and the bitmap is sound', () => {
    expect(decideMode({ ...base, lineageFromAnotherHost: true })).toMatchObject({ mode: 'incremental', parent: 'onestor-7-2-bbbbbb' });
    expect(decideMode({ ...base, lineageFromAnotherHost: true, bitmapHealthy: false }).mode).toBe('full');
    expect(decideMode({ ...base, lineageFromAnotherHost: true, bitmapHealthy: null }).mode).toBe('full');
    expect(decideMode({ ...base, lineageFromAnotherHost: true, libvirtCheckpoints: [] }).reason).toMatch(/missing in libvirt/);
  });
});
