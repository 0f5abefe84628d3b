/**
 * Hostile corpus (test/fixtures/hostile/): malformed and hostile vm.xml, ds.xml, sshrc, state files and
 * receiver protocol frames. Each must give a clear, coded error naming the file and the field that was
 * wrong — or, where the readers classify instead of throwing (a bad DISK_ID or DEPLOY_ID makes that disk
 * or VM ineligible, the other VMs go on), a problem text naming both. Random-input fuzzing of the same
 * readers lives in protocol.test.ts, sshrc.test.ts and one-xml.test.ts and is not repeated here.
 */
import { describe, it, expect } from 'vitest';
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseVmXml, parseDsXml } from '../../lib/discover/one-xml.js';
import { parseSshrc } from '../../lib/config/sshrc.js';
import { parseState } from '../../lib/cycle/state.js';
import { FrameDecoder, parseClientMessage } from '../../lib/protocol/protocol.js';
import { OnestorError } from '../../lib/shared/errors.js';
import { thrownOnestorError } from '../helpers/errors.js';

const DIR = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'hostile');

interface Expect {
  code: string;
  /** ErrorContext.field, when the error can name one */
  field?: string;
  message: RegExp;
}

const thrown = thrownOnestorError;

const vmCases: Record<string, Expect | { problem: RegExp }> = {
  'absurd-vm-id.xml': { code: 'E_VM_XML', field: '/VM/ID', message: /not a non-negative integer/ },
  'negative-vm-id.xml': { code: 'E_VM_XML', field: '/VM/ID', message: /"-7"/ },
  'binary-junk.xml': { code: 'E_VM_XML', message: /malformed XML/ },
  'empty.xml': { code: 'E_VM_XML', message: /empty/ },
  'disk-id-traversal.xml': { problem: /DISK\[1\]\/DISK_ID="\.\.\/\.\.\/0" is not a disk number/ },
  'disk-id-huge.xml': { problem: /DISK_ID="4294967296" is not a disk number/ },
  'deploy-id-traversal.xml': { problem: /DEPLOY_ID/ },
  'deploy-id-newline.xml': { problem: /DEPLOY_ID/ },
};

const dsCases: Record<string, Expect | { problem: RegExp }> = {
  'ds-id-traversal.xml': { code: 'E_DS_XML', field: '/DATASTORE/ID', message: /"\.\.\/100"/ },
  'vm-root-instead.xml': { code: 'E_DS_XML', message: /<DATASTORE> root.*<VM>/ },
  'replica-host-injection.xml': { problem: /REPLICA_HOST=.*is not a host/ },
  'replica-host-option.xml': { problem: /REPLICA_HOST="-oProxyCommand=sh" is not a host/ },
};

const sshrcCases: Record<string, Expect | { warning: RegExp }> = {
  'snaps-relative.sshrc': { code: 'E_SSHRC', field: 'REPLICA_RECOVERY_SNAPS_DIR', message: /must be an absolute path/ },
  'lock-timeout-huge.sshrc': { code: 'E_SSHRC', field: 'REPLICA_COPY_LOCK_TIMEOUT', message: /0\.\.604800/ },
  'used-perc-over-100.sshrc': { code: 'E_SSHRC', field: 'REPLICA_MAX_USED_PERC', message: /1\.\.100/ },
  'nul-byte.sshrc': { code: 'E_SSHRC', message: /NUL/ },
  // never executed: ignored with a warning, the default stays
  'snaps-command-substitution.sshrc': { warning: /REPLICA_RECOVERY_SNAPS_DIR/ },
};

const stateCases: Record<string, Expect> = {
  'not-json.json': { code: 'E_STATE', message: /not valid JSON/ },
  'empty.json': { code: 'E_STATE', message: /not valid JSON/ },
  'wrong-version.json': { code: 'E_STATE', field: 'version', message: /expected 1/ },
  'disks-array.json': { code: 'E_STATE', field: 'disks', message: /record/ },
  'disk-key-traversal.json': { code: 'E_STATE', field: 'disks.../../etc.vmId', message: />=0/ },
};

const frameCases: Record<string, Expect> = {
  'oversized-control.hex': { code: 'E_PROTOCOL', message: /exceeds 65536/ },
  'oversized-data.hex': { code: 'E_PROTOCOL', message: /exceeds 4194304/ },
  'unknown-type.hex': { code: 'E_PROTOCOL', message: /unknown frame type 9/ },
  'truncated-header.hex': { code: 'E_PROTOCOL', message: /truncated/ },
  'truncated-body.hex': { code: 'E_PROTOCOL', message: /truncated/ },
  'control-not-json.hex': { code: 'E_PROTOCOL', message: /not valid JSON/ },
  'open-traversal.hex': { code: 'E_PROTOCOL', field: 'vm', message: /invalid open/ },
  'put-key-traversal.hex': { code: 'E_PROTOCOL', field: 'key', message: /invalid put/ },
  'put-negative-size.hex': { code: 'E_PROTOCOL', field: 'size', message: />=0/ },
  'end-bad-digest.hex': { code: 'E_PROTOCOL', field: 'sha256', message: /64 lowercase hex/ },
  'unknown-message.hex': { code: 'E_PROTOCOL', field: 'type', message: /unknown message type "exec"/ },
  'publish-checkpoint-injection.hex': { code: 'E_PROTOCOL', field: 'checkpoint', message: /invalid characters/ },
};

function checkError(e: OnestorError, x: Expect, file?: string): void {
  expect(e.code).toBe(x.code);
  expect(e.message).toMatch(x.message);
  if (x.field) expect(e.context.field).toBe(x.field);
  if (file) expect(e.context.file).toBe(file);
}

function corpus(kind: string, cases: Record<string, unknown>): string[] {
  const files = readdirSync(path.join(DIR, kind)).sort();
  // every fixture has an expectation and every expectation a fixture
  expect(files).toEqual(Object.keys(cases).sort());
  return files;
}

describe('hostile vm.xml', () => {
  it('the corpus is complete', () => void corpus('vm', vmCases));
  for (const [f, x] of Object.entries(vmCases)) {
    it(f, () => {
      const text = readFileSync(path.join(DIR, 'vm', f), 'latin1');
      if ('problem' in x) {
        const doc = parseVmXml(text, f);
        const problems = [...doc.diskProblems, doc.deployIdError ?? ''].join('\n');
        expect(problems).toMatch(x.problem);
        expect(problems).toContain(f);
        if (doc.deployIdError) expect(doc.deployId ?? null).toBeNull();
      } else checkError(thrown(() => parseVmXml(text, f)), x, f);
    });
  }
});

describe('hostile ds.xml', () => {
  it('the corpus is complete', () => void corpus('ds', dsCases));
  for (const [f, x] of Object.entries(dsCases)) {
    it(f, () => {
      const text = readFileSync(path.join(DIR, 'ds', f), 'utf8');
      if ('problem' in x) {
        const doc = parseDsXml(text, f);
        expect(doc.replicaHost).toBeNull();
        expect(doc.replicaHostError).toMatch(x.problem);
        expect(doc.replicaHostError).toContain(f);
      } else checkError(thrown(() => parseDsXml(text, f)), x, f);
    });
  }
});

describe('hostile sshrc', () => {
  it('the corpus is complete', () => void corpus('sshrc', sshrcCases));
  for (const [f, x] of Object.entries(sshrcCases)) {
    it(f, () => {
      const text = readFileSync(path.join(DIR, 'sshrc', f), 'utf8');
      if ('warning' in x) {
        const r = parseSshrc(text, f);
        expect(r.warnings.join('\n')).toMatch(x.warning);
        expect(r.settings.REPLICA_RECOVERY_SNAPS_DIR).toBe('/var/lib/one/datastores/replica_snaps');
      } else checkError(thrown(() => parseSshrc(text, f)), x, f);
    });
  }
});

describe('hostile state files', () => {
  it('the corpus (plus one accepted file) is complete', () => {
    const files = readdirSync(path.join(DIR, 'state')).sort();
    expect(files).toEqual([...Object.keys(stateCases), 'proto-pollution.json'].sort());
  });
  for (const [f, x] of Object.entries(stateCases)) {
    it(f, () => checkError(thrown(() => parseState(readFileSync(path.join(DIR, 'state', f), 'utf8'), f)), x, f));
  }
  it('proto-pollution.json: __proto__ keys neither pollute objects nor become disks', () => {
    const s = parseState(readFileSync(path.join(DIR, 'state', 'proto-pollution.json'), 'utf8'), 'proto-pollution.json');
    expect(Object.keys(s.disks)).toEqual([]);
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
    expect((s as unknown as Record<string, unknown>).polluted).toBeUndefined();
  });
});

describe('hostile protocol frames (receiver side)', () => {
  it('the corpus is complete', () => void corpus('frames', frameCases));
  for (const [f, x] of Object.entries(frameCases)) {
    it(f, () => {
      const bytes = Buffer.from(readFileSync(path.join(DIR, 'frames', f), 'utf8').trim(), 'hex');
      const e = thrown(() => {
        const d = new FrameDecoder();
        const frames = d.push(bytes);
        d.end();
        for (const fr of frames) if (fr.type === 'control') parseClientMessage(fr.message);
      });
      checkError(e, x);
    });
    it(`${f}, delivered one byte at a time: same error`, () => {
      const bytes = Buffer.from(readFileSync(path.join(DIR, 'frames', f), 'utf8').trim(), 'hex');
      const e = thrown(() => {
        const d = new FrameDecoder();
        for (let i = 0; i < bytes.length; i++) for (const fr of d.push(bytes.subarray(i, i + 1))) if (fr.type === 'control') parseClientMessage(fr.message);
        d.end();
      });
      checkError(e, x);
    });
  }
});
