/**
 * `status` of every VM on a replica holding hundreds of manifests: the real receiver pages it, the real
 * client follows the pages. Manifests are written beside real (tiny) base/base.1 files so they validate.
 */
import * as fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MAX_CONTROL_BYTES } from '../../lib/protocol/protocol.js';
import { statusPage } from '../../lib/replica/status-page.js';
import { writeManifestTree } from '../helpers/manifest-tree.js';
import { clientSession, rawPeer } from '../helpers/receiver-session.js';

let snaps: string;
const VMS = 170;
const DISKS = 2; // 340 manifests, ~600 bytes each: ~200 KiB, several pages
const expected: Array<[number, number]> = [];

beforeAll(async () => {
  snaps = await fsp.mkdtemp(path.join(os.tmpdir(), 'onestor-paging-'));
  expected.push(...(await writeManifestTree(snaps, VMS, DISKS)));
  // noise that must be skipped, not counted: an invalid manifest, a non-numeric dir
  await fsp.writeFile(path.join(snaps, '7', '.onestor', 'disk.1.json'), '{"broken":');
  await fsp.mkdir(path.join(snaps, 'not-a-vm', '.onestor'), { recursive: true });
});
afterAll(async () => {
  await fsp.rm(snaps, { recursive: true, force: true });
});

describe('status in pages', () => {
  it('the client gets every manifest of every VM, in order, over several pages that each fit a frame', async () => {
    const s = await clientSession(snaps);
    const all = await s.conn.status();
    expect(all.map((m) => [m.vmId, m.diskId])).toEqual(expected);
    const asks = s.sent.filter((m) => m.type === 'status');
    expect(asks.length).toBeGreaterThanOrEqual(3);
    expect(asks[0]!.after).toBeNull();
    // one VM only: one page
    expect((await s.conn.status(14)).map((m) => [m.vmId, m.diskId])).toEqual([[14, 0], [14, 3]]);
    await s.conn.bye();
    expect(await s.done).toBe(0);
  });

  it('every page is under the frame cap and pages neither overlap nor skip', async () => {
    let after = null;
    const seen: Array<[number, number]> = [];
    for (let i = 0; i < 50; i++) {
      const page = await statusPage(snaps, { after });
      expect(Buffer.byteLength(JSON.stringify({ type: 'ok', manifests: page.manifests, next: page.next }))).toBeLessThanOrEqual(MAX_CONTROL_BYTES);
      seen.push(...page.manifests.map((m): [number, number] => [m.vmId, m.diskId]));
      if (!page.next) break;
      after = page.next;
    }
    expect(seen).toEqual(expected);
  });

  it('an agent from before paging gets E_INTERNAL (not E_PROTOCOL) and its session goes on', async () => {
    const peer = rawPeer(snaps);
    expect((await peer.ask({ type: 'hello', protocol: 1, agentVersion: 'old', host: 'hv1' })).type).toBe('ok');
    const r = await peer.ask({ type: 'status' });
    expect(r).toMatchObject({ type: 'error', code: 'E_INTERNAL' });
    expect(String(r.message)).toMatch(/page/);
    // a request that fits still works for it, without a cursor in the reply
    const one = await peer.ask({ type: 'status', vm: 21 });
    expect(one.type).toBe('ok');
    expect(one).not.toHaveProperty('next');
    expect((one.manifests as unknown[]).length).toBe(2);
    expect((await peer.ask({ type: 'bye' })).type).toBe('ok');
    expect(await peer.done).toBe(0);
  });
});
