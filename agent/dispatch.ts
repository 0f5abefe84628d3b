/**
 * The command line: parse, print help, dispatch to agent/commands/<name>.ts, map the outcome to a
 * documented exit code. Loads only what the chosen command needs: `probe` runs every minute on every
 * host, so neither pino, zod, ssh2 nor fast-xml-parser may load on its path (commands are imported
 * lazily through the table the caller passes, and the logger is built only for commands that log).
 * The tables: agent/cli.ts (every command) and agent/probe-cli.ts (probe alone, built into one file).
 */
import type { Logger } from 'pino';
import { Exit } from './exit-codes.js';
import { parseFlags, type Flags } from './flags.js';
import { COMMANDS, commandHelp, commandSpec, generalHelp } from './commands/spec.js';
import { describeError, OnestorError, ErrorCodes } from '../lib/shared/errors.js';

export interface CommandModule {
  run(f: Flags, positionals: string[], log: Logger): Promise<number>;
}

export interface CliIo {
  stdout: { write(s: string): unknown };
  stderr: { write(s: string): unknown };
}

export type CommandLoaders = Readonly<Record<string, () => Promise<CommandModule>>>;

/** Parses `argv` and runs the command through `loaders` (agent/cli.ts: all of them; agent/probe-cli.ts: probe). */
export async function dispatch(loaders: CommandLoaders, argv: string[], io: CliIo = process): Promise<number> {
  let parsed: ReturnType<typeof parseFlags>;
  try {
    parsed = parseFlags(argv);
  } catch (e) {
    const cmd = argv.find((a) => !a.startsWith('-'));
    const hint = cmd && commandSpec(cmd) ? `onestor-agent ${cmd} --help` : 'onestor-agent --help';
    io.stderr.write(`onestor-agent: ${(e as Error).message}\nTry '${hint}'.\n`);
    return Exit.USAGE;
  }
  const { values: f, positionals } = parsed;
  const cmd = positionals[0] ?? (f.version ? 'version' : 'help');
  if (cmd === 'help') {
    const about = positionals[1] ? commandSpec(positionals[1]) : undefined;
    io.stdout.write(about ? commandHelp(about) : generalHelp());
    return Exit.OK;
  }
  if (f.help) {
    const spec = commandSpec(cmd);
    io.stdout.write(spec ? commandHelp(spec) : generalHelp());
    return Exit.OK;
  }
  if (cmd === 'version' || f.version) {
    const { AGENT_VERSION: VERSION } = await import('../lib/shared/version.js');
    io.stdout.write(`onestor-agent ${VERSION} (node ${process.versions.node})\n`);
    return Exit.OK;
  }
  const spec = commandSpec(cmd);
  const load = Object.hasOwn(loaders, cmd) ? loaders[cmd] : undefined;
  if (!spec || !load) {
    io.stderr.write(`onestor-agent: unknown command '${cmd}' (commands: ${COMMANDS.map((c) => c.name).join(', ')})\nTry 'onestor-agent --help'.\n`);
    return Exit.USAGE;
  }
  try {
    // stdout carries data for receive (protocol), probe and --json: logs go to stderr there.
    let log: Logger | undefined;
    if (spec.logs) {
      const { createLogger } = await import('../lib/shared/log.js');
      const toStdout = spec.logs === 'stdout' && !f.json;
      const sink = spec.logs === 'stderr-dropping' ? ((await import('../lib/replica/stdio.js')).droppingLogSink() as unknown as NodeJS.WritableStream) : null;
      log = createLogger({ level: f['log-level'] ?? 'info', stream: sink ?? (toStdout ? process.stdout : process.stderr) });
    }
    const mod = await load();
    return await mod.run(f, positionals.slice(1), log as Logger);
  } catch (e) {
    io.stderr.write(`onestor-agent ${cmd}: ${describeError(e)}\n`);
    return e instanceof OnestorError && e.code === ErrorCodes.CONFIG ? Exit.USAGE : Exit.FAILED;
  }
}
