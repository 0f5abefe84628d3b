/**
 * Live migration as OpenNebula performs it (issue 13), between two real libvirtds with their own datastores
 * at the same path and their OWN replica keys (identities hv-a, hv-b): the agent never blocks the migration,
 * continues incrementally on the new host when the source released the lineage to it and the checkpoint's
 * bitmap came along, falls back to a full (a logged take-over) without a release, leaves no stray bitmap,
 * refuses to publish a damaged source, and a cycle on the old host after the VM left fails cleanly.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { readFile, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { startTwoHosts, migrateVm, onHost, type Host, type TwoHosts } from '../../dev/two-hosts.js';
import { renderVmXml, type OneVm } from '../../dev/one-layout.js';
import { agentMain, projectRoot } from '../../dev/agent-env.js';
import { run } from '../../lib/shared/exec.js';
import { guestWrite, guestViewSha256, sha256File } from '../../dev/guest.js';
import { recoverDrill } from '../../dev/recover.js';
import { unreferenceHeaderCluster } from '../helpers/qcow2-damage.js';
import { parseNodeBitmaps } from '../../lib/libvirt/bitmaps.js';

let t: TwoHosts;

beforeAll(async () => {
  t = await startTwoHosts({ name: 'mig' });
});

afterAll(async () => {
  await t?.stop();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function jobActive(h: Host, dom: string): Promise<boolean> {
  const r = await h.lv.virsh(['domjobinfo', dom]);
  return r.code === 0 && !/Job type:\s+None/.test(r.stdout);
}

/** a test that needs a slow full may go through missed attempts (each a complete full cycle) */
const SLOW_FULL_TEST_MS = 600_000;

/**
 * hooks/yield-on-migrate as the front-end runs it: $TEMPLATE is the VM's XML (base64) whose last history
 * record names the destination and the one before it the source; its `ssh SRC onestor-agent ...` lands,
 * through a stand-in ssh, in the source host's namespace with that host's agent flags.
 */
async function runHook(vm: OneVm, src: Host, dst: Host): Promise<{ code: number; stdout: string; stderr: string }> {
  const xml = renderVmXml({ vmId: vm.vmId, dsId: t.dsId, dsRoot: t.dsRoot, deployId: vm.domainName, hostname: src.agentHostName, memoryMiB: 32, stime: 1, disks: [] }).replace(
    '</HISTORY_RECORDS>',
    `<HISTORY><OID>${vm.vmId}</OID><SEQ>1</SEQ><HOSTNAME><![CDATA[${dst.agentHostName}]]></HOSTNAME></HISTORY></HISTORY_RECORDS>`,
  );
  const ssh = path.join(t.root, `ssh-to-${src.name}`);
  const q = (a: string) => `'${a.replace(/'/g, `'\\''`)}'`;
  await writeFile(
    ssh,
    `#!/bin/sh\n# stand-in for: ssh -o BatchMode=yes -o ConnectTimeout=10 HOST onestor-agent ARGS...\nshift 4\n[ "$1" = ${q(src.agentHostName)} ] || { echo "unexpected host $1" >&2; exit 255; }\nshift 2\n` +
      `exec nsenter --target ${src.lv.initPid} --mount -- ${q(process.execPath)} ${q(agentMain())} "$@" ${src.flags.map(q).join(' ')}\n`,
    { mode: 0o755 },
  );
  return run(path.join(projectRoot(), 'hooks', 'yield-on-migrate'), [Buffer.from(xml).toString('base64')], {
    env: { ONESTOR_HOOK_SSH: ssh, ONESTOR_YIELD_SECONDS: '120', TMPDIR: path.join(t.root, 'tmp') },
    timeoutMs: 60_000,
  });
}

async function waitForJob(h: Host, dom: string): Promise<void> {
  for (let i = 0; i < 600; i++) {
    if (await jobActive(h, dom)) return;
    await sleep(50);
  }
  throw new Error(`no backup job started on ${dom} (host ${h.name})`);
}

/**
 * A full cycle whose backup job is still running a second after it started: the stand-in for a disk of
 * hundreds of GiB. A full streams from a pull-mode export (no block job whose speed could be set), so the
 * cycle runs under a 1 MB/s bandwidth cap: minutes for the test disk. Should it still end before the job was
 * seen, that is a miss and another full is started.
 */
async function startSlowFull(h: Host, vm: OneVm, beforeEach?: () => Promise<void>): Promise<ReturnType<Host['agentSpawn']>> {
  for (let i = 0; i < 30; i++) {
    // a missed attempt published a full: what a test compares against is taken again before each attempt
    await beforeEach?.();
    const cycle = h.agentSpawn(['snapshot', '--vm', String(vm.vmId), '--full', '--bandwidth-mbps', '1']);
    // a cycle that ends before its job shows up: with success, the copy won even before we looked (a miss, as
    // below: on a loaded machine QEMU can copy the small test disk between two polls); else it failed early:
    // say why instead of waiting for a job
    const early = cycle.done.then((r) => {
      if (r.code === 0) return 'missed' as const;
      throw new Error(`the cycle on host ${h.name} ended (exit ${r.code}) before its backup job was seen: ${(r.stderr + r.stdout).slice(-2000)}`);
    });
    early.catch(() => {});
    const seen = waitForJob(h, vm.domainName);
    seen.catch(() => {}); // after a miss nobody waits for it any more
    const first = await Promise.race([seen, early]);
    if (first !== 'missed') {
      await sleep(1000);
      if (await jobActive(h, vm.domainName)) return cycle;
    }
    const r = await cycle.done;
    console.log(`the full on host ${h.name} ended within a second (cycle exit ${r.code}); again`);
  }
  throw new Error(`could not keep a backup job of ${vm.domainName} running on host ${h.name}`);
}

/** The cycle's result, failing the test (and ending the cycle) when it runs on past `ms`. */
async function endsWithin(cycle: ReturnType<Host['agentSpawn']>, ms: number): Promise<{ code: number; stdout: string; stderr: string }> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<null>((r) => (timer = setTimeout(() => r(null), ms)));
  const r = await Promise.race([cycle.done, late]);
  clearTimeout(timer);
  if (r) return r;
  process.kill(cycle.pid, 'SIGTERM');
  const killed = await cycle.done;
  throw new Error(`the cycle was still running ${ms / 1000} s after the migration: ${(killed.stdout + killed.stderr).slice(-2000)}`);
}

async function nodeBitmaps(h: Host, vm: OneVm, disk = 0) {
  const out = await h.lv.virshOk(['qemu-monitor-command', vm.domainName, '{"execute":"query-named-block-nodes","arguments":{"flat":true}}']);
  const nb = parseNodeBitmaps((JSON.parse(out) as { return: unknown }).return, vm.disks[disk]!.base1Path);
  if (!nb) throw new Error(`no node for ${vm.disks[disk]!.base1Path} on host ${h.name}`);
  return nb;
}

async function bitmapsOn(h: Host, vm: OneVm, disk = 0): Promise<string[]> {
  return (await nodeBitmaps(h, vm, disk)).bitmaps.map((b) => b.name).sort();
}

async function checkpointsOn(h: Host, vm: OneVm): Promise<string[]> {
  const out = await h.lv.virshOk(['checkpoint-list', vm.domainName, '--name']);
  return out.split('\n').map((s) => s.trim()).filter(Boolean).sort();
}

async function snapshot(h: Host, vm: OneVm): Promise<{ mode: string; out: string }> {
  const r = await h.agent(['snapshot', '--vm', String(vm.vmId)]);
  expect(r.code, r.stdout + r.stderr).toBe(0);
  const m = /disk 0: (full|incremental) snapshot published/.exec(r.stdout);
  expect(m, r.stdout).not.toBeNull();
  return { mode: m![1]!, out: r.stdout + r.stderr };
}

/** ledger lines (take-overs or hand-overs) of one VM */
async function ledger(kind: 'takeovers' | 'handovers', vmId: number): Promise<Array<{ from: string; to: string }>> {
  const text = await readFile(path.join(t.snapsDir, '.onestor', 'ownership', `${kind}.jsonl`), 'utf8').catch(() => '');
  return text.split('\n').filter(Boolean).map((l) => JSON.parse(l) as { vm: number; from: string; to: string }).filter((e) => e.vm === vmId).map(({ from, to }) => ({ from, to }));
}

const manifestPath = (vm: OneVm) => path.join(t.snapsDir, String(vm.vmId), '.onestor', 'disk.0.json');
async function manifest(vm: OneVm): Promise<{ checkpoint: string; sourceHost?: string; owner?: string; token?: string; base1: { sha256?: string }; release?: { from: string; to: string }; history?: Array<{ from: string | null; to: string; kind?: string }> }> {
  return JSON.parse(await readFile(manifestPath(vm), 'utf8')) as never;
}

async function guestView(h: Host, vm: OneVm): Promise<string> {
  return guestViewSha256(h.hostPath(vm.disks[0]!.base1Path), t.root);
}

async function drillEquals(vm: OneVm, expected: string): Promise<void> {
  const d = await recoverDrill(t.snapsDir, vm.vmId, 0, t.root);
  try {
    expect(d.backingName).toBe('disk.0.snap/base');
    expect(d.check.ok, d.check.raw).toBe(true);
    expect(await sha256File(d.rawPath)).toBe(expected);
  } finally {
    await rm(d.dir, { recursive: true, force: true });
  }
}

/** Nothing of the VM left on a host it left: no domain, no VM dir, no staging. */
async function nothingLeftOn(h: Host, vm: OneVm): Promise<void> {
  expect((await h.lv.virsh(['domstate', vm.domainName])).code).not.toBe(0);
  expect(await stat(h.vmDir(vm.vmId)).catch(() => null)).toBeNull();
  expect(await stat(path.join(h.hostDsRoot, String(t.dsId), '.onestor', String(vm.vmId))).catch(() => null)).toBeNull();
}

describe('live migration (two hosts, OpenNebula steps)', () => {
  let vm: OneVm;

  it('a full running on the source (hook runs `yield`): migration succeeds, nothing left behind, the new host protects the VM', async () => {
    vm = await t.createVm(t.A, { vmId: 61, disks: [{ diskId: 0, sizeMiB: 512, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 16, pattern: 0x41 }, { offsetMiB: 224, lengthMiB: 256, pattern: 0x43 }] }] });
    await guestWrite(t.A.lv, vm.domainName, { offsetMiB: 20, lengthMiB: 8, pattern: 0x21 });
    const cycle = await startSlowFull(t.A, vm); // still copying: stands for a big disk
    const published = await readFile(manifestPath(vm), 'utf8').catch(() => null);

    // The front-end's ACTIVE/MIGRATE state hook (the real script, $TEMPLATE as oned sends it) reaches the
    // source host over ssh while the driver pre-syncs.
    const t0 = Date.now();
    let hookOut = '';
    const steps = await migrateVm(t, vm, t.A, t.B, {
      hook: async () => {
        const y = await runHook(vm, t.A, t.B);
        hookOut = y.stdout + y.stderr;
        expect(y.code, hookOut).toBe(0);
      },
      duringPresync: () => guestWrite(t.A.lv, vm.domainName, { offsetMiB: 40, lengthMiB: 4, pattern: 0x42 }),
    });
    const ms = Date.now() - t0;
    console.log(`migration with a (throttled) full running on the source: ${ms} ms, ${steps.attempts} attempt(s), presync ${steps.presyncMs} ms, migrate ${steps.migrateMs} ms`);
    expect(steps.attempts).toBe(1);
    expect((await t.whereRuns(vm.domainName))?.name).toBe('B');

    expect(hookOut).toMatch(new RegExp(`VM ${vm.vmId} migrates ${t.A.agentHostName} -> ${t.B.agentHostName}`));
    expect(hookOut).toMatch(/no backup job of ours runs/);
    // the hook names the destination: A releases its lineage to B (when a throttle miss already published one)
    if (published === null) expect(hookOut).toMatch(/not released \(the replica holds no lineage of this disk\); hv-b will take a full/);
    else expect(hookOut).toMatch(/disk 0: lineage released to hv-b/);
    // The seed streams at 1 MB/s (minutes for this disk): the yield must end it whatever its upload waits
    // on (the bandwidth limit, the next NBD read), within the 30 s libvirt gives a migration.
    const r = await endsWithin(cycle, 30_000);
    expect(r.code, r.stdout + r.stderr).not.toBe(0);
    expect(r.stdout + r.stderr).toMatch(/E_YIELDED|gave way to a live migration/);
    await nothingLeftOn(t.A, vm);
    // the aborted cycle published nothing (the manifest only gained the release)
    const after = await readFile(manifestPath(vm), 'utf8').catch(() => null);
    if (published === null) expect(after).toBeNull();
    else {
      const { release, ...rest } = JSON.parse(after!) as Record<string, unknown>;
      expect(rest).toEqual(JSON.parse(published));
      expect(release).toMatchObject({ from: 'hv-a', to: 'hv-b' });
    }

    // the new host protects it (a full when the replica holds nothing yet), recovering to the guest view there
    const expected = await guestView(t.B, vm);
    const s = await snapshot(t.B, vm);
    expect(s.mode, s.out).toBe(published === null ? 'full' : 'incremental');
    if (published !== null) expect(s.out).toMatch(/lineage handed over by hv-a/);
    await drillEquals(vm, expected);
    expect((await manifest(vm)).sourceHost).toBe(t.B.agentHostName);
    expect((await manifest(vm)).owner).toBe(t.B.agentHostName);
    // the aborted job's checkpoint bitmap (if it travelled) is gone: only the kept checkpoint's remains
    expect(await bitmapsOn(t.B, vm)).toEqual(await checkpointsOn(t.B, vm));
    expect(await checkpointsOn(t.B, vm)).toHaveLength(1);
  }, SLOW_FULL_TEST_MS);

  it('`yield` with no migration after all: the running job is aborted leaving no checkpoint or staging, cycles are held off, then resume', async () => {
    let cps: string[] = [];
    let bms: string[] = [];
    let published: Awaited<ReturnType<typeof manifest>> | undefined;
    const cycle = await startSlowFull(t.B, vm, async () => {
      cps = await checkpointsOn(t.B, vm);
      bms = await bitmapsOn(t.B, vm);
      published = await manifest(vm);
    });
    const t0 = Date.now();
    const y = await t.B.agent(['yield', '--vm', String(vm.vmId), '--seconds', '8']);
    expect(y.code, y.stdout + y.stderr).toBe(0);
    const r = await endsWithin(cycle, 30_000);
    console.log(`yield returned after ${Date.now() - t0} ms`);
    expect(r.stdout + r.stderr).toMatch(/E_YIELDED/);
    expect(await jobActive(t.B, vm.domainName)).toBe(false);
    expect(await checkpointsOn(t.B, vm)).toEqual(cps);
    expect(await bitmapsOn(t.B, vm)).toEqual(bms);
    expect(await stat(path.join(t.B.hostDsRoot, String(t.dsId), '.onestor', String(vm.vmId))).catch(() => null)).toBeNull();
    expect(await manifest(vm)).toEqual(published);
    const held = await t.B.agent(['snapshot', '--vm', String(vm.vmId)]);
    expect(held.code).not.toBe(0);
    expect(held.stdout + held.stderr).toMatch(/held off for a live migration/);
    await sleep(Math.max(0, t0 + 8500 - Date.now()));
    expect((await snapshot(t.B, vm)).mode).toBe('incremental');
  }, SLOW_FULL_TEST_MS);

  it('no hook: the source agent sees the migration itself (pre-sync rsync to the destination) and gives way, releasing its lineage to that host; the next cycle there is an incremental hand-over', async () => {
    await guestWrite(t.B.lv, vm.domainName, { offsetMiB: 60, lengthMiB: 2, pattern: 0x61 });
    expect((await snapshot(t.B, vm)).mode).toBe('incremental');
    // a stray bitmap of ours (as an aborted job or another host leaves) and someone else's; added again
    // before each attempt of the slow full (a missed attempt is a completed full, which removes our stray)
    const addStrays = async () => {
      const { node, bitmaps } = await nodeBitmaps(t.B, vm);
      for (const name of [`onestor-${vm.vmId}-1-dead00`, 'someone-elses-backup']) {
        if (bitmaps.some((b) => b.name === name)) continue;
        await t.B.lv.virshOk(['qemu-monitor-command', vm.domainName, JSON.stringify({ execute: 'block-dirty-bitmap-add', arguments: { node, name, persistent: true } })]);
      }
    };
    await guestWrite(t.B.lv, vm.domainName, { offsetMiB: 64, lengthMiB: 3, pattern: 0x62 });
    const cycle = await startSlowFull(t.B, vm, addStrays);
    const published = await manifest(vm);
    const steps = await migrateVm(t, vm, t.B, t.A, { duringPresync: () => guestWrite(t.B.lv, vm.domainName, { offsetMiB: 70, lengthMiB: 4, pattern: 0x63 }) });
    expect(steps.attempts).toBe(1);
    const r = await endsWithin(cycle, 30_000);
    expect(r.code).not.toBe(0);
    expect(r.stdout + r.stderr).toMatch(/migration of .* in progress/);
    expect(r.stdout + r.stderr).toMatch(/lineage released to hv-a/);
    await nothingLeftOn(t.B, vm);
    // the same lineage, now released by its owner to the destination
    const { release, ...rest } = await manifest(vm);
    expect(rest).toEqual(published);
    expect(release).toMatchObject({ from: 'hv-b', to: 'hv-a', token: published.token });

    await guestWrite(t.A.lv, vm.domainName, { offsetMiB: 80, lengthMiB: 1, pattern: 0x64 });
    const expected = await guestView(t.A, vm);
    const handovers = (await ledger('handovers', vm.vmId)).length;
    const takeovers = (await ledger('takeovers', vm.vmId)).length;
    const s = await snapshot(t.A, vm);
    expect(s.mode, s.out).toBe('incremental');
    expect(s.out).toMatch(/lineage handed over by hv-b/);
    expect(s.out).toMatch(/checkpoint redefined from the replica manifest/);
    await drillEquals(vm, expected);
    // ownership passed to A as a hand-over (history, ledger), not a take-over; the release is spent
    const m = await manifest(vm);
    expect(m.owner).toBe('hv-a');
    expect(m.release).toBeUndefined();
    expect(m.history!.at(-1)).toMatchObject({ from: 'hv-b', to: 'hv-a', kind: 'handover' });
    expect(await ledger('handovers', vm.vmId)).toHaveLength(handovers + 1);
    expect(await ledger('takeovers', vm.vmId)).toHaveLength(takeovers);
    // zero orphans: our only bitmap is the kept checkpoint; someone else's stays
    const kept = await checkpointsOn(t.A, vm);
    expect(kept).toHaveLength(1);
    expect(await bitmapsOn(t.A, vm)).toEqual([...kept, 'someone-elses-backup'].sort());
    // the stray of ours went on whichever host swept first: the yielded seed on the source (a full sweeps) or here
    expect(r.stdout + r.stderr + s.out).toMatch(/stray bitmap removed/);
    console.log(s.out.split('\n').filter((l) => /stray bitmap removed|source image checked|redefined/.test(l)).join('\n'));
  }, SLOW_FULL_TEST_MS);

  it('round trip A -> B -> A (the hook releases each time) with guest writes during each pre-sync: incremental hand-over on each side, recoverable, zero orphan bitmaps', async () => {
    for (const [src, dst, p] of [[t.A, t.B, 0x71], [t.B, t.A, 0x72]] as const) {
      // the state hook, done before the driver's steps here (it runs concurrently with them in OpenNebula)
      const y = await runHook(vm, src, dst);
      expect(y.code, y.stdout + y.stderr).toBe(0);
      expect(y.stdout, y.stderr).toMatch(new RegExp(`disk 0: lineage released to ${dst.agentHostName}`));
      await migrateVm(t, vm, src, dst, { duringPresync: () => guestWrite(src.lv, vm.domainName, { offsetMiB: 90, lengthMiB: 6, pattern: p }) });
      await guestWrite(dst.lv, vm.domainName, { offsetMiB: 100, lengthMiB: 1, pattern: p + 8 });
      const expected = await guestView(dst, vm);
      const s = await snapshot(dst, vm);
      expect(s.mode, s.out).toBe('incremental');
      expect(s.out).toMatch(new RegExp(`lineage handed over by ${src.agentHostName}`));
      expect((await manifest(vm)).owner).toBe(dst.agentHostName);
      await drillEquals(vm, expected);
      const kept = await checkpointsOn(dst, vm);
      expect(kept).toHaveLength(1);
      expect(await bitmapsOn(dst, vm)).toEqual([...kept, 'someone-elses-backup'].sort());
      await nothingLeftOn(src, vm);
    }
    // and in the file once QEMU has written its bitmaps back (clean close)
    await t.A.lv.virshOk(['destroy', vm.domainName]);
    const r = await onHost(t.A, ['qemu-img', 'info', '--output=json', vm.disks[0]!.base1Path]);
    const names = ((JSON.parse(r.stdout) as { 'format-specific': { data: { bitmaps?: Array<{ name: string }> } } })['format-specific'].data.bitmaps ?? []).map((b) => b.name);
    expect(names.filter((n) => n.startsWith('onestor-'))).toHaveLength(1);
  });
});

describe('no valid release: the destination takes the lineage over with a full', () => {
  let vm: OneVm;

  it('a migration the source never yielded for: a full with the take-over reason, then incremental again (no E_OWNER loop)', async () => {
    vm = await t.createVm(t.A, { vmId: 63, disks: [{ diskId: 0, sizeMiB: 64, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 8, pattern: 0x31 }] }] });
    expect((await snapshot(t.A, vm)).mode).toBe('full');
    await migrateVm(t, vm, t.A, t.B); // no hook, no cycle running on A: nobody releases
    expect((await manifest(vm)).release).toBeUndefined();
    await guestWrite(t.B.lv, vm.domainName, { offsetMiB: 10, lengthMiB: 1, pattern: 0x32 });
    const expected = await guestView(t.B, vm);
    const s = await snapshot(t.B, vm);
    expect(s.mode, s.out).toBe('full');
    expect(s.out).toMatch(/replica lineage was last published by hv-a, not by this host \(hv-b\)/);
    expect(s.out).not.toMatch(/E_OWNER/);
    await drillEquals(vm, expected);
    const m = await manifest(vm);
    expect(m.owner).toBe('hv-b');
    expect(m.history!.at(-1)).toMatchObject({ from: 'hv-a', to: 'hv-b', kind: 'takeover' });
    expect(await ledger('takeovers', vm.vmId)).toEqual([{ from: 'hv-a', to: 'hv-b' }]);
    expect(await ledger('handovers', vm.vmId)).toEqual([]);
    // B owns it now: its next cycle is an ordinary incremental
    await guestWrite(t.B.lv, vm.domainName, { offsetMiB: 12, lengthMiB: 1, pattern: 0x33 });
    const again = await snapshot(t.B, vm);
    expect(again.mode, again.out).toBe('incremental');
    await drillEquals(vm, await guestView(t.B, vm));
  });

  it('a release to another host than the destination: the destination takes a full (take-over)', async () => {
    const y = await t.B.agent(['yield', '--vm', String(vm.vmId), '--seconds', '1', '--to', 'hv-elsewhere']);
    expect(y.code, y.stdout + y.stderr).toBe(0);
    expect(y.stdout).toMatch(/disk 0: lineage released to hv-elsewhere/);
    expect((await manifest(vm)).release).toMatchObject({ from: 'hv-b', to: 'hv-elsewhere' });
    await migrateVm(t, vm, t.B, t.A);
    await guestWrite(t.A.lv, vm.domainName, { offsetMiB: 14, lengthMiB: 1, pattern: 0x34 });
    const expected = await guestView(t.A, vm);
    const s = await snapshot(t.A, vm);
    expect(s.mode, s.out).toBe('full');
    expect(s.out).toMatch(/last published by hv-b, not by this host \(hv-a\)/);
    await drillEquals(vm, expected);
    expect((await manifest(vm)).history!.at(-1)).toMatchObject({ from: 'hv-b', to: 'hv-a', kind: 'takeover' });
    expect(await ledger('handovers', vm.vmId)).toEqual([]);
  });

  it('a host that does not own the lineage cannot release it (E_RELEASE), and the owner\'s lineage stands', async () => {
    // B no longer runs the VM and does not own its lineage: a release from B is refused by the replica
    const before = await manifest(vm);
    const { ReplicaClient } = await import('../../lib/transfer/replica-client.js');
    const c = await ReplicaClient.connect({ host: t.sshd.host, port: t.sshd.port, username: t.sshd.user, privateKey: t.B.keyPath, knownHostsFile: t.sshd.knownHostsPath, acceptNewHostKey: false, receiverCommand: 'onestor-agent receive', connectTimeoutMs: 10_000, localHost: 'hv-a' });
    try {
      expect(c.writer).toBe('hv-b');
      const d = await c.openDisk(vm.vmId, 0);
      const err = (await d.release('hv-b', 3600).catch((e: unknown) => e)) as { code?: string; message?: string };
      expect(err.code, String(err.message)).toBe('E_RELEASE');
      expect(err.message).toMatch(/only the lineage's owner may release it: it belongs to hv-a, this session is hv-b/);
      await d.close();
    } finally {
      await c.close();
    }
    expect(await manifest(vm)).toEqual(before);
    await vm.destroy();
  });
});

describe('a damaged source after migration; the old host after the VM left', () => {
  it('the old host fails cleanly without touching the replica; a damaged base.1 on the new host is never published (E_SOURCE_DAMAGED)', async () => {
    const vm = await t.createVm(t.A, { vmId: 62, disks: [{ diskId: 0, sizeMiB: 64, freq: 60, baseData: [{ offsetMiB: 0, lengthMiB: 8, pattern: 0x51 }] }] });
    expect((await snapshot(t.A, vm)).mode).toBe('full');
    const good = await manifest(vm);
    const goodBase1 = await sha256File(path.join(t.snapsDir, String(vm.vmId), 'disk.0.snap', 'base.1'));

    let oldHost: { code: number; stdout: string; stderr: string } | undefined;
    await migrateVm(t, vm, t.A, t.B, {
      // between resume on the destination and removal of the source dir: files still there, domain gone
      afterResume: async () => {
        oldHost = await t.A.agent(['snapshot', '--vm', String(vm.vmId)]);
      },
    });
    expect(oldHost!.code).not.toBe(0);
    expect(oldHost!.stdout + oldHost!.stderr).toMatch(/not running/);
    const gone = await t.A.agent(['snapshot', '--vm', String(vm.vmId)]);
    expect(gone.code).not.toBe(0);
    expect(await manifest(vm)).toEqual(good);

    await guestWrite(t.B.lv, vm.domainName, { offsetMiB: 10, lengthMiB: 1, pattern: 0x52 });
    // corrupt a refcount in the destination's base.1: cluster 0 (the header) recorded as unreferenced
    // (after the last guest write: QEMU writes its cached refcount block back when it allocates)
    const file = t.B.hostPath(vm.disks[0]!.base1Path);
    await unreferenceHeaderCluster(file);
    const r = await t.B.agent(['snapshot', '--vm', String(vm.vmId)]);
    expect(r.code).not.toBe(0);
    expect(r.stdout + r.stderr).toMatch(/E_SOURCE_DAMAGED/);
    expect(r.stdout + r.stderr).toMatch(/refcount=0 reference=1/);
    expect(r.stdout + r.stderr).toContain(vm.disks[0]!.base1Path);
    // the good snapshot stands, byte for byte
    expect(await manifest(vm)).toEqual(good);
    expect(await sha256File(path.join(t.snapsDir, String(vm.vmId), 'disk.0.snap', 'base.1'))).toBe(goodBase1);
    // reported: state (read by status and the probe) carries the stable code and the file
    const state = JSON.parse(await readFile(path.join(t.B.stateDir, 'state.json'), 'utf8')) as { disks: Record<string, { lastError?: { code: string; message: string } }> };
    const err = state.disks[`${vm.vmId}.0`]?.lastError;
    expect(err?.code).toBe('E_SOURCE_DAMAGED');
    const st = await t.B.agent(['status', '--json']);
    expect(st.stdout).toContain('E_SOURCE_DAMAGED');
    await vm.destroy();
  });
});
