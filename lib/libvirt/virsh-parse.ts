/**
 * Pure parsers for what `virsh` (libvirt 9.0, LC_ALL=C) prints. No I/O: text in, typed data out, or an
 * OnestorError(E_VIRSH) that names the command and quotes the offending line. The formats were captured
 * from the real virsh; test/fixtures/virsh/ holds the captures the unit tests run on.
 *
 * virsh tables pad columns with spaces and domain names may contain spaces, so rows are parsed from the
 * known-shaped columns inward (id first, state last) rather than by splitting on whitespace.
 */
import { XMLParser, XMLValidator } from 'fast-xml-parser';
import { ErrorCodes, OnestorError } from '../shared/errors.js';

/** What a parse error names besides the command: the domain (and VM/disk when the caller knows them). */
export interface ParseContext {
  domain?: string;
  vm?: number;
  disk?: number;
}

function fail(command: string, message: string, ctx: ParseContext = {}, extra: Record<string, unknown> = {}): never {
  const context: Record<string, unknown> = { field: command, ...extra };
  if (ctx.domain !== undefined) context.domain = ctx.domain;
  if (ctx.vm !== undefined) context.vm = ctx.vm;
  if (ctx.disk !== undefined) context.disk = ctx.disk;
  const where = ctx.domain !== undefined ? ` for domain '${ctx.domain}'` : '';
  throw new OnestorError(ErrorCodes.VIRSH, `unexpected output of 'virsh ${command}'${where}: ${message}`, context);
}

/** Shortens a quoted line for error messages (hostile input may be huge or binary). */
function quote(s: string): string {
  const clean = s.replace(/[^\x20-\x7e]/g, '?');
  return JSON.stringify(clean.length > 120 ? `${clean.slice(0, 120)}...` : clean);
}

function lines(text: string): string[] {
  return text.split(/\r?\n/);
}

/** Returns the rows of a virsh table after its header and dashes line, checking the header's columns. */
function tableRows(text: string, command: string, columns: string[], ctx: ParseContext): string[] {
  const all = lines(text);
  const headerIndex = all.findIndex((l) => l.trim() !== '');
  if (headerIndex < 0) fail(command, 'empty output (no table header)', ctx);
  const header = all[headerIndex]!.trim().split(/\s{2,}/);
  if (header.length !== columns.length || header.some((h, i) => h !== columns[i])) {
    fail(command, `table columns ${quote(all[headerIndex]!)} are not ${columns.join(' | ')}`, ctx);
  }
  const dashes = all[headerIndex + 1];
  if (dashes === undefined || !/^-+$/.test(dashes.trim())) fail(command, 'table header not followed by a dashes line', ctx);
  return all.slice(headerIndex + 2).filter((l) => l.trim() !== '');
}

// ----------------------------------------------------------------------------------------------------
// list

/** virsh's state words (virshDomainStateToString). */
export const DOMAIN_STATES = ['running', 'idle', 'paused', 'in shutdown', 'shut off', 'crashed', 'pmsuspended', 'no state'] as const;
export type DomainState = (typeof DOMAIN_STATES)[number];

export interface DomainListEntry {
  /** null for an inactive (defined, not running) domain: virsh prints "-". */
  id: number | null;
  name: string;
  state: DomainState;
}

const STATE_ALTERNATION = DOMAIN_STATES.join('|');
const LIST_ROW = new RegExp(`^\\s*(\\d+|-)\\s+(.+?)\\s+(${STATE_ALTERNATION})\\s*$`);

/** `virsh list --all` (the table). Names may contain spaces; ids are numbers or "-". */
export function parseDomainList(text: string, ctx: ParseContext = {}): DomainListEntry[] {
  const rows = tableRows(text, 'list', ['Id', 'Name', 'State'], ctx);
  return rows.map((row) => {
    const m = LIST_ROW.exec(row);
    if (!m) fail('list', `row ${quote(row)} is not "<id|-> <name> <state>"`, ctx);
    return { id: m[1] === '-' ? null : Number(m[1]), name: m[2]!, state: m[3] as DomainState };
  });
}

/** `virsh list --name` (any state filter): one name per line, kept verbatim (spaces included). */
export function parseDomainNames(text: string): string[] {
  return lines(text).filter((l) => l.trim() !== '');
}

// ----------------------------------------------------------------------------------------------------
// domstate / dominfo

export interface DomainStateInfo {
  state: DomainState;
  /** virsh's reason word(s): "booted", "user", "crashed", "destroyed", "unknown"...; null without --reason. */
  reason: string | null;
}

/** `virsh domstate DOM --reason` -> "running (booted)"; without --reason just "running". */
export function parseDomainState(text: string, ctx: ParseContext = {}): DomainStateInfo {
  const line = lines(text).find((l) => l.trim() !== '')?.trim();
  if (line === undefined) fail('domstate', 'empty output', ctx);
  const m = /^(.+?)(?: \(([^()]*)\))?$/.exec(line);
  const state = m?.[1];
  if (!m || !(DOMAIN_STATES as readonly string[]).includes(state ?? '')) {
    fail('domstate', `${quote(line)} is not a known state`, ctx);
  }
  return { state: state as DomainState, reason: m[2] ?? null };
}

export interface DomainInfo {
  id: number | null;
  name: string;
  uuid: string;
  state: DomainState;
  /** false for a transient domain (`virsh create`): its checkpoint metadata dies with it. */
  persistent: boolean;
}

/** `virsh dominfo DOM`: "Key:   value" lines. */
export function parseDomainInfo(text: string, ctx: ParseContext = {}): DomainInfo {
  const fields = keyValueLines(text);
  const need = (key: string): string => {
    const v = fields.get(key);
    if (v === undefined) fail('dominfo', `no "${key}:" line`, ctx);
    return v;
  };
  const id = need('Id');
  const state = need('State');
  if (!(DOMAIN_STATES as readonly string[]).includes(state)) fail('dominfo', `State ${quote(state)} is not a known state`, ctx);
  const persistent = need('Persistent');
  if (persistent !== 'yes' && persistent !== 'no') fail('dominfo', `Persistent ${quote(persistent)} is not yes/no`, ctx);
  if (id !== '-' && !/^\d+$/.test(id)) fail('dominfo', `Id ${quote(id)} is not a number or "-"`, ctx);
  return { id: id === '-' ? null : Number(id), name: need('Name'), uuid: need('UUID'), state: state as DomainState, persistent: persistent === 'yes' };
}

/** "Key:   value" lines -> map (first occurrence wins; lines without a colon are ignored). */
function keyValueLines(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const l of lines(text)) {
    const i = l.indexOf(':');
    if (i <= 0) continue;
    const key = l.slice(0, i).trim();
    if (!out.has(key)) out.set(key, l.slice(i + 1).trim());
  }
  return out;
}

// ----------------------------------------------------------------------------------------------------
// domblklist

export interface BlockDevice {
  /** file, block, network, volume... */
  type: string;
  /** disk, cdrom, floppy, lun */
  device: string;
  /** vda, sdb, hda... */
  target: string;
  /** null when virsh prints "-" (an empty cdrom). */
  source: string | null;
}

/** `virsh domblklist DOM --details`. The source is the rest of the line (paths may contain spaces). */
export function parseBlockList(text: string, ctx: ParseContext = {}): BlockDevice[] {
  const rows = tableRows(text, 'domblklist', ['Type', 'Device', 'Target', 'Source'], ctx);
  return rows.map((row) => {
    const m = /^\s*(\S+)\s+(\S+)\s+(\S+)\s+(\S.*?)\s*$/.exec(row);
    if (!m) fail('domblklist', `row ${quote(row)} is not "<type> <device> <target> <source>"`, ctx);
    return { type: m[1]!, device: m[2]!, target: m[3]!, source: m[4] === '-' ? null : m[4]! };
  });
}

// ----------------------------------------------------------------------------------------------------
// XML (dumpxml, checkpoint-dumpxml, capabilities)

type XmlNode = Record<string, unknown>;

const xmlParser = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: '@',
  parseAttributeValue: false,
  parseTagValue: false,
  trimValues: true,
  // libvirt only emits the five predefined entities; no DOCTYPE is accepted (see parseXmlDocument)
  processEntities: true,
  htmlEntities: false,
  isArray: (name) => ['disk', 'channel', 'guest', 'domain', 'backingStore'].includes(name),
});

/** Validates and parses; libvirt never emits a DOCTYPE, so one is hostile input (entity expansion). */
function parseXmlDocument(text: string, command: string, root: string, ctx: ParseContext): XmlNode {
  if (text.trim() === '') fail(command, 'empty output', ctx);
  if (/<!DOCTYPE|<!ENTITY/i.test(text)) fail(command, 'XML with a DOCTYPE/ENTITY declaration is refused', ctx);
  const valid = XMLValidator.validate(text);
  if (valid !== true) {
    fail(command, `malformed XML at line ${valid.err.line}: ${valid.err.msg}`, ctx);
  }
  const doc = xmlParser.parse(text) as XmlNode;
  const top = doc[root];
  const node = Array.isArray(top) ? top[0] : top;
  if (node === undefined || node === null || typeof node !== 'object') {
    const found = Object.keys(doc).filter((k) => !k.startsWith('?'));
    fail(command, `root element is <${found[0] ?? 'none'}>, expected <${root}>`, ctx);
  }
  return node as XmlNode;
}

function child(node: XmlNode | undefined, name: string): XmlNode | undefined {
  const v = node?.[name];
  const first = Array.isArray(v) ? v[0] : v;
  if (first === undefined || first === null) return undefined;
  // an empty element parses as '' ; treat it as a node without content
  return typeof first === 'object' ? (first as XmlNode) : {};
}

function children(node: XmlNode | undefined, name: string): XmlNode[] {
  const v = node?.[name];
  if (v === undefined || v === null) return [];
  return (Array.isArray(v) ? v : [v]).map((x) => (typeof x === 'object' && x !== null ? (x as XmlNode) : {}));
}

function text(node: XmlNode | undefined, name: string): string | undefined {
  const v = node?.[name];
  const first = Array.isArray(v) ? v[0] : v;
  if (first === undefined || first === null) return undefined;
  if (typeof first === 'object') {
    const t = (first as XmlNode)['#text'];
    return t === undefined ? '' : String(t);
  }
  return String(first);
}

function attr(node: XmlNode | undefined, name: string): string | undefined {
  const v = node?.[`@${name}`];
  return v === undefined ? undefined : String(v);
}

export interface BackingImage {
  /** file path, block device, or "protocol:name" for network sources; null when not recorded */
  source: string | null;
  /** qcow2, raw...; null when libvirt did not record it */
  format: string | null;
}

export interface DomainDisk {
  /** file, block, network, volume */
  type: string;
  /** disk, cdrom, floppy, lun */
  device: string;
  target: string;
  bus: string | null;
  /** <driver type=...>: qcow2, raw; null for an empty cdrom */
  driverType: string | null;
  /** the active image libvirt names (for OneStor: .../disk.N.snap/base.1); null for an empty drive */
  source: string | null;
  /** QEMU device alias (virtio-disk0); only present while the domain runs */
  alias: string | null;
  readonly: boolean;
  /** backing images below `source`, nearest first; empty for inactive XML (libvirt fills it at start) */
  backingChain: BackingImage[];
}

export interface DomainXml {
  name: string;
  uuid: string;
  /** kvm or qemu (TCG) */
  type: string;
  /** runtime id; null for an inactive domain */
  id: number | null;
  disks: DomainDisk[];
  hasGuestAgentChannel: boolean;
  /** "connected"/"disconnected" as libvirt saw the guest agent port; null when unknown or no channel */
  guestAgentState: string | null;
}

function diskSource(disk: XmlNode | undefined, type: string | undefined): string | null {
  const src = child(disk, 'source');
  if (!src) return null;
  const direct = attr(src, 'file') ?? attr(src, 'dev') ?? attr(src, 'dir');
  if (direct !== undefined) return direct;
  if (type === 'network') {
    const protocol = attr(src, 'protocol');
    const name = attr(src, 'name');
    if (name !== undefined) return protocol ? `${protocol}:${name}` : name;
  }
  if (type === 'volume') {
    const pool = attr(src, 'pool');
    const volume = attr(src, 'volume');
    if (volume !== undefined) return pool ? `${pool}/${volume}` : volume;
  }
  return null;
}

function backingChainOf(disk: XmlNode, ctx: ParseContext, target: string): BackingImage[] {
  const chain: BackingImage[] = [];
  let node = child(disk, 'backingStore');
  // An empty <backingStore/> ends the chain; a runaway chain is hostile (QEMU caps real ones far lower).
  while (node && Object.keys(node).length > 0) {
    if (chain.length >= 64) fail('dumpxml', `backing chain of ${target} deeper than 64`, ctx);
    chain.push({ source: diskSource(node, attr(node, 'type')), format: attr(child(node, 'format'), 'type') ?? null });
    node = child(node, 'backingStore');
  }
  return chain;
}

const GUEST_AGENT_CHANNEL = 'org.qemu.guest_agent.0';

/** `virsh dumpxml DOM [--inactive]`. */
export function parseDomainXml(xml: string, ctx: ParseContext = {}): DomainXml {
  const dom = parseXmlDocument(xml, 'dumpxml', 'domain', ctx);
  const name = text(dom, 'name');
  const uuid = text(dom, 'uuid');
  const type = attr(dom, 'type');
  if (!name) fail('dumpxml', 'domain without <name>', ctx);
  if (!uuid) fail('dumpxml', `domain '${name}' without <uuid>`, ctx);
  if (!type) fail('dumpxml', `domain '${name}' without a type attribute`, ctx);
  const idAttr = attr(dom, 'id');
  if (idAttr !== undefined && !/^\d+$/.test(idAttr)) fail('dumpxml', `domain id ${quote(idAttr)} is not a number`, ctx);

  const devices = child(dom, 'devices');
  const disks = children(devices, 'disk').map((d): DomainDisk => {
    const target = attr(child(d, 'target'), 'dev');
    if (!target) fail('dumpxml', `a disk of domain '${name}' has no <target dev=...>`, ctx);
    const type = attr(d, 'type') ?? 'file';
    return {
      type,
      device: attr(d, 'device') ?? 'disk',
      target,
      bus: attr(child(d, 'target'), 'bus') ?? null,
      driverType: attr(child(d, 'driver'), 'type') ?? null,
      source: diskSource(d, type),
      alias: attr(child(d, 'alias'), 'name') ?? null,
      readonly: child(d, 'readonly') !== undefined,
      backingChain: backingChainOf(d, ctx, target),
    };
  });
  const agent = children(devices, 'channel')
    .map((c) => child(c, 'target'))
    .find((t) => attr(t, 'type') === 'virtio' && attr(t, 'name') === GUEST_AGENT_CHANNEL);

  return {
    name,
    uuid,
    type,
    id: idAttr === undefined ? null : Number(idAttr),
    disks,
    hasGuestAgentChannel: agent !== undefined,
    guestAgentState: agent ? (attr(agent, 'state') ?? null) : null,
  };
}

// ----------------------------------------------------------------------------------------------------
// checkpoints

export interface CheckpointListEntry {
  name: string;
  /** epoch seconds */
  creationTime: number;
  parent: string | null;
}

/** `virsh checkpoint-list DOM --name`: one name per line (empty output = none). */
export function parseCheckpointNames(text: string): string[] {
  return lines(text)
    .map((l) => l.trim())
    .filter((l) => l !== '');
}

const CHECKPOINT_ROW = /^\s*(.+?)\s+(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})(?:\s+(\S.*?))?\s*$/;

/** `virsh checkpoint-list DOM --parent`: Name | Creation Time | Parent (empty for a root). */
export function parseCheckpointList(text: string, ctx: ParseContext = {}): CheckpointListEntry[] {
  const rows = tableRows(text, 'checkpoint-list', ['Name', 'Creation Time', 'Parent'], ctx);
  return rows.map((row) => {
    const m = CHECKPOINT_ROW.exec(row);
    if (!m) fail('checkpoint-list', `row ${quote(row)} is not "<name> <YYYY-MM-DD hh:mm:ss +zzzz> [parent]"`, ctx);
    const [, name, y, mo, d, h, mi, s, sign, zh, zm, parent] = m;
    const offsetSeconds = (sign === '-' ? -1 : 1) * (Number(zh) * 3600 + Number(zm) * 60);
    const utc = Date.UTC(Number(y), Number(mo) - 1, Number(d), Number(h), Number(mi), Number(s)) / 1000;
    return { name: name!, creationTime: utc - offsetSeconds, parent: parent ?? null };
  });
}

export interface CheckpointDisk {
  /** the disk's target (vda) */
  name: string;
  checkpoint: 'bitmap' | 'no';
  /** the qcow2 persistent bitmap name (for checkpoint='bitmap') */
  bitmap: string | null;
  /**
   * Bytes changed since the checkpoint (dirty clusters), present only with `--size`; ABSENT with --size
   * means libvirt could not read the bitmap: it is broken (after a QEMU crash) or missing.
   */
  size?: number;
}

export interface CheckpointXml {
  name: string;
  parent: string | null;
  /** epoch seconds; null when absent (a checkpoint being defined) */
  creationTime: number | null;
  description: string | null;
  disks: CheckpointDisk[];
  /** whether the XML embeds the <domain> (i.e. it was dumped without --no-domain) */
  hasDomain: boolean;
}

/** `virsh checkpoint-dumpxml DOM NAME [--no-domain] [--size]`. */
export function parseCheckpointXml(xml: string, ctx: ParseContext = {}): CheckpointXml {
  const ck = parseXmlDocument(xml, 'checkpoint-dumpxml', 'domaincheckpoint', ctx);
  const name = text(ck, 'name');
  if (!name) fail('checkpoint-dumpxml', 'checkpoint without <name>', ctx);
  const parent = text(child(ck, 'parent'), 'name');
  const created = text(ck, 'creationTime');
  if (created !== undefined && !/^\d+$/.test(created)) fail('checkpoint-dumpxml', `creationTime ${quote(created)} is not a number`, ctx);
  const disks = children(child(ck, 'disks'), 'disk').map((d): CheckpointDisk => {
    const diskName = attr(d, 'name');
    if (!diskName) fail('checkpoint-dumpxml', `a disk of checkpoint '${name}' has no name`, ctx);
    const mode = attr(d, 'checkpoint') ?? 'bitmap';
    if (mode !== 'bitmap' && mode !== 'no') fail('checkpoint-dumpxml', `disk ${diskName}: checkpoint=${quote(mode)} is not bitmap/no`, ctx);
    const out: CheckpointDisk = { name: diskName, checkpoint: mode, bitmap: attr(d, 'bitmap') ?? null };
    const size = attr(d, 'size');
    if (size !== undefined) {
      if (!/^\d+$/.test(size)) fail('checkpoint-dumpxml', `disk ${diskName}: size ${quote(size)} is not a number`, ctx);
      out.size = Number(size);
    }
    return out;
  });
  return {
    name,
    parent: parent || null,
    creationTime: created === undefined ? null : Number(created),
    description: text(ck, 'description') ?? null,
    disks,
    hasDomain: ck.domain !== undefined,
  };
}

// ----------------------------------------------------------------------------------------------------
// domjobinfo

export type JobType = 'None' | 'Bounded' | 'Unbounded' | 'Completed' | 'Failed' | 'Cancelled';
/** virDomainJobType order: the numbers `--rawstats` prints. */
const JOB_TYPES: readonly JobType[] = ['None', 'Bounded', 'Unbounded', 'Completed', 'Failed', 'Cancelled'];
/** virDomainJobOperation order (libvirt 9.0), with the words virsh prints. */
const JOB_OPERATIONS = [
  'Unknown',
  'Start',
  'Save',
  'Restore',
  'Incoming migration',
  'Outgoing migration',
  'Snapshot',
  'Snapshot revert',
  'Dump',
  'Backup',
  'Snapshot delete',
] as const;

export interface JobInfo {
  type: JobType;
  /** "Backup", "Outgoing migration"...; null when virsh printed none */
  operation: string | null;
  timeElapsedMs?: number;
  /** "Data ..." (migration-style totals) in bytes */
  dataProcessed?: number;
  dataRemaining?: number;
  dataTotal?: number;
  /** "File ..." (disk_*): what a push backup copied, in bytes */
  diskProcessed?: number;
  diskRemaining?: number;
  diskTotal?: number;
  /** pull backup scratch use */
  diskTempUsed?: number;
  diskTempTotal?: number;
  /** present when the job failed or was cancelled (even with type Completed, as after domjobabort) */
  errorMessage?: string;
  /** rawstats "success" (1/0) */
  success?: boolean;
  /** every field as printed, for logs */
  raw: Record<string, string>;
  /** true when sizes came from --rawstats (exact); false when from virsh's rounded human units */
  exact: boolean;
}

const HUMAN_KEYS: Record<string, keyof JobInfo> = {
  'Time elapsed': 'timeElapsedMs',
  'Data processed': 'dataProcessed',
  'Data remaining': 'dataRemaining',
  'Data total': 'dataTotal',
  'File processed': 'diskProcessed',
  'File remaining': 'diskRemaining',
  'File total': 'diskTotal',
  'Temporary disk space use': 'diskTempUsed',
  'Temporary disk space total': 'diskTempTotal',
};

const RAW_KEYS: Record<string, keyof JobInfo> = {
  time_elapsed: 'timeElapsedMs',
  data_processed: 'dataProcessed',
  data_remaining: 'dataRemaining',
  data_total: 'dataTotal',
  disk_processed: 'diskProcessed',
  disk_remaining: 'diskRemaining',
  disk_total: 'diskTotal',
  disk_temp_used: 'diskTempUsed',
  disk_temp_total: 'diskTempTotal',
};

const UNIT_BYTES: Record<string, number> = { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, TiB: 1024 ** 4, PiB: 1024 ** 5, EiB: 1024 ** 6 };

function humanBytes(value: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|PiB|EiB)$/.exec(value);
  return m ? Math.round(Number(m[1]) * UNIT_BYTES[m[2]!]!) : undefined;
}

/** `virsh domjobinfo DOM [--completed] [--keep-completed] [--anystats] [--rawstats]`, human or raw form. */
export function parseJobInfo(text: string, ctx: ParseContext = {}): JobInfo {
  const fields = keyValueLines(text);
  const typeText = fields.get('Job type');
  if (typeText === undefined) fail('domjobinfo', `no "Job type:" line in ${quote(text)}`, ctx);
  const raw: Record<string, string> = Object.fromEntries(fields);
  const exact = /^\d+$/.test(typeText);
  let type: JobType | undefined;
  if (exact) type = JOB_TYPES[Number(typeText)];
  else type = JOB_TYPES.find((t) => t === typeText);
  if (type === undefined) fail('domjobinfo', `job type ${quote(typeText)} is unknown`, ctx);

  const info: JobInfo = { type, operation: null, raw, exact };
  const numberField = (key: keyof JobInfo, value: string, label: string) => {
    let n: number | undefined;
    if (exact) n = /^\d+$/.test(value) ? Number(value) : undefined;
    else if (key === 'timeElapsedMs') {
      const ms = /^(\d+)\s*ms$/.exec(value);
      n = ms ? Number(ms[1]) : undefined;
    }
    else n = humanBytes(value);
    if (n === undefined) fail('domjobinfo', `${label} ${quote(value)} is not a ${exact ? 'number' : 'size'}`, ctx);
    (info as unknown as Record<string, unknown>)[key] = n;
  };

  for (const [key, value] of fields) {
    if (key === 'Job type') continue;
    if (exact) {
      const mapped = RAW_KEYS[key];
      if (mapped) numberField(mapped, value, key);
      else if (key === 'operation') {
        const op = /^\d+$/.test(value) ? JOB_OPERATIONS[Number(value)] : undefined;
        info.operation = op ?? `operation ${value}`;
      } else if (key === 'errmsg') info.errorMessage = value;
      else if (key === 'success') info.success = value === '1';
    } else {
      const mapped = HUMAN_KEYS[key];
      if (mapped) numberField(mapped, value, key);
      else if (key === 'Operation') info.operation = value;
      else if (key === 'Error message') info.errorMessage = value;
    }
  }
  return info;
}

// ----------------------------------------------------------------------------------------------------
// domfsfreeze / domfsthaw, version, capabilities

/** `virsh domfsfreeze DOM` -> "Froze N filesystem(s)"; domfsthaw -> "Thawed N filesystem(s)". */
export function parseFsFreezeCount(text: string, verb: 'Froze' | 'Thawed', ctx: ParseContext = {}): number {
  const m = new RegExp(`^${verb} (\\d+) filesystem\\(s\\)$`, 'm').exec(text.trim());
  if (!m) fail(verb === 'Froze' ? 'domfsfreeze' : 'domfsthaw', `expected "${verb} N filesystem(s)", got ${quote(text.trim())}`, ctx);
  return Number(m[1]);
}

export interface VirshVersion {
  /** "Using library: libvirt X" */
  library: string;
  /** "Running hypervisor: QEMU X"; null when virsh could not ask the daemon */
  hypervisor: string | null;
  /** "Using API: QEMU X" */
  api: string | null;
}

/** `virsh version`. */
export function parseVersion(text: string, ctx: ParseContext = {}): VirshVersion {
  const fields = keyValueLines(text);
  const library = fields.get('Using library');
  if (!library) fail('version', `no "Using library:" line in ${quote(text)}`, ctx);
  return { library, hypervisor: fields.get('Running hypervisor') ?? null, api: fields.get('Using API') ?? null };
}

export interface Capabilities {
  /** domain types any guest arch offers: "qemu" (TCG) and, when /dev/kvm works, "kvm" */
  domainTypes: string[];
  kvm: boolean;
  /** guest architectures (x86_64...) */
  arches: string[];
}

/** `virsh capabilities`. */
export function parseCapabilities(xml: string, ctx: ParseContext = {}): Capabilities {
  const caps = parseXmlDocument(xml, 'capabilities', 'capabilities', ctx);
  const types = new Set<string>();
  const arches = new Set<string>();
  for (const guest of children(caps, 'guest')) {
    const arch = child(guest, 'arch');
    const archName = attr(arch, 'name');
    if (archName) arches.add(archName);
    for (const d of children(arch, 'domain')) {
      const t = attr(d, 'type');
      if (t) types.add(t);
    }
  }
  return { domainTypes: [...types], kvm: types.has('kvm'), arches: [...arches] };
}

// ----------------------------------------------------------------------------------------------------
// errors

export type VirshErrorKind =
  | 'no-domain'
  | 'no-checkpoint'
  | 'checkpoint-inconsistent'
  | 'agent-unavailable'
  | 'agent-not-connected'
  | 'job-active'
  | 'no-job'
  | 'not-running'
  | 'connection'
  | 'other';

export interface ClassifiedVirshError {
  kind: VirshErrorKind;
  /** virsh's "error: " lines joined with ": " (prefix removed), or the trimmed text when it had none */
  message: string;
}

// Order matters: a connection failure can mention a domain, a broken bitmap is also "not found".
const ERROR_RULES: Array<[VirshErrorKind, RegExp]> = [
  ['connection', /failed to connect to the hypervisor|Failed to connect socket|Cannot recv data|End of file while reading data|client socket is closed|no connection driver available/i],
  ['no-domain', /failed to get domain '|Domain not found|no domain with matching (name|uuid|id)/i],
  ['checkpoint-inconsistent', /checkpoint inconsistent|missing or broken bitmap|bitmap '[^']*' not found in backing chain/i],
  ['no-checkpoint', /Domain checkpoint not found|no domain checkpoint with matching name/i],
  ['agent-unavailable', /QEMU guest agent is not configured/i],
  ['agent-not-connected', /Guest agent is not responding|guest agent is not connected|guest agent not available/i],
  ['job-active', /cannot acquire state change lock|another backup job is already running|there is a job running|job is already active|has active block job|domain has active (block )?job/i],
  ['no-job', /no job is active on the domain/i],
  ['not-running', /domain is not running/i],
];

/** Classifies what virsh printed on stderr when it failed. */
export function classifyVirshError(stderr: string): ClassifiedVirshError {
  const errorLines = lines(stderr)
    .map((l) => l.trim())
    .filter((l) => l.startsWith('error: '))
    .map((l) => l.slice('error: '.length));
  const message = errorLines.length > 0 ? errorLines.join(': ') : stderr.trim().split(/\r?\n/).filter(Boolean).join(' ') || 'no error text';
  for (const [kind, re] of ERROR_RULES) {
    if (re.test(message)) return { kind, message };
  }
  return { kind: 'other', message };
}
