/** Small statistics and table helpers for the bench scripts (no I/O). */

export function median(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** "median (min–max)" with a fixed number of decimals. */
export function medianSpread(xs: readonly number[], decimals = 2): string {
  if (xs.length === 0) return 'n/a';
  const m = median(xs).toFixed(decimals);
  if (xs.length === 1) return m;
  return `${m} (${Math.min(...xs).toFixed(decimals)}–${Math.max(...xs).toFixed(decimals)})`;
}

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

export function mib(bytes: number, decimals = 1): string {
  return (bytes / MiB).toFixed(decimals);
}

/** MB/s in decimal megabytes, as the transfer figures in ENVIRONMENT.md are. */
export function mbps(bytes: number, seconds: number): number {
  return bytes / 1e6 / seconds;
}

/** A Markdown table; every cell already a string. */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => '| ' + cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ') + ' |';
  return [line(header), '|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|', ...rows.map(line)].join('\n');
}

export function seconds(ms: number): number {
  return ms / 1000;
}
