/**
 * runVmCycle's logic with fake ports (no libvirt, no qemu-img, no replica, no state file): what it
 * captures and sends, what it records, and how it tells a shutdown (E_ABORTED: the previous snapshot
 * stands, no failure counted) from a failure. The real adapters are tested against real daemons in
 * test/integration/.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cycleLeases, runVmCycle, type CycleDeps, type CycleLibvirt } from '../../lib/cycle/cycle.js';
import { cachedSha256 } from '../../lib/cycle/digest.js';
import type { CaptureRequest, CaptureResult } from '../../lib/cycle/capture.js';
import type { PullCapture } from '../../lib/cycle/capture-pull.js';
import type { ReplicaDiskSession, ReplicaPort } from '../../lib/cycle/ports.js';
import { diskKey, emptyState, type AgentState } from '../../lib/cycle/state.js';
import { ErrorCodes, OnestorError } from '../../lib/shared/errors.js';
import type { EligibleDisk, ReplicaManifest } from '../../lib/shared/model.js';

const DS = '/ds/100';
const disk: EligibleDisk = {
  vmId: 42,
  diskId: 0,
  dsId: 100,
  dsDir: DS,
  vmDir: `${DS}/42`,
  domainName: 'one-42',
  freqSeconds: 600,
  replicaHost: 'replica',
  snapDir: `${DS}/42/disk.0.snap`,
  basePath: `${DS}/42/disk.0.snap/base`,
  base1Path: `${DS}/42/disk.0.snap/base.1`,
};
const BASE_SHA = 'b'.repeat(64);

function manifest(checkpoint: string, over: Partial<ReplicaManifest> = {}): ReplicaManifest {
  return { version: 1, vmId: 42, diskId: 0, checkpoint, capturedAt: 1000, publishedAt: 1001, consistency: 'crash-consistent', mode: 'full', base: { size: 100, sha256: BASE_SHA }, base1: { size: 10 }, ...over };
}

interface World {
  deps: CycleDeps;
  state: AgentState;
  calls: string[];
  captures: CaptureRequest[];
  uploads: Array<{ kind: string; file: string }>;
  published: unknown[];
  deleted: string[];
  lockHeld: boolean;
}

function world(opts: { onReplica?: ReplicaManifest | null; libvirtCheckpoints?: string[]; state?: AgentState; sha256?: CycleDeps['digests']['sha256']; upload?: ReplicaDiskSession['upload']; lockVm?: CycleDeps['locks']['lockVm']; transferTimeoutMs?: number } = {}): World {
  const w: World = { deps: undefined as never, state: opts.state ?? emptyState(0), calls: [], captures: [], uploads: [], published: [], deleted: [], lockHeld: false };
  let checkpoints = [...(opts.libvirtCheckpoints ?? [])];
  const libvirt = {
    domainRunning: async () => true,
    domainId: async () => 1,
    diskBitmaps: async () => null,
    removeBitmap: async () => 'removed',
    domainView: async () => ({ disks: [{ target: 'vda', source: disk.base1Path }], hasGuestAgentChannel: false }),
    checkpointNames: async () => [...checkpoints],
    checkpointBitmapHealthy: async () => true,
    checkpointXml: async (_d: string, name: string) => `<domaincheckpoint><name>${name}</name></domaincheckpoint>`,
    checkpointRedefine: async () => {},
    checkpointDelete: async (_d: string, name: string) => {
      w.deleted.push(name);
      checkpoints = checkpoints.filter((c) => c !== name);
    },
  } as unknown as CycleLibvirt;
  const onReplica = opts.onReplica ?? null;
  const session: ReplicaDiskSession = {
    manifest: onReplica,
    baseOnReplica: onReplica ? onReplica.base : null,
    upload:
      opts.upload ??
      (async (kind, file) => {
        w.uploads.push({ kind, file });
        return { bytes: 10, resumedFrom: 0 };
      }),
    uploadStream: async () => {
      throw new Error('this fake cycle runs in push mode: no stream upload');
    },
    publishFull: async (a) => {
      w.published.push({ mode: 'full', ...a });
      return manifest(a.checkpoint!);
    },
    publishIncremental: async (a) => {
      w.published.push({ mode: 'incremental', ...a });
      return manifest(a.checkpoint, { mode: 'incremental' });
    },
    close: async () => void w.calls.push('close'),
  };
  const replica: ReplicaPort = { status: async () => (onReplica ? [onReplica] : []), openDisk: async () => session };
  w.deps = {
    libvirt,
    qemuImg: { info: async () => ({ virtualSize: 1 << 20, bitmaps: [] }) as never, checkLive: async () => ({ corruptions: 0, leaks: 0, errors: [], ms: 1 }) },
    replicaFor: async () => replica,
    state: {
      // no yield marker can exist there: the migration watch finds none
      dir: '/nonexistent/onestor-state',
      loadOrReset: async () => ({ state: structuredClone(w.state) }),
      update: async (fn) => {
        const cur = structuredClone(w.state);
        w.state = fn(cur) ?? cur;
        return w.state;
      },
    },
    staging: {
      capture: async (req): Promise<CaptureResult> => {
        w.captures.push(req);
        checkpoints.push(req.checkpointName);
        return { checkpoint: req.checkpointName, consistency: 'crash-consistent', capturedAtMs: 5_000_000, jobMs: 1, thinMs: 1, disks: req.disks.map((d) => ({ diskId: d.diskId, target: 'vda', mode: d.mode, file: `${req.stagingDir}/disk.${d.diskId}.out`, virtualSize: d.virtualSize })) };
      },
      capturePull: async () => {
        throw new Error('this fake cycle runs in push mode (seedMode push): no pull-mode capture');
      },
      clean: async (dir) => void w.calls.push(`clean ${dir}`),
    },
    locks: {
      lockVm:
        opts.lockVm ??
        (async (root, vmId) => {
          w.calls.push(`lock ${root} ${vmId}`);
          w.lockHeld = true;
          return { release: async () => void (w.lockHeld = false) };
        }),
    },
    digests: {
      identity: async () => ({ identity: 'id', size: 100, devIno: '1:2' }),
      sha256: opts.sha256 ?? (async () => ({ sha256: BASE_SHA, size: 100, identity: 'id', fromCache: false })),
    },
    log: pino({ level: 'silent' }),
    hostName: 'host-a',
    stagingDirName: '.onestor',
    // the staged (push) path: the pull-mode seed needs a real NBD export (test/integration/seed-pull.test.ts)
    seedMode: 'push',
    captureTimeoutMs: 60_000,
    ...(opts.transferTimeoutMs ? { transferTimeoutMs: opts.transferTimeoutMs } : {}),
    stagingMinFreePercent: 5,
    tryFreeze: false,
    now: () => 5_000_000,
  };
  return w;
}

/** A pull capture of the request's disks: each stream yields 4 bytes; `end` is the test's. */
function fakePullCapture(r: CaptureRequest, end: () => Promise<void>): PullCapture {
  return {
    checkpoint: r.checkpointName,
    consistency: 'crash-consistent',
    capturedAtMs: 5_000_000,
    jobMs: 1,
    stagingPeak: () => 0,
    signal: new AbortController().signal,
    disks: r.disks.map((d) => ({ diskId: d.diskId, target: 'vda', mode: d.mode, virtualSize: d.virtualSize, size: 4, dataBytes: 4, zeroBytes: 0, stream: async function* () { yield Buffer.alloc(4); } })),
    end,
  };
}

const req = (signal?: AbortSignal) => ({ vmId: 42, domainName: 'one-42', dsDir: DS, disks: [disk], ...(signal ? { signal } : {}) });

describe('runVmCycle with fake ports', () => {
  it('seed: a replica without lineage gets base and a full base.1, under the VM lock, staging cleaned', async () => {
    const w = world();
    const [o] = await runVmCycle(w.deps, req());
    expect(o).toMatchObject({ ok: true, mode: 'full', bytes: 20 });
    expect(w.calls[0]).toBe(`lock ${DS}/.onestor 42`);
    expect(w.lockHeld).toBe(false);
    expect(w.captures[0]!.stagingDir).toBe(`${DS}/.onestor/42`);
    expect(w.captures[0]!.disks[0]).toMatchObject({ mode: 'full', virtualSize: 1 << 20, target: 'vda' });
    expect(w.uploads.map((u) => u.kind)).toEqual(['base', 'base1']);
    expect(w.published[0]).toMatchObject({ mode: 'full', sourceHost: 'host-a', base: `base-${BASE_SHA.slice(0, 32)}` });
    expect(w.calls).toContain(`clean ${DS}/.onestor/42`);
    const d = w.state.disks[diskKey(42, 0)]!;
    expect(d).toMatchObject({ checkpoint: o!.checkpoint, failCount: 0, base1Identity: '1:2' });
    expect(d.checkpointXml).toContain(o!.checkpoint!);
    expect(w.state.baseDigests[disk.basePath]).toMatchObject({ sha256: BASE_SHA });
  });

  it('connects to the replica while it asks libvirt about the domain, once; a failed connect is tried once and fails the disk', async () => {
    const w = world();
    const order: string[] = [];
    const lv = w.deps.libvirt as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>;
    const realView = lv['domainView']!;
    lv['domainView'] = async (...a: unknown[]) => (order.push('domainView'), realView(...a));
    const realFor = w.deps.replicaFor;
    w.deps.replicaFor = (h) => (order.push(`connect ${h}`), realFor(h));
    const [o] = await runVmCycle(w.deps, req());
    expect(o).toMatchObject({ ok: true, mode: 'full' });
    expect(order.indexOf('connect replica')).toBeLessThan(order.indexOf('domainView'));
    expect(order.filter((x) => x.startsWith('connect'))).toEqual(['connect replica']);

    const down = world();
    let attempts = 0;
    down.deps.replicaFor = async () => {
      attempts++;
      throw new OnestorError(ErrorCodes.SSH, 'connect to replica: connection refused');
    };
    const [f] = await runVmCycle(down.deps, req());
    expect(f).toMatchObject({ ok: false, error: { code: ErrorCodes.SSH } });
    expect(attempts).toBe(1);
    expect(down.captures).toEqual([]);
  });

  it('gathers the disk\'s local facts (base digest, base.1 info) while the replica connects; the digest is kept even when the replica fails', async () => {
    const w = world();
    let connected!: () => void;
    const gate = new Promise<void>((r) => (connected = r));
    const seen: string[] = [];
    const realFor = w.deps.replicaFor;
    w.deps.replicaFor = async (h) => {
      await gate;
      seen.push('connected');
      return realFor(h);
    };
    w.deps.digests.sha256 = async () => (seen.push('base digest'), { sha256: BASE_SHA, size: 100, identity: 'id', fromCache: false });
    w.deps.qemuImg.info = (async () => (seen.push('base.1 info'), { virtualSize: 1 << 20, bitmaps: [] })) as never;
    const cycle = runVmCycle(w.deps, req());
    for (let i = 0; i < 50 && seen.length < 2; i++) await new Promise((r) => setTimeout(r, 1));
    expect(seen.sort()).toEqual(['base digest', 'base.1 info']);
    connected();
    expect((await cycle)[0]).toMatchObject({ ok: true, mode: 'full' });

    // the replica refuses: the disk fails, and the base's digest (a whole-image read) is not lost with it
    const down = world();
    down.deps.replicaFor = async () => {
      throw new OnestorError(ErrorCodes.SSH, 'connect to replica: connection refused');
    };
    let hashed!: () => void;
    const hashGate = new Promise<void>((r) => (hashed = r));
    down.deps.digests.sha256 = async () => (await hashGate, { sha256: BASE_SHA, size: 100, identity: 'id', fromCache: false });
    const failing = runVmCycle(down.deps, req());
    setTimeout(hashed, 20);
    expect((await failing)[0]).toMatchObject({ ok: false, error: { code: ErrorCodes.SSH } });
    expect(down.state.baseDigests[disk.basePath]).toMatchObject({ sha256: BASE_SHA });
  });

  it('pull mode: the backup job ends once the last export has been read, before the publish', async () => {
    const w = world();
    const order: string[] = [];
    w.deps.seedMode = 'pull';
    w.deps.staging.capturePull = async (r) =>
      fakePullCapture(r, async () => {
        order.push('job end start');
        await new Promise((res) => setTimeout(res, 10));
        order.push('job end done');
      });
    const session = await (await w.deps.replicaFor('replica')).openDisk(42, 0);
    session.uploadStream = async (kind, src) => {
      for await (const _ of src.chunks) order.push(`read ${kind}`);
      return { bytes: src.size, resumedFrom: 0, digest: 'xxh64', hex: '0' };
    };
    const publish = session.publishFull;
    session.publishFull = async (a) => (order.push('publish'), publish(a));
    const [o] = await runVmCycle(w.deps, req());
    expect(o).toMatchObject({ ok: true, mode: 'full' });
    // once, started before the publish and finished before the cycle's end
    expect(order).toEqual(['read base1', 'job end start', 'publish', 'job end done']);
  });

  describe('a first seed in pull mode: the capture begins while the replica connects', () => {
    /** capturePull that records its calls; end() and the checkpoint it creates are seen in `events` */
    const pullWorld = (opts: Parameters<typeof world>[0] & { fail?: OnestorError } = {}) => {
      const w = world(opts);
      const events: string[] = [];
      w.deps.seedMode = 'pull';
      const lv = w.deps.libvirt as unknown as Record<string, (...a: unknown[]) => Promise<unknown>>;
      const names = lv['checkpointNames']!;
      const created: string[] = [];
      lv['checkpointNames'] = async (...a: unknown[]) => [...((await names(...a)) as string[]), ...created];
      const del = lv['checkpointDelete']!;
      lv['checkpointDelete'] = async (d: unknown, name: unknown) => {
        events.push(`delete ${name as string}`);
        created.splice(created.indexOf(name as string) >>> 0, created.includes(name as string) ? 1 : 0);
        return del(d, name);
      };
      lv['checkpointRedefine'] = async (_d: unknown, xml: unknown) => {
        events.push('redefine');
        created.push(/<name>([^<]+)<\/name>/.exec(xml as string)![1]!);
      };
      w.deps.staging.capturePull = async (r) => {
        events.push(`capturePull ${r.disks.map((d) => d.mode).join(',')}`);
        if (opts.fail) throw opts.fail;
        created.push(r.checkpointName);
        return fakePullCapture(r, async () => void events.push('job end'));
      };
      const capture = w.deps.staging.capture;
      w.deps.staging.capture = async (r) => (events.push(`capture ${r.disks.map((d) => d.mode).join(',')}`), capture(r));
      return { w, events };
    };
    const gatedReplica = (w: World, events: string[]) => {
      let open!: () => void;
      const gate = new Promise<void>((r) => (open = r));
      const realFor = w.deps.replicaFor;
      w.deps.replicaFor = async (h) => {
        await gate;
        events.push('replica connected');
        const port = await realFor(h);
        const session = await port.openDisk(42, 0);
        session.uploadStream = async (_kind, src) => {
          for await (const _ of src.chunks) events.push('read');
          return { bytes: src.size, resumedFrom: 0, digest: 'xxh64', hex: '0' };
        };
        return port;
      };
      return open;
    };

    it('a VM never protected here: captured before the replica answers, and that capture is the one streamed', async () => {
      const { w, events } = pullWorld();
      const open = gatedReplica(w, events);
      const cycle = runVmCycle(w.deps, req());
      for (let i = 0; i < 50 && !events.length; i++) await new Promise((r) => setTimeout(r, 1));
      expect(events).toEqual(['capturePull full']);
      open();
      const [o] = await cycle;
      expect(o).toMatchObject({ ok: true, mode: 'full' });
      expect(events).toEqual(['capturePull full', 'replica connected', 'read', 'job end']);
      expect(w.state.disks[diskKey(42, 0)]!.checkpoint).toBe(o!.checkpoint);
    });

    it('the replica holds a lineage: that capture ends and its checkpoint goes before the redefine, then the plan captures', async () => {
      const { w, events } = pullWorld({ onReplica: manifest('onestor-42-1-aaaaaa') });
      const open = gatedReplica(w, events);
      const cycle = runVmCycle(w.deps, req());
      for (let i = 0; i < 50 && !events.length; i++) await new Promise((r) => setTimeout(r, 1));
      open();
      const [o] = await cycle;
      expect(o).toMatchObject({ ok: true });
      const early = events.find((e) => e.startsWith('delete '))!;
      expect(events.slice(0, 5)).toEqual(['capturePull full', 'replica connected', 'job end', early, 'redefine']);
      // the plan's own capture, under a new checkpoint
      expect(events.slice(5).filter((e) => e.startsWith('capture'))).toHaveLength(1);
      expect(o!.checkpoint).not.toBe(early.slice('delete '.length));
    });

    it('no early capture when anything says a lineage may exist: a bitmap in base.1, a checkpoint in libvirt, a checkpoint in state', async () => {
      const cases: Array<(w: World) => void> = [
        (w) => (w.deps.qemuImg.info = (async () => ({ virtualSize: 1 << 20, bitmaps: ['onestor-42-1-aaaaaa'] })) as never),
        (w) => {
          const lv = w.deps.libvirt as unknown as Record<string, () => Promise<unknown>>;
          lv['checkpointNames'] = async () => ['foreign-checkpoint'];
        },
        (w) => (w.state.disks[diskKey(42, 0)] = { vmId: 42, diskId: 0, checkpoint: 'onestor-42-1-aaaaaa', base1Identity: '1:2', failCount: 0 }),
      ];
      for (const change of cases) {
        const { w, events } = pullWorld();
        change(w);
        const open = gatedReplica(w, events);
        const cycle = runVmCycle(w.deps, req());
        for (let i = 0; i < 20; i++) await new Promise((r) => setTimeout(r, 1));
        expect(events).toEqual([]);
        open();
        const [o] = await cycle;
        expect(o).toMatchObject({ ok: true, mode: 'full' });
        expect(events.slice(0, 2)).toEqual(['replica connected', 'capturePull full']);
      }
    });

    it('a migration stopping the seed while the replica connection is still coming up ends the job at once', async () => {
      const { w, events } = pullWorld();
      const stop = new AbortController();
      const capturePull = w.deps.staging.capturePull;
      w.deps.staging.capturePull = async (r) => {
        const c = await capturePull(r);
        const disks = c.disks.map((d) => ({
          ...d,
          stream: async function* () {
            if (stop.signal.aborted) throw stop.signal.reason as Error;
            yield Buffer.alloc(4);
          },
        }));
        return { ...c, disks, signal: stop.signal };
      };
      const open = gatedReplica(w, events);
      const cycle = runVmCycle(w.deps, req());
      for (let i = 0; i < 50 && !events.includes('capturePull full'); i++) await new Promise((r) => setTimeout(r, 1));
      stop.abort(new OnestorError(ErrorCodes.YIELDED, 'seed stopped: a migration wants the domain'));
      for (let i = 0; i < 50 && !events.includes('job end'); i++) await new Promise((r) => setTimeout(r, 1));
      expect(events).toEqual(['capturePull full', 'job end']);
      open();
      const [o] = await cycle;
      expect(o).toMatchObject({ ok: false, error: { code: ErrorCodes.YIELDED } });
    });

    it('an early capture that fails fails the seed with its error, tried once', async () => {
      const { w, events } = pullWorld({ fail: new OnestorError(ErrorCodes.NOSPACE, 'staging full') });
      const [o] = await runVmCycle(w.deps, req());
      expect(o).toMatchObject({ ok: false, error: { code: ErrorCodes.NOSPACE } });
      expect(events.filter((e) => e.startsWith('capture'))).toEqual(['capturePull full']);
    });
  });

  it('with leaseReplica: the cycle leases one connection per host, uses only it, and gives it back at the end (also on failure)', async () => {
    for (const failing of [false, true]) {
      const w = world();
      const realFor = w.deps.replicaFor;
      const events: string[] = [];
      w.deps.replicaFor = async () => {
        throw new Error('a cycle with leases must not use the shared connection');
      };
      w.deps.leaseReplica = async (h) => {
        events.push(`lease ${h}`);
        const port = await realFor(h);
        return { port: failing ? { ...port, status: async () => Promise.reject(new OnestorError(ErrorCodes.SSH, 'link cut')) } : port, release: () => void events.push(`release ${h}`) };
      };
      const [o] = await runVmCycle(w.deps, req());
      expect(o!.ok).toBe(!failing);
      expect(events).toEqual(['lease replica', 'release replica']);
    }
  });

  it('steady state: incremental from the confirmed checkpoint, which is retired after the publish', async () => {
    const state = emptyState(0);
    state.disks[diskKey(42, 0)] = { vmId: 42, diskId: 0, checkpoint: 'onestor-42-1-aaaaaa', base1Identity: '1:2', failCount: 0 };
    const w = world({ onReplica: manifest('onestor-42-1-aaaaaa'), libvirtCheckpoints: ['onestor-42-1-aaaaaa'], state });
    const [o] = await runVmCycle(w.deps, req());
    expect(o).toMatchObject({ ok: true, mode: 'incremental' });
    expect(w.captures[0]!.disks[0]).toMatchObject({ mode: 'incremental', parentCheckpoint: 'onestor-42-1-aaaaaa' });
    expect(w.uploads.map((u) => u.kind)).toEqual(['inc']);
    expect(w.published[0]).toMatchObject({ mode: 'incremental', parentCheckpoint: 'onestor-42-1-aaaaaa' });
    expect(w.deleted).toEqual(['onestor-42-1-aaaaaa']);
  });

  describe('abort while hashing the base image', () => {
    let dir: string;
    beforeAll(async () => {
      dir = await mkdtemp(path.join(os.tmpdir(), 'cycle-ports-'));
      await writeFile(path.join(dir, 'base'), Buffer.alloc(8 << 20, 7));
    });
    afterAll(() => rm(dir, { recursive: true, force: true }));

    it('is an abort (E_ABORTED, no failure recorded), not E_INTERNAL', async () => {
      const ac = new AbortController();
      // the real hashing adapter, aborted once it has started reading
      const w = world({
        sha256: (_f, cached, signal) => {
          const p = cachedSha256(path.join(dir, 'base'), cached, signal);
          ac.abort();
          return p;
        },
      });
      const [o] = await runVmCycle(w.deps, req(ac.signal));
      expect(o).toMatchObject({ ok: false, error: { code: ErrorCodes.ABORTED } });
      expect(w.captures).toEqual([]);
      const d = w.state.disks[diskKey(42, 0)];
      expect(d?.failCount ?? 0).toBe(0);
      expect(d?.lastError).toBeUndefined();
      expect(w.lockHeld).toBe(false);
    });
  });

  it('a transfer past limits.transferTimeoutSec fails the disk with E_TIMEOUT (counted), unlike an abort', async () => {
    const w = world({
      transferTimeoutMs: 30,
      // like the real client: stops between chunks when its signal fires
      upload: (_k, _f, o) =>
        new Promise((_resolve, reject) => {
          o.signal?.addEventListener('abort', () => reject(new OnestorError(ErrorCodes.ABORTED, 'upload aborted')));
        }),
    });
    const [o] = await runVmCycle(w.deps, req());
    expect(o).toMatchObject({ ok: false, error: { code: ErrorCodes.TIMEOUT } });
    expect(w.state.disks[diskKey(42, 0)]).toMatchObject({ failCount: 1, lastError: { code: ErrorCodes.TIMEOUT } });
    expect(w.calls).toContain('close');
  });

  it('the VM lock not acquired: every disk fails with the lock error, nothing captured', async () => {
    const w = world({
      lockVm: async () => {
        throw new OnestorError(ErrorCodes.LOCK_TIMEOUT, 'held');
      },
    });
    const [o] = await runVmCycle(w.deps, req());
    expect(o).toMatchObject({ ok: false, error: { code: ErrorCodes.LOCK_TIMEOUT } });
    expect(o!.error!.message).toMatch(/another cycle of VM 42/);
    expect(w.captures).toEqual([]);
  });
});

describe('cycleLeases (one cycle\'s replica sessions)', () => {
  it('one lease per host for the cycle; a session that ended is given back and replaced; a failed lease is retried; all released once', async () => {
    const events: string[] = [];
    let n = 0;
    let failNext = false;
    const ports: Array<{ connected: boolean }> = [];
    const leases = cycleLeases(async (host) => {
      if (failNext) {
        failNext = false;
        events.push(`lease ${host} failed`);
        throw new Error('connection refused');
      }
      const id = ++n;
      const port = { connected: true, status: async () => [], openDisk: async () => Promise.reject(new Error('unused')) };
      ports.push(port);
      events.push(`lease ${host} #${id}`);
      return { port, release: () => void events.push(`release #${id}`) };
    });
    const a1 = await leases.replicaFor('r1');
    expect(await leases.replicaFor('r1')).toBe(a1);
    const b1 = await leases.replicaFor('r2');
    expect(b1).not.toBe(a1);
    // r1's session ends (an upload gave way): the next use gets a new one, the dead one goes back
    ports[0]!.connected = false;
    const a2 = await leases.replicaFor('r1');
    expect(a2).not.toBe(a1);
    expect(events).toEqual(['lease r1 #1', 'lease r2 #2', 'release #1', 'lease r1 #3']);
    // a lease that fails holds nothing: the next use tries again
    ports[2]!.connected = false;
    failNext = true;
    await expect(leases.replicaFor('r1')).rejects.toThrow(/refused/);
    const a3 = await leases.replicaFor('r1');
    expect(a3).toBe(ports[3]);
    await leases.releaseAll();
    expect(events.slice(4)).toEqual(['release #3', 'lease r1 failed', 'lease r1 #4', 'release #2', 'release #4']);
  });
});
