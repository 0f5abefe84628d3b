/**
 * The agent's own configuration: a JSON file (default /etc/onestor-agent/config.json), then environment,
 * then command-line overrides, validated ONCE at start and deep-frozen so no code path can change it later.
 * Unknown keys are errors (a typo such as "concurency" must not silently fall back to a default), and every
 * error names the field path and where the value came from.
 */
import { readFile } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import { z } from 'zod';
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import { isSafeHost } from '../discover/one-xml.js';
import * as D from '../shared/defaults.js';

export { DEFAULT_CONFIG_FILE, DEFAULT_IDENTITY_FILE, DEFAULT_KNOWN_HOSTS_FILE } from '../shared/defaults.js';

/** Environment: ONESTOR_AGENT_CONFIG picks the file (explicit: must exist); ONESTOR_AGENT_LOG_LEVEL sets log.level. */
export const ENV_CONFIG_FILE = 'ONESTOR_AGENT_CONFIG';
export const ENV_LOG_LEVEL = 'ONESTOR_AGENT_LOG_LEVEL';

const MAX_CONFIG_BYTES = 1024 * 1024;

function int(min: number, max: number) {
  const msg = `expected integer ${min}..${max}`;
  return z.number({ error: msg }).int({ error: msg }).min(min, { error: msg }).max(max, { error: msg });
}

function num(min: number, max: number) {
  const msg = `expected number ${min}..${max}`;
  return z.number({ error: msg }).min(min, { error: msg }).max(max, { error: msg });
}

const absPath = z
  .string({ error: 'expected an absolute path' })
  .refine((p) => isAbsolute(p) && !p.includes('\0') && !p.includes('\n'), { error: 'expected an absolute path' });

/** A program: bare name looked up in PATH, or an absolute path (never relative to the daemon's cwd). */
const program = z
  .string({ error: 'expected a program name or absolute path' })
  .refine((p) => (isAbsolute(p) || /^[A-Za-z0-9._+-]+$/.test(p)) && !p.startsWith('-') && !p.includes('\0'), {
    error: 'expected a program name or absolute path',
  });

const host = z.string({ error: 'expected a host name or IP address' }).refine(isSafeHost, { error: 'expected a host name or IP address' });

const nullable = <T extends z.ZodType>(schema: T) => z.union([z.null(), schema]);


const replicaSchema = z.strictObject({
  /** null = the user the agent runs as (oneadmin under systemd), as upstream's ssh does */
  user: nullable(
    z.string({ error: 'expected a user name' }).regex(/^[a-z_][a-z0-9_-]{0,31}$/, { error: 'expected a user name' }),
  ).default(null),
  port: int(1, 65535).default(22),
  /** when this default is absent, the running user's ~/.ssh/id_ed25519, id_ecdsa or id_rsa (upstream's keys) */
  identityFile: absPath.default(D.DEFAULT_IDENTITY_FILE),
  /** when this default is absent, the running user's ~/.ssh/known_hosts */
  knownHostsFile: absPath.default(D.DEFAULT_KNOWN_HOSTS_FILE),
  acceptNewHostKey: z.boolean({ error: 'expected true or false' }).default(false),
  /** REPLICA_STORAGE_IP: in OpenNebula a host attribute only the front-end sees; here configuration. */
  storageIp: nullable(host).default(null),
  /** Use this instead of ds.xml's REPLICA_HOST (tests, unusual networks). */
  hostOverride: nullable(host).default(null),
  receiverCommand: z
    .string({ error: 'expected a command line' })
    .min(1, { error: 'expected a command line' })
    .refine((s) => !/[\n\0]/.test(s), { error: 'expected a single-line command' })
    .default(D.DEFAULT_RECEIVER_COMMAND),
  connectTimeoutSec: int(1, 600).default(20),
  keepaliveSec: int(0, 3600).default(15),
  /**
   * What carries the session: the system's `ssh` (less CPU per byte on the hypervisor), pinned to the keys
   * known_hosts holds for the replica, with ssh2 for what ssh cannot do here (an unknown host, a key to
   * explain); or ssh2 only.
   */
  transport: z.enum(['openssh', 'ssh2'], { error: 'expected "openssh" or "ssh2"' }).default(D.DEFAULT_REPLICA_TRANSPORT),
  ciphers: z
    .array(z.string().regex(/^[a-z0-9@.-]{1,64}$/, { error: 'expected an SSH cipher name' }), { error: 'expected a list of cipher names' })
    .min(1, { error: 'expected at least one cipher' })
    .default(() => [...D.DEFAULT_CIPHERS]),
});

const limitsSchema = z.strictObject({
  concurrency: int(1, 64).default(2),
  /** 0 = unlimited */
  bandwidthMBps: num(0, 100_000).default(0),
  stagingMinFreePercent: num(0, 99).default(5),
  captureTimeoutSec: int(1, 7 * 86400).default(3600),
  /** one disk's uploads to the replica; past it the disk fails with E_TIMEOUT and the next cycle resumes */
  transferTimeoutSec: int(1, 7 * 86400).default(21600),
});

const scheduleSchema = z
  .strictObject({
    rescanSec: int(1, 86400).default(60),
    graceMinSec: int(0, 86400).default(60),
    gracePercent: num(0, 100).default(10),
    backoffBaseSec: int(1, 86400).default(30),
    backoffMaxSec: int(1, 7 * 86400).default(1800),
    /** 0 = derive from the number of disks and their frequencies */
    spreadSec: int(0, 86400).default(0),
  })
  .superRefine((value, ctx) => {
    if (value.backoffMaxSec < value.backoffBaseSec) {
      ctx.addIssue({
        code: 'custom',
        path: ['backoffMaxSec'],
        message: `must be >= schedule.backoffBaseSec (${value.backoffBaseSec})`,
      });
    }
  });

const receiverSchema = z.strictObject({
  /** null = REPLICA_RECOVERY_SNAPS_DIR from sshrc */
  snapsDir: nullable(absPath).default(null),
  maxSessions: int(1, D.RECEIVER_DEFAULTS.maxSessionsLimit).default(D.RECEIVER_DEFAULTS.maxSessions),
  /** null = REPLICA_COPY_LOCK_TIMEOUT from sshrc */
  lockTimeoutSec: nullable(int(0, 7 * 86400)).default(null),
  busyWaitSec: int(0, 86400).default(D.RECEIVER_DEFAULTS.busyWaitSec),
  /** null = REPLICA_MAX_USED_PERC from sshrc */
  maxUsedPercent: nullable(int(1, 100)).default(null),
  /** most sessions one host (identity) may hold at once; null = half of maxSessions, rounded up */
  maxSessionsPerHost: nullable(int(1, D.RECEIVER_DEFAULTS.maxSessionsLimit)).default(null),
  /** session time limits (README "Receiver limits"; lib/replica/session-watch.ts) */
  helloTimeoutSec: int(1, 3600).default(D.RECEIVER_DEFAULTS.helloTimeoutSec),
  idleTimeoutSec: int(1, 86400).default(D.RECEIVER_DEFAULTS.idleTimeoutSec),
  drainTimeoutSec: int(1, 86400).default(D.RECEIVER_DEFAULTS.drainTimeoutSec),
  progressWindowSec: int(1, 86400).default(D.RECEIVER_DEFAULTS.progressWindowSec),
  minProgressKiB: int(0, 1024 * 1024).default(D.RECEIVER_DEFAULTS.minProgressKiB),
  maxSessionSec: int(1, 30 * 86400).default(D.RECEIVER_DEFAULTS.maxSessionSec),
  /**
   * Refuse an upload up front when it would take the filesystem past REPLICA_MAX_USED_PERC. Off only where
   * statfs cannot tell (compressing or deduplicating filesystems); a real ENOSPC is handled either way.
   */
  spaceCheck: z.boolean().default(true),
  /** false: uploads go through the page cache (default: O_DIRECT where the filesystem takes it) */
  directIo: z.boolean().default(true),
});

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

export const ConfigSchema = z.strictObject({
  datastoreLocation: absPath.default(D.DEFAULT_DATASTORE_LOCATION),
  sshrcPaths: z
    .array(absPath, { error: 'expected a list of absolute paths' })
    .min(1, { error: 'expected at least one path' })
    .default(() => [...D.DEFAULT_SSHRC_PATHS]),
  stateDir: absPath.default(D.DEFAULT_STATE_DIR),
  /** this host's name as recorded on the replica (sourceHost); null = the system host name */
  hostName: nullable(z.string().regex(/^[A-Za-z0-9._-]{1,253}$/, { error: 'expected a host name' })).default(null),
  libvirtUri: z
    .string({ error: 'expected a libvirt URI' })
    .regex(/^[a-z][a-z0-9+.-]*:\/\/[^\s]*$/, { error: 'expected a libvirt URI such as qemu:///system' })
    .default(D.DEFAULT_LIBVIRT_URI),
  virsh: program.default('virsh'),
  qemuImg: program.default('qemu-img'),
  /** DS/<stagingDirName>/VMID: same filesystem as the disks, outside every VM dir (must not be numeric). */
  stagingDirName: z
    .string({ error: 'expected a directory name' })
    .refine((s) => /^[A-Za-z0-9._-]{1,64}$/.test(s) && s !== '.' && s !== '..' && !/^[0-9]+$/.test(s), {
      error: 'expected a plain non-numeric directory name (a numeric name would collide with VM dirs)',
    })
    .default(D.DEFAULT_STAGING_DIR_NAME),
  replica: replicaSchema.prefault({}),
  limits: limitsSchema.prefault({}),
  schedule: scheduleSchema.prefault({}),
  receiver: receiverSchema.prefault({}),
  log: z
    .strictObject({ level: z.enum(LOG_LEVELS, { error: `expected one of ${LOG_LEVELS.join(', ')}` }).default('info') })
    .prefault({}),
  // No `probe` section: the probes read no config file (start-up time, and a broken config must not blind
  // monitoring); their time budget is the probe command's own. A `probe.timeoutMs` here was never read.
  /** Where to write a Prometheus textfile-collector file; null = don't. */
  prometheusTextfile: nullable(absPath).default(null),
});

type DeepReadonly<T> = T extends (infer U)[]
  ? readonly DeepReadonly<U>[]
  : T extends object
    ? { readonly [K in keyof T]: DeepReadonly<T[K]> }
    : T;

type DeepPartial<T> = T extends (infer U)[] ? U[] : T extends object ? { [K in keyof T]?: DeepPartial<T[K]> } : T;

export type Config = DeepReadonly<z.output<typeof ConfigSchema>>;
/** What CLI flags may override (any subset of any section). */
export type PartialConfig = DeepPartial<z.output<typeof ConfigSchema>>;

/** One line per problem: "SOURCE: field.path: what is wrong". Unknown keys get one line each. */
export function describeConfigErrors(issues: readonly z.core.$ZodIssue[], source: string | ((path: readonly PropertyKey[]) => string)): string[] {
  const where = typeof source === 'function' ? source : () => source;
  const lines: string[] = [];
  for (const issue of issues) {
    if (issue.code === 'unrecognized_keys') {
      for (const key of issue.keys) {
        const path = [...issue.path, key];
        lines.push(`${where(path)}: ${formatPath(path)}: unknown key (typo?)`);
      }
      continue;
    }
    let message = issue.message;
    if (issue.code === 'invalid_type' && message.startsWith('Invalid input: ')) message = message.slice('Invalid input: '.length);
    lines.push(`${where(issue.path)}: ${formatPath(issue.path) || '(top level)'}: ${message}`);
  }
  return lines;
}

function formatPath(path: readonly PropertyKey[]): string {
  return path.map((p, i) => (typeof p === 'number' ? `[${p}]` : `${i ? '.' : ''}${String(p)}`)).join('');
}

function deepFreeze<T>(value: T): T {
  if (value && typeof value === 'object' && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const v of Object.values(value as Record<string, unknown>)) deepFreeze(v);
  }
  return value;
}

/**
 * Validates an already-parsed object (the JSON file content, possibly merged with overrides). Pure.
 * Throws OnestorError(E_CONFIG) whose message lists every problem, each naming field path and source.
 */
export function parseConfig(obj: unknown, source: string | ((path: readonly PropertyKey[]) => string)): Config {
  const result = ConfigSchema.safeParse(obj);
  if (!result.success) {
    const lines = describeConfigErrors(result.error.issues, source);
    const first = result.error.issues[0];
    const label = typeof source === 'string' ? source : source([]);
    throw new OnestorError(ErrorCodes.CONFIG, `invalid configuration:\n  ${lines.join('\n  ')}`, {
      file: label,
      ...(first ? { field: formatPath(first.code === 'unrecognized_keys' ? [...first.path, ...first.keys.slice(0, 1)] : first.path) } : {}),
      problems: lines,
    });
  }
  return deepFreeze(result.data) as Config;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Deep merge where `over` wins; arrays and scalars are replaced, undefined leaves the base value. */
function merge(base: unknown, over: unknown): unknown {
  if (over === undefined) return base;
  if (!isPlainObject(base) || !isPlainObject(over)) return over;
  const out: Record<string, unknown> = { ...base };
  for (const [k, v] of Object.entries(over)) {
    // defineProperty, not assignment: a "__proto__" key must stay an own key (and be refused as unknown)
    const prev = Object.prototype.hasOwnProperty.call(base, k) ? base[k] : undefined;
    Object.defineProperty(out, k, { value: merge(prev, v), enumerable: true, writable: true, configurable: true });
  }
  return out;
}

function hasPath(obj: unknown, path: readonly PropertyKey[]): boolean {
  let cur: unknown = obj;
  for (const p of path) {
    if (!isPlainObject(cur) || !(String(p) in cur) || cur[String(p)] === undefined) return false;
    cur = cur[String(p)];
  }
  return path.length > 0;
}

export interface LoadConfigOptions {
  /** Config file; when absent: $ONESTOR_AGENT_CONFIG, else the default path (which may be missing). */
  file?: string;
  /** From CLI flags; wins over file and environment. */
  overrides?: PartialConfig;
  /** Defaults to process.env. */
  env?: NodeJS.ProcessEnv;
}

/** Reads, merges (defaults < file < environment < overrides), validates and freezes the configuration. */
export async function loadConfig(opts: LoadConfigOptions = {}): Promise<Config> {
  const env = opts.env ?? process.env;
  const explicit = opts.file ?? env[ENV_CONFIG_FILE];
  const file = explicit ?? D.DEFAULT_CONFIG_FILE;

  let fromFile: unknown = {};
  let text: string | null = null;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (!(code === 'ENOENT' && explicit === undefined)) {
      throw new OnestorError(ErrorCodes.CONFIG, `cannot read config file: ${(e as Error).message}`, { file }, { cause: e });
    }
  }
  if (text !== null) {
    if (text.length > MAX_CONFIG_BYTES) throw new OnestorError(ErrorCodes.CONFIG, 'config file too large', { file });
    try {
      fromFile = JSON.parse(text);
    } catch (e) {
      throw new OnestorError(ErrorCodes.CONFIG, `not valid JSON: ${(e as Error).message}`, { file }, { cause: e });
    }
    if (!isPlainObject(fromFile)) {
      throw new OnestorError(ErrorCodes.CONFIG, 'expected a JSON object at the top level', { file });
    }
  }

  const fromEnv: Record<string, unknown> = {};
  const level = env[ENV_LOG_LEVEL];
  if (level !== undefined && level !== '') fromEnv['log'] = { level };

  const merged = merge(merge(fromFile, fromEnv), opts.overrides ?? {});
  const fileLabel = text === null ? `${file} (absent, defaults)` : file;
  const sourceOf = (path: readonly PropertyKey[]): string => {
    if (hasPath(opts.overrides, path)) return 'command line';
    if (hasPath(fromEnv, path)) return `environment ${ENV_LOG_LEVEL}`;
    return fileLabel;
  };
  return parseConfig(merged, sourceOf);
}
