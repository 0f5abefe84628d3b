/**
 * A real OpenSSH server on loopback for integration tests: its own config, host key, client key,
 * authorized_keys and known_hosts under a temp dir, on a free port. Nothing outside the temp dir is
 * touched except /run/sshd, which sshd insists on when it runs as root (privilege separation dir).
 *
 * The server is started through `setpriv --pdeathsig KILL` so it dies with the test runner even when
 * the runner is killed without running its cleanup.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, mkdir, readdir, readFile, rm, writeFile, chmod, access } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { run } from '../lib/shared/exec.js';

const SSHD = '/usr/sbin/sshd'; // sshd re-executes itself per connection and refuses a relative path
const SSH_KEYGEN = 'ssh-keygen';
const SETPRIV = 'setpriv';

export interface SshdOptions {
  /** Options put in front of the client key in authorized_keys, e.g. `command="...",restrict`. */
  authorizedKeyOptions?: string;
  /** How long to wait for the server to accept connections (default 10 s). */
  readyTimeoutMs?: number;
  /** Extra sshd_config lines, e.g. `ExposeAuthInfo yes`. */
  extraConfig?: string[];
  /** Host key types the server has, in its order of preference (default ['ed25519']). */
  hostKeyTypes?: HostKeyType[];
}

export type HostKeyType = 'ed25519' | 'ecdsa' | 'rsa';

export interface Sshd {
  host: '127.0.0.1';
  port: number;
  /** The account the client logs in as: the user running the tests (root on CI). */
  user: string;
  rootDir: string;
  /** ed25519 private key, OpenSSH format, no passphrase. */
  clientKeyPath: string;
  /** "ssh-ed25519 AAAA... comment" */
  clientPublicKey: string;
  /** Holds "[127.0.0.1]:PORT ssh-ed25519 ..." for the host key at start; NOT rewritten by regenerateHostKey. */
  knownHostsPath: string;
  /** "ssh-ed25519 AAAA..." of the key the server currently presents (its first host key type). */
  hostPublicKey: string;
  /** "TYPE AAAA..." of every host key, by HostKeyType. */
  hostPublicKeys: Partial<Record<HostKeyType, string>>;
  authorizedKeysPath: string;
  /** sshd's own log (-E), kept for debugging failed tests. */
  logPath: string;
  /** An empty directory under rootDir to use as the replica's SNAPS. */
  replicaDir: string;
  setAuthorizedKeys(lines: string[]): Promise<void>;
  /** New host key, server restarted on the same port (for "changed host key" tests). */
  regenerateHostKey(): Promise<void>;
  /** Last lines of the sshd log, for assertion messages. */
  readLog(): Promise<string>;
  /**
   * Processes that sessions of this server started and that still run, also after their client left (a
   * receiver finishing a seed's spare copy): resolves when none is left, false after `timeoutMs`.
   */
  sessionCommandsGone(timeoutMs?: number): Promise<boolean>;
  /** pids of the processes this sshd's sessions run now (receivers, their children) */
  sessionCommandPids(): Promise<number[]>;
  stop(): Promise<void>;
}

/** Asks the kernel for a free loopback port. Another process may take it before sshd does: callers retry. */
export async function freeLoopbackPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => (port ? resolve(port) : reject(new Error('no port assigned'))));
    });
  });
}

function tcpConnects(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.once('connect', () => done(true));
    socket.once('error', () => done(false));
    socket.setTimeout(1000, () => done(false));
  });
}

/** Key pair without passphrase (ed25519 by default); returns the public line "ssh-ed25519 AAAA... comment". */
export async function generateKey(file: string, comment: string, type: HostKeyType = 'ed25519'): Promise<string> {
  await rm(file, { force: true });
  await rm(`${file}.pub`, { force: true });
  const bits = type === 'rsa' ? ['-b', '2048'] : [];
  const r = await run(SSH_KEYGEN, ['-q', '-t', type, ...bits, '-N', '', '-C', comment, '-f', file]);
  if (r.code !== 0) throw new Error(`ssh-keygen -f ${file} failed (${r.code}): ${r.stderr.trim()}`);
  await chmod(file, 0o600); // sshd ignores group/world-readable host keys
  return (await readFile(`${file}.pub`, 'utf8')).trim();
}

/** "ssh-ed25519 AAAA... comment" -> "ssh-ed25519 AAAA..." */
function keyWithoutComment(publicKeyLine: string): string {
  return publicKeyLine.split(/\s+/).slice(0, 2).join(' ');
}

function sshdConfig(p: { port: number; hostKeys: string[]; pidFile: string; authorizedKeys: string; extra?: string[] }): string {
  return [
    `Port ${p.port}`,
    'ListenAddress 127.0.0.1',
    ...p.hostKeys.map((k) => `HostKey ${k}`),
    `PidFile ${p.pidFile}`,
    'UsePAM no',
    'PasswordAuthentication no',
    'KbdInteractiveAuthentication no',
    'PubkeyAuthentication yes',
    'AuthenticationMethods publickey',
    'PermitRootLogin prohibit-password',
    `AuthorizedKeysFile ${p.authorizedKeys}`,
    'AuthorizedPrincipalsFile none',
    // the temp dir lives under a 1777 /tmp, which StrictModes would reject
    'StrictModes no',
    'PermitUserEnvironment no',
    'UseDNS no',
    'PrintMotd no',
    'PrintLastLog no',
    'X11Forwarding no',
    'LogLevel VERBOSE',
    'Subsystem sftp internal-sftp',
    // bash sources ~/.bashrc for a command sent over ssh when it is the session's first shell (no SHLVL);
    // the test account's bashrc is not what we test, and a developer's (pyenv init: 0.6 s and 0.6 CPU-s
    // here) was paid by every session of the suite and every bench run
    'SetEnv SHLVL=1',
    ...(p.extra ?? []),
    '',
  ].join('\n');
}

async function ensurePrivsepDir(): Promise<void> {
  if (process.getuid?.() !== 0) return; // a non-root sshd does not need it
  await mkdir('/run/sshd', { recursive: true, mode: 0o755 });
}

/** With UsePAM no, sshd refuses an account whose shadow password starts with "!"; say so clearly. */
async function assertAccountNotLocked(user: string): Promise<void> {
  let shadow: string;
  try {
    shadow = await readFile('/etc/shadow', 'utf8');
  } catch {
    return; // not readable (non-root): nothing to check
  }
  const entry = shadow.split('\n').find((l) => l.startsWith(`${user}:`));
  const password = entry?.split(':')[1] ?? '';
  if (password.startsWith('!')) {
    throw new Error(`account ${user} is locked ("!" in /etc/shadow): sshd with UsePAM no refuses it; use "*" instead`);
  }
}

export async function startSshd(opts: SshdOptions = {}): Promise<Sshd> {
  const readyTimeoutMs = opts.readyTimeoutMs ?? 10_000;
  const user = os.userInfo().username;
  await assertAccountNotLocked(user);
  await ensurePrivsepDir();
  await access(SSHD).catch(() => {
    throw new Error(`${SSHD} not found: install openssh-server (the harness runs the real sshd)`);
  });

  const rootDir = await mkdtemp(path.join(os.tmpdir(), 'onestor-sshd-'));
  const hostKeyTypes = opts.hostKeyTypes ?? ['ed25519'];
  const hostKeyPathOf = (t: HostKeyType) => path.join(rootDir, `ssh_host_${t}_key`);
  const clientKeyPath = path.join(rootDir, 'client_ed25519');
  const authorizedKeysPath = path.join(rootDir, 'authorized_keys');
  const knownHostsPath = path.join(rootDir, 'known_hosts');
  const configPath = path.join(rootDir, 'sshd_config');
  const pidFile = path.join(rootDir, 'sshd.pid');
  const logPath = path.join(rootDir, 'sshd.log');
  const replicaDir = path.join(rootDir, 'replica_snaps');

  let child: ChildProcess | null = null;
  let port = 0;
  let hostPublicKeys: Partial<Record<HostKeyType, string>> = {};
  const generateHostKeys = async (comment: string) => {
    hostPublicKeys = {};
    for (const t of hostKeyTypes) hostPublicKeys[t] = keyWithoutComment(await generateKey(hostKeyPathOf(t), comment, t));
  };

  const cleanupOnFailure = async () => {
    if (child) await stopChild(child);
    await rm(rootDir, { recursive: true, force: true });
  };

  const launch = async (): Promise<void> => {
    await writeFile(configPath, sshdConfig({ port, hostKeys: hostKeyTypes.map(hostKeyPathOf), pidFile, authorizedKeys: authorizedKeysPath, extra: opts.extraConfig }));
    const proc = spawn(SETPRIV, ['--pdeathsig', 'KILL', SSHD, '-D', '-e', '-f', configPath, '-E', logPath], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    proc.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    let exited: number | null = null;
    proc.once('exit', (code, signal) => (exited = code ?? (signal ? 128 : -1)));
    child = proc;

    const deadline = Date.now() + readyTimeoutMs;
    while (Date.now() < deadline) {
      if (exited !== null) break;
      if (await tcpConnects(port)) {
        // the port answering is not enough: another process may own it; our sshd must still be alive
        await sleep(20);
        if (exited === null) return;
        break;
      }
      await sleep(20);
    }
    const log = await readFile(logPath, 'utf8').catch(() => '');
    if (exited === null) await stopChild(proc);
    child = null;
    const why = `${stderr}\n${log}`.trim();
    const err = new Error(`sshd on 127.0.0.1:${port} did not become ready (exit ${exited ?? 'timeout'}): ${why}`);
    (err as Error & { cannotBind?: boolean }).cannotBind = /Cannot bind any address|Address already in use/.test(why);
    throw err;
  };

  const launchOnFreePort = async (): Promise<void> => {
    for (let attempt = 1; ; attempt++) {
      port = await freeLoopbackPort();
      try {
        await launch();
        return;
      } catch (e) {
        if (!(e as { cannotBind?: boolean }).cannotBind || attempt >= 5) throw e;
      }
    }
  };

  try {
    await mkdir(replicaDir);
    await generateHostKeys('onestor-test-host');
    const clientPublicKey = await generateKey(clientKeyPath, 'onestor-test-client');
    const authorizedLine = opts.authorizedKeyOptions ? `${opts.authorizedKeyOptions} ${clientPublicKey}` : clientPublicKey;
    await writeFile(authorizedKeysPath, `${authorizedLine}\n`, { mode: 0o600 });
    await launchOnFreePort();
    await writeFile(knownHostsPath, `[127.0.0.1]:${port} ${hostPublicKeys[hostKeyTypes[0]!]}\n`, { mode: 0o600 });

    const sshd: Sshd = {
      host: '127.0.0.1',
      get port() {
        return port;
      },
      user,
      rootDir,
      clientKeyPath,
      clientPublicKey,
      knownHostsPath,
      get hostPublicKey() {
        return hostPublicKeys[hostKeyTypes[0]!]!;
      },
      get hostPublicKeys() {
        return hostPublicKeys;
      },
      authorizedKeysPath,
      logPath,
      replicaDir,
      async setAuthorizedKeys(lines: string[]) {
        // sshd reads the file at each authentication: no restart needed
        await writeFile(authorizedKeysPath, lines.map((l) => `${l}\n`).join(''), { mode: 0o600 });
      },
      async regenerateHostKey() {
        if (child) await stopChild(child);
        child = null;
        await generateHostKeys('onestor-test-host-regenerated');
        await launch(); // same port: sshd sets SO_REUSEADDR, so TIME_WAIT does not block it
      },
      async readLog() {
        const log = await readFile(logPath, 'utf8').catch(() => '');
        return log.split('\n').slice(-40).join('\n');
      },
      sessionCommandPids: () => sessionCommandPids(port),
      async sessionCommandsGone(timeoutMs = 120_000) {
        return (await sessionCommandsLeft(port, timeoutMs)).length === 0;
      },
      async stop() {
        if (child) await stopChild(child);
        child = null;
        // commands of sessions whose client left may still run (a receiver finishing a seed's spare copy):
        // they write under dirs the caller is about to remove
        for (const pid of await sessionCommandsLeft(port, 10_000)) {
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            // gone meanwhile
          }
        }
        await rm(rootDir, { recursive: true, force: true });
      },
    };
    return sshd;
  } catch (e) {
    await cleanupOnFailure();
    throw e;
  }
}

/** pids of processes started by a session of the sshd on `port` (their environment names the connection) */
async function sessionCommandPids(port: number): Promise<number[]> {
  const tail = ` 127.0.0.1 ${port}`;
  const out: number[] = [];
  for (const d of await readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(d)) continue;
    const env = await readFile(`/proc/${d}/environ`, 'latin1').catch(() => '');
    if (env.split('\0').some((v) => v.startsWith('SSH_CONNECTION=') && v.endsWith(tail))) out.push(Number(d));
  }
  return out;
}

/** Waits up to `timeoutMs` for those commands to end; the pids still running then. */
async function sessionCommandsLeft(port: number, timeoutMs: number): Promise<number[]> {
  const until = Date.now() + timeoutMs;
  let pids = await sessionCommandPids(port);
  while (pids.length && Date.now() < until) {
    await sleep(20);
    pids = await sessionCommandPids(port);
  }
  return pids;
}

async function stopChild(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), 3000);
  await exited;
  clearTimeout(timer);
}
