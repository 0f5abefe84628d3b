/**
 * The replica probe reports what the receiver's bookkeeping holds (SNAPS/.onestor) beside SNAPS usage:
 * pure summary on find records, then the real probe on a real tree with real hard links.
 */
import { link, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runProbe } from '../../agent/probe.js';
import { parseOneTemplate } from '../../lib/monitor/one-template.js';
import { parseBookkeepingFind, summarizeBookkeeping } from '../../lib/monitor/usage.js';

const MiB = 1024 * 1024;
let root: string;
beforeAll(async () => {
  root = await mkdtemp(path.join(os.tmpdir(), 'onestor-probe-bk-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('bookkeeping summary', () => {
  it('counts spares and temps once, not the hard link that is the published base.1', () => {
    const recs = [
      'd 8 10 2 work',
      'f 20480 11 2 work/7/disk.0/copy.a', // also SNAPS/7/disk.0.snap/base.1: 2 links, 1 seen here
      'f 20480 12 1 work/7/disk.0/copy.b',
      'f 2048 13 1 work/9/disk.0/copy.a', // base.1 deleted by upstream: this link is all that is left
      'f 4096 14 2 tmp/7-0/pub.x', // staged publish + ...
      'f 4096 14 2 work/7/disk.0/copy.c', // ... its other link, both inside: counted once
      'f 8192 15 1 tmp/7-0/up.inc-ck3',
      'f 0 16 1 locks/7-0.lock',
      'f 9 1',
    ];
    const e = parseBookkeepingFind(Buffer.from(recs.join('\0')));
    expect(e).toHaveLength(8);
    const s = summarizeBookkeeping(e, false);
    // work: the dir, copy.b, the orphan copy.a; copy.c/pub.x once (under tmp, where it is seen first)
    // (each figure rounded up on its own, like df: 11 MiB + 4 KiB of work and 6 MiB of tmp make 18)
    expect(s).toEqual({ totalMb: 18, workMb: 12, tmpMb: 6, sharedMb: 10, truncated: false });
  });
});

describe('replica-ds probe', () => {
  it('prints BOOKKEEPING_MB beside USED_MB, not counting the link to the published base.1', async () => {
    const snaps = path.join(root, 'replica_snaps');
    const snap = path.join(snaps, '7', 'disk.0.snap');
    await mkdir(snap, { recursive: true });
    await writeFile(path.join(snap, 'base'), Buffer.alloc(3 * MiB, 1));
    await writeFile(path.join(snap, 'base.1'), Buffer.alloc(2 * MiB, 2));
    const work = path.join(snaps, '.onestor', 'work', '7', 'disk.0');
    await mkdir(work, { recursive: true });
    await link(path.join(snap, 'base.1'), path.join(work, 'copy.a'));
    await writeFile(path.join(work, 'copy.b'), Buffer.alloc(2 * MiB, 3)); // the spare
    const tmp = path.join(snaps, '.onestor', 'tmp', '7-0');
    await mkdir(tmp, { recursive: true });
    await writeFile(path.join(tmp, 'up.inc-ck4'), Buffer.alloc(1 * MiB, 4)); // an upload in flight
    const dsLoc = path.join(root, 'datastores');
    await mkdir(dsLoc);
    const sshrc = path.join(root, 'sshrc');
    await writeFile(sshrc, `REPLICA_RECOVERY_SNAPS_DIR=${snaps}\n`);
    const r = await runProbe('replica-ds', { datastoreLocation: dsLoc, sshrcPaths: [sshrc], cacheFile: path.join(root, 'walk-cache.json'), deadlineMs: 20_000 });
    expect(r.errors).toEqual([]);
    const snapsLine = parseOneTemplate(r.lines.join('\n') + '\n').find((a) => a.name === 'ONESTOR_REPLICA_SNAPS');
    // USED_MB: 5 MiB of images plus directory blocks, rounded up
    expect(snapsLine?.value).toMatchObject({ PATH: snaps, USED_MB: '6', BOOKKEEPING_WORK_MB: '3', BOOKKEEPING_TMP_MB: '2' });
    // 2 MiB spare + 1 MiB upload + directory blocks; the 2 MiB link to base.1 is not counted again
    expect(Number((snapsLine!.value as Record<string, string>).BOOKKEEPING_MB)).toBe(4);
  });
});
