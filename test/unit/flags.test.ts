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
