/**
 * The layout is a contract: lib/<role>/ says on which host and in which part of the job a file runs.
 * This test reads every import under lib/ and agent/ and fails on an import that crosses roles outside
 * the table below, on lib/ importing agent/ or test/, and on any import cycle.
 *
 * The two hosts meet only through shared/ and protocol/: nothing on the hypervisor side imports replica/,
 * and replica/ imports nothing of the hypervisor.
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** role -> roles it may import (besides itself). */
const ALLOWED: Record<string, readonly string[]> = {
  shared: [],
  protocol: ['shared'],
  // hypervisor side
  discover: ['shared'],
  config: ['shared', 'discover'],
  libvirt: ['shared'],
  transfer: ['shared', 'protocol'],
  // the replica is a port (cycle/ports.ts): agent/ wires lib/transfer's client into it
  cycle: ['shared', 'protocol', 'libvirt'],
  daemon: ['shared'],
  // monitoring probes read the agent's state file (cycle/state.ts) and nothing else of the cycle
  monitor: ['shared', 'cycle'],
  // replica side
  replica: ['shared', 'protocol'],
};

function listTs(dir: string): string[] {
  return (readdirSync(path.join(repo, dir), { recursive: true }) as string[])
    .filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts'))
    .map((f) => path.join(dir, f));
}

const importRe = /(?:^|\n)\s*(?:import|export)\s[^'"]*?from\s*['"](\.{1,2}\/[^'"]+)['"]|import\(\s*['"](\.{1,2}\/[^'"]+)['"]\s*\)/g;

function importsOf(file: string): string[] {
  const text = readFileSync(path.join(repo, file), 'utf8');
  const out: string[] = [];
  for (const m of text.matchAll(importRe)) {
    const spec = m[1] ?? m[2];
    if (!spec) continue;
    out.push(path.normalize(path.join(path.dirname(file), spec)).replace(/\.js$/, '.ts'));
  }
  return out;
}

function roleOf(file: string): string | null {
  const m = /^lib\/([^/]+)\//.exec(file);
  return m ? m[1]! : null;
}

const files = [...listTs('lib'), ...listTs('agent')];
const graph = new Map(files.map((f) => [f, importsOf(f)] as const));

describe('layout of the code', () => {
  it('every file under lib/ sits in a known role folder', () => {
    const stray = listTs('lib').filter((f) => !(roleOf(f)! in ALLOWED));
    expect(stray).toEqual([]);
  });

  it('no import crosses roles outside the table (the two hosts meet only in shared/ and protocol/)', () => {
    const bad: string[] = [];
    for (const [from, targets] of graph) {
      const fromRole = roleOf(from);
      for (const to of targets) {
        if (fromRole === null) continue; // agent/ wires everything
        if (!to.startsWith('lib/')) {
          bad.push(`${from} -> ${to} (lib/ may not import agent/ or test/)`);
          continue;
        }
        const toRole = roleOf(to)!;
        if (toRole === fromRole) continue;
        if (!(ALLOWED[fromRole] ?? []).includes(toRole)) bad.push(`${from} -> ${to} (${fromRole} may not use ${toRole})`);
        if (fromRole === 'monitor' && toRole === 'cycle' && to !== 'lib/cycle/state.ts') bad.push(`${from} -> ${to} (monitor reads only cycle/state.ts)`);
      }
    }
    expect(bad).toEqual([]);
  });

  it('imports resolve to files that exist', () => {
    const known = new Set(files);
    const missing = [...graph].flatMap(([from, ts]) => ts.filter((t) => (t.startsWith('lib/') || t.startsWith('agent/')) && !known.has(t)).map((t) => `${from} -> ${t}`));
    expect(missing).toEqual([]);
  });

  it('has no import cycles', () => {
    const cycles: string[] = [];
    const state = new Map<string, 'visiting' | 'done'>();
    const stack: string[] = [];
    const visit = (f: string) => {
      state.set(f, 'visiting');
      stack.push(f);
      for (const t of graph.get(f) ?? []) {
        if (!graph.has(t)) continue;
        const s = state.get(t);
        if (s === 'visiting') cycles.push([...stack.slice(stack.indexOf(t)), t].join(' -> '));
        else if (!s) visit(t);
      }
      stack.pop();
      state.set(f, 'done');
    };
    for (const f of graph.keys()) if (!state.get(f)) visit(f);
    expect(cycles).toEqual([]);
  });
});
