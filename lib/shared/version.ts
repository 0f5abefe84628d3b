/**
 * The ONE version source: package.json's "version", read once when first imported. The CLI's --version,
 * hello's agentVersion, the receiver's receiverVersion and the daemon's heartbeat all use AGENT_VERSION.
 * Found by walking up from this file, so the same code works from lib/ (tests) and dist/lib/ (installed).
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

function readPackageVersion(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    try {
      const pkg = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: unknown; version?: unknown };
      if (pkg.name === 'onestor-agent' && typeof pkg.version === 'string') return pkg.version;
    } catch {
      // no package.json at this level: keep walking up
    }
    const up = path.dirname(dir);
    if (up === dir) break;
    dir = up;
  }
  return '0.0.0';
}

export const AGENT_VERSION: string = readPackageVersion();
