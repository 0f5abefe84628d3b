import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { escapeValue, parseOneTemplate, quote, singleAttribute, TemplateSyntaxError, vectorAttribute } from '../../lib/monitor/one-template.js';

const FIX = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'probes');
const fixture = (n: string): string => readFileSync(path.join(FIX, n), 'utf8');

describe('lexer-faithful parser on real OpenNebula probe output', () => {
  it('reads monitor_ds.rb output, line breaks inside vectors and du -sh sizes included', () => {
    const a = parseOneTemplate(fixture('upstream-monitor-ds.txt'));
    expect(a.map((x) => x.name)).toEqual(['DS_LOCATION_USED_MB', 'DS_LOCATION_TOTAL_MB', 'DS_LOCATION_FREE_MB', 'DS', 'DS']);
    expect(a[0]!.value).toBe('9720');
    expect(a[4]!.value).toEqual({ ID: '101', REPLICA_CACHE: 'YES', REPLICA_CACHE_SIZE: '1.2G', REPLICA_IMAGES: '3', USED_MB: '9720', TOTAL_MB: '20480', FREE_MB: '10760' });
  });

  it('reads the system probe output (quoted values with brackets inside, multi-line PCI vector)', () => {
    const a = parseOneTemplate(fixture('upstream-system-host.txt'));
    const byName = new Map(a.map((x) => [x.name, x.value]));
    expect(byName.get('MODELNAME')).toBe('Dummy(R) Core @ 3.2GHz');
    expect(byName.get('HOSTNAME')).toBe('node-1');
    expect(byName.get('PCI')).toMatchObject({ TYPE: '15b3:1016:0200', DEVICE_NAME: 'MT27710 Family [ConnectX-4 Lx Virtual Function]', VMID: '-1' });
  });

  it('reads recovery.rb and poll lines, and their base64 MONITOR payloads', () => {
    const vm = parseOneTemplate(fixture('upstream-recovery-vm.txt'));
    const v = vm[0]!.value as Record<string, string>;
    expect(v.ID).toBe('7');
    const inner = parseOneTemplate(Buffer.from(v.MONITOR!, 'base64').toString('utf8'));
    expect(inner.map((x) => x.value)).toEqual([
      { ID: '0', TIMESTAMP: '1732440000' },
      { ID: '1', MSG: 'ERROR rsync: connection unexpectedly closed' },
    ]);
    const poll = parseOneTemplate(fixture('upstream-vm-poll.txt'))[0]!.value as Record<string, string>;
    expect(parseOneTemplate(Buffer.from(poll.MONITOR!, 'base64').toString()).find((x) => x.name === 'MEMORY')?.value).toBe('524288');
  });
});

describe('lexer rules that make naive printing unsafe', () => {
  it('a value ending in a backslash swallows its closing quote and the next attribute', () => {
    // what upstream recovery.rb would print for a message ending in "\"
    // the quoted value runs to the quote before 2 ("ERROR C:\\", B="), then 2" ]" is a stray VARIABLE
    expect(() => parseOneTemplate('X = [ MSG="ERROR C:\\", B="2" ]')).toThrow(/unexpected VARIABLE/);
  });

  it('an unescaped quote breaks the record', () => {
    expect(() => parseOneTemplate('X = [ MSG="ERROR say "hi"", B=1 ]')).toThrow(TemplateSyntaxError);
  });

  it(']]> anywhere on a value line aborts the whole template', () => {
    expect(() => parseOneTemplate('A=1\nX = [ MSG="a ]]> b" ]\n')).toThrow(/CDATA/);
  });

  it('only \\" is unescaped; other backslashes stay', () => {
    expect(parseOneTemplate('A="a\\\\b \\"q\\" \\n"')[0]!.value).toBe('a\\\\b "q" \\n');
  });

  it('empty value, empty vector, comments', () => {
    expect(parseOneTemplate('# c\nA =\nB = [ ]\n')).toEqual([
      { name: 'A', value: '', line: 2 },
      { name: 'B', value: {}, line: 3 },
    ]);
  });

  it('a trailing comma in a vector is a syntax error', () => {
    expect(() => parseOneTemplate('X = [ A=1, ]')).toThrow(TemplateSyntaxError);
  });
});

const HOSTILE = [
  'plain',
  'say "hi"',
  'ends with backslash \\',
  'ends with two \\\\',
  'backslash-quote \\" inside',
  '\\"',
  '"',
  '""',
  'line1\nline2\r\nline3',
  'tab\there',
  'nul\u0000byte',
  'cdata ]]> end',
  ']]]>>',
  'x = [ Y = "z" ], W=1',
  '# not a comment',
  'unicode é ✓ 日本',
  '',
  '=,[]#',
  'a\\\n"b"\\',
];

/** What OpenNebula will show for a raw message after our escaping: lossless except these renderings. */
function shown(raw: string): string {
  return escapeValue(raw).split('\\"').join('"');
}

describe('printer output parses as OpenNebula reads it', () => {
  it.each(HOSTILE)('hostile value %j survives as one record', (raw) => {
    const line = vectorAttribute('DISK_RECOVERY_SNAPSHOT', [['ID', 3], ['MSG', `ERROR ${raw}`], ['NEXT', 'after']]);
    expect(line).not.toMatch(/\n/);
    const both = `${line}\n${singleAttribute('OTHER', raw)}\n`;
    const a = parseOneTemplate(both);
    expect(a).toHaveLength(2);
    expect(a[0]!.value).toEqual({ ID: '3', MSG: shown(`ERROR ${raw}`), NEXT: 'after' });
    expect(a[1]!.value).toBe(shown(raw));
  });

  it('keeps quotes and inner backslashes exactly', () => {
    const raw = 'qemu-img: "C:\\dir\\file" not found';
    expect(shown(raw)).toBe(raw);
    expect(parseOneTemplate(singleAttribute('M', raw))[0]!.value).toBe(raw);
  });

  it('renders what it cannot carry visibly, never silently', () => {
    expect(shown('a\nb')).toBe('a\\nb');
    expect(shown('x\\')).toBe('x\\ ');
    expect(shown('a]]>b')).toBe('a]] >b');
    expect(shown('\u0001')).toBe('\\x01');
  });

  it('fuzz: 2000 random strings over the dangerous alphabet', () => {
    let seed = 12345;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    const alphabet = ['"', '\\', ']', '>', '[', '=', ',', '#', '\n', ' ', 'a', '\u0000', '\r'];
    for (let i = 0; i < 2000; i++) {
      let s = '';
      const len = rnd(12);
      for (let k = 0; k < len; k++) s += alphabet[rnd(alphabet.length)];
      const text = `${vectorAttribute('V', [['MSG', s], ['B', 1]])}\n${vectorAttribute('W', [['ID', i]])}\n`;
      const a = parseOneTemplate(text);
      expect(a).toHaveLength(2);
      expect(a[0]!.value).toEqual({ MSG: shown(s), B: '1' });
    }
  });

  it('numbers print bare, booleans YES/NO, bad keys and non-finite numbers are refused', () => {
    expect(vectorAttribute('A', [['X', 1.23456], ['Y', true], ['Z', undefined]])).toBe('A = [ X=1.235, Y="YES" ]');
    expect(() => singleAttribute('BAD KEY', 1)).toThrow(RangeError);
    expect(() => singleAttribute('K', Number.NaN)).toThrow(RangeError);
    expect(quote('a"b')).toBe('"a\\"b"');
  });
});
