/**
 * Builds VMs the way OpenNebula's ssh transfer driver (OneStor, with a REPLICA_HOST) lays them out on a
 * hypervisor, and starts them as transient domains the way the kvm driver does (DESIGN.md §2):
 *
 *   DS/.monitor                          "ssh"
 *   DS/VMID/vm.xml, ds.xml, deployment.0
 *   DS/VMID/disk.N -> disk.N.snap/base.1
 *   DS/VMID/disk.N.snap/base             qcow2 (the image copy)
 *   DS/VMID/disk.N.snap/base.1           qcow2 overlay, stored backing name "disk.N.snap/base"
 *   DS/VMID/disk.N.snap/disk.N.snap -> .
 *
 * The domain names the real path .../disk.N.snap/base.1 (OpenNebula >= 6.8) and libvirt discovers the chain.
 */
import { existsSync } from 'node:fs';
import { mkdir, symlink, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { XMLParser } from 'fast-xml-parser';
import { run } from '../lib/shared/exec.js';
import type { Libvirtd } from './libvirtd.js';

export interface DataRegion {
  offsetMiB: number;
  lengthMiB: number;
  /** Byte value written over the whole region (0..255). */
  pattern: number;
}

export interface OneDiskSpec {
  diskId: number;
  sizeMiB: number;
  /** RECOVERY_SNAPSHOT_FREQ in seconds; absent = disk not protected. */
  freq?: number;
  /** Written into disk.N.snap/base. */
  baseData?: DataRegion[];
  /** Written into disk.N.snap/base.1 before the domain starts. */
  overlayData?: DataRegion[];
}

export interface CreateOneVmOptions {
  /** DATASTORE_LOCATION */
  dsRoot: string;
  dsId: number;
  vmId: number;
  /** REPLICA_HOST in ds.xml; '' leaves the attribute out (an unprotected datastore). */
  replicaHost: string;
  disks: OneDiskSpec[];
  /** Adds a qemu-ga virtio-serial channel; nothing answers on it. */
  guestAgentChannel?: boolean;
  /** Domain name, also /VM/DEPLOY_ID. Default one-VMID. '' writes an empty DEPLOY_ID and names the domain one-VMID. */
  deployId?: string;
  memoryMiB?: number;
  /** Write the files but do not start the domain. */
  noStart?: boolean;
}

export interface OneVmDisk {
  diskId: number;
  /** vda, vdb, ... in the order of `disks` */
  target: string;
  /** DS/VMID/disk.N (the symlink) */
  diskPath: string;
  /** DS/VMID/disk.N.snap */
  snapDir: string;
  basePath: string;
  base1Path: string;
  freq?: number;
}

export interface OneVm {
  vmId: number;
  dsId: number;
  dsDir: string;
  vmDir: string;
  domainName: string;
  disks: OneVmDisk[];
  /** Starts the domain (again) from deployment.0, e.g. after destroy() to mimic a transient re-create. */
  start(): Promise<void>;
  /** virsh destroy (+ undefine if it became persistent). Leaves every file in place. */
  destroy(): Promise<void>;
}

/** Makes DS (numeric dir under DATASTORE_LOCATION) and its .monitor file, as the ssh driver's monitor does. */
export async function createSystemDatastore(
  root: string,
  dsId: number,
  opts: { replicaHost: string; tmMad?: string },
): Promise<{ dsDir: string }> {
  assertId('dsId', dsId);
  const dsDir = join(root, String(dsId));
  await mkdir(dsDir, { recursive: true, mode: 0o755 });
  // Upstream writes it with `echo`, hence the newline.
  await writeFile(join(dsDir, '.monitor'), `${opts.tmMad ?? 'ssh'}\n`);
  return { dsDir };
}

export async function createOneVm(lv: Libvirtd, opts: CreateOneVmOptions): Promise<OneVm> {
  assertId('dsId', opts.dsId);
  assertId('vmId', opts.vmId);
  if (opts.disks.length === 0) throw new Error('createOneVm: at least one disk');
  if (opts.disks.length > 26) throw new Error('createOneVm: at most 26 disks (vda..vdz)');
  const ids = new Set(opts.disks.map((d) => d.diskId));
  if (ids.size !== opts.disks.length) throw new Error('createOneVm: duplicate diskId');

  const dsDir = join(opts.dsRoot, String(opts.dsId));
  const vmDir = join(dsDir, String(opts.vmId));
  await mkdir(vmDir, { recursive: true, mode: 0o755 });
  const domainName = opts.deployId || `one-${opts.vmId}`;

  const disks: OneVmDisk[] = [];
  for (const [index, spec] of opts.disks.entries()) {
    assertId('diskId', spec.diskId);
    const snapName = `disk.${spec.diskId}.snap`;
    const snapDir = join(vmDir, snapName);
    const basePath = join(snapDir, 'base');
    const base1Path = join(snapDir, 'base.1');
    await mkdir(snapDir, { mode: 0o755 });
    await qemuImg(['create', '-q', '-f', 'qcow2', basePath, `${spec.sizeMiB}M`]);
    for (const region of spec.baseData ?? []) await qemuIoWrite(basePath, region);
    // Self-link first: the stored backing name "disk.N.snap/base" is resolved relative to base.1's dir.
    await symlink('.', join(snapDir, snapName));
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', `${snapName}/base`, '-F', 'qcow2', base1Path]);
    for (const region of spec.overlayData ?? []) await qemuIoWrite(base1Path, region);
    const diskPath = join(vmDir, `disk.${spec.diskId}`);
    await symlink(`${snapName}/base.1`, diskPath);
    const disk: OneVmDisk = {
      diskId: spec.diskId,
      target: `vd${String.fromCharCode(97 + index)}`,
      diskPath,
      snapDir,
      basePath,
      base1Path,
    };
    if (spec.freq !== undefined) disk.freq = spec.freq;
    disks.push(disk);
  }

  const now = Math.floor(Date.now() / 1000);
  const host = hostname();
  await writeFile(
    join(vmDir, 'vm.xml'),
    renderVmXml({
      vmId: opts.vmId,
      dsId: opts.dsId,
      dsRoot: opts.dsRoot,
      deployId: opts.deployId ?? `one-${opts.vmId}`,
      hostname: host,
      memoryMiB: opts.memoryMiB ?? 32,
      stime: now,
      disks: disks.map((d, i) => ({ ...d, sizeMiB: opts.disks[i]!.sizeMiB })),
    }),
  );
  await writeFile(
    join(vmDir, 'ds.xml'),
    renderDsXml({ dsId: opts.dsId, dsRoot: opts.dsRoot, replicaHost: opts.replicaHost }),
  );
  const deploymentPath = join(vmDir, 'deployment.0');
  await writeFile(
    deploymentPath,
    renderDomainXml({
      name: domainName,
      type: lv.domainType,
      memoryMiB: opts.memoryMiB ?? 32,
      disks: disks.map((d) => ({ source: d.base1Path, target: d.target })),
      guestAgentChannel: opts.guestAgentChannel ?? false,
    }),
  );

  const start = async () => {
    // Transient, as the kvm driver does: `virsh create`.
    await lv.virshOk(['create', deploymentPath]);
  };
  if (!opts.noStart) await start();

  return {
    vmId: opts.vmId,
    dsId: opts.dsId,
    dsDir,
    vmDir,
    domainName,
    disks,
    start,
    destroy: async () => {
      const state = await lv.virsh(['domstate', domainName]);
      if (state.code !== 0) return; // gone already
      if (!state.stdout.includes('shut off')) await lv.virshOk(['destroy', domainName]);
      const info = await lv.virsh(['dominfo', domainName]);
      if (info.code === 0 && /^Persistent:\s+yes/m.test(info.stdout)) {
        await lv.virshOk(['undefine', domainName, '--checkpoints-metadata', '--snapshots-metadata']);
      }
    },
  };
}

// ---------------------------------------------------------------------------------------------------------
// Documents. Pure functions so tests of parsers can also use them as fixtures.

export interface VmXmlParams {
  vmId: number;
  dsId: number;
  dsRoot: string;
  /** '' writes an empty DEPLOY_ID (VM not deployed yet when vm.xml was written). */
  deployId: string;
  hostname: string;
  memoryMiB: number;
  stime: number;
  disks: Array<{ diskId: number; target: string; sizeMiB: number; freq?: number }>;
}

/** CDATA as OpenNebula's to_xml writes text values; "]]>" split so any string survives. */
function cdata(value: string | number): string {
  return `<![CDATA[${String(value).split(']]>').join(']]]]><![CDATA[>')}]]>`;
}

const PERMISSIONS_VM =
  '<PERMISSIONS><OWNER_U>1</OWNER_U><OWNER_M>1</OWNER_M><OWNER_A>0</OWNER_A><GROUP_U>0</GROUP_U><GROUP_M>0</GROUP_M>' +
  '<GROUP_A>0</GROUP_A><OTHER_U>0</OTHER_U><OTHER_M>0</OTHER_M><OTHER_A>0</OTHER_A></PERMISSIONS>';
const PERMISSIONS_DS =
  '<PERMISSIONS><OWNER_U>1</OWNER_U><OWNER_M>1</OWNER_M><OWNER_A>0</OWNER_A><GROUP_U>1</GROUP_U><GROUP_M>0</GROUP_M>' +
  '<GROUP_A>0</GROUP_A><OTHER_U>0</OTHER_U><OTHER_M>0</OTHER_M><OTHER_A>0</OTHER_A></PERMISSIONS>';

/** The <VM> document (vm.xsd) a front-end sends at deploy for a RUNNING VM on an ssh system datastore. */
export function renderVmXml(p: VmXmlParams): string {
  const imageDsId = 1;
  const disks = p.disks
    .map((d, i) => {
      const imageId = 100 + d.diskId;
      const fields: Array<[string, string | number]> = [
        ['ALLOW_ORPHANS', 'FORMAT'],
        ['CLONE', 'YES'],
        ['CLONE_TARGET', 'SYSTEM'],
        ['CLUSTER_ID', '0'],
        ['DATASTORE', 'default'],
        ['DATASTORE_ID', String(imageDsId)],
        ['DEV_PREFIX', 'vd'],
        ['DISK_ID', String(d.diskId)],
        ['DISK_SNAPSHOT_TOTAL_SIZE', '0'],
        ['DISK_TYPE', 'FILE'],
        ['DRIVER', 'qcow2'],
        ['FORMAT', 'qcow2'],
        ['IMAGE', `onestor-test-disk-${i}`],
        ['IMAGE_ID', String(imageId)],
        ['IMAGE_STATE', '2'],
        ['IMAGE_UID', '0'],
        ['IMAGE_UNAME', 'oneadmin'],
        ['LN_TARGET', 'SYSTEM'],
        ['ORIGINAL_SIZE', String(d.sizeMiB)],
        ['READONLY', 'NO'],
      ];
      if (d.freq !== undefined) fields.push(['RECOVERY_SNAPSHOT_FREQ', String(d.freq)]);
      fields.push(
        ['SAVE', 'NO'],
        ['SIZE', String(d.sizeMiB)],
        ['SOURCE', `${p.dsRoot}/${imageDsId}/${imageHash(p.vmId, d.diskId)}`],
        ['TARGET', d.target],
        ['TM_MAD', 'ssh'],
        ['TM_MAD_SYSTEM', 'ssh'],
        ['TYPE', 'FILE'],
      );
      return `<DISK>${fields.map(([k, v]) => `<${k}>${cdata(v)}</${k}>`).join('')}</DISK>`;
    })
    .join('');
  const history =
    `<HISTORY><OID>${p.vmId}</OID><SEQ>0</SEQ><HOSTNAME>${cdata(p.hostname)}</HOSTNAME><HID>0</HID><CID>0</CID>` +
    `<STIME>${p.stime}</STIME><ETIME>0</ETIME><VM_MAD>${cdata('kvm')}</VM_MAD><TM_MAD>${cdata('ssh')}</TM_MAD>` +
    `<DS_ID>${p.dsId}</DS_ID><PLAN_ID>-1</PLAN_ID><ACTION_ID>-1</ACTION_ID><PSTIME>${p.stime}</PSTIME>` +
    `<PETIME>${p.stime}</PETIME><RSTIME>${p.stime}</RSTIME><RETIME>0</RETIME><ESTIME>0</ESTIME><EETIME>0</EETIME>` +
    `<ACTION>0</ACTION><UID>-1</UID><GID>-1</GID><REQUEST_ID>-1</REQUEST_ID></HISTORY>`;
  return (
    `<VM><ID>${p.vmId}</ID><UID>0</UID><GID>0</GID><UNAME>oneadmin</UNAME><GNAME>oneadmin</GNAME>` +
    `<NAME>${cdata(`onestor-test-${p.vmId}`)}</NAME>${PERMISSIONS_VM}<LAST_POLL>0</LAST_POLL>` +
    // STATE 3 = ACTIVE, LCM_STATE 3 = RUNNING
    `<STATE>3</STATE><LCM_STATE>3</LCM_STATE><PREV_STATE>3</PREV_STATE><PREV_LCM_STATE>3</PREV_LCM_STATE>` +
    `<RESCHED>0</RESCHED><STIME>${p.stime}</STIME><ETIME>0</ETIME><DEPLOY_ID>${cdata(p.deployId)}</DEPLOY_ID>` +
    `<MONITORING/><SCHED_ACTIONS/>` +
    `<TEMPLATE><AUTOMATIC_DS_REQUIREMENTS>${cdata('("CLUSTERS/ID" @> 0)')}</AUTOMATIC_DS_REQUIREMENTS>` +
    `<AUTOMATIC_NIC_REQUIREMENTS>${cdata('("CLUSTERS/ID" @> 0)')}</AUTOMATIC_NIC_REQUIREMENTS>` +
    `<AUTOMATIC_REQUIREMENTS>${cdata('(CLUSTER_ID = 0) & !(PUBLIC_CLOUD = YES) & !(PIN_POLICY = PINNED)')}</AUTOMATIC_REQUIREMENTS>` +
    `<CPU>${cdata('0.1')}</CPU>${disks}<MEMORY>${cdata(p.memoryMiB)}</MEMORY>` +
    `<OS><ARCH>${cdata('x86_64')}</ARCH></OS><TEMPLATE_ID>${cdata('0')}</TEMPLATE_ID>` +
    `<TM_MAD_SYSTEM>${cdata('ssh')}</TM_MAD_SYSTEM><VCPU>${cdata('1')}</VCPU><VMID>${cdata(p.vmId)}</VMID></TEMPLATE>` +
    `<USER_TEMPLATE><HYPERVISOR>${cdata('kvm')}</HYPERVISOR></USER_TEMPLATE>` +
    `<HISTORY_RECORDS>${history}</HISTORY_RECORDS>` +
    `<BACKUPS><BACKUP_CONFIG/><BACKUP_IDS/></BACKUPS></VM>`
  );
}

/** The <DATASTORE> document (datastore.xsd) of an ssh system datastore with a replica host. */
export function renderDsXml(p: { dsId: number; dsRoot: string; replicaHost: string }): string {
  const template: Array<[string, string]> = [
    ['ALLOW_ORPHANS', 'NO'],
    ['DISK_TYPE', 'FILE'],
    ['DS_MIGRATE', 'YES'],
  ];
  if (p.replicaHost !== '') template.push(['REPLICA_HOST', p.replicaHost]);
  template.push(
    ['RESTRICTED_DIRS', '/'],
    ['SAFE_DIRS', '/var/tmp'],
    ['SHARED', 'NO'],
    ['TM_MAD', 'ssh'],
    ['TYPE', 'SYSTEM_DS'],
  );
  return (
    `<DATASTORE><ID>${p.dsId}</ID><UID>0</UID><GID>0</GID><UNAME>oneadmin</UNAME><GNAME>oneadmin</GNAME>` +
    `<NAME>${cdata('system')}</NAME>${PERMISSIONS_DS}<DS_MAD>${cdata('-')}</DS_MAD><TM_MAD>${cdata('ssh')}</TM_MAD>` +
    `<BASE_PATH>${cdata(`${p.dsRoot}/${p.dsId}`)}</BASE_PATH><TYPE>1</TYPE><DISK_TYPE>0</DISK_TYPE><STATE>0</STATE>` +
    `<CLUSTERS><ID>0</ID></CLUSTERS><TOTAL_MB>0</TOTAL_MB><FREE_MB>0</FREE_MB><USED_MB>0</USED_MB><IMAGES/>` +
    `<TEMPLATE>${template.map(([k, v]) => `<${k}>${cdata(v)}</${k}>`).join('')}</TEMPLATE></DATASTORE>`
  );
}

/**
 * The guest's firmware. The guest has no OS either way; SeaBIOS spends ~3 s of CPU in real mode per start
 * where KVM is nested and emulates it, qboot (shipped with qemu-system-data) finds nothing to boot and
 * halts at once. Falls back to QEMU's default where it is missing.
 */
const QBOOT = '/usr/share/qemu/qboot.rom';
const firmwareXml = (): string => (existsSync(QBOOT) ? `    <loader type='rom'>${QBOOT}</loader>\n` : '');

/** A firmware-only guest: no OS, no NIC, no balloon; virtio qcow2 disks naming the real base.1 path. */
export function renderDomainXml(p: {
  name: string;
  type: 'kvm' | 'qemu';
  memoryMiB: number;
  disks: Array<{ source: string; target: string }>;
  guestAgentChannel: boolean;
}): string {
  const disks = p.disks
    .map(
      (d) =>
        `    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2' discard='unmap'/>\n` +
        `      <source file='${xmlAttr(d.source)}'/>\n      <target dev='${d.target}' bus='virtio'/>\n    </disk>\n`,
    )
    .join('');
  const channel = p.guestAgentChannel
    ? `    <channel type='unix'>\n      <source mode='bind'/>\n      <target type='virtio' name='org.qemu.guest_agent.0'/>\n    </channel>\n`
    : '';
  return (
    `<domain type='${p.type}'>\n  <name>${xmlText(p.name)}</name>\n  <memory unit='MiB'>${p.memoryMiB}</memory>\n` +
    `  <vcpu>1</vcpu>\n  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n${firmwareXml()}  </os>\n` +
    `  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n` +
    `  <devices>\n${disks}${channel}    <memballoon model='none'/>\n  </devices>\n</domain>\n`
  );
}

// ---------------------------------------------------------------------------------------------------------
// Live views of a domain.

export interface LiveDisk {
  target: string;
  /** <source file> of the top image as libvirt has it */
  source: string;
  /** QOM device id, e.g. virtio-disk0 */
  alias: string;
  /** <source file> of each backing image, top-down */
  backingChain: string[];
}

/** Disks of a running domain from its live XML (what libvirt really uses). */
export async function domainDisks(lv: Libvirtd, domain: string): Promise<LiveDisk[]> {
  const xml = await lv.virshOk(['dumpxml', domain]);
  return parseDomainDisks(xml);
}

/** target -> source as `virsh domblklist` prints it. */
export async function domainDiskSources(lv: Libvirtd, domain: string): Promise<Map<string, string>> {
  const out = await lv.virshOk(['domblklist', domain]);
  const map = new Map<string, string>();
  for (const line of out.split('\n').slice(2)) {
    const m = /^\s*(\S+)\s+(.+?)\s*$/.exec(line);
    if (m) map.set(m[1]!, m[2]!);
  }
  return map;
}

type XmlNode = Record<string, unknown>;

export function parseDomainDisks(domainXml: string): LiveDisk[] {
  const parser = new XMLParser({
    ignoreAttributes: false,
    attributeNamePrefix: '@',
    isArray: (name) => name === 'disk',
  });
  const doc = parser.parse(domainXml) as XmlNode;
  const devices = ((doc.domain as XmlNode | undefined)?.devices ?? {}) as XmlNode;
  const disks = (devices.disk ?? []) as XmlNode[];
  return disks
    .filter((d) => d['@device'] === 'disk')
    .map((d) => {
      const chain: string[] = [];
      let store = d.backingStore as XmlNode | string | undefined;
      while (store && typeof store === 'object' && store.source) {
        chain.push(String((store.source as XmlNode)['@file'] ?? ''));
        store = store.backingStore as XmlNode | string | undefined;
      }
      return {
        target: String((d.target as XmlNode | undefined)?.['@dev'] ?? ''),
        source: String((d.source as XmlNode | undefined)?.['@file'] ?? ''),
        alias: String((d.alias as XmlNode | undefined)?.['@name'] ?? ''),
        backingChain: chain,
      };
    });
}

// ---------------------------------------------------------------------------------------------------------

async function qemuImg(args: string[]): Promise<string> {
  const r = await run('qemu-img', args, { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`qemu-img ${args.join(' ')} failed: ${r.stderr.trim()}`);
  return r.stdout;
}

/** Writes a pattern into an image that nothing else has open. */
export async function qemuIoWrite(image: string, region: DataRegion): Promise<void> {
  assertRegion(region);
  const cmd = `write -P 0x${region.pattern.toString(16).padStart(2, '0')} ${region.offsetMiB}M ${region.lengthMiB}M`;
  const r = await run('qemu-io', ['-f', 'qcow2', '-c', cmd, image], { timeoutMs: 60_000 });
  // qemu-io exits 0 even when the command failed; its text says so.
  if (r.code !== 0 || !/^wrote \d+\/\d+ bytes/m.test(r.stdout) || /failed|error/i.test(r.stdout + r.stderr)) {
    throw new Error(`qemu-io ${cmd} on ${image} failed: ${(r.stdout + r.stderr).trim()}`);
  }
}

export function assertRegion(region: DataRegion): void {
  const { offsetMiB, lengthMiB, pattern } = region;
  if (!Number.isInteger(offsetMiB) || offsetMiB < 0) throw new Error(`bad offsetMiB ${offsetMiB}`);
  if (!Number.isInteger(lengthMiB) || lengthMiB <= 0) throw new Error(`bad lengthMiB ${lengthMiB}`);
  if (!Number.isInteger(pattern) || pattern < 0 || pattern > 255) throw new Error(`bad pattern ${pattern}`);
}

function assertId(name: string, value: number): void {
  if (!Number.isInteger(value) || value < 0) throw new Error(`createOneVm: ${name} must be a non-negative integer, got ${value}`);
}

/** Image datastore files are named by an md5-like hash upstream; any stable hex string will do here. */
function imageHash(vmId: number, diskId: number): string {
  return ((vmId * 1_000_003 + diskId * 7919) >>> 0).toString(16).padStart(8, '0').repeat(4);
}

function xmlAttr(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/'/g, '&apos;').replace(/"/g, '&quot;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

function xmlText(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}
