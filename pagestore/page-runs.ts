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

  /** Adds runs; one that overlaps a run already held is dropped (the image is immutable: same bytes). */
  add(runs: readonly PackedRun[]): void {
    for (const r of runs) {
      if (r.bytes.length === 0) continue;
      const list = this.byFile.get(r.file) ?? [];
      const i = insertionPoint(list, r.offset);
      const before = list[i - 1];
      const after = list[i];
      if (before && before.offset + before.bytes.length > r.offset) continue;
      if (after && r.offset + r.bytes.length > after.offset) continue;
      list.splice(i, 0, r);
      this.byFile.set(r.file, list);
      this.total += r.bytes.length;
    }
  }

  /**
   * The bytes [pos, end) of `file` when runs hold all of them, else undefined: a view of one
   * run, or a copy when they span touching runs (two packs' runs may touch: each pack joins
   * only its own).
   */
  read(file: string, pos: number, end: number): Buffer | undefined {
    const list = this.byFile.get(file);
    if (!list || end <= pos) return undefined;
    let i = insertionPoint(list, pos + 1) - 1;
    const r = list[i];
    if (!r || r.offset > pos) return undefined;
    if (r.offset + r.bytes.length >= end) return r.bytes.subarray(pos - r.offset, end - r.offset);
    const parts = [r.bytes.subarray(pos - r.offset)];
    for (let at = r.offset + r.bytes.length; at < end; ) {
      const next = list[++i];
      if (!next || next.offset !== at) return undefined;
      parts.push(next.bytes.subarray(0, Math.min(next.bytes.length, end - at)));
      at += next.bytes.length;
    }
    return Buffer.concat(parts);
  }

  /** Whether the byte at `offset` of `file` is held. */
  has(file: string, offset: number): boolean {
    return this.read(file, offset, offset + 1) !== undefined;
  }

  /** in bytes, all runs */
  get bytes(): number {
    return this.total;
  }

  /** Every run: file, offset, length. */
  *ranges(): Generator<{ file: string; offset: number; length: number }> {
    for (const [file, list] of this.byFile) for (const r of list) yield { file, offset: r.offset, length: r.bytes.length };
  }
}

/** The index of the first run of `list` starting at or after `offset`. */
function insertionPoint(list: readonly PackedRun[], offset: number): number {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (list[mid]!.offset < offset) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
