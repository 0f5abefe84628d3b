/**
 * OpenNebula template attributes: what probes print and monitord parses (`KEY=VALUE`,
 * `KEY = [ A="x", B=1 ]`). Two halves:
 *
 * - formatting (used by the probes): values are quoted so that OpenNebula's lexer reads back exactly
 *   what we meant, whatever an error message contains;
 * - `parseOneTemplate`, a re-implementation of the lexer rules and grammar of OpenNebula's template
 *   parser (flex longest-match semantics included), used by tests to prove the printed lines parse.
 *
 * Facts about OpenNebula's lexer that drive the quoting rules (read from its flex/bison sources):
 * - a quoted value is `"` then any mix of non-quote characters and `\"` pairs, then `"`; it may span
 *   lines, and flex takes the LONGEST match, so a value ending in a backslash swallows its closing
 *   quote and runs on into the next attribute (or the next line);
 * - the only unescape is `\"` -> `"`; a backslash before anything else stays a backslash;
 * - any value whose line contains `]]>` is read as a CDATA token and aborts the whole template
 *   (for MONITOR_VM that drops every VM of the host), so that sequence must never be printed;
 * - one syntax error anywhere rejects the whole message, not one line.
 */

const KEY_RE = /^[A-Za-z0-9_]+$/;

/** Characters we never print raw inside a value: line breaks (records are lines) and controls. */
// eslint-disable-next-line no-control-regex
const CONTROL_RE = /[\u0000-\u001f\u007f]/g;

export type TemplateScalar = string | number | boolean;

/**
 * Makes a string safe as the content of a double-quoted value. Line breaks become the two characters
 * `\n`, other control characters `\xNN`, `]]>` becomes `]] >`, `"` becomes `\"`, and a trailing
 * backslash gets a space after it (the lexer has no way to express a value that ends in `\`).
 */
export function escapeValue(raw: string): string {
  let s = raw.replace(CONTROL_RE, (c) => {
    if (c === '\n') return '\\n';
    if (c === '\r') return '\\r';
    if (c === '\t') return '\\t';
    return `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`;
  });
  // Repeat until stable: `]]]>` would otherwise leave a new `]]>` behind after one pass.
  while (s.includes(']]>')) s = s.split(']]>').join(']] >');
  s = s.replace(/"/g, '\\"');
  if (s.endsWith('\\')) s += ' ';
  return s;
}

export function quote(raw: string): string {
  return `"${escapeValue(raw)}"`;
}

/** Numbers print bare (finite only), booleans as "YES"/"NO" like OpenNebula's own attributes. */
export function formatValue(v: TemplateScalar): string {
  if (typeof v === 'number') {
    if (!Number.isFinite(v)) throw new RangeError(`template value must be finite, got ${v}`);
    return Number.isInteger(v) ? String(v) : String(Math.round(v * 1000) / 1000);
  }
  if (typeof v === 'boolean') return v ? '"YES"' : '"NO"';
  return quote(v);
}

function checkKey(key: string): string {
  // Keys come from our own code, never from input: a bad one is a programming error.
  if (!KEY_RE.test(key)) throw new RangeError(`invalid template attribute name ${JSON.stringify(key)}`);
  return key;
}

/** `KEY=VALUE` (one line). */
export function singleAttribute(key: string, value: TemplateScalar): string {
  return `${checkKey(key)}=${formatValue(value)}`;
}

/** `KEY = [ A=1, B="x" ]` (one line). Undefined values are left out. */
export function vectorAttribute(key: string, pairs: ReadonlyArray<readonly [string, TemplateScalar | undefined]>): string {
  const parts = pairs.filter((p): p is readonly [string, TemplateScalar] => p[1] !== undefined).map(([k, v]) => `${checkKey(k)}=${formatValue(v)}`);
  if (parts.length === 0) throw new RangeError(`vector attribute ${key} needs at least one value`);
  return `${checkKey(key)} = [ ${parts.join(', ')} ]`;
}

// ---------------------------------------------------------------------------------------------
// Lexer-faithful parser (tests only)
// ---------------------------------------------------------------------------------------------

export interface ParsedAttribute {
  name: string;
  /** string for `KEY=VALUE`, a map (upper-cased keys, like OpenNebula) for vectors */
  value: string | Record<string, string>;
  line: number;
}

export class TemplateSyntaxError extends Error {
  constructor(
    message: string,
    readonly line: number,
  ) {
    super(`${message} at line ${line}`);
    this.name = 'TemplateSyntaxError';
  }
}

type TokKind = 'VARIABLE' | 'EQUAL' | 'EQUAL_EMPTY' | 'COMMA' | 'CBRACKET' | 'OBRACKET' | 'CCDATA' | 'STRING';
interface Token {
  kind: TokKind;
  text: string;
  line: number;
}

const isBlank = (c: string | undefined): boolean => c === ' ' || c === '\t';
const isBlankNl = (c: string | undefined): boolean => c === ' ' || c === '\t' || c === '\n';
const isAlnumUnderscore = (c: string | undefined): boolean => c !== undefined && /[A-Za-z0-9_]/.test(c);
/** flex STRING class: [^=#[:blank:]\n,\[\]] */
const isBareValueChar = (c: string | undefined): boolean => c !== undefined && !'=# \t\n,[]'.includes(c);

function countNl(s: string): number {
  let n = 0;
  for (const c of s) if (c === '\n') n++;
  return n;
}

/** Lengths of each rule's match at `i` (0 = no match); mirrors the flex rules of INITIAL state. */
function matchInitial(t: string, i: number): { kind: TokKind | 'SKIP'; len: number } | null {
  const cands: Array<{ kind: TokKind | 'SKIP'; len: number }> = [];
  // [[:blank:]]*#.*\n   comment (needs the newline)
  {
    let j = i;
    while (isBlank(t[j])) j++;
    if (t[j] === '#') {
      const nl = t.indexOf('\n', j);
      if (nl >= 0) cands.push({ kind: 'SKIP', len: nl + 1 - i });
    }
  }
  // [[:blank:]\n]+
  {
    let j = i;
    while (isBlankNl(t[j])) j++;
    if (j > i) cands.push({ kind: 'SKIP', len: j - i });
  }
  // [[:alnum:]_]+
  {
    let j = i;
    while (isAlnumUnderscore(t[j])) j++;
    if (j > i) cands.push({ kind: 'VARIABLE', len: j - i });
  }
  // [[:blank:]]*=[[:blank:]]*   and   [[:blank:]]*=[[:blank:]]*\n
  {
    let j = i;
    while (isBlank(t[j])) j++;
    if (t[j] === '=') {
      j++;
      while (isBlank(t[j])) j++;
      cands.push({ kind: 'EQUAL', len: j - i });
      if (t[j] === '\n') cands.push({ kind: 'EQUAL_EMPTY', len: j + 1 - i });
    }
  }
  // [[:blank:]\n]*,[[:blank:]\n]*   and   [[:blank:]\n]*\][[:blank:]\n]*
  {
    let j = i;
    while (isBlankNl(t[j])) j++;
    if (t[j] === ',' || t[j] === ']') {
      const kind: TokKind = t[j] === ',' ? 'COMMA' : 'CBRACKET';
      j++;
      while (isBlankNl(t[j])) j++;
      cands.push({ kind, len: j - i });
    }
  }
  return longest(cands);
}

/** The rules of the exclusive VALUE state. */
function matchValue(t: string, i: number): { kind: TokKind; len: number; quoted?: boolean } | null {
  const cands: Array<{ kind: TokKind; len: number; quoted?: boolean }> = [];
  // [[:blank:]]*\[[[:blank:]\n]*
  {
    let j = i;
    while (isBlank(t[j])) j++;
    if (t[j] === '[') {
      j++;
      while (isBlankNl(t[j])) j++;
      cands.push({ kind: 'OBRACKET', len: j - i });
    }
  }
  // .*\]\]\>.*   ('.' is anything but newline)
  {
    let eol = t.indexOf('\n', i);
    if (eol < 0) eol = t.length;
    if (t.slice(i, eol).includes(']]>')) cands.push({ kind: 'CCDATA', len: eol - i });
  }
  // \"([^\"]|\\\")*\"   longest: keep going past a quote only while it is escaped
  if (t[i] === '"') {
    let best = 0;
    for (let j = i + 1; j < t.length; j++) {
      if (t[j] !== '"') continue;
      best = j + 1 - i;
      const escaped = j - 1 > i && t[j - 1] === '\\';
      if (!escaped) break;
    }
    if (best > 0) cands.push({ kind: 'STRING', len: best, quoted: true });
  }
  // [^=#[:blank:]\n,\[\]]+
  {
    let j = i;
    while (isBareValueChar(t[j])) j++;
    if (j > i) cands.push({ kind: 'STRING', len: j - i });
  }
  return longest(cands);
}

/** flex: the longest match wins; on a tie the rule listed first (candidates are pushed in order). */
function longest<T extends { len: number }>(cands: T[]): T | null {
  let best: T | null = null;
  for (const c of cands) if (c.len > 0 && (!best || c.len > best.len)) best = c;
  return best;
}

function lex(t: string): Token[] {
  const toks: Token[] = [];
  let i = 0;
  let line = 1;
  let valueState = false;
  while (i < t.length) {
    const m = valueState ? matchValue(t, i) : matchInitial(t, i);
    if (!m) {
      // flex's default rule echoes an unmatched character and goes on
      if (t[i] === '\n') line++;
      i++;
      continue;
    }
    const text = t.slice(i, i + m.len);
    if (m.kind !== 'SKIP') {
      let tokText = text;
      if ('quoted' in m && m.quoted) tokText = text.slice(1, -1);
      toks.push({ kind: m.kind, text: tokText, line });
    }
    if (m.kind === 'EQUAL') valueState = true;
    else if (valueState) valueState = false;
    line += countNl(text);
    i += m.len;
  }
  return toks;
}

/** OpenNebula's unescape: every `\"` becomes `"`, scanning left to right; nothing else changes. */
function unescape(s: string): string {
  return s.split('\\"').join('"');
}

/** Parses a template the way OpenNebula's template parser does; throws TemplateSyntaxError where it would fail. */
export function parseOneTemplate(text: string): ParsedAttribute[] {
  // The parser gets a C string: a NUL ends the input.
  const nul = text.indexOf('\0');
  const toks = lex(nul >= 0 ? text.slice(0, nul) : text);
  const out: ParsedAttribute[] = [];
  let p = 0;
  const peek = (): Token | undefined => toks[p];
  const expect = (kind: TokKind): Token => {
    const tk = toks[p];
    if (!tk || tk.kind !== kind) throw new TemplateSyntaxError(`syntax error, unexpected ${tk ? tk.kind : 'end of input'}, expecting ${kind}`, tk?.line ?? 0);
    p++;
    return tk;
  };
  while (p < toks.length) {
    const name = expect('VARIABLE');
    const eq = peek();
    if (eq?.kind === 'EQUAL_EMPTY') {
      p++;
      out.push({ name: name.text, value: '', line: name.line });
      continue;
    }
    expect('EQUAL');
    const v = peek();
    if (v?.kind === 'CCDATA') throw new TemplateSyntaxError('CDATA value aborts the template', v.line);
    if (v?.kind === 'STRING') {
      p++;
      out.push({ name: name.text, value: unescape(v.text), line: name.line });
      continue;
    }
    expect('OBRACKET');
    const map: Record<string, string> = {};
    if (peek()?.kind === 'CBRACKET') {
      p++;
      out.push({ name: name.text, value: map, line: name.line });
      continue;
    }
    for (;;) {
      const k = expect('VARIABLE');
      expect('EQUAL');
      const val = expect('STRING');
      const key = k.text.toUpperCase();
      // std::map::insert keeps the first value of a repeated key
      if (!(key in map)) map[key] = unescape(val.text);
      const sep = peek();
      if (sep?.kind === 'COMMA') {
        p++;
        continue;
      }
      expect('CBRACKET');
      break;
    }
    out.push({ name: name.text, value: map, line: name.line });
  }
  return out;
}
