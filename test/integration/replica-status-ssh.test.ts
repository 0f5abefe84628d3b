/**
 * `status` of every VM with hundreds of manifests, through the agent's real ssh2 client, the real sshd with
 * the restricted forced command and the real receiver process: the client follows the receiver's pages.
 */
import * as fsp from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ReplicaClient } from '../../lib/transfer/replica-client.js';
import { writeManifestTree } from '../helpers/manifest-tree.js';
import { startSshd, type Sshd } from '../../dev/sshd.js';
import { ensureDistBuilt } from '../helpers/build-dist.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const entry = path.join(repoRoot, 'dist', 'agent', 'receiver-main.js');


let sshd: Sshd;
let expected: Array<[number, number]> = [];

beforeAll(async () => {
  await ensureDistBuilt();
  sshd = await startSshd();
  await sshd.setAuthorizedKeys([
    `command="${process.execPath} ${entry} --snaps-dir ${sshd.replicaDir} --lock-timeout 5 --max-sessions 2 --busy-wait 5 --host hv-test",restrict ${sshd.clientPublicKey}`,
  ]);
  await fsp.mkdir(sshd.replicaDir, { recursive: true });
  expected = await writeManifestTree(sshd.replicaDir, 160, 2); // 320 manifests, ~190 KiB of JSON
}, 300_000);

afterAll(async () => {
  await sshd?.stop();
});

describe('paged status over ssh', () => {
  it('320 manifests arrive whole and in order through the restricted key; the session stays usable', async () => {
    const client = await ReplicaClient.connect({
      host: sshd.host,
      port: sshd.port,
      username: sshd.user,
      privateKey: sshd.clientKeyPath,
      knownHostsFile: sshd.knownHostsPath,
      acceptNewHostKey: false,
      receiverCommand: 'onestor-agent receive',
      connectTimeoutMs: 10_000,
      localHost: 'hv-test',
    });
    try {
      const all = await client.status();
      expect(all.map((m) => [m.vmId, m.diskId])).toEqual(expected);
      expect(new Set(all.map((m) => m.checkpoint)).size).toBe(320);
      // one VM, as rebuild-from-replicas asks, and a request after the paged one on the same channel
      expect((await client.status(70)).map((m) => m.diskId)).toEqual([0, 3]);
      const d = await client.openDisk(70, 3);
      expect(d.manifest?.checkpoint).toBe(all.find((m) => m.vmId === 70 && m.diskId === 3)?.checkpoint);
      await d.close();
    } finally {
      await client.close();
    }
  }, 120_000);
});
