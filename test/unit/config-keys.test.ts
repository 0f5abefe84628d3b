/**
 * A config key that is validated and then read nowhere is a lie to the admin who sets it. This walks the
 * schema's leaf keys and fails when one is not read by the code: each leaf must be accessed as
 * `.section.key` (or `.key` for top-level keys) somewhere in agent/ or lib/ outside the schema file, or
 * be listed in READ_VIA with the file that reads it through a local alias (checked too).
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { ConfigSchema } from '../../lib/config/config.js';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** leaf path -> file that reads it through an alias (`const r = config.replica; r.port`), and the text it reads it by */
const READ_VIA: Record<string, [file: string, text: string]> = {
  'replica.user': ['agent/context.ts', 'r.user'],
  'replica.port': ['agent/context.ts', 'r.port'],
  'replica.identityFile': ['agent/context.ts', 'r.identityFile'],
  'replica.knownHostsFile': ['agent/context.ts', 'r.knownHostsFile'],
  'replica.acceptNewHostKey': ['agent/context.ts', 'r.acceptNewHostKey'],
  'replica.receiverCommand': ['agent/context.ts', 'r.receiverCommand'],
  'replica.connectTimeoutSec': ['agent/context.ts', 'r.connectTimeoutSec'],
  'replica.keepaliveSec': ['agent/context.ts', 'r.keepaliveSec'],
  'replica.transport': ['agent/context.ts', 'r.transport'],
  'replica.ciphers': ['agent/context.ts', 'r.ciphers'],
  // the daemon hands `{ ...config.schedule }` to the scheduler
  'schedule.backoffBaseSec': ['lib/daemon/schedule.ts', 's.backoffBaseSec'],
  'schedule.backoffMaxSec': ['lib/daemon/schedule.ts', 's.backoffMaxSec'],
  'schedule.spreadSec': ['lib/daemon/schedule.ts', 'this.opts.spreadSec'],
  'receiver.snapsDir': ['agent/commands/receive.ts', 'r.snapsDir'],
  'receiver.maxSessions': ['agent/commands/receive.ts', 'r.maxSessions'],
  'receiver.lockTimeoutSec': ['agent/commands/receive.ts', 'r.lockTimeoutSec'],
  'receiver.busyWaitSec': ['agent/commands/receive.ts', 'r.busyWaitSec'],
  'receiver.maxUsedPercent': ['agent/commands/receive.ts', 'r.maxUsedPercent'],
  'receiver.idleTimeoutSec': ['agent/commands/receive.ts', 'r.idleTimeoutSec'],
  'receiver.spaceCheck': ['agent/commands/receive.ts', 'r.spaceCheck'],
  'receiver.directIo': ['agent/commands/receive.ts', 'r.directIo'],
  'receiver.maxSessionsPerHost': ['agent/commands/receive.ts', 'r.maxSessionsPerHost'],
  'receiver.helloTimeoutSec': ['agent/commands/receive.ts', 'r.helloTimeoutSec'],
  'receiver.drainTimeoutSec': ['agent/commands/receive.ts', 'r.drainTimeoutSec'],
  'receiver.progressWindowSec': ['agent/commands/receive.ts', 'r.progressWindowSec'],
  'receiver.minProgressKiB': ['agent/commands/receive.ts', 'r.minProgressKiB'],
  'receiver.maxSessionSec': ['agent/commands/receive.ts', 'r.maxSessionSec'],
};

function unwrap(s: z.ZodType): z.ZodType {
  let cur = s as z.ZodType & { _zod: { def: { innerType?: z.ZodType; type: string } } };
  while (cur._zod.def.innerType) cur = cur._zod.def.innerType as typeof cur;
  return cur;
}

function leafPaths(schema: z.ZodType, prefix: string[] = []): string[][] {
  const s = unwrap(schema);
  if (s instanceof z.ZodObject) return Object.entries(s.shape).flatMap(([k, v]) => leafPaths(v as z.ZodType, [...prefix, k]));
  return [prefix];
}

function sources(): Map<string, string> {
  const out = new Map<string, string>();
  for (const dir of ['agent', 'lib']) {
    for (const f of readdirSync(path.join(repo, dir), { recursive: true }) as string[]) {
      const rel = path.join(dir, f);
      if (!rel.endsWith('.ts') || rel === 'lib/config/config.ts') continue;
      out.set(rel, readFileSync(path.join(repo, rel), 'utf8'));
    }
  }
  return out;
}

describe('every config key is read somewhere', () => {
  const leaves = leafPaths(ConfigSchema);
  const src = sources();
  const all = [...src.values()].join('\n');

  it('the walk finds the schema', () => {
    expect(leaves.map((p) => p.join('.'))).toEqual(expect.arrayContaining(['datastoreLocation', 'replica.port', 'limits.transferTimeoutSec', 'log.level', 'receiver.spaceCheck']));
  });

  it.each(leaves.map((p) => [p.join('.'), p] as const))('%s', (name, p) => {
    const via = READ_VIA[name];
    if (via) {
      expect(src.get(via[0]) ?? '', `${name} is no longer read in ${via[0]}`).toContain(via[1]);
      return;
    }
    const accessed = new RegExp(`\\.${p.map((s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('\\.')}\\b`).test(all);
    expect(accessed, `config key ${name} is validated but never read (wire it, or remove it from the schema)`).toBe(true);
  });
});

describe('wired keys', () => {
  it('log.level from the config file reaches the logger (it was validated and ignored)', async () => {
    const { mkdtemp, writeFile, rm } = await import('node:fs/promises');
    const os = await import('node:os');
    const { buildContext } = await import('../../agent/context.js');
    const { createLogger } = await import('../../lib/shared/log.js');
    const dir = await mkdtemp(path.join(os.tmpdir(), 'cfg-keys-'));
    try {
      const file = path.join(dir, 'config.json');
      await writeFile(file, JSON.stringify({ log: { level: 'debug' }, sshrcPaths: [path.join(dir, 'no-sshrc')], stateDir: dir }));
      const log = createLogger({ level: 'info', stream: { write: () => true } as never });
      await buildContext({ configFile: file, log });
      expect(log.level).toBe('debug');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
