/**
 * Help through the real CLI (agent/cli.ts): `onestor-agent CMD --help` and `help CMD` print that
 * command's usage, options and exit codes, and nothing is loaded or run to do it.
 */
import { describe, expect, it } from 'vitest';
import { runCli } from '../../agent/cli.js';
import { COMMANDS } from '../../agent/commands/spec.js';
import { Exit } from '../../agent/exit-codes.js';

async function cli(argv: string[]) {
  let stdout = '';
  let stderr = '';
  const code = await runCli(argv, { stdout: { write: (s: string) => (stdout += s) }, stderr: { write: (s: string) => (stderr += s) } });
  return { code, stdout, stderr };
}

describe('per-command help', () => {
  it('snapshot --help: its usage, its options, the common options and its exit codes', async () => {
    const r = await cli(['snapshot', '--help']);
    expect(r.code).toBe(Exit.OK);
    expect(r.stdout).toMatch(/^onestor-agent snapshot — /);
    expect(r.stdout).toContain('Usage: onestor-agent snapshot --vm ID [--disk N] [--full] [--json] [options]');
    expect(r.stdout).toMatch(/\n {2}--full +send a full snapshot/);
    expect(r.stdout).toContain('--replica-host HOST');
    expect(r.stdout).toMatch(/Exit codes:\n {2}0 +every disk published\n {2}1 .*\n {2}2 .*\n {2}130 +interrupted/);
    // not the general help
    expect(r.stdout).not.toContain('Commands:');
  });

  it('status --help lists 3 (not protected) and 4 (daemon down); probe --help says it always exits 0', async () => {
    const status = await cli(['status', '--help']);
    expect(status.stdout).toMatch(/\n {2}3 +a protected disk is overdue or failing/);
    expect(status.stdout).toMatch(/\n {2}4 +protected disks exist but the daemon is not running/);
    const probe = await cli(['probe', '--help']);
    expect(probe.stdout).toContain('Usage: onestor-agent probe <vm-snapshot|host-monitor|replica-ds>');
    expect(probe.stdout).toContain('--deadline-ms N');
    expect(probe.stdout).toMatch(/Exit codes:\n {2}0 +always/);
    // the probe takes no config: the common options are not offered
    expect(probe.stdout).not.toContain('--replica-host');
  });

  it('every command has its own help, the same through `help CMD`, lines at most 100 wide', async () => {
    for (const c of COMMANDS) {
      const a = await cli([c.name, '--help']);
      const b = await cli(['help', c.name]);
      expect(a.stdout).toBe(b.stdout);
      expect(a.stdout).toContain(`Usage: onestor-agent ${c.name}`);
      expect(a.stdout).toContain('Exit codes:');
      for (const line of a.stdout.split('\n')) expect(line.length, line).toBeLessThanOrEqual(100);
    }
  });

  it('--help and no command print the general help naming every command', async () => {
    for (const argv of [['--help'], []]) {
      const r = await cli(argv);
      expect(r.code).toBe(Exit.OK);
      for (const c of COMMANDS) expect(r.stdout).toMatch(new RegExp(`\\n {2}${c.name} +`));
      expect(r.stdout).toContain("Run 'onestor-agent COMMAND --help'");
    }
  });

  it('a bad option points at that command\'s help; an unknown command is a usage error', async () => {
    const bad = await cli(['snapshot', '--vmm', '3']);
    expect(bad.code).toBe(Exit.USAGE);
    expect(bad.stderr).toContain("Try 'onestor-agent snapshot --help'.");
    const unknown = await cli(['snapshots']);
    expect(unknown.code).toBe(Exit.USAGE);
    expect(unknown.stderr).toMatch(/unknown command 'snapshots'/);
  });
});
