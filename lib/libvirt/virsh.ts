/**
 * Thin typed adapter over the `virsh` CLI, parsing done by the pure functions of virsh-parse.ts. Queries and
 * the cycle's three state changes go to a long-lived interactive virsh when one is idle (virsh-shell.ts:
 * ~1 ms instead of the 15-70 ms of a spawned virsh); everything else, and every query whose shell answer was
 * not clean, spawns virsh through lib/exec.ts (execFile, LC_ALL=C, no shell), so domain names and paths are
 * passed as single arguments and never interpreted (the shell path takes only arguments it can carry
 * verbatim).
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
import { VirshShellPool, type VirshShellStats } from './virsh-shell.js';
import { actionOutcome } from './virsh-shell-protocol.js';
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
  /**
   * Answer read-only queries from long-lived interactive virsh processes (virsh-shell.ts; default true).
   * Failures and every state change still run as one virsh process per call.
   */
  shell?: boolean;
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
  private readonly shells: VirshShellPool | null;

  constructor(opts: VirshOptions = {}) {
    this.uri = opts.uri;
    this.virshPath = opts.virshPath ?? 'virsh';
    this.timeoutMs = opts.timeoutMs ?? 60_000;
    this.signal = opts.signal;
    this.shells = opts.shell === false ? null : new VirshShellPool({ virshPath: this.virshPath, uri: this.uri, signal: opts.signal });
  }

  /** How the fast path fared (null when it is off). */
  get shellStats(): Readonly<VirshShellStats> | null {
    return this.shells?.stats ?? null;
  }

  /** Stops the long-lived shells (they also stop on their own after a minute unused). */
  close(): void {
    this.shells?.close();
  }

  /**
   * A read-only query: answered by a shell when it succeeded cleanly (output, nothing on stderr), otherwise
   * run again the one-shot way, so every failure is classified from a real exit code and message. Only
   * for commands that change nothing, since a failed or unclear answer means the command runs twice.
   */
  private async query(args: string[], ctx: CallContext & { domain?: string; checkpoint?: string } = {}): Promise<ExecResult> {
    const a = this.shells && !this.signal?.aborted ? await this.shells.query(args, this.timeoutMs) : null;
    if (a?.kind === 'output' && a.stderr === '') return { stdout: a.stdout, stderr: '', code: 0 };
    if (a?.kind === 'timeout') return this.check(args, { stdout: '', stderr: '', code: 124 }, ctx);
    return this.call(args, ctx);
  }

  /**
   * A command that changes state, through a shell when one is idle: it must run exactly once, so a shell
   * answer is final. Success is `success` on stdout (null: no output at all) and no error line; a failure
   * is classified from its error lines as a one-shot run's would be (exit 1); an answer the connection
   * dropped around, or a shell lost after the line went out, is an E_VIRSH 'connection' failure that may
   * have taken effect, as a one-shot virsh losing its connection mid-call reports. Not written to a
   * shell: the one-shot way.
   */
  private async action(args: string[], success: RegExp | null, ctx: CallContext & { domain?: string; checkpoint?: string } = {}): Promise<ExecResult> {
    const a = this.shells && !this.signal?.aborted ? await this.shells.query(args, this.timeoutMs) : null;
    if (a === null) return this.call(args, ctx);
    if (a.kind === 'timeout') return this.check(args, { stdout: '', stderr: '', code: 124 }, ctx);
    // a shutdown closed the shell under the command: an abort, as a one-shot run's would be (it may have run)
    if (a.kind === 'lost' && this.signal?.aborted) throw new OnestorError(ErrorCodes.ABORTED, `${showCommand(args)}: aborted`, { ...ctx, field: args[0], virshKind: 'other' });
    const outcome = a.kind === 'lost' ? ({ kind: 'unclear', why: a.why } as const) : actionOutcome(a, success);
    if (outcome.kind === 'ok') return { stdout: a.kind === 'output' ? a.stdout : '', stderr: '', code: 0 };
    if (outcome.kind === 'failed') return this.check(args, { stdout: '', stderr: outcome.stderr, code: 1 }, ctx);
    throw new OnestorError(ErrorCodes.VIRSH, `${showCommand(args)}: the virsh shell lost its libvirt connection around the command, which may or may not have taken effect (${outcome.why})`, {
      ...ctx,
      field: args[0],
      virshKind: 'connection',
    });
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
    return this.check(args, r, ctx);
  }

  private check(args: string[], r: ExecResult, ctx: CallContext & { domain?: string; checkpoint?: string }): ExecResult {
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
    return parseVersion((await this.query(['version'])).stdout);
  }

  async capabilities(): Promise<Capabilities> {
    return parseCapabilities((await this.query(['capabilities'])).stdout);
  }

  /** Every domain, running or defined (`list --all`). */
  async listDomains(): Promise<DomainListEntry[]> {
    return parseDomainList((await this.query(['list', '--all'])).stdout);
  }

  async domainState(dom: string, ctx: CallContext = {}): Promise<DomainStateInfo> {
    const r = await this.query(['domstate', dom, '--reason'], { ...ctx, domain: dom });
    return parseDomainState(r.stdout, { ...ctx, domain: dom });
  }

  /** id, uuid, state and whether the domain is persistent (transient ones lose checkpoint metadata). */
  async domainInfo(dom: string, ctx: CallContext = {}): Promise<DomainInfo> {
    const r = await this.query(['dominfo', dom], { ...ctx, domain: dom });
    return parseDomainInfo(r.stdout, { ...ctx, domain: dom });
  }

  async dumpXml(dom: string, opts: { inactive?: boolean } & CallContext = {}): Promise<DomainXmlResult> {
    const { inactive, ...ctx } = opts;
    const args = ['dumpxml', dom];
    if (inactive) args.push('--inactive');
    const r = await this.query(args, { ...ctx, domain: dom });
    return { parsed: parseDomainXml(r.stdout, { ...ctx, domain: dom }), xml: r.stdout };
  }

  async blockList(dom: string, ctx: CallContext = {}): Promise<BlockDevice[]> {
    const r = await this.query(['domblklist', dom, '--details'], { ...ctx, domain: dom });
    return parseBlockList(r.stdout, { ...ctx, domain: dom });
  }

  /** Checkpoints with creation time and parent (`checkpoint-list --parent`). */
  async checkpointList(dom: string, ctx: CallContext = {}): Promise<CheckpointListEntry[]> {
    const r = await this.query(['checkpoint-list', dom, '--parent'], { ...ctx, domain: dom });
    return parseCheckpointList(r.stdout, { ...ctx, domain: dom });
  }

  /** Checkpoint names only (`checkpoint-list --name`). */
  async checkpointNames(dom: string, ctx: CallContext = {}): Promise<string[]> {
    const r = await this.query(['checkpoint-list', dom, '--name'], { ...ctx, domain: dom });
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
    const r = await this.query(args, { ...ctx, domain: dom, checkpoint: name });
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
    await this.action(args, /^Domain checkpoint .+ deleted\n/, { ...ctx, domain: dom, checkpoint: name });
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
      await this.action(args, /^Backup started\n/, { ...ctx, domain: dom });
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
    // reading completed stats without --keep-completed clears them: such a read must never run twice, so it
    // never goes through the fast path (an unclear shell answer is re-run the one-shot way)
    const clears = completed && !keepCompleted;
    const r = clears ? await this.call(args, { ...ctx, domain: dom }) : await this.query(args, { ...ctx, domain: dom });
    return parseJobInfo(r.stdout, { ...ctx, domain: dom });
  }

  /** Aborts the domain's job; false when there was none (already finished). */
  async domJobAbort(dom: string, ctx: CallContext = {}): Promise<boolean> {
    try {
      await this.action(['domjobabort', dom], null, { ...ctx, domain: dom });
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
      out = (await this.query(['backup-dumpxml', dom], { ...ctx, domain: dom })).stdout;
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
      return (await this.query(['backup-dumpxml', dom], { ...ctx, domain: dom })).stdout;
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
