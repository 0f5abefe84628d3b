/**
 * `onestor-agent probe` options: what the wrappers and users pass (flags, environment) becomes the
 * probe's inputs. The probe itself is tested in probe.test.ts and through the built entry in
 * test/integration/probe-timeout.test.ts.
 */
import { describe, expect, it } from 'vitest';
import { probeOptions } from '../../agent/commands/probe.js';
import { parseFlags } from '../../agent/flags.js';

const opts = (argv: string[], env: NodeJS.ProcessEnv = {}) => probeOptions(parseFlags(argv).values, env);

describe('probe command options', () => {
  it('state file: --state, else ONESTOR_STATE_FILE, else --state-dir/state.json, else the default (unset)', () => {
    expect(opts(['probe', 'vm-snapshot', '--state', '/a.json', '--state-dir', '/d'], { ONESTOR_STATE_FILE: '/e.json' }).stateFile).toBe('/a.json');
    expect(opts(['probe', 'vm-snapshot', '--state-dir', '/d'], { ONESTOR_STATE_FILE: '/e.json' }).stateFile).toBe('/e.json');
    expect(opts(['probe', 'vm-snapshot', '--state-dir', '/d']).stateFile).toBe('/d/state.json');
    expect(opts(['probe', 'vm-snapshot']).stateFile).toBeUndefined();
  });

  it('datastores, deadline and the Prometheus file (flag wins over ONESTOR_PROMETHEUS_FILE)', () => {
    expect(opts(['probe', 'host-monitor', '--datastores', '/ds', '--deadline-ms', '1500', '--prometheus', '/p.prom'], { ONESTOR_PROMETHEUS_FILE: '/e.prom' })).toEqual({ datastoreLocation: '/ds', deadlineMs: 1500, prometheusFile: '/p.prom' });
    expect(opts(['probe', 'host-monitor'], { ONESTOR_PROMETHEUS_FILE: '/e.prom' })).toEqual({ prometheusFile: '/e.prom' });
    // a bad deadline is ignored (the probe must answer, not fail on its arguments)
    expect(opts(['probe', 'vm-snapshot', '--deadline-ms', 'soon']).deadlineMs).toBeUndefined();
  });

  it('extra positional arguments (monitord passes its own) are accepted', () => {
    expect(() => parseFlags(['probe', 'vm-snapshot', '3', 'host-a', '4124'])).not.toThrow();
  });
});
