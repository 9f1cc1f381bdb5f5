/*
 * Page-aligned content-defined chunking (CDC): where an image file is cut into chunks.
 *
 * Two consecutive CRIU dumps of an unchanged app hold mostly the same pages, but not at the same
 * file offsets (a page more or less early in pages-N.img shifts every later one). Cuts at fixed
 * offsets then differ everywhere after the shift; cuts chosen by the content of the pages
 * themselves line up again one chunk after it. Measured on two dumps of an unchanged Node app
 * (120 MB pages file), share of bytes new at the second dump: fixed 1 MiB chunks 24%, fixed
 * 64 KiB 9%, this chunking with the defaults ~6%.
 *
 * The rule, for one file (offsets from the start of the file):
 *   - a cut is only ever placed at a multiple of PAGE_SIZE;
 *   - after each whole page, with `pages` the pages in the current chunk so far (this one
 *     included): cut when (pages >= minPages and pageHash(page) % avgPages === 0) or
 *     pages >= maxPages;
 *   - the rest of the file (possibly a short page at EOF, never hashed) is the last chunk.
 * So every chunk but a file's last is a whole number of pages, every chunk is at most
 * maxPages pages (maxChunkBytes), and whether a cut follows a page depends only on that page's
 * bytes and how far back the previous cut is: an edit or an inserted page moves the cuts around
 * it only until the next content cut, after which cuts (and chunks) are the same again.
 *
 * Pure: no I/O. A caller streams a file through a window (see nextChunkLength).
 */

/** in bytes: the unit of cuts (the kernel's page, CRIU's unit of memory in pages-N.img) */
export const PAGE_SIZE = 4096;

/** The parameters of page-aligned CDC. Recorded in every format-2 manifest. */
export interface PageChunking {
  /** in pages: no content cut before this many pages in a chunk (>= 1) */
  minPages: number;
  /** in pages: a page past minPages ends its chunk with probability 1/avgPages (>= 1) */
  avgPages: number;
  /** in pages: a chunk never has more (>= minPages); maxPages * PAGE_SIZE bounds every chunk */
  maxPages: number;
}

/** Chunks of ~19 pages (~76 KiB) on average, 256 KiB at most: the unit of demand paging too. */
export const DEFAULT_PAGE_CHUNKING: Readonly<PageChunking> = Object.freeze({ minPages: 4, avgPages: 16, maxPages: 64 });

/** in pages: the largest maxPages accepted (16 MiB chunks), so chunk buffers stay reasonable */
export const MAX_CHUNK_PAGES = 4096;

/** The defaults overridden by `partial`, validated; RangeError on nonsense. */
export function pageChunking(partial: Partial<PageChunking> = {}): PageChunking {
  const c: PageChunking = {
    minPages: partial.minPages ?? DEFAULT_PAGE_CHUNKING.minPages,
    avgPages: partial.avgPages ?? DEFAULT_PAGE_CHUNKING.avgPages,
    maxPages: partial.maxPages ?? DEFAULT_PAGE_CHUNKING.maxPages,
  };
  const why = chunkingProblem(c);
  if (why) throw new RangeError(`page chunking ${JSON.stringify(c)}: ${why}`);
  return c;
}

/** What is wrong with `c`, or undefined when it is usable. */
export function chunkingProblem(c: PageChunking): string | undefined {
  for (const k of ['minPages', 'avgPages', 'maxPages'] as const) {
    const v = c[k];
    if (!Number.isSafeInteger(v) || v < 1) return `${k} must be a positive integer`;
  }
  if (c.maxPages < c.minPages) return 'maxPages must be >= minPages';
  if (c.maxPages > MAX_CHUNK_PAGES) return `maxPages must be <= ${MAX_CHUNK_PAGES}`;
  return undefined;
}

/** in bytes: the largest chunk `c` can cut */
export function maxChunkBytes(c: PageChunking): number {
  return c.maxPages * PAGE_SIZE;
}

/** in bytes: distance between the 32-bit words pageHash samples */
const SAMPLE_STRIDE = 32;

/**
 * A cheap, non-cryptographic hash of the page at `buf[offset .. offset + PAGE_SIZE)`: murmur3's
 * mixing over every 8th 32-bit word (little-endian), then its finalizer so that the low bits
 * (what `% avgPages` looks at) depend on all sampled words. Depends only on those bytes.
 */
export function pageHash(buf: Uint8Array, offset: number): number {
  let h = 0x9747b28c;
  for (let i = offset, end = offset + PAGE_SIZE; i < end; i += SAMPLE_STRIDE) {
    let k = buf[i]! | (buf[i + 1]! << 8) | (buf[i + 2]! << 16) | (buf[i + 3]! << 24);
    k = Math.imul(k, 0xcc9e2d51);
    k = (k << 15) | (k >>> 17);
    k = Math.imul(k, 0x1b873593);
    h ^= k;
    h = (h << 13) | (h >>> 19);
    h = (Math.imul(h, 5) + 0xe6546b64) | 0;
  }
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/**
 * The length in bytes of the chunk that starts at `window[0]`, which must be a cut (the start of
 * the file or the end of the previous chunk). `eof`: the window ends where the file ends.
 *
 * Returns 0 when the window holds no whole chunk: it is empty, or `eof` is false and no cut lies
 * within it (more of the file is needed). A window of at least maxChunkBytes always holds one,
 * so a streaming caller cuts while `remaining >= maxChunkBytes(c) || eof`, then moves the
 * remainder to the front of its window and reads on. The answer never depends on bytes past the
 * returned length: the same file cuts the same way through any window size.
 */
export function nextChunkLength(window: Uint8Array, eof: boolean, c: PageChunking): number {
  const whole = Math.floor(window.length / PAGE_SIZE);
  const scan = Math.min(whole, c.maxPages);
  for (let pages = 1; pages <= scan; pages++) {
    if (pages >= c.maxPages) return pages * PAGE_SIZE;
    if (pages >= c.minPages && pageHash(window, (pages - 1) * PAGE_SIZE) % c.avgPages === 0) return pages * PAGE_SIZE;
  }
  // No cut among the whole pages in the window (fewer than maxPages of them).
  return eof ? window.length : 0;
}

/** Every chunk length of `data` (a whole file), in order; they sum to data.length. */
export function chunkLengths(data: Uint8Array, c: PageChunking): number[] {
  const out: number[] = [];
  for (let at = 0; at < data.length; ) {
    const n = nextChunkLength(data.subarray(at), true, c);
    out.push(n);
    at += n;
  }
  return out;
}
