/** The NBD client against a real `qemu-nbd` (read-only export of a qcow2 with known contents). */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { run } from '../../lib/shared/exec.js';
import { NbdClient } from '../../lib/libvirt/nbd-client.js';
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from '../../lib/libvirt/nbd-protocol.js';

const MiB = 1 << 20;
let dir: string;
let sock: string;
let server: ChildProcess;

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'nbdc-'));
  const img = path.join(dir, 'img.qcow2');
  sock = path.join(dir, 'nbd.sock');
  for (const args of [
    ['create', '-q', '-f', 'qcow2', img, '64M'],
  ]) expect((await run('qemu-img', args)).code).toBe(0);
  const io = await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x55 1M 3M', '-c', 'write -z 8M 1M', '-c', 'write -P 0x66 60M 4M', img]);
  expect(io.code, io.stderr).toBe(0);
  // -t: keep serving after a client leaves; -A: qemu:allocation-depth as well
  server = spawn('qemu-nbd', ['-t', '-r', '-A', '-f', 'qcow2', '-x', 'e1', '-k', sock, img], { stdio: 'ignore' });
  // ready when a connection is accepted: the socket file exists from bind(), a moment before listen()
  const accepts = () =>
    new Promise<boolean>((resolve) => {
      const c = net.connect(sock);
      c.once('connect', () => (c.destroy(), resolve(true)));
      c.once('error', () => resolve(false));
    });
  for (let i = 0; i < 200 && !(await accepts()); i++) await new Promise((r) => setTimeout(r, 50));
});

afterAll(async () => {
  server?.kill('SIGTERM');
  await rm(dir, { recursive: true, force: true });
});

describe('NbdClient against qemu-nbd', () => {
  it('maps both contexts and reads what was written, many requests in flight', async () => {
    const c = await NbdClient.connect({ socketPath: sock, exportName: 'e1', metaContexts: ['base:allocation', 'qemu:allocation-depth'] });
    try {
      expect(c.size).toBe(64 * MiB);
      const alloc = await c.map('base:allocation');
      expect(alloc.filter((e) => !(e.flags & NBD_STATE_ZERO)).map((e) => [e.offset, e.length])).toEqual([
        [1 * MiB, 3 * MiB],
        [60 * MiB, 4 * MiB],
      ]);
      expect(alloc.every((e) => e.flags & NBD_STATE_ZERO || !(e.flags & NBD_STATE_HOLE))).toBe(true);
      const depth = await c.map('qemu:allocation-depth');
      // the written-zero MiB at 8M is allocated in the image (a zero cluster), unlike the rest of the holes
      expect(depth.filter((e) => e.flags === 1).map((e) => [e.offset, e.length])).toEqual([
        [1 * MiB, 3 * MiB],
        [8 * MiB, 1 * MiB],
        [60 * MiB, 4 * MiB],
      ]);
      const reads = await Promise.all(Array.from({ length: 32 }, (_, i) => c.read(i * 2 * MiB, 2 * MiB)));
      const whole = Buffer.concat(reads);
      expect(whole.subarray(1 * MiB, 4 * MiB).every((b) => b === 0x55)).toBe(true);
      expect(whole.subarray(60 * MiB).every((b) => b === 0x66)).toBe(true);
      expect(whole.subarray(4 * MiB, 60 * MiB).every((b) => b === 0)).toBe(true);
    } finally {
      await c.close();
    }
  });

  it('an unknown export is a clear E_NBD error; a request beyond the export is refused before it is sent', async () => {
    await expect(NbdClient.connect({ socketPath: sock, exportName: 'nope' })).rejects.toMatchObject({ code: 'E_NBD', message: expect.stringMatching(/export "nope"/) });
    const c = await NbdClient.connect({ socketPath: sock, exportName: 'e1' });
    await expect(c.read(64 * MiB - 512, 1024)).rejects.toThrow(/outside the export/);
    await expect(c.blockStatus('base:allocation', 0, 512)).rejects.toThrow(/not negotiated/);
    await c.close();
  });

  it('an abort fails the reads in flight with E_ABORTED and closes the connection', async () => {
    const ac = new AbortController();
    const c = await NbdClient.connect({ socketPath: sock, exportName: 'e1', signal: ac.signal });
    const inflight = Array.from({ length: 16 }, (_, i) => c.read(i * 4 * MiB, 4 * MiB));
    ac.abort();
    const results = await Promise.allSettled(inflight);
    expect(results.some((r) => r.status === 'rejected' && (r.reason as { code?: string }).code === 'E_ABORTED')).toBe(true);
    await expect(c.read(0, 512)).rejects.toMatchObject({ code: 'E_ABORTED' });
  });

  it('a missing socket is a clear error naming it', async () => {
    await expect(NbdClient.connect({ socketPath: path.join(dir, 'gone.sock'), exportName: 'e1' })).rejects.toThrow(/cannot connect to .*gone\.sock/);
  });
});
