import { describe, it, expect } from 'vitest';
import { overridesFrom, parseFlags } from '../../agent/flags.js';
import { parseConfig } from '../../lib/config/config.js';
import { thrownOnestorError } from '../helpers/errors.js';

describe('CLI flags -> config overrides', () => {
  it('map onto the config file shape and validate as config', () => {
    const { values } = parseFlags(['snapshot', '--vm', '3', '--datastores', '/ds', '--replica-port', '2222', '--replica-host', '10.0.0.5', '--max-sessions', '3', '--no-space-check', '--bandwidth-mbps', '40']);
    const o = overridesFrom(values);
    expect(o).toEqual({
      datastoreLocation: '/ds',
      replica: { port: 2222, hostOverride: '10.0.0.5' },
      receiver: { maxSessions: 3, spaceCheck: false },
      limits: { bandwidthMBps: 40 },
    });
    const c = parseConfig(o, 'command line');
    expect(c.replica.port).toBe(2222);
    expect(c.receiver.spaceCheck).toBe(false);
  });
  it('receiver limits map onto receiver.*; --host stays a flag of receive (identity, not configuration)', () => {
    const { values } = parseFlags(['receive', '--host', 'hv1', '--max-sessions-per-host', '1', '--hello-timeout', '5', '--idle-timeout', '60', '--drain-timeout', '7', '--progress-window', '20', '--min-progress-kib', '256', '--max-session-time', '3600']);
    expect(values.host).toBe('hv1');
    const o = overridesFrom(values);
    expect(o).toEqual({
      receiver: { maxSessionsPerHost: 1, helloTimeoutSec: 5, idleTimeoutSec: 60, drainTimeoutSec: 7, progressWindowSec: 20, minProgressKiB: 256, maxSessionSec: 3600 },
    });
    expect(parseConfig(o, 'command line').receiver.maxSessionSec).toBe(3600);
    expect(() => parseConfig({ receiver: { progressWindowSec: 0 } }, 'cfg')).toThrow(/receiver.progressWindowSec/);
  });
  it('a non-numeric number flag is E_CONFIG naming the flag; unknown flags are refused', () => {
    const { values } = parseFlags(['--replica-port', '22x']);
    const e = thrownOnestorError(() => overridesFrom(values));
    expect(e.code).toBe('E_CONFIG');
    expect(e.context.field).toBe('--replica-port');
    expect(() => parseFlags(['--frobnicate'])).toThrow(/frobnicate/);
  });
});

describe('receiver flags: both entries, one schema, one set of defaults', () => {
  it('receiver-main takes the receive flags and validates them as config', async () => {
    const { parseReceiverArgs } = await import('../../agent/commands/receive.js');
    const o = parseReceiverArgs(['--snaps-dir', '/snaps', '--lock-timeout', '5', '--max-sessions', '2', '--busy-wait', '1', '--idle-timeout', '30', '--max-used-percent', '80']);
    expect(o).toMatchObject({ snapsDir: '/snaps', lockTimeoutSec: 5, maxSessions: 2, busyWaitSec: 1, idleTimeoutSec: 30, maxUsedPercent: 80, spaceCheck: true, directWrites: true });
    expect(parseReceiverArgs(['--snaps-dir', '/snaps', '--no-direct-io']).directWrites).toBe(false);
  });

  it('unset flags take the same defaults as `onestor-agent receive` (config schema, upstream sshrc)', async () => {
    const { parseReceiverArgs, receiverOptionsFrom } = await import('../../agent/commands/receive.js');
    const { DEFAULT_DRIVER_SETTINGS, RECEIVER_DEFAULTS } = await import('../../lib/shared/defaults.js');
    const viaMain = parseReceiverArgs(['--snaps-dir', '/snaps']);
    // the stand-alone entry resolves the identity itself (--host, else sshd's key fingerprint, else refused)
    const viaReceive = receiverOptionsFrom(parseConfig({ receiver: { snapsDir: '/snaps' } }, 'test'), DEFAULT_DRIVER_SETTINGS, '', undefined);
    const { log: _l, allowUnidentified, ...main } = viaMain;
    expect(allowUnidentified).toBe(false);
    expect(main).toEqual(viaReceive);
    // the unified values: the config's busy wait (300 s) and session cap (256), upstream's lock timeout and fill limit
    expect(viaMain).toMatchObject({ busyWaitSec: RECEIVER_DEFAULTS.busyWaitSec, maxSessions: 4, lockTimeoutSec: 600, maxUsedPercent: 90, idleTimeoutSec: 900 });
    expect(RECEIVER_DEFAULTS.busyWaitSec).toBe(300);
  });

  it('refuses what the schema refuses, a missing SNAPS and flags of other commands', async () => {
    const { parseReceiverArgs } = await import('../../agent/commands/receive.js');
    const field = (argv: string[]) => thrownOnestorError(() => parseReceiverArgs(argv));
    expect(field(['--snaps-dir', '/s', '--max-sessions', '300']).context.field).toBe('receiver.maxSessions');
    expect(field(['--snaps-dir', 'relative']).context.field).toBe('receiver.snapsDir');
    expect(field(['--lock-timeout', '5']).context.field).toBe('--snaps-dir');
    expect(field(['--snaps-dir', '/s', '--vm', '3']).context.field).toBe('--vm');
    expect(field(['--snaps-dir', '/s', '--busy-wait', 'x']).code).toBe('E_CONFIG');
    expect(field(['--snaps-dir', '/s', 'extra']).code).toBe('E_CONFIG');
  });
});
