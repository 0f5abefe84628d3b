/**
 * A whole OneStor cluster in miniature for integration tests and the demo: a private libvirtd with
 * VMs in the OpenNebula layout, a private sshd on loopback as the replica with the restricted key
 * (`command="onestor-agent receive ...",restrict`), and the CLI flags that point the agent at them.
 */
import { existsSync, mkdirSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawn } from 'node:child_process';
import { startLibvirtd, type Libvirtd } from './libvirtd.js';
import { createSystemDatastore, createOneVm, type CreateOneVmOptions, type OneVm } from './one-layout.js';
import { startSshd, type Sshd } from './sshd.js';
import { makeTempDir, removeTree } from './tmp.js';

/** The repository (or install) root: the nearest parent holding package.json. */
export function projectRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  while (!existsSync(path.join(dir, 'package.json'))) {
    const up = path.dirname(dir);
    if (up === dir) throw new Error('package.json not found above ' + fileURLToPath(import.meta.url));
    dir = up;
  }
  return dir;
}

/** The host name test receivers are bound to: this machine's, when it is a valid host name. */
export function testHostName(): string {
  const h = os.hostname();
  return /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(h) ? h : 'hv-test';
}

export const agentMain = (): string => path.join(projectRoot(), 'dist', 'agent', 'main.js');

export interface AgentEnv {
  lv: Libvirtd;
  sshd: Sshd;
  root: string;
  dsRoot: string;
  dsId: number;
  stateDir: string;
  snapsDir: string;
  /** CLI flags that point the agent at this environment */
  flags: string[];
  createVm(opts: Omit<CreateOneVmOptions, 'dsRoot' | 'dsId' | 'replicaHost'> & { replicaHost?: string }): Promise<OneVm>;
  /**
   * buildContext overrides that point an in-process agent at this environment (what `flags` are to the
   * CLI); `replica` fields replace the sshd's (e.g. a relay's port and known_hosts), `extra` adds sections.
   */
  contextOverrides(o?: { replica?: Record<string, unknown>; extra?: Record<string, unknown> }): Record<string, unknown>;
  /** runs `node dist/agent/main.js ARGS... FLAGS...` */
  agent(args: string[], opts?: { env?: Record<string, string>; timeoutMs?: number }): Promise<{ code: number; stdout: string; stderr: string }>;
  stop(): Promise<void>;
}

export async function startAgentEnv(opts: { name?: string; receiverArgs?: string[]; libvirtd?: Libvirtd } = {}): Promise<AgentEnv> {
  const root = await makeTempDir(opts.name ?? 'env');
  const dsRoot = path.join(root, 'datastores');
  const stateDir = path.join(root, 'state');
  await mkdir(dsRoot, { recursive: true });
  const dsId = 100;
  let lv: Libvirtd | undefined = opts.libvirtd;
  let sshd: Sshd | undefined;
  try {
    lv ??= await startLibvirtd({ name: opts.name });
    await createSystemDatastore(dsRoot, dsId, { replicaHost: '127.0.0.1' });
    sshd = await startSshd();
    // the ssh driver's settings file, as OpenNebula ships it, pointing SNAPS at the replica dir
    const sshrc = path.join(root, 'sshrc');
    await writeFile(sshrc, `# ssh TM driver settings (test copy)\nREPLICA_COPY_LOCK_TIMEOUT=600\nREPLICA_RECOVERY_SNAPS_DIR=${sshd.replicaDir}\nREPLICA_SSH_OPTS="-c aes128-gcm@openssh.com -m umac-64@openssh.com"\nREPLICA_MAX_USED_PERC=90\n`);
    // The key is bound to a host name as install.sh binds it (the receiver refuses unidentified keys);
    // the name the agent gives in hello (os.hostname()) when it is one, so no mismatch warning is logged.
    const bound = opts.receiverArgs?.includes('--host') ? [] : ['--host', testHostName()];
    const receiver = [process.execPath, agentMain(), 'receive', '--snaps-dir', sshd.replicaDir, '--sshrc', sshrc, '--log-level', 'warn', ...bound, ...(opts.receiverArgs ?? [])];
    await sshd.setAuthorizedKeys([`command="${receiver.join(' ')}",restrict ${sshd.clientPublicKey}`]);
    const flags = [
      '--datastores', dsRoot,
      '--state-dir', stateDir,
      '--libvirt-uri', lv.uri,
      '--sshrc', sshrc,
      '--replica-host', sshd.host,
      '--replica-port', String(sshd.port),
      '--replica-user', sshd.user,
      '--identity', sshd.clientKeyPath,
      '--known-hosts', sshd.knownHostsPath,
    ];
    const ownLv = !opts.libvirtd;
    const theLv = lv;
    const theSshd = sshd;
    return {
      lv: theLv,
      sshd: theSshd,
      root,
      dsRoot,
      dsId,
      stateDir,
      snapsDir: theSshd.replicaDir,
      flags,
      createVm: (o) => createOneVm(theLv, { ...o, dsRoot, dsId, replicaHost: o.replicaHost ?? '127.0.0.1' }),
      contextOverrides: (o = {}) => ({
        datastoreLocation: dsRoot,
        stateDir,
        libvirtUri: theLv.uri,
        sshrcPaths: [path.join(root, 'sshrc')],
        replica: { hostOverride: theSshd.host, port: theSshd.port, user: theSshd.user, identityFile: theSshd.clientKeyPath, knownHostsFile: theSshd.knownHostsPath, ...o.replica },
        ...o.extra,
      }),
      agent: (args, o = {}) => runNode([agentMain(), ...args, ...flags], { ...o, env: agentProcessEnv(flags, o.env) as Record<string, string> }),
      stop: async () => {
        await theSshd.stop().catch(() => {});
        if (ownLv) await theLv.stop().catch(() => {});
        await removeTree(root).catch(() => {});
      },
    };
  } catch (e) {
    await sshd?.stop().catch(() => {});
    if (!opts.libvirtd) await lv?.stop().catch(() => {});
    await removeTree(root).catch(() => {});
    throw e;
  }
}

/**
 * Environment for an agent process of a test environment: its temp files (virsh XML documents) go under
 * the environment's root, so even an agent the test SIGKILLs leaves nothing behind once the env stops.
 */
export function agentProcessEnv(flags: readonly string[], extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const i = flags.indexOf('--state-dir');
  const tmp = i >= 0 && flags[i + 1] ? path.join(path.dirname(flags[i + 1]!), 'tmp') : undefined;
  if (tmp) mkdirSync(tmp, { recursive: true });
  return { ...process.env, ...(tmp ? { TMPDIR: tmp } : {}), ...extra };
}

export function runNode(args: string[], o: { env?: Record<string, string>; timeoutMs?: number } = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { env: { ...process.env, ...o.env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), o.timeoutMs ?? 300_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? (signal ? 128 : 1), stdout, stderr });
    });
  });
}
