import { describe, it, expect } from 'vitest';
import { withoutMissingParent } from '../../lib/cycle/cycle.js';

const xml = `<domaincheckpoint>
  <name>onestor-5-2-b</name>
  <parent>
    <name>onestor-5-1-a</name>
  </parent>
  <creationTime>1795514181</creationTime>
  <disks>
    <disk name='vda' checkpoint='bitmap' bitmap='onestor-5-2-b'/>
  </disks>
</domaincheckpoint>`;

describe('withoutMissingParent', () => {
  it('drops a parent libvirt no longer has (redefine would fail on it)', () => {
    const out = withoutMissingParent(xml, ['one-5-0']);
    expect(out).not.toContain('<parent>');
    expect(out).toContain('<name>onestor-5-2-b</name>');
    expect(out).toContain("bitmap='onestor-5-2-b'");
  });
  it('keeps a parent that exists, and XML without a parent unchanged', () => {
    expect(withoutMissingParent(xml, ['onestor-5-1-a'])).toBe(xml);
    const noParent = xml.replace(/<parent>[\s\S]*?<\/parent>\s*/, '');
    expect(withoutMissingParent(noParent, [])).toBe(noParent);
  });
});
