/**
 * Space reservations across receiver sessions: each session is its own receiver process (as under sshd),
 * SNAPS a small tmpfs so the limit is exact and nobody else's files move it. Declared-but-unpublished
 * bytes of every live session count against REPLICA_MAX_USED_PERC; a killed session's go with its slot.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { run } from '../../lib/shared/exec.js';
import { FrameDecoder, encodeControl, encodeData } from '../../lib/protocol/protocol.js';
import { ensureDistBuilt } from '../helpers/build-dist.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const entry = path.join(repoRoot, 'dist', 'agent', 'receiver-main.js');
const MiB = 1024 * 1024;


let work: string;
let snaps: string;
const children: ChildProcess[] = [];

beforeAll(async () => {
  await ensureDistBuilt();
  work = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-space-'));
  snaps = path.join(work, 'snaps');
  await fsp.mkdir(snaps);
  const m = await run('mount', ['-t', 'tmpfs', '-o', 'size=64m,mode=0755', 'onestor-test-ledger', snaps]);
  if (m.code !== 0) throw new Error(`mount tmpfs: ${m.stderr}`);
}, 300_000);

afterAll(async () => {
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
  await run('umount', ['-l', snaps]);
  await fsp.rm(work, { recursive: true, force: true });
});

/** A receiver process and a peer speaking raw frames to it over its stdio. */
function receiverProcess() {
  const child = spawn(process.execPath, [entry, '--snaps-dir', snaps, '--host', 'hv-test', '--max-used-percent', '90', '--max-sessions', '8', '--busy-wait', '0', '--lock-timeout', '5'], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  children.push(child);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  const decoder = new FrameDecoder();
  const replies: unknown[] = [];
  const waiting: ((v: unknown) => void)[] = [];
  child.stdout!.on('data', (c: Buffer) => {
    for (const f of decoder.push(c)) {
      if (f.type !== 'control') continue;
      const w = waiting.shift();
      if (w) w(f.message);
      else replies.push(f.message);
    }
  });
  const next = () => (replies.length ? Promise.resolve(replies.shift()) : new Promise<unknown>((r) => waiting.push(r)));
  return {
    child,
    exited,
    stderr: () => stderr,
    async ask(msg: object): Promise<Record<string, unknown>> {
      child.stdin!.write(encodeControl(msg));
      return (await next()) as Record<string, unknown>;
    },
    async sendData(buf: Buffer): Promise<void> {
      for (let o = 0; o < buf.length; o += 1 * MiB) {
        const [h, p] = encodeData(buf.subarray(o, o + MiB));
        child.stdin!.write(h);
        if (!child.stdin!.write(p)) await new Promise((r) => child.stdin!.once('drain', r));
      }
    },
  };
}

async function greeted(vm: number) {
  const r = receiverProcess();
  expect(await r.ask({ type: 'hello', protocol: 1, agentVersion: 'test', host: `hv${vm}` })).toMatchObject({ type: 'ok' });
  expect(await r.ask({ type: 'open', vm, disk: 0 })).toMatchObject({ type: 'ok' });
  return r;
}

describe('replica space reservations across receiver processes', () => {
  it('sessions whose declared sizes together pass the limit: the later one is refused up front, the earlier ones complete', async () => {
    // 64 MiB tmpfs, limit 90% = 57.6 MiB: three declarations of 18 MiB fit (54), a fourth does not (72)
    const sessions = [await greeted(1), await greeted(2), await greeted(3)];
    for (const [i, s] of sessions.entries()) {
      expect(await s.ask({ type: 'put', kind: 'base', size: 18 * MiB, key: `base-${i}` }), s.stderr()).toMatchObject({ type: 'ok', offset: 0 });
    }
    const late = await greeted(4);
    const refused = await late.ask({ type: 'put', kind: 'base', size: 18 * MiB, key: 'base-late' });
    expect(refused).toMatchObject({ type: 'error', code: 'E_NOSPACE' });
    expect(String(refused.message)).toMatch(/reserved by other sessions/);
    // nothing was written for the refused one, the filesystem still has the room the others declared
    expect((await fsp.statfs(snaps)).bavail * (await fsp.statfs(snaps)).bsize).toBeGreaterThan(54 * MiB);

    // the accepted ones send their bytes: no ENOSPC, every upload verified
    for (const [i, s] of sessions.entries()) {
      const data = Buffer.alloc(18 * MiB, 0x40 + i);
      await s.sendData(data);
      expect(await s.ask({ type: 'end', sha256: createHash('sha256').update(data).digest('hex') }), s.stderr()).toMatchObject({ type: 'ok', bytes: 18 * MiB });
    }
    for (const s of [...sessions, late]) {
      expect(await s.ask({ type: 'bye' })).toMatchObject({ type: 'ok' });
      s.child.stdin!.end();
      expect(await s.exited).toBe(0);
    }
    // every session gave its reservation back on the way out
    expect((await fsp.readdir(path.join(snaps, '.onestor', 'slots'))).filter((n) => n.endsWith('.resv'))).toEqual([]);
    await fsp.rm(path.join(snaps, '.onestor', 'tmp'), { recursive: true, force: true });
  }, 120_000);

  it("a SIGKILLed session's reservation is released with its slot lock", async () => {
    const big = await greeted(10);
    expect(await big.ask({ type: 'put', kind: 'base', size: 40 * MiB, key: 'big' })).toMatchObject({ type: 'ok' });
    const other = await greeted(11);
    expect(await other.ask({ type: 'put', kind: 'base', size: 20 * MiB, key: 'small' })).toMatchObject({ type: 'error', code: 'E_NOSPACE' });
    big.child.kill('SIGKILL');
    await big.exited;
    // its ledger file is still there (nobody cleaned up), but its slot is no longer locked: it does not count
    const slots = await fsp.readdir(path.join(snaps, '.onestor', 'slots'));
    expect(slots.filter((n) => n.endsWith('.resv')).length).toBe(1);
    // the lock child of the killed process notices its parent is gone within a moment
    let reply: Record<string, unknown> = {};
    for (let i = 0; i < 50; i++) {
      reply = await other.ask({ type: 'put', kind: 'base', size: 20 * MiB, key: 'small' });
      if (reply.type === 'ok') break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(reply).toMatchObject({ type: 'ok', offset: 0 });
    other.child.kill('SIGKILL');
    await other.exited;
    const stale = async () => (await fsp.readdir(path.join(snaps, '.onestor', 'slots'))).filter((n) => n.endsWith('.resv'));
    expect((await stale()).length).toBe(2);
    // a new session taking one of those slots removes the stale ledger file of its previous holder
    const fresh = await greeted(12);
    expect((await stale()).length).toBe(1);
    expect(await fresh.ask({ type: 'bye' })).toMatchObject({ type: 'ok' });
    fresh.child.stdin!.end();
    await fresh.exited;
  }, 120_000);
});
