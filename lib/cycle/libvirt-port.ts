/**
 * The libvirt operations the cycle needs, expressed over the typed `virsh` adapter. Kept separate so
 * capture/cycle depend on a narrow port (what they use), not on every virsh command.
 */
import { Virsh, virshErrorKind } from '../libvirt/virsh.js';
import type { CycleLibvirt } from './cycle.js';
import type { DomainView } from './capture.js';
import { parseNodeBitmaps, type NodeBitmaps } from '../libvirt/bitmaps.js';

export class VirshPort implements CycleLibvirt {
  constructor(readonly virsh: Virsh) {}

  async domainView(dom: string): Promise<DomainView> {
    const { parsed } = await this.virsh.dumpXml(dom);
    return {
      disks: parsed.disks.filter((d) => d.device === 'disk').map((d) => ({ target: d.target, source: d.source })),
      hasGuestAgentChannel: parsed.hasGuestAgentChannel,
    };
  }

  async domainRunning(dom: string): Promise<boolean> {
    try {
      return (await this.virsh.domainState(dom)).state === 'running';
    } catch (e) {
      if (virshErrorKind(e) === 'no-domain') return false;
      throw e;
    }
  }

  async backupBegin(dom: string, backupXml: string, checkpointXml: string, reuseExternal: boolean): Promise<void> {
    await this.virsh.backupBegin(dom, backupXml, checkpointXml, { reuseExternal });
  }

  async jobActive(dom: string): Promise<boolean> {
    return (await this.virsh.domJobInfo(dom)).type !== 'None';
  }

  async completedJobError(dom: string): Promise<string | null> {
    // kept, not cleared: a read that can be repeated is a query the virsh shell may answer (the next job's
    // end replaces them)
    const j = await this.virsh.domJobInfo(dom, { completed: true, keepCompleted: true });
    if (j.type === 'Failed' || j.type === 'Cancelled') return j.errorMessage ?? `job ${j.type.toLowerCase()}`;
    if (j.success === false || j.errorMessage) return j.errorMessage ?? 'job did not succeed';
    return null;
  }

  async abortJob(dom: string): Promise<void> {
    await this.virsh.domJobAbort(dom);
  }

  async backupTargets(dom: string): Promise<string[]> {
    return this.virsh.backupTargets(dom);
  }

  async backupDumpXml(dom: string): Promise<string | null> {
    return this.virsh.backupDumpXml(dom);
  }

  async fsFreeze(dom: string): Promise<{ frozen: true } | { frozen: false; why: string }> {
    const r = await this.virsh.fsFreeze(dom);
    return r.ok ? { frozen: true } : { frozen: false, why: `${r.kind}: ${r.message}` };
  }

  async fsThaw(dom: string): Promise<void> {
    await this.virsh.fsThaw(dom);
  }

  /** Oldest first, parents before children (what checkpoint retirement needs to go leaf first). */
  async checkpointNames(dom: string): Promise<string[]> {
    const list = await this.virsh.checkpointList(dom);
    const byName = new Map(list.map((c) => [c.name, c]));
    const depth = (name: string): number => {
      let n = 0;
      for (let c = byName.get(name); c?.parent && n < 10_000; c = byName.get(c.parent)) n++;
      return n;
    };
    return list
      .map((c) => ({ name: c.name, depth: depth(c.name), t: c.creationTime }))
      .sort((a, b) => a.depth - b.depth || a.t - b.t)
      .map((c) => c.name);
  }

  async checkpointDelete(dom: string, name: string, opts: { metadataOnly?: boolean } = {}): Promise<void> {
    await this.virsh.checkpointDelete(dom, name, opts);
  }

  /** A bitmap disk without `size` under --size means libvirt could not read the bitmap (QEMU crash). */
  async checkpointBitmapHealthy(dom: string, name: string, target: string): Promise<boolean> {
    const { parsed } = await this.virsh.checkpointXml(dom, name, { noDomain: true, size: true });
    const d = parsed.disks.find((x) => x.name === target);
    return d !== undefined && d.checkpoint === 'bitmap' && typeof d.size === 'number';
  }

  async checkpointXml(dom: string, name: string): Promise<string> {
    return (await this.virsh.checkpointXml(dom, name, { noDomain: true })).xml;
  }

  async checkpointRedefine(dom: string, xml: string): Promise<void> {
    await this.virsh.checkpointCreateRedefine(dom, xml);
  }

  async domainId(dom: string): Promise<number | null> {
    try {
      return await this.virsh.domainId(dom);
    } catch (e) {
      if (virshErrorKind(e) === 'no-domain') return null;
      throw e;
    }
  }

  async diskBitmaps(dom: string, file: string): Promise<NodeBitmaps | null> {
    return parseNodeBitmaps(await this.virsh.qemuMonitorCommand(dom, { execute: 'query-named-block-nodes', arguments: { flat: true } }), file);
  }

  /**
   * libvirt first: a bitmap it does not know is given a checkpoint definition (redefine) and that
   * checkpoint deleted, which makes libvirt drop the bitmap itself (no parent to merge into). When libvirt
   * refuses (e.g. an inconsistent bitmap), QMP block-dirty-bitmap-remove on the qcow2 node.
   */
  async removeBitmap(dom: string, target: string, node: string, name: string): Promise<string> {
    // libvirt 9.0 refuses a redefinition without creationTime ("missing creationTime from existing
    // checkpoint"); ours carry their creation time (ms) in the name
    const ms = /^onestor-\d+-(\d+)-/.exec(name)?.[1];
    const created = ms ? Math.floor(Number(ms) / 1000) : Math.floor(Date.now() / 1000);
    const xml = `<domaincheckpoint><name>${name}</name><creationTime>${created}</creationTime><disks><disk name='${target}' checkpoint='bitmap' bitmap='${name}'/></disks></domaincheckpoint>`;
    let redefined = false;
    let why = '';
    try {
      await this.virsh.checkpointCreateRedefine(dom, xml);
      redefined = true;
      await this.virsh.checkpointDelete(dom, name);
      return 'libvirt checkpoint redefine + checkpoint-delete';
    } catch (e) {
      why = (e as Error).message.split(' (virsh')[0] ?? '';
      if (redefined) await this.virsh.checkpointDelete(dom, name, { metadataOnly: true }).catch(() => {});
    }
    await this.virsh.qemuMonitorCommand(dom, { execute: 'block-dirty-bitmap-remove', arguments: { node, name } });
    return `QMP block-dirty-bitmap-remove (libvirt ${redefined ? 'checkpoint-delete' : 'redefine'} refused: ${why})`;
  }
}
