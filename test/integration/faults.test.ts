/**
 * Faults against the real thing: private libvirtd + QEMU, the replica behind a real sshd with the
 * restricted key, the agent CLI as a separate process that gets SIGKILLed. Kill points are found from the
 * outside (staging files, the receiver's tmp and work dirs), never from agent internals. References are
 * made by this test from the live chain. The long version (>= 50 random kills) is bench/soak.ts.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { mkdir, readdir, statfs } from 'node:fs/promises';
import path from 'node:path';
import { startAgentEnv, type AgentEnv } from '../../dev/agent-env.js';
import { startLibvirtd, type Libvirtd } from '../../dev/libvirtd.js';
import type { OneVm } from '../../dev/one-layout.js';
import { guestWrite } from '../../dev/guest.js';
import { devKey, heldFlocks } from '../../lib/replica/reservations.js';
import { run } from '../../lib/shared/exec.js';
import {
  chainFacts,
  checkAfterFault,
  drillSum,
  liveReference,
  snapshotKilledAt,
  spawnAgent,
  throttleConfig,
  waitNoJob,
  withFlag,
  type KillPhase,
} from '../../bench/soak.js';

let lv: Libvirtd;
let env: AgentEnv;

beforeAll(async () => {
  lv = await startLibvirtd({ name: 'faults' });
  env = await startAgentEnv({ name: 'faults', libvirtd: lv });
}, 120_000);

afterAll(async () => {
  await env?.stop();
  await lv?.stop();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function snapshotOk(e: AgentEnv, vmId: number, flags: string[] = e.flags): Promise<{ mode: string; bytes: number; stderr: string }> {
  const p = spawnAgent(['snapshot', '--vm', String(vmId), '--json'], flags);
  const ex = await p.exited;
  expect(ex.code, p.stdout() + p.stderr()).toBe(0);
  const [o] = JSON.parse(p.stdout()) as Array<{ mode: string; bytes: number }>;
  return { mode: o!.mode, bytes: o!.bytes, stderr: p.stderr() };
}

/** Node receiver processes serving this env's SNAPS (started by our sshd through the forced command). */
function receiverPids(snapsDir: string): number[] {
  const out: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const cmd = readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0');
      if (cmd.includes('receive') && cmd.includes(snapsDir) && readFileSync(`/proc/${d}/comm`, 'utf8').trim() === 'node') out.push(Number(d));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/** Per-connection sshd processes of our sshd (children of the listener whose config lives in its root). */
function sshdSessionPids(e: AgentEnv): number[] {
  const cfg = path.join(e.sshd.rootDir, 'sshd_config');
  const procs = readdirSync('/proc').filter((d) => /^\d+$/.test(d));
  const listener = procs.find((d) => {
    try {
      // sshd rewrites its title: "sshd: /usr/sbin/sshd -D -e -f CONFIG ... [listener] ..."
      const cmd = readFileSync(`/proc/${d}/cmdline`, 'utf8');
      return cmd.includes(cfg) && cmd.includes('[listener]');
    } catch {
      return false;
    }
  });
  if (!listener) return [];
  return procs
    .filter((d) => {
      try {
        return readFileSync(`/proc/${d}/stat`, 'utf8').replace(/^.*\) /, '').split(' ')[1] === listener;
      } catch {
        return false;
      }
    })
    .map(Number);
}

describe('SIGKILL of the agent at each phase of a cycle', () => {
  let vm: OneVm;
  let flags: string[];
  let baseline: Awaited<ReturnType<typeof chainFacts>>;
  let prev: string | null = null;

  beforeAll(async () => {
    vm = await env.createVm({
      vmId: 61,
      guestAgentChannel: true,
      disks: [{ diskId: 0, sizeMiB: 96, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 16, pattern: 0x51 }] }],
    });
    await guestWrite(env.lv, vm.domainName, { offsetMiB: 16, lengthMiB: 40, pattern: 0x52 });
    // slow transfers a little so that transfer and publish last long enough to be hit
    flags = [...env.flags, '--config', await throttleConfig(env.root, 24)];
    baseline = await chainFacts(env, vm);
  });
  afterAll(async () => {
    await vm?.destroy().catch(() => {});
  });

  const cases: Array<[KillPhase, boolean, number]> = [
    ['capture', true, 0], // the very first seed: nothing on the replica yet
    ['thin', true, 0],
    ['transfer', true, 200],
    ['publish', true, 0],
    ['capture', false, 30],
    ['transfer', false, 50],
    ['publish', false, 0],
  ];
  for (const [phase, full, delayMs] of cases) {
    it(`killed at ${phase} (${full ? 'full' : 'incremental'}): replica holds previous or new, VM untouched, next cycle clean`, async () => {
      await guestWrite(env.lv, vm.domainName, { offsetMiB: 60 + Math.floor(Math.random() * 30), lengthMiB: 4, pattern: 1 + Math.floor(Math.random() * 250) });
      const candidate = await liveReference(env, vm);
      const k = await snapshotKilledAt(env, vm, phase, { delayMs, flags: full ? [...flags, '--full'] : flags });
      expect(k.phaseSeen, `phase ${phase} never observed; messages: ${k.messages.join(' | ')}`).toBe(true);
      const check = await checkAfterFault(env, vm, baseline, prev, candidate, { flags });
      expect(check.problems).toEqual([]);
      expect(check.dataLost).toBe(false);
      if (prev === null) expect(['none', 'new']).toContain(check.heldAfterFault);
      else expect(['previous', 'new']).toContain(check.heldAfterFault);
      prev = check.newPrev;
    }, 180_000);
  }
});

describe('replica-side faults', () => {
  let vm: OneVm;
  let flags: string[];
  let baseline: Awaited<ReturnType<typeof chainFacts>>;

  beforeAll(async () => {
    vm = await env.createVm({
      vmId: 62,
      disks: [{ diskId: 0, sizeMiB: 96, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 48, pattern: 0x61 }] }],
    });
    await guestWrite(env.lv, vm.domainName, { offsetMiB: 48, lengthMiB: 8, pattern: 0x62 });
    flags = [...env.flags, '--config', await throttleConfig(env.root, 16)];
    baseline = await chainFacts(env, vm);
  });
  afterAll(async () => {
    await vm?.destroy().catch(() => {});
  });

  it('link cut mid-transfer of base (sshd sessions killed): cycle fails cleanly, the next one resumes the upload', async () => {
    const candidate = await liveReference(env, vm);
    const p = spawnAgent(['snapshot', '--vm', '62', '--json'], flags);
    const tmp = path.join(env.snapsDir, '.onestor', 'tmp', '62-0');
    const deadline = Date.now() + 60_000;
    // wait until a few MiB of base have landed on the replica
    while (Date.now() < deadline) {
      const sizes = existsSync(tmp) ? readdirSync(tmp).map((f) => statSync(path.join(tmp, f), { throwIfNoEntry: false })?.size ?? 0) : [];
      if (sizes.some((s) => s > 8 * 1048576)) break;
      await sleep(20);
    }
    // never leave this agent running into the next test, whatever fails below
    const guard = setTimeout(() => p.child.kill('SIGKILL'), 90_000);
    const sessions = sshdSessionPids(env);
    expect(sessions.length, `no sshd sessions; agent exit ${p.child.exitCode} ${p.stdout()} ${p.stderr().slice(-800)}`).toBeGreaterThan(0);
    for (const pid of sessions) process.kill(pid, 'SIGKILL');
    const ex = await p.exited;
    clearTimeout(guard);
    expect(ex.code).toBe(1);
    expect(p.stdout()).toMatch(/"ok": false/);
    // nothing published, nothing half-made inside disk.0.snap
    expect((await drillSum(env, 62)).sum).toBeNull();
    expect(existsSync(path.join(env.snapsDir, '62', 'disk.0.snap', 'base.1'))).toBe(false);
    expect(await waitNoJob(env, vm)).toBe(true);

    const baseSize = statSync(vm.disks[0]!.basePath).size;
    const r = await snapshotOk(env, 62, flags);
    expect(r.mode).toBe('full');
    // resumed: what travelled is less than base (the cut happened after 8 MiB of it had arrived)
    expect(r.bytes).toBeLessThan(baseSize);
    expect((await drillSum(env, 62)).sum).toBe(candidate);
    expect(await chainFacts(env, vm)).toEqual(baseline);
  }, 180_000);

  it('receiver SIGKILLed mid-merge ("replica rebooted"): previous or new survives; the next open redoes or drops the merge', async () => {
    let prev = (await drillSum(env, 62)).sum;
    const work = path.join(env.snapsDir, '.onestor', 'work', '62', 'disk.0');
    let hits = 0;
    for (let attempt = 0; attempt < 4 && hits < 2; attempt++) {
      await guestWrite(env.lv, vm.domainName, { offsetMiB: 0, lengthMiB: 64, pattern: 0x70 + attempt });
      const candidate = await liveReference(env, vm);
      const before = new Set(existsSync(work) ? readdirSync(work) : []);
      const p = spawnAgent(['snapshot', '--vm', '62'], env.flags);
      let done = false;
      void p.exited.then(() => (done = true));
      let killed = false;
      while (!done) {
        const now = existsSync(work) ? readdirSync(work) : [];
        if (now.some((f) => (f === 'journal.json' || /^inc\.\d+$/.test(f)) && !before.has(f))) {
          for (const pid of receiverPids(env.snapsDir)) process.kill(pid, 'SIGKILL');
          killed = true;
          break;
        }
        await sleep(1);
      }
      await p.exited;
      if (killed) hits++;
      const check = await checkAfterFault(env, vm, baseline, prev, candidate, { flags: env.flags });
      expect(check.problems, `attempt ${attempt} killed=${killed} held=${check.heldAfterFault} agent: ${p.stdout()} ${p.stderr().slice(-1500)}`).toEqual([]);
      expect(['previous', 'new']).toContain(check.heldAfterFault);
      prev = check.newPrev;
    }
    expect(hits, 'the merge was never caught in progress').toBeGreaterThan(0);
  }, 300_000);

  it('the VM destroyed mid-job: the cycle fails cleanly, the replica keeps its snapshot, the next cycle after restart succeeds', async () => {
    const prev = (await drillSum(env, 62)).sum;
    expect(prev).not.toBeNull();
    await guestWrite(env.lv, vm.domainName, { offsetMiB: 70, lengthMiB: 8, pattern: 0x7e });
    const p = spawnAgent(['snapshot', '--vm', '62', '--json', '--full'], flags);
    const staging = path.join(vm.dsDir, '.onestor', '62');
    // mid-job: the push target, or the pull-mode export (a full streams from it)
    while (!existsSync(path.join(staging, 'disk.0.full.qcow2')) && !existsSync(path.join(staging, 'nbd.sock')) && p.child.exitCode === null) await sleep(2);
    await env.lv.virshOk(['destroy', vm.domainName]);
    const ex = await p.exited;
    expect(ex.code).toBe(1);
    expect(p.stdout()).toMatch(/"ok": false/);
    expect((await drillSum(env, 62)).sum).toBe(prev);
    expect(existsSync(staging) ? await readdir(staging) : []).toEqual([]);
    await vm.start();
    const after = await chainFacts(env, vm);
    expect(after.baseSums).toEqual(baseline.baseSums);
    expect(after.blk).toBe(baseline.blk);
    const ref = await liveReference(env, vm);
    await snapshotOk(env, 62, flags);
    expect((await drillSum(env, 62)).sum).toBe(ref);
  }, 180_000);

  it('libvirtd killed and restarted mid-job: the cycle fails cleanly, QEMU keeps running, the next cycle is correct', async () => {
    const vm = await env.createVm({ vmId: 66, disks: [{ diskId: 0, sizeMiB: 1024, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 384, pattern: 0x6a }] }] });
    try {
      await snapshotOk(env, 66);
      const prev = (await drillSum(env, 66)).sum;
      const baseline = await chainFacts(env, vm);
      await guestWrite(env.lv, vm.domainName, { offsetMiB: 500, lengthMiB: 64, pattern: 0x6b });
      const candidate = await liveReference(env, vm);
      const p = spawnAgent(['snapshot', '--vm', '66', '--json', '--full'], env.flags);
      let sawJob = false;
      for (let i = 0; i < 600 && !sawJob && p.child.exitCode === null; i++) {
        sawJob = /Job type:\s+Unbounded/.test((await env.lv.virsh(['domjobinfo', vm.domainName])).stdout);
        if (!sawJob) await sleep(10);
      }
      expect(sawJob, 'the backup job was never observed running').toBe(true);
      await lv.restartDaemon('SIGKILL');
      const ex = await p.exited;
      expect([0, 1]).toContain(ex.code);
      expect(await env.lv.virshOk(['domstate', vm.domainName])).toMatch(/running/);
      const check = await checkAfterFault(env, vm, baseline, prev, candidate, { flags: env.flags });
      expect(check.problems).toEqual([]);
      expect(check.dataLost).toBe(false);
    } finally {
      await vm.destroy().catch(() => {});
    }
  }, 240_000);
});

describe('replica out of space', () => {
  it('a full that does not fit fails with a clear error; the previous snapshot stays; after space returns the next cycle succeeds', async () => {
    const e2 = await startAgentEnv({ name: 'nospace', libvirtd: lv });
    let mounted = false;
    let vm: OneVm | undefined;
    try {
      await mkdir(e2.snapsDir, { recursive: true });
      const m = await run('mount', ['-t', 'tmpfs', '-o', 'size=40m,mode=0755', 'onestor-test-nospace', e2.snapsDir]);
      expect(m.code, m.stderr).toBe(0);
      mounted = true;
      vm = await e2.createVm({ vmId: 63, disks: [{ diskId: 0, sizeMiB: 64, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 4, pattern: 0x63 }] }] });
      await guestWrite(e2.lv, vm.domainName, { offsetMiB: 4, lengthMiB: 4, pattern: 0x64 });
      const r1 = await liveReference(e2, vm);
      await snapshotOk(e2, 63);
      expect((await drillSum(e2, 63)).sum).toBe(r1);

      await guestWrite(e2.lv, vm.domainName, { offsetMiB: 8, lengthMiB: 40, pattern: 0x65 });
      const p = spawnAgent(['snapshot', '--vm', '63', '--json', '--full'], e2.flags);
      const ex = await p.exited;
      expect(ex.code).toBe(1);
      const [o] = JSON.parse(p.stdout()) as Array<{ ok: boolean; error: { code: string; message: string } }>;
      expect(o!.ok).toBe(false);
      expect(o!.error.message).toMatch(/space|ENOSPC|full|used/i);
      expect((await drillSum(e2, 63)).sum).toBe(r1);
      const ls = (await readdir(path.join(e2.snapsDir, '63', 'disk.0.snap'))).sort();
      expect(ls).toEqual(['base', 'base.1', 'disk.0.snap']);
      const fs = await statfs(e2.snapsDir);
      expect(Number(fs.bavail)).toBeGreaterThan(0);

      expect((await run('mount', ['-o', 'remount,size=256m', e2.snapsDir])).code).toBe(0);
      const r2 = await liveReference(e2, vm);
      await snapshotOk(e2, 63);
      expect((await drillSum(e2, 63)).sum).toBe(r2);
    } finally {
      await vm?.destroy().catch(() => {});
      if (mounted) await run('umount', [e2.snapsDir]);
      await e2.stop();
    }
  }, 240_000);
});

describe('replica out of space, for real (pre-check off)', () => {
  it('ENOSPC in the middle of an upload: clear E_NOSPACE, temp removed, previous snapshot intact', async () => {
    const e2 = await startAgentEnv({ name: 'enospc', libvirtd: lv, receiverArgs: ['--no-space-check'] });
    let mounted = false;
    let vm: OneVm | undefined;
    try {
      await mkdir(e2.snapsDir, { recursive: true });
      const m = await run('mount', ['-t', 'tmpfs', '-o', 'size=48m,mode=0755', 'onestor-test-enospc', e2.snapsDir]);
      expect(m.code, m.stderr).toBe(0);
      mounted = true;
      vm = await e2.createVm({ vmId: 65, disks: [{ diskId: 0, sizeMiB: 64, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 4, pattern: 0x66 }] }] });
      await guestWrite(e2.lv, vm.domainName, { offsetMiB: 4, lengthMiB: 4, pattern: 0x67 });
      const r1 = await liveReference(e2, vm);
      await snapshotOk(e2, 65);
      expect((await drillSum(e2, 65)).sum).toBe(r1);
      const before = (await readdir(path.join(e2.snapsDir, '65', 'disk.0.snap'))).sort();

      // 44 MiB more cannot fit beside what is there: the receiver accepts (no pre-check) and hits ENOSPC
      await guestWrite(e2.lv, vm.domainName, { offsetMiB: 8, lengthMiB: 44, pattern: 0x68 });
      const p = spawnAgent(['snapshot', '--vm', '65', '--json', '--full'], e2.flags);
      const ex = await p.exited;
      expect(ex.code).toBe(1);
      const [o] = JSON.parse(p.stdout()) as Array<{ ok: boolean; error: { code: string; message: string } }>;
      expect(o!.error.code).toBe('E_NOSPACE');
      expect(o!.error.message).toMatch(/full while receiving/);
      expect((await drillSum(e2, 65)).sum).toBe(r1);
      expect((await readdir(path.join(e2.snapsDir, '65', 'disk.0.snap'))).sort()).toEqual(before);
      // the partial upload was discarded: the space is back
      const fs = await statfs(e2.snapsDir);
      expect(Number(fs.bavail) * Number(fs.bsize)).toBeGreaterThan(20 * 1048576);
    } finally {
      await vm?.destroy().catch(() => {});
      if (mounted) await run('umount', [e2.snapsDir]);
      await e2.stop();
    }
  }, 240_000);
});

describe('the VM "migrated": a second host (own state dir) meets the disk', () => {
  it('learns the lineage from the replica, and the first host coming back does not corrupt it', async () => {
    const vm = await env.createVm({ vmId: 64, disks: [{ diskId: 0, sizeMiB: 64, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 8, pattern: 0x40 }] }] });
    try {
      const hostB = withFlag(env.flags, '--state-dir', path.join(env.root, 'state-host-b'));
      await guestWrite(env.lv, vm.domainName, { offsetMiB: 8, lengthMiB: 4, pattern: 0x41 });
      let ref = await liveReference(env, vm);
      expect((await snapshotOk(env, 64)).mode).toBe('full');
      expect((await drillSum(env, 64)).sum).toBe(ref);

      await guestWrite(env.lv, vm.domainName, { offsetMiB: 12, lengthMiB: 2, pattern: 0x42 });
      ref = await liveReference(env, vm);
      const b = await snapshotOk(env, 64, hostB);
      expect(b.mode, 'host B should continue the lineage it found on the replica').toBe('incremental');
      expect((await drillSum(env, 64)).sum).toBe(ref);

      // back on host A, whose state still names the older checkpoint
      await guestWrite(env.lv, vm.domainName, { offsetMiB: 14, lengthMiB: 2, pattern: 0x43 });
      ref = await liveReference(env, vm);
      await snapshotOk(env, 64);
      expect((await drillSum(env, 64)).sum).toBe(ref);

      // a new host has no checkpoint metadata at all (as after a live migration), but the bitmap is still in
      // the image: it rebuilds the replica's checkpoint from the manifest and, the bitmap being sound,
      // continues incrementally (issue 13)
      const dropMetadata = async () => {
        for (const ck of (await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name'])).split('\n').map((s) => s.trim()).filter((s) => s.startsWith('onestor-'))) {
          await env.lv.virshOk(['checkpoint-delete', vm.domainName, ck, '--metadata']);
        }
      };
      await dropMetadata();
      await guestWrite(env.lv, vm.domainName, { offsetMiB: 20, lengthMiB: 2, pattern: 0x44 });
      ref = await liveReference(env, vm);
      const b2 = await snapshotOk(env, 64, withFlag(env.flags, '--state-dir', path.join(env.root, 'state-host-c')));
      expect(b2.mode).toBe('incremental');
      expect((await drillSum(env, 64)).sum).toBe(ref);

      // ... and without the bitmap either (QMP removes it behind libvirt's back): a full by itself
      await dropMetadata();
      const nodes = JSON.parse(await env.lv.virshOk(['qemu-monitor-command', vm.domainName, '{"execute":"query-named-block-nodes","arguments":{"flat":true}}'])) as { return: Array<{ 'node-name': string; drv: string; 'dirty-bitmaps'?: Array<{ name: string }> }> };
      for (const n of nodes.return.filter((x) => x.drv === 'qcow2')) {
        for (const bm of n['dirty-bitmaps'] ?? []) {
          await env.lv.virshOk(['qemu-monitor-command', vm.domainName, JSON.stringify({ execute: 'block-dirty-bitmap-remove', arguments: { node: n['node-name'], name: bm.name } })]);
        }
      }
      await guestWrite(env.lv, vm.domainName, { offsetMiB: 24, lengthMiB: 2, pattern: 0x45 });
      ref = await liveReference(env, vm);
      const b3 = await snapshotOk(env, 64, withFlag(env.flags, '--state-dir', path.join(env.root, 'state-host-d')));
      expect(b3.mode).toBe('full');
      expect((await drillSum(env, 64)).sum).toBe(ref);
    } finally {
      await vm.destroy().catch(() => {});
    }
  }, 240_000);
});

describe('load: more hosts than receiver sessions', () => {
  it('4 agent instances against --max-sessions 2: all complete, the queue is visible, every drill matches', async () => {
    const N = 4;
    const e3 = await startAgentEnv({ name: 'load', libvirtd: lv, receiverArgs: ['--max-sessions', '2'] });
    const vms: OneVm[] = [];
    try {
      const cfg = await throttleConfig(e3.root, 16);
      for (let i = 0; i < N; i++) {
        const v = await e3.createVm({ vmId: 300 + i, disks: [{ diskId: 0, sizeMiB: 48, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 24, pattern: 0x20 + i }] }] });
        vms.push(v);
      }
      const refs = await Promise.all(vms.map((v) => liveReference(e3, v)));
      const slots = path.join(e3.snapsDir, '.onestor', 'slots');
      let maxReceivers = 0;
      let maxHeld = 0;
      const procs = vms.map((v, i) => spawnAgent(['snapshot', '--vm', String(v.vmId), '--json'], [...withFlag(e3.flags, '--state-dir', path.join(e3.root, `state-${i}`)), '--config', cfg]));
      let running = true;
      const all = Promise.all(procs.map((p) => p.exited)).then((r) => ((running = false), r));
      while (running) {
        maxReceivers = Math.max(maxReceivers, receiverPids(e3.snapsDir).length);
        maxHeld = Math.max(maxHeld, heldSlots(slots));
        await sleep(20);
      }
      const exits = await all;
      for (const [i, ex] of exits.entries()) expect(ex.code, procs[i]!.stdout() + procs[i]!.stderr().slice(-800)).toBe(0);
      for (const [i, v] of vms.entries()) expect((await drillSum(e3, v.vmId)).sum).toBe(refs[i]);
      // queueing: more receivers were connected than sessions were ever held at once
      expect(maxHeld).toBeLessThanOrEqual(2);
      expect(maxHeld).toBeGreaterThan(0);
      expect(maxReceivers).toBeGreaterThan(2);
    } finally {
      for (const v of vms) await v.destroy().catch(() => {});
      await e3.stop();
    }
  }, 300_000);
});

/** Slot locks held right now: slot files whose inode the kernel lists as a held flock in /proc/locks (a waiter is not). */
function heldSlots(slotsDir: string): number {
  let names: string[];
  try {
    names = readdirSync(slotsDir).filter((n) => /^slot\.\d+$/.test(n));
  } catch {
    return 0;
  }
  const held = heldFlocks(readFileSync('/proc/locks', 'utf8'));
  return names.filter((n) => {
    try {
      const st = statSync(path.join(slotsDir, n));
      return held.has(devKey(st.dev, st.ino));
    } catch {
      return false; // gone meanwhile
    }
  }).length;
}
