/**
 * Wiring shared by the commands: config + driver settings loaded once, the adapters built from them,
 * and a pool of replica connections kept open across cycles (a small cycle must not pay a handshake).
 */
import os from 'node:os';
import { access } from 'node:fs/promises';
import { AGENT_VERSION } from '../lib/shared/version.js';
import path from 'node:path';
import type { Logger } from 'pino';
import { loadConfig, DEFAULT_IDENTITY_FILE, DEFAULT_KNOWN_HOSTS_FILE, type Config } from '../lib/config/config.js';
import { readSshrc } from '../lib/config/sshrc.js';
import type { DriverSettings } from '../lib/shared/model.js';
import { Virsh } from '../lib/libvirt/virsh.js';
import { VirshPort } from '../lib/cycle/libvirt-port.js';
import { QemuImg } from '../lib/libvirt/qemu-img.js';
import type { ReplicaClient } from '../lib/transfer/replica-client.js';
import { StateStore } from '../lib/cycle/state.js';
import { TokenBucket, bytesPerSecFromMBps } from '../lib/transfer/throttle.js';
import type { CycleDeps, ReplicaPort } from '../lib/cycle/cycle.js';
import { describeError, OnestorError, ErrorCodes } from '../lib/shared/errors.js';

/** package.json's version, read once in lib/shared/version.ts (the receiver reports the same). */
export const VERSION: string = AGENT_VERSION;

export interface AgentContext {
  config: Config;
  settings: DriverSettings;
  sshrcFile: string | null;
  log: Logger;
  virsh: Virsh;
  libvirt: VirshPort;
  qemuImg: QemuImg;
  state: StateStore;
  hostName: string;
  replicas: ReplicaPool;
  /** what a cycle needs; its local ports (capture, digests, staging locks) load with the first cycle */
  cycleDeps(): Promise<CycleDeps>;
}

/** A connection of the lease pool and whether a cycle holds it. */
interface LeaseEntry {
  client: Promise<ReplicaClient>;
  leased: boolean;
}

/**
 * Replica connections by address, reconnected when one dropped. A receiver session serves one request at
 * a time and holds one open disk, so each cycle LEASES a connection of its own (`lease`: an idle one, or
 * a new one; `limits.concurrency` cycles at once means that many sessions); `get` is one shared connection
 * for callers outside cycles (CLI commands, the start-up rebuild), never handed to a lease.
 */
export class ReplicaPool {
  private readonly clients = new Map<string, Promise<ReplicaClient>>();
  private readonly leasable = new Map<string, LeaseEntry[]>();
  constructor(private readonly config: Config, private readonly hostName: string, private readonly log: Logger, private readonly bandwidth: TokenBucket | null) {}

  /** REPLICA_STORAGE_IP (config) wins over REPLICA_HOST for storage traffic; hostOverride wins over both. */
  addressFor(replicaHost: string): string {
    return this.config.replica.hostOverride ?? this.config.replica.storageIp ?? replicaHost;
  }

  async get(replicaHost: string): Promise<ReplicaPort> {
    const addr = this.addressFor(replicaHost);
    for (;;) {
      const existing = this.clients.get(addr);
      if (!existing) break;
      const c = await existing.catch(() => null);
      if (this.clients.get(addr) !== existing) continue; // replaced while we waited: look again
      if (c?.connected) return c;
      this.clients.delete(addr);
      // its session failed (e.g. an upload dropped its channel): end its SSH connection too, or the
      // process stays alive on it after the command is done
      await c?.close().catch(() => {});
    }
    // set before any await: concurrent callers (a cycle connects while it asks libvirt) share one connection
    const p = this.connect(addr);
    this.clients.set(addr, p);
    try {
      return await p;
    } catch (e) {
      if (this.clients.get(addr) === p) this.clients.delete(addr);
      throw e;
    }
  }

  /** A connection for the caller alone until it calls release() (a cycle: runVmCycle). */
  async lease(replicaHost: string): Promise<{ port: ReplicaPort; release(): void }> {
    const addr = this.addressFor(replicaHost);
    let list = this.leasable.get(addr);
    if (!list) this.leasable.set(addr, (list = []));
    const drop = (e: LeaseEntry) => {
      const i = list.indexOf(e);
      if (i >= 0) list.splice(i, 1);
    };
    for (;;) {
      const idle = list.find((e) => !e.leased);
      if (!idle) break;
      idle.leased = true; // claimed before any await: a concurrent lease takes another
      const c = await idle.client.catch(() => null);
      if (c?.connected) return { port: c, release: () => this.giveBack(addr, list, idle, c) };
      drop(idle);
      await c?.close().catch(() => {});
    }
    const entry: LeaseEntry = { client: this.connect(addr), leased: true };
    list.push(entry);
    try {
      const c = await entry.client;
      return { port: c, release: () => this.giveBack(addr, list, entry, c) };
    } catch (e) {
      drop(entry);
      throw e;
    }
  }

  /** Back to idle; a lease that outlived closeAll() closes its connection instead (nobody would). */
  private giveBack(addr: string, list: LeaseEntry[], entry: LeaseEntry, c: ReplicaClient): void {
    entry.leased = false;
    if (this.leasable.get(addr) !== list) void c.close().catch(() => {});
  }

  private async connect(addr: string): Promise<ReplicaClient> {
    const r = this.config.replica;
    const login = await resolveReplicaLogin(r);
    if (login.notes.length) this.log.info({ replica: addr, user: login.user, identity: login.identityFile, knownHosts: login.knownHostsFile }, login.notes.join('; '));
    // ssh2 (and its crypto) loads with the first connection, not at start: an idle daemon never needs it
    const { ReplicaClient } = await import('../lib/transfer/replica-client.js');
    const c = await ReplicaClient.connect({
      host: addr,
      port: r.port,
      username: login.user,
      privateKey: login.identityFile,
      knownHostsFile: login.knownHostsFile,
      acceptNewHostKey: r.acceptNewHostKey,
      ciphers: [...r.ciphers],
      receiverCommand: r.receiverCommand,
      connectTimeoutMs: r.connectTimeoutSec * 1000,
      keepaliveMs: r.keepaliveSec * 1000,
      transport: r.transport,
      bandwidth: this.bandwidth,
      localHost: this.hostName,
      agentVersion: VERSION,
    });
    // How the replica knows us (from our key, never from what we claim); a replica without it gives no
    // tamper evidence (owner/token), only the checkpoint checks.
    if (c.writer) this.log.info({ replica: addr, port: r.port, writer: c.writer, transport: c.transport }, 'replica connected');
    else this.log.warn({ replica: addr, port: r.port }, 'replica connected; its receiver predates ownership: no owner/token checks until it is upgraded');
    return c;
  }

  async closeAll(): Promise<void> {
    const all = [...this.clients.values(), ...[...this.leasable.values()].flat().map((e) => e.client)];
    this.clients.clear();
    this.leasable.clear();
    for (const p of all) {
      const c = await p.catch(() => null);
      await c?.close().catch((e: unknown) => this.log.debug({ err: describeError(e) }, 'replica close'));
    }
  }
}

/**
 * Who we log in as and with what, with upstream-like fallbacks for the defaults: the running user (oneadmin
 * under systemd), the dedicated key if install.sh made one else that user's own ~/.ssh key, and
 * /var/lib/one/.ssh/known_hosts (oneadmin's) else the running user's. Explicit settings are never replaced.
 */
export async function resolveReplicaLogin(r: Config['replica']): Promise<{ user: string; identityFile: string; knownHostsFile: string; notes: string[] }> {
  const notes: string[] = [];
  const exists = (p: string) => access(p).then(() => true, () => false);
  const home = os.homedir();
  const user = r.user ?? os.userInfo().username;
  let identityFile = r.identityFile;
  if (identityFile === DEFAULT_IDENTITY_FILE && !(await exists(identityFile))) {
    for (const k of ['id_ed25519', 'id_ecdsa', 'id_rsa']) {
      const candidate = path.join(home, '.ssh', k);
      if (await exists(candidate)) {
        notes.push(`no dedicated key ${DEFAULT_IDENTITY_FILE}: using ${candidate}`);
        identityFile = candidate;
        break;
      }
    }
  }
  if (!(await exists(identityFile))) {
    throw new OnestorError(ErrorCodes.SSH, `no SSH key for the replica: ${identityFile} does not exist (run install.sh, or set replica.identityFile / --identity)`, { file: identityFile, field: 'replica.identityFile' });
  }
  let knownHostsFile = r.knownHostsFile;
  const homeKnown = path.join(home, '.ssh', 'known_hosts');
  if (knownHostsFile === DEFAULT_KNOWN_HOSTS_FILE && !(await exists(knownHostsFile)) && (await exists(homeKnown))) {
    notes.push(`using ${homeKnown}`);
    knownHostsFile = homeKnown;
  }
  return { user, identityFile, knownHostsFile, notes };
}

export async function buildContext(opts: { configFile?: string; overrides?: Record<string, unknown>; log: Logger; signal?: AbortSignal }): Promise<AgentContext> {
  const config = await loadConfig({ file: opts.configFile, overrides: opts.overrides as never });
  // log.level from file or ONESTOR_AGENT_LOG_LEVEL (a --log-level flag is already in the config and wins)
  opts.log.level = config.log.level;
  const sshrc = await readSshrc(config.sshrcPaths);
  for (const k of sshrc.unknownKeys) opts.log.debug({ key: k, file: sshrc.file }, 'sshrc key ignored');
  for (const w of sshrc.warnings) opts.log.warn({ file: sshrc.file }, w);
  const virsh = new Virsh({ uri: config.libvirtUri, virshPath: config.virsh, signal: opts.signal });
  const libvirt = new VirshPort(virsh);
  const qemuImg = new QemuImg(config.qemuImg, opts.signal);
  const state = new StateStore(config.stateDir);
  const hostName = config.hostName ?? os.hostname();
  // one bucket for the whole process: the limit is per host, whatever the number of transfers
  const bucket = config.limits.bandwidthMBps > 0 ? new TokenBucket(bytesPerSecFromMBps(config.limits.bandwidthMBps)) : null;
  const replicas = new ReplicaPool(config, hostName, opts.log, bucket);
  const ctx: AgentContext = {
    config,
    settings: sshrc.settings,
    sshrcFile: sshrc.file,
    log: opts.log,
    virsh,
    libvirt,
    qemuImg,
    state,
    hostName,
    replicas,
    cycleDeps: async () => ({
      libvirt,
      qemuImg,
      // capture, digests (node:crypto) and staging locks: an idle daemon never needs them
      ...(await import('../lib/cycle/ports.js')).localCyclePorts(libvirt, qemuImg),
      replicaFor: (h) => replicas.get(h),
      leaseReplica: (h) => replicas.lease(h),
      state,
      log: opts.log,
      hostName,
      stagingDirName: config.stagingDirName,
      captureTimeoutMs: config.limits.captureTimeoutSec * 1000,
      transferTimeoutMs: config.limits.transferTimeoutSec * 1000,
      stagingMinFreePercent: config.limits.stagingMinFreePercent,
      tryFreeze: true,
      libvirtUri: config.libvirtUri,
    }),
  };
  return ctx;
}

/** Names of running domains, for discovery's "domain not running" reason. */
export async function runningDomains(virsh: Virsh): Promise<Set<string>> {
  const list = await virsh.listDomains();
  return new Set(list.filter((d) => d.state === 'running').map((d) => d.name));
}
