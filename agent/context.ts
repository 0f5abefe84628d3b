/**
 * Wiring shared by the commands: config + driver settings loaded once, the adapters built from them,
 * and a pool of replica connections kept open across cycles (a small cycle must not pay a handshake).
 */
import os from 'node:os';
import { readFile } from 'node:fs/promises';
import type { Logger } from 'pino';
import { loadConfig, type Config } from '../lib/config.js';
import { readSshrc } from '../lib/sshrc.js';
import type { DriverSettings } from '../lib/model.js';
import { Virsh } from '../lib/virsh.js';
import { VirshPort } from '../lib/libvirt-port.js';
import { QemuImg } from '../lib/qemu-img.js';
import { ReplicaClient } from '../lib/replica-client.js';
import { StateStore } from '../lib/state.js';
import { TokenBucket, bytesPerSecFromMBps } from '../lib/throttle.js';
import type { CycleDeps, ReplicaPort } from '../lib/cycle.js';
import { describeError } from '../lib/errors.js';

export const VERSION: string = await readFile(new URL('../../package.json', import.meta.url), 'utf8')
  .then((t) => String((JSON.parse(t) as { version?: string }).version ?? '0.0.0'))
  .catch(() => '0.0.0');

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
  cycleDeps(): CycleDeps;
}

/** Keeps one connection per replica address; reconnects transparently when it dropped. */
export class ReplicaPool {
  private readonly clients = new Map<string, Promise<ReplicaClient>>();
  constructor(private readonly config: Config, private readonly hostName: string, private readonly log: Logger, private readonly bandwidth: TokenBucket | null) {}

  /** REPLICA_STORAGE_IP (config) wins over REPLICA_HOST for storage traffic; hostOverride wins over both. */
  addressFor(replicaHost: string): string {
    return this.config.replica.hostOverride ?? this.config.replica.storageIp ?? replicaHost;
  }

  async get(replicaHost: string): Promise<ReplicaPort> {
    const addr = this.addressFor(replicaHost);
    const existing = this.clients.get(addr);
    if (existing) {
      const c = await existing.catch(() => null);
      if (c?.connected) return c;
      this.clients.delete(addr);
    }
    const r = this.config.replica;
    const p = ReplicaClient.connect({
      host: addr,
      port: r.port,
      username: r.user,
      privateKey: r.identityFile,
      knownHostsFile: r.knownHostsFile,
      acceptNewHostKey: r.acceptNewHostKey,
      ciphers: [...r.ciphers],
      receiverCommand: r.receiverCommand,
      connectTimeoutMs: r.connectTimeoutSec * 1000,
      keepaliveMs: r.keepaliveSec * 1000,
      bandwidth: this.bandwidth,
      localHost: this.hostName,
      agentVersion: VERSION,
    });
    this.clients.set(addr, p);
    try {
      const c = await p;
      this.log.info({ replica: addr, port: r.port }, 'replica connected');
      return c;
    } catch (e) {
      this.clients.delete(addr);
      throw e;
    }
  }

  async closeAll(): Promise<void> {
    for (const p of this.clients.values()) {
      const c = await p.catch(() => null);
      await c?.close().catch((e: unknown) => this.log.debug({ err: describeError(e) }, 'replica close'));
    }
    this.clients.clear();
  }
}

export async function buildContext(opts: { configFile?: string; overrides?: Record<string, unknown>; log: Logger; signal?: AbortSignal }): Promise<AgentContext> {
  const config = await loadConfig({ file: opts.configFile, overrides: opts.overrides as never });
  const sshrc = await readSshrc(config.sshrcPaths);
  for (const k of sshrc.unknownKeys) opts.log.debug({ key: k, file: sshrc.file }, 'sshrc key ignored');
  for (const w of sshrc.warnings) opts.log.warn({ file: sshrc.file }, w);
  const virsh = new Virsh({ uri: config.libvirtUri, virshPath: config.virsh, signal: opts.signal });
  const libvirt = new VirshPort(virsh);
  const qemuImg = new QemuImg(config.qemuImg, opts.signal);
  const state = new StateStore(config.stateDir);
  const hostName = os.hostname();
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
    cycleDeps: () => ({
      libvirt,
      qemuImg,
      replicaFor: (h) => replicas.get(h),
      state,
      log: opts.log,
      hostName,
      stagingDirName: config.stagingDirName,
      captureTimeoutMs: config.limits.captureTimeoutSec * 1000,
      stagingMinFreePercent: config.limits.stagingMinFreePercent,
      tryFreeze: true,
    }),
  };
  return ctx;
}

/** Names of running domains, for discovery's "domain not running" reason. */
export async function runningDomains(virsh: Virsh): Promise<Set<string>> {
  const list = await virsh.listDomains();
  return new Set(list.filter((d) => d.state === 'running').map((d) => d.name));
}
