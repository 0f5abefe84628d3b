/**
 * lib/shared/defaults.ts is the one source of default paths; files that cannot import it (the systemd
 * unit, the shell probe, the CLI help text) must repeat the same values. This fails when they drift.
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { COMMANDS, commandHelp, commandSpec } from '../../agent/commands/spec.js';
import { describe, expect, it } from 'vitest';
import * as D from '../../lib/shared/defaults.js';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const read = (f: string) => readFileSync(path.join(repo, f), 'utf8');

describe('default paths outside TypeScript agree with lib/shared/defaults.ts', () => {
  it('systemd unit may write the default state dir and datastores', () => {
    const rw = /^ReadWritePaths=(.*)$/m.exec(read('systemd/onestor-agent.service'))![1]!.split(/\s+/).map((p) => p.replace(/^-/, ''));
    expect(rw).toEqual(expect.arrayContaining([D.DEFAULT_STATE_DIR, D.DEFAULT_DATASTORE_LOCATION]));
  });

  it('the shell fallback probe looks in the default datastore location', () => {
    expect(/\|\| DS_LOC=(\S+)/.exec(read('probes/vm/snapshot/recovery.rb'))?.[1]).toBe(D.DEFAULT_DATASTORE_LOCATION);
  });

  it('the CLI help names the defaults it documents', () => {
    // the help as users see it: every command's page
    const help = COMMANDS.map((c) => commandHelp(c)).join('\n');
    for (const p of [D.DEFAULT_CONFIG_FILE, D.DEFAULT_DATASTORE_LOCATION, D.DEFAULT_STATE_DIR, D.DEFAULT_IDENTITY_FILE, D.DEFAULT_KNOWN_HOSTS_FILE, D.DEFAULT_LIBVIRT_URI]) expect(help).toContain(p);
    const receive = commandHelp(commandSpec('receive')!).replace(/\s+/g, ' ');
    for (const v of [D.RECEIVER_DEFAULTS.busyWaitSec, D.RECEIVER_DEFAULTS.idleTimeoutSec, D.RECEIVER_DEFAULTS.helloTimeoutSec, D.RECEIVER_DEFAULTS.maxSessions]) expect(receive).toContain(`(default ${v}`);
  });

  it('the state file is under the state dir and SNAPS under the datastores (upstream layout)', () => {
    expect(path.dirname(D.DEFAULT_STATE_FILE)).toBe(D.DEFAULT_STATE_DIR);
    expect(path.dirname(D.DEFAULT_DRIVER_SETTINGS.REPLICA_RECOVERY_SNAPS_DIR)).toBe(D.DEFAULT_DATASTORE_LOCATION);
  });
});
