/**
 * The virsh parsers on output captured from the real virsh 9.0 (test/fixtures/virsh, see its README),
 * plus hostile and malformed input: each must give typed data or an E_VIRSH error naming the command.
 */
import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { OnestorError } from '../../lib/shared/errors.js';
import {
  classifyVirshError,
  parseBlockList,
  parseCapabilities,
  parseCheckpointList,
  parseCheckpointNames,
  parseCheckpointXml,
  parseDomainInfo,
  parseDomainList,
  parseDomainNames,
  parseDomainState,
  parseDomainXml,
  parseFsFreezeCount,
  parseJobInfo,
  parseVersion,
} from '../../lib/libvirt/virsh-parse.js';

const FIXTURES = fileURLToPath(new URL('../fixtures/virsh/', import.meta.url));
const out = (name: string) => readFileSync(`${FIXTURES}${name}.out`, 'utf8');
const err = (name: string) => readFileSync(`${FIXTURES}${name}.err`, 'utf8');

/** Runs fn, expects an E_VIRSH OnestorError whose message matches, returns it. */
function expectParseError(fn: () => unknown, message: RegExp): OnestorError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(OnestorError);
    const oe = e as OnestorError;
    expect(oe.code).toBe('E_VIRSH');
    expect(oe.message).toMatch(message);
    return oe;
  }
  throw new Error('expected a parse error, got none');
}

describe('list', () => {
  it('parses the --all table including a name with spaces and an inactive domain', () => {
    expect(parseDomainList(out('list-all'))).toEqual([
      { id: 1, name: 'one-7', state: 'running' },
      { id: 2, name: 'web server 1', state: 'paused' },
      { id: null, name: 'one-8', state: 'shut off' },
    ]);
  });

  it('parses an empty table and empty --name output', () => {
    expect(parseDomainList(out('list-empty-table'))).toEqual([]);
    expect(parseDomainNames(out('list-empty-name'))).toEqual([]);
  });

  it('keeps names verbatim in --name output', () => {
    expect(parseDomainNames(out('list-all-name'))).toEqual(['one-7', 'web server 1', 'one-8']);
  });

  it('rejects unexpected columns, a missing dashes line, unknown states and garbage', () => {
    const cols = expectParseError(
      () => parseDomainList(' Id   Name   State   Autostart\n----------\n 1   a   running   yes\n'),
      /virsh list.*columns/,
    );
    expect(cols.context.field).toBe('list');
    expectParseError(() => parseDomainList(' Id   Name   State\n 1    a    running\n'), /dashes/);
    expectParseError(() => parseDomainList(' Id   Name   State\n------\n 1    a    exploded\n'), /row .* is not/);
    expectParseError(() => parseDomainList(' Id   Name   State\n------\n x    a    running\n'), /row .* is not/);
    expectParseError(() => parseDomainList(''), /empty output/);
    expectParseError(() => parseDomainList('\u0000\u0001garbage\n'), /columns/);
  });

  it('does not take the end of a name for the state', () => {
    // a domain literally named "db running" that is paused
    const table = ' Id   Name         State\n---------------------------\n 3    db running   paused\n';
    expect(parseDomainList(table)).toEqual([{ id: 3, name: 'db running', state: 'paused' }]);
  });
});

describe('domstate / dominfo', () => {
  it('parses state and reason', () => {
    expect(parseDomainState(out('domstate-running'))).toEqual({ state: 'running', reason: 'booted' });
    expect(parseDomainState(out('domstate-paused'))).toEqual({ state: 'paused', reason: 'user' });
    expect(parseDomainState(out('domstate-shutoff'))).toEqual({ state: 'shut off', reason: 'unknown' });
    expect(parseDomainState(out('domstate-crashed'))).toEqual({ state: 'shut off', reason: 'crashed' });
    expect(parseDomainState('running\n')).toEqual({ state: 'running', reason: null });
  });

  it('rejects unknown states and empty output, naming the domain', () => {
    const e = expectParseError(() => parseDomainState('sleeping (tired)\n', { domain: 'one-7', vm: 7 }), /domstate.*one-7.*not a known state/);
    expect(e.context.vm).toBe(7);
    expectParseError(() => parseDomainState('\n\n'), /empty output/);
  });

  it('parses dominfo persistence', () => {
    expect(parseDomainInfo(out('dominfo-transient'))).toEqual({
      id: 5,
      name: 'one-7',
      uuid: '7248d666-6c75-4153-ba42-98e18aaadce9',
      state: 'running',
      persistent: false,
    });
    expect(parseDomainInfo(out('dominfo-persistent')).persistent).toBe(true);
    expectParseError(() => parseDomainInfo('Id: 1\nName: x\nUUID: u\nState: running\n'), /no "Persistent:" line/);
    expectParseError(() => parseDomainInfo('Id: 1\nName: x\nUUID: u\nState: running\nPersistent: maybe\n'), /not yes\/no/);
  });
});

describe('domblklist --details', () => {
  it('parses rows, an empty cdrom as null source', () => {
    expect(parseBlockList(out('domblklist-details'))).toEqual([
      { type: 'file', device: 'disk', target: 'vda', source: '/var/lib/one/datastores/0/7/disk.0.snap/base.1' },
      { type: 'file', device: 'disk', target: 'vdb', source: '/var/lib/one/datastores/0/7/disk.1' },
      { type: 'file', device: 'cdrom', target: 'hda', source: null },
    ]);
    expect(parseBlockList(out('domblklist-spaces'))).toEqual([
      { type: 'file', device: 'disk', target: 'sda', source: '/var/lib/libvirt/images/web/d.qcow2' },
    ]);
  });

  it('keeps spaces inside a source path', () => {
    const t = ' Type   Device   Target   Source\n------------------\n file   disk     vda      /srv/my images/a b.qcow2\n';
    expect(parseBlockList(t)[0]?.source).toBe('/srv/my images/a b.qcow2');
  });

  it('rejects the table without --details and truncated rows', () => {
    expectParseError(() => parseBlockList(' Target   Source\n------\n vda      /x\n'), /columns/);
    expectParseError(() => parseBlockList(' Type   Device   Target   Source\n------\n file disk\n'), /row .* is not/);
  });
});

describe('dumpxml', () => {
  it('parses a running OneStor domain: disks, backing chain, alias, agent channel', () => {
    const d = parseDomainXml(out('dumpxml-running'));
    expect(d).toMatchObject({ name: 'one-7', uuid: '9b589800-adac-4cb8-80f0-6629af947220', type: 'kvm', id: 1 });
    expect(d.hasGuestAgentChannel).toBe(true);
    expect(d.guestAgentState).toBe('disconnected');
    expect(d.disks).toEqual([
      {
        type: 'file',
        device: 'disk',
        target: 'vda',
        bus: 'virtio',
        driverType: 'qcow2',
        source: '/var/lib/one/datastores/0/7/disk.0.snap/base.1',
        alias: 'virtio-disk0',
        readonly: false,
        backingChain: [{ source: '/var/lib/one/datastores/0/7/disk.0.snap/disk.0.snap/base', format: 'qcow2' }],
      },
      {
        type: 'file',
        device: 'disk',
        target: 'vdb',
        bus: 'virtio',
        driverType: 'raw',
        source: '/var/lib/one/datastores/0/7/disk.1',
        alias: 'virtio-disk1',
        readonly: false,
        backingChain: [],
      },
      {
        type: 'file',
        device: 'cdrom',
        target: 'hda',
        bus: 'ide',
        driverType: null,
        source: null,
        alias: 'ide0-0-0',
        readonly: true,
        backingChain: [],
      },
    ]);
  });

  it('parses inactive XML (no id, no alias, no chain) and a domain without agent channel', () => {
    const d = parseDomainXml(out('dumpxml-inactive'));
    expect(d).toMatchObject({ name: 'one-8', id: null, hasGuestAgentChannel: false, guestAgentState: null });
    expect(d.disks[0]).toMatchObject({ target: 'vda', alias: null, backingChain: [] });
    // a transient domain's --inactive XML is its live definition without the id: aliases stay
    const t = parseDomainXml(out('dumpxml-inactive-transient'));
    expect(t).toMatchObject({ name: 'one-7', id: null, hasGuestAgentChannel: true });
    expect(t.disks[0]).toMatchObject({ alias: 'virtio-disk0', source: '/var/lib/one/datastores/0/7/disk.0.snap/base.1' });
    const w = parseDomainXml(out('dumpxml-spaces'));
    expect(w.name).toBe('web server 1');
    expect(w.disks.map((x) => [x.target, x.bus])).toEqual([['sda', 'scsi']]);
  });

  it('decodes the predefined entities in names and paths', () => {
    const xml = `<domain type='kvm'><name>a&amp;b &lt;x&gt;</name><uuid>u</uuid><devices>
      <disk type='file' device='disk'><source file='/d/it&apos;s.qcow2'/><target dev='vda'/></disk></devices></domain>`;
    const d = parseDomainXml(xml);
    expect(d.name).toBe('a&b <x>');
    expect(d.disks[0]?.source).toBe("/d/it's.qcow2");
  });

  it('parses block and network sources and a deep chain', () => {
    const xml = `<domain type='qemu'><name>n</name><uuid>u</uuid><devices>
      <disk type='block' device='disk'><driver type='raw'/><source dev='/dev/vg/lv'/><target dev='vdb' bus='virtio'/></disk>
      <disk type='network' device='disk'><source protocol='rbd' name='pool/img'/><target dev='vdc'/></disk>
      <disk type='file' device='disk'><source file='/a/3'/>
        <backingStore type='file'><format type='qcow2'/><source file='/a/2'/>
          <backingStore type='file'><format type='raw'/><source file='/a/1'/><backingStore/></backingStore>
        </backingStore><target dev='vdd'/></disk></devices></domain>`;
    const d = parseDomainXml(xml);
    expect(d.disks.map((x) => x.source)).toEqual(['/dev/vg/lv', 'rbd:pool/img', '/a/3']);
    expect(d.disks[2]?.backingChain).toEqual([
      { source: '/a/2', format: 'qcow2' },
      { source: '/a/1', format: 'raw' },
    ]);
  });

  it('rejects truncated XML, the wrong root, missing fields, DOCTYPE and garbage', () => {
    const full = out('dumpxml-running');
    expectParseError(() => parseDomainXml(full.slice(0, Math.floor(full.length / 2))), /malformed XML/);
    expectParseError(() => parseDomainXml(out('checkpoint-dumpxml-nodomain')), /root element is <domaincheckpoint>, expected <domain>/);
    expectParseError(() => parseDomainXml("<domain type='kvm'><uuid>u</uuid></domain>"), /without <name>/);
    expectParseError(() => parseDomainXml("<domain><name>x</name><uuid>u</uuid></domain>"), /without a type/);
    expectParseError(
      () => parseDomainXml("<domain type='kvm'><name>x</name><uuid>u</uuid><devices><disk><source file='/f'/></disk></devices></domain>"),
      /no <target dev/,
    );
    expectParseError(() => parseDomainXml("<domain type='kvm' id='one'><name>x</name><uuid>u</uuid></domain>"), /id .* is not a number/);
    const laughs = `<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]><domain type='kvm'><name>&b;</name><uuid>u</uuid></domain>`;
    expectParseError(() => parseDomainXml(laughs), /DOCTYPE/);
    expectParseError(() => parseDomainXml(''), /empty output/);
    expectParseError(() => parseDomainXml('error: failed to get domain'), /malformed XML|root element/);
  });

  it('refuses a runaway backing chain', () => {
    let chain = '<backingStore/>';
    for (let i = 0; i < 70; i++) chain = `<backingStore type='file'><format type='qcow2'/><source file='/b/${i}'/>${chain}</backingStore>`;
    const xml = `<domain type='kvm'><name>x</name><uuid>u</uuid><devices><disk type='file' device='disk'><source file='/a'/>${chain}<target dev='vda'/></disk></devices></domain>`;
    expectParseError(() => parseDomainXml(xml), /deeper than 64/);
  });
});

describe('checkpoints', () => {
  it('parses --name output', () => {
    expect(parseCheckpointNames(out('checkpoint-list-name'))).toEqual(['onestor-1700000001', 'onestor-1700000002']);
    expect(parseCheckpointNames(out('checkpoint-list-empty'))).toEqual([]);
    expect(parseCheckpointNames(out('checkpoint-list-after-recreate'))).toEqual([]);
  });

  it('parses --parent output; the table time agrees with the XML creationTime', () => {
    const list = parseCheckpointList(out('checkpoint-list-parent'));
    const second = parseCheckpointXml(out('checkpoint-dumpxml-nodomain'));
    expect(list).toEqual([
      { name: 'onestor-1700000001', creationTime: 1795513506, parent: null },
      { name: 'onestor-1700000002', creationTime: second.creationTime, parent: 'onestor-1700000001' },
    ]);
    expect(parseCheckpointList(out('checkpoint-list-empty-parent'))).toEqual([]);
    expect(parseCheckpointList(out('checkpoint-list-parent-redefined'))).toEqual([
      { name: 'onestor-1700000002', creationTime: 1795513517, parent: null },
    ]);
  });

  it('applies the timezone offset of the table', () => {
    const t = ' Name   Creation Time   Parent\n-----------\n ck     2026-11-24 11:45:17 +0200   \n';
    expect(parseCheckpointList(t)[0]?.creationTime).toBe(1795513517);
  });

  it('rejects malformed checkpoint tables', () => {
    expectParseError(() => parseCheckpointList(' Name   Creation Time\n-------\n'), /columns/);
    expectParseError(() => parseCheckpointList(' Name   Creation Time   Parent\n-------\n ck  yesterday\n'), /row .* is not/);
  });

  it('parses checkpoint-dumpxml: parent, bitmap, size, and broken bitmap (no size)', () => {
    expect(parseCheckpointXml(out('checkpoint-dumpxml-nodomain'))).toEqual({
      name: 'onestor-1700000002',
      parent: 'onestor-1700000001',
      creationTime: 1795513517,
      description: 'onestor-agent',
      hasDomain: false,
      disks: [
        { name: 'vda', checkpoint: 'bitmap', bitmap: 'onestor-1700000002' },
        { name: 'vdb', checkpoint: 'no', bitmap: null },
        { name: 'hda', checkpoint: 'no', bitmap: null },
      ],
    });
    const sized = parseCheckpointXml(out('checkpoint-dumpxml-size'));
    expect(sized.parent).toBeNull();
    expect(sized.disks[0]).toEqual({ name: 'vda', checkpoint: 'bitmap', bitmap: 'onestor-1700000001', size: 16777216 });
    const broken = parseCheckpointXml(out('checkpoint-dumpxml-size-broken'));
    expect(broken.disks).toEqual([{ name: 'vda', checkpoint: 'bitmap', bitmap: 'onestor-1700000100' }]);
    expect('size' in broken.disks[0]!).toBe(false);
    expect(parseCheckpointXml(out('checkpoint-dumpxml-size-redefined')).disks[0]?.size).toBe(0);
    const full = parseCheckpointXml(out('checkpoint-dumpxml-full'));
    expect(full.hasDomain).toBe(true);
    expect(full.name).toBe('onestor-1700000001');
  });

  it('rejects bad checkpoint XML', () => {
    expectParseError(() => parseCheckpointXml('<domaincheckpoint><name>x</name'), /malformed XML/);
    expectParseError(() => parseCheckpointXml('<domaincheckpoint><disks/></domaincheckpoint>'), /without <name>/);
    expectParseError(
      () => parseCheckpointXml("<domaincheckpoint><name>x</name><disks><disk name='vda' checkpoint='bitmap' size='-1'/></disks></domaincheckpoint>"),
      /size .* is not a number/,
    );
    expectParseError(
      () => parseCheckpointXml("<domaincheckpoint><name>x</name><disks><disk name='vda' checkpoint='external'/></disks></domaincheckpoint>"),
      /not bitmap\/no/,
    );
    expectParseError(() => parseCheckpointXml('<domaincheckpoint><name>x</name><creationTime>soon</creationTime></domaincheckpoint>'), /creationTime/);
  });
});

describe('domjobinfo', () => {
  it('parses None in human and raw form', () => {
    for (const f of ['domjobinfo-none', 'domjobinfo-none-completed', 'domjobinfo-none-keep', 'domjobinfo-completed-cleared']) {
      expect(parseJobInfo(out(f)).type, f).toBe('None');
    }
    expect(parseJobInfo(out('domjobinfo-none-raw'))).toMatchObject({ type: 'None', exact: true, operation: null });
  });

  it('parses a running push backup (human units) and a running pull backup (raw)', () => {
    expect(parseJobInfo(out('domjobinfo-running'))).toMatchObject({
      type: 'Unbounded',
      operation: 'Backup',
      timeElapsedMs: 74,
      diskProcessed: 244 * 1024 ** 2,
      diskRemaining: 12 * 1024 ** 2,
      diskTotal: 256 * 1024 ** 2,
      exact: false,
    });
    expect(parseJobInfo(out('domjobinfo-pull-raw'))).toEqual({
      type: 'Unbounded',
      operation: 'Backup',
      timeElapsedMs: 42,
      diskTempUsed: 0,
      diskTempTotal: 268435456,
      exact: true,
      raw: { 'Job type': '2', operation: '9', time_elapsed: '42', disk_temp_used: '0', disk_temp_total: '268435456' },
    });
  });

  it('parses completed stats; raw sizes are exact', () => {
    expect(parseJobInfo(out('domjobinfo-completed-raw'))).toMatchObject({
      type: 'Completed',
      operation: 'Backup',
      diskTotal: 16777216,
      diskProcessed: 16777216,
      diskRemaining: 0,
      success: true,
    });
    expect(parseJobInfo(out('domjobinfo-completed-raw')).errorMessage).toBeUndefined();
    expect(parseJobInfo(out('domjobinfo-completed'))).toMatchObject({ type: 'Completed', diskRemaining: 0, diskTotal: 256 * 1024 ** 2 });
  });

  it('shows a cancelled job by its error message although its type is Completed', () => {
    expect(parseJobInfo(out('domjobinfo-aborted-raw'))).toMatchObject({ type: 'Completed', success: true, errorMessage: 'Operation canceled' });
    expect(parseJobInfo(out('domjobinfo-aborted-completed'))).toMatchObject({ type: 'Completed', errorMessage: 'Operation canceled', timeElapsedMs: 30097 });
  });

  it('rejects garbage, unknown types and bad numbers', () => {
    expectParseError(() => parseJobInfo(''), /no "Job type:" line/);
    expectParseError(() => parseJobInfo('Job type: 9\n'), /unknown/);
    expectParseError(() => parseJobInfo('Job type:  Exploded\n'), /unknown/);
    expectParseError(() => parseJobInfo('Job type: 3\n\ndisk_total: lots\n'), /disk_total .* not a number/);
    expectParseError(() => parseJobInfo('Job type: Completed\nFile total: 12 parsecs\n'), /File total .* not a size/);
  });
});

describe('freeze, version, capabilities', () => {
  it('reads the freeze/thaw counts (format from virsh source, not captured: no guest agent here)', () => {
    expect(parseFsFreezeCount('Froze 3 filesystem(s)\n\n', 'Froze')).toBe(3);
    expect(parseFsFreezeCount('Thawed 0 filesystem(s)\n', 'Thawed')).toBe(0);
    expectParseError(() => parseFsFreezeCount('Froze some filesystem(s)', 'Froze'), /domfsfreeze.*expected "Froze N/);
    expectParseError(() => parseFsFreezeCount('Froze 3 filesystem(s)', 'Thawed'), /domfsthaw/);
  });

  it('parses version', () => {
    expect(parseVersion(out('version'))).toEqual({ library: 'libvirt 9.0.0', api: 'QEMU 9.0.0', hypervisor: 'QEMU 7.2.22' });
    expectParseError(() => parseVersion('hello'), /Using library/);
  });

  it('parses capabilities', () => {
    const c = parseCapabilities(readFileSync(`${FIXTURES}capabilities.xml`, 'utf8'));
    expect(c.kvm).toBe(true);
    expect(c.domainTypes.sort()).toEqual(['kvm', 'qemu']);
    expect(c.arches).toContain('x86_64');
    const tcgOnly = "<capabilities><host/><guest><arch name='x86_64'><domain type='qemu'/></arch></guest></capabilities>";
    expect(parseCapabilities(tcgOnly)).toEqual({ domainTypes: ['qemu'], kvm: false, arches: ['x86_64'] });
    expectParseError(() => parseCapabilities('<domain/>'), /expected <capabilities>/);
  });
});

describe('classifyVirshError', () => {
  const cases: Array<[string, string, string]> = [
    ['err-no-domain', 'no-domain', "failed to get domain 'no-such-vm'"],
    ['err-no-domain-uuid', 'no-domain', "failed to get domain '11111111-2222-3333-4444-555555555555'"],
    ['err-backup-no-domain', 'no-domain', "failed to get domain 'nope'"],
    ['err-no-checkpoint', 'no-checkpoint', "Domain checkpoint not found: no domain checkpoint with matching name 'ck-missing'"],
    ['err-checkpoint-dumpxml-after-recreate', 'no-checkpoint', "Domain checkpoint not found: no domain checkpoint with matching name 'onestor-1700000002'"],
    ['err-checkpoint-delete-missing', 'no-checkpoint', "Domain checkpoint not found: no domain checkpoint with matching name 'onestor-1700000100'"],
    ['err-checkpoint-inconsistent', 'checkpoint-inconsistent', "checkpoint inconsistent: missing or broken bitmap 'onestor-1700000100' for disk 'vda'"],
    [
      'err-checkpoint-delete-broken',
      'checkpoint-inconsistent',
      "Failed to delete checkpoint onestor-1700000100: internal error: bitmap 'onestor-1700000100' not found in backing chain of 'vda'",
    ],
    ['err-agent-unavailable', 'agent-unavailable', 'Unable to freeze filesystems: argument unsupported: QEMU guest agent is not configured'],
    ['err-agent-unavailable-thaw', 'agent-unavailable', 'Unable to thaw filesystems: argument unsupported: QEMU guest agent is not configured'],
    ['err-agent-not-connected', 'agent-not-connected', 'Unable to freeze filesystems: Guest agent is not responding: QEMU guest agent is not connected'],
    ['err-job-active', 'job-active', 'Timed out during operation: cannot acquire state change lock (held by monitor=remoteDispatchDomainBackupBegin)'],
    ['err-domjobabort-nojob', 'no-job', 'Requested operation is not valid: no job is active on the domain'],
    ['err-not-running-freeze', 'not-running', 'Unable to freeze filesystems: Requested operation is not valid: domain is not running'],
    ['err-freeze-paused', 'not-running', 'Unable to freeze filesystems: Requested operation is not valid: domain is not running'],
    ['err-jobinfo-not-running', 'not-running', 'Requested operation is not valid: domain is not running'],
    [
      'err-connection',
      'connection',
      "failed to connect to the hypervisor: Failed to connect socket to '/nonexistent/libvirt-sock': No such file or directory",
    ],
    ['err-checkpoint-redefine-garbage', 'other', "XML error: expecting root element of 'domaincheckpoint', not 'domainbackup'"],
    ['err-checkpoint-create-truncated', 'other', "(domain_checkpoint):2: expected '>'"],
  ];

  it.each(cases)('%s -> %s', (fixture, kind, message) => {
    expect(classifyVirshError(err(fixture))).toEqual({ kind, message });
  });

  it('falls back to the raw text when there is no "error:" line, and to a placeholder when empty', () => {
    expect(classifyVirshError('Segmentation fault\n')).toEqual({ kind: 'other', message: 'Segmentation fault' });
    expect(classifyVirshError('')).toEqual({ kind: 'other', message: 'no error text' });
  });

  it('a connection failure wins over what else the text mentions', () => {
    const text = "error: failed to get domain 'x'\nerror: Cannot recv data: Connection reset by peer\n";
    expect(classifyVirshError(text).kind).toBe('connection');
  });
});
