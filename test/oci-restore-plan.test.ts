import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { PlannedChunk } from '../pagestore/activeset.js';
import { fileChunks, type ImageFile, type ImageManifest } from '../pagestore/image-store.js';
import { PE_LAZY, PE_PARENT, PE_PRESENT, type Pagemap } from '../worker/oci/pagemap.js';
import { distinctChunks, eagerChunks, eagerPageRanges, joinRanges, metadataChunks, pagemapLocator, readaheadChunks, regionHeads } from '../worker/oci/restore-plan.js';

/*
 * What a lazy restore reads before its process resumes: the plan the prefetch and the restore
 * pack share.
 */

const KiB = 1024;
const h = (n: number) => n.toString(16).padStart(64, '0');

function file(path: string, sizes: number[], first: number): ImageFile {
  return { path, size: sizes.reduce((a, b) => a + b, 0), mode: 0o600, chunks: sizes.map((_, i) => h(first + i)), sizes };
}

// pages-1.img: ten chunks of 64 KiB; a core file; a pagemap of two chunks.
const manifest = {
  format: 2,
  app: 'kv',
  generation: 1,
  createdAt: '2026-11-30T00:00:00.000Z',
  chunkSize: 64 * KiB,
  files: [file('core-1.img', [100], 100), file('pages-1.img', Array(10).fill(64 * KiB), 0), file('pagemap-1.img', [50, 50], 200)],
} as unknown as ImageManifest;
const pages = manifest.files[1]!;
const chunk = (i: number): PlannedChunk => ({ file: pages, ref: fileChunks(manifest, pages)[i]! });
const indexes = (list: PlannedChunk[]) => list.map((p) => p.ref.offset / (64 * KiB));

describe('restore plan', () => {
  it('metadata: every file but the memory pages, the pagemaps first', () => {
    assert.deepEqual(metadataChunks(manifest).map((p) => p.ref.hash), [h(200), h(201), h(100)]);
  });

  it('eager: the chunks holding present pages not marked lazy', () => {
    const map: Pagemap = {
      pagesId: 1,
      entries: [
        { vaddr: 0x10000, pages: 16, flags: PE_PRESENT, offset: 0 }, // chunk 0
        { vaddr: 0x40000, pages: 32, flags: PE_PRESENT | PE_LAZY, offset: 64 * KiB }, // chunks 1-2, lazy
        { vaddr: 0x90000, pages: 2, flags: PE_PRESENT, offset: 190 * KiB }, // straddles chunks 2 and 3
      ],
    };
    assert.deepEqual(indexes(eagerChunks(manifest, [{ pid: 1, map }])), [0, 2, 3]);
    assert.deepEqual(eagerPageRanges([{ pid: 1, map }]), [
      { file: 'pages-1.img', offset: 0, length: 64 * KiB },
      { file: 'pages-1.img', offset: 190 * KiB, length: 8 * KiB },
    ]);
    assert.deepEqual(pagemapLocator([{ pid: 1, map }])(1, 0x90000 + 4096 + 5), { file: 'pages-1.img', offset: 194 * KiB });
    assert.equal(pagemapLocator([{ pid: 1, map }])(2, 0x90000), null, 'another task');
  });

  it('region heads: the first page of each lazy region with bytes, largest regions first, at most max', () => {
    const map = (pagesId: number): Pagemap => ({
      pagesId,
      entries: [
        { vaddr: 0x10000, pages: 16, flags: PE_PRESENT, offset: 0 }, // eager: in the restore pack
        { vaddr: 0x40000, pages: 64, flags: PE_PRESENT | PE_LAZY, offset: 64 * KiB },
        { vaddr: 0x90000, pages: 2, flags: PE_PRESENT | PE_LAZY, offset: 320 * KiB },
        { vaddr: 0xa0000, pages: 8, flags: PE_PARENT | PE_LAZY, offset: null }, // no bytes here
        { vaddr: 0xc0000, pages: 17, flags: PE_PRESENT | PE_LAZY, offset: 328 * KiB },
      ],
    });
    const maps = [{ pid: 1, map: map(1) }, { pid: 7, map: map(2) }];
    const page = (file: string, offset: number) => ({ file, offset, length: 4096 });
    assert.deepEqual(regionHeads(maps), [
      page('pages-1.img', 64 * KiB), page('pages-2.img', 64 * KiB),
      page('pages-1.img', 328 * KiB), page('pages-2.img', 328 * KiB),
      page('pages-1.img', 320 * KiB), page('pages-2.img', 320 * KiB),
    ]);
    assert.deepEqual(regionHeads(maps, 3), [page('pages-1.img', 64 * KiB), page('pages-2.img', 64 * KiB), page('pages-1.img', 328 * KiB)]);
  });

  it('readahead: the chunks within 128 KiB after each run of planned ones', () => {
    // runs: [1], [5, 6]; readahead takes 2 and 3 after the first, 7 and 8 after the second
    assert.deepEqual(indexes(readaheadChunks(manifest, [chunk(1), chunk(5), chunk(6)])), [2, 3, 7, 8]);
    assert.deepEqual(indexes(readaheadChunks(manifest, [chunk(9)])), [], 'nothing past the end');
  });

  it('ranges join when they overlap or touch, per file, in order', () => {
    const r = (file: string, offset: number, length: number) => ({ file, offset, length });
    assert.deepEqual(joinRanges([r('b', 0, 4), r('a', 8, 4), r('a', 0, 4), r('a', 4, 2), r('a', 20, 0), r('a', 9, 10)]), [r('a', 0, 6), r('a', 8, 11), r('b', 0, 4)]);
  });

  it('joined lists keep each chunk once, in first-seen order', () => {
    assert.deepEqual(indexes(distinctChunks([chunk(3), chunk(1)], [chunk(1), chunk(2)])), [3, 1, 2]);
  });
});
