/**
 * Issue 10: the receiver PROCESS is SIGKILLed at every step of its own step list (FULL_STEPS / INC_STEPS,
 * as the publish reports them through its hooks) during a full publish with a new base, a full publish
 * without one, and an incremental merge. After each: the recover drill reads the previous or the new
 * snapshot (never neither), the next session finishes the journal or stays on the previous one by itself,
 * the client's retry completes, and nothing of the dead session is left (dev/replica-crash.ts).
 */
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { INC_STEPS } from '../../lib/replica/merge.js';
import { FULL_STEPS } from '../../lib/replica/publish.js';
import { SCENARIOS, freshSnaps, makeScenario, runPublish, verifyAfterRun } from '../../dev/replica-crash.js';
import { ensureDistBuilt } from '../helpers/build-dist.js';

let root: string;
beforeAll(async () => {
  await ensureDistBuilt();
  root = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-t-crash-steps-'));
}, 300_000);
afterAll(async () => {
  if (root) await fsp.rm(root, { recursive: true, force: true });
});

const known = new Set<string>([...FULL_STEPS, ...INC_STEPS]);
const normalize = (s: string) => s.replace(/^inc:applied:inc\.\d+$/, 'inc:applied:inc.N');

describe('receiver SIGKILLed at each named step', () => {
  for (const kind of SCENARIOS) {
    it(`${kind}: previous or new at every step, next session completes`, async () => {
      const sc = await makeScenario(root, kind);
      // The steps this publish passes, from the code's own hooks.
      const log = path.join(root, `${kind}.steps`);
      const clean = await freshSnaps(sc, root, 'clean');
      expect((await runPublish(sc, clean, { stepLog: log })).outcome).toBe('completed');
      const steps = (await fsp.readFile(log, 'utf8')).trim().split('\n');
      for (const s of steps) expect(known.has(normalize(s)), `step ${s} missing from the exported step list`).toBe(true);
      if (kind === 'full-new-base') expect(steps).toEqual(expect.arrayContaining(['full:bridge-built', 'full:bridge-published', 'full:base-published', 'full:base1-published']));
      if (kind === 'full-same-base') expect(steps).not.toContain('full:bridge-published');
      const journalAt = steps.indexOf(kind === 'incremental' ? 'inc:journal' : 'full:journal');
      expect(journalAt).toBeGreaterThan(0);
      const tally = { prev: 0, new: 0 };
      for (const [i, step] of steps.entries()) {
        const snaps = await freshSnaps(sc, root, `at-${i}`);
        const r = await runPublish(sc, snaps, { crashAt: step });
        expect(r.outcome, `crash at ${step}`).toBe('receiver-killed');
        const v = await verifyAfterRun(sc, snaps, root);
        tally[v.afterCrash]++;
        // from the journal on, the next session finishes the publish by itself; before it, nothing changed
        expect(v.openedAt, `next open after a crash at ${step}`).toBe(i >= journalAt ? 'ck2' : 'ck1');
        await fsp.rm(snaps, { recursive: true, force: true });
      }
      expect(tally.prev + tally.new).toBe(steps.length);
    });
  }
});
