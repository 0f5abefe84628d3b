/**
 * Logging with pino, I/O kept at the edge: the logger writes JSON to a destination chosen here.
 * Under journald (JOURNAL_STREAM set) each line becomes readable text with a `<N>` syslog priority
 * prefix, so `journalctl -p warning` shows only problems (pino's JSON alone lands as priority 6).
 * At a terminal the same text without the prefix; elsewhere (pipes, files, tests) plain JSON lines.
 */
import pino, { type Logger, type DestinationStream } from 'pino';

export type { Logger };

const SYSLOG_PRIORITY: Record<number, number> = { 10: 7, 20: 7, 30: 6, 40: 4, 50: 3, 60: 2 };
const LEVEL_NAME: Record<number, string> = { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warn', 50: 'error', 60: 'fatal' };
const SKIP = new Set(['level', 'time', 'pid', 'hostname', 'msg', 'v']);

/** Pure: one pino JSON record -> "<N>message key=value ..." (values with spaces quoted). */
export function formatJournalLine(record: Record<string, unknown>): string {
  const level = typeof record['level'] === 'number' ? (record['level'] as number) : 30;
  const prio = SYSLOG_PRIORITY[level] ?? 6;
  const parts: string[] = [String(record['msg'] ?? '')];
  for (const [k, v] of Object.entries(record)) {
    if (SKIP.has(k) || v === undefined) continue;
    parts.push(`${k}=${formatValue(v)}`);
  }
  return `<${prio}>${parts.join(' ').replace(/[\r\n]+/g, ' ')}`;
}

function formatValue(v: unknown): string {
  const s = typeof v === 'string' ? v : typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v);
  return /^[^\s"=]+$/.test(s) && s.length > 0 ? s : JSON.stringify(s);
}

/** Pure: the same text for a person at a terminal: "warn: message key=value". */
export function formatTerminalLine(record: Record<string, unknown>): string {
  const level = typeof record['level'] === 'number' ? (record['level'] as number) : 30;
  return `${LEVEL_NAME[level] ?? 'info'}: ${formatJournalLine(record).replace(/^<\d>/, '')}`;
}

class TextDestination implements DestinationStream {
  constructor(
    private readonly out: NodeJS.WritableStream,
    private readonly format: (r: Record<string, unknown>) => string,
  ) {}
  write(chunk: string): void {
    for (const line of chunk.split('\n')) {
      if (!line) continue;
      try {
        this.out.write(this.format(JSON.parse(line) as Record<string, unknown>) + '\n');
      } catch {
        this.out.write(`${line}\n`);
      }
    }
  }
}

export interface LogOptions {
  level?: string;
  /** default: process.stderr for CLI commands whose stdout is data (receive, probe), else stdout */
  stream?: NodeJS.WritableStream;
  journal?: boolean;
  name?: string;
}

export function createLogger(opts: LogOptions = {}): Logger {
  const stream = opts.stream ?? process.stdout;
  const journal = opts.journal ?? Boolean(process.env['JOURNAL_STREAM']);
  // a person at a terminal reads text; journald gets text with a priority; pipes and files get JSON
  const tty = !journal && opts.journal === undefined && Boolean((stream as NodeJS.WriteStream).isTTY);
  const dest: DestinationStream = journal
    ? new TextDestination(stream, formatJournalLine)
    : tty
      ? new TextDestination(stream, formatTerminalLine)
      : (stream as unknown as DestinationStream);
  return pino(
    {
      level: opts.level ?? 'info',
      base: opts.name ? { component: opts.name } : undefined,
      timestamp: journal || tty ? false : pino.stdTimeFunctions.isoTime,
      formatters: { level: (_label, number) => ({ level: number }) },
      // secrets never reach logs even if an object carrying them is logged by mistake
      redact: { paths: ['privateKey', '*.privateKey', 'passphrase', '*.passphrase', 'password', '*.password'], censor: '[redacted]' },
    },
    dest,
  );
}

export function levelName(n: number): string {
  return LEVEL_NAME[n] ?? String(n);
}
