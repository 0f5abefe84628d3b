/**
 * What each command is, for `--help`: usage, options and exit codes per command. Pure data and string
 * formatting, so the entry can print help without loading any command (and a test can check it).
 */
import { Exit, EXIT_TABLE } from '../exit-codes.js';
import {
  DEFAULT_CONFIG_FILE,
  DEFAULT_DATASTORE_LOCATION,
  DEFAULT_IDENTITY_FILE,
  DEFAULT_KNOWN_HOSTS_FILE,
  DEFAULT_LIBVIRT_URI,
  DEFAULT_RECEIVER_COMMAND,
  DEFAULT_SSHRC_PATHS,
  DEFAULT_STATE_DIR,
  RECEIVER_DEFAULTS as R,
} from '../../lib/shared/defaults.js';
import { HEARTBEAT_MAX_AGE_SEC } from '../../lib/monitor/assessment.js';

export interface CommandSpec {
  name: string;
  summary: string;
  usage: string;
  /** [flag, meaning] specific to this command */
  options: ReadonlyArray<readonly [string, string]>;
  /** takes the common config options (config file, paths, replica login, log level) */
  common: boolean;
  exits: ReadonlyArray<readonly [number, string]>;
  /** where pino logs go; false = the command builds no logger (probe: start-up time matters) */
  /** receive: stderr through a sink that drops lines the agent does not read (a blocked pipe would freeze the receiver's timers) */
  logs: 'stdout' | 'stderr' | 'stderr-dropping' | false;
}

const USAGE_EXIT = [Exit.USAGE, 'usage or configuration error'] as const;

/** Common options (each overrides the config file); `receive`-only ones are listed with receive. */
export const COMMON_OPTIONS: ReadonlyArray<readonly [string, string]> = [
  ['--config FILE', `agent config (JSON; default ${DEFAULT_CONFIG_FILE})`],
  ['--datastores DIR', `DATASTORE_LOCATION (default ${DEFAULT_DATASTORE_LOCATION})`],
  ['--state-dir DIR', `agent state (default ${DEFAULT_STATE_DIR})`],
  ['--libvirt-uri URI', `libvirt connection (default ${DEFAULT_LIBVIRT_URI})`],
  ['--sshrc FILE', `ssh TM driver settings (default ${DEFAULT_SSHRC_PATHS.join(', else ')})`],
  ['--replica-host HOST', 'connect here instead of REPLICA_HOST / REPLICA_STORAGE_IP'],
  ['--replica-port N', 'SSH port of the replica (default 22)'],
  ['--replica-user USER', 'SSH user on the replica (default: the user running the agent, oneadmin under systemd, as upstream\'s ssh does)'],
  ['--identity FILE', `private key for the replica (default: the dedicated key install.sh makes, ${DEFAULT_IDENTITY_FILE}, else ~/.ssh/id_*)`],
  ['--known-hosts FILE', `known_hosts for the replica's host key (default: ${DEFAULT_KNOWN_HOSTS_FILE}, else ~/.ssh/known_hosts)`],
  ['--accept-new-host-key', 'record an unknown replica host key (a changed key is always refused)'],
  ['--receiver-command CMD', `command run on the replica (default "${DEFAULT_RECEIVER_COMMAND}")`],
  ['--bandwidth-mbps N', 'cap on what this host sends, all transfers together (MB/s; 0 = none)'],
  ['--log-level LEVEL', 'trace|debug|info|warn|error (default info)'],
  ['--host-name NAME', "this host's name as recorded on the replica (default: the system's)"],
];

export const COMMANDS: readonly CommandSpec[] = [
  {
    name: 'run',
    summary: 'the daemon (systemd): snapshot every protected disk on its schedule',
    usage: 'onestor-agent run [options]',
    options: [],
    common: true,
    exits: [
      [Exit.OK, 'stopped on SIGTERM/SIGINT after winding down its cycles'],
      [Exit.FAILED, 'could not start (state dir, libvirt, ...)'],
      USAGE_EXIT,
    ],
    logs: 'stdout',
  },
  {
    name: 'status',
    summary: 'am I protected? one line per disk, same verdict as the probes',
    usage: 'onestor-agent status [--json] [options]',
    options: [['--json', 'the report as JSON']],
    common: true,
    exits: [
      [Exit.OK, 'every protected disk has a current snapshot (or is still getting its first one)'],
      [Exit.FAILED, 'unexpected error'],
      USAGE_EXIT,
      [Exit.NOT_PROTECTED, 'a protected disk is overdue or failing'],
      [Exit.DAEMON_DOWN, `protected disks exist but the daemon is not running (heartbeat older than ${HEARTBEAT_MAX_AGE_SEC} s)`],
    ],
    logs: 'stderr',
  },
  {
    name: 'list',
    summary: 'discovery only: which disks are protected, which are not and why',
    usage: 'onestor-agent list [--json] [options]',
    options: [['--json', 'eligible and ineligible disks as JSON']],
    common: true,
    exits: [[Exit.OK, 'listed'], [Exit.FAILED, 'unexpected error'], USAGE_EXIT],
    logs: 'stderr',
  },
  {
    name: 'snapshot',
    summary: 'take one snapshot cycle now and print what it did',
    usage: 'onestor-agent snapshot --vm ID [--disk N] [--full] [--json] [options]',
    options: [
      ['--vm ID', 'the VM (required)'],
      ['--disk N', 'only this disk (default: every protected disk of the VM, in one backup job)'],
      ['--full', 'send a full snapshot even when an incremental is possible'],
      ['--json', 'the outcome of each disk as JSON'],
    ],
    common: true,
    exits: [
      [Exit.OK, 'every disk published'],
      [Exit.FAILED, 'a disk failed, or nothing to snapshot for that VM/disk'],
      USAGE_EXIT,
      [Exit.INTERRUPTED, 'interrupted (SIGINT/SIGTERM); the replica keeps its previous snapshot'],
    ],
    logs: 'stderr',
  },
  {
    name: 'yield',
    summary: 'let a live migration of the VM through (run by the migration hook)',
    usage: 'onestor-agent yield --vm ID [--seconds N] [--to HOST] [options]',
    options: [
      ['--vm ID', 'the VM (required)'],
      ['--to HOST', "the migration's destination: release the VM's lineages on the replica to HOST (as the replica knows its key), which then goes on incrementally; the release expires after 24 h or at the next publish"],
      ['--seconds N', 'new cycles of the VM wait until it has left this host or N s pass (default 600); a running backup job of ours is aborted'],
    ],
    common: true,
    exits: [
      [Exit.OK, 'no backup job of ours holds the domain (or it does not run here)'],
      [Exit.FAILED, 'a job still runs on the domain after 15 s'],
      USAGE_EXIT,
    ],
    logs: 'stderr',
  },
  {
    name: 'receive',
    summary: 'replica side: the receiver run by sshd (authorized_keys forced command)',
    usage: 'onestor-agent receive [--host NAME] [--snaps-dir DIR] [--max-sessions N] [options]',
    options: [
      ['--host NAME', "the writer's name, bound into its key's forced command; without it the key's fingerprint (sshd ExposeAuthInfo yes) names the writer"],
      ['--allow-unidentified', 'serve keys with neither --host nor a fingerprint (all count as one writer, warned every session)'],
      ['--snaps-dir DIR', 'REPLICA_RECOVERY_SNAPS_DIR override'],
      ['--lock-timeout S', 'REPLICA_COPY_LOCK_TIMEOUT override'],
      ['--max-used-percent N', 'REPLICA_MAX_USED_PERC override'],
      ['--max-sessions N', `concurrent disk sessions on this replica (default ${R.maxSessions}, at most ${R.maxSessionsLimit}; others wait, then E_BUSY)`],
      ['--max-sessions-per-host N', 'most sessions one host holds (default half of --max-sessions, rounded up)'],
      ['--busy-wait S', `wait this long for a free session slot, then E_BUSY (default ${R.busyWaitSec})`],
      ['--hello-timeout S', `end a session without hello after S seconds (default ${R.helloTimeoutSec})`],
      ['--idle-timeout S', `end a session silent for S seconds (default ${R.idleTimeoutSec})`],
      ['--drain-timeout S', `end a session that does not read a reply for S seconds (default ${R.drainTimeoutSec})`],
      ['--progress-window S', `with a disk open, each S seconds of waiting must bring at least --min-progress-kib (default ${R.progressWindowSec})`],
      ['--min-progress-kib K', `see --progress-window (default ${R.minProgressKiB})`],
      ['--max-session-time S', `most agent time one disk session may hold its slot (default ${R.maxSessionSec})`],
      ['--no-space-check', 'no up-front REPLICA_MAX_USED_PERC refusal (compressing filesystems)'],
      ['--no-direct-io', 'write uploads through the page cache (default: O_DIRECT where the filesystem takes it)'],
      ['--qemu-img PROGRAM', 'qemu-img to run (default qemu-img in PATH)'],
    ],
    common: true,
    exits: [
      [Exit.OK, 'session ended cleanly'],
      [Exit.FAILED, 'session ended in error (or SFTP refused, or the writer is unidentified)'],
      USAGE_EXIT,
      [Exit.PROTOCOL, 'the peer broke the protocol (malformed frame or message, wrong protocol version)'],
    ],
    logs: 'stderr-dropping',
  },
  {
    name: 'probe',
    summary: 'OpenNebula monitoring probe output (reads state, never snapshots)',
    usage: 'onestor-agent probe <vm-snapshot|host-monitor|replica-ds> [options]',
    options: [
      ['--state-dir DIR', `agent state dir (default ${DEFAULT_STATE_DIR})`],
      ['--state FILE', 'the state file itself (overrides --state-dir; env ONESTOR_STATE_FILE)'],
      ['--datastores DIR', 'DATASTORE_LOCATION (default: from monitord\'s XML on stdin)'],
      ['--deadline-ms N', 'answer within this many ms whatever hangs (default 5000)'],
      ['--prometheus FILE', 'also write a Prometheus textfile (env ONESTOR_PROMETHEUS_FILE)'],
    ],
    common: false,
    exits: [[Exit.OK, 'always, even on errors (they are printed as ERROR lines): monitord drops every probe of a directory when one exits non-zero']],
    logs: false,
  },
  {
    name: 'demo',
    summary: 'throwaway libvirtd + tiny VM + loopback replica, then real cycles (needs install.sh --dev)',
    usage: 'onestor-agent demo [--keep]',
    options: [['--keep', 'leave libvirtd, sshd and the files in place at the end']],
    common: false,
    exits: [[Exit.OK, 'the VM ended up protected and the recover drill matched'], [Exit.FAILED, 'a step failed'], [Exit.USAGE, 'not run as root']],
    logs: 'stderr',
  },
];

export function commandSpec(name: string): CommandSpec | undefined {
  return COMMANDS.find((c) => c.name === name);
}

const WIDTH = 100;

/** Words of `text` in lines of at most `width` characters. */
function wrap(text: string, width: number): string[] {
  const lines: string[] = [];
  let cur = '';
  for (const word of text.split(' ')) {
    if (cur && cur.length + 1 + word.length > width) {
      lines.push(cur);
      cur = word;
    } else cur = cur ? `${cur} ${word}` : word;
  }
  return [...lines, cur];
}

/** Two columns; a long first column gets its own line, the second wraps under itself. */
function table(rows: ReadonlyArray<readonly [string, string]>, indent = 2): string {
  const w = Math.min(24, Math.max(...rows.map(([a]) => a.length)));
  const pad = ' '.repeat(indent + w + 2);
  return rows
    .map(([a, b]) => {
      const text = wrap(b, Math.max(30, WIDTH - pad.length)).join(`\n${pad}`);
      return `${' '.repeat(indent)}${a.length > w ? `${a}\n${pad}` : a.padEnd(w + 2)}${text}`;
    })
    .join('\n');
}

/** `onestor-agent CMD --help`. */
export function commandHelp(spec: CommandSpec): string {
  const parts = [wrap(`onestor-agent ${spec.name} — ${spec.summary}`, WIDTH).join('\n  '), '', `Usage: ${spec.usage}`];
  if (spec.options.length) parts.push('', 'Options:', table(spec.options));
  if (spec.common) parts.push('', 'Common options (each overrides the config file):', table(COMMON_OPTIONS));
  parts.push('', 'Exit codes:', table(spec.exits.map(([c, m]) => [String(c), m] as const)));
  return `${parts.join('\n')}\n`;
}

/** `onestor-agent --help`. */
export function generalHelp(): string {
  return [
    'onestor-agent — point-in-time recovery snapshots of running OpenNebula KVM disks',
    '',
    'Usage: onestor-agent <command> [options]',
    '',
    'Commands:',
    table([...COMMANDS.map((c) => [c.name, c.summary] as const), ['help [COMMAND]', 'this text, or one command\'s usage, options and exit codes'], ['--version', 'version of the agent and of Node']]),
    '',
    "Run 'onestor-agent COMMAND --help' for a command's options and exit codes.",
    '',
    'Exit codes (all commands; error codes are listed in docs/errors.md):',
    table(EXIT_TABLE.map(([c, m]) => [String(c), m.replace(/`/g, '')] as const)),
    '',
  ].join('\n');
}
