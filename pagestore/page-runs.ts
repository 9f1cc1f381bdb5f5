import type { PackedRun } from './restore-pack.js';

/*
 * Bytes of an image's files held in memory (a restore pack's runs, restore-pack.ts), by file:
 * a read that runs hold wholly is answered from them, with no chunk. The runs were
 * checked against their sha256 and against the manifest they were cut from before they get
 * here; they never change.
 */
export class PageRuns {
  /** by file path: runs in offset order, none overlapping */
  private readonly byFile = new Map<string, PackedRun[]>();
  private total = 0;

  /**
   * Adds runs; one that overlaps a run already held is dropped (the image is immutable: same
   * bytes). The runs added.
   */
  add(runs: readonly PackedRun[]): PackedRun[] {
    const added: PackedRun[] = [];
    for (const r of runs) {
      if (r.bytes.length === 0) continue;
      const list = this.byFile.get(r.file) ?? [];
      if (!insertDisjoint(list, r, runBytes)) continue;
      this.byFile.set(r.file, list);
      this.total += r.bytes.length;
      added.push(r);
    }
    return added;
  }

  /**
   * The bytes [pos, end) of `file` when runs hold all of them, else undefined: a view of one
   * run, or a copy when they span touching runs (two packs' runs may touch: each pack joins
   * only its own).
   */
  read(file: string, pos: number, end: number): Buffer | undefined {
    const list = this.byFile.get(file);
    const span = list && spanOf(list, pos, end, runBytes);
    if (!span) return undefined;
    const parts = list.slice(span.first, span.last + 1).map((r) => r.bytes.subarray(Math.max(0, pos - r.offset), Math.min(r.bytes.length, end - r.offset)));
    return parts.length === 1 ? parts[0] : Buffer.concat(parts);
  }

  /** Whether the byte at `offset` of `file` is held. */
  has(file: string, offset: number): boolean {
    return this.read(file, offset, offset + 1) !== undefined;
  }

  /** in bytes, all runs */
  get bytes(): number {
    return this.total;
  }
}

const runBytes = (r: PackedRun): number => r.bytes.length;

/**
 * Inserts `r` into `list` (runs in offset order, none overlapping) unless it overlaps one there;
 * whether it did.
 */
export function insertDisjoint<T extends { offset: number }>(list: T[], r: T, length: (t: T) => number): boolean {
  const i = insertionPoint(list, r.offset);
  const before = list[i - 1];
  const after = list[i];
  if (before && before.offset + length(before) > r.offset) return false;
  if (after && r.offset + length(r) > after.offset) return false;
  list.splice(i, 0, r);
  return true;
}

/**
 * The runs of `list` (in offset order, none overlapping) that hold [pos, end) between them, each
 * touching the next: the indexes of the first and the last; undefined when they do not hold all
 * of it (or it is empty).
 */
export function spanOf<T extends { offset: number }>(list: readonly T[], pos: number, end: number, length: (t: T) => number): { first: number; last: number } | undefined {
  if (end <= pos) return undefined;
  const first = insertionPoint(list, pos + 1) - 1;
  const r = list[first];
  if (!r || r.offset + length(r) <= pos) return undefined;
  let last = first;
  for (let at = r.offset + length(r); at < end; ) {
    const next = list[++last];
    if (!next || next.offset !== at) return undefined;
    at += length(next);
  }
  return { first, last };
}

/** The index of the first run of `list` starting at or after `offset`. */
function insertionPoint(list: ReadonlyArray<{ offset: number }>, offset: number): number {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (list[mid]!.offset < offset) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
