import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  chunkLengths,
  DEFAULT_PAGE_CHUNKING,
  maxChunkBytes,
  nextChunkLength,
  PAGE_SIZE,
  pageChunking,
  pageHash,
  type PageChunking,
} from '../pagestore/chunker.js';

// The page-aligned CDC cutter (pagestore/chunker.ts), pure: buffers in, chunk lengths out.

const KiB = 1024;
const MiB = 1024 * KiB;
const C = pageChunking();

/** Deterministic bytes: mulberry32 seeded with `seed`. */
function seeded(bytes: number, seed: number): Buffer {
  const out = Buffer.allocUnsafe(bytes);
  let s = seed >>> 0;
  for (let i = 0; i < bytes; i += 4) {
    s = (s + 0x6d2b79f5) | 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    const v = (t ^ (t >>> 14)) >>> 0;
    if (i + 4 <= bytes) out.writeUInt32LE(v, i);
    else for (let j = 0; i + j < bytes; j++) out[i + j] = (v >>> (8 * j)) & 0xff;
  }
  return out;
}

/** Offsets (from the start) of every cut between chunks: the ends of all chunks but the last. */
function cuts(data: Buffer, c: PageChunking = C): number[] {
  const out: number[] = [];
  let at = 0;
  for (const n of chunkLengths(data, c)) {
    at += n;
    if (at < data.length) out.push(at);
  }
  return out;
}

/** Cuts `data` as put does: through a window of `windowBytes`, cutting while >= max chunk remains or at EOF. */
function streamed(data: Buffer, windowBytes: number, c: PageChunking = C): number[] {
  const window = Buffer.alloc(windowBytes);
  const max = maxChunkBytes(c);
  const lengths: number[] = [];
  let base = 0;
  let filled = 0;
  let start = 0;
  let eof = false;
  for (;;) {
    if (!eof && filled - start < max) {
      window.copyWithin(0, start, filled);
      base += start;
      filled -= start;
      start = 0;
      const n = data.copy(window, filled, base + filled);
      filled += n;
      eof = base + filled === data.length;
    }
    const len = nextChunkLength(window.subarray(start, filled), eof, c);
    if (len === 0) break;
    lengths.push(len);
    start += len;
  }
  return lengths;
}

describe('page-aligned content-defined chunking', () => {
  it('cuts only at page boundaries; chunks are min..max pages (but the last), and cover the buffer', () => {
    const data = seeded(8 * MiB + 1234, 1);
    const lengths = chunkLengths(data, C);
    assert.equal(lengths.reduce((a, b) => a + b, 0), data.length);
    lengths.forEach((n, i) => {
      assert.ok(n <= maxChunkBytes(C), `chunk ${i} is ${n} bytes`);
      if (i < lengths.length - 1) {
        assert.equal(n % PAGE_SIZE, 0, `chunk ${i} is whole pages`);
        assert.ok(n >= C.minPages * PAGE_SIZE, `chunk ${i} has at least minPages`);
      }
    });
    assert.equal(lengths.at(-1)! % PAGE_SIZE, 1234 % PAGE_SIZE, 'the short page at EOF ends the last chunk');
    // ~ (minPages - 1 + avgPages) pages on average, well inside 64–80 KiB.
    const mean = data.length / lengths.length;
    assert.ok(mean > 64 * KiB && mean < 88 * KiB, `mean ${(mean / KiB).toFixed(1)} KiB`);
  });

  it('is deterministic, and the same through any window of at least one max chunk', () => {
    const data = seeded(3 * MiB + 777, 2);
    const whole = chunkLengths(data, C);
    assert.deepEqual(chunkLengths(Buffer.from(data), C), whole);
    for (const w of [maxChunkBytes(C), maxChunkBytes(C) + 5000, 1 * MiB, 4 * MiB]) assert.deepEqual(streamed(data, w), whole, `window ${w}`);
  });

  it('an inserted page early in the buffer leaves every later cut where it was (shifted by the page)', () => {
    const data = seeded(4 * MiB, 3);
    const at = 5 * PAGE_SIZE;
    const inserted = Buffer.concat([data.subarray(0, at), seeded(PAGE_SIZE, 99), data.subarray(at)]);
    const before = cuts(data);
    const after = cuts(inserted);
    // Past the first few chunks after the insertion, the cuts are the old ones + one page.
    const from = 512 * KiB;
    assert.deepEqual(
      after.filter((x) => x >= from + PAGE_SIZE),
      before.filter((x) => x >= from).map((x) => x + PAGE_SIZE),
    );
    // …and so are the chunks themselves (what dedup sees): nearly all of them survive.
    const chunksOf = (d: Buffer) => {
      const out = new Set<string>();
      let o = 0;
      for (const n of chunkLengths(d, C)) out.add(d.subarray(o, (o += n)).toString('base64'));
      return out;
    };
    const old = chunksOf(data);
    const fresh = [...chunksOf(inserted)].filter((c) => !old.has(c));
    assert.ok(fresh.length <= 3, `${fresh.length} new chunks`);
  });

  it('a changed page moves at most the cuts around it', () => {
    const data = seeded(2 * MiB, 4);
    const changed = Buffer.from(data);
    for (let i = 0; i < 64; i += 4) changed[MiB + 100 + i] ^= 0x5a; // 64 bytes of one page
    const a = cuts(data);
    const b = cuts(changed);
    const differ = a.filter((x) => !b.includes(x)).length + b.filter((x) => !a.includes(x)).length;
    assert.ok(differ <= 4, `${differ} cuts differ`);
    assert.deepEqual(b.filter((x) => x >= MiB + maxChunkBytes(C) * 2), a.filter((x) => x >= MiB + maxChunkBytes(C) * 2));
  });

  it('respects maxPages: zero pages, and content that never cuts', () => {
    for (const n of chunkLengths(Buffer.alloc(3 * MiB), C)) assert.ok(n <= maxChunkBytes(C));
    const never = pageChunking({ minPages: 2, avgPages: 2 ** 31, maxPages: 8 });
    const lengths = chunkLengths(seeded(MiB + 10, 5), never);
    assert.ok(lengths.slice(0, -1).every((n) => n === 8 * PAGE_SIZE));
    assert.equal(lengths.at(-1), 10);
    // min = max: fixed chunks of that many pages.
    const fixed = pageChunking({ minPages: 16, maxPages: 16 });
    assert.deepEqual(chunkLengths(seeded(40 * 64 * KiB + 5, 6), fixed), [...Array<number>(40).fill(64 * KiB), 5]);
  });

  it('nextChunkLength: 0 when the window holds no whole chunk; the tail at EOF', () => {
    const data = seeded(10 * PAGE_SIZE, 7);
    const never = pageChunking({ minPages: 1, avgPages: 2 ** 31, maxPages: 64 });
    assert.equal(nextChunkLength(data, false, never), 0, 'more of the file is needed');
    assert.equal(nextChunkLength(data, true, never), data.length);
    assert.equal(nextChunkLength(data.subarray(0, 100), true, C), 100, 'a short page at EOF is a chunk');
    assert.equal(nextChunkLength(Buffer.alloc(0), true, C), 0);
    assert.equal(nextChunkLength(Buffer.alloc(0), false, C), 0);
    const big = seeded(maxChunkBytes(C), 8);
    const n = nextChunkLength(big, false, C);
    assert.ok(n > 0 && n <= big.length && n % PAGE_SIZE === 0, 'a window of one max chunk always holds a chunk');
  });

  it('pageHash depends only on the page bytes', () => {
    const page = seeded(PAGE_SIZE, 9);
    const elsewhere = Buffer.concat([seeded(3 * PAGE_SIZE + 12, 10), page]);
    assert.equal(pageHash(page, 0), pageHash(elsewhere, 3 * PAGE_SIZE + 12));
    const other = Buffer.from(page);
    other[0] ^= 1;
    assert.notEqual(pageHash(other, 0), pageHash(page, 0));
    // Spread: `% avgPages` over many random pages hits 0 about 1/avgPages of the time.
    const pages = seeded(4096 * PAGE_SIZE, 11);
    let zero = 0;
    for (let p = 0; p < 4096; p++) if (pageHash(pages, p * PAGE_SIZE) % 16 === 0) zero++;
    assert.ok(zero > 200 && zero < 320, `${zero} of 4096`);
  });

  it('validates its parameters (RangeError) and defaults each one', () => {
    assert.deepEqual(pageChunking(), { ...DEFAULT_PAGE_CHUNKING });
    assert.deepEqual(pageChunking({ avgPages: 8 }), { minPages: 4, avgPages: 8, maxPages: 64 });
    for (const bad of [{ minPages: 0 }, { avgPages: 0 }, { maxPages: 2 }, { minPages: 1.5 }, { maxPages: 1e6 }, { avgPages: Number.NaN }] as Partial<PageChunking>[]) {
      assert.throws(() => pageChunking(bad), RangeError, JSON.stringify(bad));
    }
  });
});
