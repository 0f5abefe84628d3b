/**
 * OpenNebula's own recovery-snapshot method, written from its description (issue 4 / DESIGN.md §1), as the
 * reference the agent is measured against. Per disk and cycle:
 *   1. `virsh snapshot-create-as DOM --disk-only --atomic --no-metadata --diskspec vdX,file=OVERLAY`:
 *      an external overlay goes on top of the running base.1, which is frozen from then on;
 *   2. `rsync` of the frozen base.1 over ssh into SNAPS/VMID/disk.N.snap/base.1 (base once, when missing);
 *   3. `virsh blockcommit DOM vdX --base BASE1 --top OVERLAY --active --pivot --wait` — ALWAYS with the
 *      explicit --base: without it the commit would go down into `base`, the image itself;
 *   4. remove the overlay.
 * The active image of the disk is read after each step, so the chain changes are counted, not assumed.
 */
import { rm } from 'node:fs/promises';
import path from 'node:path';
import type { Libvirtd } from '../../dev/libvirtd.js';
import { domainDiskSources } from '../../dev/one-layout.js';
import { sh, q, type PlainSsh } from './cluster.js';

export interface UpstreamDisk {
  domain: string;
  target: string;
  vmId: number;
  diskId: number;
  snapDir: string;
  basePath: string;
  base1Path: string;
}

export interface UpstreamCycleResult {
  seconds: number;
  steps: { snapshot: number; rsync: number; blockcommit: number; cleanup: number };
  /** times the disk's active image changed during the cycle (overlay on, pivot back) */
  chainChanges: number;
  /** blockcommit pivots */
  pivots: number;
  /** rsync --stats "Total bytes sent" (payload as rsync counts it) */
  rsyncBytesSent: number;
  sentBase: boolean;
}

async function activeSource(lv: Libvirtd, domain: string, target: string): Promise<string> {
  const source = (await domainDiskSources(lv, domain)).get(target);
  if (!source) throw new Error(`${domain} has no disk ${target}`);
  return source;
}

async function virshOk(lv: Libvirtd, args: string[]): Promise<void> {
  const r = await lv.virsh(args, { timeoutMs: 600_000 });
  if (r.code !== 0) throw new Error(`virsh ${args.join(' ')}: ${r.stderr.trim() || r.stdout.trim()}`);
}

function rsyncTotalSent(stats: string): number {
  const m = /Total bytes sent:\s*([\d,.]+)/.exec(stats);
  return m ? Number(m[1]!.replace(/[,.]/g, '')) : NaN;
}

/** One upstream cycle for one disk; `snapsDir` is REPLICA_RECOVERY_SNAPS_DIR on the replica reached by `ssh`. */
export async function upstreamCycle(lv: Libvirtd, disk: UpstreamDisk, ssh: PlainSsh, snapsDir: string): Promise<UpstreamCycleResult> {
  const t0 = performance.now();
  const overlay = path.join(path.dirname(disk.snapDir), `disk.${disk.diskId}.recovery-overlay.qcow2`);
  const remoteSnap = path.join(snapsDir, String(disk.vmId), `disk.${disk.diskId}.snap`);
  const remote = (p: string) => `${ssh.target}:${q(p)}`;
  let chainChanges = 0;
  let pivots = 0;
  let top = await activeSource(lv, disk.domain, disk.target);
  if (path.resolve(top) !== path.resolve(disk.base1Path)) throw new Error(`${disk.domain} ${disk.target} does not run on base.1 (runs on ${top})`);
  const noteTop = async () => {
    const now = await activeSource(lv, disk.domain, disk.target);
    if (now !== top) chainChanges++;
    top = now;
  };

  const ts0 = performance.now();
  await virshOk(lv, ['snapshot-create-as', disk.domain, '--disk-only', '--atomic', '--no-metadata', '--diskspec', `${disk.target},file=${overlay},snapshot=external`]);
  await noteTop();
  if (path.resolve(top) !== path.resolve(overlay)) throw new Error(`after snapshot-create-as ${disk.target} runs on ${top}, expected ${overlay}`);
  const ts1 = performance.now();

  let rsyncBytesSent = 0;
  let sentBase = false;
  let committed = false;
  try {
    // Layout on the replica as upstream leaves it: dir, self-link, disk.N link; base only when missing.
    const missing = (
      await sh(
        `ssh ${ssh.args.map(q).join(' ')} ${ssh.target} ${q(
          `mkdir -p ${q(remoteSnap)} && ln -sfn . ${q(path.join(remoteSnap, `disk.${disk.diskId}.snap`))} && ` +
            `ln -sfn ${q(`disk.${disk.diskId}.snap/base.1`)} ${q(path.join(snapsDir, String(disk.vmId), `disk.${disk.diskId}`))} && ` +
            `{ test -f ${q(path.join(remoteSnap, 'base'))} || echo missing; }`,
        )}`,
      )
    ).trim();
    if (missing === 'missing') {
      rsyncBytesSent += rsyncTotalSent(await sh(`rsync --stats -e ${q(ssh.rsh)} ${q(disk.basePath)} ${remote(path.join(remoteSnap, 'base'))}`));
      sentBase = true;
    }
    // -I: never let rsync's size+mtime quick check skip a base.1 that changed within the same second.
    rsyncBytesSent += rsyncTotalSent(await sh(`rsync -I --stats -e ${q(ssh.rsh)} ${q(disk.base1Path)} ${remote(path.join(remoteSnap, 'base.1'))}`));
    const ts2 = performance.now();

    await virshOk(lv, ['blockcommit', disk.domain, disk.target, '--base', disk.base1Path, '--top', overlay, '--active', '--pivot', '--wait']);
    committed = true;
    pivots++;
    await noteTop();
    if (path.resolve(top) !== path.resolve(disk.base1Path)) throw new Error(`after blockcommit ${disk.target} runs on ${top}, expected base.1`);
    const ts3 = performance.now();
    await rm(overlay, { force: true });
    const ts4 = performance.now();
    return {
      seconds: (ts4 - t0) / 1000,
      steps: { snapshot: (ts1 - ts0) / 1000, rsync: (ts2 - ts1) / 1000, blockcommit: (ts3 - ts2) / 1000, cleanup: (ts4 - ts3) / 1000 },
      chainChanges,
      pivots,
      rsyncBytesSent,
      sentBase,
    };
  } finally {
    if (!committed) {
      // Upstream's failure mode: a VM left on a stray overlay. Put it back so the bench can go on.
      await lv.virsh(['blockcommit', disk.domain, disk.target, '--base', disk.base1Path, '--top', overlay, '--active', '--pivot', '--wait'], { timeoutMs: 600_000 });
      await rm(overlay, { force: true });
    }
  }
}
