/** The pure parts of the OpenSSH transport: its command line, the reading of ssh's complaints, the pinned keys. */
import { describe, expect, it } from 'vitest';
import { classifySshFailure, openSshArgs, PINNED_ALIAS, sshComplaint, type OpenSshOptions } from '../../lib/transfer/openssh.js';
import { formatKnownHostsLine, parseKnownHosts, pinnedKnownHosts } from '../../lib/transfer/known-hosts.js';

const base: OpenSshOptions = {
  host: 'replica.example',
  port: 2222,
  username: 'oneadmin',
  identityFile: '/var/lib/one/.ssh/id with space',
  pinnedKnownHosts: '',
  hostKeyAlgorithms: ['ecdsa-sha2-nistp256'],
  ciphers: ['aes128-gcm@openssh.com', 'aes128-ctr'],
  receiverCommand: 'onestor-agent receive',
  connectTimeoutMs: 20_000,
  keepaliveMs: 15_000,
};

function options(args: string[]): Map<string, string> {
  const m = new Map<string, string>();
  args.forEach((a, i) => {
    if (args[i - 1] === '-o') {
      const [k, ...v] = a.split('=');
      m.set(k!, v.join('='));
    }
  });
  return m;
}

describe('openSshArgs', () => {
  const args = openSshArgs(base, '/tmp/onestor-ssh-x/known_hosts');
  const o = options(args);

  it('reads no config, agent or prompt, and trusts only the pinned file under the alias, strictly', () => {
    expect(args.slice(0, 2)).toEqual(['-F', '/dev/null']);
    expect(o.get('BatchMode')).toBe('yes');
    expect(o.get('IdentitiesOnly')).toBe('yes');
    expect(o.get('IdentityAgent')).toBe('none');
    expect(o.get('PasswordAuthentication')).toBe('no');
    expect(o.get('KbdInteractiveAuthentication')).toBe('no');
    expect(o.get('StrictHostKeyChecking')).toBe('yes');
    expect(o.get('UserKnownHostsFile')).toBe('"/tmp/onestor-ssh-x/known_hosts"');
    expect(o.get('GlobalKnownHostsFile')).toBe('/dev/null');
    expect(o.get('HostKeyAlias')).toBe(PINNED_ALIAS);
    expect(o.get('UpdateHostKeys')).toBe('no');
    expect(o.get('ControlMaster')).toBe('no');
    expect(o.get('ControlPath')).toBe('none');
    expect(o.get('ClearAllForwardings')).toBe('yes');
    expect(o.get('PermitLocalCommand')).toBe('no');
    expect(args).toEqual(expect.arrayContaining(['-T', '-x', '-a']));
  });

  it('passes the key path as its own argument (a path with a space survives), the host last before the command', () => {
    expect(args[args.indexOf('-i') + 1]).toBe('/var/lib/one/.ssh/id with space');
    expect(args.slice(-5)).toEqual(['-l', 'oneadmin', '--', 'replica.example', 'onestor-agent receive']);
    expect(args[args.indexOf('-p') + 1]).toBe('2222');
  });

  it('ciphers, host-key algorithms, timeouts and keep-alives from the options', () => {
    expect(o.get('Ciphers')).toBe('aes128-gcm@openssh.com,aes128-ctr');
    expect(o.get('HostKeyAlgorithms')).toBe('ecdsa-sha2-nistp256');
    expect(o.get('ConnectTimeout')).toBe('20');
    expect(o.get('ServerAliveInterval')).toBe('15');
    expect(o.get('ServerAliveCountMax')).toBe('4');
    const none = options(openSshArgs({ ...base, keepaliveMs: 0, hostKeyAlgorithms: [], connectTimeoutMs: 10 }, '/k'));
    expect(none.has('ServerAliveInterval')).toBe(false);
    expect(none.has('HostKeyAlgorithms')).toBe(false);
    expect(none.get('ConnectTimeout')).toBe('1');
  });
});

describe('classifySshFailure / sshComplaint', () => {
  it.each([
    ['Host key verification failed.', 'hostkey'],
    ['@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n', 'hostkey'],
    ['No ED25519 host key is known for onestor-replica and you have requested strict checking.', 'hostkey'],
    ['Unable to negotiate with 127.0.0.1 port 2222: no matching host key type found. Their offer: ssh-ed25519', 'hostkey'],
    ['oneadmin@127.0.0.1: Permission denied (publickey).', 'auth'],
    ['Received disconnect from 127.0.0.1 port 22:2: Too many authentication failures', 'auth'],
    ['ssh: connect to host 10.0.0.9 port 22: Connection refused', 'network'],
    ['ssh: connect to host 10.0.0.9 port 22: Connection timed out', 'network'],
    ['ssh: Could not resolve hostname nowhere: Name or service not known', 'network'],
    ['kex_exchange_identification: read: Connection reset by peer', 'network'],
    ['', 'unknown'],
    ['{"level":30,"msg":"receiver started"}', 'unknown'],
  ])('%j is %s', (stderr, want) => {
    expect(classifySshFailure(stderr)).toBe(want);
  });

  it("names ssh's own last line, not the receiver's JSON log lines that share stderr", () => {
    expect(sshComplaint('{"msg":"a"}\nssh: connect to host h port 22: Connection refused\n{"msg":"b"}\n')).toBe('ssh: connect to host h port 22: Connection refused');
    expect(sshComplaint('{"msg":"only json"}\n')).toBe('');
  });
});

describe('pinnedKnownHosts', () => {
  const ed = Buffer.concat([Buffer.from([0, 0, 0, 11]), Buffer.from('ssh-ed25519'), Buffer.from([0, 0, 0, 32]), Buffer.alloc(32, 7)]);
  const ed2 = Buffer.concat([Buffer.from([0, 0, 0, 11]), Buffer.from('ssh-ed25519'), Buffer.from([0, 0, 0, 32]), Buffer.alloc(32, 9)]);
  const b64 = (k: Buffer) => k.toString('base64');

  it("holds the host's keys (plain, [host]:port, hashed, wildcard) under the alias; revoked keys and other hosts left out", () => {
    const text = [
      `[replica]:2222 ssh-ed25519 ${b64(ed)}`,
      formatKnownHostsLine('replica', 2222, ed2, { hashed: true }),
      `other ssh-ed25519 ${b64(ed)}`,
      `[replica]:22 ssh-ed25519 ${b64(ed)}`,
      `@revoked * ssh-ed25519 ${b64(ed2)}`,
    ].join('\n');
    expect(pinnedKnownHosts(parseKnownHosts(text), 'replica', 2222, 'alias')).toBe(`alias ssh-ed25519 ${b64(ed)}\n`);
    const noRevoke = text.split('\n').slice(0, 4).join('\n');
    expect(pinnedKnownHosts(parseKnownHosts(noRevoke), 'replica', 2222, 'alias')).toBe(`alias ssh-ed25519 ${b64(ed)}\nalias ssh-ed25519 ${b64(ed2)}\n`);
    expect(pinnedKnownHosts(parseKnownHosts(`*.example ssh-ed25519 ${b64(ed)}`), 'r.example', 22, 'a')).toBe(`a ssh-ed25519 ${b64(ed)}\n`);
  });

  it('null for a host known_hosts does not name, and for hostile or empty input', () => {
    expect(pinnedKnownHosts(parseKnownHosts(`other ssh-ed25519 ${b64(ed)}`), 'replica', 22, 'a')).toBeNull();
    expect(pinnedKnownHosts(parseKnownHosts(''), 'replica', 22, 'a')).toBeNull();
    expect(pinnedKnownHosts(parseKnownHosts('replica ssh-ed25519 !!notbase64\nreplica ssh-rsa AAAA\n\0\0'), 'replica', 22, 'a')).toBeNull();
  });
});
