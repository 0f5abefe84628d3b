/**
 * The read-only fast path through long-lived interactive virsh processes, against a private libvirtd and
 * real guests: every query answers what a one-shot virsh answers, failures keep their one-shot
 * classification, and a restarted, stopped or gone libvirtd, a timeout, an abort and an idle pool all end
 * with the right answer or error and no shell left behind.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { OnestorError } from '../../lib/shared/errors.js';
import { run } from '../../lib/shared/exec.js';
import { Virsh, virshErrorKind } from '../../lib/libvirt/virsh.js';
import { VirshShellPool } from '../../lib/libvirt/virsh-shell.js';
import { startLibvirtd, type Libvirtd } from '../../dev/libvirtd.js';
import { createOneVm, createSystemDatastore, type OneVm } from '../../dev/one-layout.js';
import { makeTempDir, removeTree } from '../../dev/tmp.js';
import { projectRoot, runNode } from '../../dev/agent-env.js';

let lv: Libvirtd;
let dsRoot: string;
let vm: OneVm;
let odd: OneVm; // a name the shell line must quote
let quoted: OneVm; // a name the shell line cannot carry
const opened: Virsh[] = [];

const virshWith = (o: ConstructorParameters<typeof Virsh>[0] = {}): Virsh => {
  const v = new Virsh({ uri: lv.uri, ...o });
  opened.push(v);
  return v;
};

/** The virsh shells of this test process that are still alive (children whose argv names our libvirtd). */
async function shellProcesses(): Promise<number[]> {
  const r = await run('pgrep', ['-P', String(process.pid), '-x', 'virsh']);
  const pids = r.stdout.split('\n').filter(Boolean).map(Number);
  const mine = await Promise.all(pids.map(async (pid) => (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')) === `virsh\0-c\0${lv.uri}\0`));
  return pids.filter((_, i) => mine[i]);
}

beforeAll(async () => {
  lv = await startLibvirtd({ name: 'virsh-shell' });
  dsRoot = await makeTempDir('virsh-shell-ds');
  await createSystemDatastore(dsRoot, 0, { replicaHost: 'replica.test' });
  const mk = (vmId: number, deployId?: string) =>
    createOneVm(lv, { dsRoot, dsId: 0, vmId, replicaHost: 'replica.test', disks: [{ diskId: 0, sizeMiB: 16, freq: 60 }], ...(deployId ? { deployId } : {}) });
  vm = await mk(21);
  odd = await mk(22, 'vm 22;quit #x');
  quoted = await mk(23, "vm 23 'q'");
});

afterAll(async () => {
  for (const v of opened) v.close();
  for (const v of [vm, odd, quoted]) await v?.destroy().catch(() => undefined);
  await lv?.stop();
  if (dsRoot) await removeTree(dsRoot);
});

describe('virsh shell fast path', () => {
  it('answers every query as a one-shot virsh does, from one shell', async () => {
    const fast = virshWith();
    const slow = virshWith({ shell: false });
    const dom = vm.domainName;
    expect((await run('virsh', ['-c', lv.uri, 'checkpoint-create-as', dom, 'cp-a'])).code).toBe(0);
    const queries: Array<[string, (v: Virsh) => Promise<unknown>]> = [
      ['version', (v) => v.version()],
      ['capabilities', (v) => v.capabilities()],
      ['list', (v) => v.listDomains()],
      ['domstate', (v) => v.domainState(dom)],
      ['dominfo', (v) => v.domainInfo(dom)],
      ['dumpxml', (v) => v.dumpXml(dom)],
      ['dumpxml --inactive', (v) => v.dumpXml(dom, { inactive: true })],
      ['domblklist', (v) => v.blockList(dom)],
      ['checkpoint-list', (v) => v.checkpointList(dom)],
      ['checkpoint names', (v) => v.checkpointNames(dom)],
      ['checkpoint-dumpxml', (v) => v.checkpointXml(dom, 'cp-a', { size: true })],
      ['domjobinfo', (v) => v.domJobInfo(dom)],
      ['backup-dumpxml (no job)', (v) => v.backupDumpXml(dom)],
    ];
    for (const [name, q] of queries) expect(await q(fast), name).toEqual(await q(slow));
    const stats = fast.shellStats!;
    // backup-dumpxml without a job is an error: the shell saw it, and the one-shot run answered
    expect(stats).toEqual({ answered: queries.length, declined: 0, shellsStarted: 1, protocolErrors: 0 });
    expect(slow.shellStats).toBeNull();
    expect(await shellProcesses()).toHaveLength(1);
    fast.close();
    await sleep(200);
    expect(await shellProcesses()).toHaveLength(0);
  });

  it('quotes what it can carry, declines what it cannot, and keeps one-shot error classification', async () => {
    const v = virshWith();
    // `;` and `#` inside quotes are part of the name for virsh's tokenizer
    expect(await v.domainState(odd.domainName)).toEqual({ state: 'running', reason: 'booted' });
    expect((await v.dumpXml(odd.domainName)).parsed.name).toBe('vm 22;quit #x');
    expect(v.shellStats).toMatchObject({ answered: 2, declined: 0 });
    // a quote: the shell line cannot carry it, a one-shot run answers
    expect(await v.domainState(quoted.domainName)).toEqual({ state: 'running', reason: 'booted' });
    expect(v.shellStats).toMatchObject({ answered: 2, declined: 1 });
    // a missing domain: the shell's answer is not clean, the one-shot run gives exit code and kind
    const err = await v.domainState('no-such-vm', { vm: 99 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OnestorError);
    expect({ code: (err as OnestorError).code, kind: virshErrorKind(err), exit: (err as OnestorError).context.exitCode }).toEqual({ code: 'E_DOMAIN', kind: 'no-domain', exit: 1 });
    // and the shell stays: the next query is answered by it
    expect(await v.domainState(vm.domainName)).toEqual({ state: 'running', reason: 'booted' });
    expect(v.shellStats).toMatchObject({ answered: 4, shellsStarted: 1, protocolErrors: 0 });
  });

  it('runs state changes once through a shell, with the outcomes of one-shot runs', async () => {
    const fast = virshWith();
    const slow = virshWith({ shell: false });
    const dom = vm.domainName;
    const target = join(dsRoot, `push-${process.pid}.qcow2`);
    const backupXml = `<domainbackup mode='push'><disks><disk name='vda' backup='yes' type='file'><target file='${target}'/><driver type='qcow2'/></disk></disks></domainbackup>`;
    const checkpointXml = `<domaincheckpoint><name>cp-b</name><disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>`;
    await fast.backupBegin(dom, backupXml, checkpointXml);
    // a second job while one runs fails the same way either way (unless the first already ended)
    const second = async (v: Virsh) => {
      const e = await v.backupBegin(dom, backupXml.replace(target, `${target}.2`)).catch((x: unknown) => x);
      return e instanceof OnestorError ? { code: e.code, kind: virshErrorKind(e), exit: e.context.exitCode } : 'began';
    };
    const secondFast = await second(fast);
    const secondSlow = await second(slow);
    if (secondFast !== 'began' && secondSlow !== 'began') expect(secondFast).toEqual(secondSlow);
    for (let i = 0; i < 600 && (await fast.domJobInfo(dom)).type !== 'None'; i++) await sleep(50);
    expect((await fast.domJobInfo(dom)).type).toBe('None');
    expect(await slow.checkpointNames(dom)).toContain('cp-b');
    await fast.checkpointDelete(dom, 'cp-b');
    expect(await slow.checkpointNames(dom)).not.toContain('cp-b');
    // failures are classified from the shell's error lines as from a one-shot run's stderr and exit code
    const outcome = async (p: Promise<unknown>) => {
      const e = await p.then(() => 'ok', (x: unknown) => x);
      return e instanceof OnestorError ? { code: e.code, kind: virshErrorKind(e), exit: e.context.exitCode, message: e.message.replace(/ \(virsh .*/, '') } : e;
    };
    const missing = await outcome(fast.checkpointDelete(dom, 'cp-b', { vm: 21 }));
    expect(missing).toEqual(await outcome(slow.checkpointDelete(dom, 'cp-b', { vm: 21 })));
    expect(missing).toMatchObject({ code: 'E_CHECKPOINT', kind: 'no-checkpoint', exit: 1 });
    expect(await fast.domJobAbort(dom)).toBe(false);
    expect(await slow.domJobAbort(dom)).toBe(false);
    const bad = await outcome(fast.backupBegin(dom, '<domainbackup mode='));
    expect(bad).toEqual(await outcome(slow.backupBegin(dom, '<domainbackup mode=')));
    expect(bad).toMatchObject({ code: 'E_VIRSH', exit: 1 });
    // every one of them was answered by the shell, none run twice
    expect(fast.shellStats).toMatchObject({ declined: 0, protocolErrors: 0 });
  });

  it('runs parallel queries side by side on at most four shells', async () => {
    const v = virshWith();
    const others = await shellProcesses();
    const names = [vm, odd].map((x) => x.domainName);
    const answers = await Promise.all(Array.from({ length: 12 }, (_, i) => v.dumpXml(names[i % 2]!)));
    expect(answers.map((a) => a.parsed.name)).toEqual(Array.from({ length: 12 }, (_, i) => names[i % 2]));
    const s = v.shellStats!;
    expect(s.answered + s.declined).toBe(12);
    expect(s.shellsStarted).toBeLessThanOrEqual(4);
    expect(s.shellsStarted).toBeGreaterThanOrEqual(2);
    const mine = (await shellProcesses()).filter((p) => !others.includes(p));
    expect(mine.length).toBe(s.shellsStarted);
  });

  it('survives a libvirtd crash between queries', async () => {
    const v = virshWith();
    expect(await v.domainState(vm.domainName)).toEqual({ state: 'running', reason: 'booted' });
    await lv.restartDaemon('SIGKILL');
    // the shell notices the lost connection (a notice on stderr): the answer still comes, one way or the other
    expect(await v.domainState(vm.domainName)).toEqual({ state: 'running', reason: 'booted' });
    expect(await v.domainState(vm.domainName)).toEqual({ state: 'running', reason: 'booted' });
    expect(v.shellStats!.protocolErrors).toBe(0);
    // and after the reconnect the shell answers cleanly again
    const before = v.shellStats!.answered;
    expect((await v.checkpointNames(vm.domainName)).length).toBeGreaterThanOrEqual(0);
    expect(v.shellStats!.answered).toBe(before + 1);
  });

  it('a stopped libvirtd times the query out and the shell is killed, not left waiting', async () => {
    const v = virshWith({ timeoutMs: 1500 });
    expect(await v.domainState(vm.domainName)).toEqual({ state: 'running', reason: 'booted' });
    const daemon = lv.processes().find((p) => p.comm === 'libvirtd');
    expect(daemon).toBeDefined();
    process.kill(daemon!.pid, 'SIGSTOP');
    try {
      const err = await v.domainState(vm.domainName).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(OnestorError);
      expect((err as OnestorError).message).toMatch(/domstate .* timed out after 1500 ms/);
      expect((err as OnestorError).context.exitCode).toBe(124);
    } finally {
      process.kill(daemon!.pid, 'SIGCONT');
    }
    expect(v.shellStats!.answered).toBe(2);
    expect(await v.domainState(vm.domainName)).toEqual({ state: 'running', reason: 'booted' });
    expect(v.shellStats!.shellsStarted).toBe(2);
  });

  it('an abort closes the shells and the query fails as aborted', async () => {
    const ac = new AbortController();
    const v = virshWith({ signal: ac.signal });
    const others = await shellProcesses();
    await v.domainState(vm.domainName);
    const mine = (await shellProcesses()).filter((p) => !others.includes(p));
    ac.abort();
    const err = await v.domainState(vm.domainName).catch((e: unknown) => e);
    expect((err as OnestorError).code).toBe('E_ABORTED');
    await sleep(200);
    expect(mine).toHaveLength(1);
    const left = await shellProcesses();
    expect(left.filter((p) => mine.includes(p))).toEqual([]);
  });

  it('an idle shell exits on its own, and a CLI run that used one exits at once', async () => {
    const pool = new VirshShellPool({ virshPath: 'virsh', uri: lv.uri, idleMs: 300 });
    const a = await pool.query(['domstate', vm.domainName], 10_000);
    expect(a).toEqual({ kind: 'output', stdout: 'running\n\n', stderr: '' });
    expect(pool.size).toBe(1);
    for (let i = 0; i < 50 && pool.size > 0; i++) await sleep(100);
    expect(pool.size).toBe(0);
    // a short-lived process (a CLI run) whose query went through a shell ends when its work ends: the
    // idle shell does not keep it alive (the run is killed after 20 s if it hangs)
    const built = join(projectRoot(), 'dist', 'lib', 'libvirt', 'virsh.js');
    if (!existsSync(built)) throw new Error(`build first: ${built} is missing`);
    const script = `import { Virsh } from ${JSON.stringify(built)};
      const v = new Virsh({ uri: ${JSON.stringify(lv.uri)} });
      const s = await v.domainState(${JSON.stringify(vm.domainName)});
      console.log(s.state, JSON.stringify(v.shellStats));`;
    const r = await runNode(['--input-type=module', '-e', script], { timeoutMs: 20_000 });
    expect({ code: r.code, out: r.stdout.trim() }, r.stderr).toEqual({ code: 0, out: 'running {"answered":1,"declined":0,"shellsStarted":1,"protocolErrors":0}' });
  });
});
