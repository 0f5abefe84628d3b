/** `open` of disks that never get data leaves nothing on the replica (finding 4 of issue 10). */
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { clientSession, rawPeer } from '../helpers/receiver-session.js';

let root: string;
beforeAll(async () => {
  root = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-litter-'));
});
afterAll(async () => {
  await fsp.rm(root, { recursive: true, force: true });
});

/** Every path under dir, relative ('' when empty). */
async function tree(dir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string) => {
    for (const e of await fsp.readdir(d, { withFileTypes: true })) {
      out.push(path.relative(dir, path.join(d, e.name)));
      if (e.isDirectory()) await walk(path.join(d, e.name));
    }
  };
  await walk(dir);
  return out.sort();
}

describe('open of ids that never get data', () => {
  it('200 opens and closes leave no tmp dir, no lock file, no VM dir', async () => {
    const snaps = path.join(root, 'snaps-200');
    const s = await clientSession(snaps);
    const before = await tree(snaps); // what hello itself keeps: the slot files
    for (let i = 0; i < 200; i++) {
      const d = await s.conn.openDisk(100000 + i, i % 5);
      expect(d.manifest).toBeNull();
      await d.close();
    }
    await s.conn.bye();
    expect(await s.done).toBe(0);
    const after = await tree(snaps);
    // what is left is per replica, not per id: the locks and slots dirs, at most maxSessions (4) slot
    // files (slots are taken at open), and the sweep's stamp and lock
    const perReplica = (p: string) =>
      ['.onestor', '.onestor/locks', '.onestor/slots'].includes(p) || /^\.onestor\/slots\/slot\.[0-3]$/.test(p) || p.startsWith('.onestor/sweep.');
    expect(after.filter((p) => !before.includes(p) && !perReplica(p))).toEqual([]);
    expect(after.length).toBeLessThanOrEqual(before.length + 3 + 4 + 2);
    expect(await fsp.readdir(path.join(snaps, '.onestor', 'locks'))).toEqual([]);
  });

  it('a session that ends with the disk still open (bye, or the channel cut) leaves nothing either', async () => {
    const snaps = path.join(root, 'snaps-cut');
    const s = await clientSession(snaps);
    await s.conn.openDisk(5, 0);
    await s.conn.bye();
    expect(await s.done).toBe(0);
    const peer = rawPeer(snaps);
    await peer.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'hv1' });
    expect((await peer.ask({ type: 'open', vm: 6, disk: 1 })).type).toBe('ok');
    peer.cut();
    await peer.done;
    expect(await fsp.readdir(path.join(snaps, '.onestor', 'locks'))).toEqual([]);
    expect(await fsp.readdir(path.join(snaps, '.onestor', 'tmp')).catch(() => [])).toEqual([]);
    expect((await tree(snaps)).filter((p) => /^\d/.test(p))).toEqual([]);
  });

  it('a put that is refused keeps nothing; a cut upload keeps its partial (for a resume) but no lock file', async () => {
    const snaps = path.join(root, 'snaps-put');
    const peer = rawPeer(snaps, { maxUsedPercent: 1 });
    await peer.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'hv1' });
    await peer.ask({ type: 'open', vm: 8, disk: 0 });
    expect(await peer.ask({ type: 'put', kind: 'base1', size: 1 << 20, key: 'k1' })).toMatchObject({ type: 'error', code: 'E_NOSPACE' });
    expect((await peer.ask({ type: 'close' })).type).toBe('ok');
    expect(await fsp.readdir(path.join(snaps, '.onestor', 'tmp')).catch(() => [])).toEqual([]);
    await peer.ask({ type: 'bye' });
    await peer.done;

    const p2 = rawPeer(snaps, { spaceCheck: false });
    await p2.ask({ type: 'hello', protocol: 1, agentVersion: 't', host: 'hv1' });
    await p2.ask({ type: 'open', vm: 8, disk: 0 });
    expect(await p2.ask({ type: 'put', kind: 'base1', size: 1 << 20, key: 'k2' })).toMatchObject({ type: 'ok', offset: 0 });
    p2.cut();
    await p2.done;
    expect(await fsp.readdir(path.join(snaps, '.onestor', 'tmp', '8-0'))).toEqual(['up.k2']);
    expect(await fsp.readdir(path.join(snaps, '.onestor', 'locks'))).toEqual([]);
  });
});
