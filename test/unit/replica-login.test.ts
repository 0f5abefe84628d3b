import { describe, it, expect, afterEach } from 'vitest';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { resolveReplicaLogin } from '../../agent/context.js';
import { parseConfig } from '../../lib/config/config.js';
import { thrownOnestorError } from '../helpers/errors.js';

const dirs: string[] = [];
afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

describe('resolveReplicaLogin', () => {
  it('keeps explicit settings and defaults the user to the one running the agent', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'onestor-login-'));
    dirs.push(dir);
    await writeFile(path.join(dir, 'key'), 'k');
    const c = parseConfig({ replica: { identityFile: path.join(dir, 'key'), knownHostsFile: path.join(dir, 'kh') } }, 'test');
    const r = await resolveReplicaLogin(c.replica);
    expect(r).toMatchObject({ user: os.userInfo().username, identityFile: path.join(dir, 'key'), knownHostsFile: path.join(dir, 'kh'), notes: [] });
    const explicit = await resolveReplicaLogin(parseConfig({ replica: { user: 'oneadmin', identityFile: path.join(dir, 'key') } }, 'test').replica);
    expect(explicit.user).toBe('oneadmin');
  });
  it('a missing explicit key is a clear E_SSH naming the file and field, never a silent fallback', async () => {
    const c = parseConfig({ replica: { identityFile: '/nonexistent/onestor-key' } }, 'test');
    const e = await resolveReplicaLogin(c.replica).then(() => null, (x: unknown) => x);
    const err = thrownOnestorError(() => {
      throw e;
    });
    expect(err.code).toBe('E_SSH');
    expect(err.describe()).toMatch(/\/nonexistent\/onestor-key.*replica\.identityFile/);
  });
});
