/**
 * The sans-IO framing of an interactive virsh, on a session captured from a real libvirt 9.0 virsh
 * (test/fixtures/virsh-shell/session.json: what it printed for seven commands, and what a one-shot virsh
 * printed for each) and on hostile or damaged streams.
 */
import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ShellProtocolError, VirshShellFrames, actionOutcome, markerLines, shellLine, type ShellOutput } from '../../lib/libvirt/virsh-shell-protocol.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const session = JSON.parse(readFileSync(path.join(here, '..', 'fixtures', 'virsh-shell', 'session.json'), 'utf8')) as {
  startToken: string;
  commands: string[][];
  tokens: string[];
  stdout: string;
  stderr: string;
  oneshot: Array<string | null>;
};

/** Replays the session, cutting stdout and stderr into pieces of `step` characters, interleaved. */
function replay(step: number, stdout = session.stdout, stderr = session.stderr): { frames: VirshShellFrames; results: ShellOutput[]; written: string } {
  const frames = new VirshShellFrames();
  let written = frames.start(session.startToken);
  for (const [i, c] of session.commands.entries()) written += frames.send(shellLine(c)!, session.tokens[i]!);
  const results: ShellOutput[] = [];
  for (let o = 0, e = 0; o < stdout.length || e < stderr.length; ) {
    if (e < stderr.length) {
      frames.stderr(stderr.slice(e, e + step));
      e += step;
    }
    if (o < stdout.length) {
      frames.stdout(stdout.slice(o, o + step));
      o += step;
    }
    results.push(...frames.take());
  }
  return { frames, results, written };
}

describe('virsh shell framing on a captured session', () => {
  it('gives each command exactly the stdout a one-shot virsh printed, and its own stderr', () => {
    const { frames, results, written } = replay(1 << 20);
    expect(frames.ready).toBe(true);
    expect(frames.inFlight).toBe(0);
    expect(results).toHaveLength(session.commands.length);
    for (const [i, r] of results.entries()) {
      const one = session.oneshot[i];
      if (one === null) {
        // the missing domain: no output, its error on stderr
        expect(r.stderr).toBe("error: failed to get domain 'one-99999'\n");
      } else {
        expect(r.stdout).toBe(one);
        expect(r.stderr).toBe('');
      }
    }
    // the dumpxml answer is the whole document
    expect(results[4]!.stdout).toMatch(/^<domain type=[\s\S]*<\/domain>\n\n$/);
    // what was written is one line per command plus the two marker lines
    expect(written.split('\n').filter(Boolean)).toHaveLength(2 + session.commands.length * 3);
  });

  it('gives the same answers however the streams are cut', () => {
    const whole = replay(1 << 20).results;
    for (const step of [1, 2, 3, 7, 64, 1000]) expect(replay(step).results).toEqual(whole);
  });

  it('waits for both markers before answering', () => {
    const frames = new VirshShellFrames();
    frames.start(session.startToken);
    frames.send(shellLine(session.commands[0]!)!, session.tokens[0]!);
    const firstEnd = session.stdout.indexOf(`${session.tokens[0]}&lt;`) + session.tokens[0]!.length + 4;
    frames.stdout(session.stdout.slice(0, firstEnd));
    // stdout complete, stderr still missing its marker
    expect(frames.take()).toEqual([]);
    frames.stderr(`error: ${session.startToken}&lt;\n`);
    expect(frames.take()).toEqual([]);
    frames.stderr(`error: ${session.tokens[0]}&lt;\n`);
    expect(frames.take()).toEqual([{ stdout: session.oneshot[0], stderr: '' }]);
  });
});

describe('virsh shell framing on hostile and damaged streams', () => {
  const start = 'OSTKaaaaaaaaaaaaaaaaaaaaaaaa';
  const tok = 'OSTKbbbbbbbbbbbbbbbbbbbbbbbb';
  const ready = (): VirshShellFrames => {
    const f = new VirshShellFrames();
    f.start(start);
    f.stdout(`Welcome\nvirsh # echo --err --xml ${start}<\n\nvirsh # echo --xml ${start}<\n${start}&lt;`);
    f.stderr(`error: ${start}&lt;\n`);
    expect(f.ready).toBe(true);
    return f;
  };
  const frameOf = (line: string, out: string, token = tok): string =>
    `\nvirsh # ${line}\n${out}virsh # echo --err --xml ${token}<\n\nvirsh # echo --xml ${token}<\n${token}&lt;`;

  it('keeps output that imitates prompts and markers (without the secret token) as output', () => {
    const f = ready();
    f.send('dumpxml one-1', tok);
    const out = `<description>\nvirsh # echo --xml OSTKcccccccccccccccccccccccc<\nOSTKcccccccccccccccccccccccc&lt;\nerror: x\n</description>\n`;
    f.stdout(frameOf('dumpxml one-1', out));
    f.stderr(`error: ${tok}&lt;\n`);
    expect(f.take()).toEqual([{ stdout: out, stderr: '' }]);
  });

  it('rejects an echo that readline rewrote (wrapped, completed, scrolled)', () => {
    const f = ready();
    f.send('echo xxxx yyyy', tok);
    expect(() => f.stdout('\nvirsh # echo xxxx\ryyyy\n')).toThrow(ShellProtocolError);
    const g = ready();
    g.send('domstate one-1', tok);
    expect(() => g.stdout('\nvirsh # \r<omstate one-1\n')).toThrow(ShellProtocolError);
  });

  it('rejects a marker whose frame is not exactly the expected lines', () => {
    const f = ready();
    f.send('domstate one-1', tok);
    expect(() => f.stdout(`\nvirsh # domstate one-1\nrunning\n${tok}&lt;`)).toThrow(/malformed frame/);
  });

  it('rejects output before the conversation started and output between commands', () => {
    const f = new VirshShellFrames();
    expect(() => f.stdout('hello')).toThrow(ShellProtocolError);
    const g = ready();
    expect(() => g.stdout('\nvirsh # surprise\n')).toThrow(/between commands/);
  });

  it('treats stderr before the startup marker as a shell that cannot work', () => {
    const f = new VirshShellFrames();
    f.start(start);
    f.stderr(`error: failed to connect to the hypervisor\nerror: ${start}&lt;\n`);
    expect(() => f.stdout(`virsh # echo --xml ${start}<\n${start}&lt;`)).toThrow(/did not start cleanly: error: failed to connect/);
  });

  it('gives an error printed between commands (a disconnect notice) to the next command, which then is not clean', () => {
    const f = ready();
    f.stderr('error: Disconnected from qemu:///system due to end of file\n');
    f.send('domstate one-1', tok);
    f.stdout(frameOf('domstate one-1', 'running\n\n'));
    f.stderr(`error: Reconnected to the hypervisor\nerror: ${tok}&lt;\n`);
    const [r] = f.take();
    expect(r!.stdout).toBe('running\n\n');
    expect(r!.stderr).toBe('error: Disconnected from qemu:///system due to end of file\nerror: Reconnected to the hypervisor\n');
  });

  it('never answers from random output that lacks the secret token (fuzz)', () => {
    let seed = 0x5eed;
    const rnd = (n: number) => ((seed = (seed * 1103515245 + 12345) >>> 0) % n);
    const pieces = ['\n', 'virsh # ', 'echo --xml ', 'echo --err --xml ', 'OSTKcccccccccccccccccccccccc', '&lt;', '<', 'error: ', 'running', ' '];
    for (let round = 0; round < 500; round++) {
      const f = ready();
      f.send('domstate one-1', tok);
      let out = '';
      for (let i = rnd(40); i > 0; i--) out += pieces[rnd(pieces.length)];
      try {
        f.stdout(out);
        f.stderr(out);
      } catch (e) {
        expect(e).toBeInstanceOf(ShellProtocolError);
        continue;
      }
      expect(f.take()).toEqual([]);
    }
  });

  it('bounds what it buffers while no marker comes', () => {
    const f = new VirshShellFrames(1024);
    f.start(start);
    expect(() => f.stdout('x'.repeat(1025))).toThrow(/more than 1024 bytes/);
  });

  it('refuses misuse', () => {
    const f = new VirshShellFrames();
    expect(() => f.send('domstate one-1', tok)).toThrow(/before start/);
    f.start(start);
    expect(() => f.start(start)).toThrow(/twice/);
    expect(() => f.send('a\nquit', tok)).toThrow(/newline/);
    expect(markerLines(tok)).toBe(`echo --err --xml ${tok}<\necho --xml ${tok}<\n`);
  });
});

describe('shellLine', () => {
  it('writes plain arguments as they are and quotes printable ones with spaces or shell characters', () => {
    expect(shellLine(['domstate', 'one-7', '--reason'])).toBe('domstate one-7 --reason');
    expect(shellLine(['checkpoint-dumpxml', 'one-7', 'onestor-1700000000-0', '--size'])).toBe('checkpoint-dumpxml one-7 onestor-1700000000-0 --size');
    expect(shellLine(['dumpxml', 'my vm'])).toBe("dumpxml 'my vm'");
    expect(shellLine(['dumpxml', 'a;quit'])).toBe("dumpxml 'a;quit'");
    expect(shellLine(['dumpxml', '#x'])).toBe("dumpxml '#x'");
  });

  it('declines what readline or the tokenizer would change', () => {
    for (const bad of ['a\nquit', 'a\tb', 'a\rb', '\x1b[A', "it's", 'say "x"', 'back\\slash', 'dé', '\x00', '\x7f', ''])
      expect(shellLine(['dumpxml', bad]), JSON.stringify(bad)).toBeNull();
    expect(shellLine([])).toBeNull();
  });
});

describe('actionOutcome: a state change answered by a shell', () => {
  const started = /^Backup started\n/;
  const disconnected = "error: Disconnected from qemu:///system due to end of file\n";
  const reconnected = 'error: Reconnected to the hypervisor\n';

  it('is ok only with its success output and no error line', () => {
    expect(actionOutcome({ stdout: 'Backup started\n\n', stderr: '' }, started)).toEqual({ kind: 'ok' });
    // no output expected (domjobabort): ok when there is none
    expect(actionOutcome({ stdout: '\n', stderr: '' }, null)).toEqual({ kind: 'ok' });
    // after a reconnect the command ran on the new connection and said so
    expect(actionOutcome({ stdout: 'Backup started\n', stderr: disconnected + reconnected }, started)).toEqual({ kind: 'ok' });
  });

  it('is a failure with the error lines a one-shot run prints, connection notices left out', () => {
    expect(actionOutcome({ stdout: '\n', stderr: 'error: Requested operation is not valid: no job is active on the domain\n' }, null)).toEqual({
      kind: 'failed',
      stderr: 'error: Requested operation is not valid: no job is active on the domain\n',
    });
    expect(actionOutcome({ stdout: '', stderr: disconnected + "error: Domain checkpoint not found: no domain checkpoint with matching name 'x'\n" }, /deleted/)).toEqual({
      kind: 'failed',
      stderr: "error: Domain checkpoint not found: no domain checkpoint with matching name 'x'\n",
    });
  });

  it('is unclear when nothing says whether it took effect', () => {
    // silent: neither success output nor an error (a command that failed without a libvirt error)
    expect(actionOutcome({ stdout: '\n', stderr: '' }, started).kind).toBe('unclear');
    // only connection notices, and no success output
    expect(actionOutcome({ stdout: '', stderr: disconnected }, started).kind).toBe('unclear');
    expect(actionOutcome({ stdout: '', stderr: reconnected }, null).kind).toBe('unclear');
    // success output and an error line: contradictory
    expect(actionOutcome({ stdout: 'Backup started\n', stderr: 'error: something\n' }, started).kind).toBe('unclear');
    // output where none is expected
    expect(actionOutcome({ stdout: 'Job aborted?\n', stderr: '' }, null).kind).toBe('unclear');
    // a success line that only looks like one
    expect(actionOutcome({ stdout: 'xBackup started\n', stderr: '' }, started).kind).toBe('unclear');
  });
});
