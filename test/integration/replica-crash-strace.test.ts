/**
 * Issue 10, from outside: the real receiver process (dist/agent/receiver-main.js, UV_THREADPOOL_SIZE=1)
 * under `strace -f -e inject=SYSCALL:signal=KILL:when=N`, N = 1, 2, ... until a run completes, one syscall
 * at a time (strace counts per syscall and per thread/process). After each kill: the recover drill (previous
 * or new, never neither), the next session completes, no leftovers. Here (CI time): the full publish with a
 * new base swept completely for rename, link and unlink, fsync and the other scenarios with a stride.
 * The exhaustive sweep of everything: bench/crash-sweep.ts.
 */
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeScenario, sweepSyscall, type ScenarioKind } from '../../dev/replica-crash.js';
import { ensureDistBuilt } from '../helpers/build-dist.js';

let root: string;
beforeAll(async () => {
  await ensureDistBuilt();
  root = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-t-crash-strace-'));
}, 300_000);
afterAll(async () => {
  if (root) await fsp.rm(root, { recursive: true, force: true });
});

const plan: Array<{ kind: ScenarioKind; syscall: string; stride: number }> = [
  { kind: 'full-new-base', syscall: 'rename', stride: 1 },
  { kind: 'full-new-base', syscall: 'link', stride: 1 },
  { kind: 'full-new-base', syscall: 'unlink', stride: 1 },
  { kind: 'full-new-base', syscall: 'fsync', stride: 3 },
  { kind: 'full-same-base', syscall: 'rename', stride: 3 },
  { kind: 'incremental', syscall: 'rename', stride: 3 },
  { kind: 'incremental', syscall: 'fsync', stride: 6 },
];

describe('receiver killed between syscalls (strace inject)', () => {
  const scenarios = new Map<ScenarioKind, Awaited<ReturnType<typeof makeScenario>>>();
  for (const { kind, syscall, stride } of plan) {
    it(`${kind}, ${syscall}: N = 1, ${1 + stride}, ${1 + 2 * stride}, ... until a run completes`, async () => {
      if (!scenarios.has(kind)) scenarios.set(kind, await makeScenario(root, kind));
      const r = await sweepSyscall(scenarios.get(kind)!, root, syscall, { stride });
      expect(r.completedAt, `${syscall}: no run completed`).not.toBeNull();
      expect(r.killed).toBeGreaterThan(0);
      console.log(`${kind} ${syscall} stride ${stride}: ${r.runs} runs, ${r.killed} receiver kills, ${r.failed} child kills, completed at N=${r.completedAt}, recovered prev/new ${r.afterCrash.prev}/${r.afterCrash.new}, ${r.retried} retried`);
    });
  }
});
