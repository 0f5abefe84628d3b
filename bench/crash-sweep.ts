/**
 * Issue 10: the exhaustive crash sweep. For each scenario (full publish with a new base, full without one,
 * incremental merge) and each syscall family, the real receiver process (dist/lib/replica/receiver-main.js,
 * UV_THREADPOOL_SIZE=1) runs under `strace -f -e inject=SYSCALL:signal=KILL:when=N` for N = 1, 2, ... until a
 * run completes. After every kill: the recover drill (previous or new, never neither), then a next session
 * that finishes or rolls back by itself, then no leftovers (test/harness/replica-crash.ts).
 * strace counts per syscall AND per tracee: the Nth call in the receiver's fs thread, and the Nth call in any
 * child (qemu-img, cp) — a killed child is a failed request ("failed"), a killed receiver is a crash.
 * Usage: npx tsc -p tsconfig.build.json && node dist/bench/crash-sweep.js [scenarios=all] [syscalls=rename,unlink,link,fsync,fdatasync,rmdir] [stride=1]
 */
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { SCENARIOS, makeScenario, sweepSyscall, type ScenarioKind } from '../test/harness/replica-crash.js';

const [scArg, sysArg, strideArg] = process.argv.slice(2);
const scenarios = (scArg && scArg !== 'all' ? scArg.split(',') : [...SCENARIOS]) as ScenarioKind[];
const syscalls = (sysArg ?? 'rename,unlink,link,fsync,fdatasync,rmdir').split(',');
const stride = Number(strideArg ?? 1);

const root = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-t-crash-sweep-'));
const rows: string[] = [];
let total = 0;
const t0 = Date.now();
try {
  for (const kind of scenarios) {
    const sc = await makeScenario(root, kind);
    for (const sys of syscalls) {
      const t = Date.now();
      const r = await sweepSyscall(sc, root, sys, { stride });
      total += r.runs;
      const row = `| ${kind} | ${sys} | ${r.runs} | ${r.killed} | ${r.failed} | ${r.completedAt ?? 'never'} | ${r.afterCrash.prev} / ${r.afterCrash.new} | ${r.retried} | ${((Date.now() - t) / 1000).toFixed(1)} |`;
      rows.push(row);
      console.log(row);
    }
  }
} finally {
  await fsp.rm(root, { recursive: true, force: true });
}
console.log('\n| scenario | syscall | runs | receiver killed | child killed (request failed) | completed at N | recovery right after: prev / new | next session re-published | s |');
console.log('|---|---|---|---|---|---|---|---|---|');
for (const r of rows) console.log(r);
console.log(`\n${total} runs, every one: previous or new snapshot recovered, next session completed, no leftovers; ${((Date.now() - t0) / 1000).toFixed(0)} s, stride ${stride}`);
