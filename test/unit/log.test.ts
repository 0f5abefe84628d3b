import { describe, it, expect } from 'vitest';
import { Writable } from 'node:stream';
import { createLogger, formatJournalLine, formatTerminalLine } from '../../lib/shared/log.js';

function sink() {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk, _enc, cb) {
      lines.push(...String(chunk).split('\n').filter(Boolean));
      cb();
    },
  });
  return { lines, stream };
}

describe('journald lines', () => {
  it('maps pino levels to syslog priorities and renders key=value text', () => {
    expect(formatJournalLine({ level: 30, msg: 'cycle end', vm: 7, disk: 0, bytes: 123, ms: 45 })).toBe('<6>cycle end vm=7 disk=0 bytes=123 ms=45');
    expect(formatJournalLine({ level: 40, msg: 'x' })).toMatch(/^<4>/);
    expect(formatJournalLine({ level: 50, msg: 'x' })).toMatch(/^<3>/);
    expect(formatJournalLine({ level: 20, msg: 'x' })).toMatch(/^<7>/);
  });
  it('terminal lines name the level instead of a syslog prefix', () => {
    expect(formatTerminalLine({ level: 40, msg: 'replica slow', vm: 3 })).toBe('warn: replica slow vm=3');
    expect(formatTerminalLine({ level: 50, msg: 'x' })).toMatch(/^error: x$/);
  });
  it('quotes values with spaces and never lets a newline split the record', () => {
    const l = formatJournalLine({ level: 50, msg: 'disk failed\nsecond line', err: 'E_SSH: connection "refused"\nby peer' });
    expect(l.split('\n')).toHaveLength(1);
    expect(l).toContain('err="E_SSH: connection \\"refused\\"');
  });
  it('a logger under JOURNAL_STREAM writes prefixed text; elsewhere JSON; secrets are redacted', () => {
    const j = sink();
    createLogger({ stream: j.stream, journal: true }).warn({ vm: 3, privateKey: 'SECRET' }, 'replica slow');
    expect(j.lines[0]).toMatch(/^<4>replica slow vm=3 privateKey=\[redacted\]$/);
    const p = sink();
    createLogger({ stream: p.stream, journal: false }).info({ vm: 3, replica: { privateKey: 'SECRET' } }, 'hello');
    const rec = JSON.parse(p.lines[0]!);
    expect(rec).toMatchObject({ level: 30, vm: 3, msg: 'hello' });
    expect(JSON.stringify(rec)).not.toContain('SECRET');
  });
});
