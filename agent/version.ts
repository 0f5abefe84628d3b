/** The agent's version, from package.json (dist/agent/ and agent/ both sit two levels below it). */
import { readFile } from 'node:fs/promises';

export const VERSION: string = await readFile(new URL('../../package.json', import.meta.url), 'utf8')
  .then((t) => String((JSON.parse(t) as { version?: string }).version ?? '0.0.0'))
  .catch(() => '0.0.0');
