/**
 * Thin typed adapter over the `virsh` CLI: one virsh call per method (about 15 ms each), parsing done by
 * the pure functions of virsh-parse.ts. virsh is spawned through lib/exec.ts (execFile, LC_ALL=C, no shell),
 * so domain names and paths are passed as single arguments and never interpreted.
 *
 * Failures throw OnestorError: E_DOMAIN when the domain is missing or not running, E_CHECKPOINT when a
 * checkpoint is missing or its bitmap is broken, E_VIRSH otherwise. The message holds virsh's error line
 * and the command; context.virshKind holds the classification (see virshErrorKind()).
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { ErrorCodes, OnestorError, type ErrorCode } from '../shared/errors.js';
import { run, type ExecResult } from '../shared/exec.js';
import {
  classifyVirshError,
  parseBlockList,
  parseCapabilities,
  parseCheckpointList,
  parseCheckpointNames,
  parseCheckpointXml,
  parseDomainInfo,
  parseDomainList,
  parseDomainState,
  parseDomainXml,
  parseFsFreezeCount,
  parseJobInfo,
  parseVersion,
  type BlockDevice,
  type Capabilities,
  type CheckpointListEntry,
  type CheckpointXml,
  type DomainInfo,
  type DomainListEntry,
  type DomainStateInfo,
  type DomainXml,
  type JobInfo,
  type VirshErrorKind,
  type VirshVersion,
} from './virsh-parse.js';

export interface VirshOptions {
  /** libvirt connection URI; default: virsh's own default (LIBVIRT_DEFAULT_URI or qemu:///system as root). */
  uri?: string;
  /** default "virsh" from PATH */
  virshPath?: string;
  /** per call; default 60 s (the first call after libvirtd starts may block while it probes QEMU) */
  timeoutMs?: number;
  /** aborts every running call (daemon shutdown) */
  signal?: AbortSignal;
}

/** Context for errors: which VM/disk the caller was working on, so the error names it. */
export interface CallContext {
  vm?: number;
  disk?: number;
}

/** Result of domfsfreeze/domfsthaw: the count, or why the guest agent could not do it. */
export type FsFreezeResult =
  | { ok: true; filesystems: number }
  | { ok: false; kind: 'no-agent' | 'agent-not-connected'; message: string };

export interface CheckpointXmlResult {
  parsed: CheckpointXml;
  /** the XML as virsh printed it: what `checkpointCreateRedefine` needs after a transient re-create */
  xml: string;
}

export interface DomainXmlResult {
  parsed: DomainXml;
  xml: string;
}

/** The classification of a failed virsh call, or undefined for any other error. */
export function virshErrorKind(e: unknown): VirshErrorKind | undefined {
  if (!(e instanceof OnestorError)) return undefined;
  const kind = e.context.virshKind;
  return typeof kind === 'string' ? (kind as VirshErrorKind) : undefined;
}

function codeFor(kind: VirshErrorKind): ErrorCode {
  switch (kind) {
    case 'no-domain':
    case 'not-running':
      return ErrorCodes.DOMAIN;
    case 'no-checkpoint':
    case 'checkpoint-inconsistent':
      return ErrorCodes.CHECKPOINT;
    default:
      return ErrorCodes.VIRSH;
  }
}

/** Renders argv for messages: arguments with spaces or quotes are single-quoted (display only). */
function showCommand(args: readonly string[]): string {
  return ['virsh', ...args].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}

export class Virsh {
  private readonly uri: string | undefined;
  private readonly virshPath: string;
  private readonly timeoutMs: number;
  private readonly signal: AbortSignal | undefined;

  constructor(opts: VirshOptions = {}) {
    this.uri = opts.uri;
    this.virshPath = opts.virshPath ?? 'virsh';
    this.timeoutMs = opts.timeoutMs ?? 60_000;
    this.signal = opts.signal;
  }

  /** Runs virsh; resolves with its output on exit 0, throws a classified OnestorError otherwise. */
  private async call(args: string[], ctx: CallContext & { domain?: string; checkpoint?: string } = {}): Promise<ExecResult> {
    const argv = this.uri ? ['-c', this.uri, ...args] : args;
    let r: ExecResult;
    try {
      r = await run(this.virshPath, argv, { timeoutMs: this.timeoutMs, signal: this.signal });
    } catch (e) {
      const aborted = (e as { code?: unknown }).code === 'ABORT_ERR';
      throw new OnestorError(
        aborted ? ErrorCodes.ABORTED : ErrorCodes.VIRSH,
        `${showCommand(args)}: ${aborted ? 'aborted' : `cannot run ${this.virshPath}: ${(e as Error).message}`}`,
        { ...ctx, field: args[0], virshKind: aborted ? 'other' : 'connection' },
        { cause: e },
      );
    }
    if (r.code === 0) return r;
    if (r.code === 124) {
      throw new OnestorError(ErrorCodes.VIRSH, `${showCommand(args)}: timed out after ${this.timeoutMs} ms`, {
        ...ctx,
        field: args[0],
        virshKind: 'other',
        exitCode: r.code,
      });
    }
    const classified = classifyVirshError(r.stderr || r.stdout);
    throw new OnestorError(codeFor(classified.kind), `${classified.message} (${showCommand(args)}, exit ${r.code})`, {
      ...ctx,
      field: args[0],
      virshKind: classified.kind,
      exitCode: r.code,
    });
  }

  /** Writes XML documents to a private temp dir for the duration of `use`, then removes it. */
  private async withXmlFiles<T>(docs: string[], use: (files: string[]) => Promise<T>): Promise<T> {
    // virsh reads these files itself (client side) and sends their content to libvirtd.
    const dir = await mkdtemp(path.join(os.tmpdir(), 'onestor-virsh-'));
    try {
      const files: string[] = [];
      for (const [i, doc] of docs.entries()) {
        const file = path.join(dir, `doc${i}.xml`);
        await writeFile(file, doc, { mode: 0o600 });
        files.push(file);
      }
      return await use(files);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }

  async version(): Promise<VirshVersion> {
    return parseVersion((await this.call(['version'])).stdout);
  }

  async capabilities(): Promise<Capabilities> {
    return parseCapabilities((await this.call(['capabilities'])).stdout);
  }

  /** Every domain, running or defined (`list --all`). */
  async listDomains(): Promise<DomainListEntry[]> {
    return parseDomainList((await this.call(['list', '--all'])).stdout);
  }

  async domainState(dom: string, ctx: CallContext = {}): Promise<DomainStateInfo> {
    const r = await this.call(['domstate', dom, '--reason'], { ...ctx, domain: dom });
    return parseDomainState(r.stdout, { ...ctx, domain: dom });
  }

  /** id, uuid, state and whether the domain is persistent (transient ones lose checkpoint metadata). */
  async domainInfo(dom: string, ctx: CallContext = {}): Promise<DomainInfo> {
    const r = await this.call(['dominfo', dom], { ...ctx, domain: dom });
    return parseDomainInfo(r.stdout, { ...ctx, domain: dom });
  }

  async dumpXml(dom: string, opts: { inactive?: boolean } & CallContext = {}): Promise<DomainXmlResult> {
    const { inactive, ...ctx } = opts;
    const args = ['dumpxml', dom];
    if (inactive) args.push('--inactive');
    const r = await this.call(args, { ...ctx, domain: dom });
    return { parsed: parseDomainXml(r.stdout, { ...ctx, domain: dom }), xml: r.stdout };
  }

  async blockList(dom: string, ctx: CallContext = {}): Promise<BlockDevice[]> {
    const r = await this.call(['domblklist', dom, '--details'], { ...ctx, domain: dom });
    return parseBlockList(r.stdout, { ...ctx, domain: dom });
  }

  /** Checkpoints with creation time and parent (`checkpoint-list --parent`). */
  async checkpointList(dom: string, ctx: CallContext = {}): Promise<CheckpointListEntry[]> {
    const r = await this.call(['checkpoint-list', dom, '--parent'], { ...ctx, domain: dom });
    return parseCheckpointList(r.stdout, { ...ctx, domain: dom });
  }

  /** Checkpoint names only (`checkpoint-list --name`). */
  async checkpointNames(dom: string, ctx: CallContext = {}): Promise<string[]> {
    const r = await this.call(['checkpoint-list', dom, '--name'], { ...ctx, domain: dom });
    return parseCheckpointNames(r.stdout);
  }

  /**
   * `checkpoint-dumpxml`. With `size`, a bitmap disk WITHOUT `size` in the result means the bitmap is
   * broken or missing. Keep `xml` (dumped with noDomain) to redefine the checkpoint after a re-create.
   */
  async checkpointXml(
    dom: string,
    name: string,
    opts: { noDomain?: boolean; size?: boolean } & CallContext = {},
  ): Promise<CheckpointXmlResult> {
    const { noDomain, size, ...ctx } = opts;
    const args = ['checkpoint-dumpxml', dom, name];
    if (noDomain) args.push('--no-domain');
    if (size) args.push('--size');
    const r = await this.call(args, { ...ctx, domain: dom, checkpoint: name });
    return { parsed: parseCheckpointXml(r.stdout, { ...ctx, domain: dom }), xml: r.stdout };
  }

  /** Restores checkpoint metadata (e.g. after `virsh create` of a transient domain lost it). */
  async checkpointCreateRedefine(dom: string, checkpointXml: string, ctx: CallContext = {}): Promise<void> {
    await this.withXmlFiles([checkpointXml], ([file]) =>
      this.call(['checkpoint-create', dom, file!, '--redefine'], { ...ctx, domain: dom }),
    );
  }

  /**
   * Deletes ONE checkpoint (merging its bitmap into its parent's). Never --children: libvirtd 9.0 has
   * crashed on it. `metadataOnly` (--metadata) for a checkpoint whose bitmap is broken or missing.
   */
  async checkpointDelete(dom: string, name: string, opts: { metadataOnly?: boolean } & CallContext = {}): Promise<void> {
    const { metadataOnly, ...ctx } = opts;
    const args = ['checkpoint-delete', dom, name];
    if (metadataOnly) args.push('--metadata');
    await this.call(args, { ...ctx, domain: dom, checkpoint: name });
  }

  /**
   * Starts a backup job (`backup-begin DOM backup.xml [checkpoint.xml] [--reuse-external]`); returns once
   * libvirt accepted it. The job runs on: wait with domJobInfo until type None before using the target.
   */
  async backupBegin(
    dom: string,
    backupXml: string,
    checkpointXml?: string,
    opts: { reuseExternal?: boolean } & CallContext = {},
  ): Promise<void> {
    const { reuseExternal, ...ctx } = opts;
    const docs = checkpointXml === undefined ? [backupXml] : [backupXml, checkpointXml];
    await this.withXmlFiles(docs, async (files) => {
      const args = ['backup-begin', dom, ...files];
      if (reuseExternal) args.push('--reuse-external');
      await this.call(args, { ...ctx, domain: dom });
    });
  }

  /**
   * `domjobinfo --rawstats` (exact byte counts). `completed` reads the last finished job's stats (with
   * --anystats, so a failed or cancelled job shows its error); reading them clears them unless keepCompleted.
   */
  async domJobInfo(dom: string, opts: { completed?: boolean; keepCompleted?: boolean } & CallContext = {}): Promise<JobInfo> {
    const { completed, keepCompleted, ...ctx } = opts;
    const args = ['domjobinfo', dom, '--rawstats'];
    if (completed) args.push('--completed', '--anystats');
    if (completed && keepCompleted) args.push('--keep-completed');
    const r = await this.call(args, { ...ctx, domain: dom });
    return parseJobInfo(r.stdout, { ...ctx, domain: dom });
  }

  /** Aborts the domain's job; false when there was none (already finished). */
  async domJobAbort(dom: string, ctx: CallContext = {}): Promise<boolean> {
    try {
      await this.call(['domjobabort', dom], { ...ctx, domain: dom });
      return true;
    } catch (e) {
      if (virshErrorKind(e) === 'no-job') return false;
      throw e;
    }
  }

  /**
   * Target (push) or scratch (pull) files of the domain's running backup job (`backup-dumpxml`), so a job can be recognised as
   * ours (targets in our staging dir) or someone else's (OpenNebula's own backups use the same API).
   * Empty when no backup job runs.
   */
  async backupTargets(dom: string, ctx: CallContext = {}): Promise<string[]> {
    let out: string;
    try {
      out = (await this.call(['backup-dumpxml', dom], { ...ctx, domain: dom })).stdout;
    } catch (e) {
      if (virshErrorKind(e) === 'no-job' || /no (domain )?backup job/i.test((e as Error).message)) return [];
      throw e;
    }
    // push mode names <target file=...>, pull mode <scratch file=...>
    return [...out.matchAll(/<(?:target|scratch)\s+file=(?:'([^']*)'|"([^"]*)")/g)].map((m) => unescapeXml(m[1] ?? m[2] ?? ''));
  }

  /** `backup-dumpxml` of the running backup job, or null when none runs. */
  async backupDumpXml(dom: string, ctx: CallContext = {}): Promise<string | null> {
    try {
      return (await this.call(['backup-dumpxml', dom], { ...ctx, domain: dom })).stdout;
    } catch (e) {
      if (virshErrorKind(e) === 'no-job' || /no (domain )?backup job/i.test((e as Error).message)) return null;
      throw e;
    }
  }

  /**
   * A QMP command through libvirt (`qemu-monitor-command DOM JSON`); returns the parsed reply's `return`.
   * libvirt marks the domain tainted (custom-monitor) on the first use. Used only where libvirt 9.0 has no
   * API: listing a disk's dirty bitmaps (and removing a stray one libvirt does not know).
   */
  async qemuMonitorCommand(dom: string, command: Record<string, unknown>, ctx: CallContext = {}): Promise<unknown> {
    const r = await this.call(['qemu-monitor-command', dom, JSON.stringify(command)], { ...ctx, domain: dom });
    try {
      return (JSON.parse(r.stdout) as { return?: unknown }).return;
    } catch {
      throw new OnestorError(ErrorCodes.VIRSH, `qemu-monitor-command ${String(command.execute)}: reply is not JSON`, { ...ctx, field: 'qemu-monitor-command' });
    }
  }

  /** libvirt's numeric id of a running domain (changes on every start and incoming migration). */
  async domainId(dom: string, ctx: CallContext = {}): Promise<number | null> {
    return (await this.domainInfo(dom, ctx)).id;
  }

  /** Freezes guest filesystems through the guest agent; a missing/silent agent is a result, not an error. */
  async fsFreeze(dom: string, ctx: CallContext = {}): Promise<FsFreezeResult> {
    return this.fsFreezeOrThaw(dom, 'domfsfreeze', 'Froze', ctx);
  }

  async fsThaw(dom: string, ctx: CallContext = {}): Promise<FsFreezeResult> {
    return this.fsFreezeOrThaw(dom, 'domfsthaw', 'Thawed', ctx);
  }

  private async fsFreezeOrThaw(
    dom: string,
    command: 'domfsfreeze' | 'domfsthaw',
    verb: 'Froze' | 'Thawed',
    ctx: CallContext,
  ): Promise<FsFreezeResult> {
    try {
      const r = await this.call([command, dom], { ...ctx, domain: dom });
      return { ok: true, filesystems: parseFsFreezeCount(r.stdout, verb, { ...ctx, domain: dom }) };
    } catch (e) {
      const kind = virshErrorKind(e);
      if (kind === 'agent-unavailable') return { ok: false, kind: 'no-agent', message: (e as Error).message };
      if (kind === 'agent-not-connected') return { ok: false, kind: 'agent-not-connected', message: (e as Error).message };
      throw e;
    }
  }
}

function unescapeXml(s: string): string {
  return s.replace(/&apos;/g, "'").replace(/&quot;/g, '"').replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&amp;/g, '&');
}
