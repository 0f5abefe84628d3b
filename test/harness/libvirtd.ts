/**
 * A private libvirtd (+ the QEMUs it starts) per call, for integration tests.
 *
 * Why this shape:
 * - The daemon runs in its own mount namespace with private /etc/libvirt, /run/libvirt, /var/lib/libvirt,
 *   /var/cache/libvirt and /var/log/libvirt bound from a temp root, so several instances (other test files,
 *   other engineers) run side by side and the host's config and defined domains are never seen or touched.
 * - It also runs in its own PID namespace whose init is a shell. `setpriv --pdeathsig KILL` makes `unshare`
 *   die with us and `--kill-child` then SIGKILLs that init; when a PID namespace's init dies the kernel
 *   kills every process in it, QEMU included. So even a SIGKILLed test runner leaves no daemon or guest.
 * - qemu.conf runs QEMU as root with no security driver, no cgroups (the cgroup tree is shared between
 *   instances and `qemu-1-one-7` would collide) and stdio to a plain file (no virtlogd needed).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, readFileSync, readdirSync, readlinkSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run, type ExecResult } from '../../lib/shared/exec.js';
import { reapStaleLibvirtdRoots, reapStaleTempDirs, LIBVIRTD_ROOT_TAG, OWNER_FILE, type RootOwner } from './reaper.js';
import { removeTree, uniqueName } from './tmp.js';

export interface Libvirtd {
  /** qemu:///system?socket=ROOT/run/libvirt/libvirt-sock */
  uri: string;
  /** Temp root holding the private libvirt dirs; removed by stop(). */
  rootDir: string;
  /** True when this libvirtd offers <domain type='kvm'/>. */
  kvm: boolean;
  domainType: 'kvm' | 'qemu';
  /** Host pid of the namespace's init; every daemon and QEMU of this instance descends from it. */
  initPid: number;
  /** `pid:[inode]` of the private PID namespace: identifies this instance's processes in /proc. */
  pidNamespace: string;
  /** Runs `virsh -c uri ...`; never throws on a non-zero exit. */
  virsh(args: string[], opts?: { timeoutMs?: number }): Promise<ExecResult>;
  /** Runs `virsh -c uri ...`; throws with stderr on a non-zero exit, returns stdout. */
  virshOk(args: string[], opts?: { timeoutMs?: number }): Promise<string>;
  /** Where QEMU's stderr for DOMAIN goes (stdio_handler=file). HMP `qemu-io` prints its results there. */
  qemuLogPath(domain: string): string;
  /**
   * Kills libvirtd (SIGKILL by default: a crash) while QEMU keeps running; the namespace init starts it
   * again. Resolves when the new daemon answers.
   */
  restartDaemon(signal?: NodeJS.Signals): Promise<void>;
  /** Processes currently alive in this instance's PID namespace (libvirtd, QEMU...). */
  processes(): Array<{ pid: number; comm: string; cmdline: string }>;
  /** Destroys every domain, kills the namespace, waits until all its processes are gone, removes rootDir. */
  stop(): Promise<void>;
}

const PRIVATE_DIRS = ['etc/libvirt', 'run/libvirt', 'var/lib/libvirt', 'var/cache/libvirt', 'var/log/libvirt'] as const;

// PID 1 of the namespace. It binds the private dirs, starts libvirtd in the foreground and `wait`s: a shell
// as init reaps the QEMUs libvirt daemonizes (they get reparented to it), so none lingers as a zombie.
// Mount points must exist on the host; creating an empty /run/libvirt there is harmless.
const INIT_SCRIPT = `
set -e
root="$1"
shift
for d in ${PRIVATE_DIRS.join(' ')}; do
  mkdir -p "/$d"
  mount --bind "$root/$d" "/$d"
done
# extra SOURCE TARGET pairs: e.g. this host's own datastore dir at the path every host uses
while [ $# -ge 2 ]; do
  mount --bind "$1" "$2"
  shift 2
done
# libvirtd is restarted when it dies (restartDaemon() kills it to simulate a crash or an upgrade);
# QEMU processes are children of this init, not of libvirtd, so they survive and are reconnected.
while :; do
  /usr/sbin/libvirtd -p "$root/libvirtd.pid" &
  wait $! || true
  sleep 0.2
done
`;

const LIBVIRTD_CONF = `# private test instance
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
`;

const QEMU_CONF = `# private test instance: root QEMU, no relabelling, no cgroups, no virtlogd
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
`;

const READY_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 30_000;

/** Instances not yet stopped, killed on process exit as a second line of defence after pdeathsig. */
const liveInstances = new Set<{ initPid: number }>();
let exitHookInstalled = false;

function killLiveInstances(): void {
  for (const inst of liveInstances) {
    try {
      process.kill(inst.initPid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
}

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', killLiveInstances);
  // A vitest worker whose main process was SIGKILLed does not die (it was seen spinning forever), so
  // pdeathsig never fires. Nobody will read its results any more: free the daemons and guests and end the
  // orphan. Only under vitest, because a script started from a shell legitimately outlives that shell.
  if (process.env.VITEST && process.ppid !== 1) {
    const runnerPid = process.ppid;
    setInterval(() => {
      if (process.ppid !== runnerPid) {
        killLiveInstances();
        // vitest intercepts process.exit in its workers; the orphan has nobody to report to anyway.
        process.kill(process.pid, 'SIGKILL');
      }
    }, 1000).unref();
  }
}

export interface LibvirtdOptions {
  name?: string;
  /**
   * Bind mounts inside this instance's mount namespace only (source dir -> existing target dir): lets two
   * instances see different datastore contents at the same path, as two hypervisors do.
   */
  binds?: Array<{ source: string; target: string }>;
  /** libvirtd.conf host_uuid: migration refuses a destination with the source's own host UUID. */
  hostUuid?: string;
  /** Extra qemu.conf lines (e.g. migration_host = "127.0.0.1"). */
  qemuConf?: string;
}

export async function startLibvirtd(opts: LibvirtdOptions = {}): Promise<Libvirtd> {
  await reapStaleLibvirtdRoots();
  await reapStaleTempDirs();

  const rootDir = join(tmpdir(), LIBVIRTD_ROOT_TAG + uniqueName(opts.name ?? 'lv'));
  await mkdir(rootDir, { mode: 0o755 });
  for (const d of PRIVATE_DIRS) await mkdir(join(rootDir, d), { recursive: true, mode: 0o755 });
  await mkdir(join(rootDir, 'var/log/libvirt/qemu'), { recursive: true });
  await writeFile(join(rootDir, 'etc/libvirt/libvirtd.conf'), LIBVIRTD_CONF + (opts.hostUuid ? `host_uuid = "${opts.hostUuid}"\n` : ''));
  await writeFile(join(rootDir, 'etc/libvirt/qemu.conf'), QEMU_CONF + (opts.qemuConf ?? ''));

  const uri = `qemu:///system?socket=${join(rootDir, 'run/libvirt/libvirt-sock')}`;
  const consoleLog = join(rootDir, 'namespace.log');
  const logFd = openSync(consoleLog, 'a');
  let child: ChildProcess;
  try {
    child = spawn(
      'setpriv',
      [
        '--pdeathsig',
        'KILL',
        '--',
        'unshare',
        '--mount',
        '--propagation',
        'private',
        '--pid',
        '--fork',
        '--kill-child=KILL',
        '--mount-proc',
        '/bin/sh',
        '-c',
        INIT_SCRIPT,
        'onestor-lv-init',
        rootDir,
        ...(opts.binds ?? []).flatMap((b) => [b.source, b.target]),
      ],
      { stdio: ['ignore', logFd, logFd], env: { ...process.env, LC_ALL: 'C', LANG: 'C' } },
    );
  } finally {
    closeSync(logFd);
  }
  // Must not keep the test runner alive on its own; stop() and the exit hook end it.
  child.unref();
  const exited = new Promise<number | null>((resolve) => {
    child.once('exit', (code, signal) => resolve(code ?? (signal ? 128 : null)));
    child.once('error', () => resolve(-1));
  });
  let exitCode: number | null | undefined;
  void exited.then((c) => {
    exitCode = c;
  });

  let instance: { initPid: number } | undefined;
  const failStart = async (why: string): Promise<never> => {
    if (instance) liveInstances.delete(instance);
    const tail = async (p: string) => (await readFile(p, 'utf8').catch(() => '')).split('\n').slice(-30).join('\n');
    const detail = `namespace.log:\n${await tail(consoleLog)}\nlibvirtd.log:\n${await tail(join(rootDir, 'var/log/libvirt/libvirtd.log'))}`;
    if (child.pid !== undefined && exitCode === undefined) {
      child.ref();
      try {
        process.kill(child.pid, 'SIGKILL');
      } catch {
        /* gone */
      }
      await Promise.race([exited, unrefSleep(5000)]);
    }
    await removeTree(rootDir);
    throw new Error(`private libvirtd in ${rootDir} did not start: ${why}\n${detail}`);
  };

  if (child.pid === undefined) return failStart('setpriv/unshare could not be spawned');
  const unsharePid = child.pid;

  // The init is unshare's only child; its host pid lets us kill the whole namespace later.
  let initPid: number | undefined;
  const deadline = Date.now() + READY_TIMEOUT_MS;
  while (initPid === undefined && Date.now() < deadline && exitCode === undefined) {
    initPid = childPids(unsharePid)[0];
    if (initPid === undefined) await sleep(10);
  }
  if (initPid === undefined) return failStart(`no namespace init appeared (exit ${String(exitCode)})`);
  let pidNamespace: string;
  try {
    pidNamespace = readlinkSync(`/proc/${initPid}/ns/pid`);
  } catch (e) {
    return failStart(`cannot read pid namespace of ${initPid}: ${String(e)}`);
  }
  instance = { initPid };
  liveInstances.add(instance);
  installExitHook();
  const owner: RootOwner = {
    ownerPid: process.pid,
    ownerStartTicks: processStartTicks(process.pid),
    ownerPidNamespace: readlinkSync('/proc/self/ns/pid'),
    initPid,
    pidNamespace,
  };
  await writeFile(join(rootDir, OWNER_FILE), JSON.stringify(owner));

  const virsh = (args: string[], o: { timeoutMs?: number } = {}) =>
    run('virsh', ['-c', uri, ...args], { timeoutMs: o.timeoutMs ?? 60_000 });
  const virshOk = async (args: string[], o: { timeoutMs?: number } = {}) => {
    const r = await virsh(args, o);
    if (r.code !== 0) throw new Error(`virsh ${args.join(' ')} failed (exit ${r.code}): ${r.stderr.trim() || r.stdout.trim()}`);
    return r.stdout;
  };

  // Readiness barrier: the first API call blocks while libvirt probes QEMU's capabilities.
  let lastErr = '';
  for (;;) {
    if (exitCode !== undefined) return failStart(`namespace exited with ${String(exitCode)}`);
    const r = await virsh(['version'], { timeoutMs: 30_000 });
    if (r.code === 0) break;
    lastErr = r.stderr.trim();
    if (Date.now() > deadline) {
      return failStart(`virsh version kept failing: ${lastErr}`);
    }
    await sleep(100);
  }

  const caps = await virsh(['capabilities']);
  const kvm = caps.code === 0 && caps.stdout.includes("<domain type='kvm'/>");
  // ONESTOR_TEST_DOMAIN_TYPE=qemu forces TCG, e.g. to reproduce a CI machine without /dev/kvm.
  const domainType: 'kvm' | 'qemu' = kvm && process.env.ONESTOR_TEST_DOMAIN_TYPE !== 'qemu' ? 'kvm' : 'qemu';

  const restartDaemon = async (signal: NodeJS.Signals = 'SIGKILL'): Promise<void> => {
    const old = processesInNamespace(pidNamespace).filter((p) => p.comm === 'libvirtd');
    if (old.length === 0) throw new Error('no libvirtd to restart');
    for (const p of old) process.kill(p.pid, signal);
    const until = Date.now() + READY_TIMEOUT_MS;
    for (;;) {
      const now = processesInNamespace(pidNamespace).filter((p) => p.comm === 'libvirtd');
      if (now.length > 0 && now.every((p) => !old.some((o) => o.pid === p.pid)) && (await virsh(['version'], { timeoutMs: 30_000 })).code === 0) return;
      if (Date.now() > until) throw new Error('libvirtd did not come back');
      await sleep(100);
    }
  };

  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopped ??= (async () => {
      // Destroy first so each QEMU exits through libvirt (clean monitor close) rather than by SIGKILL.
      if (exitCode === undefined) {
        const list = await virsh(['list', '--all', '--name'], { timeoutMs: 15_000 });
        const names = list.code === 0 ? list.stdout.split('\n').map((s) => s.trim()).filter(Boolean) : [];
        for (const name of names) await virsh(['destroy', name], { timeoutMs: 15_000 });
        // Keep the event loop alive until the namespace is really gone (the child is unref'd otherwise).
        child.ref();
        try {
          process.kill(initPid, 'SIGKILL');
        } catch {
          /* already gone */
        }
        // unshare exits only once its child (the init) is reaped, and the kernel reaps a namespace's
        // init only after every other process of that namespace is gone: this is the "all dead" barrier.
        const done = await Promise.race([exited.then(() => true), unrefSleep(STOP_TIMEOUT_MS).then(() => false)]);
        if (!done) throw new Error(`private libvirtd ${rootDir}: namespace init ${initPid} did not exit`);
      }
      if (instance) liveInstances.delete(instance);
      await removeTree(rootDir);
    })();
    return stopped;
  };

  return {
    uri,
    rootDir,
    kvm,
    domainType,
    initPid,
    pidNamespace,
    virsh,
    virshOk,
    qemuLogPath: (domain) => join(rootDir, 'var/log/libvirt/qemu', `${domain}.log`),
    processes: () => processesInNamespace(pidNamespace),
    restartDaemon,
    stop,
  };
}

/** Host processes whose PID namespace is `pidNamespace` (as readlink /proc/PID/ns/pid prints it). */
export function processesInNamespace(pidNamespace: string): Array<{ pid: number; comm: string; cmdline: string }> {
  const found: Array<{ pid: number; comm: string; cmdline: string }> = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (readlinkSync(`/proc/${entry}/ns/pid`) !== pidNamespace) continue;
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      // Zombies are already dead; only their parent's wait is missing.
      if (stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) === 'Z') continue;
      found.push({
        pid: Number(entry),
        comm: readFileSync(`/proc/${entry}/comm`, 'utf8').trim(),
        cmdline: readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0').join(' ').trim(),
      });
    } catch {
      // exited while we looked, or not ours to read
    }
  }
  return found;
}

/** Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat); tells pid reuse apart. */
export function processStartTicks(pid: number): number | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ticks = Number(fields[19]);
    return Number.isFinite(ticks) ? ticks : null;
  } catch {
    return null;
  }
}

function childPids(pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8')
      .split(' ')
      .filter((s) => s.trim() !== '')
      .map(Number);
  } catch {
    // Kernels without CONFIG_PROC_CHILDREN: find them by parent pid (field 4 of /proc/N/stat).
    const found: number[] = [];
    for (const entry of readdirSync('/proc')) {
      if (!/^\d+$/.test(entry)) continue;
      try {
        const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
        if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === pid) found.push(Number(entry));
      } catch {
        // exited meanwhile
      }
    }
    return found;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A timeout that does not keep the process alive once everything else is done. */
function unrefSleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}
