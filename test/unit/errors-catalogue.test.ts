/**
 * One truth for error and exit codes: lib/shared/errors.ts (ERROR_CATALOGUE) and lib/shared/exit-codes.ts
 * (EXIT_TABLE). docs/errors.md and README's exit-code table are checked against them (as fastify checks its
 * docs against its error list); any `E_...` code written anywhere in the product must be in the catalogue;
 * lib/ throws no plain Error (it would reach users as E_INTERNAL without a code of its own).
 *
 * After changing the catalogue: UPDATE_DOCS=1 npx vitest run test/unit/errors-catalogue.test.ts
 */
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { ERROR_CATALOGUE, ErrorCodes, isErrorCode } from '../../lib/shared/errors.js';
import { EXIT_TABLE, Exit } from '../../lib/shared/exit-codes.js';
import { AGENT_VERSION } from '../../lib/shared/version.js';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const read = (f: string) => readFileSync(path.join(repo, f), 'utf8');

function listFiles(dir: string, exts: readonly string[]): string[] {
  return (readdirSync(path.join(repo, dir), { recursive: true }) as string[])
    .filter((f) => exts.some((e) => f.endsWith(e)) && !f.endsWith('.d.ts'))
    .map((f) => path.join(dir, f));
}

export function renderErrorsDoc(): string {
  const lines = [
    '# Error codes',
    '',
    '<!-- Generated from lib/shared/errors.ts (ERROR_CATALOGUE) by test/unit/errors-catalogue.test.ts; do not edit by hand. -->',
    '',
    'Every failure the agent reports (logs, `status`, state, the OpenNebula probes, Prometheus, receiver replies)',
    'carries one of these codes. Scope: `agent` = daemon and CLI on the hypervisor; `replica` = the receiver;',
    '`probe` = the monitoring verdicts OpenNebula and Prometheus show.',
    '',
    '| code | meaning | what to do | scope |',
    '|---|---|---|---|',
  ];
  for (const [code, info] of Object.entries(ERROR_CATALOGUE)) {
    lines.push(`| \`${code}\` | ${info.meaning} | ${info.action} | ${info.scope.join(', ')} |`);
  }
  lines.push('', 'Exit codes of every command are in the README ("Exit codes").', '');
  return lines.join('\n');
}

describe('error catalogue', () => {
  it('ErrorCodes and the catalogue hold the same codes, each with a meaning', () => {
    expect(Object.values(ErrorCodes).sort()).toEqual(Object.keys(ERROR_CATALOGUE).sort());
    for (const [code, info] of Object.entries(ERROR_CATALOGUE)) {
      expect(code).toMatch(/^E_[A-Z][A-Z0-9_]*$/);
      expect(info.meaning.length, code).toBeGreaterThan(10);
      expect(info.scope.length, code).toBeGreaterThan(0);
    }
  });

  it('docs/errors.md is the catalogue rendered', () => {
    const want = renderErrorsDoc();
    if (process.env['UPDATE_DOCS']) writeFileSync(path.join(repo, 'docs/errors.md'), want);
    expect(read('docs/errors.md')).toBe(want);
  });

  it('every E_ code written in the product (code, probes, install, docs) is in the catalogue', () => {
    const files = [...listFiles('lib', ['.ts']), ...listFiles('agent', ['.ts']), ...listFiles('probes', ['.rb', '.sh']), ...listFiles('systemd', ['']), 'install.sh', 'README.md'];
    const unknown: string[] = [];
    let seen = 0;
    for (const f of files) {
      for (const m of read(f).matchAll(/\bE_[A-Z][A-Z0-9_]*\b/g)) {
        seen++;
        if (!isErrorCode(m[0])) unknown.push(`${f}: ${m[0]}`);
      }
    }
    expect(unknown).toEqual([]);
    expect(seen).toBeGreaterThan(10); // the scan found the codes at all
  });

  it('the probe codes are in the catalogue (OpenNebula shows them as ERROR_CODE)', () => {
    for (const c of ['E_AGENT_DOWN', 'E_NO_SNAPSHOT', 'E_OVERDUE']) expect(ERROR_CATALOGUE[c as keyof typeof ERROR_CATALOGUE]?.scope).toContain('probe');
  });
});

describe('no plain Error from lib/', () => {
  /** file -> why a plain Error is right there */
  const ALLOWED: Record<string, string> = {
    // errno-shaped on purpose: a short write goes through the same ENOSPC mapping as a real one
    'lib/replica/receiver.ts': "Object.assign(new Error('short write'), { code: 'ENOSPC' })",
  };

  it('lib/ creates no `new Error(` outside the allowed cases', () => {
    const bad: string[] = [];
    for (const f of listFiles('lib', ['.ts'])) {
      read(f)
        .split('\n')
        .forEach((line, i) => {
          if (!/\bnew Error\(/.test(line)) return;
          if (ALLOWED[f] && line.includes(ALLOWED[f]!)) return;
          bad.push(`${f}:${i + 1}: ${line.trim()}`);
        });
    }
    expect(bad).toEqual([]);
  });
});

describe('exit codes', () => {
  it('README "Exit codes" is EXIT_TABLE, row by row', () => {
    const readme = read('README.md');
    const section = readme.slice(readme.indexOf('### Exit codes'));
    const rows = [...section.split('\n## ')[0]!.matchAll(/^\| (\d+) \| (.+) \|$/gm)].map((m) => [Number(m[1]), m[2]!.trim()] as const);
    expect(rows).toEqual(EXIT_TABLE.map(([c, t]) => [c, t]));
  });

  it('every Exit constant has a row and codes are distinct', () => {
    const codes = Object.values(Exit);
    expect(new Set(codes).size).toBe(codes.length);
    expect(EXIT_TABLE.map(([c]) => c).sort((a, b) => a - b)).toEqual([...codes].sort((a, b) => a - b));
  });
});

describe('version', () => {
  it('is package.json\'s', () => {
    expect(AGENT_VERSION).toBe((JSON.parse(read('package.json')) as { version: string }).version);
  });
});
