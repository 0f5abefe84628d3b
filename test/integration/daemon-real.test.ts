/**
 * The daemon (`onestor-agent run` as its own process) against real libvirtd, QEMU and sshd: cadence,
 * SIGTERM in the middle of a capture and of a transfer (clean afterwards: no job, no stray checkpoint,
 * staging gone, the replica still holds a complete snapshot), a corrupt state file rebuilt from the
 * replica, and a replica that refuses us for a while and comes back.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { readFile, writeFile, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { startAgentEnv, agentMain, agentProcessEnv, type AgentEnv } from '../../dev/agent-env.js';
import type { OneVm } from '../../dev/one-layout.js';
import { guestWrite, guestViewSha256, sha256File } from '../../dev/guest.js';
import { recoverDrill } from '../../dev/recover.js';

let env: AgentEnv;
let vm: OneVm;
const VM = 61;

interface Daemon {
  proc: ChildProcess;
  lines: Array<Record<string, unknown>>;
  waitFor(pred: (l: Record<string, unknown>) => boolean, timeoutMs: number): Promise<Record<string, unknown>>;
  stop(): Promise<{ code: number | null; ms: number }>;
}

function startDaemon(extra: string[] = []): Daemon {
  const proc = spawn(process.execPath, [agentMain(), 'run', ...env.flags, '--log-level', 'debug', ...extra], { stdio: ['ignore', 'pipe', 'pipe'], env: agentProcessEnv(env.flags, { JOURNAL_STREAM: '', NOTIFY_SOCKET: '' }) });
  const lines: Array<Record<string, unknown>> = [];
  const waiters: Array<() => void> = [];
  let buf = '';
  const onData = (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      try {
        lines.push(JSON.parse(line) as Record<string, unknown>);
      } catch {
        lines.push({ msg: line });
      }
      for (const w of waiters.splice(0)) w();
    }
  };
  proc.stdout!.on('data', onData);
  proc.stderr!.on('data', onData);
  const exited = new Promise<number | null>((r) => proc.on('exit', (c) => r(c)));
  return {
    proc,
    lines,
    async waitFor(pred, timeoutMs) {
      const t0 = Date.now();
      let seen = 0;
      for (;;) {
        for (; seen < lines.length; seen++) if (pred(lines[seen]!)) return lines[seen]!;
        if (Date.now() - t0 > timeoutMs) throw new Error(`timeout; daemon said:\n${lines.map((l) => JSON.stringify(l)).join('\n')}`);
        await new Promise<void>((r) => {
          waiters.push(r);
          setTimeout(r, 200);
        });
      }
    },
    async stop() {
      const t0 = Date.now();
      proc.kill('SIGTERM');
      const code = await exited;
      return { code, ms: Date.now() - t0 };
    },
  };
}

async function assertClean(): Promise<void> {
  expect((await env.lv.virshOk(['domjobinfo', vm.domainName])).trim()).toMatch(/Job type:\s+None/);
  const cks = (await env.lv.virshOk(['checkpoint-list', vm.domainName, '--name'])).split('\n').filter((s) => s.startsWith('onestor-'));
  expect(cks.length).toBeLessThanOrEqual(1);
  const state = JSON.parse(await readFile(path.join(env.stateDir, 'state.json'), 'utf8'));
  if (cks.length === 1) expect(state.disks[`${VM}.0`].checkpoint).toBe(cks[0]);
  // per-VM staging dirs are gone; the per-VM lock files (VMID.lock) stay, as lock files do
  const staging = await readdir(path.join(env.dsRoot, String(env.dsId), '.onestor')).catch(() => [] as string[]);
  expect(staging.filter((n) => !n.endsWith('.lock'))).toEqual([]);
  expect((await env.lv.virshOk(['domblklist', vm.domainName])).includes(vm.disks[0]!.base1Path)).toBe(true);
}

async function drillMatches(expectedOneOf: string[]): Promise<void> {
  const d = await recoverDrill(env.snapsDir, VM, 0, env.root);
  try {
    expect(d.check.ok, d.check.raw).toBe(true);
    expect(expectedOneOf).toContain(await sha256File(d.rawPath));
  } finally {
    await rm(d.dir, { recursive: true, force: true });
  }
}

const ref = (_tag: string): Promise<string> => guestViewSha256(vm.disks[0]!.base1Path, env.root);

beforeAll(async () => {
  env = await startAgentEnv({ name: 'daemon' });
  vm = await env.createVm({ vmId: VM, disks: [{ diskId: 0, sizeMiB: 768, freq: 10, baseData: [{ offsetMiB: 0, lengthMiB: 256, pattern: 0x31 }] }] });
  // a broken VM beside it must not stop anything
  const broken = await env.createVm({ vmId: 62, disks: [{ diskId: 0, sizeMiB: 16, freq: 10 }], noStart: true });
  await writeFile(path.join(broken.vmDir, 'vm.xml'), '<VM><ID>62</ID><TEMPLATE><DISK><DISK_ID>0');
});

afterAll(async () => {
  await vm?.destroy().catch(() => {});
  await env?.stop();
});

describe('daemon on real daemons', () => {
  it('keeps the cadence: a full, then incrementals every FREQ; status says ok while it runs', async () => {
    const d = startDaemon();
    try {
      await d.waitFor((l) => l.msg === 'daemon ready', 30_000);
      const first = await d.waitFor((l) => l.msg === 'disk published', 60_000);
      expect(first.mode).toBe('full');
      await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 300, lengthMiB: 4, pattern: 0x32 });
      const second = await d.waitFor((l) => l.msg === 'disk published' && l.checkpoint !== first.checkpoint, 30_000);
      expect(second.mode).toBe('incremental');
      const st = await env.agent(['status', '--json']);
      const report = JSON.parse(st.stdout);
      expect(report.daemon.alive).toBe(true);
      const row = report.rows.find((r: { vm: number }) => r.vm === VM);
      expect(row.freq).toBe(10);
      expect(row.age).toBeLessThanOrEqual(22);
      expect(report.rows.find((r: { vm: number }) => r.vm === 62)?.health).toBe('not-eligible');
    } finally {
      const s = await d.stop();
      expect(s.code).toBe(0);
      expect(s.ms).toBeLessThan(35_000);
    }
    await assertClean();
  });

  it.each(['capture', 'transfer'] as const)('SIGTERM during the %s: bounded exit, nothing left behind, previous snapshot intact', async (phase) => {
    // what the replica holds now (the previous snapshot), then new guest data for the cycle to take
    const drill = await recoverDrill(env.snapsDir, VM, 0, env.root);
    const before = await sha256File(drill.rawPath);
    await rm(drill.dir, { recursive: true, force: true });
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 320, lengthMiB: 128, pattern: phase === 'capture' ? 0x41 : 0x42 });
    const after = await ref(`post-${phase}`);
    const d = startDaemon();
    let stopped: { code: number | null; ms: number };
    try {
      await d.waitFor((l) => (phase === 'capture' ? l.msg === 'cycle start' : l.msg === 'captured'), 60_000);
      stopped = await d.stop();
      expect(stopped.code).toBe(0);
      expect(stopped.ms).toBeLessThan(35_000);
      await assertClean();
      // either the snapshot before the writes, or (if the cycle won the race) the one after
      await drillMatches([before, after]);
    } finally {
      if (d.proc.exitCode === null) await d.stop();
    }
  });

  it('SIGHUP re-reads the configuration; a broken one is refused and the running one kept', async () => {
    const cfg = path.join(env.root, 'config.json');
    await writeFile(cfg, JSON.stringify({ limits: { concurrency: 2 } }));
    const d = startDaemon(['--config', cfg]);
    try {
      await d.waitFor((l) => l.msg === 'daemon ready', 30_000);
      await writeFile(cfg, JSON.stringify({ limits: { concurrency: 1 } }));
      d.proc.kill('SIGHUP');
      const ok = await d.waitFor((l) => l.msg === 'configuration reloaded', 15_000);
      expect(ok.concurrency).toBe(1);
      await writeFile(cfg, JSON.stringify({ limits: { concurency: 3 } }));
      d.proc.kill('SIGHUP');
      const bad = await d.waitFor((l) => String(l.msg).startsWith('configuration reload failed'), 15_000);
      expect(String(bad.err)).toMatch(/concurency/);
      // still working with the kept configuration
      await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 510, lengthMiB: 1, pattern: 0x44 });
      const n = d.lines.length;
      await d.waitFor((l) => l.msg === 'cycle end' && d.lines.indexOf(l) >= n, 40_000);
    } finally {
      const s = await d.stop();
      expect(s.code).toBe(0);
    }
  });

  it('corrupt state file: moved aside, rebuilt from the replica manifests, stays incremental', async () => {
    const stateFile = path.join(env.stateDir, 'state.json');
    await writeFile(stateFile, '{"version":1,"disks":{"61.0":{"vmId":');
    const d = startDaemon();
    try {
      await d.waitFor((l) => l.msg === 'state rebuilt from the replica manifests', 30_000);
      await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 500, lengthMiB: 2, pattern: 0x43 });
      const p = await d.waitFor((l) => l.msg === 'disk published', 40_000);
      expect(p.mode).toBe('incremental');
    } finally {
      await d.stop();
    }
    expect((await readdir(env.stateDir)).some((f) => f.startsWith('state.json.corrupt-'))).toBe(true);
  });

  it('replica refuses us for a while: failures counted with their code, then it heals by itself', async () => {
    const good = await readFile(env.sshd.authorizedKeysPath, 'utf8');
    await env.sshd.setAuthorizedKeys([]);
    const d = startDaemon();
    try {
      const fail = await d.waitFor((l) => l.msg === 'disk failed', 60_000);
      expect(String(fail.code)).toBe('E_SSH');
      const st = await env.agent(['status', '--json']);
      expect(st.code).toBe(3);
      const row = JSON.parse(st.stdout).rows.find((r: { vm: number }) => r.vm === VM);
      expect(row.health).toBe('failing');
      expect(row.detail).toMatch(/E_SSH/);
      await env.sshd.setAuthorizedKeys(good.trim().split('\n'));
      await d.waitFor((l) => l.msg === 'cycle end' && l.ok === 1, 120_000);
      const state = JSON.parse(await readFile(path.join(env.stateDir, 'state.json'), 'utf8'));
      expect(state.disks[`${VM}.0`].failCount).toBe(0);
    } finally {
      await d.stop();
    }
  });
});
