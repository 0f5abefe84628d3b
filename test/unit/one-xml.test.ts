import { readFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { OnestorError } from '../../lib/shared/errors.js';
import { isSafeHost, isValidDomainName, MAX_ONE_XML_BYTES, parseDsXml, parseVmXml } from '../../lib/discover/one-xml.js';
import { thrownOnestorError } from '../helpers/errors.js';

const fixtures = join(dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'one');
const fixture = (name: string): string => readFileSync(join(fixtures, name), 'utf8');

const thrown = thrownOnestorError;

describe('parseVmXml on realistic OpenNebula 6.8 documents', () => {
  it('two disks (one protected), context disk, NIC, history, empty DEPLOY_ID', () => {
    const vm = parseVmXml(fixture('vm-two-disks.xml'), '/ds/100/42/vm.xml');
    expect(vm.id).toBe(42);
    expect(vm.name).toBe('web-01');
    expect(vm.deployId).toBeUndefined();
    expect(vm.deployIdError).toBeUndefined();
    expect(vm.state).toBe(3);
    expect(vm.lcmState).toBe(2);
    expect(vm.tmMadSystem).toBe('ssh');
    expect(vm.contextDiskId).toBe(2);
    expect(vm.historyDsId).toBe(100);
    expect(vm.diskProblems).toEqual([]);
    expect(vm.disks).toEqual([
      {
        diskId: 0,
        freq: 300,
        freqRaw: '300',
        target: 'vda',
        driver: 'qcow2',
        source: '/var/lib/one//datastores/101/3f1e2b8c0d9a7e6f5a4b3c2d1e0f9a8b',
        datastoreId: 101,
        tmMad: 'ssh',
        type: 'FILE',
      },
      {
        diskId: 1,
        freq: null,
        target: 'vdb',
        driver: 'qcow2',
        source: '/var/lib/one//datastores/101/9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a49',
        datastoreId: 101,
        tmMad: 'ssh',
        type: 'FILE',
      },
    ]);
  });

  it('a single DISK (not an array in the XML), whitespace around CDATA, DEPLOY_ID, last HISTORY wins', () => {
    const vm = parseVmXml(fixture('vm-one-disk-deployed.xml'), 'vm.xml');
    expect(vm.id).toBe(7);
    expect(vm.deployId).toBe('one-7');
    expect(vm.contextDiskId).toBe(1);
    expect(vm.historyDsId).toBe(100);
    expect(vm.disks).toHaveLength(1);
    expect(vm.disks[0]).toMatchObject({ diskId: 0, freq: 3600, target: 'vda' });
  });

  it('every kind of bad frequency makes that disk unusable with a reason naming file, field and VM', () => {
    const vm = parseVmXml(fixture('vm-bad-freqs.xml'), '/ds/0/9/vm.xml');
    const byId = new Map(vm.disks.map((d) => [d.diskId, d]));
    for (const bad of [0, 1, 2, 3, 4, 5, 10]) {
      const d = byId.get(bad);
      expect(d?.freq, `disk ${bad}`).toBeNull();
      expect(d?.freqError, `disk ${bad}`).toMatch(
        new RegExp(`^/ds/0/9/vm\\.xml: /VM/TEMPLATE/DISK\\[DISK_ID=${bad}\\]/RECOVERY_SNAPSHOT_FREQ.*\\(vm 9\\)$`),
      );
    }
    expect(byId.get(0)?.freqError).toContain('"abc" is not a whole number of seconds');
    expect(byId.get(1)?.freqError).toContain('=5 is outside 10..2592000');
    expect(byId.get(5)?.freqError).toContain('appears 2 times');
    // present but empty: treated as a bad value, not as "absent"
    expect(byId.get(6)).toMatchObject({ freq: null, freqRaw: '' });
    expect(byId.get(6)?.freqError).toContain('is not a whole number');
    // the bounds themselves are accepted
    expect(byId.get(7)?.freq).toBe(10);
    expect(byId.get(8)?.freq).toBe(2592000);
    // DISK elements without a usable DISK_ID are listed, not silently dropped
    expect(vm.diskProblems).toHaveLength(2);
    expect(vm.diskProblems[0]).toContain('/VM/TEMPLATE/DISK[10]/DISK_ID="x" is not a disk number');
    expect(vm.diskProblems[1]).toContain('/VM/TEMPLATE/DISK[11]/DISK_ID is missing');
  });

  it('hostile DEPLOY_ID is refused; reserved tag names neither throw nor pollute prototypes', () => {
    const vm = parseVmXml(fixture('vm-hostile-deploy-id.xml'), 'vm.xml');
    expect(vm.deployId).toBeUndefined();
    expect(vm.deployIdError).toContain('/VM/DEPLOY_ID="--connect=qemu+ssh://evil/system" is not a valid domain name (vm 11)');
    expect(vm.disks[0]?.freq).toBe(60);
    expect(({} as Record<string, unknown>)['polluted']).toBeUndefined();
  });
});

describe('parseVmXml rejects unusable documents', () => {
  it.each([
    ['vm-billion-laughs.xml', /DOCTYPE/],
    ['vm-xxe.xml', /DOCTYPE/],
    ['vm-truncated.xml', /malformed XML/],
    ['vm-unclosed.xml', /malformed XML/],
    ['vm-wrong-root.xml', /single <VM> root/],
  ])('%s', (name, message) => {
    const err = thrown(() => parseVmXml(fixture(name), `/ds/1/${name}`));
    expect(err.code).toBe('E_VM_XML');
    expect(err.context.file).toBe(`/ds/1/${name}`);
    expect(err.message).toMatch(message);
  });

  it.each([
    ['empty', ''],
    ['blanks', '  \n '],
    ['not xml', 'hello world'],
    ['no ID', '<VM><NAME>x</NAME></VM>'],
    ['bad ID', '<VM><ID>-1</ID></VM>'],
    ['ID with children', '<VM><ID><X>1</X></ID></VM>'],
    ['two IDs', '<VM><ID>1</ID><ID>2</ID></VM>'],
    ['two roots', '<VM><ID>1</ID></VM><VM><ID>2</ID></VM>'],
    ['text root', '<VM>5</VM>'],
    ['two templates', '<VM><ID>1</ID><TEMPLATE/><TEMPLATE/></VM>'],
  ])('%s', (_label, xml) => {
    const err = thrown(() => parseVmXml(xml, 'f.xml'));
    expect(err.code).toBe('E_VM_XML');
    expect(err.context.file).toBe('f.xml');
  });

  it('names the field for a bad /VM/ID', () => {
    const err = thrown(() => parseVmXml('<VM><ID>abc</ID></VM>', 'f.xml'));
    expect(err.context.field).toBe('/VM/ID');
    expect(err.describe()).toBe('E_VM_XML: f.xml: /VM/ID="abc" is not a non-negative integer (field /VM/ID)');
  });

  it('deep nesting is rejected quickly', () => {
    const deep = `<VM><ID>1</ID>${'<A>'.repeat(100_000)}${'</A>'.repeat(100_000)}</VM>`;
    const t0 = Date.now();
    const err = thrown(() => parseVmXml(deep, 'deep.xml'));
    expect(err.code).toBe('E_VM_XML');
    expect(Date.now() - t0).toBeLessThan(5000);
  });

  it('oversized input is rejected before parsing; a huge attribute under the cap is harmless', () => {
    const over = `<VM a="${'x'.repeat(MAX_ONE_XML_BYTES)}"><ID>1</ID></VM>`;
    expect(thrown(() => parseVmXml(over, 'big.xml')).message).toMatch(/too large/);
    const under = `<VM a="${'x'.repeat(MAX_ONE_XML_BYTES - 100)}"><ID>1</ID></VM>`;
    const t0 = Date.now();
    expect(parseVmXml(under, 'big.xml').id).toBe(1);
    expect(Date.now() - t0).toBeLessThan(5000);
  });

  it('a huge text value is clipped in error messages', () => {
    const vm = parseVmXml(
      `<VM><ID>1</ID><TEMPLATE><DISK><DISK_ID>0</DISK_ID><RECOVERY_SNAPSHOT_FREQ>${'9x'.repeat(50_000)}</RECOVERY_SNAPSHOT_FREQ></DISK></TEMPLATE></VM>`,
      'f',
    );
    expect(vm.disks[0]?.freqError?.length).toBeLessThan(300);
  });

  it('only the predefined entities are decoded', () => {
    const vm = parseVmXml('<VM><ID>1</ID><NAME>a &amp; b &lt;c&gt;</NAME></VM>', 'f');
    expect(vm.name).toBe('a & b <c>');
  });
});

describe('parseDsXml', () => {
  it('system datastore with REPLICA_HOST (CDATA, compact form as oned writes it)', () => {
    const ds = parseDsXml(fixture('ds-system-replica.xml'), '/ds/100/42/ds.xml');
    expect(ds).toEqual({
      id: 100,
      name: 'onestor_system',
      tmMad: 'ssh',
      dsMad: '-',
      type: 1,
      basePath: '/var/lib/one//datastores/100',
      replicaHost: 'replica-01.stor.example.net',
      replicaHostRaw: 'replica-01.stor.example.net',
    });
  });

  it('without REPLICA_HOST', () => {
    const ds = parseDsXml(fixture('ds-system-no-replica.xml'), 'ds.xml');
    expect(ds.id).toBe(0);
    expect(ds.replicaHost).toBeNull();
    expect(ds.replicaHostError).toBeUndefined();
  });

  it('IPv4 REPLICA_HOST', () => {
    expect(parseDsXml(fixture('ds-replica-ipv4.xml'), 'ds.xml').replicaHost).toBe('10.20.30.40');
  });

  it('an option-injection REPLICA_HOST is refused with file and field', () => {
    const ds = parseDsXml(fixture('ds-replica-hostile.xml'), '/x/ds.xml');
    expect(ds.replicaHost).toBeNull();
    expect(ds.replicaHostRaw).toBe('-oProxyCommand=touch /tmp/pwned');
    expect(ds.replicaHostError).toBe(
      '/x/ds.xml: /DATASTORE/TEMPLATE/REPLICA_HOST="-oProxyCommand=touch /tmp/pwned" is not a host name or IP address',
    );
  });

  it('repeated REPLICA_HOST is an error, not a silent pick', () => {
    const ds = parseDsXml('<DATASTORE><ID>1</ID><TEMPLATE><REPLICA_HOST>a</REPLICA_HOST><REPLICA_HOST>b</REPLICA_HOST></TEMPLATE></DATASTORE>', 'f');
    expect(ds.replicaHost).toBeNull();
    expect(ds.replicaHostError).toContain('appears 2 times');
  });

  it.each(['', '<VM><ID>1</ID></VM>', '<DATASTORE><NAME>x</NAME></DATASTORE>', '<DATASTORE><ID>1</ID>'])('rejects %j', (xml) => {
    const err = thrown(() => parseDsXml(xml, 'ds.xml'));
    expect(err.code).toBe('E_DS_XML');
    expect(err.context.file).toBe('ds.xml');
  });
});

describe('host and domain name checks', () => {
  it.each([
    'replica',
    'replica-01.example.net',
    'replica.example.net.',
    '10.0.0.1',
    '255.255.255.255',
    'fd00::1',
    '[fd00::1]',
    '::1',
    '2001:db8:0:0:0:0:0:1',
  ])('accepts %s', (h) => expect(isSafeHost(h)).toBe(true));

  it.each([
    '',
    '-oProxyCommand=x',
    'host name',
    'host;rm',
    'a$(b)',
    'user@host',
    'host:22',
    '300.1.1.1',
    '1.2.3',
    '-host',
    'host-',
    'a..b',
    'x'.repeat(254),
    'fd00:::1::2',
    'h\nx',
    '`id`',
  ])('refuses %j', (h) => expect(isSafeHost(h)).toBe(false));

  it('domain names', () => {
    expect(isValidDomainName('one-7')).toBe(true);
    expect(isValidDomainName('-one')).toBe(false);
    expect(isValidDomainName('one 7')).toBe(false);
    expect(isValidDomainName('')).toBe(false);
  });
});

describe('property: mutated realistic documents', () => {
  // Deterministic xorshift so a failure is reproducible from the printed seed.
  function rng(seed: number): () => number {
    let x = seed >>> 0 || 1;
    return () => {
      x ^= x << 13;
      x >>>= 0;
      x ^= x >>> 17;
      x ^= x << 5;
      x >>>= 0;
      return x / 0x100000000;
    };
  }
  const pieces = ['<', '>', '/', '&', ';', '"', "'", '<![CDATA[', ']]>', '<!DOCTYPE x>', '<DISK>', '</DISK>', '\u0000', 'é', '&amp;', '<!--', '-->'];

  it('never throws anything but OnestorError, and a parsed disk always has a valid or explained freq', () => {
    const sources = [fixture('vm-two-disks.xml'), fixture('vm-one-disk-deployed.xml'), fixture('vm-bad-freqs.xml')];
    let parsed = 0;
    let refused = 0;
    for (let seed = 1; seed <= 1500; seed++) {
      const rand = rng(seed);
      let text = sources[seed % sources.length]!;
      const edits = 1 + Math.floor(rand() * 4);
      for (let k = 0; k < edits; k++) {
        const at = Math.floor(rand() * text.length);
        const r = rand();
        if (r < 0.4) text = text.slice(0, at) + text.slice(at + 1 + Math.floor(rand() * 20));
        else if (r < 0.8) text = text.slice(0, at) + pieces[Math.floor(rand() * pieces.length)] + text.slice(at);
        else text = text.slice(0, at);
      }
      try {
        const vm = parseVmXml(text, 'm.xml');
        parsed++;
        for (const d of vm.disks) {
          if (d.freq !== null) {
            expect(d.freq).toBeGreaterThanOrEqual(10);
            expect(d.freq).toBeLessThanOrEqual(2592000);
          } else if (d.freqRaw !== undefined) {
            expect(d.freqError, `seed ${seed}`).toMatch(/^m\.xml: /);
          }
        }
      } catch (e) {
        if (!(e instanceof OnestorError)) throw new Error(`seed ${seed}: non-OnestorError ${String(e)}`);
        expect(e.code).toBe('E_VM_XML');
        refused++;
      }
    }
    expect(parsed).toBeGreaterThan(50);
    expect(refused).toBeGreaterThan(50);
  });
});
