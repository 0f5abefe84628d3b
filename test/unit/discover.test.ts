import { readFileSync } from 'node:fs';
import { mkdir, rm, symlink, writeFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  discover,
  planDiscovery,
  type DatastoreFacts,
  type DiskFacts,
  type DiscoveredIneligible,
  type VmFacts,
} from '../../lib/discover/discover.js';

const fixtures = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'one');
const fixture = (name: string): string => readFileSync(join(fixtures, name), 'utf8');

const DS_REPLICA = fixture('ds-system-replica.xml');

function vmXml(id: number, disks: string, extra = ''): string {
  return `<VM><ID>${id}</ID><NAME>vm${id}</NAME>${extra}<TEMPLATE>${disks}<TM_MAD_SYSTEM>ssh</TM_MAD_SYSTEM></TEMPLATE></VM>`;
}
function diskXml(id: number, freq?: string): string {
  return `<DISK><DISK_ID>${id}</DISK_ID><TARGET>vd${'abcdefgh'[id] ?? 'z'}</TARGET>${
    freq === undefined ? '' : `<RECOVERY_SNAPSHOT_FREQ><![CDATA[${freq}]]></RECOVERY_SNAPSHOT_FREQ>`
  }</DISK>`;
}
const okDisk = (diskId: number): DiskFacts => ({ diskId, diskEntry: true, snapDir: { state: 'ok' }, base1: { state: 'ok' } });

function vmFacts(vmId: number, over: Partial<VmFacts> = {}): VmFacts {
  return {
    vmId,
    vmDir: `/dsl/100/${vmId}`,
    vmXml: { ok: true, text: vmXml(vmId, diskXml(0, '60')) },
    dsXml: { ok: true, text: DS_REPLICA },
    disks: [okDisk(0)],
    ...over,
  };
}
const oneDs = (...vms: VmFacts[]): DatastoreFacts[] => [{ dsId: 100, dsDir: '/dsl/100', vms }];

function only(list: DiscoveredIneligible[]): DiscoveredIneligible {
  expect(list).toHaveLength(1);
  return list[0]!;
}

describe('planDiscovery (pure)', () => {
  it('a complete disk is eligible with every path and the replica host', () => {
    const r = planDiscovery(oneDs(vmFacts(5)));
    expect(r.ineligible).toEqual([]);
    expect(r.eligible).toEqual([
      {
        vmId: 5,
        diskId: 0,
        dsId: 100,
        dsDir: '/dsl/100',
        vmDir: '/dsl/100/5',
        domainName: 'one-5',
        freqSeconds: 60,
        replicaHost: 'replica-01.stor.example.net',
        snapDir: '/dsl/100/5/disk.0.snap',
        basePath: '/dsl/100/5/disk.0.snap/base',
        base1Path: '/dsl/100/5/disk.0.snap/base.1',
        target: 'vda',
      },
    ]);
  });

  it('realistic vm.xml: protected disk 0, unprotected disk 1 listed as such, context disk 2 ignored', () => {
    const r = planDiscovery(
      oneDs(
        vmFacts(42, {
          vmXml: { ok: true, text: fixture('vm-two-disks.xml') },
          disks: [okDisk(0), okDisk(1), { diskId: 2, diskEntry: true, snapDir: { state: 'missing' }, base1: { state: 'missing' } }],
        }),
      ),
    );
    expect(r.eligible.map((d) => [d.vmId, d.diskId, d.freqSeconds, d.domainName])).toEqual([[42, 0, 300, 'one-42']]);
    const i = only(r.ineligible);
    expect(i).toMatchObject({ vmId: 42, diskId: 1, code: 'E_NOT_ELIGIBLE', protectionRequested: false });
    expect(i.reason).toContain('not protected: no RECOVERY_SNAPSHOT_FREQ');
    expect(i.reason).toContain('/dsl/100/42/vm.xml');
    expect(i.field).toBe('/VM/TEMPLATE/DISK[DISK_ID=1]/RECOVERY_SNAPSHOT_FREQ');
  });

  it('DEPLOY_ID names the domain when present', () => {
    const r = planDiscovery(oneDs(vmFacts(7, { vmXml: { ok: true, text: fixture('vm-one-disk-deployed.xml') } })));
    expect(r.eligible[0]?.domainName).toBe('one-7');
    const custom = planDiscovery(oneDs(vmFacts(8, { vmXml: { ok: true, text: vmXml(8, diskXml(0, '60'), '<DEPLOY_ID>vm-eight</DEPLOY_ID>') } })));
    expect(custom.eligible[0]?.domainName).toBe('vm-eight');
  });

  it('runningDomains: a stopped domain is ineligible, a running one eligible', () => {
    const facts = oneDs(vmFacts(1), vmFacts(2));
    const r = planDiscovery(facts, new Set(['one-2']));
    expect(r.eligible.map((d) => d.vmId)).toEqual([2]);
    const i = only(r.ineligible);
    expect(i).toMatchObject({ vmId: 1, diskId: 0, code: 'E_DOMAIN', protectionRequested: true });
    expect(i.reason).toMatch(/^domain not running: one-1/);
    // null means "unknown": no filtering
    expect(planDiscovery(facts, null).eligible).toHaveLength(2);
  });

  it('bad frequency: ineligible with file + field + VM, other VMs unaffected', () => {
    const r = planDiscovery(oneDs(vmFacts(3, { vmXml: { ok: true, text: vmXml(3, diskXml(0, 'hourly')) } }), vmFacts(4)));
    expect(r.eligible.map((d) => d.vmId)).toEqual([4]);
    const i = only(r.ineligible);
    expect(i).toMatchObject({ vmId: 3, diskId: 0, code: 'E_VM_XML', file: '/dsl/100/3/vm.xml', protectionRequested: true });
    expect(i.reason).toBe(
      '/dsl/100/3/vm.xml: /VM/TEMPLATE/DISK[DISK_ID=0]/RECOVERY_SNAPSHOT_FREQ="hourly" is not a whole number of seconds (vm 3)',
    );
  });

  it('malformed vm.xml: every listed disk of that VM is reported, the next VM goes on', () => {
    const r = planDiscovery(
      oneDs(vmFacts(3, { vmXml: { ok: true, text: fixture('vm-truncated.xml') }, disks: [okDisk(0), okDisk(1)] }), vmFacts(4)),
    );
    expect(r.eligible.map((d) => d.vmId)).toEqual([4]);
    expect(r.ineligible.map((i) => [i.vmId, i.diskId, i.code])).toEqual([
      [3, 0, 'E_VM_XML'],
      [3, 1, 'E_VM_XML'],
    ]);
    expect(r.ineligible[0]?.reason).toMatch(/^\/dsl\/100\/3\/vm\.xml: malformed XML/);
  });

  it('vm.xml whose /VM/ID is another VM is refused', () => {
    const r = planDiscovery(oneDs(vmFacts(3, { vmXml: { ok: true, text: vmXml(33, diskXml(0, '60')) } })));
    expect(only(r.ineligible)).toMatchObject({ code: 'E_VM_XML', field: '/VM/ID' });
  });

  it('missing vm.xml, VM without disks: one VM-level entry', () => {
    const r = planDiscovery(oneDs(vmFacts(3, { vmXml: { ok: false, state: 'missing', detail: 'missing' }, disks: [] })));
    const i = only(r.ineligible);
    expect(i.diskId).toBeUndefined();
    expect(i).toMatchObject({ code: 'E_VM_XML', reason: '/dsl/100/3/vm.xml: missing' });
  });

  it('missing ds.xml, missing REPLICA_HOST, hostile REPLICA_HOST', () => {
    const missing = only(planDiscovery(oneDs(vmFacts(1, { dsXml: { ok: false, state: 'missing', detail: 'missing' } }))).ineligible);
    expect(missing).toMatchObject({ code: 'E_DS_XML', reason: '/dsl/100/1/ds.xml: missing', file: '/dsl/100/1/ds.xml' });

    const noHost = only(planDiscovery(oneDs(vmFacts(1, { dsXml: { ok: true, text: fixture('ds-system-no-replica.xml') } }))).ineligible);
    expect(noHost).toMatchObject({ code: 'E_DS_XML', field: '/DATASTORE/TEMPLATE/REPLICA_HOST', protectionRequested: true });
    expect(noHost.reason).toBe('not protected: /dsl/100/1/ds.xml has no /DATASTORE/TEMPLATE/REPLICA_HOST');

    const hostile = only(planDiscovery(oneDs(vmFacts(1, { dsXml: { ok: true, text: fixture('ds-replica-hostile.xml') } }))).ineligible);
    expect(hostile.reason).toContain('is not a host name or IP address');

    const broken = only(planDiscovery(oneDs(vmFacts(1, { dsXml: { ok: true, text: '<DATASTORE>' } }))).ineligible);
    expect(broken).toMatchObject({ code: 'E_DS_XML' });
  });

  it('ds.xml problems do not matter for disks that do not ask for protection', () => {
    const r = planDiscovery(
      oneDs(vmFacts(1, { vmXml: { ok: true, text: vmXml(1, diskXml(0)) }, dsXml: { ok: false, state: 'missing', detail: 'missing' } })),
    );
    expect(only(r.ineligible)).toMatchObject({ code: 'E_NOT_ELIGIBLE', protectionRequested: false });
  });

  it('layout problems: disk.N missing, base.1 missing, disk.N.snap not a dir, symlink escapes', () => {
    const cases: [DiskFacts, string, RegExp][] = [
      [{ ...okDisk(0), diskEntry: false }, 'E_NOT_ELIGIBLE', /disk\.0: missing/],
      [{ ...okDisk(0), base1: { state: 'missing' } }, 'E_NOT_ELIGIBLE', /disk\.0\.snap\/base\.1: missing \(expected a regular file\)/],
      [{ ...okDisk(0), base1: { state: 'wrong-type', detail: 'directory' } }, 'E_NOT_ELIGIBLE', /base\.1: not a regular file \(directory\)/],
      [{ ...okDisk(0), snapDir: { state: 'wrong-type', detail: 'regular file' } }, 'E_NOT_ELIGIBLE', /disk\.0\.snap: not a directory/],
      [{ ...okDisk(0), snapDir: { state: 'outside', detail: '-> /etc' } }, 'E_PATH', /outside the datastore \(-> \/etc\); not followed/],
      [{ ...okDisk(0), base1: { state: 'outside', detail: '-> /root/x' } }, 'E_PATH', /base\.1: symlink resolves outside/],
    ];
    for (const [disk, code, reason] of cases) {
      const i = only(planDiscovery(oneDs(vmFacts(1, { disks: [disk] }))).ineligible);
      expect(i.code, String(reason)).toBe(code);
      expect(i.reason).toMatch(reason);
      expect(i.protectionRequested).toBe(true);
    }
  });

  it('a disk asking for protection but absent from the listing is reported', () => {
    const r = planDiscovery(oneDs(vmFacts(1, { disks: [] })));
    expect(only(r.ineligible)).toMatchObject({ diskId: 0, code: 'E_NOT_ELIGIBLE' });
  });

  it('disk.N on disk without a DISK entry: not protected (informational)', () => {
    const r = planDiscovery(oneDs(vmFacts(1, { disks: [okDisk(0), okDisk(5)] })));
    expect(r.eligible).toHaveLength(1);
    expect(only(r.ineligible)).toMatchObject({ diskId: 5, protectionRequested: false, field: '/VM/TEMPLATE/DISK[DISK_ID=5]' });
  });

  it('duplicate DISK_ID and hostile DEPLOY_ID are refused', () => {
    const dup = planDiscovery(oneDs(vmFacts(1, { vmXml: { ok: true, text: vmXml(1, diskXml(0, '60') + diskXml(0, '90')) } })));
    expect(only(dup.ineligible).reason).toContain('appears 2 times');
    const hostile = planDiscovery(
      oneDs(vmFacts(1, { vmXml: { ok: true, text: vmXml(1, diskXml(0, '60'), '<DEPLOY_ID>-x</DEPLOY_ID>') } })),
    );
    expect(only(hostile.ineligible)).toMatchObject({ code: 'E_VM_XML', field: '/VM/DEPLOY_ID' });
  });

  it('VM dir escaping the datastore: E_PATH for each listed disk', () => {
    const r = planDiscovery(oneDs(vmFacts(1, { dirProblem: { state: 'outside', detail: '-> /srv/elsewhere' } })));
    expect(only(r.ineligible)).toMatchObject({ code: 'E_PATH', diskId: 0 });
  });

  it('the same VM in two datastores: history decides, otherwise neither', () => {
    const hist = (ds: number) => `<HISTORY_RECORDS><HISTORY><SEQ>0</SEQ><DS_ID>${ds}</DS_ID></HISTORY></HISTORY_RECORDS>`;
    const at = (dsId: number, histDs: number): DatastoreFacts => ({
      dsId,
      dsDir: `/dsl/${dsId}`,
      vms: [vmFacts(9, { vmDir: `/dsl/${dsId}/9`, vmXml: { ok: true, text: vmXml(9, diskXml(0, '60'), hist(histDs)) } })],
    });
    const settled = planDiscovery([at(101, 101), at(100, 101)]);
    expect(settled.eligible.map((d) => d.dsId)).toEqual([101]);
    expect(only(settled.ineligible)).toMatchObject({ dsId: 100, code: 'E_NOT_ELIGIBLE' });
    const unsettled = planDiscovery([at(100, 0), at(101, 0)]);
    expect(unsettled.eligible).toEqual([]);
    expect(unsettled.ineligible).toHaveLength(2);
  });

  it('output is sorted and notes carry DISK elements without DISK_ID', () => {
    const r = planDiscovery([
      { dsId: 101, dsDir: '/dsl/101', vms: [vmFacts(2, { vmDir: '/dsl/101/2' })] },
      { dsId: 100, dsDir: '/dsl/100', vms: [vmFacts(10), vmFacts(3, { vmXml: { ok: true, text: vmXml(3, diskXml(0, '60') + '<DISK><TARGET>vdz</TARGET></DISK>') } })] },
    ]);
    expect(r.eligible.map((d) => `${d.dsId}/${d.vmId}`)).toEqual(['100/3', '100/10', '101/2']);
    expect(r.notes.some((n) => n.includes('DISK[2]/DISK_ID is missing'))).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------------------------
// The walker on a real directory tree with real files and symlinks

describe('discover on a real datastore tree', () => {
  let root: string;
  let dsl: string;
  let outside: string;

  /** Builds DS/VMID the way OpenNebula's ssh driver lays it out. */
  async function makeVm(dsDir: string, vmId: number, xml: string, disks: number[], opts: { dsXml?: string } = {}): Promise<string> {
    const vmDir = join(dsDir, String(vmId));
    await mkdir(vmDir, { recursive: true });
    await writeFile(join(vmDir, 'vm.xml'), xml);
    await writeFile(join(vmDir, 'ds.xml'), opts.dsXml ?? DS_REPLICA);
    for (const n of disks) {
      const snap = join(vmDir, `disk.${n}.snap`);
      await mkdir(snap);
      await writeFile(join(snap, 'base'), 'image');
      await writeFile(join(snap, 'base.1'), 'overlay');
      await symlink('.', join(snap, `disk.${n}.snap`));
      await symlink(`disk.${n}.snap/base.1`, join(vmDir, `disk.${n}`));
    }
    return vmDir;
  }

  beforeAll(async () => {
    root = join(tmpdir(), `onestor-discover-${process.pid}-${randomBytes(4).toString('hex')}`);
    dsl = join(root, 'datastores');
    outside = join(root, 'outside');
    await mkdir(outside, { recursive: true });
    await writeFile(join(outside, 'base.1'), 'not ours');
    await mkdir(join(outside, 'disk.0.snap'));
    await writeFile(join(outside, 'disk.0.snap', 'base.1'), 'not ours');

    // DS 100: ssh, several VMs
    const ds100 = join(dsl, '100');
    await mkdir(ds100, { recursive: true });
    await writeFile(join(ds100, '.monitor'), 'ssh\n');
    await mkdir(join(ds100, '.onestor', '5'), { recursive: true }); // our staging: ignored
    await mkdir(join(ds100, 'lost+found'));
    await writeFile(join(ds100, '77'), 'a stray numeric file');
    await makeVm(ds100, 5, vmXml(5, diskXml(0, '60') + diskXml(1)), [0, 1]); // disk 0 ok, disk 1 unprotected
    await makeVm(ds100, 6, fixture('vm-truncated.xml'), [0]); // malformed vm.xml
    const vm7 = await makeVm(ds100, 7, vmXml(7, diskXml(0, '120') + diskXml(1, '120') + diskXml(2, '120')), [0, 1]);
    await rm(join(vm7, 'disk.1.snap', 'base.1')); // base.1 missing
    await symlink(join(outside, 'disk.0.snap'), join(vm7, 'disk.2.snap')); // escapes the datastore
    await symlink('disk.2.snap/base.1', join(vm7, 'disk.2'));
    const vm8 = await makeVm(ds100, 8, vmXml(8, diskXml(0, '60')), [0]);
    await rm(join(vm8, 'ds.xml'));
    const vm9 = await makeVm(ds100, 9, vmXml(9, diskXml(0, '60')), [0]);
    await rm(join(vm9, 'disk.0.snap', 'base.1'));
    await symlink(join(outside, 'base.1'), join(vm9, 'disk.0.snap', 'base.1')); // base.1 link escaping
    await symlink(outside, join(ds100, '10')); // VM dir escaping
    await makeVm(ds100, 11, vmXml(11, diskXml(0, '60')), [0], { dsXml: fixture('ds-system-no-replica.xml') });
    const vm12 = await makeVm(ds100, 12, vmXml(12, diskXml(0, '60')), [0]);
    await rm(join(vm12, 'vm.xml'));
    await symlink('/etc/passwd', join(vm12, 'vm.xml')); // vm.xml pointing outside is not read

    // DS 0: not ssh (shared) -> skipped; DS 1: no .monitor (image datastore) -> skipped
    await mkdir(join(dsl, '0'), { recursive: true });
    await writeFile(join(dsl, '0', '.monitor'), 'shared');
    await makeVm(join(dsl, '0'), 50, vmXml(50, diskXml(0, '60')), [0]);
    await mkdir(join(dsl, '1'), { recursive: true });
    await writeFile(join(dsl, '1', 'deadbeef'), 'image');

    // DS 101 lives on another mount and is a symlink, as admins often set it up: allowed
    const real101 = join(root, 'mnt-ds101');
    await mkdir(real101, { recursive: true });
    await writeFile(join(real101, '.monitor'), 'ssh');
    await makeVm(real101, 20, vmXml(20, diskXml(3, '3600'), '<DEPLOY_ID>one-20</DEPLOY_ID>'), [3]);
    await symlink(real101, join(dsl, '101'));
  });

  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it('finds exactly the eligible disks and explains every other one', async () => {
    const r = await discover({ datastoreLocation: dsl });
    expect(r.eligible.map((d) => `${d.dsId}/${d.vmId}/disk.${d.diskId}`)).toEqual(['100/5/disk.0', '100/7/disk.0', '101/20/disk.3']);
    const e20 = r.eligible[2]!;
    expect(e20).toMatchObject({
      dsDir: join(dsl, '101'),
      vmDir: join(dsl, '101', '20'),
      domainName: 'one-20',
      freqSeconds: 3600,
      base1Path: join(dsl, '101', '20', 'disk.3.snap', 'base.1'),
      replicaHost: 'replica-01.stor.example.net',
    });

    const why = Object.fromEntries(r.ineligible.map((i) => [`${i.dsId}/${i.vmId}/${i.diskId ?? '-'}`, i]));
    expect(Object.keys(why).sort()).toEqual(['100/10/-', '100/11/0', '100/12/0', '100/5/1', '100/6/0', '100/7/1', '100/7/2', '100/8/0', '100/9/0']);
    expect(why['100/5/1']).toMatchObject({ protectionRequested: false, code: 'E_NOT_ELIGIBLE' });
    expect(why['100/6/0']).toMatchObject({ code: 'E_VM_XML' });
    expect(why['100/7/1']?.reason).toBe(`${join(dsl, '100', '7', 'disk.1.snap', 'base.1')}: missing (expected a regular file)`);
    expect(why['100/7/2']).toMatchObject({ code: 'E_PATH' });
    expect(why['100/7/2']?.reason).toContain(`-> ${join(outside, 'disk.0.snap')}`);
    expect(why['100/8/0']).toMatchObject({ code: 'E_DS_XML', reason: `${join(dsl, '100', '8', 'ds.xml')}: missing` });
    expect(why['100/9/0']).toMatchObject({ code: 'E_PATH' });
    expect(why['100/10/-']).toMatchObject({ code: 'E_PATH' });
    expect(why['100/11/0']).toMatchObject({ code: 'E_DS_XML', field: '/DATASTORE/TEMPLATE/REPLICA_HOST' });
    expect(why['100/12/0']).toMatchObject({ code: 'E_PATH' });
    expect(why['100/12/0']?.reason).toContain('-> /etc/passwd');

    expect(r.notes.some((n) => n.includes(`${join(dsl, '0')}: skipped (.monitor reads "shared"`))).toBe(true);
    expect(r.notes.some((n) => n.includes(`${join(dsl, '1')}: skipped (no readable .monitor`))).toBe(true);
    expect(r.notes).toContain(`${join(dsl, '100', '77')}: not a directory, ignored`);
    // the staging dir and other non-numeric entries never show up anywhere
    expect(JSON.stringify(r)).not.toContain('.onestor');
    expect(JSON.stringify(r)).not.toContain('lost+found');
  });

  it('runningDomains filters on the domain name', async () => {
    const r = await discover({ datastoreLocation: dsl, runningDomains: new Set(['one-20']) });
    expect(r.eligible.map((d) => d.vmId)).toEqual([20]);
    expect(r.ineligible.find((i) => i.vmId === 5 && i.diskId === 0)).toMatchObject({ code: 'E_DOMAIN' });
  });

  it('maxVmsPerDs caps the walk and says so', async () => {
    const r = await discover({ datastoreLocation: dsl, maxVmsPerDs: 1 });
    expect(r.eligible.map((d) => d.vmId)).toEqual([5, 20]);
    expect(r.notes.some((n) => n.includes('only the first 1 examined'))).toBe(true);
  });

  it('an unreadable VM dir is reported and the walk goes on', async () => {
    if (process.getuid?.() === 0) {
      // root reads through 0000 dirs; a dangling vm.xml link exercises the same "report and go on" path
      const vm = join(dsl, '100', '13');
      await mkdir(vm);
      await symlink(join(vm, 'nowhere'), join(vm, 'vm.xml'));
      const r = await discover({ datastoreLocation: dsl });
      expect(r.ineligible.find((i) => i.vmId === 13)).toMatchObject({ code: 'E_VM_XML', reason: `${join(vm, 'vm.xml')}: dangling symlink` });
      expect(r.eligible.map((d) => d.vmId)).toEqual([5, 7, 20]);
      await rm(vm, { recursive: true });
    } else {
      const vm = join(dsl, '100', '13');
      await mkdir(vm);
      await chmod(vm, 0);
      const r = await discover({ datastoreLocation: dsl });
      expect(r.ineligible.find((i) => i.vmId === 13)?.reason).toMatch(/cannot list/);
      await chmod(vm, 0o755);
      await rm(vm, { recursive: true });
    }
  });

  it('a missing DATASTORE_LOCATION yields nothing and a note, not a crash', async () => {
    const r = await discover({ datastoreLocation: join(root, 'nope') });
    expect(r.eligible).toEqual([]);
    expect(r.ineligible).toEqual([]);
    expect(r.notes[0]).toContain('cannot list datastores');
  });
});
