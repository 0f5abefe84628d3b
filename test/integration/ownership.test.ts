/**
 * Ownership and tamper evidence end to end (issue 11), with a real libvirtd + QEMU guest, the real agent
 * (host A), the real sshd and `onestor-agent receive` bound per key:
 *   A   the agent's key,          `receive --host hvA`
 *   B   another hypervisor's key, `receive --host hvB`
 *   A2  a second key also bound to hvA (a copied key): same owner name, so only the token can tell
 * B refuses to be allowed an incremental on A's lineage, then takes it over with a full (as a migration
 * would); A's next cycle must see that the replica no longer holds its own publish and take a full (reason in
 * state and probe), never an incremental on B's data; the recover drill always equals the last writer's capture.
 */
import { mkdir, readFile, rm, stat, symlink } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { errorCodeOf } from '../../lib/shared/errors.js';
import { run } from '../../lib/shared/exec.js';
import { ReplicaClient, type ReplicaConnectOptions } from '../../lib/transfer/replica-client.js';
import type { ReplicaManifest } from '../../lib/shared/model.js';
import { agentMain, startAgentEnv, type AgentEnv } from '../../dev/agent-env.js';
import type { OneVm } from '../../dev/one-layout.js';
import { guestViewSha256, guestWrite, sha256File } from '../../dev/guest.js';
import { recoverDrill } from '../../dev/recover.js';
import { generateKey } from '../../dev/sshd.js';

const VM = 61;
const SIZE_MIB = 64;
let env: AgentEnv;
let vm: OneVm;
const keys: Record<string, string> = {};

function receiverLine(host: string, pub: string): string {
  const cmd = [process.execPath, agentMain(), 'receive', '--snaps-dir', env.snapsDir, '--sshrc', path.join(env.root, 'sshrc'), '--log-level', 'warn', '--host', host];
  return `command="${cmd.join(' ')}",restrict ${pub}`;
}

function connect(key: string): Promise<ReplicaClient> {
  const o: ReplicaConnectOptions = {
    host: env.sshd.host,
    port: env.sshd.port,
    username: env.sshd.user,
    privateKey: keys[key]!,
    knownHostsFile: env.sshd.knownHostsPath,
    acceptNewHostKey: false,
    receiverCommand: 'onestor-agent receive',
    connectTimeoutMs: 10_000,
    localHost: 'hvA', // every client claims to be hvA: the replica must not care
  };
  return ReplicaClient.connect(o);
}

async function q(args: string[]): Promise<string> {
  const r = await run(args[0]!, args.slice(1));
  if (r.code !== 0) throw new Error(`${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

async function snapshot(): Promise<{ mode: string; out: string }> {
  const r = await env.agent(['snapshot', '--vm', String(VM)]);
  expect(r.code, r.stdout + r.stderr).toBe(0);
  const m = /disk 0: (full|incremental) snapshot published/.exec(r.stdout);
  expect(m, r.stdout).not.toBeNull();
  return { mode: m![1]!, out: r.stdout + r.stderr };
}

async function diskState(): Promise<Record<string, any>> {
  const s = JSON.parse(await readFile(path.join(env.stateDir, 'state.json'), 'utf8'));
  return s.disks[`${VM}.0`];
}

async function manifest(): Promise<ReplicaManifest & Record<string, any>> {
  return JSON.parse(await readFile(path.join(env.snapsDir, String(VM), '.onestor', 'disk.0.json'), 'utf8'));
}

async function drillSha(): Promise<string> {
  const d = await recoverDrill(env.snapsDir, VM, 0, env.root);
  try {
    expect(d.backingName).toBe('disk.0.snap/base');
    expect(d.check.ok, d.check.raw).toBe(true);
    return await sha256File(d.rawPath);
  } finally {
    await rm(d.dir, { recursive: true, force: true });
  }
}

/** What another host "captured": an overlay on the same base (backing name disk.0.snap/base) with a marker. */
async function foreignBase1(name: string, pattern: number): Promise<{ file: string; view: string }> {
  const dir = path.join(env.root, name);
  await mkdir(dir, { recursive: true });
  await symlink(vm.disks[0]!.snapDir, path.join(dir, 'disk.0.snap'));
  const file = path.join(dir, 'base.1');
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'disk.0.snap/base', '-F', 'qcow2', file]);
  await q(['qemu-io', '-f', 'qcow2', '-c', `write -P ${pattern} 40M 2M`, file]);
  return { file, view: await guestViewSha256(file, env.root) };
}

/**
 * A full from another key, published under the checkpoint name the replica holds now (the reproduced attack:
 * with only checkpoint names to go by, A's next incremental would be merged on top of it).
 */
async function fullFrom(key: string, name: string, pattern: number): Promise<{ m: ReplicaManifest; view: string; diag: string }> {
  const b1 = await foreignBase1(name, pattern);
  const checkpoint = (await manifest()).checkpoint;
  const c = await connect(key);
  try {
    const d = await c.openDisk(VM, 0);
    expect(d.baseOnReplica).not.toBeNull(); // same base: only base.1 travels
    await d.upload('base1', b1.file, { key: `${name}.base1` });
    const m = await d.publishFull({ checkpoint, capturedAt: Math.floor(Date.now() / 1000), consistency: 'crash-consistent', sourceHost: 'hvA', base1: `${name}.base1` });
    await d.close();
    await new Promise((r) => setTimeout(r, 300)); // the receiver's stderr arrives on its own stream
    return { m, view: b1.view, diag: c.connection.diagnostics() };
  } finally {
    await c.close();
  }
}

beforeAll(async () => {
  env = await startAgentEnv({ name: 'own', receiverArgs: ['--host', 'hvA'] });
  vm = await env.createVm({ vmId: VM, disks: [{ diskId: 0, sizeMiB: SIZE_MIB, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 8, pattern: 0x61 }] }] });
  keys.A = env.sshd.clientKeyPath;
  const pubB = await generateKey((keys.B = path.join(env.root, 'key-B')), 'hvB');
  const pubA2 = await generateKey((keys.A2 = path.join(env.root, 'key-A2')), 'hvA-copy');
  await env.sshd.setAuthorizedKeys([receiverLine('hvA', env.sshd.clientPublicKey), receiverLine('hvB', pubB), receiverLine('hvA', pubA2)]);
}, 300_000);

afterAll(async () => {
  await vm?.destroy().catch(() => {});
  await env?.stop();
});

describe('ownership and tamper evidence across two hosts', () => {
  it('host A seeds and steps incrementally; its state keeps the token the replica chose', async () => {
    expect((await snapshot()).mode).toBe('full');
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 10, lengthMiB: 2, pattern: 0x62 });
    const expected = await guestViewSha256(vm.disks[0]!.base1Path, env.root);
    expect((await snapshot()).mode).toBe('incremental');
    const m = await manifest();
    expect(m).toMatchObject({ owner: 'hvA', sourceHost: 'hvA', mode: 'incremental' });
    expect((await diskState()).replicaToken).toBe(m.token);
    expect(await drillSha()).toBe(expected);
  });

  it('host B\'s incremental on A\'s lineage is refused with E_OWNER; A\'s snapshot is untouched', async () => {
    const base1 = path.join(env.snapsDir, String(VM), 'disk.0.snap', 'base.1');
    const before = { sha: await sha256File(base1), ino: (await stat(base1)).ino, manifest: await manifest() };
    const inc = path.join(env.root, 'b.inc.qcow2');
    await q(['qemu-img', 'create', '-q', '-f', 'qcow2', inc, `${SIZE_MIB}M`]);
    await q(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0xbb 20M 1M', inc]);
    const c = await connect('B');
    try {
      expect(c.writer).toBe('hvB');
      const d = await c.openDisk(VM, 0);
      await d.upload('inc', inc, { key: 'b.inc' });
      const err = await d.publishIncremental({ parentCheckpoint: d.manifest!.checkpoint!, checkpoint: 'b-evil', capturedAt: Math.floor(Date.now() / 1000), consistency: 'crash-consistent', sourceHost: 'hvA', inc: 'b.inc' }).catch((e: unknown) => e);
      expect(errorCodeOf(err)).toBe('E_OWNER');
      await d.close();
    } finally {
      await c.close();
    }
    expect({ sha: await sha256File(base1), ino: (await stat(base1)).ino, manifest: await manifest() }).toEqual(before);
  });

  it('host B takes the lineage over with a full: accepted, warned with both names, history A -> B; the drill gives B\'s capture', async () => {
    const tokenA = (await diskState()).replicaToken;
    const b = await fullFrom('B', 'hvB-capture', 0xb1);
    expect(b.m).toMatchObject({ owner: 'hvB', sourceHost: 'hvB', checkpoint: (await diskState()).checkpoint });
    expect(b.m.token).not.toBe(tokenA);
    expect(b.m.history!.map((h) => `${h.from ?? '-'}->${h.to}`)).toEqual(['-->hvA', 'hvA->hvB']);
    const warn = b.diag.split('\n').find((l) => l.includes('lineage taken over'));
    expect(warn, b.diag).toBeDefined();
    expect(JSON.parse(warn!)).toMatchObject({ level: 40, writer: 'hvB', from: 'hvA', to: 'hvB' });
    expect(await drillSha()).toBe(b.view);
  });

  it('A\'s next cycle sees the lineage is not its own and takes a full (reason in state and probe), never an incremental on B\'s data', async () => {
    const expected = await guestViewSha256(vm.disks[0]!.base1Path, env.root);
    const s = await snapshot();
    expect(s.mode).toBe('full');
    expect(s.out).toMatch(/last published by hvB, not by this host \(hvA\); token mismatch/);
    const d = await diskState();
    expect(d.lineageAlert).toMatchObject({ kind: 'foreign-owner' });
    expect(d.lineageAlert.reason).toMatch(/token mismatch/);
    expect(d.lastSuccess).toMatchObject({ mode: 'full' });
    expect(d.lastSuccess.reason).toMatch(/hvB/);
    const m = await manifest();
    expect(m.owner).toBe('hvA');
    expect(m.history!.map((h) => `${h.from ?? '-'}->${h.to}`)).toEqual(['-->hvA', 'hvA->hvB', 'hvB->hvA']);
    expect(d.replicaToken).toBe(m.token);
    // the replica now holds exactly what A captured: no trace of B's marker
    expect(await drillSha()).toBe(expected);
  });

  it('a copied key under the same name (owner unchanged) is caught by the token alone', async () => {
    const a2 = await fullFrom('A2', 'hvA-copy-capture', 0xa2);
    expect(a2.m).toMatchObject({ owner: 'hvA', checkpoint: (await diskState()).checkpoint });
    expect(a2.diag).not.toMatch(/lineage taken over/);
    expect(await drillSha()).toBe(a2.view);

    const expected = await guestViewSha256(vm.disks[0]!.base1Path, env.root);
    const s = await snapshot();
    expect(s.mode).toBe('full');
    const d = await diskState();
    expect(d.lineageAlert).toMatchObject({ kind: 'token-mismatch' });
    expect(d.lineageAlert.reason).toMatch(/token mismatch: the replica holds a publish this host did not make/);
    expect(await drillSha()).toBe(expected);

    const r = await env.agent(['probe', 'vm-snapshot']);
    const vmLine = r.stdout.split('\n').find((l) => l.startsWith(`VM = [ ID="${VM}"`));
    expect(vmLine, r.stdout + r.stderr).toBeDefined();
    const monitor = Buffer.from(/MONITOR="([^"]+)"/.exec(vmLine!)![1]!, 'base64').toString('utf8');
    expect(monitor).toMatch(/LINEAGE_ALERT="token-mismatch", LINEAGE_ALERT_AT="\d+", LINEAGE_ALERT_REASON="token mismatch/);
  });

  it('with its own publish back on the replica, A steps incrementally again', async () => {
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 50, lengthMiB: 1, pattern: 0x63 });
    const expected = await guestViewSha256(vm.disks[0]!.base1Path, env.root);
    expect((await snapshot()).mode).toBe('incremental');
    expect(await drillSha()).toBe(expected);
    expect((await diskState()).replicaToken).toBe((await manifest()).token);
  });
});

/** An increment as another host's capture makes it (the receiver points its backing at the spare). */
async function incWith(name: string, pattern: number, offsetMiB: number): Promise<string> {
  const inc = path.join(env.root, `${name}.inc.qcow2`);
  await rm(inc, { force: true });
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', inc, `${SIZE_MIB}M`]);
  await q(['qemu-io', '-f', 'qcow2', '-c', `write -P ${pattern} ${offsetMiB}M 1M`, inc]);
  return inc;
}

/** The guest view the replica's base.1 has once `pattern` is written at offsetMiB (what a merge must give). */
async function replicaViewWith(name: string, pattern: number, offsetMiB: number): Promise<string> {
  const dir = path.join(env.root, `${name}-expected`);
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  await symlink(vm.disks[0]!.snapDir, path.join(dir, 'disk.0.snap'));
  const file = path.join(dir, 'base.1');
  await q(['cp', path.join(env.snapsDir, String(VM), 'disk.0.snap', 'base.1'), file]);
  await q(['qemu-io', '-f', 'qcow2', '-c', `write -P ${pattern} ${offsetMiB}M 1M`, file]);
  return guestViewSha256(file, env.root);
}

async function incrementFrom(key: string, name: string, pattern: number, offsetMiB: number): Promise<{ m?: ReplicaManifest; err?: unknown; diag: string }> {
  const inc = await incWith(name, pattern, offsetMiB);
  const c = await connect(key);
  try {
    const d = await c.openDisk(VM, 0);
    await d.upload('inc', inc, { key: `${name}.inc` });
    const r = await d
      .publishIncremental({ parentCheckpoint: d.manifest!.checkpoint!, checkpoint: `${name}-ck`, capturedAt: Math.floor(Date.now() / 1000), consistency: 'crash-consistent', sourceHost: 'hvA', inc: `${name}.inc` })
      .then((m) => ({ m }), (err: unknown) => ({ err }));
    await d.close();
    await new Promise((res) => setTimeout(res, 300)); // the receiver's stderr arrives on its own stream
    return { ...r, diag: c.connection.diagnostics() };
  } finally {
    await c.close();
  }
}

async function releaseFrom(key: string, to: string, ttlSec = 3600): Promise<unknown> {
  const c = await connect(key);
  try {
    const d = await c.openDisk(VM, 0);
    const r = await d.release(to, ttlSec).catch((e: unknown) => e);
    await d.close();
    return r;
  } finally {
    await c.close();
  }
}

async function ledgerCount(kind: 'takeovers' | 'handovers'): Promise<number> {
  const text = await readFile(path.join(env.snapsDir, '.onestor', 'ownership', `${kind}.jsonl`), 'utf8').catch(() => '');
  return text.split('\n').filter(Boolean).length;
}

describe('lineage release and hand-over (live migration without a shared key)', () => {
  it('only the owner may release: B\'s release of A\'s lineage is E_RELEASE and changes nothing; A cannot release to itself', async () => {
    const before = await manifest();
    expect(before.owner).toBe('hvA');
    expect(errorCodeOf(await releaseFrom('B', 'hvB'))).toBe('E_RELEASE');
    expect(errorCodeOf(await releaseFrom('A', 'hvA'))).toBe('E_RELEASE');
    expect(errorCodeOf(await releaseFrom('A', 'HVA.example'))).toBe('E_RELEASE');
    expect(await manifest()).toEqual(before);
  });

  it('a release to another host does not let B continue (E_OWNER names the recipient); A\'s release to B does: a hand-over, logged and counted apart', async () => {
    const r1 = await releaseFrom('A', 'hvC');
    expect(r1).toMatchObject({ from: 'hvA', to: 'hvC' });
    const refused = await incrementFrom('B', 'b-not-for-me', 0xbc, 20);
    expect(errorCodeOf(refused.err)).toBe('E_OWNER');
    expect(String((refused.err as Error).message)).toMatch(/released to hvC, not to this host/);

    const tokenA = (await manifest()).token;
    const r2 = (await releaseFrom('A', 'hvB')) as { from: string; to: string; token: string; until: number; at: number };
    expect(r2).toMatchObject({ from: 'hvA', to: 'hvB', token: tokenA });
    expect(r2.until - r2.at).toBe(3600);
    expect((await manifest()).release).toMatchObject({ to: 'hvB' }); // the later release replaced the first
    const [takeovers, handovers] = [await ledgerCount('takeovers'), await ledgerCount('handovers')];
    const expected = await replicaViewWith('b-handover', 0xbd, 22);
    const b = await incrementFrom('B', 'b-handover', 0xbd, 22);
    expect(b.err).toBeUndefined();
    expect(b.m).toMatchObject({ owner: 'hvB', sourceHost: 'hvB', mode: 'incremental', checkpoint: 'b-handover-ck' });
    expect(b.m!.release).toBeUndefined();
    expect(b.m!.history!.at(-1)).toMatchObject({ from: 'hvA', to: 'hvB', kind: 'handover' });
    const warn = b.diag.split('\n').find((l) => l.includes('lineage handed over'));
    expect(warn, b.diag).toBeDefined();
    expect(JSON.parse(warn!)).toMatchObject({ level: 40, writer: 'hvB', from: 'hvA', to: 'hvB' });
    expect(b.diag).not.toMatch(/lineage taken over/);
    expect(await ledgerCount('handovers')).toBe(handovers + 1);
    expect(await ledgerCount('takeovers')).toBe(takeovers);
    expect(await drillSha()).toBe(expected);
  });

  it('the released-from host can no longer write incrementally (E_OWNER); its agent takes a full (a take-over), once', async () => {
    const before = await manifest();
    const a = await incrementFrom('A', 'a-after-handover', 0xae, 24);
    expect(errorCodeOf(a.err)).toBe('E_OWNER');
    expect(await manifest()).toEqual(before);
    const expected = await guestViewSha256(vm.disks[0]!.base1Path, env.root);
    const s = await snapshot();
    expect(s.mode).toBe('full');
    expect(s.out).toMatch(/last published by hvB, not by this host \(hvA\)/);
    expect(await drillSha()).toBe(expected);
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 52, lengthMiB: 1, pattern: 0x64 });
    expect((await snapshot()).mode).toBe('incremental');
  });

  it('a release is void once its owner publishes again', async () => {
    expect(await releaseFrom('A', 'hvB')).toMatchObject({ to: 'hvB' });
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 54, lengthMiB: 1, pattern: 0x65 });
    expect((await snapshot()).mode).toBe('incremental');
    expect((await manifest()).release).toBeUndefined();
    const b = await incrementFrom('B', 'b-too-late', 0xbe, 26);
    expect(errorCodeOf(b.err)).toBe('E_OWNER');
  });
});
