/**
 * CPU profiles for the push bench: the in-process client through node:inspector, and the summary of any
 * V8 .cpuprofile (self time per function, biggest first). Pure summarizing below the session helper.
 */
import { Session } from 'node:inspector';

interface CpuProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  children?: number[];
}
export interface CpuProfile {
  nodes: CpuProfileNode[];
  startTime: number;
  endTime: number;
  samples?: number[];
  timeDeltas?: number[];
}

/** Runs `fn` under the V8 sampling profiler of this process. */
export async function profileInProcess<T>(fn: () => Promise<T>): Promise<{ result: T; profile: CpuProfile }> {
  const session = new Session();
  session.connect();
  const post = <R>(method: string, params?: object) =>
    new Promise<R>((resolve, reject) => session.post(method, params ?? {}, (err, res) => (err ? reject(err) : resolve(res as R))));
  await post('Profiler.enable');
  await post('Profiler.setSamplingInterval', { interval: 200 });
  await post('Profiler.start');
  try {
    const result = await fn();
    const { profile } = await post<{ profile: CpuProfile }>('Profiler.stop');
    return { result, profile };
  } finally {
    session.disconnect();
  }
}

export interface SelfTime {
  name: string;
  ms: number;
  share: number;
}

/** Self time per function (name + file:line), largest first; `(idle)` kept so the busy share is visible. */
export function selfTimes(profile: CpuProfile): SelfTime[] {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const ms = new Map<string, number>();
  const samples = profile.samples ?? [];
  const deltas = profile.timeDeltas ?? [];
  let total = 0;
  for (let i = 0; i < samples.length; i++) {
    const node = byId.get(samples[i]!);
    const dt = (deltas[i] ?? 0) / 1000;
    if (!node || dt <= 0) continue;
    const f = node.callFrame;
    const file = f.url ? f.url.replace(/^.*\/(node_modules\/|dist\/)/, '$1') : '';
    const name = `${f.functionName || '(anonymous)'}${file ? ` ${file}:${f.lineNumber + 1}` : ''}`;
    ms.set(name, (ms.get(name) ?? 0) + dt);
    total += dt;
  }
  return [...ms.entries()].map(([name, v]) => ({ name, ms: v, share: total ? v / total : 0 })).sort((a, b) => b.ms - a.ms);
}

export function formatSelfTimes(rows: SelfTime[], top = 15): string {
  return rows
    .slice(0, top)
    .map((r) => `${r.ms.toFixed(0).padStart(7)} ms ${(100 * r.share).toFixed(1).padStart(5)} %  ${r.name}`)
    .join('\n');
}
