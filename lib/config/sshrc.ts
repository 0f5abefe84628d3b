/**
 * The ssh transfer driver's settings file (`sshrc`), read the way a shell would assign its variables but
 * without ever running a shell: upstream sources it with bash, so a file we misread would make us
 * disagree with the driver, and a file we executed could run anything.
 *
 * Supported: `KEY=VALUE` and `export KEY=VALUE`, single quotes (literal), double quotes (backslash
 * escapes only before $ ` " \ and newline, as in sh), unquoted backslash escapes, `\`-newline
 * continuation, `;` between statements, comments (whole-line and trailing), blank lines, CRLF.
 * `$VAR` and backticks are kept literally and produce a warning (we do not expand).
 */
import { readFile } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import { ErrorCodes, OnestorError } from '../shared/errors.js';
import type { DriverSettings } from '../shared/model.js';
import { DEFAULT_DRIVER_SETTINGS, DEFAULT_SSHRC_PATHS } from '../shared/defaults.js';

// the paths and upstream's values live in lib/shared/defaults.ts
export { DEFAULT_SSHRC_PATHS, DEFAULT_DRIVER_SETTINGS } from '../shared/defaults.js';

const KNOWN_KEYS = new Set<string>(Object.keys(DEFAULT_DRIVER_SETTINGS));

export interface SshrcResult {
  settings: DriverSettings;
  /** Keys assigned in the file that the agent does not use (callers log them at debug). */
  unknownKeys: string[];
  /** Things a human should know: unexpanded `$VAR`, lines that are not assignments, ... */
  warnings: string[];
}

export interface ReadSshrcResult extends SshrcResult {
  /** The file that was read, or null when none of the paths existed (defaults in effect). */
  file: string | null;
}

/** A single assignment as found in the file, before validation. */
interface Assignment {
  key: string;
  value: string;
  line: number;
}

/** Guards the tokenizer against pathological inputs; sshrc files are a few KiB. */
const MAX_SSHRC_BYTES = 1024 * 1024;

const NAME_START = /[A-Za-z_]/;
const NAME_CHAR = /[A-Za-z0-9_]/;

function isBlank(c: string | undefined): boolean {
  return c === ' ' || c === '\t';
}

/**
 * Splits the text into assignments. A hand-written scanner rather than a regex per line because quoted
 * values may contain `#`, `;`, and even newlines, and a backslash-newline joins lines.
 */
function scanAssignments(text: string, file: string, warnings: string[]): Assignment[] {
  const src = text.replace(/\r\n?/g, '\n');
  const out: Assignment[] = [];
  let i = 0;
  let line = 1;
  const n = src.length;

  const fail = (msg: string, atLine: number, field?: string): never => {
    throw new OnestorError(ErrorCodes.SSHRC, `line ${atLine}: ${msg}`, { file, line: atLine, ...(field ? { field } : {}) });
  };

  /** Skips to (not past) the end of the current line. */
  const skipToEol = (): void => {
    while (i < n && src[i] !== '\n') i++;
  };

  while (i < n) {
    // start of a statement
    while (i < n && isBlank(src[i])) i++;
    if (i >= n) break;
    const c = src[i];
    if (c === '\n') {
      line++;
      i++;
      continue;
    }
    if (c === ';') {
      i++;
      continue;
    }
    if (c === '#') {
      skipToEol();
      continue;
    }
    const stmtLine = line;
    // `export` prefix (only when followed by blanks: `exportX=1` is a variable named exportX)
    if (src.startsWith('export', i) && isBlank(src[i + 6])) {
      i += 6;
      while (i < n && isBlank(src[i])) i++;
    }
    // NAME
    const nameStart = i;
    if (i < n && NAME_START.test(src[i] as string)) {
      i++;
      while (i < n && NAME_CHAR.test(src[i] as string)) i++;
    }
    const name = src.slice(nameStart, i);
    if (name === '' || src[i] !== '=') {
      // `export NAME` alone assigns nothing and is harmless; anything else is not ours to interpret
      const rest = src.slice(nameStart, Math.min(n, nameStart + 60)).split('\n')[0] ?? '';
      const onlyName = name !== '' && (i >= n || src[i] === '\n' || isBlank(src[i]) || src[i] === ';' || src[i] === '#');
      if (!(onlyName && restOfLineIsEmpty(src, i))) {
        warnings.push(`${file}: line ${stmtLine}: not a KEY=VALUE assignment, ignored: ${JSON.stringify(rest)}`);
      }
      skipStatement();
      continue;
    }
    i++; // '='
    const { value, expansions } = readWord();
    if (expansions) {
      warnings.push(
        `${file}: line ${stmtLine}: ${name} contains a shell expansion ($ or \`) that is NOT evaluated; the value is used literally`,
      );
    }
    // what follows the word: blanks, then end of statement or a comment
    while (i < n && isBlank(src[i])) i++;
    if (i < n && src[i] !== '\n' && src[i] !== ';' && src[i] !== '#') {
      // `KEY=a b` in sh runs command b with KEY set only for it: the assignment does not persist
      warnings.push(`${file}: line ${stmtLine}: ${name}=... is followed by more words (unquoted space?); ignored`);
      skipStatement();
      continue;
    }
    out.push({ key: name, value, line: stmtLine });
  }
  return out;

  function restOfLineIsEmpty(s: string, from: number): boolean {
    let k = from;
    while (k < s.length && isBlank(s[k])) k++;
    return k >= s.length || s[k] === '\n' || s[k] === '#' || s[k] === ';';
  }

  /** Skips the rest of a statement we do not interpret, honouring quotes so we resync correctly. */
  function skipStatement(): void {
    while (i < n && src[i] !== '\n' && src[i] !== ';') {
      const ch = src[i];
      if (ch === '#' && (i === 0 || isBlank(src[i - 1]))) {
        skipToEol();
        return;
      }
      if (ch === '"' || ch === "'" || ch === '\\') {
        readWord();
        continue;
      }
      i++;
    }
  }

  /** Reads one shell word starting at i (unquoted/quoted pieces concatenated). */
  function readWord(): { value: string; expansions: boolean } {
    let value = '';
    let expansions = false;
    while (i < n) {
      const ch = src[i] as string;
      if (ch === '\n' || isBlank(ch) || ch === ';') break;
      if (ch === "'") {
        const start = line;
        const close = src.indexOf("'", i + 1);
        if (close < 0) fail('unterminated single quote', start);
        const piece = src.slice(i + 1, close);
        line += countNewlines(piece);
        value += piece;
        i = close + 1;
        continue;
      }
      if (ch === '"') {
        const start = line;
        i++;
        let closed = false;
        while (i < n) {
          const d = src[i] as string;
          if (d === '"') {
            closed = true;
            i++;
            break;
          }
          if (d === '\\') {
            const next = src[i + 1];
            if (next === '\n') {
              line++;
              i += 2;
              continue;
            }
            if (next === '$' || next === '`' || next === '"' || next === '\\') {
              value += next;
              i += 2;
              continue;
            }
            value += '\\';
            i++;
            continue;
          }
          if (d === '$' || d === '`') expansions = true;
          if (d === '\n') line++;
          value += d;
          i++;
        }
        if (!closed) fail('unterminated double quote', start);
        continue;
      }
      if (ch === '\\') {
        const next = src[i + 1];
        if (next === undefined) {
          i++;
          continue;
        }
        if (next === '\n') {
          line++;
          i += 2;
          continue;
        }
        value += next;
        i += 2;
        continue;
      }
      if (ch === '$' || ch === '`') expansions = true;
      value += ch;
      i++;
    }
    return { value, expansions };
  }
}

function countNewlines(s: string): number {
  let count = 0;
  for (let k = 0; k < s.length; k++) if (s.charCodeAt(k) === 10) count++;
  return count;
}

function parseIntegerSetting(a: Assignment, file: string, min: number, max: number, unit: string): number {
  const v = a.value.trim();
  const num = /^[0-9]{1,12}$/.test(v) ? Number(v) : NaN;
  if (!Number.isSafeInteger(num) || num < min || num > max) {
    throw new OnestorError(
      ErrorCodes.SSHRC,
      `line ${a.line}: ${a.key}=${JSON.stringify(a.value)} is not an integer ${min}..${max}${unit ? ` (${unit})` : ''}`,
      { file, field: a.key, line: a.line },
    );
  }
  return num;
}

/**
 * Parses sshrc text. Pure. Throws OnestorError(E_SSHRC) naming file, line and key for a value the agent
 * cannot use (bad number, relative snapshots dir) or for a syntax error (unterminated quote).
 */
export function parseSshrc(text: string, file: string): SshrcResult {
  if (text.length > MAX_SSHRC_BYTES) {
    throw new OnestorError(ErrorCodes.SSHRC, `file too large (${text.length} bytes, limit ${MAX_SSHRC_BYTES})`, { file });
  }
  if (text.includes('\0')) {
    throw new OnestorError(ErrorCodes.SSHRC, 'file contains NUL bytes: not a shell settings file', { file });
  }
  const warnings: string[] = [];
  const assignments = scanAssignments(text, file, warnings);

  // Shell semantics: the last assignment wins.
  const last = new Map<string, Assignment>();
  for (const a of assignments) last.set(a.key, a);

  const settings: DriverSettings = { ...DEFAULT_DRIVER_SETTINGS };
  const unknownKeys: string[] = [];
  for (const [key, a] of last) {
    switch (key) {
      case 'REPLICA_COPY_LOCK_TIMEOUT':
        settings.REPLICA_COPY_LOCK_TIMEOUT = parseIntegerSetting(a, file, 0, 7 * 86400, 'seconds');
        break;
      case 'REPLICA_MAX_USED_PERC':
        settings.REPLICA_MAX_USED_PERC = parseIntegerSetting(a, file, 1, 100, 'percent');
        break;
      case 'REPLICA_MAX_SIZE_MB':
        // upstream ships it empty, meaning "no limit"
        settings.REPLICA_MAX_SIZE_MB = a.value.trim() === '' ? null : parseIntegerSetting(a, file, 1, 1024 ** 3, 'MB');
        break;
      case 'REPLICA_RECOVERY_SNAPS_DIR': {
        const dir = a.value.trim();
        if (!isAbsolute(dir) || dir.includes('\n')) {
          throw new OnestorError(
            ErrorCodes.SSHRC,
            `line ${a.line}: ${key}=${JSON.stringify(a.value)} must be an absolute path` +
              (/[$`]/.test(dir) ? ' (shell expansions are not evaluated)' : ''),
            { file, field: key, line: a.line },
          );
        }
        settings.REPLICA_RECOVERY_SNAPS_DIR = dir;
        break;
      }
      case 'REPLICA_SSH_OPTS':
        settings.REPLICA_SSH_OPTS = a.value;
        break;
      case 'REPLICA_SSH_FE_OPTS':
        settings.REPLICA_SSH_FE_OPTS = a.value;
        break;
      default:
        if (!KNOWN_KEYS.has(key)) unknownKeys.push(key);
    }
  }
  return { settings, unknownKeys, warnings };
}

/**
 * Reads the first existing file among `paths` (upstream keeps the driver's copy in two places).
 * No file at all is not an error: upstream defaults apply and a warning says so. A file that exists but
 * cannot be read is an error: silently using defaults would hide a permissions problem.
 */
export async function readSshrc(paths: readonly string[] = DEFAULT_SSHRC_PATHS): Promise<ReadSshrcResult> {
  for (const path of paths) {
    let text: string;
    try {
      text = await readFile(path, 'utf8');
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') continue;
      throw new OnestorError(ErrorCodes.SSHRC, `cannot read driver settings: ${(e as Error).message}`, { file: path }, { cause: e });
    }
    return { ...parseSshrc(text, path), file: path };
  }
  return {
    settings: { ...DEFAULT_DRIVER_SETTINGS },
    unknownKeys: [],
    warnings: [`no driver settings file found (looked in ${paths.join(', ')}); using upstream defaults`],
    file: null,
  };
}
