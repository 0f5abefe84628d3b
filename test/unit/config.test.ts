import { mkdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { OnestorError } from '../../lib/shared/errors.js';
import { ConfigSchema, describeConfigErrors, loadConfig, parseConfig } from '../../lib/config/config.js';
import { thrownOnestorError } from '../helpers/errors.js';

const configError = thrownOnestorError;

const problems = (e: OnestorError): string[] => e.context['problems'] as string[];

describe('parseConfig (pure)', () => {
  it('empty object gives every documented default', () => {
    const c = parseConfig({}, 'cfg.json');
    expect(c).toEqual({
      datastoreLocation: '/var/lib/one/datastores',
      hostName: null,
      sshrcPaths: ['/var/lib/one/remotes/etc/tm/ssh/sshrc', '/var/tmp/one/etc/tm/ssh/sshrc'],
      stateDir: '/var/lib/one/onestor-agent',
      libvirtUri: 'qemu:///system',
      virsh: 'virsh',
      qemuImg: 'qemu-img',
      stagingDirName: '.onestor',
      replica: {
        user: null,
        port: 22,
        identityFile: '/var/lib/one/.ssh/onestor_replica_ed25519',
        knownHostsFile: '/var/lib/one/.ssh/known_hosts',
        acceptNewHostKey: false,
        storageIp: null,
        hostOverride: null,
        receiverCommand: 'onestor-agent receive',
        connectTimeoutSec: 20,
        keepaliveSec: 15,
        transport: 'openssh',
        // unified with the client's list (lib/shared/defaults.ts): AEAD first, then CTR
        ciphers: ['aes128-gcm@openssh.com', 'aes256-gcm@openssh.com', 'chacha20-poly1305@openssh.com', 'aes128-ctr', 'aes256-ctr'],
      },
      limits: { concurrency: 2, bandwidthMBps: 0, stagingMinFreePercent: 5, captureTimeoutSec: 3600, transferTimeoutSec: 21600 },
      schedule: { rescanSec: 60, graceMinSec: 60, gracePercent: 10, backoffBaseSec: 30, backoffMaxSec: 1800, spreadSec: 0 },
      receiver: {
        snapsDir: null,
        maxSessions: 4,
        lockTimeoutSec: null,
        busyWaitSec: 300,
        maxUsedPercent: null,
        spaceCheck: true,
        directIo: true,
        maxSessionsPerHost: null,
        helloTimeoutSec: 30,
        idleTimeoutSec: 900,
        drainTimeoutSec: 120,
        progressWindowSec: 60,
        minProgressKiB: 1024,
        maxSessionSec: 86400,
      },
      log: { level: 'info' },
      prometheusTextfile: null,
    });
  });

  it('is deep-frozen', () => {
    const c = parseConfig({}, 'cfg.json');
    expect(Object.isFrozen(c)).toBe(true);
    expect(Object.isFrozen(c.replica)).toBe(true);
    expect(Object.isFrozen(c.replica.ciphers)).toBe(true);
    expect(() => {
      (c.replica as { port: number }).port = 1;
    }).toThrow(TypeError);
    // defaults are not shared mutable state between two loads
    expect(parseConfig({}, 'x').sshrcPaths).not.toBe(c.sshrcPaths);
  });

  it('partial sections keep the other defaults', () => {
    const c = parseConfig({ replica: { port: 2222, storageIp: '10.1.2.3' }, limits: { concurrency: 4 } }, 'cfg.json');
    expect(c.replica).toMatchObject({ port: 2222, storageIp: '10.1.2.3', user: null, keepaliveSec: 15 });
    expect(c.limits).toMatchObject({ concurrency: 4, transferTimeoutSec: 21600 });
  });

  it.each([
    [{ replica: { port: 70000 } }, 'cfg.json: replica.port: expected integer 1..65535'],
    [{ replica: { port: '22' } }, 'cfg.json: replica.port: expected integer 1..65535'],
    [{ replica: { port: 22.5 } }, 'cfg.json: replica.port: expected integer 1..65535'],
    [{ limits: { concurrency: 0 } }, 'cfg.json: limits.concurrency: expected integer 1..64'],
    [{ datastoreLocation: 'var/lib/one' }, 'cfg.json: datastoreLocation: expected an absolute path'],
    [{ sshrcPaths: ['/ok', 'relative'] }, 'cfg.json: sshrcPaths[1]: expected an absolute path'],
    [{ sshrcPaths: [] }, 'cfg.json: sshrcPaths: expected at least one path'],
    [{ replica: { storageIp: '-oProxyCommand=x' } }, 'cfg.json: replica.storageIp: expected a host name or IP address'],
    [{ replica: { hostOverride: 'a b' } }, 'cfg.json: replica.hostOverride: expected a host name or IP address'],
    [{ replica: { user: 'Root;' } }, 'cfg.json: replica.user: expected a user name'],
    [{ replica: { ciphers: [] } }, 'cfg.json: replica.ciphers: expected at least one cipher'],
    [{ replica: { acceptNewHostKey: 'yes' } }, 'cfg.json: replica.acceptNewHostKey: expected true or false'],
    [{ stagingDirName: '123' }, 'cfg.json: stagingDirName: expected a plain non-numeric directory name'],
    [{ stagingDirName: '../x' }, 'cfg.json: stagingDirName: expected a plain non-numeric directory name'],
    [{ virsh: 'bin/virsh' }, 'cfg.json: virsh: expected a program name or absolute path'],
    [{ virsh: '--help' }, 'cfg.json: virsh: expected a program name or absolute path'],
    [{ libvirtUri: 'system' }, 'cfg.json: libvirtUri: expected a libvirt URI'],
    [{ log: { level: 'verbose' } }, 'cfg.json: log.level: expected one of fatal, error, warn, info, debug, trace, silent'],
    [{ schedule: { backoffBaseSec: 600, backoffMaxSec: 60 } }, 'cfg.json: schedule.backoffMaxSec: must be >= schedule.backoffBaseSec (600)'],
    [{ receiver: { snapsDir: 'snaps' } }, 'cfg.json: receiver.snapsDir: expected an absolute path'],
    [{ receiver: { lockTimeoutSec: -1 } }, 'cfg.json: receiver.lockTimeoutSec: expected integer 0..604800'],
    [{ limits: { bandwidthMBps: -1 } }, 'cfg.json: limits.bandwidthMBps: expected number 0..100000'],
    [{ prometheusTextfile: 'metrics.prom' }, 'cfg.json: prometheusTextfile: expected an absolute path'],
    [{ replica: 'x' }, 'cfg.json: replica: expected object'],
  ])('%j -> %s', (input, line) => {
    const err = configError(() => parseConfig(input, 'cfg.json'));
    expect(err.code).toBe('E_CONFIG');
    expect(err.context.file).toBe('cfg.json');
    expect(problems(err).some((p) => p.startsWith(line))).toBe(true);
  });

  it('unknown keys are errors naming the key, at any depth', () => {
    const err = configError(() => parseConfig({ concurency: 3, replica: { prot: 22 }, limits: { a: 1, b: 2 } }, 'c.json'));
    expect(problems(err).sort()).toEqual([
      'c.json: concurency: unknown key (typo?)',
      'c.json: limits.a: unknown key (typo?)',
      'c.json: limits.b: unknown key (typo?)',
      'c.json: replica.prot: unknown key (typo?)',
    ]);
    expect(err.message).toContain('replica.prot');
  });

  it('reports every problem at once, not only the first', () => {
    const err = configError(() => parseConfig({ replica: { port: 0 }, limits: { concurrency: 100 }, stateDir: 'x' }, 'c.json'));
    expect(problems(err)).toHaveLength(3);
    expect(err.context.field).toBeDefined();
  });

  it.each([null, 5, 'x', []])('top level %j is refused', (v) => {
    expect(configError(() => parseConfig(v, 'c.json')).code).toBe('E_CONFIG');
  });

  it('accepts an all-fields config', () => {
    const c = parseConfig(
      {
        datastoreLocation: '/srv/ds',
        sshrcPaths: ['/etc/one/sshrc'],
        stateDir: '/srv/state',
        libvirtUri: 'qemu:///system?socket=/run/x/libvirt-sock',
        virsh: '/usr/bin/virsh',
        qemuImg: 'qemu-img',
        stagingDirName: '.staging',
        replica: { user: 'oneadmin', port: 2222, hostOverride: '127.0.0.1', acceptNewHostKey: true, ciphers: ['aes128-ctr'] },
        limits: { bandwidthMBps: 12.5 },
        schedule: { spreadSec: 30 },
        receiver: { snapsDir: '/srv/snaps', lockTimeoutSec: 0 },
        log: { level: 'debug' },
        prometheusTextfile: '/var/lib/node_exporter/onestor.prom',
      },
      'c.json',
    );
    expect(c.replica.hostOverride).toBe('127.0.0.1');
    expect(c.receiver.lockTimeoutSec).toBe(0);
    expect(c.limits.bandwidthMBps).toBe(12.5);
  });

  it('probe.timeoutMs is gone (the probes never read the config): setting it is an unknown key', () => {
    expect(() => parseConfig({ probe: { timeoutMs: 500 } }, 'c.json')).toThrow(/c\.json: probe: unknown key/);
  });

  it('describeConfigErrors formats raw zod issues', () => {
    const r = ConfigSchema.safeParse({ replica: { port: 'x', extra: 1 } });
    expect(r.success).toBe(false);
    const lines = describeConfigErrors(r.success ? [] : r.error.issues, 'f.json');
    expect(lines).toContain('f.json: replica.port: expected integer 1..65535');
    expect(lines).toContain('f.json: replica.extra: unknown key (typo?)');
    expect(describeConfigErrors([], 'f')).toEqual([]);
    // issues of another schema get a readable fallback message
    const other = z.object({ a: z.string() }).safeParse({ a: 1 });
    expect(describeConfigErrors(other.success ? [] : other.error.issues, 'g')).toEqual(['g: a: expected string, received number']);
  });
});

describe('loadConfig (real files)', () => {
  let dir: string;
  beforeAll(async () => {
    dir = join(tmpdir(), `onestor-config-${process.pid}-${randomBytes(4).toString('hex')}`);
    await mkdir(dir, { recursive: true });
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('reads a JSON file; overrides win over environment, environment over file', async () => {
    const f = join(dir, 'a.json');
    await writeFile(f, JSON.stringify({ log: { level: 'warn' }, replica: { port: 2200, user: 'onestor' } }));
    const c1 = await loadConfig({ file: f, env: {} });
    expect(c1.log.level).toBe('warn');
    expect(c1.replica).toMatchObject({ port: 2200, user: 'onestor' });
    const c2 = await loadConfig({ file: f, env: { ONESTOR_AGENT_LOG_LEVEL: 'debug' } });
    expect(c2.log.level).toBe('debug');
    const c3 = await loadConfig({ file: f, env: { ONESTOR_AGENT_LOG_LEVEL: 'debug' }, overrides: { log: { level: 'error' }, replica: { port: 22 } } });
    expect(c3.log.level).toBe('error');
    expect(c3.replica).toMatchObject({ port: 22, user: 'onestor' });
    expect(Object.isFrozen(c3.replica)).toBe(true);
  });

  it('errors name the source: file, environment or command line', async () => {
    const f = join(dir, 'b.json');
    await writeFile(f, JSON.stringify({ replica: { port: 0 } }));
    const fromFile = await loadConfig({ file: f, env: {} }).catch((e: unknown) => e as OnestorError);
    expect(problems(fromFile as OnestorError)).toEqual([`${f}: replica.port: expected integer 1..65535`]);

    const fromEnv = await loadConfig({ file: join(dir, 'none-default'), env: { ONESTOR_AGENT_LOG_LEVEL: 'loud' } }).catch(
      (e: unknown) => e as OnestorError,
    );
    // an explicit missing file is an error before anything else
    expect((fromEnv as OnestorError).message).toContain('cannot read config file');

    const ok = join(dir, 'ok.json');
    await writeFile(ok, '{}');
    const envErr = await loadConfig({ file: ok, env: { ONESTOR_AGENT_LOG_LEVEL: 'loud' } }).catch((e: unknown) => e as OnestorError);
    expect(problems(envErr as OnestorError)[0]).toMatch(/^environment ONESTOR_AGENT_LOG_LEVEL: log\.level: expected one of/);

    const cliErr = await loadConfig({ file: ok, env: {}, overrides: { limits: { concurrency: 0 } } }).catch((e: unknown) => e as OnestorError);
    expect(problems(cliErr as OnestorError)).toEqual(['command line: limits.concurrency: expected integer 1..64']);
  });

  it('explicit missing file (argument or ONESTOR_AGENT_CONFIG) is an error naming it', async () => {
    const missing = join(dir, 'missing.json');
    await expect(loadConfig({ file: missing, env: {} })).rejects.toMatchObject({ code: 'E_CONFIG', context: { file: missing } });
    await expect(loadConfig({ env: { ONESTOR_AGENT_CONFIG: missing } })).rejects.toMatchObject({ code: 'E_CONFIG', context: { file: missing } });
  });

  it('ONESTOR_AGENT_CONFIG picks the file when no argument is given', async () => {
    const f = join(dir, 'env.json');
    await writeFile(f, JSON.stringify({ limits: { transferTimeoutSec: 900 } }));
    expect((await loadConfig({ env: { ONESTOR_AGENT_CONFIG: f } })).limits.transferTimeoutSec).toBe(900);
  });

  it('invalid JSON and non-object JSON name the file', async () => {
    const bad = join(dir, 'bad.json');
    await writeFile(bad, '{ "replica": { "port": 22, } }');
    await expect(loadConfig({ file: bad, env: {} })).rejects.toMatchObject({ code: 'E_CONFIG', context: { file: bad } });
    await expect(loadConfig({ file: bad, env: {} })).rejects.toThrow(/not valid JSON/);
    const arr = join(dir, 'arr.json');
    await writeFile(arr, '[1,2]');
    await expect(loadConfig({ file: arr, env: {} })).rejects.toThrow(/JSON object at the top level/);
  });

  it('a directory given as config file is an error, not defaults', async () => {
    await expect(loadConfig({ file: dir, env: {} })).rejects.toMatchObject({ code: 'E_CONFIG', context: { file: dir } });
  });

  it('prototype-polluting keys are rejected as unknown and pollute nothing', async () => {
    const f = join(dir, 'proto.json');
    await writeFile(f, '{ "__proto__": { "polluted": true }, "replica": { "constructor": 1 } }');
    const err = (await loadConfig({ file: f, env: {} }).catch((e: unknown) => e)) as OnestorError;
    expect(err.code).toBe('E_CONFIG');
    expect(problems(err).join('\n')).toMatch(/__proto__: unknown key/);
    expect(({} as Record<string, unknown>)['polluted']).toBeUndefined();
    // the same through overrides (merged after the file)
    const ok = join(dir, 'ok2.json');
    await writeFile(ok, '{}');
    const overrides = JSON.parse('{ "__proto__": { "limits": 1 } }') as object;
    const err2 = (await loadConfig({ file: ok, env: {}, overrides }).catch((e: unknown) => e)) as OnestorError;
    expect(problems(err2).join('\n')).toMatch(/__proto__: unknown key/);
  });
});
