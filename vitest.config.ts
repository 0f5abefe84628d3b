import { statSync } from 'node:fs';
import { defineConfig } from 'vitest/config';
import { BaseSequencer, type TestSpecification } from 'vitest/node';

// Seconds each slow file took when run alone (2-core machine). Longest first keeps the two lanes even;
// vitest's own order needs a results cache (absent on a fresh CI machine) and otherwise goes by file
// size, which would start the short-file, long-running strace sweep last.
const KNOWN_SECONDS: Record<string, number> = {
  'test/integration/faults.test.ts': 120,
  'test/integration/migration.test.ts': 97,
  'test/integration/daemon-real.test.ts': 70,
  'test/integration/incremental.test.ts': 67,
  'test/integration/replica-crash-strace.test.ts': 66,
  'test/integration/seed-pull.test.ts': 49,
  'test/integration/virsh-adapter.test.ts': 38,
  'test/integration/receiver-limits.test.ts': 28,
  'test/integration/ownership.test.ts': 26,
  'test/unit/receiver.test.ts': 23,
  'test/integration/snapshot-e2e.test.ts': 23,
  'test/integration/replica-crash-steps.test.ts': 21,
  'test/integration/security.test.ts': 14,
  'test/unit/replica-safety.test.ts': 13,
  'test/integration/harness-layout.test.ts': 11,
};

class LongestFirst extends BaseSequencer {
  override async sort(files: TestSpecification[]): Promise<TestSpecification[]> {
    const root = this.ctx.config.root + '/';
    const weight = (f: TestSpecification): number => {
      const rel = f.moduleId.startsWith(root) ? f.moduleId.slice(root.length) : f.moduleId;
      // unknown files after the known slow ones, larger first (as vitest does without a cache)
      return (KNOWN_SECONDS[rel] ?? 0) * 1e9 + statSync(f.moduleId).size;
    };
    return [...files].sort((a, b) => weight(b) - weight(a));
  }
}

// Assertions on timer cadence (sd_notify watchdog gaps < 200 ms, schedule gaps within 300 ms); they run
// after the rest, beside each other only: both are light, in-process timers.
const TIMING_FILES = ['test/integration/sd-notify.test.ts', 'test/integration/daemon-schedule.test.ts'];

export default defineConfig({
  test: {
    // Two files at a time. Much of the suite waits (VM boots, libvirt job locks, timeouts under test)
    // rather than computes; every integration file has its own libvirtd, sshd, temp dirs and names.
    fileParallelism: true,
    // explicit: vitest's default on a 2-core machine is 1
    maxWorkers: 2,
    minWorkers: 1,
    testTimeout: 120_000,
    hookTimeout: 180_000,
    teardownTimeout: 60_000,
    reporters: ['default'],
    sequence: { sequencer: LongestFirst },
    projects: [
      // include stays per project: extends merges arrays, a root include would put every file in both
      { extends: true, test: { name: 'suite', include: ['test/**/*.test.ts'], exclude: ['**/node_modules/**', ...TIMING_FILES] } },
      { extends: true, test: { name: 'timing', include: TIMING_FILES, sequence: { groupOrder: 1 } } },
    ],
  },
});
