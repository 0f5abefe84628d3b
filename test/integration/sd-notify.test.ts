/**
 * sd_notify against a REAL AF_UNIX datagram listener standing in for systemd's NOTIFY_SOCKET. The
 * listener is python3's socket module in a child process (Node cannot bind a datagram socket), with
 * SO_PASSCRED so it also reports the sender's pid, as systemd sees it.
 */
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, readFileSync, writeFileSync, chmodSync } from 'node:fs';
import { parseConfig } from '../../lib/config/config.js';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { SdNotify, addonTransport, systemdNotifyTransport, watchdogIntervalMs, type NotifyTransport } from '../../lib/daemon/sd-notify.js';

const LISTENER = `
import socket, sys, json, struct
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
s.bind(sys.argv[1])
print(json.dumps({"ready": True}), flush=True)
while True:
    msg, anc, flags, addr = s.recvmsg(4096, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(64))
    pid = None
    for lvl, typ, data in anc:
        if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
            pid = struct.unpack("iII", data[:12])[0]
        if lvl == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            # systemd-notify's BARRIER=1 carries a pipe fd and waits until the receiver closes it
            import os
            for i in range(len(data) // 4):
                os.close(struct.unpack_from("i", data, i * 4)[0])
    print(json.dumps({"pid": pid, "msg": msg.decode("utf-8", "replace")}), flush=True)
`;

interface Received {
  pid: number | null;
  msg: string;
  at: number;
}

class Listener {
  readonly got: Received[] = [];
  private child!: ChildProcess;
  constructor(readonly socketPath: string) {}

  async start(): Promise<void> {
    this.child = spawn('python3', ['-c', LISTENER, this.socketPath], { stdio: ['ignore', 'pipe', 'inherit'] });
    const rl = createInterface({ input: this.child.stdout! });
    await new Promise<void>((resolve, reject) => {
      this.child.once('error', reject);
      this.child.once('exit', (c) => reject(new Error(`listener exited ${c}`)));
      rl.on('line', (line) => {
        const o = JSON.parse(line) as { ready?: boolean; pid?: number | null; msg?: string };
        if (o.ready) return resolve();
        this.got.push({ pid: o.pid ?? null, msg: o.msg ?? '', at: performance.now() });
      });
    });
  }

  messages(): string[] {
    return this.got.map((g) => g.msg).filter((m) => m !== 'BARRIER=1');
  }

  async waitFor(pred: (r: Received[]) => boolean, ms = 5000): Promise<void> {
    const end = performance.now() + ms;
    while (!pred(this.got)) {
      if (performance.now() > end) throw new Error(`timeout; got ${JSON.stringify(this.messages())}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  stop(): void {
    this.child.kill('SIGKILL');
  }
}

const hasPython = spawnSync('python3', ['-c', 'import socket; socket.AF_UNIX'], { stdio: 'ignore' }).status === 0;
const hasSystemdNotify = spawnSync('systemd-notify', ['--version'], { stdio: 'ignore' }).status === 0;
const addon = addonTransport();

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(path.join(tmpdir(), 'onestor-sdnotify-'));
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe('without NOTIFY_SOCKET', () => {
  it('is disabled and every call is a no-op', async () => {
    const n = new SdNotify({ env: { WATCHDOG_USEC: '1000000' } });
    expect(n.enabled).toBe(false);
    expect(n.watchdogMs).toBeNull();
    await n.ready();
    await n.stopping();
    n.startWatchdog()();
  });
});

describe('watchdogIntervalMs', () => {
  it('is half of WATCHDOG_USEC, for our pid only, and ignores junk', () => {
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '30000000' }, 42)).toBe(15_000);
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '30000000', WATCHDOG_PID: '42' }, 42)).toBe(15_000);
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '30000000', WATCHDOG_PID: '43' }, 42)).toBeNull();
    for (const junk of ['', '0', '-5', 'abc', '1e6', ' 100']) expect(watchdogIntervalMs({ WATCHDOG_USEC: junk }, 42)).toBeNull();
    expect(watchdogIntervalMs({}, 42)).toBeNull();
  });
});

const transports: Array<[string, () => NotifyTransport, boolean]> = [
  ['node-unix-socket (main pid)', () => addon!, addon !== null],
  ['systemd-notify (child)', () => systemdNotifyTransport(), hasSystemdNotify],
];

describe.skipIf(!hasPython)('real NOTIFY_SOCKET listener', () => {
  it('the default transport is the addon when it is installed', () => {
    const n = new SdNotify({ env: { NOTIFY_SOCKET: path.join(dir, 'none.sock') } });
    expect(n.transport?.name).toBe(addon ? 'node-unix-socket' : 'systemd-notify');
    n.close();
  });

  for (const [name, make, available] of transports) {
    it.skipIf(!available)(`${name}: READY=1 with STATUS, WATCHDOG=1 cadence, STOPPING=1`, async () => {
      const sock = path.join(dir, `${name.split(' ')[0]}.sock`);
      const l = new Listener(sock);
      await l.start();
      const errors: unknown[] = [];
      const n = new SdNotify({ env: { NOTIFY_SOCKET: sock, WATCHDOG_USEC: '200000', WATCHDOG_PID: String(process.pid) }, transport: make(), onError: (e) => errors.push(e) });
      try {
        expect(n.watchdogMs).toBe(100);
        await n.ready('0 disks protected, 0 failing');
        await l.waitFor((g) => g.some((x) => x.msg.startsWith('READY=1')));
        expect(l.messages()[0]).toBe('READY=1\nSTATUS=0 disks protected, 0 failing');
        if (name.startsWith('node-unix-socket')) expect(l.got[0]!.pid).toBe(process.pid);

        const t0 = performance.now();
        const stop = n.startWatchdog();
        await new Promise((r) => setTimeout(r, 1050));
        stop();
        const pings = l.got.filter((x) => x.msg === 'WATCHDOG=1' && x.at >= t0);
        // 100 ms cadence over ~1 s; the fork per ping of systemd-notify may delay a few
        expect(pings.length).toBeGreaterThanOrEqual(7);
        expect(pings.length).toBeLessThanOrEqual(11);
        const gaps = pings.slice(1).map((p, i) => p.at - pings[i]!.at);
        expect(Math.max(...gaps)).toBeLessThan(200); // always within the 200 ms watchdog timeout

        await n.status('3 disks protected,\n1 failing');
        await n.stopping();
        await l.waitFor((g) => g.some((x) => x.msg === 'STOPPING=1'));
        expect(l.messages()).toContain('STATUS=3 disks protected, 1 failing');
        expect(l.messages().at(-1)).toBe('STOPPING=1');
        expect(errors).toEqual([]);
      } finally {
        n.close();
        l.stop();
      }
    });
  }

  it('the watchdog stays silent while the daemon reports itself unhealthy', async () => {
    const sock = path.join(dir, 'unhealthy.sock');
    const l = new Listener(sock);
    await l.start();
    const n = new SdNotify({ env: { NOTIFY_SOCKET: sock, WATCHDOG_USEC: '100000' }, transport: addon ?? systemdNotifyTransport() });
    try {
      let healthy = true;
      const stop = n.startWatchdog(() => healthy);
      await l.waitFor((g) => g.some((x) => x.msg === 'WATCHDOG=1'));
      healthy = false;
      await new Promise((r) => setTimeout(r, 150)); // let a ping already in flight land
      const before = l.messages().length;
      await new Promise((r) => setTimeout(r, 400));
      stop();
      expect(l.messages().length).toBe(before);
    } finally {
      n.close();
      l.stop();
    }
  });

  it('a vanished socket is reported through onError, never thrown', async () => {
    const errors: unknown[] = [];
    const n = new SdNotify({ env: { NOTIFY_SOCKET: path.join(dir, 'gone.sock') }, transport: addon ?? systemdNotifyTransport(), onError: (e) => errors.push(e) });
    await n.ready();
    expect(errors).toHaveLength(1);
    n.close();
  });
});

// ---- the unit that makes systemd talk to us ------------------------------------------------------

const UNIT = new URL('../../systemd/onestor-agent.service', import.meta.url);
const hasAnalyze = spawnSync('systemd-analyze', ['--version'], { stdio: 'ignore' }).status === 0;

function directives(text: string): Map<string, string[]> {
  const m = new Map<string, string[]>();
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (!t || t.startsWith('#') || t.startsWith('[')) continue;
    const i = t.indexOf('=');
    m.set(t.slice(0, i), [...(m.get(t.slice(0, i)) ?? []), t.slice(i + 1)]);
  }
  return m;
}

describe('systemd/onestor-agent.service', () => {
  const text = readFileSync(UNIT, 'utf8');
  const d = directives(text);

  it.skipIf(!hasAnalyze)('passes systemd-analyze verify cleanly', () => {
    // the binary is not installed on a CI machine: point ExecStart at a stub, change nothing else
    const stub = path.join(dir, 'onestor-agent');
    writeFileSync(stub, '#!/bin/sh\n');
    chmodSync(stub, 0o755);
    const unit = path.join(dir, 'onestor-agent.service');
    const rewritten = text.replace(/^ExecStart=\/usr\/local\/bin\/onestor-agent /m, `ExecStart=${stub} `);
    expect(rewritten).not.toBe(text);
    writeFileSync(unit, rewritten);
    const r = spawnSync('systemd-analyze', ['verify', unit], { encoding: 'utf8' });
    expect(r.stderr + r.stdout).toBe('');
    expect(r.status).toBe(0);
  });

  it('is a notify service with watchdog, reload, restart, and the paths the agent writes', () => {
    expect(d.get('Type')).toEqual(['notify']);
    // the systemd-notify fallback sends from a child process
    expect(d.get('NotifyAccess')).toEqual(['all']);
    expect(Number(d.get('WatchdogSec')?.[0])).toBeGreaterThan(0);
    expect(d.get('ExecStart')).toEqual(['/usr/local/bin/onestor-agent run']);
    expect(d.get('ExecReload')).toEqual(['/bin/kill -HUP $MAINPID']);
    expect(d.get('Restart')).toEqual(['on-failure']);
    expect(d.get('User')).toEqual(['oneadmin']);
    expect(d.get('ProtectSystem')).toEqual(['strict']);
    // stop: the daemon's own 30 s wind-down must fit before SIGKILL
    expect(Number(d.get('TimeoutStopSec')?.[0])).toBeGreaterThan(30);
    const defaults = parseConfig({}, 'defaults');
    const rw = (d.get('ReadWritePaths') ?? []).join(' ').split(/\s+/).map((p) => p.replace(/^-/, ''));
    expect(rw).toContain(defaults.stateDir);
    // staging (DS/.onestor/VMID) is written by QEMU under libvirtd: it must be under the datastores,
    // which are writable here, and never in this unit's PrivateTmp
    expect(rw).toContain(defaults.datastoreLocation);
    expect(defaults.stagingDirName.includes('/')).toBe(false);
    expect(d.get('RestrictAddressFamilies')).toEqual(['AF_UNIX AF_INET AF_INET6']);
    for (const k of ['NoNewPrivileges', 'PrivateTmp', 'ProtectHome', 'ProtectKernelTunables', 'ProtectKernelModules', 'LockPersonality']) expect(d.get(k), k).toEqual(['yes']);
  });
});
