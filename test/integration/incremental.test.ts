/**
 * Incremental cycles against real daemons: only changed clusters travel, the replica merges them
 * without re-reading base.1, every published snapshot passes the recover drill, and lost change
 * tracking heals itself into a full.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { rm, readdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { startAgentEnv, type AgentEnv } from '../../dev/agent-env.js';
import type { OneVm } from '../../dev/one-layout.js';
import { guestWrite, guestZero, guestDiscard, guestViewSha256, sha256File } from '../../dev/guest.js';
import { recoverDrill } from '../../dev/recover.js';
import { run } from '../../lib/shared/exec.js';

let env: AgentEnv;
let vm: OneVm;
const VM = 51;

beforeAll(async () => {
  env = await startAgentEnv({ name: 'inc' });
  vm = await env.createVm({ vmId: VM, disks: [{ diskId: 0, sizeMiB: 128, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 32, pattern: 0x41 }] }] });
});

afterAll(async () => {
  await vm?.destroy().catch(() => {});
  await env?.stop();
});

const ref = (_tag: string): Promise<string> => guestViewSha256(vm.disks[0]!.base1Path, env.root);

async function snapshot(extra: string[] = []): Promise<{ mode: string; bytes: string; out: string }> {
  const r = await env.agent(['snapshot', '--vm', String(VM), ...extra]);
  expect(r.code, r.stdout + r.stderr).toBe(0);
  const m = /disk 0: (full|incremental) snapshot published, (\S+) sent/.exec(r.stdout);
  expect(m, r.stdout).not.toBeNull();
  return { mode: m![1]!, bytes: m![2]!, out: r.stdout + r.stderr };
}

async function drillEquals(expected: string): Promise<void> {
  const d = await recoverDrill(env.snapsDir, VM, 0, env.root);
  try {
    expect(d.backingName).toBe('disk.0.snap/base');
    expect(d.check.ok, d.check.raw).toBe(true);
    expect(await sha256File(d.rawPath)).toBe(expected);
  } finally {
    await rm(d.dir, { recursive: true, force: true });
  }
}

async function ourCheckpoints(): Promise<string[]> {
  const out = await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name']);
  return out.split('\n').map((s) => s.trim()).filter((s) => s.startsWith('onestor-'));
}

describe('incremental cycles', () => {
  it('20 cycles with random writes, zero-writes and discards: each recovers to its point in time', async () => {
    const first = await snapshot();
    expect(first.mode).toBe('full');
    let seed = 12345;
    const rnd = (n: number) => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    for (let i = 0; i < 20; i++) {
      const kind = i % 5;
      const off = rnd(120);
      const len = 1 + rnd(4);
      if (kind === 1) await guestZero(env.lv, vm.domainName, { target: 'vda', offsetMiB: off, lengthMiB: len });
      else if (kind === 2) await guestDiscard(env.lv, vm.domainName, { target: 'vda', offsetMiB: off, lengthMiB: len });
      else if (kind !== 3) await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: off, lengthMiB: len, pattern: 1 + rnd(250) });
      // kind 3: no write at all this cycle
      const expected = await ref(`c${i}`);
      const s = await snapshot();
      expect(s.mode, s.out).toBe('incremental');
      // a write after the point in time must not leak into the snapshot
      await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 124, lengthMiB: 1, pattern: 0xee });
      await drillEquals(expected);
      const ls = await readdir(path.join(env.snapsDir, String(VM), 'disk.0.snap'));
      expect(ls.sort()).toEqual(['base', 'base.1', 'disk.0.snap']);
      expect(await ourCheckpoints()).toHaveLength(1);
    }
  }, 360_000); // 20 real cycles, each drilled: ~60 s on an idle 2-core machine, several times that under load

  it('sends about the changed bytes, not the disk', async () => {
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 40, lengthMiB: 8, pattern: 0x77 });
    const r = await env.agent(['snapshot', '--vm', String(VM), '--json']);
    expect(r.code, r.stderr).toBe(0);
    const [o] = JSON.parse(r.stdout) as Array<{ mode: string; bytes: number }>;
    expect(o!.mode).toBe('incremental');
    // 8 MiB dirty (+ the 1 MiB write of the previous test) -> well under 1.1x + 1 MiB of 9 MiB
    expect(o!.bytes).toBeLessThanOrEqual(1.1 * 9 * 1048576 + 1048576);
    expect(o!.bytes).toBeGreaterThanOrEqual(8 * 1048576);
  });

  it('transient domain destroyed and re-created: checkpoint redefined from saved XML, stays incremental', async () => {
    await vm.destroy();
    await vm.start();
    expect(await ourCheckpoints()).toHaveLength(0);
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 60, lengthMiB: 2, pattern: 0x78 });
    const expected = await ref('transient');
    const s = await snapshot();
    expect(s.out, s.out).toMatch(/redefined/);
    expect(s.mode).toBe('incremental');
    await drillEquals(expected);
  });

  it('QEMU killed (-9): broken bitmap detected, falls back to a full by itself', async () => {
    // Only this env's PID namespace: another test file may run a domain of the same name beside us.
    const qemus = env.lv.processes().filter((p) => p.comm.startsWith('qemu-system') && p.cmdline.includes(`guest=${vm.domainName},`));
    expect(qemus).toHaveLength(1);
    const pid = String(qemus[0]!.pid);
    await run('kill', ['-9', pid]);
    for (let i = 0; i < 50 && /running/.test((await env.lv.virsh(['domstate', vm.domainName])).stdout); i++) await new Promise((r) => setTimeout(r, 100));
    await vm.start();
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 70, lengthMiB: 2, pattern: 0x79 });
    const expected = await ref('crash');
    const s = await snapshot();
    expect(s.mode).toBe('full');
    await drillEquals(expected);
    // and the next one is incremental again
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 72, lengthMiB: 1, pattern: 0x7a });
    const e2 = await ref('crash2');
    expect((await snapshot()).mode).toBe('incremental');
    await drillEquals(e2);
  });

  it('base.1 on the host replaced (a recovery wrote a new one): full by itself, with the reason', async () => {
    await vm.destroy();
    const b1 = vm.disks[0]!.base1Path;
    const { copyFile, rename } = await import('node:fs/promises');
    await copyFile(b1, `${b1}.new`);
    await rename(`${b1}.new`, b1);
    await vm.start();
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 75, lengthMiB: 1, pattern: 0x7e });
    const expected = await ref('replaced');
    const s = await snapshot();
    expect(s.mode).toBe('full');
    expect(s.out).toMatch(/base\.1 on the host was replaced/);
    await drillEquals(expected);
  });

  it('a cycle while the guest keeps writing: succeeds, chain untouched, recovered image consistent', async () => {
    const blk = await env.lv.virshOk(['domblklist', vm.domainName, '--details']);
    const xmlDisks = (await env.lv.virshOk(['dumpxml', vm.domainName])).match(/<disk[\s\S]*?<\/disk>/g);
    let writing = true;
    const writer = (async () => {
      for (let i = 0; writing; i++) await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 96 + (i % 24), lengthMiB: 1, pattern: 1 + (i % 200), noFlush: true });
    })();
    try {
      const s = await snapshot();
      expect(['incremental', 'full']).toContain(s.mode);
    } finally {
      writing = false;
      await writer;
    }
    expect(await env.lv.virshOk(['domblklist', vm.domainName, '--details'])).toBe(blk);
    expect((await env.lv.virshOk(['dumpxml', vm.domainName])).match(/<disk[\s\S]*?<\/disk>/g)).toEqual(xmlDisks);
    const d = await recoverDrill(env.snapsDir, VM, 0, env.root);
    try {
      expect(d.check.ok, d.check.raw).toBe(true);
    } finally {
      await rm(d.dir, { recursive: true, force: true });
    }
    // and once the guest is quiet, the next cycle matches its point in time exactly
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 127, lengthMiB: 1, pattern: 0x7f });
    const expected = await ref('quiet');
    expect((await snapshot()).mode).toBe('incremental');
    await drillEquals(expected);
  });

  it('a foreign checkpoint is left alone', async () => {
    const ck = path.join(env.root, 'foreign.xml');
    await writeFile(ck, `<domaincheckpoint><name>one-${VM}-0</name><disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>`);
    await env.lv.virshOk(['checkpoint-create', vm.domainName, ck]);
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 80, lengthMiB: 1, pattern: 0x7b });
    const expected = await ref('foreign');
    expect((await snapshot()).mode).toBe('incremental');
    await drillEquals(expected);
    const names = await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name']);
    expect(names).toContain(`one-${VM}-0`);
  });

  it('replica manifest deleted: full; agent state deleted: incremental from the replica lineage', async () => {
    const manifestDir = path.join(env.snapsDir, String(VM), '.onestor');
    for (const f of await readdir(manifestDir)) await rm(path.join(manifestDir, f), { force: true });
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 90, lengthMiB: 1, pattern: 0x7c });
    let expected = await ref('nomanifest');
    expect((await snapshot()).mode).toBe('full');
    await drillEquals(expected);

    const stateFile = path.join(env.stateDir, 'state.json');
    expect(JSON.parse(await readFile(stateFile, 'utf8')).version).toBe(1);
    await rm(stateFile);
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 91, lengthMiB: 1, pattern: 0x7d });
    expected = await ref('nostate');
    expect((await snapshot()).mode).toBe('incremental');
    await drillEquals(expected);
  });
});
