#!/usr/bin/env node
/**
 * onestor-agent command line. Wiring only: parse flags, build the context, call into lib/, map the
 * outcome to a documented exit code (agent/exit-codes.ts, README "Exit codes").
 */
import { Exit, EXIT_TABLE } from './exit-codes.js';
import { parseFlags, type Flags } from './flags.js';
import { createLogger } from '../lib/shared/log.js';
import { describeError, OnestorError, ErrorCodes } from '../lib/shared/errors.js';

const HELP = `onestor-agent — point-in-time recovery snapshots of running OpenNebula KVM disks

Usage: onestor-agent <command> [options]

Commands:
  run                      the daemon (systemd): snapshot every protected disk on its schedule
  status [--json]          am I protected? one line per disk; exit 3 if a disk is overdue/failing,
                           4 if the daemon is not running
  list [--json]            discovery only: which disks are protected, which are not and why
  snapshot --vm ID [--disk N] [--full] [--json]
                           take one snapshot cycle now and print what it did
  yield --vm ID [--seconds N] [--to HOST]
                           let a live migration of the VM through: no backup job of ours holds
                           it (a running one is aborted), new cycles wait until the VM has left
                           this host or N s pass (default 600); with --to, release the VM's
                           lineages on the replica to HOST (the destination), which then goes
                           on incrementally (expires after 24 h); run by the migration hook
  receive                  replica side: the receiver run by sshd (authorized_keys forced command)
  probe <vm-snapshot|host-monitor|replica-ds>
                           OpenNebula monitoring probe output (reads state, never snapshots)
  demo [--keep]            throwaway libvirtd + tiny VM + loopback replica, then real cycles
  help, --help             this text;  --version

Common options (each overrides the config file):
  --config FILE            agent config (JSON; default /etc/onestor-agent/config.json)
  --datastores DIR         DATASTORE_LOCATION (default /var/lib/one/datastores)
  --state-dir DIR          agent state (default /var/lib/one/onestor-agent)
  --libvirt-uri URI        libvirt connection (default qemu:///system)
  --sshrc FILE             ssh TM driver settings (default remotes/etc/tm/ssh/sshrc)
  --replica-host HOST      connect here instead of REPLICA_HOST / REPLICA_STORAGE_IP
  --replica-port N         SSH port of the replica (default 22)
  --replica-user USER      SSH user on the replica (default: the user running the agent,
                           oneadmin under systemd, as upstream's ssh does)
  --identity FILE          private key for the replica (default: the dedicated key install.sh
                           makes, /var/lib/one/.ssh/onestor_replica_ed25519, else ~/.ssh/id_*)
  --known-hosts FILE       known_hosts for the replica's host key (default:
                           /var/lib/one/.ssh/known_hosts, else ~/.ssh/known_hosts)
  --accept-new-host-key    record an unknown replica host key (a changed key is always refused)
  --receiver-command CMD   command run on the replica (default "onestor-agent receive")
  --bandwidth-mbps N       cap on what this host sends, all transfers together (MB/s; 0 = none)
  --snaps-dir DIR          receive: REPLICA_RECOVERY_SNAPS_DIR override
  --max-sessions N         receive: concurrent disk sessions on this replica (others wait, then E_BUSY)
  --host NAME              receive: the writer's name, bound into its key's forced command; without it
                           the key's fingerprint (sshd ExposeAuthInfo yes) names the writer
  --max-sessions-per-host N  receive: most sessions one host holds (default half, rounded up)
  --hello-timeout S        receive: end a session without hello after S seconds (default 30)
  --idle-timeout S         receive: end a session silent for S seconds (default 900)
  --drain-timeout S        receive: end a session that does not read a reply for S seconds (120)
  --progress-window S      receive: with a disk open, each S seconds of waiting must bring
  --min-progress-kib K       at least K KiB (defaults 60 s, 1024 KiB)
  --max-session-time S     receive: most agent time one disk session may hold its slot (86400)
  --no-space-check         receive: no up-front REPLICA_MAX_USED_PERC refusal (compressing filesystems)
  --allow-unidentified     receive: serve keys with neither (all count as one writer, warned every session)
  --lock-timeout SEC       receive: REPLICA_COPY_LOCK_TIMEOUT override
  --max-used-percent N     receive: REPLICA_MAX_USED_PERC override
  --busy-wait SEC          receive: wait this long for a free session slot, then E_BUSY (default 300)
  --qemu-img PROGRAM       qemu-img to run (default qemu-img in PATH)
  --log-level LEVEL        trace|debug|info|warn|error (default info)
  --host-name NAME         this host's name as recorded on the replica (default: the system's)

Exit codes (the one table, lib/shared/exit-codes.ts; error codes: docs/errors.md):
${EXIT_TABLE.map(([code, meaning]) => `  ${String(code).padEnd(4)} ${meaning.replace(/`/g, '')}`).join('\n')}
`;

async function main(argv: string[]): Promise<number> {
  let parsed: ReturnType<typeof parseFlags>;
  try {
    parsed = parseFlags(argv);
  } catch (e) {
    process.stderr.write(`onestor-agent: ${(e as Error).message}\nTry 'onestor-agent --help'.\n`);
    return Exit.USAGE;
  }
  const { values: f, positionals } = parsed;
  const cmd = positionals[0] ?? (f.version ? 'version' : 'help');
  if (f.help || cmd === 'help') {
    process.stdout.write(HELP);
    return Exit.OK;
  }
  if (cmd === 'version' || f.version) {
    const { VERSION } = await import('./context.js');
    process.stdout.write(`onestor-agent ${VERSION} (node ${process.versions.node})\n`);
    return Exit.OK;
  }
  // stdout carries data for receive (protocol), probe and --json: logs go to stderr there.
  const dataOnStdout = cmd === 'receive' || cmd === 'probe' || Boolean(f.json);
  // receive: logs through a non-blocking stderr that drops lines when the agent does not read them (a
  // synchronous pipe write would freeze the receiver's timers)
  const receiveLog = cmd === 'receive' ? ((await import('../lib/replica/stdio.js')).droppingLogSink() as unknown as NodeJS.WritableStream) : null;
  const log = createLogger({ level: f['log-level'] ?? 'info', stream: receiveLog ?? (dataOnStdout || cmd !== 'run' ? process.stderr : process.stdout) });
  const commands: Record<string, () => Promise<{ run(f: Flags, positionals: string[], log: ReturnType<typeof createLogger>): Promise<number> }>> = {
    snapshot: () => import('./cmd-snapshot.js'),
    list: () => import('./cmd-status.js').then((m) => ({ run: m.runList })),
    status: () => import('./cmd-status.js').then((m) => ({ run: m.runStatus })),
    receive: () => import('./cmd-receive.js'),
    run: () => import('./cmd-run.js'),
    probe: () => import('./cmd-probe.js'),
    demo: () => import('./demo.js'),
    yield: () => import('./cmd-yield.js'),
  };
  const load = commands[cmd];
  if (!load) {
    process.stderr.write(`onestor-agent: unknown command '${cmd}'\nTry 'onestor-agent --help'.\n`);
    return Exit.USAGE;
  }
  try {
    const mod = await load();
    return await mod.run(f, positionals.slice(1), log);
  } catch (e) {
    process.stderr.write(`onestor-agent ${cmd}: ${describeError(e)}\n`);
    return e instanceof OnestorError && e.code === ErrorCodes.CONFIG ? Exit.USAGE : Exit.FAILED;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e) => {
    process.stderr.write(`onestor-agent: ${describeError(e)}\n`);
    process.exitCode = Exit.FAILED;
  },
);
