/**
 * Staging left by a crashed run (DS/<stagingDirName>/<vmid>), removed at daemon start in every numeric
 * (system datastore) dir. The cycle's capture module, which knows what staging looks like, loads only
 * when there is a datastore location to look in.
 */
import path from 'node:path';
import { readdir } from 'node:fs/promises';

export async function cleanAllStaging(datastoreLocation: string, stagingDirName: string): Promise<number[]> {
  let names: string[];
  try {
    names = await readdir(datastoreLocation);
  } catch {
    return [];
  }
  const { cleanStaleStaging } = await import('../cycle/capture.js');
  const removed: number[] = [];
  for (const n of names) {
    if (!/^\d+$/.test(n)) continue;
    removed.push(...(await cleanStaleStaging(path.join(datastoreLocation, n, stagingDirName))));
  }
  return removed;
}
