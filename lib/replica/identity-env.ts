/**
 * Adapter: the writer's identity from what sshd gives the forced command (its --host argument, the file named
 * by SSH_USER_AUTH under `ExposeAuthInfo yes`). The decision itself is pure (identity.ts).
 * SSH_USER_AUTH is set by sshd; a client can only set it through an AcceptEnv rule naming it (never add one).
 */
import * as fsp from 'node:fs/promises';
import { resolveIdentity, type ResolvedIdentity } from './identity.js';

export async function identityFromEnvironment(o: { host?: string; allowUnidentified?: boolean; env?: NodeJS.ProcessEnv }): Promise<ResolvedIdentity> {
  const env = o.env ?? process.env;
  const file = env['SSH_USER_AUTH'];
  let userAuthText: string | undefined;
  let userAuthError: string | undefined;
  if (file) {
    try {
      const st = await fsp.lstat(file);
      if (!st.isFile()) userAuthError = `SSH_USER_AUTH ${file} is not a regular file`;
      else if (st.size > 64 * 1024) userAuthError = `SSH_USER_AUTH ${file} is larger than 64 KiB`;
      else userAuthText = await fsp.readFile(file, 'utf8');
    } catch (e) {
      userAuthError = `cannot read SSH_USER_AUTH ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`;
    }
  }
  return resolveIdentity({
    ...(o.host !== undefined ? { host: o.host } : {}),
    ...(userAuthText !== undefined ? { userAuthText } : {}),
    ...(userAuthError !== undefined ? { userAuthError } : {}),
    allowUnidentified: o.allowUnidentified ?? false,
  });
}
