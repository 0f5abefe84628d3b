/**
 * The layout is a contract: lib/<role>/ says on which host and in which part of the job a file runs.
 * This test reads every import under lib/, agent/ and dev/ and fails on an import that crosses roles
 * outside the table below, on lib/ importing agent/, dev/ or test/, on production code importing test/
 * (dev/, the throwaway cluster of the demo, is used by the demo command only), and on any import cycle.
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
  cycle: ['shared', 'protocol', 'libvirt', 'discover'],
  // the loop drives cycles through ports, and reports through the shared assessment (monitor/)
  daemon: ['shared', 'cycle', 'monitor'],
  // monitoring reads the agent's state file (cycle/state.ts) and the driver settings (config/sshrc.ts),
  // nothing else of the hypervisor side
  monitor: ['shared', 'cycle', 'config'],
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

/** value imports (not `import type`), static or import(), of any specifier; and static ones only */
const ANY_IMPORT_RE = /(?:^|\n)\s*(?:import|export)\s(?!type\b)[^'"]*?from\s*['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)/g;
const STATIC_IMPORT_RE = /(?:^|\n)\s*(?:import|export)\s(?!type\b)[^'"]*?from\s*['"]([^'"]+)['"]/g;

/** The sources `entry` reaches through imports matched by `re`, and the packages they import (sorted). */
function packagesOf(entry: string, re: RegExp): { seen: Set<string>; packages: string[] } {
  const seen = new Set<string>();
  const packages = new Set<string>();
  const walk = (f: string) => {
    if (seen.has(f)) return;
    seen.add(f);
    for (const m of readFileSync(path.join(repo, f), 'utf8').matchAll(re)) {
      const s = (m[1] ?? m[2])!;
      if (s.startsWith('.')) walk(path.normalize(path.join(path.dirname(f), s)).replace(/\.js$/, '.ts'));
      else if (!s.startsWith('node:')) packages.add(s.split('/')[0]!);
    }
  };
  walk(entry);
  return { seen, packages: [...packages].sort() };
}

const files = [...listTs('lib'), ...listTs('agent'), ...listTs('dev')];
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
        if (fromRole === null) continue; // agent/ wires everything; dev/ is checked below
        if (!to.startsWith('lib/')) {
          bad.push(`${from} -> ${to} (lib/ may not import agent/ or test/)`);
          continue;
        }
        const toRole = roleOf(to)!;
        if (toRole === fromRole) continue;
        if (!(ALLOWED[fromRole] ?? []).includes(toRole)) bad.push(`${from} -> ${to} (${fromRole} may not use ${toRole})`);
        if (fromRole === 'monitor' && toRole === 'cycle' && to !== 'lib/cycle/state.ts') bad.push(`${from} -> ${to} (monitor reads only cycle/state.ts)`);
        if (fromRole === 'monitor' && toRole === 'config' && to !== 'lib/config/sshrc.ts') bad.push(`${from} -> ${to} (monitor reads only config/sshrc.ts)`);
      }
    }
    expect(bad).toEqual([]);
  });

  it('production code does not depend on tests: agent/, lib/ and dev/ never import test/', () => {
    const bad = [...graph].flatMap(([from, ts]) => ts.filter((t) => t.startsWith('test/')).map((t) => `${from} -> ${t}`));
    expect(bad).toEqual([]);
  });

  it('dev/ (the demo cluster and test harness) is used only by the demo command, and uses only lib/ and dev/', () => {
    const bad: string[] = [];
    for (const [from, ts] of graph) {
      for (const t of ts) {
        if (t.startsWith('dev/') && !from.startsWith('dev/') && from !== 'agent/commands/demo.ts') bad.push(`${from} -> ${t}`);
        if (from.startsWith('dev/') && !t.startsWith('dev/') && !t.startsWith('lib/')) bad.push(`${from} -> ${t}`);
      }
    }
    expect(bad).toEqual([]);
  });

  it('the probe path loads no heavy dependency (pino, zod, ssh2, fast-xml-parser)', () => {
    // `import type` is erased at build time and loads nothing
    const heavy = /(?:^|\n)\s*import\s(?!type\b)[^'"]*?from\s*['"](pino|zod|ssh2|fast-xml-parser)['"]/;
    // static imports only: what `onestor-agent probe` loads before it answers
    const staticRe = /(?:^|\n)\s*(?:import|export)\s(?!type\b)[^'"]*?from\s*['"](\.{1,2}\/[^'"]+)['"]/g;
    const seen = new Set<string>();
    const offenders: string[] = [];
    const walk = (f: string, via: string[]) => {
      if (seen.has(f)) return;
      seen.add(f);
      const text = readFileSync(path.join(repo, f), 'utf8');
      const m = heavy.exec(text);
      if (m) offenders.push(`${[...via, f].join(' -> ')} imports ${m[1]}`);
      for (const s of text.matchAll(staticRe)) walk(path.normalize(path.join(path.dirname(f), s[1]!)).replace(/\.js$/, '.ts'), [...via, f]);
    };
    for (const entry of ['agent/main.ts', 'agent/probe-cli.ts', 'agent/commands/probe.ts']) walk(entry, []);
    expect(offenders).toEqual([]);
    // and the entry reaches commands only through import(): nothing of `run` or `snapshot` loads for a probe
    expect(seen.has('agent/commands/run.ts')).toBe(false);
    expect(seen.has('agent/context.ts')).toBe(false);
    // main.ts loads one command table, never both: `probe` does not even load the table of the others
    expect(seen.has('agent/cli.ts')).toBe(false);
  });

  it('the probe entry (built into one file) reaches by import() only the probe path, plus the logger it never builds', () => {
    // dev/bundle-probe.ts inlines these; any other import() there would be left out of the bundle
    const dynRe = /import\(\s*['"](\.{1,2}\/[^'"]+)['"]\s*\)/g;
    const staticRe = /(?:^|\n)\s*(?:import|export)\s(?!type\b)[^'"]*?from\s*['"](\.{1,2}\/[^'"]+)['"]/g;
    const seen = new Set<string>();
    const dynamic: string[] = [];
    const walk = (f: string) => {
      if (seen.has(f)) return;
      seen.add(f);
      const text = readFileSync(path.join(repo, f), 'utf8');
      const resolve = (s: string) => path.normalize(path.join(path.dirname(f), s)).replace(/\.js$/, '.ts');
      for (const m of text.matchAll(staticRe)) walk(resolve(m[1]!));
      for (const m of text.matchAll(dynRe)) {
        const t = resolve(m[1]!);
        dynamic.push(`${f} -> ${t}`);
        if (/^(agent\/commands\/probe|lib\/monitor\/(replica-gather|prometheus)|lib\/shared\/version)\.ts$/.test(t)) walk(t);
      }
    };
    walk('agent/probe-cli.ts');
    const outside = dynamic.filter((d) => !/-> (agent\/commands\/probe|lib\/monitor\/(replica-gather|prometheus)|lib\/shared\/(version|log)|lib\/replica\/stdio)\.ts$/.test(d));
    expect(outside).toEqual([]);
    // those two are for commands that log, reached only from agent/dispatch.ts (so their relative path stays valid from the bundle)
    expect(dynamic.filter((d) => /-> lib\/(shared\/log|replica\/stdio)\.ts$/.test(d)).every((d) => d.startsWith('agent/dispatch.ts ->'))).toBe(true);
  });

  it('the idle daemon loads no transfer, cycle or capture code (they load with the first cycle)', () => {
    // static imports from the `run` command: what a daemon that never runs a cycle keeps in memory
    const staticRe = /(?:^|\n)\s*(?:import|export)\s(?!type\b)[^'"]*?from\s*['"]([^'"]+)['"]/g;
    const seen = new Set<string>();
    const packages = new Set<string>();
    const walk = (f: string) => {
      if (seen.has(f)) return;
      seen.add(f);
      const text = readFileSync(path.join(repo, f), 'utf8');
      for (const m of text.matchAll(staticRe)) {
        const s = m[1]!;
        if (s.startsWith('.')) walk(path.normalize(path.join(path.dirname(f), s)).replace(/\.js$/, '.ts'));
        else if (!s.startsWith('node:')) packages.add(s);
      }
    };
    walk('agent/commands/run.ts');
    expect([...packages].filter((p) => p === 'ssh2' || p.startsWith('ssh2/'))).toEqual([]);
    const cycleOnly = ['lib/transfer/replica-client.ts', 'lib/cycle/cycle.ts', 'lib/cycle/ports.ts', 'lib/cycle/capture.ts', 'lib/cycle/digest.ts', 'lib/cycle/rebuild.ts', 'lib/protocol/protocol.ts'];
    expect(cycleOnly.filter((f) => seen.has(f))).toEqual([]);
  });

  it('the daemon entry (built into one file and chunks) reaches only packages the bundle step knows, and loads ssh2 and the cycle only by import()', () => {
    // dev/bundle-daemon.ts bundles zod, pino, fast-xml-parser and xxhash-wasm (WASM inline, by import() with
    // the first upload: lib/protocol/digest.ts) and leaves ssh2 (native) a package: a new
    // package on the daemon's path needs a decision there (bundle it, or keep it external)
    const all = packagesOf('agent/daemon-cli.ts', ANY_IMPORT_RE);
    expect(all.packages.filter((p) => !['fast-xml-parser', 'pino', 'ssh2', 'xxhash-wasm', 'zod'].includes(p))).toEqual([]);
    // xxhash-wasm only by import(): an idle daemon never compiles it
    expect(packagesOf('agent/daemon-cli.ts', STATIC_IMPORT_RE).packages).not.toContain('xxhash-wasm');
    expect(all.seen.has('agent/commands/run.ts')).toBe(true);
    // what the entry and dispatch load before the command: no cycle code, no ssh2
    const start = packagesOf('agent/daemon-cli.ts', STATIC_IMPORT_RE);
    expect(start.packages).not.toContain('ssh2');
    expect([...start.seen].filter((f) => f.startsWith('lib/cycle/') || f.startsWith('lib/transfer/'))).toEqual([]);
    // main.ts reaches it by import() for `run` only (checked with the probe path above: no static import)
    expect(readFileSync(path.join(repo, 'agent/main.ts'), 'utf8')).toMatch(/argv\[0\] === 'run' \? import\('\.\/daemon-cli\.js'\)/);
  });

  it('the receive entry (built into one file) reaches no host-side code and only packages the bundle holds', () => {
    // dev/bundle-receive.ts puts everything `receive` reaches, static or import(), into one module; the
    // replica never loads the cycle, the transfer client, the libvirt adapter or ssh2
    const { seen, packages } = packagesOf('agent/receive-cli.ts', ANY_IMPORT_RE);
    expect(seen.has('lib/replica/receiver.ts')).toBe(true);
    expect([...seen].filter((f) => /^lib\/(cycle|transfer|libvirt)\//.test(f))).toEqual([]);
    expect(packages.filter((p) => !['fast-xml-parser', 'pino', 'xxhash-wasm', 'zod'].includes(p))).toEqual([]);
    // main.ts runs the built .cjs of that entry, or tsc's module when the build made none
    const main = readFileSync(path.join(repo, 'agent/main.ts'), 'utf8');
    expect(main).toMatch(/argv\[0\] === 'receive' \? receiveCli\(\)/);
    expect(main).toMatch(/new URL\('\.\/receive-cli\.cjs', import\.meta\.url\)/);
    expect(main).toMatch(/return import\('\.\/receive-cli\.js'\)/);
  });

  it('imports resolve to files that exist', () => {
    const known = new Set(files);
    const missing = [...graph].flatMap(([from, ts]) => ts.filter((t) => (t.startsWith('lib/') || t.startsWith('agent/') || t.startsWith('dev/')) && !known.has(t)).map((t) => `${from} -> ${t}`));
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
