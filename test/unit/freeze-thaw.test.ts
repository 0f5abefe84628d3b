// Freeze and thaw around backup-begin: a guest must never be left frozen, whatever the freeze, the thaw or
// a kill in between answered. The libvirt port is a recording fake: the logic under test is the ordering.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { mkdtemp, rm, writeFile, access } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { beginJobAtInstant, checksBeforeJob, freezeMarkerPath, type CaptureLibvirt, type CaptureRequest } from '../../lib/cycle/capture.js';
import { OnestorError, ErrorCodes } from '../../lib/shared/errors.js';

type FreezeAnswer = 'frozen' | 'not-connected' | 'throws';

function fakeLibvirt(o: { freeze?: FreezeAnswer; thawFails?: number; beginFails?: boolean } = {}) {
  const calls: string[] = [];
  let thawFailures = o.thawFails ?? 0;
  const lv = {
    async fsFreeze() {
      calls.push('freeze');
      if (o.freeze === 'throws') throw new OnestorError(ErrorCodes.VIRSH, 'virsh domfsfreeze timed out', { field: 'domfsfreeze', exitCode: 124 });
      return o.freeze === 'not-connected' ? { frozen: false as const, why: 'agent-not-connected: QEMU guest agent is not connected' } : { frozen: true as const };
    },
    async fsThaw() {
      calls.push('thaw');
      if (thawFailures > 0) {
        thawFailures--;
        throw new OnestorError(ErrorCodes.VIRSH, 'virsh domfsthaw: connection lost', { field: 'domfsthaw', virshKind: 'connection' });
      }
    },
    async backupBegin() {
      calls.push('backup-begin');
      if (o.beginFails) throw new OnestorError(ErrorCodes.VIRSH, 'backup-begin: domain is not running', { field: 'backup-begin', exitCode: 1 });
    },
    async jobActive() {
      calls.push('job?');
      return false;
    },
  };
  return { lv: lv as unknown as CaptureLibvirt, calls };
}

let dir: string;
let stagingDir: string;
const logs: string[] = [];
const req = (): CaptureRequest => ({
  vmId: 7,
  domainName: 'one-7',
  stagingDir,
  checkpointName: 'onestor-7-1',
  disks: [],
  tryFreeze: true,
  timeoutMs: 1000,
  minFreePercent: 0,
  log: (_o, msg) => logs.push(msg),
});
const exists = (p: string) => access(p).then(() => true, () => false);
const begin = (lv: CaptureLibvirt, hasGuestAgentChannel = true) => beginJobAtInstant(lv, req(), '<domainbackup/>', '<domaincheckpoint/>', false, { hasGuestAgentChannel });

beforeEach(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'onestor-freeze-'));
  stagingDir = path.join(dir, '7');
  logs.length = 0;
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('freeze and thaw around backup-begin', () => {
  it('frozen: the job begins while frozen, thawed twice, no marker left', async () => {
    const { lv, calls } = fakeLibvirt({ freeze: 'frozen' });
    const r = await begin(lv);
    expect(calls).toEqual(['freeze', 'backup-begin', 'thaw', 'thaw']);
    expect(r.consistency).toBe('filesystem-frozen');
    expect(await exists(freezeMarkerPath(stagingDir))).toBe(false);
  });

  it('a freeze that failed may have frozen the guest: the job still begins, crash-consistent, and the guest is thawed', async () => {
    const { lv, calls } = fakeLibvirt({ freeze: 'throws' });
    const r = await begin(lv);
    expect(calls).toEqual(['freeze', 'backup-begin', 'thaw', 'thaw']);
    expect(r.consistency).toBe('crash-consistent');
    expect(r.freezeNote).toMatch(/freeze failed.*timed out/);
    expect(await exists(freezeMarkerPath(stagingDir))).toBe(false);
  });

  it('an agent that said it did not freeze: no thaw, no marker', async () => {
    const { lv, calls } = fakeLibvirt({ freeze: 'not-connected' });
    const r = await begin(lv);
    expect(calls).toEqual(['freeze', 'backup-begin']);
    expect(r).toMatchObject({ consistency: 'crash-consistent', freezeNote: expect.stringMatching(/not connected/) });
    expect(await exists(freezeMarkerPath(stagingDir))).toBe(false);
  });

  it('no agent channel: no freeze, no thaw, no marker', async () => {
    const { lv, calls } = fakeLibvirt({ freeze: 'frozen' });
    const r = await begin(lv, false);
    expect(calls).toEqual(['backup-begin']);
    expect(r.freezeNote).toBe('no guest agent channel');
    expect(await exists(freezeMarkerPath(stagingDir))).toBe(false);
  });

  it('a backup-begin that fails still thaws, and its error is the one thrown', async () => {
    const { lv, calls } = fakeLibvirt({ freeze: 'frozen', beginFails: true });
    await expect(begin(lv)).rejects.toThrow(/domain is not running/);
    expect(calls).toEqual(['freeze', 'backup-begin', 'thaw', 'thaw']);
    expect(await exists(freezeMarkerPath(stagingDir))).toBe(false);
  });

  it('one lost thaw answer is covered by the second thaw', async () => {
    const { lv } = fakeLibvirt({ freeze: 'frozen', thawFails: 1 });
    await begin(lv);
    expect(await exists(freezeMarkerPath(stagingDir))).toBe(false);
  });

  it('both thaws failed: the marker stays and the next capture thaws before anything else', async () => {
    const first = fakeLibvirt({ freeze: 'frozen', thawFails: 2 });
    await begin(first.lv);
    expect(await exists(freezeMarkerPath(stagingDir))).toBe(true);
    expect(logs.join('\n')).toMatch(/may still be frozen/);

    const next = fakeLibvirt();
    await checksBeforeJob(next.lv, { ...req(), tryFreeze: false });
    expect(next.calls).toContain('thaw');
    expect(await exists(freezeMarkerPath(stagingDir))).toBe(false);
    expect(logs.join('\n')).toMatch(/previous capture was interrupted/);
  });

  it('an agent killed between freeze and thaw: the marker alone makes the next capture thaw', async () => {
    // what a SIGKILL after the freeze leaves: the marker, nothing else
    await writeFile(freezeMarkerPath(stagingDir), 'one-7\n');
    const next = fakeLibvirt();
    await checksBeforeJob(next.lv, req());
    expect(next.calls.filter((c) => c === 'thaw')).toHaveLength(1);
    expect(await exists(freezeMarkerPath(stagingDir))).toBe(false);
  });

  it('a thaw that keeps failing fails the capture with the VM, the domain and the command named, and keeps the marker', async () => {
    await writeFile(freezeMarkerPath(stagingDir), 'one-7\n');
    const next = fakeLibvirt({ thawFails: 5 });
    const err = await checksBeforeJob(next.lv, req()).then(() => null, (e: unknown) => e);
    expect(err).toBeInstanceOf(OnestorError);
    expect((err as OnestorError).message).toMatch(/domain one-7 may still be frozen.*connection lost/);
    expect((err as OnestorError).context).toMatchObject({ vm: 7, field: 'domfsthaw' });
    expect(await exists(freezeMarkerPath(stagingDir))).toBe(true);
  });

  it('no marker: no thaw before the job', async () => {
    const next = fakeLibvirt();
    await checksBeforeJob(next.lv, req());
    expect(next.calls).toEqual(['job?']);
  });
});
