/**
 * Two hypervisors on one machine, for live-migration tests (issue 13), and OpenNebula's migration done
 * the way its drivers do it for an ssh system datastore with replica (vmm/kvm/migrate `local_migration`,
 * KvmDomain#live_migrate_disks, tm/ssh premigrate/postmigrate).
 *
 * Each host is a private libvirtd (dev/libvirtd.ts) in its own mount namespace, with its OWN
 * datastore directory bound at the SAME path (`dsRoot`), as two hypervisors see /var/lib/one/datastores.
 * The test process (host namespace) sees neither at dsRoot (an empty mount point there): it reaches each
 * host's files through `hostDsRoot`, so a helper that forgets which host it works on fails loudly instead
 * of silently reading the other host's disk. Agents run inside their host's mount namespace (nsenter -m)
 * with their own state dir and host name; both talk to one replica (one sshd on loopback), each with its OWN
 * key, bound on the replica to its own name (`receive --host hv-a` / `hv-b`, the host's OpenNebula name), as
 * in production: the replica tells the hosts apart, so continuity across a migration rests on the lineage
 * release (issue 13), not on a shared identity.
 * Distinct host_uuid (libvirt refuses to migrate to "the same host"); migration over 127.0.0.1.
 */
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdir, readFile, rm, symlink, writeFile, lstat } from 'node:fs/promises';
import path from 'node:path';
import { run } from '../lib/shared/exec.js';
import { agentMain, agentProcessEnv } from './agent-env.js';
import { startLibvirtd, type Libvirtd } from './libvirtd.js';
import { createOneVm, createSystemDatastore, type CreateOneVmOptions, type OneVm } from './one-layout.js';
import { generateKey, startSshd, type Sshd } from './sshd.js';
import { makeTempDir, removeTree } from './tmp.js';

export type HostName = 'A' | 'B';

export interface Host {
  name: HostName;
  /** the agent's host name, OpenNebula's name of the host, and the identity its key is bound to on the replica */
  agentHostName: string;
  /** this host's own private key for the replica */
  keyPath: string;
  lv: Libvirtd;
  /** this host's datastore dir as the test process reaches it (bound at `dsRoot` inside the host) */
  hostDsRoot: string;
  stateDir: string;
  flags: string[];
  /** host-side path of DS/VMID (through hostDsRoot) */
  vmDir(vmId: number): string;
  /** maps a path under dsRoot (as the host sees it) to the test process's view */
  hostPath(p: string): string;
  /** runs `onestor-agent ARGS FLAGS` inside this host's mount namespace */
  agent(args: string[], opts?: { timeoutMs?: number; env?: Record<string, string> }): Promise<{ code: number; stdout: string; stderr: string }>;
  /** starts `onestor-agent ARGS FLAGS` in the background (e.g. a long snapshot) */
  agentSpawn(args: string[], opts?: { env?: Record<string, string> }): { done: Promise<{ code: number; stdout: string; stderr: string }>; pid: number };
}

export interface TwoHosts {
  root: string;
  /** DATASTORE_LOCATION on both hosts */
  dsRoot: string;
  dsId: number;
  A: Host;
  B: Host;
  sshd: Sshd;
  snapsDir: string;
  other(h: Host): Host;
  /** a VM in the OpenNebula layout on `host`, started there (transient, `virsh create`) */
  createVm(host: Host, opts: Omit<CreateOneVmOptions, 'dsRoot' | 'dsId' | 'replicaHost' | 'noStart'>): Promise<OneVm>;
  /** where a VM's domain runs now (null: nowhere) */
  whereRuns(domain: string): Promise<Host | null>;
  stop(): Promise<void>;
}

export interface MigrationSteps {
  /** ms spent in each step */
  presyncMs: number;
  migrateMs: number;
  /** how many times `virsh migrate` was run (retried only on "active block job") */
  attempts: number;
  /** stderr of failed attempts */
  errors: string[];
}

export interface MigrateOptions {
  /** runs while the pre-sync (rsync) runs, e.g. guest writes; awaited before `virsh migrate` */
  duringPresync?: () => Promise<void>;
  /** runs concurrently with the whole driver action (what a state hook would do); awaited at the end */
  hook?: () => Promise<void>;
  /** runs after `virsh resume` on the destination, before the source VM dir is removed */
  afterResume?: () => Promise<void>;
  /** tries of `virsh migrate` (KvmDomain virsh_tries); default 3 */
  tries?: number;
}

export async function startTwoHosts(opts: { name?: string } = {}): Promise<TwoHosts> {
  const root = await makeTempDir(opts.name ?? 'mig');
  const dsRoot = path.join(root, 'datastores');
  const dsId = 100;
  await mkdir(dsRoot, { recursive: true }); // the shared mount point; empty in the test's own namespace
  const started: Libvirtd[] = [];
  let sshd: Sshd | undefined;
  try {
    const mk = async (name: HostName): Promise<{ lv: Libvirtd; hostDsRoot: string }> => {
      const hostDsRoot = path.join(root, `host${name}`, 'datastores');
      await mkdir(hostDsRoot, { recursive: true });
      await createSystemDatastore(hostDsRoot, dsId, { replicaHost: '127.0.0.1' });
      const lv = await startLibvirtd({
        name: `mig${name}`,
        binds: [{ source: hostDsRoot, target: dsRoot }],
        hostUuid: randomUUID(),
      });
      started.push(lv);
      return { lv, hostDsRoot };
    };
    // sequential: the first call into each libvirtd probes QEMU (seconds of CPU) on a shared 2-core box
    const a = await mk('A');
    const b = await mk('B');
    sshd = await startSshd();
    const sshrc = path.join(root, 'sshrc');
    await writeFile(sshrc, `REPLICA_COPY_LOCK_TIMEOUT=600\nREPLICA_RECOVERY_SNAPS_DIR=${sshd.replicaDir}\nREPLICA_MAX_USED_PERC=90\n`);
    // One key per host, each bound to that host's name (the receiver learns who writes from the key only).
    const identityOf = (name: HostName) => `hv-${name.toLowerCase()}`;
    const keyOf = (name: HostName) => path.join(root, `host${name}`, 'id_ed25519');
    const lines: string[] = [];
    for (const name of ['A', 'B'] as const) {
      const pub = await generateKey(keyOf(name), `onestor-test-${identityOf(name)}`);
      const receiver = [process.execPath, agentMain(), 'receive', '--snaps-dir', sshd.replicaDir, '--sshrc', sshrc, '--log-level', 'warn', '--host', identityOf(name)];
      lines.push(`command="${receiver.join(' ')}",restrict ${pub}`);
    }
    await sshd.setAuthorizedKeys(lines);
    const theSshd = sshd;

    const mkHost = (name: HostName, x: { lv: Libvirtd; hostDsRoot: string }): Host => {
      const stateDir = path.join(root, `host${name}`, 'state');
      const agentHostName = identityOf(name);
      const keyPath = keyOf(name);
      const flags = [
        '--datastores', dsRoot,
        '--state-dir', stateDir,
        '--libvirt-uri', x.lv.uri,
        '--sshrc', sshrc,
        '--replica-host', theSshd.host,
        '--replica-port', String(theSshd.port),
        '--replica-user', theSshd.user,
        '--identity', keyPath,
        '--known-hosts', theSshd.knownHostsPath,
        '--host-name', agentHostName,
      ];
      const argv = (args: string[]) => ['--target', String(x.lv.initPid), '--mount', '--', process.execPath, agentMain(), ...args, ...flags];
      const env = (extra?: Record<string, string>) => agentProcessEnv(flags, extra) as Record<string, string>;
      const hostPath = (p: string) => {
        const rel = path.relative(dsRoot, p);
        if (rel.startsWith('..') || path.isAbsolute(rel)) throw new Error(`${p} is not under ${dsRoot}`);
        return path.join(x.hostDsRoot, rel);
      };
      return {
        name,
        agentHostName,
        keyPath,
        lv: x.lv,
        hostDsRoot: x.hostDsRoot,
        stateDir,
        flags,
        vmDir: (vmId) => path.join(x.hostDsRoot, String(dsId), String(vmId)),
        hostPath,
        agent: (args, o = {}) => spawnCollect('nsenter', argv(args), env(o.env), o.timeoutMs ?? 300_000).done,
        agentSpawn: (args, o = {}) => spawnCollect('nsenter', argv(args), env(o.env), 600_000),
      };
    };
    const A = mkHost('A', a);
    const B = mkHost('B', b);

    const createVm: TwoHosts['createVm'] = async (host, o) => {
      // Files are made in the host's own dir, then every path in them is rewritten to the shared path.
      const vm = await createOneVm(host.lv, { ...o, dsRoot: host.hostDsRoot, dsId, replicaHost: '127.0.0.1', noStart: true });
      for (const f of ['vm.xml', 'ds.xml', 'deployment.0']) {
        const p = path.join(vm.vmDir, f);
        await writeFile(p, (await readFile(p, 'utf8')).split(host.hostDsRoot).join(dsRoot));
      }
      const toShared = (p: string) => path.join(dsRoot, path.relative(host.hostDsRoot, p));
      await host.lv.virshOk(['create', path.join(vm.vmDir, 'deployment.0')]);
      const shared: OneVm = {
        ...vm,
        dsDir: toShared(vm.dsDir),
        vmDir: toShared(vm.vmDir),
        disks: vm.disks.map((d) => ({ ...d, diskPath: toShared(d.diskPath), snapDir: toShared(d.snapDir), basePath: toShared(d.basePath), base1Path: toShared(d.base1Path) })),
        start: async () => {
          const where = await whereRuns(vm.domainName);
          if (where) return;
          await host.lv.virshOk(['create', path.join(vm.vmDir, 'deployment.0')]);
        },
        destroy: async () => {
          for (const h of [A, B]) {
            const st = await h.lv.virsh(['domstate', vm.domainName]);
            if (st.code === 0 && !st.stdout.includes('shut off')) await h.lv.virsh(['destroy', vm.domainName]);
          }
        },
      };
      return shared;
    };

    const whereRuns = async (domain: string): Promise<Host | null> => {
      for (const h of [A, B]) {
        const st = await h.lv.virsh(['domstate', domain]);
        if (st.code === 0 && /running|paused/.test(st.stdout)) return h;
      }
      return null;
    };

    return {
      root,
      dsRoot,
      dsId,
      A,
      B,
      sshd: theSshd,
      snapsDir: theSshd.replicaDir,
      other: (h) => (h.name === 'A' ? B : A),
      createVm,
      whereRuns,
      stop: async () => {
        await theSshd.stop().catch(() => {});
        for (const lv of started) await lv.stop().catch(() => {});
        await removeTree(root).catch(() => {});
      },
    };
  } catch (e) {
    await sshd?.stop().catch(() => {});
    for (const lv of started) await lv.stop().catch(() => {});
    await removeTree(root).catch(() => {});
    throw e;
  }
}

/**
 * OpenNebula's live migration of `vm` from `src` to `dst` for disks under disk.N.snap/ (replica layout):
 * 1. premigrate: `rm -rf` the destination VM dir; the driver then makes it with a `disk.N -> disk.N.snap/base.1`
 *    link per disk (the domain names .../disk.N.snap/base.1);
 * 2. pre-sync while the VM runs: `rsync -az DS/VMID/*.xml DS/VMID/disk.N.snap ... dst:DS/VMID/`;
 * 3. `virsh migrate --live --suspend DOM DEST --copy-storage-all --migrate-disks vda,...`, retried only when
 *    the error says "active block job" (KvmDomain#live_migrate_disks / virsh_retry);
 * 4. `virsh resume DOM` on the destination;
 * 5. postmigrate/delete: the source VM dir is removed.
 * A failed migration throws (after cleaning the destination as the driver's cleanup_host does).
 */
const MIGRATE_OPTIONS = ['--migrateuri', 'tcp://127.0.0.1'];

export async function migrateVm(t: TwoHosts, vm: OneVm, src: Host, dst: Host, o: MigrateOptions = {}): Promise<MigrationSteps> {
  const hook = o.hook ? o.hook() : Promise.resolve();
  const hookDone = hook.catch((e: unknown) => e);
  try {
    const srcDir = src.vmDir(vm.vmId);
    const dstDir = dst.vmDir(vm.vmId);
    const shared = (hostSide: string) => path.join(t.dsRoot, path.relative(src.hostDsRoot, hostSide));
    await rm(dstDir, { recursive: true, force: true });
    await mkdir(dstDir, { recursive: true });
    const live = (await src.lv.virshOk(['domblklist', vm.domainName, '--details'])).split('\n');
    const devs: string[] = [];
    const presync: string[] = [];
    for (const line of live) {
      const m = /^\s*file\s+disk\s+(\S+)\s+(\S+)\s*$/.exec(line);
      if (!m) continue;
      const [, dev, source] = m;
      const sm = /(disk\.(\d+)\.snap)\/[^/]+$/.exec(source!);
      if (!sm) continue;
      devs.push(dev!);
      presync.push(path.join(srcDir, sm[1]!));
      const link = path.join(dstDir, `disk.${sm[2]}`);
      if (!(await lstat(link).catch(() => null))) await symlink(`${sm[1]}/base.1`, link);
    }
    const xmls = (await run('sh', ['-c', 'ls -1 "$1"/*.xml', 'ls', srcDir])).stdout.split('\n').filter(Boolean);
    const t0 = Date.now();
    const during = o.duringPresync ? o.duringPresync() : Promise.resolve();
    // The driver runs on the source host: so do its rsync and virsh here (the source's mount and PID
    // namespaces), naming the VM's files by their datastore path, as the agent there sees them.
    // `dst:PATH` as the driver writes it (so the source's /proc shows the destination host), through a stand-in
    // remote shell that runs rsync's server side right here (the destination's dir is reachable from here).
    const rsh = path.join(t.root, 'rsh-local');
    // It takes 2 s to "connect": a pre-sync of a real disk lasts minutes, and the source agent's /proc watch
    // (one scan a second) must be able to see it, as it would in production.
    if (!(await lstat(rsh).catch(() => null))) await writeFile(rsh, '#!/bin/sh\n# stand-in for: ssh HOST COMMAND... (runs COMMAND here, after a 2 s "connect")\nshift\nsleep 2\nexec "$@"\n', { mode: 0o755 });
    const rs = await onHost(src, ['rsync', '-az', '-e', rsh, ...[...xmls, ...presync].map(shared), `${dst.agentHostName}:${dstDir}/`], 300_000);
    await during;
    if (rs.code !== 0) throw new Error(`rsync failed: ${rs.stderr}`);
    const presyncMs = Date.now() - t0;

    const t1 = Date.now();
    const errors: string[] = [];
    const tries = o.tries ?? 3;
    let attempts = 0;
    for (;;) {
      attempts++;
      // MIGRATE_OPTIONS (kvmrc) go right after --live, as KvmDomain does; here they pin the migration stream to
      // loopback (libvirt refuses 127.0.0.1 as migration_host/migration_address in qemu.conf).
      const r = await onHost(src, ['virsh', '-c', src.lv.uri, 'migrate', '--live', ...MIGRATE_OPTIONS, '--suspend', vm.domainName, dst.lv.uri, '--copy-storage-all', '--migrate-disks', devs.join(',')], 600_000);
      if (r.code === 0) break;
      errors.push(r.stderr.trim());
      if (!/active block job/.test(r.stderr) || attempts >= tries) {
        // cleanup_host: destroy/undefine on the destination, remove its VM dir
        await dst.lv.virsh(['destroy', vm.domainName]);
        await rm(dstDir, { recursive: true, force: true });
        throw new Error(`virsh migrate ${vm.domainName} ${src.name} -> ${dst.name} failed after ${attempts} attempt(s): ${errors.join(' | ')}`);
      }
      await new Promise((r2) => setTimeout(r2, 1000));
    }
    const migrateMs = Date.now() - t1;
    await dst.lv.virshOk(['resume', vm.domainName]);
    await o.afterResume?.();
    await rm(srcDir, { recursive: true, force: true });
    return { presyncMs, migrateMs, attempts, errors };
  } finally {
    const h = await hookDone;
    if (h instanceof Error) throw h;
  }
}

/** Runs a command on a host: inside its mount and PID namespaces (what the host's own processes see). */
export function onHost(h: Host, argv: string[], timeoutMs = 120_000): Promise<{ code: number; stdout: string; stderr: string }> {
  return run('nsenter', ['--target', String(h.lv.initPid), '--mount', '--pid', '--', ...argv], { timeoutMs });
}

/** sha256 of a disk's guest view as `host` sees it now (qemu-img -U on the live chain). */
export async function hostGuestViewSha(host: Host, base1SharedPath: string, scratch: string): Promise<string> {
  const { guestViewSha256 } = await import('./guest.js');
  return guestViewSha256(host.hostPath(base1SharedPath), scratch);
}

/** `qemu-img info -U` bitmaps of an image (name + flags) as the test process reads it. */
export async function imageBitmaps(file: string): Promise<Array<{ name: string; flags: string[] }>> {
  const r = await run('qemu-img', ['info', '-U', '--output=json', file]);
  if (r.code !== 0) throw new Error(`qemu-img info ${file}: ${r.stderr}`);
  const j = JSON.parse(r.stdout) as { 'format-specific'?: { data?: { bitmaps?: Array<{ name: string; flags: string[] }> } } };
  return j['format-specific']?.data?.bitmaps ?? [];
}

function spawnCollect(cmd: string, args: string[], env: Record<string, string>, timeoutMs: number): { done: Promise<{ code: number; stdout: string; stderr: string }>; pid: number } {
  const child = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<{ code: number; stdout: string; stderr: string }>((resolve, reject) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? (signal ? 128 : 1), stdout, stderr });
    });
  });
  return { done, pid: child.pid ?? -1 };
}
