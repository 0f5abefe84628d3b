import { describe, it, expect, afterEach } from 'vitest';
import { mkdtemp, rm, writeFile, readdir, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { parseState, recordFailure, recordSuccess, getDisk, emptyState, StateStore, diskKey } from '../../lib/cycle/state.js';
import { OnestorError } from '../../lib/shared/errors.js';

const dirs: string[] = [];
afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

describe('state transitions', () => {
  it('a failure keeps the previous success and checkpoint and counts up', () => {
    let d = getDisk(emptyState(0), 4, 1);
    d = recordSuccess(d, { checkpoint: 'onestor-4-1-x', base1Identity: '1:2', capturedAt: 100, finishedAt: 103, durationMs: 3000, bytes: 10, mode: 'full', consistency: 'crash-consistent' });
    d = recordFailure(d, { code: 'E_SSH', message: 'connection refused' }, 200);
    d = recordFailure(d, { code: 'E_SSH', message: 'connection refused' }, 260);
    expect(d.checkpoint).toBe('onestor-4-1-x');
    expect(d.lastSuccess?.capturedAt).toBe(100);
    expect(d.failCount).toBe(2);
    expect(d.lastError).toEqual({ code: 'E_SSH', message: 'connection refused', at: 260 });
    d = recordSuccess(d, { checkpoint: 'onestor-4-1-y', base1Identity: '1:2', capturedAt: 300, finishedAt: 301, durationMs: 900, bytes: 5, mode: 'incremental', consistency: 'filesystem-frozen' });
    expect(d.failCount).toBe(0);
    expect(d.lastError).toBeUndefined();
  });
});

describe('parseState', () => {
  it.each([
    ['not json', '{"version":1,'],
    ['wrong version', '{"version":2,"updatedAt":1,"disks":{}}'],
    ['bad disk record', '{"version":1,"updatedAt":1,"disks":{"1.0":{"vmId":-1,"diskId":0}}}'],
    ['array', '[]'],
  ])('rejects %s with E_STATE naming the file', (_n, text) => {
    try {
      parseState(text, '/x/state.json');
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(OnestorError);
      expect((e as OnestorError).code).toBe('E_STATE');
      expect((e as OnestorError).describe()).toContain('/x/state.json');
    }
  });
});

describe('StateStore', () => {
  it('round-trips atomically and moves a corrupt file aside instead of failing', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'onestor-state-'));
    dirs.push(dir);
    const store = new StateStore(dir);
    const s = emptyState(1);
    s.disks[diskKey(3, 0)] = getDisk(s, 3, 0);
    await store.save(s);
    expect((await store.load()).disks['3.0']?.vmId).toBe(3);
    expect((await readdir(dir)).filter((f) => f.includes('.tmp'))).toEqual([]);

    await writeFile(store.file, '{"version":1,"disks":{"3.0":');
    const r = await store.loadOrReset(50);
    expect(r.reset).toMatch(/E_STATE|JSON/);
    expect(r.state.disks).toEqual({});
    const files = await readdir(dir);
    expect(files).toContain('state.json.corrupt-50');
    expect(await readFile(path.join(dir, 'state.json.corrupt-50'), 'utf8')).toContain('"3.0"');
  });
});
