/**
 * Which VM disks on this host are set up for protection (DESIGN §2, hypervisor side).
 *
 * Split in two so the decisions are testable without a filesystem:
 *  - `collectFacts` walks DATASTORE_LOCATION read-only and records what it saw (listings, file texts,
 *    path types, symlink escapes) without judging;
 *  - `planDiscovery` is pure: facts in, eligible / ineligible disks out, every refusal with a code and a
 *    reason naming the file and field.
 * One broken VM never hides the others: every problem becomes an IneligibleDisk and the walk goes on.
 */
import { lstat, readdir, readFile, realpath, stat } from 'node:fs/promises';
import { join, sep } from 'node:path';
import { ErrorCodes, OnestorError, type ErrorCode } from '../shared/errors.js';
import type { EligibleDisk, IneligibleDisk } from '../shared/model.js';
import { MAX_ONE_XML_BYTES, parseDsXml, parseVmXml, type DsDoc, type VmDoc } from './one-xml.js';

// ---------------------------------------------------------------------------------------------------------
// Facts (what the walker saw)

export type PathState = 'ok' | 'missing' | 'wrong-type' | 'outside' | 'error';

export interface PathFact {
  state: PathState;
  /** What was wrong, for the reason text (errno message, real target of an escaping link, actual type). */
  detail?: string;
}

export type FileRead = { ok: true; text: string } | { ok: false; state: Exclude<PathState, 'ok'>; detail: string };

export interface DiskFacts {
  diskId: number;
  /** DS/VMID/disk.N exists (any type; upstream makes it a symlink to disk.N.snap/base.1). */
  diskEntry: boolean;
  /** DS/VMID/disk.N.snap must be a directory whose real path is inside the datastore. */
  snapDir: PathFact;
  /** DS/VMID/disk.N.snap/base.1 must be a regular file whose real path is inside the datastore. */
  base1: PathFact;
}

export interface VmFacts {
  vmId: number;
  vmDir: string;
  /** The VM dir itself is unusable (escapes the datastore, not a dir, unreadable). */
  dirProblem?: { state: Exclude<PathState, 'ok'>; detail: string };
  vmXml?: FileRead;
  dsXml?: FileRead;
  /** Every N for which the listing has disk.N or disk.N.snap. */
  disks: DiskFacts[];
}

export interface DatastoreFacts {
  dsId: number;
  dsDir: string;
  vms: VmFacts[];
}

// ---------------------------------------------------------------------------------------------------------
// Result

/** IneligibleDisk plus whether the template asked for protection (status shows "not protected" vs error). */
export interface DiscoveredIneligible extends IneligibleDisk {
  /** false: the disk simply has no RECOVERY_SNAPSHOT_FREQ (or no DISK entry): informational, not a fault. */
  protectionRequested: boolean;
}

export interface DiscoveryResult {
  eligible: EligibleDisk[];
  ineligible: DiscoveredIneligible[];
  /** Things for the debug log: datastores skipped, VM dirs over the cap, DISK elements without DISK_ID. */
  notes: string[];
}

export const NOT_PROTECTED_NO_FREQ = 'not protected: no RECOVERY_SNAPSHOT_FREQ';

// ---------------------------------------------------------------------------------------------------------
// Pure planning

function freqField(diskId: number): string {
  return `/VM/TEMPLATE/DISK[DISK_ID=${diskId}]/RECOVERY_SNAPSHOT_FREQ`;
}

function describeFileProblem(path: string, read: Extract<FileRead, { ok: false }>): string {
  switch (read.state) {
    case 'missing':
      return `${path}: missing`;
    case 'outside':
      return `${path}: symlink resolves outside the datastore (${read.detail}); not followed`;
    case 'wrong-type':
      return `${path}: not a regular file (${read.detail})`;
    default:
      return `${path}: ${read.detail}`;
  }
}

/**
 * Decides, from facts alone, which disks are eligible. Pure and deterministic (sorted output).
 * `runningDomains`: when given, a disk whose domain is not in it is ineligible ('domain not running').
 */
export function planDiscovery(
  datastores: readonly DatastoreFacts[],
  runningDomains?: ReadonlySet<string> | null,
): DiscoveryResult {
  const eligible: EligibleDisk[] = [];
  const ineligible: DiscoveredIneligible[] = [];
  const notes: string[] = [];
  /** vmId -> dsIds it was found eligible in, and the DS its vm.xml history names (to settle duplicates). */
  const historyDs = new Map<string, number | undefined>();

  const sortedDs = [...datastores].sort((a, b) => a.dsId - b.dsId);
  for (const ds of sortedDs) {
    const vms = [...ds.vms].sort((a, b) => a.vmId - b.vmId);
    for (const vm of vms) {
      const result = planVm(ds, vm, runningDomains ?? null);
      eligible.push(...result.eligible);
      ineligible.push(...result.ineligible);
      notes.push(...result.notes);
      historyDs.set(`${ds.dsId}/${vm.vmId}`, result.historyDsId);
    }
  }

  // The same VMID eligible in two datastores (a stale dir left by a migration between system datastores)
  // would make two cycles publish into one SNAPS/VMID: keep the one vm.xml's history points at, or none.
  const byVm = new Map<number, EligibleDisk[]>();
  for (const d of eligible) byVm.set(d.vmId, [...(byVm.get(d.vmId) ?? []), d]);
  const dropped = new Set<EligibleDisk>();
  for (const [vmId, disks] of byVm) {
    const dsIds = [...new Set(disks.map((d) => d.dsId))];
    if (dsIds.length < 2) continue;
    const confirmed = dsIds.filter((id) => historyDs.get(`${id}/${vmId}`) === id);
    const keep = confirmed.length === 1 ? confirmed[0] : undefined;
    for (const d of disks) {
      if (d.dsId === keep) continue;
      dropped.add(d);
      ineligible.push({
        vmId,
        diskId: d.diskId,
        dsId: d.dsId,
        code: ErrorCodes.NOT_ELIGIBLE,
        reason:
          `VM ${vmId} has protected disks in datastores ${dsIds.join(' and ')}; ` +
          (keep === undefined
            ? 'no vm.xml history settles which one is current, so none is used'
            : `${join(d.vmDir, 'vm.xml')} history points at datastore ${keep}, this copy is stale`),
        file: d.vmDir,
        field: '/VM/HISTORY_RECORDS/HISTORY/DS_ID',
        protectionRequested: true,
      });
    }
  }
  const finalEligible = eligible.filter((d) => !dropped.has(d));
  ineligible.sort((a, b) => a.dsId - b.dsId || a.vmId - b.vmId || (a.diskId ?? -1) - (b.diskId ?? -1));
  return { eligible: finalEligible, ineligible, notes };
}

interface VmPlan {
  eligible: EligibleDisk[];
  ineligible: DiscoveredIneligible[];
  notes: string[];
  historyDsId?: number;
}

function planVm(ds: DatastoreFacts, vm: VmFacts, running: ReadonlySet<string> | null): VmPlan {
  const plan: VmPlan = { eligible: [], ineligible: [], notes: [] };
  const vmXmlPath = join(vm.vmDir, 'vm.xml');
  const dsXmlPath = join(vm.vmDir, 'ds.xml');
  const listedIds = vm.disks.map((d) => d.diskId);

  /** A problem that affects the whole VM: one entry per disk seen on disk, or one VM-level entry. */
  const vmWide = (code: ErrorCode, reason: string, file: string, field?: string): VmPlan => {
    const ids: (number | undefined)[] = listedIds.length ? [...listedIds].sort((a, b) => a - b) : [undefined];
    for (const diskId of ids) {
      plan.ineligible.push({
        vmId: vm.vmId,
        ...(diskId !== undefined ? { diskId } : {}),
        dsId: ds.dsId,
        code,
        reason,
        file,
        ...(field ? { field } : {}),
        protectionRequested: true,
      });
    }
    return plan;
  };

  if (vm.dirProblem) {
    const { state, detail } = vm.dirProblem;
    const reason =
      state === 'outside'
        ? `${vm.vmDir}: VM dir resolves outside the datastore (${detail}); not followed`
        : `${vm.vmDir}: ${detail}`;
    return vmWide(state === 'outside' ? ErrorCodes.PATH : ErrorCodes.NOT_ELIGIBLE, reason, vm.vmDir);
  }
  if (!vm.vmXml || !vm.vmXml.ok) {
    const read = vm.vmXml ?? { ok: false as const, state: 'missing' as const, detail: 'not read' };
    return vmWide(read.state === 'outside' ? ErrorCodes.PATH : ErrorCodes.VM_XML, describeFileProblem(vmXmlPath, read), vmXmlPath);
  }
  let doc: VmDoc;
  try {
    doc = parseVmXml(vm.vmXml.text, vmXmlPath);
  } catch (e) {
    const err = e instanceof OnestorError ? e : new OnestorError(ErrorCodes.VM_XML, String(e), { file: vmXmlPath });
    return vmWide(ErrorCodes.VM_XML, `${vmXmlPath}: ${err.message}`, vmXmlPath, err.context.field);
  }
  if (doc.historyDsId !== undefined) plan.historyDsId = doc.historyDsId;
  if (doc.id !== vm.vmId) {
    // a vm.xml copied from another VM would make us snapshot the wrong domain into the wrong SNAPS/VMID
    return vmWide(ErrorCodes.VM_XML, `${vmXmlPath}: /VM/ID=${doc.id} does not match the directory ${vm.vmId}`, vmXmlPath, '/VM/ID');
  }
  for (const p of doc.diskProblems) plan.notes.push(p);

  const wanted = doc.disks.filter((d) => d.freqRaw !== undefined).map((d) => d.diskId);
  const candidates = [...new Set([...listedIds, ...wanted])]
    .filter((id) => id !== doc.contextDiskId)
    .sort((a, b) => a - b);

  // ds.xml is only needed (and only reported) for disks that ask for protection
  let dsVerdict: { host: string } | { code: ErrorCode; reason: string; field?: string } | undefined;
  const replicaHost = (): { host: string } | { code: ErrorCode; reason: string; field?: string } => {
    if (dsVerdict) return dsVerdict;
    const field = '/DATASTORE/TEMPLATE/REPLICA_HOST';
    if (!vm.dsXml || !vm.dsXml.ok) {
      const read = vm.dsXml ?? { ok: false as const, state: 'missing' as const, detail: 'not read' };
      dsVerdict = { code: read.state === 'outside' ? ErrorCodes.PATH : ErrorCodes.DS_XML, reason: describeFileProblem(dsXmlPath, read) };
      return dsVerdict;
    }
    let dsDoc: DsDoc;
    try {
      dsDoc = parseDsXml(vm.dsXml.text, dsXmlPath);
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      dsVerdict = { code: ErrorCodes.DS_XML, reason: `${dsXmlPath}: ${msg}` };
      return dsVerdict;
    }
    if (dsDoc.replicaHostError) dsVerdict = { code: ErrorCodes.DS_XML, reason: dsDoc.replicaHostError, field };
    else if (dsDoc.replicaHost === null) {
      dsVerdict = { code: ErrorCodes.DS_XML, reason: `not protected: ${dsXmlPath} has no ${field}`, field };
    } else dsVerdict = { host: dsDoc.replicaHost };
    return dsVerdict;
  };

  const domainName = doc.deployId ?? `one-${vm.vmId}`;
  for (const diskId of candidates) {
    const refuse = (code: ErrorCode, reason: string, file: string, field: string | undefined, requested: boolean): void => {
      plan.ineligible.push({
        vmId: vm.vmId,
        diskId,
        dsId: ds.dsId,
        code,
        reason,
        file,
        ...(field ? { field } : {}),
        protectionRequested: requested,
      });
    };
    const entries = doc.disks.filter((d) => d.diskId === diskId);
    const diskField = `/VM/TEMPLATE/DISK[DISK_ID=${diskId}]`;
    if (entries.length === 0) {
      refuse(ErrorCodes.NOT_ELIGIBLE, `not protected: ${vmXmlPath} has no ${diskField}`, vmXmlPath, diskField, false);
      continue;
    }
    if (entries.length > 1) {
      refuse(ErrorCodes.VM_XML, `${vmXmlPath}: ${diskField} appears ${entries.length} times`, vmXmlPath, diskField, true);
      continue;
    }
    const disk = entries[0]!;
    if (disk.freqRaw === undefined) {
      refuse(ErrorCodes.NOT_ELIGIBLE, `${NOT_PROTECTED_NO_FREQ} (${vmXmlPath} ${freqField(diskId)})`, vmXmlPath, freqField(diskId), false);
      continue;
    }
    if (disk.freq === null) {
      refuse(ErrorCodes.VM_XML, disk.freqError ?? `${vmXmlPath}: ${freqField(diskId)} is invalid`, vmXmlPath, freqField(diskId), true);
      continue;
    }
    const replica = replicaHost();
    if (!('host' in replica)) {
      refuse(replica.code, replica.reason, dsXmlPath, replica.field, true);
      continue;
    }
    if (doc.deployIdError) {
      refuse(ErrorCodes.VM_XML, doc.deployIdError, vmXmlPath, '/VM/DEPLOY_ID', true);
      continue;
    }
    const facts = vm.disks.find((d) => d.diskId === diskId);
    const diskPath = join(vm.vmDir, `disk.${diskId}`);
    const snapDir = join(vm.vmDir, `disk.${diskId}.snap`);
    const base1Path = join(snapDir, 'base.1');
    if (!facts || !facts.diskEntry) {
      refuse(ErrorCodes.NOT_ELIGIBLE, `${diskPath}: missing (the disk is not in the upstream ssh layout)`, diskPath, undefined, true);
      continue;
    }
    const pathProblem = (fact: PathFact, path: string, what: string): boolean => {
      if (fact.state === 'ok') return false;
      const detail = fact.detail ? ` (${fact.detail})` : '';
      const reason =
        fact.state === 'outside'
          ? `${path}: symlink resolves outside the datastore${detail}; not followed`
          : fact.state === 'missing'
            ? `${path}: missing (expected ${what})`
            : fact.state === 'wrong-type'
              ? `${path}: not ${what}${detail}`
              : `${path}: cannot be checked${detail}`;
      refuse(fact.state === 'outside' ? ErrorCodes.PATH : ErrorCodes.NOT_ELIGIBLE, reason, path, undefined, true);
      return true;
    };
    if (pathProblem(facts.snapDir, snapDir, 'a directory')) continue;
    if (pathProblem(facts.base1, base1Path, 'a regular file')) continue;
    if (running && !running.has(domainName)) {
      refuse(ErrorCodes.DOMAIN, `domain not running: ${domainName} (from ${doc.deployId ? `${vmXmlPath} /VM/DEPLOY_ID` : `one-${vm.vmId}`})`, vmXmlPath, '/VM/DEPLOY_ID', true);
      continue;
    }
    const eligibleDisk: EligibleDisk = {
      vmId: vm.vmId,
      diskId,
      dsId: ds.dsId,
      dsDir: ds.dsDir,
      vmDir: vm.vmDir,
      domainName,
      freqSeconds: disk.freq,
      replicaHost: replica.host,
      snapDir,
      basePath: join(snapDir, 'base'),
      base1Path,
    };
    if (disk.target !== undefined) eligibleDisk.target = disk.target;
    plan.eligible.push(eligibleDisk);
  }
  return plan;
}

// ---------------------------------------------------------------------------------------------------------
// The walker (read-only file system adapter)

const NUMERIC = /^[0-9]{1,9}$/;
const DISK_ENTRY = /^disk\.([0-9]{1,6})(\.snap)?$/;
const MONITOR_MAX = 256;

function isInside(realChild: string, realRoot: string): boolean {
  return realChild === realRoot || realChild.startsWith(realRoot.endsWith(sep) ? realRoot : realRoot + sep);
}

function errnoOf(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException | undefined)?.code;
}

function errText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function typeName(s: { isDirectory(): boolean; isFile(): boolean; isSymbolicLink(): boolean }): string {
  return s.isDirectory() ? 'directory' : s.isFile() ? 'regular file' : s.isSymbolicLink() ? 'symlink' : 'special file';
}

/** Resolves `path` and checks it stays inside `root` and has the expected type. Never reads content. */
async function checkPath(path: string, root: string, want: 'dir' | 'file'): Promise<PathFact & { real?: string }> {
  let real: string;
  try {
    real = await realpath(path);
  } catch (e) {
    const code = errnoOf(e);
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      // a dangling symlink is reported as such rather than as "missing"
      const l = await lstat(path).catch(() => null);
      return l?.isSymbolicLink() ? { state: 'error', detail: 'dangling symlink' } : { state: 'missing' };
    }
    return { state: 'error', detail: errText(e) };
  }
  if (!isInside(real, root)) return { state: 'outside', detail: `-> ${real}` };
  try {
    const s = await stat(real);
    const ok = want === 'dir' ? s.isDirectory() : s.isFile();
    return ok ? { state: 'ok', real } : { state: 'wrong-type', detail: typeName(s) };
  } catch (e) {
    return { state: 'error', detail: errText(e) };
  }
}

async function readBounded(path: string, root: string): Promise<FileRead> {
  const fact = await checkPath(path, root, 'file');
  if (fact.state !== 'ok') return { ok: false, state: fact.state, detail: fact.detail ?? fact.state };
  try {
    const s = await stat(fact.real!);
    if (s.size > MAX_ONE_XML_BYTES) return { ok: false, state: 'error', detail: `file too large (${s.size} bytes)` };
    return { ok: true, text: await readFile(fact.real!, 'utf8') };
  } catch (e) {
    return { ok: false, state: 'error', detail: errText(e) };
  }
}

export interface CollectOptions {
  datastoreLocation: string;
  /** Cap on VM dirs examined per datastore (lowest ids first); protects against runaway directories. */
  maxVmsPerDs?: number;
}

export const DEFAULT_MAX_VMS_PER_DS = 10_000;

/**
 * Walks DATASTORE_LOCATION read-only. Datastores: numeric dirs whose `.monitor` reads `ssh` (a datastore dir
 * may itself be a symlink to another mount; the boundary for links inside it is its real path).
 * Non-numeric entries (our `.onestor` staging dir, `.monitor`, lost+found) are ignored silently.
 */
export async function collectFacts(opts: CollectOptions): Promise<{ datastores: DatastoreFacts[]; notes: string[] }> {
  const notes: string[] = [];
  const maxVms = opts.maxVmsPerDs ?? DEFAULT_MAX_VMS_PER_DS;
  let top: string[];
  try {
    top = await readdir(opts.datastoreLocation);
  } catch (e) {
    notes.push(`${opts.datastoreLocation}: cannot list datastores: ${errText(e)}`);
    return { datastores: [], notes };
  }
  const datastores: DatastoreFacts[] = [];
  for (const name of top.filter((n) => NUMERIC.test(n)).sort((a, b) => Number(a) - Number(b))) {
    const dsDir = join(opts.datastoreLocation, name);
    let monitor: string;
    try {
      const buf = await readFile(join(dsDir, '.monitor'));
      monitor = buf.subarray(0, MONITOR_MAX).toString('utf8').trim();
    } catch (e) {
      notes.push(`${dsDir}: skipped (no readable .monitor: ${errnoOf(e) ?? errText(e)})`);
      continue;
    }
    if (monitor !== 'ssh') {
      notes.push(`${dsDir}: skipped (.monitor reads ${JSON.stringify(monitor.slice(0, 32))}, not ssh)`);
      continue;
    }
    let dsReal: string;
    let entries: string[];
    try {
      dsReal = await realpath(dsDir);
      entries = await readdir(dsDir);
    } catch (e) {
      notes.push(`${dsDir}: cannot list: ${errText(e)}`);
      continue;
    }
    const vmNames = entries.filter((n) => NUMERIC.test(n)).sort((a, b) => Number(a) - Number(b));
    if (vmNames.length > maxVms) {
      notes.push(`${dsDir}: ${vmNames.length} VM dirs, only the first ${maxVms} examined`);
      vmNames.length = maxVms;
    }
    const vms: VmFacts[] = [];
    for (const vmName of vmNames) {
      const vm = await collectVm(join(dsDir, vmName), Number(vmName), dsReal);
      if (vm) vms.push(vm);
      else notes.push(`${join(dsDir, vmName)}: not a directory, ignored`);
    }
    datastores.push({ dsId: Number(name), dsDir, vms });
  }
  return { datastores, notes };
}

/** Facts for one VM dir; null for a numeric entry that is not a directory (not a VM). */
async function collectVm(vmDir: string, vmId: number, dsReal: string): Promise<VmFacts | null> {
  const facts: VmFacts = { vmId, vmDir, disks: [] };
  const dir = await checkPath(vmDir, dsReal, 'dir');
  if (dir.state === 'wrong-type') return null;
  if (dir.state !== 'ok') {
    facts.dirProblem = { state: dir.state, detail: dir.detail ?? dir.state };
    return facts;
  }
  let entries: string[];
  try {
    entries = await readdir(vmDir);
  } catch (e) {
    facts.dirProblem = { state: 'error', detail: `cannot list: ${errText(e)}` };
    return facts;
  }
  facts.vmXml = await readBounded(join(vmDir, 'vm.xml'), dsReal);
  facts.dsXml = await readBounded(join(vmDir, 'ds.xml'), dsReal);

  const ids = new Map<number, { disk: boolean }>();
  for (const entry of entries) {
    const m = DISK_ENTRY.exec(entry);
    if (!m) continue;
    const id = Number(m[1]);
    const seen = ids.get(id) ?? { disk: false };
    if (!m[2]) seen.disk = true;
    ids.set(id, seen);
  }
  for (const [diskId, seen] of [...ids].sort((a, b) => a[0] - b[0])) {
    const snapPath = join(vmDir, `disk.${diskId}.snap`);
    const snapDir = await checkPath(snapPath, dsReal, 'dir');
    const base1: PathFact =
      snapDir.state === 'ok' ? await checkPath(join(snapPath, 'base.1'), dsReal, 'file') : { state: 'missing', detail: 'disk.N.snap unusable' };
    facts.disks.push({
      diskId,
      diskEntry: seen.disk,
      snapDir: stripReal(snapDir),
      base1: stripReal(base1),
    });
  }
  return facts;
}

function stripReal(f: PathFact & { real?: string }): PathFact {
  return f.detail !== undefined ? { state: f.state, detail: f.detail } : { state: f.state };
}

export interface DiscoverOptions {
  datastoreLocation: string;
  runningDomains?: ReadonlySet<string> | null;
  maxVmsPerDs?: number;
}

/** Read-only discovery: walk, then plan. Notes from both go in `notes` (for the debug log). */
export async function discover(opts: DiscoverOptions): Promise<DiscoveryResult> {
  const collected = await collectFacts({
    datastoreLocation: opts.datastoreLocation,
    ...(opts.maxVmsPerDs !== undefined ? { maxVmsPerDs: opts.maxVmsPerDs } : {}),
  });
  const planned = planDiscovery(collected.datastores, opts.runningDomains ?? null);
  return { ...planned, notes: [...collected.notes, ...planned.notes] };
}
