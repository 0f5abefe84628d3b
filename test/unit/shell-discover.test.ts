/**
 * The shell-only reader of protected disks (lib/monitor/shell-discover.ts, probes/lib-onestor.sh): the
 * same text in both places, and on documents built after the OpenNebula schemas (dev/one-layout.ts,
 * test/fixtures/one) it names exactly the laid-out disks whose template has RECOVERY_SNAPSHOT_FREQ.
 * recovery.rb without an agent runs it for real (sh, awk, base64), as monitord would.
 */
import { spawnSync } from 'node:child_process';
import { copyFile, mkdir, readFile, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PROTECTED_DISKS_SCRIPT, PROTECTED_DISKS_SH, parseProtectedDisks } from '../../lib/monitor/shell-discover.js';
import { parseOneTemplate } from '../../lib/monitor/one-template.js';
import { discover } from '../../lib/discover/discover.js';
import { renderDsXml, renderVmXml } from '../../dev/one-layout.js';
import { makeTempDir, removeTree } from '../../dev/tmp.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
let work: string;
let dsRoot: string;

/** A VM dir as the ssh driver lays it out: every disk gets disk.N.snap/base.1, asked-for or not. */
async function layVm(ds: string, vmId: number, vmXml: string, diskIds: number[]): Promise<void> {
  const vm = path.join(dsRoot, ds, String(vmId));
  for (const n of diskIds) {
    await mkdir(path.join(vm, `disk.${n}.snap`), { recursive: true });
    await writeFile(path.join(vm, `disk.${n}.snap`, 'base'), 'b');
    await writeFile(path.join(vm, `disk.${n}.snap`, 'base.1'), 'o');
    await symlink('.', path.join(vm, `disk.${n}.snap`, `disk.${n}.snap`));
    await symlink(`disk.${n}.snap/base.1`, path.join(vm, `disk.${n}`));
  }
  await writeFile(path.join(vm, 'vm.xml'), vmXml);
  await writeFile(path.join(vm, 'ds.xml'), renderDsXml({ dsId: Number(ds), dsRoot, replicaHost: 'replica.example' }));
}

const vmXml = (vmId: number, dsId: number, disks: Array<{ diskId: number; freq?: number }>) =>
  renderVmXml({ vmId, dsId, dsRoot, deployId: `one-${vmId}`, hostname: 'kvm-1', memoryMiB: 64, stime: 1, disks: disks.map((d) => ({ ...d, target: `vd${String.fromCharCode(97 + d.diskId)}`, sizeMiB: 1 })) });

beforeAll(async () => {
  work = await makeTempDir('shell-discover');
  dsRoot = path.join(work, 'datastores');
  for (const [ds, tm] of [['100', 'ssh'], ['101', 'ssh'], ['102', 'shared']] as const) {
    await mkdir(path.join(dsRoot, ds), { recursive: true });
    await writeFile(path.join(dsRoot, ds, '.monitor'), tm);
  }
  // disk 0 asked for snapshots, disk 1 did not: both laid out the same way
  await layVm('100', 42, vmXml(42, 100, [{ diskId: 0, freq: 600 }, { diskId: 1 }]), [0, 1]);
  // no disk asked
  await layVm('100', 43, vmXml(43, 100, [{ diskId: 0 }]), [0]);
  // a real-looking document (test/fixtures/one): CONTEXT has its own DISK_ID, a CDATA value holds '<'
  const fixture = await readFile(path.join(ROOT, 'test', 'fixtures', 'one', 'vm-two-disks.xml'), 'utf8');
  await layVm('101', 44, fixture.replace('<ID>42</ID>', '<ID>44</ID>'), [0, 1, 2]);
  // freq asked, but the datastore is not an ssh one
  await layVm('102', 45, vmXml(45, 102, [{ diskId: 0, freq: 60 }]), [0]);
  // freq asked, but nothing laid out for that disk
  await mkdir(path.join(dsRoot, '100', '46'), { recursive: true });
  await writeFile(path.join(dsRoot, '100', '46', 'vm.xml'), vmXml(46, 100, [{ diskId: 0, freq: 60 }]));
});

afterAll(async () => {
  if (work) await removeTree(work);
});

function runShell(dsLoc: string): string {
  const r = spawnSync('sh', ['-c', PROTECTED_DISKS_SCRIPT, 'sh', dsLoc], { encoding: 'utf8' });
  expect(r.status, r.stderr).toBe(0);
  return r.stdout;
}

describe('shell reader of protected disks', () => {
  it('probes/lib-onestor.sh holds the same function, byte for byte', async () => {
    const lib = await readFile(path.join(ROOT, 'probes', 'lib-onestor.sh'), 'utf8');
    const m = /# ONESTOR-DISCOVER BEGIN\n([\s\S]*?)\n# ONESTOR-DISCOVER END/.exec(lib);
    expect(m?.[1]).toBe(PROTECTED_DISKS_SH);
  });

  it('names laid-out disks with RECOVERY_SNAPSHOT_FREQ only (and the frequency)', () => {
    expect(parseProtectedDisks(runShell(dsRoot))).toEqual([
      { vmId: 42, diskId: 0, freqSeconds: 600 },
      { vmId: 44, diskId: 0, freqSeconds: 300 },
    ]);
  });

  it('agrees with the agent discovery on which disks are eligible here', async () => {
    const found = await discover({ datastoreLocation: dsRoot });
    const eligible = found.eligible.map((d) => ({ vmId: d.vmId, diskId: d.diskId, freqSeconds: d.freqSeconds })).sort((a, b) => a.vmId - b.vmId || a.diskId - b.diskId);
    expect(parseProtectedDisks(runShell(dsRoot))).toEqual(eligible);
  });

  it('a missing datastore location prints nothing', () => {
    expect(runShell(path.join(work, 'nope'))).toBe('');
  });

  it('recovery.rb without an agent: ERROR only for the disks that asked for protection', async () => {
    // the probes tree as onehost sync lays it out, with an agent lookup that finds nothing on this machine
    const probes = path.join(work, 'probes');
    await mkdir(path.join(probes, 'vm', 'snapshot'), { recursive: true });
    await copyFile(path.join(ROOT, 'probes', 'vm', 'snapshot', 'recovery.rb'), path.join(probes, 'vm', 'snapshot', 'recovery.rb'));
    const lib = await readFile(path.join(ROOT, 'probes', 'lib-onestor.sh'), 'utf8');
    await writeFile(path.join(probes, 'lib-onestor.sh'), `${lib}\nonestor_find_agent() { return 1; }\n`);
    const r = spawnSync('sh', [path.join(probes, 'vm', 'snapshot', 'recovery.rb')], { input: `<MONITORD_CONFIG><DATASTORE_LOCATION><![CDATA[${dsRoot}]]></DATASTORE_LOCATION></MONITORD_CONFIG>`, encoding: 'utf8' });
    expect(r.status).toBe(0);
    const vms = parseOneTemplate(r.stdout).map((a) => {
      const v = a.value as Record<string, string>;
      return { id: v.ID, disks: parseOneTemplate(Buffer.from(v.MONITOR!, 'base64').toString()).map((d) => (d.value as Record<string, string>)) };
    });
    expect(vms.map((v) => [v.id, v.disks.map((d) => [d.ID, d.ERROR_CODE])])).toEqual([
      ['42', [['0', 'E_AGENT_DOWN']]],
      ['44', [['0', 'E_AGENT_DOWN']]],
    ]);
    expect(vms[0]!.disks[0]!.MSG).toMatch(/^ERROR onestor-agent is not installed on this host/);
  });
});
