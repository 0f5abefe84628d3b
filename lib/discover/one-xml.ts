/**
 * Readers for the two documents OpenNebula writes into every VM dir at deploy: `vm.xml` (`<VM>`) and
 * `ds.xml` (`<DATASTORE>`). Pure: text in, data out.
 *
 * These files are written by oned but their content comes partly from users (templates), so they are
 * treated as untrusted: no DTD or custom entities (billion laughs), a size cap, a nesting cap, full
 * well-formedness validation first (the parser alone accepts a truncated file), and every value we use is
 * checked for shape. Fields are looked up by element name, tolerant of order and unknown extras.
 */
import { XMLParser, XMLValidator } from 'fast-xml-parser';
import { ErrorCodes, OnestorError, type ErrorCode } from '../shared/errors.js';

/** Bounds for RECOVERY_SNAPSHOT_FREQ: below 10 s the cycle itself dominates, above 30 days it is a typo. */
export const MIN_FREQ_SECONDS = 10;
export const MAX_FREQ_SECONDS = 30 * 86400;

/** vm.xml with a long history is a few hundred KiB; anything near this is not a real OpenNebula file. */
export const MAX_ONE_XML_BYTES = 4 * 1024 * 1024;
const MAX_NESTING = 64;

export interface VmDisk {
  diskId: number;
  target?: string;
  /** Valid frequency in seconds; null when the attribute is absent OR invalid (see freqRaw / freqError). */
  freq: number | null;
  /** The attribute's text as written, when present. */
  freqRaw?: string;
  /** Why freqRaw was rejected (names file, field and VM); set only when present and invalid. */
  freqError?: string;
  driver?: string;
  source?: string;
  datastoreId?: number;
  tmMad?: string;
  type?: string;
}

export interface VmDoc {
  id: number;
  name: string;
  /** /VM/DEPLOY_ID when non-empty (often empty in vm.xml: it is written before the deploy). */
  deployId?: string;
  /** Set when DEPLOY_ID is present but not a usable libvirt domain name. */
  deployIdError?: string;
  state?: number;
  lcmState?: number;
  /** /VM/TEMPLATE/TM_MAD_SYSTEM */
  tmMadSystem?: string;
  /** DS_ID of the last HISTORY record (the system datastore the VM was last deployed on). */
  historyDsId?: number;
  /** DISK_ID of the context CD-ROM (TEMPLATE/CONTEXT/DISK_ID): a plain ISO file, never protected. */
  contextDiskId?: number;
  disks: VmDisk[];
  /** DISK elements that could not be used (no or bad DISK_ID), as human-readable reasons. */
  diskProblems: string[];
}

export interface DsDoc {
  id: number;
  name?: string;
  tmMad?: string;
  dsMad?: string;
  /** TYPE: 0 image, 1 system, 2 file */
  type?: number;
  basePath?: string;
  /** Validated /DATASTORE/TEMPLATE/REPLICA_HOST; null when absent or invalid. */
  replicaHost: string | null;
  replicaHostRaw?: string;
  /** Why REPLICA_HOST was rejected (names file and field). */
  replicaHostError?: string;
}

// Every element becomes an array of (string | object), so "one DISK vs many" needs no special case.
type XmlNode = { [tag: string]: XmlValue[] };
type XmlValue = string | XmlNode;

// fast-xml-parser refuses these as tag names (prototype pollution guard) and would throw; a user template
// could contain them, so rename instead of failing the whole document.
const RESERVED_TAGS = new Set(['__proto__', 'constructor', 'prototype']);

const parser = new XMLParser({
  ignoreAttributes: true,
  parseTagValue: false,
  trimValues: true,
  isArray: () => true,
  processEntities: true, // only the predefined XML entities: DOCTYPE is rejected before parsing
  htmlEntities: false,
  ignoreDeclaration: true,
  ignorePiTags: true,
  maxNestedTags: MAX_NESTING,
  transformTagName: (name: string) => (RESERVED_TAGS.has(name) ? `#${name}` : name),
});

function fail(code: ErrorCode, file: string, message: string, extra: { field?: string; vm?: number } = {}): never {
  throw new OnestorError(code, message, { file, ...extra });
}

/** Validates and parses; returns the root element's node. */
function parseDocument(text: string, file: string, rootName: string, code: ErrorCode): XmlNode {
  if (typeof text !== 'string') fail(code, file, 'not text');
  if (text.length > MAX_ONE_XML_BYTES) {
    fail(code, file, `file too large (${text.length} bytes, limit ${MAX_ONE_XML_BYTES})`);
  }
  if (text.trim() === '') fail(code, file, 'empty file');
  // OpenNebula never writes a DTD; refusing it outright removes entity expansion attacks at the root.
  if (/<!DOCTYPE|<!ENTITY/i.test(text)) fail(code, file, 'DOCTYPE/ENTITY declarations are not accepted');
  let validation: ReturnType<typeof XMLValidator.validate>;
  try {
    validation = XMLValidator.validate(text);
  } catch (e) {
    fail(code, file, `malformed XML: ${(e as Error).message}`);
  }
  if (validation !== true) {
    const { msg, line } = validation.err;
    fail(code, file, `malformed XML at line ${line}: ${msg}`);
  }
  let doc: XmlNode;
  try {
    doc = parser.parse(text) as XmlNode;
  } catch (e) {
    fail(code, file, `malformed XML: ${(e as Error).message}`);
  }
  const roots = Object.keys(doc);
  const root = doc[rootName];
  if (roots.length !== 1 || !root || root.length !== 1) {
    fail(code, file, `expected a single <${rootName}> root element, found ${roots.map((r) => `<${r}>`).join(', ') || 'none'}`);
  }
  const node = root[0];
  if (typeof node !== 'object') fail(code, file, `<${rootName}> has no child elements`);
  return node;
}

/** Children named tag that are elements (objects). */
function elements(node: XmlNode | undefined, tag: string): XmlNode[] {
  const v = node?.[tag];
  if (!v) return [];
  return v.filter((x): x is XmlNode => typeof x === 'object');
}

type TextLookup = { kind: 'absent' } | { kind: 'text'; value: string } | { kind: 'bad'; why: string };

/** The text of a single-valued child element; reports repeats and elements where text was expected. */
function text(node: XmlNode | undefined, tag: string): TextLookup {
  const v = node?.[tag];
  if (!v || v.length === 0) return { kind: 'absent' };
  if (v.length > 1) return { kind: 'bad', why: `appears ${v.length} times` };
  const only = v[0];
  if (typeof only !== 'string') {
    // <X/> parses as "", <X><Y/></X> as an object
    return Object.keys(only ?? {}).length === 0 ? { kind: 'text', value: '' } : { kind: 'bad', why: 'has child elements, expected text' };
  }
  return { kind: 'text', value: only.trim() };
}

function optionalText(node: XmlNode | undefined, tag: string): string | undefined {
  const t = text(node, tag);
  return t.kind === 'text' && t.value !== '' ? t.value : undefined;
}

const NON_NEGATIVE_INT = /^[0-9]{1,9}$/;

function optionalInt(node: XmlNode | undefined, tag: string): number | undefined {
  const v = optionalText(node, tag);
  return v !== undefined && NON_NEGATIVE_INT.test(v) ? Number(v) : undefined;
}

function requiredId(node: XmlNode, path: string, file: string, code: ErrorCode): number {
  const t = text(node, 'ID');
  if (t.kind === 'absent') fail(code, file, `${path} is missing`, { field: path });
  if (t.kind === 'bad') fail(code, file, `${path} ${t.why}`, { field: path });
  if (!NON_NEGATIVE_INT.test(t.value)) {
    fail(code, file, `${path}=${JSON.stringify(clip(t.value))} is not a non-negative integer`, { field: path });
  }
  return Number(t.value);
}

/** Keeps error messages short when a hostile value is huge. */
function clip(s: string, max = 64): string {
  return s.length > max ? `${s.slice(0, max)}...(${s.length} chars)` : s;
}

/** libvirt domain names as OpenNebula makes them (one-N), conservatively: no leading '-', no blanks/quotes. */
const DOMAIN_NAME = /^[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,127}$/;

export function isValidDomainName(name: string): boolean {
  return DOMAIN_NAME.test(name);
}

/**
 * Host names and addresses that are safe to hand to an SSH connection: an RFC 1123 host name, an IPv4
 * address, or an IPv6 address (optionally in brackets). No blanks, no leading '-', no shell metacharacters,
 * no user@ or :port parts.
 */
export function isSafeHost(host: string): boolean {
  if (host.length === 0 || host.length > 253) return false;
  if (/^\d{1,3}(\.\d{1,3}){3}$/.test(host)) return host.split('.').every((o) => Number(o) <= 255);
  const v6 = host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host;
  if (v6.includes(':')) return /^[0-9A-Fa-f:.]{2,45}$/.test(v6) && (v6.match(/::/g) ?? []).length <= 1 && v6.split(':').length <= 8 + 1;
  // a name that is all digits and dots but not a valid IPv4 (e.g. 300.1.1.1) is a typo, not a host
  if (/^[\d.]+$/.test(host)) return false;
  const labels = host.endsWith('.') ? host.slice(0, -1).split('.') : host.split('.');
  return labels.every((l) => /^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/.test(l));
}

function diskPath(diskId: number | string, attr: string): string {
  return `/VM/TEMPLATE/DISK[DISK_ID=${diskId}]/${attr}`;
}

/**
 * RECOVERY_SNAPSHOT_FREQ must be a positive whole number of seconds within sane bounds. Returns the number
 * or an error text naming file, field and VM.
 */
export function checkFreq(raw: string, file: string, vmId: number, diskId: number): number | string {
  const field = diskPath(diskId, 'RECOVERY_SNAPSHOT_FREQ');
  const v = raw.trim();
  if (!/^[0-9]{1,12}$/.test(v)) {
    return `${file}: ${field}=${JSON.stringify(clip(raw))} is not a whole number of seconds (vm ${vmId})`;
  }
  const n = Number(v);
  if (n < MIN_FREQ_SECONDS || n > MAX_FREQ_SECONDS) {
    return `${file}: ${field}=${n} is outside ${MIN_FREQ_SECONDS}..${MAX_FREQ_SECONDS} seconds (vm ${vmId})`;
  }
  return n;
}

/** Parses vm.xml. Throws E_VM_XML for a document that cannot be used at all (malformed, no /VM/ID). */
export function parseVmXml(xml: string, file: string): VmDoc {
  const code = ErrorCodes.VM_XML;
  const vm = parseDocument(xml, file, 'VM', code);
  const id = requiredId(vm, '/VM/ID', file, code);
  const nameLookup = text(vm, 'NAME');
  const doc: VmDoc = {
    id,
    name: nameLookup.kind === 'text' ? nameLookup.value : '',
    disks: [],
    diskProblems: [],
  };

  const deploy = text(vm, 'DEPLOY_ID');
  if (deploy.kind === 'bad') doc.deployIdError = `${file}: /VM/DEPLOY_ID ${deploy.why} (vm ${id})`;
  else if (deploy.kind === 'text' && deploy.value !== '') {
    if (isValidDomainName(deploy.value)) doc.deployId = deploy.value;
    else doc.deployIdError = `${file}: /VM/DEPLOY_ID=${JSON.stringify(clip(deploy.value))} is not a valid domain name (vm ${id})`;
  }
  const state = optionalInt(vm, 'STATE');
  if (state !== undefined) doc.state = state;
  const lcm = optionalInt(vm, 'LCM_STATE');
  if (lcm !== undefined) doc.lcmState = lcm;

  const templateCount = vm['TEMPLATE']?.length ?? 0;
  if (templateCount > 1) fail(code, file, `/VM/TEMPLATE appears ${templateCount} times`, { field: '/VM/TEMPLATE', vm: id });
  const templates = elements(vm, 'TEMPLATE');
  const template = templates[0];
  const tmMadSystem = optionalText(template, 'TM_MAD_SYSTEM');
  if (tmMadSystem !== undefined) doc.tmMadSystem = tmMadSystem;

  const ctxDiskId = optionalInt(elements(template, 'CONTEXT')[0], 'DISK_ID');
  if (ctxDiskId !== undefined) doc.contextDiskId = ctxDiskId;

  const history = elements(elements(vm, 'HISTORY_RECORDS')[0], 'HISTORY');
  const lastHistory = history[history.length - 1];
  const histDs = optionalInt(lastHistory, 'DS_ID');
  if (histDs !== undefined) doc.historyDsId = histDs;

  const rawDisks = template?.['DISK'] ?? [];
  rawDisks.forEach((raw, index) => {
    const position = `/VM/TEMPLATE/DISK[${index + 1}]`;
    if (typeof raw !== 'object') {
      doc.diskProblems.push(`${file}: ${position} has no attributes (vm ${id})`);
      return;
    }
    const diskIdText = text(raw, 'DISK_ID');
    if (diskIdText.kind !== 'text' || !NON_NEGATIVE_INT.test(diskIdText.value)) {
      const why = diskIdText.kind === 'absent' ? ' is missing' : diskIdText.kind === 'bad' ? ` ${diskIdText.why}` : `=${JSON.stringify(clip(diskIdText.value))} is not a disk number`;
      doc.diskProblems.push(`${file}: ${position}/DISK_ID${why} (vm ${id})`);
      return;
    }
    const diskId = Number(diskIdText.value);
    const disk: VmDisk = { diskId, freq: null };
    const freq = text(raw, 'RECOVERY_SNAPSHOT_FREQ');
    if (freq.kind === 'bad') {
      disk.freqRaw = '';
      disk.freqError = `${file}: ${diskPath(diskId, 'RECOVERY_SNAPSHOT_FREQ')} ${freq.why} (vm ${id})`;
    } else if (freq.kind === 'text') {
      disk.freqRaw = freq.value;
      const checked = checkFreq(freq.value, file, id, diskId);
      if (typeof checked === 'number') disk.freq = checked;
      else disk.freqError = checked;
    }
    const target = optionalText(raw, 'TARGET');
    // TARGET is informational (logs, status); only keep a device-like name
    if (target !== undefined && /^[a-z]{1,4}[a-z0-9]{0,8}$/.test(target)) disk.target = target;
    const driver = optionalText(raw, 'DRIVER');
    if (driver !== undefined) disk.driver = driver;
    const source = optionalText(raw, 'SOURCE');
    if (source !== undefined) disk.source = source;
    const dsId = optionalInt(raw, 'DATASTORE_ID');
    if (dsId !== undefined) disk.datastoreId = dsId;
    const tmMad = optionalText(raw, 'TM_MAD');
    if (tmMad !== undefined) disk.tmMad = tmMad;
    const type = optionalText(raw, 'TYPE');
    if (type !== undefined) disk.type = type;
    doc.disks.push(disk);
  });
  return doc;
}

/** Parses ds.xml. Throws E_DS_XML for a document that cannot be used at all (malformed, no /DATASTORE/ID). */
export function parseDsXml(xml: string, file: string): DsDoc {
  const code = ErrorCodes.DS_XML;
  const ds = parseDocument(xml, file, 'DATASTORE', code);
  const id = requiredId(ds, '/DATASTORE/ID', file, code);
  const doc: DsDoc = { id, replicaHost: null };
  const name = optionalText(ds, 'NAME');
  if (name !== undefined) doc.name = name;
  const tmMad = optionalText(ds, 'TM_MAD');
  if (tmMad !== undefined) doc.tmMad = tmMad;
  const dsMad = optionalText(ds, 'DS_MAD');
  if (dsMad !== undefined) doc.dsMad = dsMad;
  const type = optionalInt(ds, 'TYPE');
  if (type !== undefined) doc.type = type;
  const basePath = optionalText(ds, 'BASE_PATH');
  if (basePath !== undefined) doc.basePath = basePath;

  const templates = elements(ds, 'TEMPLATE');
  const field = '/DATASTORE/TEMPLATE/REPLICA_HOST';
  const templateCount = ds['TEMPLATE']?.length ?? 0;
  if (templateCount > 1) {
    doc.replicaHostError = `${file}: /DATASTORE/TEMPLATE appears ${templateCount} times`;
    return doc;
  }
  const rh = text(templates[0], 'REPLICA_HOST');
  if (rh.kind === 'bad') {
    doc.replicaHostError = `${file}: ${field} ${rh.why}`;
  } else if (rh.kind === 'text' && rh.value !== '') {
    doc.replicaHostRaw = rh.value;
    if (isSafeHost(rh.value)) doc.replicaHost = rh.value;
    else doc.replicaHostError = `${file}: ${field}=${JSON.stringify(clip(rh.value))} is not a host name or IP address`;
  }
  return doc;
}
