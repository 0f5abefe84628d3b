/**
 * install.sh roles that need no package manager: --frontend puts the probes where `onehost sync`
 * distributes them (keeping upstream's recovery.rb aside) and --uninstall takes them out again.
 */
import { describe, it, expect, afterAll } from 'vitest';
import { mkdtemp, mkdir, writeFile, readFile, readdir, stat, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { run } from '../../lib/shared/exec.js';
import { projectRoot } from '../../dev/agent-env.js';

const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

describe('install.sh --frontend / --uninstall', () => {
  it('installs the probes, keeps upstream recovery.rb aside, and restores it on uninstall', async () => {
    const root = await mkdtemp(path.join(os.tmpdir(), 'onestor-install-'));
    dirs.push(root);
    const remotes = path.join(root, 'remotes');
    const probeDir = path.join(remotes, 'im', 'kvm-probes.d', 'vm', 'snapshot');
    await mkdir(probeDir, { recursive: true });
    await writeFile(path.join(probeDir, 'recovery.rb'), '#!/usr/bin/env ruby\n# upstream\n');
    const env = { REMOTES: remotes, PREFIX: path.join(root, 'prefix'), BIN_DIR: path.join(root, 'bin') };
    const script = path.join(projectRoot(), 'install.sh');

    const inst = await run('bash', [script, '--frontend'], { env });
    expect(inst.code, inst.stderr).toBe(0);
    const installed = await readFile(path.join(probeDir, 'recovery.rb'), 'utf8');
    expect(installed).toMatch(/onestor-agent/);
    expect((await stat(path.join(probeDir, 'recovery.rb'))).mode & 0o111).not.toBe(0);
    expect(await readFile(path.join(probeDir, 'recovery.rb.onestor-orig'), 'utf8')).toMatch(/# upstream/);
    // idempotent: a second run keeps the original aside, not our copy
    expect((await run('bash', [script, '--frontend'], { env })).code).toBe(0);
    expect(await readFile(path.join(probeDir, 'recovery.rb.onestor-orig'), 'utf8')).toMatch(/# upstream/);

    const un = await run('bash', [script, '--uninstall'], { env });
    expect(un.code, un.stderr).toBe(0);
    expect(await readFile(path.join(probeDir, 'recovery.rb'), 'utf8')).toMatch(/# upstream/);
    expect(await readdir(probeDir)).toEqual(['recovery.rb']);
  });

  it('refuses unknown options with a clear message', async () => {
    const r = await run('bash', [path.join(projectRoot(), 'install.sh'), '--frobnicate']);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/unknown option '--frobnicate'/);
  });
});
