/** Pure pieces of the pull-mode seed: backup XML, export names from backup-dumpxml, qemu-img map's top layer. */
import { describe, expect, it } from 'vitest';
import { buildPullBackupXml, parsePullExports } from '../../lib/libvirt/backup-xml.js';
import { parseTopAllocation } from '../../lib/libvirt/qemu-img.js';

describe('pull-mode backup XML', () => {
  it('exports the due disks over a unix socket with a scratch file each; other disks are left out explicitly', () => {
    const xml = buildPullBackupXml(
      [
        { target: 'vda', mode: 'full', scratchFile: '/ds/.onestor/7/vda.scratch' },
        { target: 'vdb', mode: 'incremental', incrementalFrom: 'onestor-7-1-ab', scratchFile: "/ds/.onestor/7/vdb'.scratch" },
        { target: 'vdc', mode: null },
      ],
      '/ds/.onestor/7/nbd.sock',
    );
    expect(xml).toContain("<domainbackup mode='pull'>");
    expect(xml).toContain("<server transport='unix' socket='/ds/.onestor/7/nbd.sock'/>");
    expect(xml).toContain("<disk name='vda' backup='yes' type='file' backupmode='full'>");
    expect(xml).toContain("backupmode='incremental' incremental='onestor-7-1-ab'");
    expect(xml).toContain("<scratch file='/ds/.onestor/7/vdb&apos;.scratch'/>");
    expect(xml).toContain("<disk name='vdc' backup='no'/>");
  });

  it('refuses a socket path the kernel cannot bind, relative paths, and jobs without disks', () => {
    expect(() => buildPullBackupXml([{ target: 'vda', mode: 'full', scratchFile: '/s' }], '/' + 'x'.repeat(110))).toThrow(/longer than 107/);
    expect(() => buildPullBackupXml([{ target: 'vda', mode: 'full', scratchFile: '/s' }], 'nbd.sock')).toThrow(/absolute/);
    expect(() => buildPullBackupXml([{ target: 'vda', mode: 'full', scratchFile: 'rel' }], '/n.sock')).toThrow(/absolute/);
    expect(() => buildPullBackupXml([{ target: 'vda', mode: null }], '/n.sock')).toThrow(/without any disk/);
  });

  it('reads export names and bitmaps from backup-dumpxml (as libvirt 9.0 prints it)', () => {
    const dump = `<domainbackup mode='pull'>
  <server transport='unix' socket='/ds/.onestor/7/nbd.sock'/>
  <disks>
    <disk name='vda' backup='yes' type='file' backupmode='full' exportname='vda' index='3'>
      <driver type='qcow2'/>
      <scratch file='/ds/.onestor/7/vda.scratch'/>
    </disk>
    <disk name='vdb' backup='yes' type='file' backupmode='incremental' incremental='ck1' exportname='vdb' exportbitmap='backup-vdb' index='4'>
      <scratch file='/ds/.onestor/7/vdb.scratch'/>
    </disk>
    <disk name='vdc' backup='no'/>
  </disks>
</domainbackup>`;
    expect(parsePullExports(dump)).toEqual({
      socket: '/ds/.onestor/7/nbd.sock',
      exports: [
        { target: 'vda', exportName: 'vda' },
        { target: 'vdb', exportName: 'vdb', bitmap: 'backup-vdb' },
      ],
    });
  });
});

describe('qemu-img map: ranges of the top layer', () => {
  it('keeps depth 0 data and zero clusters, merges neighbours, drops what the backing file provides', () => {
    const json = JSON.stringify([
      { start: 0, length: 65536, depth: 1, present: true, zero: false, data: true, offset: 327680 },
      { start: 65536, length: 131072, depth: 0, present: true, zero: false, data: true, offset: 393216 },
      { start: 196608, length: 65536, depth: 0, present: true, zero: true, data: false },
      { start: 262144, length: 1048576, depth: 1, present: false, zero: true, data: false },
      { start: 1310720, length: 65536, depth: 0, present: true, zero: false, data: true, offset: 524288 },
    ]);
    expect(parseTopAllocation(json, 'f')).toEqual([
      { offset: 65536, length: 196608 },
      { offset: 1310720, length: 65536 },
    ]);
  });

  it('refuses output it does not understand', () => {
    expect(() => parseTopAllocation('not json', 'f')).toThrow(/invalid JSON/);
    expect(() => parseTopAllocation('{}', 'f')).toThrow(/not a list/);
    expect(() => parseTopAllocation('[{"start":0}]', 'f')).toThrow(/lacks/);
  });
});
