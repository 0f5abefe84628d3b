/**
 * The replica channel through OpenSSH's own client: `ssh` as a child process whose stdin/stdout carry the
 * protocol (lib/protocol). Why: ssh2 does SSH a packet at a time in JavaScript and cost the agent 2.8-3.6
 * CPU-s per GiB sent, where the ssh client spends 0.9 (bench/README.md, issue 14) — CPU taken from the VMs
 * of the hypervisor.
 *
 * The host-key policy stays known-hosts.ts's: ssh gets a private known_hosts holding only the keys that
 * policy accepts for the replica, under a fixed alias (HostKeyAlias), with strict checking; no user or
 * system ssh config, agent, forwarding or prompt is involved. The argument list and the reading of ssh's
 * complaints are pure (unit-tested); spawnOpenSsh is the thin adapter.
 */
import { spawn, type ChildProcessByStdio } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Readable, Writable } from 'node:stream';

/** The name the pinned keys are written under (never resolved: HostKeyAlias only names the known_hosts entry). */
export const PINNED_ALIAS = 'onestor-replica';

export interface OpenSshOptions {
  host: string;
  port: number;
  username: string;
  identityFile: string;
  /** known_hosts text under PINNED_ALIAS (known-hosts.ts pinnedKnownHosts) */
  pinnedKnownHosts: string;
  /** host-key algorithms to offer, in order (known-hosts.ts hostKeyAlgorithmsFor) */
  hostKeyAlgorithms: readonly string[];
  ciphers: readonly string[];
  receiverCommand: string;
  connectTimeoutMs: number;
  keepaliveMs: number;
  /** the ssh program (tests may point elsewhere) */
  sshProgram?: string;
}

/** ssh's command line. Every option that could come from a config file, an agent or a prompt is fixed here. */
export function openSshArgs(o: OpenSshOptions, knownHostsFile: string): string[] {
  const opt = (k: string, v: string | number) => ['-o', `${k}=${v}`];
  const keepaliveSec = Math.ceil(o.keepaliveMs / 1000);
  return [
    '-F', '/dev/null', // no user config (and, with -F, no /etc/ssh/ssh_config either)
    '-T', '-x', '-a', '-e', 'none', // no tty, X11, agent forwarding or escape character
    ...opt('BatchMode', 'yes'),
    ...opt('IdentitiesOnly', 'yes'),
    ...opt('IdentityAgent', 'none'),
    '-i', o.identityFile, // as its own argument: -o values are split at spaces
    ...opt('PasswordAuthentication', 'no'),
    ...opt('KbdInteractiveAuthentication', 'no'),
    ...opt('UserKnownHostsFile', `"${knownHostsFile}"`),
    ...opt('GlobalKnownHostsFile', '/dev/null'),
    ...opt('HostKeyAlias', PINNED_ALIAS),
    ...opt('StrictHostKeyChecking', 'yes'),
    ...opt('UpdateHostKeys', 'no'),
    ...opt('CheckHostIP', 'no'),
    ...(o.hostKeyAlgorithms.length ? opt('HostKeyAlgorithms', o.hostKeyAlgorithms.join(',')) : []),
    ...opt('Ciphers', o.ciphers.join(',')),
    ...opt('ConnectTimeout', Math.max(1, Math.ceil(o.connectTimeoutMs / 1000))),
    ...(keepaliveSec > 0 ? [...opt('ServerAliveInterval', keepaliveSec), ...opt('ServerAliveCountMax', 4)] : []),
    ...opt('ControlMaster', 'no'),
    ...opt('ControlPath', 'none'),
    ...opt('ClearAllForwardings', 'yes'),
    ...opt('PermitLocalCommand', 'no'),
    // INFO: a failed negotiation ("no matching host key type") is said at INFO, and nothing is at a normal start
    ...opt('LogLevel', 'INFO'),
    '-p', String(o.port),
    '-l', o.username,
    '--',
    o.host,
    o.receiverCommand,
  ];
}

export type SshFailure = 'hostkey' | 'auth' | 'network' | 'unknown';

/** What ssh's stderr says went wrong before the session started. */
export function classifySshFailure(stderr: string): SshFailure {
  if (/Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|No \S+ host key is known|host key .* has changed|no matching host key type/i.test(stderr)) return 'hostkey';
  if (/Permission denied|Too many authentication failures/i.test(stderr)) return 'auth';
  if (/Connection refused|Connection timed out|timed out|Could not resolve|No route to host|Network is unreachable|Connection reset|Connection closed by|kex_exchange_identification|Broken pipe/i.test(stderr)) return 'network';
  return 'unknown';
}

/** The last line of ssh's own complaint (not the receiver's JSON log lines, which share stderr). */
export function sshComplaint(stderr: string): string {
  const lines = stderr.split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('{'));
  return lines.at(-1) ?? '';
}

export interface OpenSshChannel {
  input: Readable;
  output: Writable;
  stderrTail(): string;
  /**
   * Ends stdin, waits for ssh to exit (then kills it), removes the pinned known_hosts. `hangUp`: the
   * receiver answered `bye`, nothing more is owed either way: stop ssh now instead of waiting for the remote
   * command to exit (it may still finish work of its own, which needs nothing from us).
   */
  close(waitMs?: number, hangUp?: boolean): Promise<void>;
  /** Removes the pinned known_hosts once the session is up (ssh read it during the handshake). */
  forgetKnownHosts(): Promise<void>;
  /** true when the ssh program could not be started at all (not installed) */
  failedToStart(): boolean;
}

export async function spawnOpenSsh(o: OpenSshOptions): Promise<OpenSshChannel> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'onestor-ssh-'));
  const knownHostsFile = path.join(dir, 'known_hosts');
  let removed = false;
  const forgetKnownHosts = async () => {
    if (removed) return;
    removed = true;
    await rm(dir, { recursive: true, force: true });
  };
  try {
    await writeFile(knownHostsFile, o.pinnedKnownHosts, { mode: 0o600 });
  } catch (e) {
    await forgetKnownHosts();
    throw e;
  }
  const child: ChildProcessByStdio<Writable, Readable, Readable> = spawn(o.sshProgram ?? 'ssh', openSshArgs(o, knownHostsFile), { stdio: ['pipe', 'pipe', 'pipe'] });
  let tail = '';
  child.stderr.on('data', (d: Buffer) => {
    tail = (tail + d.toString('utf8')).slice(-4000);
  });
  child.stdin.on('error', () => {}); // ssh gone: the protocol side reports the closed channel
  const exited = new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else {
      child.once('close', () => resolve());
      child.once('error', () => resolve()); // never started: no 'close' to wait for
    }
  });
  let startFailed = false;
  child.once('error', (e) => {
    startFailed = true;
    tail += `\ncannot run ${o.sshProgram ?? 'ssh'}: ${e.message}`;
    child.stdout.destroy();
  });
  void exited.then(forgetKnownHosts);
  return {
    input: child.stdout,
    output: child.stdin,
    stderrTail: () => tail,
    forgetKnownHosts,
    failedToStart: () => startFailed,
    close: async (waitMs = 5000, hangUp = false) => {
      child.stdin.end();
      if (hangUp && child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), waitMs);
      await exited;
      clearTimeout(timer);
      await forgetKnownHosts();
    },
  };
}
