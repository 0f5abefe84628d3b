/**
 * Identity and ownership through the real sshd and the real `onestor-agent receive` (the CLI that install.sh
 * binds into each key's forced command), with several client keys:
 *   A  `--host hvA`                      B  `--host hvB`
 *   K  no --host, sshd ExposeAuthInfo -> the key's SHA256 fingerprint
 * and on a second sshd without ExposeAuthInfo: a key with neither (refused) and one with --allow-unidentified.
 * Images are made with qemu-img/qemu-io; the receiver, its checks and the manifests are the real ones.
 */
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { errorCodeOf } from '../../lib/shared/errors.js';
import { run } from '../../lib/shared/exec.js';
import { ReplicaClient, type ReplicaConnectOptions } from '../../lib/transfer/replica-client.js';
import { runProbe } from '../../lib/monitor/run-probe.js';
import { generateKey, startSshd, type Sshd } from '../../dev/sshd.js';
import { agentMain, projectRoot } from '../../dev/agent-env.js';
import { ensureDistBuilt } from '../helpers/build-dist.js';

const SIZE = 16 * 1024 * 1024;
let work: string;
let sshrc: string;
let exposed: Sshd; // ExposeAuthInfo yes
let plain: Sshd; // sshd defaults (ExposeAuthInfo no)
const keys: Record<string, string> = {}; // name -> private key path
let fingerprintK: string;


function forced(snaps: string, extra: string): string {
  return `command="${process.execPath} ${agentMain()} receive --snaps-dir ${snaps} --sshrc ${sshrc} --log-level warn${extra ? ` ${extra}` : ''}",restrict`;
}

function opts(s: Sshd, key: string, extra: Partial<ReplicaConnectOptions> = {}): ReplicaConnectOptions {
  return {
    host: s.host,
    port: s.port,
    username: s.user,
    privateKey: keys[key]!,
    knownHostsFile: s.knownHostsPath,
    acceptNewHostKey: false,
    receiverCommand: 'onestor-agent receive',
    connectTimeoutMs: 10_000,
    localHost: `claims-${key}`,
    ...extra,
  };
}

async function q(args: string[]): Promise<string> {
  const r = await run(args[0]!, args.slice(1));
  if (r.code !== 0) throw new Error(`${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

/** A source disk.N.snap (base + base.1 over it) with recognizable data. */
async function makeSource(name: string, pattern: number): Promise<{ base: string; base1: string; snap: string }> {
  const snap = path.join(work, name, 'disk.0.snap');
  await fsp.mkdir(snap, { recursive: true });
  await fsp.symlink('.', path.join(snap, 'disk.0.snap'));
  const base = path.join(snap, 'base');
  const base1 = path.join(snap, 'base.1');
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', base, String(SIZE)]);
  await q(['qemu-io', '-f', 'qcow2', '-c', 'write -P 0x11 0 2M', base]);
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'disk.0.snap/base', '-F', 'qcow2', base1]);
  await q(['qemu-io', '-f', 'qcow2', '-c', `write -P ${pattern} 4M 1M`, base1]);
  return { base, base1, snap };
}

/** An increment (as a reuse-external capture leaves it) holding one write. */
async function makeInc(name: string, pattern: number): Promise<string> {
  const inc = path.join(work, `${name}.qcow2`);
  await q(['qemu-img', 'create', '-q', '-f', 'qcow2', inc, String(SIZE)]);
  await q(['qemu-io', '-f', 'qcow2', '-c', `write -P ${pattern} 8M 64k`, inc]);
  await q(['qemu-img', 'rebase', '-u', '-f', 'qcow2', '-b', '/nonexistent/capture-target', '-F', 'qcow2', inc]);
  return inc;
}

async function seed(c: ReplicaClient, vm: number, checkpoint: string, src: { base: string; base1: string }, sourceHost: string) {
  const d = await c.openDisk(vm, 0);
  try {
    const withBase = d.baseOnReplica === null;
    if (withBase) await d.upload('base', src.base, { key: `base-${checkpoint}` });
    await d.upload('base1', src.base1, { key: `${checkpoint}.base1` });
    return await d.publishFull({ checkpoint, capturedAt: 1_700_000_000, consistency: 'crash-consistent', sourceHost, ...(withBase ? { base: `base-${checkpoint}` } : {}), base1: `${checkpoint}.base1` });
  } finally {
    await d.close();
  }
}

async function snapshotOfFiles(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const n of ['disk.0.snap/base', 'disk.0.snap/base.1', '.onestor/disk.0.json']) {
    const st = await fsp.stat(path.join(dir, n));
    out[n] = `${st.ino}:${st.size}:${st.mtimeMs}:${await q(['sha256sum', path.join(dir, n)])}`;
  }
  return out;
}

async function manifestOnDisk(snaps: string, vm: number): Promise<Record<string, unknown>> {
  return JSON.parse(await fsp.readFile(path.join(snaps, String(vm), '.onestor', 'disk.0.json'), 'utf8'));
}

/** The receiver's stderr reaches the client through sshd; it arrives on its own stream, so wait for it. */
async function diagnosticsMatching(c: ReplicaClient, re: RegExp): Promise<string> {
  for (let i = 0; i < 100; i++) {
    const d = c.connection.diagnostics();
    if (re.test(d)) return d;
    await new Promise((r) => setTimeout(r, 20));
  }
  return c.connection.diagnostics();
}

beforeAll(async () => {
  await ensureDistBuilt();
  work = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-ident-ssh-'));
  exposed = await startSshd({ extraConfig: ['ExposeAuthInfo yes'] });
  plain = await startSshd();
  sshrc = path.join(work, 'sshrc');
  await fsp.writeFile(sshrc, `REPLICA_RECOVERY_SNAPS_DIR=${exposed.replicaDir}\nREPLICA_MAX_USED_PERC=99\n`);
  keys.A = exposed.clientKeyPath;
  const pub: Record<string, string> = { A: exposed.clientPublicKey };
  for (const k of ['B', 'K', 'U2', 'R', 'R2']) {
    keys[k] = path.join(work, `key-${k}`);
    pub[k] = await generateKey(keys[k]!, `test-${k}`);
  }
  keys.U = plain.clientKeyPath;
  pub.U = plain.clientPublicKey;
  fingerprintK = (await q(['ssh-keygen', '-l', '-E', 'sha256', '-f', `${keys.K}.pub`])).split(' ')[1]!;
  await exposed.setAuthorizedKeys([
    `${forced(exposed.replicaDir, '--host hvA')} ${pub.A}`,
    `${forced(exposed.replicaDir, '--host hvB')} ${pub.B}`,
    `${forced(exposed.replicaDir, '')} ${pub.K}`,
  ]);
  // the stand-alone receiver entry (receiver-main) resolves identity the same way
  const standalone = (extra: string) => `command="${process.execPath} ${path.join(projectRoot(), 'dist', 'agent', 'receiver-main.js')} --snaps-dir ${plain.replicaDir}${extra}",restrict`;
  await plain.setAuthorizedKeys([
    `${forced(plain.replicaDir, '')} ${pub.U}`,
    `${forced(plain.replicaDir, '--allow-unidentified')} ${pub.U2}`,
    `${standalone('')} ${pub.R}`,
    `${standalone(' --host hvR')} ${pub.R2}`,
  ]);
}, 300_000);

afterAll(async () => {
  await exposed?.stop();
  await plain?.stop();
  if (work) await fsp.rm(work, { recursive: true, force: true });
});

describe('who writes is what sshd authenticated', () => {
  it('a key bound with --host writes as that host, whatever hello and publish claim', async () => {
    const src = await makeSource('a31', 0x31);
    const a = await ReplicaClient.connect(opts(exposed, 'A', { localHost: 'hvB' }));
    try {
      expect(a.writer).toBe('hvA');
      const m = await seed(a, 31, 'ckA1', src, 'hvB');
      expect(m).toMatchObject({ owner: 'hvA', sourceHost: 'hvA', checkpoint: 'ckA1' });
      expect(m.token).toMatch(/^[0-9a-f]{32}$/);
      expect(m.history).toEqual([expect.objectContaining({ from: null, to: 'hvA', checkpoint: 'ckA1' })]);
      expect(await manifestOnDisk(exposed.replicaDir, 31)).toMatchObject({ owner: 'hvA', sourceHost: 'hvA', token: m.token });
      // the false claim is logged at warning, with the authenticated writer on the line
      const diag = await diagnosticsMatching(a, /hello names another host/);
      const line = diag.split('\n').find((l) => l.includes('hello names another host'));
      expect(line, diag).toBeDefined();
      expect(JSON.parse(line!)).toMatchObject({ level: 40, writer: 'hvA', claimed: 'hvB' });
    } finally {
      await a.close();
    }
  });

  it('without --host, the fingerprint of the key sshd accepted (ExposeAuthInfo) names the writer', async () => {
    const src = await makeSource('k32', 0x32);
    const k = await ReplicaClient.connect(opts(exposed, 'K', { localHost: 'hvA' }));
    try {
      expect(k.writer).toBe(fingerprintK);
      const m = await seed(k, 32, 'ckK1', src, 'hvA');
      expect(m.owner).toBe(fingerprintK);
    } finally {
      await k.close();
    }
  });

  it('status without a VM lists only the caller\'s own disks; status VM is open to every authorized host', async () => {
    const seen: Record<string, number[]> = {};
    for (const who of ['A', 'K', 'B']) {
      const c = await ReplicaClient.connect(opts(exposed, who));
      try {
        seen[who] = (await c.status()).map((m) => m.vmId);
        if (who === 'B') expect((await c.status(31)).map((m) => m.owner)).toEqual(['hvA']);
      } finally {
        await c.close();
      }
    }
    expect(seen).toEqual({ A: [31], K: [32], B: [] });
  });

  it('neither --host nor ExposeAuthInfo: the session is refused with E_IDENTITY and nothing is written', async () => {
    const err = await ReplicaClient.connect(opts(plain, 'U')).catch((e: unknown) => e);
    expect(errorCodeOf(err)).toBe('E_IDENTITY');
    expect((err as Error).message).toMatch(/receive --host NAME/);
    expect(await fsp.readdir(plain.replicaDir)).toEqual([]);
  });

  it('the stand-alone receiver entry binds and refuses the same way', async () => {
    const err = await ReplicaClient.connect(opts(plain, 'R')).catch((e: unknown) => e);
    expect(errorCodeOf(err)).toBe('E_IDENTITY');
    const c = await ReplicaClient.connect(opts(plain, 'R2'));
    try {
      expect(c.writer).toBe('hvR');
    } finally {
      await c.close();
    }
  });

  it('--allow-unidentified serves such a key as "(unidentified)" and warns about it', async () => {
    const c = await ReplicaClient.connect(opts(plain, 'U2'));
    try {
      expect(c.writer).toBe('(unidentified)');
      const diag = await diagnosticsMatching(c, /writer not identified/);
      expect(diag).toMatch(/"level":40.*"writer":"\(unidentified\)".*writer not identified/);
    } finally {
      await c.close();
    }
  });
});

describe('a lineage belongs to the host that published it last', () => {
  it('another host\'s incremental is refused with E_OWNER and the owner\'s snapshot stays byte- and inode-identical', async () => {
    const vmDir = path.join(exposed.replicaDir, '31');
    const before = await snapshotOfFiles(vmDir);
    const b = await ReplicaClient.connect(opts(exposed, 'B', { localHost: 'hvA' }));
    try {
      // B learns the parent through `status VM` (allowed) and sends a well-formed increment on it.
      const [m] = await b.status(31);
      const d = await b.openDisk(31, 0);
      await d.upload('inc', await makeInc('b-inc', 0x66), { key: 'ckB-evil.inc' });
      const err = await d.publishIncremental({ parentCheckpoint: m!.checkpoint!, checkpoint: 'ckB-evil', capturedAt: 1_700_000_100, consistency: 'crash-consistent', sourceHost: 'hvA', inc: 'ckB-evil.inc' }).catch((e: unknown) => e);
      expect(errorCodeOf(err)).toBe('E_OWNER');
      expect((err as Error).message).toMatch(/belongs to hvA, this session is hvB/);
      await d.close();
    } finally {
      await b.close();
    }
    expect(await snapshotOfFiles(vmDir)).toEqual(before);
  });

  it('a full from another host takes the lineage over: accepted, warned with both names, in the history, the ledger and the probe', async () => {
    const srcB = await makeSource('b31', 0x5b);
    const tokenA = (await manifestOnDisk(exposed.replicaDir, 31)).token;
    const b = await ReplicaClient.connect(opts(exposed, 'B'));
    let mB;
    try {
      mB = await seed(b, 31, 'ckB1', srcB, 'hvB');
      const diag = await diagnosticsMatching(b, /lineage taken over/);
      const line = diag.split('\n').find((l) => l.includes('lineage taken over'));
      expect(line, diag).toBeDefined();
      expect(JSON.parse(line!)).toMatchObject({ level: 40, writer: 'hvB', from: 'hvA', to: 'hvB', vm: 31, disk: 0 });
    } finally {
      await b.close();
    }
    expect(mB.owner).toBe('hvB');
    expect(mB.token).not.toBe(tokenA);
    expect(mB.history!.map((h) => `${h.from ?? '-'}->${h.to}`)).toEqual(['-->hvA', 'hvA->hvB']);
    // the replica holds B's image now
    const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', path.join(exposed.replicaDir, '31', 'disk.0'), srcB.base1]);
    expect(cmp.stdout).toMatch(/Images are identical/);

    // A, the old owner, may no longer build on it either
    const a = await ReplicaClient.connect(opts(exposed, 'A'));
    try {
      const d = await a.openDisk(31, 0);
      expect(d.manifest?.owner).toBe('hvB');
      await d.upload('inc', await makeInc('a-inc', 0x67), { key: 'ckA2.inc' });
      const err = await d.publishIncremental({ parentCheckpoint: 'ckB1', checkpoint: 'ckA2', capturedAt: 1_700_000_200, consistency: 'crash-consistent', sourceHost: 'hvA', inc: 'ckA2.inc' }).catch((e: unknown) => e);
      expect(errorCodeOf(err)).toBe('E_OWNER');
      await d.close();
    } finally {
      await a.close();
    }

    const ledger = await fsp.readFile(path.join(exposed.replicaDir, '.onestor', 'ownership', 'takeovers.jsonl'), 'utf8');
    expect(ledger.trim().split('\n').map((l) => JSON.parse(l))).toEqual([expect.objectContaining({ vm: 31, disk: 0, from: 'hvA', to: 'hvB', checkpoint: 'ckB1' })]);

    const probe = await runProbe('replica-ds', { sshrcPaths: [sshrc], datastoreLocation: path.join(work, 'no-datastores'), cacheFile: path.join(work, 'probe-cache.json'), deadlineMs: 10_000 });
    const text = probe.lines.join('\n');
    expect(text, probe.errors.join('\n')).toMatch(/^ONESTOR_REPLICA_OWNERSHIP = \[ WRITERS=3, TAKEOVERS_24H=1, TAKEOVERS_LOGGED=1, HANDOVERS_24H=0, HANDOVERS_LOGGED=0, LAST_AT="\d+", LAST_VM=31, LAST_DISK=0, LAST_FROM="hvA", LAST_TO="hvB" \]$/m);
    expect(text).toMatch(/^ONESTOR_REPLICA_WRITER = \[ NAME="hvB", AUTH="host", LAST_PUBLISH="\d+", LAST_VM=31, LAST_DISK=0, LAST_MODE="full" \]$/m);
    expect(text).toContain(`ONESTOR_REPLICA_WRITER = [ NAME="${fingerprintK}", AUTH="key"`);
  });
});
