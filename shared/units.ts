/** Parsers for the config's human units. Both return undefined for text they do not accept. */

const DURATION_UNITS_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** `500ms`, `30s`, `5m`, `1h`, `1h30m`, `0` → milliseconds. */
export function parseDuration(text: string): number | undefined {
  const s = text.trim();
  if (s === '0') return 0;
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/y;
  let total = 0;
  let matched = 0;
  while (re.lastIndex < s.length) {
    const m = re.exec(s);
    if (!m) return undefined;
    total += Number(m[1]) * DURATION_UNITS_MS[m[2]!]!;
    matched++;
  }
  return matched > 0 && Number.isFinite(total) ? Math.round(total) : undefined;
}

const SIZE_UNITS: Record<string, number> = {
  '': 1, B: 1,
  k: 1e3, K: 1e3, M: 1e6, G: 1e9, T: 1e12,
  Ki: 1024, Mi: 1024 ** 2, Gi: 1024 ** 3, Ti: 1024 ** 4,
};

/** `512`, `64k`, `256Mi`, `1Gi`, `2G` → bytes. */
export function parseSize(text: string): number | undefined {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kKMGT]i?|B)?\s*$/.exec(text);
  if (!m) return undefined;
  const unit = SIZE_UNITS[m[2] ?? ''];
  if (unit === undefined) return undefined;
  return Math.round(Number(m[1]) * unit);
}

export function formatDuration(ms: number): string {
  if (ms === 0) return '0';
  if (ms % 3_600_000 === 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0) return `${ms / 60_000}m`;
  if (ms % 1000 === 0) return `${ms / 1000}s`;
  return `${ms}ms`;
}
