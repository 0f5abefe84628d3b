/** Pure pieces of the pull-mode seed: backup XML, export names from backup-dumpxml, qemu-img map's top layer. */
import { abortOwnJob, isOwnJob, mayHaveBegun } from '../../lib/cycle/capture.js';
import { ErrorCodes, OnestorError } from '../../lib/shared/errors.js';
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

describe('whose backup job it is (domjobabort aborts whatever job runs: a migration must never be hit)', () => {
  const staging = '/ds/100/.onestor/61';
  it('ours: every target or scratch file lies in this cycle\'s staging dir', () => {
    expect(isOwnJob([`${staging}/vda.scratch`, `${staging}/vdb.scratch`], staging)).toBe(true);
    expect(isOwnJob([`${staging}/../61/vda.out`], staging)).toBe(true);
  });
  it('not ours: no backup job (a migration shows no backup targets), another VM\'s dir, a prefix look-alike, an escape', () => {
    expect(isOwnJob([], staging)).toBe(false);
    expect(isOwnJob(['/ds/100/.onestor/62/vda.scratch'], staging)).toBe(false);
    expect(isOwnJob(['/ds/100/.onestor/610/vda.scratch'], staging)).toBe(false);
    expect(isOwnJob([`${staging}/../../../etc/x`], staging)).toBe(false);
    expect(isOwnJob([`${staging}/vda.scratch`, '/var/lib/one/backup/vdb.qcow2'], staging)).toBe(false);
  });
  it('abortOwnJob aborts only then; a failing lookup counts as "not ours"', async () => {
    const calls: string[] = [];
    const lv = (targets: string[] | Error) => ({
      backupTargets: async () => {
        if (targets instanceof Error) throw targets;
        return targets;
      },
      abortJob: async (d: string) => void calls.push(d),
    });
    expect(await abortOwnJob(lv([`${staging}/vda.scratch`]), 'one-61', staging)).toBe(true);
    expect(await abortOwnJob(lv([]), 'one-61', staging)).toBe(false);
    expect(await abortOwnJob(lv(new Error('virsh failed')), 'one-61', staging)).toBe(false);
    expect(calls).toEqual(['one-61']);
  });
});

describe('mayHaveBegun: a failed backup-begin that may still have begun the job', () => {
  const err = (code: (typeof ErrorCodes)[keyof typeof ErrorCodes], context: Record<string, unknown>) => new OnestorError(code, 'x', context);
  it('yes when libvirt\'s answer never arrived: connection lost, timed out, aborted', () => {
    expect(mayHaveBegun(err(ErrorCodes.VIRSH, { field: 'backup-begin', virshKind: 'connection' }))).toBe(true);
    expect(mayHaveBegun(err(ErrorCodes.VIRSH, { field: 'backup-begin', virshKind: 'other', exitCode: 124 }))).toBe(true);
    expect(mayHaveBegun(err(ErrorCodes.ABORTED, { field: 'backup-begin', virshKind: 'other' }))).toBe(true);
  });
  it('no when libvirt said it failed, or another call failed', () => {
    expect(mayHaveBegun(err(ErrorCodes.VIRSH, { field: 'backup-begin', virshKind: 'job-active', exitCode: 1 }))).toBe(false);
    expect(mayHaveBegun(err(ErrorCodes.CHECKPOINT, { field: 'backup-begin', virshKind: 'checkpoint-inconsistent', exitCode: 1 }))).toBe(false);
    expect(mayHaveBegun(err(ErrorCodes.VIRSH, { field: 'domfsfreeze', virshKind: 'connection' }))).toBe(false);
    expect(mayHaveBegun(err(ErrorCodes.YIELDED, {}))).toBe(false);
    expect(mayHaveBegun(new Error('backup-begin'))).toBe(false);
  });
});
