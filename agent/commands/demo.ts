/**
 * `onestor-agent demo`: the whole product on one machine in a minute, with nothing to configure.
 * A throwaway private libvirtd with a tiny VM in the OpenNebula layout, a loopback sshd as the replica
 * (restricted key, forced `onestor-agent receive`), then real cycles: a full snapshot, guest writes,
 * a second cycle, the replica's files, a recover drill, and `status`. Everything is removed at the end
 * unless --keep.
 */
import path from 'node:path';
import type { Logger } from 'pino';
import type { Flags } from '../flags.js';
import { Exit } from '../exit-codes.js';
import { run as exec } from '../../lib/shared/exec.js';

const FREQ = 10;
const DAEMON_SECONDS = 25;

function say(s: string): void {
  process.stdout.write(`\n\x1b[1m== ${s}\x1b[0m\n`);
}

export async function run(f: Flags, _pos: string[], _log: Logger): Promise<number> {
  if (process.getuid?.() !== 0) {
    process.stderr.write('demo: run as root (it starts a private libvirtd and sshd)\n');
    return Exit.USAGE;
  }
  const { startAgentEnv } = await import('../../dev/agent-env.js');
  const { guestWrite, guestFlush, readGuestView, sha256File } = await import('../../dev/guest.js');
  const { recoverDrill } = await import('../../dev/recover.js');
  say('starting a private libvirtd, a loopback sshd replica, and VM 7 in the OpenNebula layout');
  const env = await startAgentEnv({ name: 'demo' });
  let ok = true;
  try {
    const vm = await env.createVm({ vmId: 7, disks: [{ diskId: 0, sizeMiB: 256, freq: FREQ, baseData: [{ offsetMiB: 0, lengthMiB: 64, pattern: 0x5a }] }] });
    process.stdout.write(`libvirt: ${env.lv.uri} (${env.lv.domainType})\ndatastores: ${env.dsRoot}\nreplica: ${env.sshd.user}@${env.sshd.host}:${env.sshd.port} SNAPS=${env.snapsDir}\n`);
    const show = async (args: string[]) => {
      const r = await env.agent(args);
      process.stdout.write(`$ onestor-agent ${args.join(' ')}\n${r.stdout}${r.stderr ? r.stderr.split('\n').filter((l) => /"level":(4|5)\d/.test(l) || !l.startsWith('{')).join('\n') : ''}`);
      return r;
    };
    say('discovery');
    await show(['list']);

    say('guest writes 16 MiB, then the first (full) cycle');
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 100, lengthMiB: 16, pattern: 0x61 });
    await guestFlush(env.lv, vm.domainName, 'vda');
    const ref1 = path.join(env.root, 'ref1.raw');
    await readGuestView(vm.disks[0]!.base1Path, ref1);
    ok = (await show(['snapshot', '--vm', '7'])).code === 0 && ok;

    say(`the daemon (onestor-agent run) for ${DAEMON_SECONDS} s: RECOVERY_SNAPSHOT_FREQ=${FREQ}, the guest keeps writing`);
    const { spawn } = await import('node:child_process');
    const { agentMain, agentProcessEnv } = await import('../../dev/agent-env.js');
    const daemon = spawn(process.execPath, [agentMain(), 'run', ...env.flags], { stdio: ['ignore', 'pipe', 'pipe'], env: agentProcessEnv(env.flags, { JOURNAL_STREAM: '' }) });
    const relay = (d: Buffer) => {
      for (const line of d.toString().split('\n')) {
        if (!line) continue;
        try {
          const o = JSON.parse(line) as { msg?: string; level?: number; [k: string]: unknown };
          if (o.msg === 'cycle end' || o.msg === 'disk published' || (o.level ?? 0) >= 40) {
            const { level: _l, time, msg, ...rest } = o;
            process.stdout.write(`  daemon ${String(time).slice(11, 19)} ${msg} ${Object.entries(rest).map(([k, v]) => `${k}=${v}`).join(' ')}\n`);
          }
        } catch {
          process.stdout.write(`  daemon: ${line}\n`);
        }
      }
    };
    daemon.stdout.on('data', relay);
    daemon.stderr.on('data', relay);
    const t0 = Date.now();
    let pattern = 0x62;
    while (Date.now() - t0 < DAEMON_SECONDS * 1000) {
      await new Promise((r) => setTimeout(r, 4000));
      await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 120 + (pattern % 16) * 4, lengthMiB: 4, pattern: pattern++ });
    }
    say('status (while the daemon runs)');
    ok = (await show(['status'])).code === 0 && ok;
    daemon.kill('SIGTERM');
    const code = await new Promise<number | null>((r) => daemon.on('exit', (c) => r(c)));
    process.stdout.write(`daemon stopped on SIGTERM (exit ${code})\n`);
    await guestFlush(env.lv, vm.domainName, 'vda');
    const ref2 = path.join(env.root, 'ref2.raw');
    await readGuestView(vm.disks[0]!.base1Path, ref2);
    say('one more cycle by hand, then the guest moves on');
    ok = (await show(['snapshot', '--vm', '7'])).code === 0 && ok;
    await guestWrite(env.lv, vm.domainName, { target: 'vda', offsetMiB: 250, lengthMiB: 2, pattern: 0x99 });

    say('what the replica holds (what `onevm recover --recreate` uses)');
    process.stdout.write((await exec('ls', ['-lAR', path.join(env.snapsDir, '7')])).stdout);
    process.stdout.write((await exec('qemu-img', ['info', path.join(env.snapsDir, '7', 'disk.0.snap', 'base.1')])).stdout);

    say('recover drill: tar disk.0 + disk.0.snap/ to a fresh dir, check, compare with the guest at snapshot time');
    const drill = await recoverDrill(env.snapsDir, 7, 0, env.root);
    const same = (await sha256File(drill.rawPath)) === (await sha256File(ref2));
    process.stdout.write(`qemu-img check: ${drill.check.ok ? 'clean' : 'PROBLEMS'}; backing name: ${drill.backingName}; guest view equals the point in time: ${same ? 'yes' : 'NO'}\n`);
    ok = ok && same && drill.check.ok;

    say(ok ? 'demo finished: VM 7 is protected' : 'demo finished with problems (see above)');
    await vm.destroy();
  } finally {
    if (f.keep) process.stdout.write(`\n--keep: left running; remove ${env.root} and stop libvirtd/sshd yourself\n`);
    else await env.stop();
  }
  return ok ? Exit.OK : Exit.FAILED;
}
