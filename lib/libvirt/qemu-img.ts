/**
 * Thin adapter over qemu-img. Every call is execFile with LC_ALL=C; failures become E_QEMU_IMG naming
 * the command and the image. `info` output is parsed from JSON so format changes don't break us.
 */
import { run } from '../shared/exec.js';
import { OnestorError, ErrorCodes } from '../shared/errors.js';

export interface ImageInfo {
  filename: string;
  format: string;
  virtualSize: number;
  actualSize: number;
  clusterSize?: number;
  backingFilename?: string;
  backingFormat?: string;
  fullBackingFilename?: string;
  dirty: boolean;
  bitmaps: string[];
}

/** Pure: parse `qemu-img info --output=json` (single image, not --backing-chain). */
export function parseImageInfo(json: string, file: string): ImageInfo {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(json) as Record<string, unknown>;
  } catch {
    throw new OnestorError(ErrorCodes.QEMU_IMG, 'qemu-img info printed invalid JSON', { file });
  }
  if (typeof o !== 'object' || o === null || typeof o['format'] !== 'string' || typeof o['virtual-size'] !== 'number') {
    throw new OnestorError(ErrorCodes.QEMU_IMG, 'qemu-img info JSON lacks format/virtual-size', { file });
  }
  const spec = (o['format-specific'] as { data?: { bitmaps?: Array<{ name?: string }> } } | undefined)?.data;
  return {
    filename: String(o['filename'] ?? file),
    format: o['format'] as string,
    virtualSize: o['virtual-size'] as number,
    actualSize: typeof o['actual-size'] === 'number' ? (o['actual-size'] as number) : 0,
    clusterSize: typeof o['cluster-size'] === 'number' ? (o['cluster-size'] as number) : undefined,
    backingFilename: typeof o['backing-filename'] === 'string' ? (o['backing-filename'] as string) : undefined,
    backingFormat: typeof o['backing-filename-format'] === 'string' ? (o['backing-filename-format'] as string) : undefined,
    fullBackingFilename: typeof o['full-backing-filename'] === 'string' ? (o['full-backing-filename'] as string) : undefined,
    dirty: o['dirty-flag'] === true,
    bitmaps: (spec?.bitmaps ?? []).map((b) => String(b.name ?? '')).filter(Boolean),
  };
}

/** Pure: depth-0 ranges of `qemu-img map --output=json`, merged. */
export function parseTopAllocation(json: string, file: string): Array<{ offset: number; length: number }> {
  let entries: unknown;
  try {
    entries = JSON.parse(json);
  } catch {
    throw new OnestorError(ErrorCodes.QEMU_IMG, 'qemu-img map printed invalid JSON', { file });
  }
  if (!Array.isArray(entries)) throw new OnestorError(ErrorCodes.QEMU_IMG, 'qemu-img map JSON is not a list', { file });
  const out: Array<{ offset: number; length: number }> = [];
  for (const e of entries as Array<Record<string, unknown>>) {
    const start = e['start'];
    const length = e['length'];
    if (typeof start !== 'number' || typeof length !== 'number' || typeof e['depth'] !== 'number') {
      throw new OnestorError(ErrorCodes.QEMU_IMG, 'qemu-img map entry lacks start/length/depth', { file });
    }
    if (e['depth'] !== 0 || (e['data'] !== true && e['zero'] !== true)) continue;
    const last = out[out.length - 1];
    if (last && last.offset + last.length === start) last.length += length;
    else out.push({ offset: start, length });
  }
  return out;
}

export class QemuImg {
  constructor(private readonly bin: string = 'qemu-img', private readonly signal?: AbortSignal) {}

  private async exec(args: string[], file: string, opts: { cwd?: string; timeoutMs?: number } = {}): Promise<string> {
    const r = await run(this.bin, args, { signal: this.signal, timeoutMs: opts.timeoutMs ?? 0 });
    if (r.code !== 0) {
      const msg = r.stderr.trim().split('\n').pop() ?? `exit ${r.code}`;
      throw new OnestorError(ErrorCodes.QEMU_IMG, `qemu-img ${args[0]} failed: ${msg}`, { file });
    }
    return r.stdout;
  }

  /**
   * Image info. `shared` (-U) reads an image QEMU has open; without it the call fails while QEMU holds
   * the write lock, which is exactly the "QEMU released the backup target" signal DESIGN §3 relies on.
   */
  async info(file: string, opts: { shared?: boolean } = {}): Promise<ImageInfo> {
    const args = ['info', '--output=json'];
    if (opts.shared) args.push('-U');
    args.push(file);
    return parseImageInfo(await this.exec(args, file), file);
  }

  /** Like info without -U, but returns null instead of throwing (used to poll for lock release). */
  async tryInfoLocked(file: string): Promise<ImageInfo | null> {
    const r = await run(this.bin, ['info', '--output=json', file], { signal: this.signal });
    return r.code === 0 ? parseImageInfo(r.stdout, file) : null;
  }

  async create(file: string, opts: { size?: number; backing?: string; backingFormat?: string; unsafe?: boolean; clusterSize?: number }): Promise<void> {
    const args = ['create', '-q', '-f', 'qcow2'];
    if (opts.backing) args.push('-b', opts.backing, '-F', opts.backingFormat ?? 'qcow2');
    if (opts.unsafe) args.push('-u');
    if (opts.clusterSize) args.push('-o', `cluster_size=${opts.clusterSize}`);
    args.push(file);
    if (opts.size !== undefined) args.push(String(opts.size));
    await this.exec(args, file);
  }

  /** Unsafe rebase: rewrite only the stored backing name. */
  async rebaseUnsafe(file: string, backing: string, backingFormat = 'qcow2'): Promise<void> {
    await this.exec(['rebase', '-q', '-u', '-b', backing, '-F', backingFormat, file], file);
  }

  /** Safe rebase: writes into `file` every cluster where old and new backing differ. */
  async rebase(file: string, backing: string, backingFormat = 'qcow2'): Promise<void> {
    await this.exec(['rebase', '-q', '-b', backing, '-F', backingFormat, file], file);
  }

  /**
   * Guest ranges allocated in `file` itself (not its backing chain), read with -U while QEMU runs it.
   * Data and zero clusters both count: either hides the backing file.
   */
  async topAllocation(file: string): Promise<Array<{ offset: number; length: number }>> {
    return parseTopAllocation(await this.exec(['map', '-U', '--output=json', '-f', 'qcow2', file], file, { timeoutMs: 600_000 }), file);
  }

  async check(file: string): Promise<{ ok: boolean; leaks: number; corruptions: number; raw: string }> {
    const r = await run(this.bin, ['check', '--output=json', file], { signal: this.signal });
    // exit 0 clean, 1 not checked (error), 2 corruptions, 3 leaks only
    let parsed: { leaks?: number; corruptions?: number } = {};
    try {
      parsed = JSON.parse(r.stdout) as typeof parsed;
    } catch {
      /* fall through */
    }
    if (r.code === 1) throw new OnestorError(ErrorCodes.QEMU_IMG, `qemu-img check failed: ${r.stderr.trim()}`, { file });
    return { ok: r.code === 0 || r.code === 3, leaks: parsed.leaks ?? 0, corruptions: parsed.corruptions ?? 0, raw: r.stdout };
  }

  /**
   * `qemu-img check -U` of an image a running QEMU has open (the host's base.1): metadata only, no data read.
   * Returns the ERROR lines (which cluster, what refcount) so a report can say what check said. A write in
   * flight can make a live image look inconsistent for a moment: callers retry before concluding.
   */
  async checkLive(file: string): Promise<{ corruptions: number; leaks: number; errors: string[]; ms: number }> {
    const t0 = Date.now();
    const r = await run(this.bin, ['check', '-U', '-f', 'qcow2', file], { signal: this.signal, timeoutMs: 600_000 });
    // exit 0 clean, 1 not checked (error), 2 corruptions, 3 leaks only
    if (r.code === 1 || (r.code !== 0 && r.code !== 2 && r.code !== 3)) {
      throw new OnestorError(ErrorCodes.QEMU_IMG, `qemu-img check -U failed: ${r.stderr.trim().split('\n').pop() ?? `exit ${r.code}`}`, { file });
    }
    const text = r.stdout + r.stderr;
    const errors = text.split('\n').filter((l) => /^ERROR/.test(l)).slice(0, 5);
    const corr = /(\d+) errors were found on the image/.exec(text);
    const leak = /(\d+) leaked clusters were found/.exec(text);
    const corruptions = r.code === 2 ? Math.max(Number(corr?.[1] ?? 0), errors.length, 1) : 0;
    return { corruptions, leaks: Number(leak?.[1] ?? 0), errors, ms: Date.now() - t0 };
  }
}
