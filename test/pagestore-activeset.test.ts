import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { ActiveSetStore, activeSetKey, planPages, planPrefetch, type RestoreUse } from '../pagestore/activeset.js';
import { canonicalJson, manifestChecksum } from '../pagestore/chunked-image-store.js';
import type { ImageManifest } from '../pagestore/image-store.js';
import { MemoryObjectStore } from '../pagestore/memory-store.js';

/*
 * ActiveSets: recorded per restore, merged by "used in k of the last n restores", and planned
 * against the manifest being restored — by hash, or by position when a chunk's bytes changed.
 */

const h = (n: number) => n.toString(16).padStart(64, '0');

/** A manifest with pages-1.img of `hashes` (4 KiB chunks) and a small core file. */
function manifest(hashes: number[], generation = 1): ImageManifest {
  const draft = {
    format: 2,
    app: 'kv',
    generation,
    createdAt: '2026-11-30T00:00:00.000Z',
    chunkSize: 4096,
    chunking: { kind: 'pages' as const, minPages: 1, avgPages: 1, maxPages: 1 },
    files: [
      { path: 'core-1.img', size: 100, mode: 0o644, chunks: [h(999)], sizes: [100] },
      { path: 'pages-1.img', size: hashes.length * 4096, mode: 0o644, chunks: hashes.map(h), sizes: hashes.map(() => 4096) },
    ],
  };
  return { ...draft, checksum: manifestChecksum(draft as unknown as ImageManifest) } as ImageManifest;
}

function use(chunks: Array<[number, number]>, generation = 1): RestoreUse {
  return { at: new Date().toISOString(), generation, chunks: chunks.map(([hash, index]) => ({ file: 'pages-1.img', offset: index * 4096, hash: h(hash) })) };
}

describe('ActiveSet', () => {
  it('nothing to prefetch without a record', () => {
    assert.deepEqual(planPrefetch(manifest([1, 2, 3]), undefined), []);
  });

  it('a record is kept per app, newest last, at most `keep` restores, and reads back verified', async () => {
    const objects = new MemoryObjectStore();
    const sets = new ActiveSetStore(objects, { window: 2, minUses: 1 });
    await sets.add('kv', use([[1, 0]]));
    await sets.add('kv', use([[2, 1]]));
    const r = await sets.add('kv', use([[3, 2]]));
    assert.deepEqual(r.restores.map((u) => u.chunks[0]!.hash), [h(2), h(3)]);
    assert.deepEqual((await sets.read('kv'))?.restores, r.restores);
    assert.equal(await sets.read('other'), undefined);
  });

  it('a damaged or foreign record is ignored, never trusted', async () => {
    const objects = new MemoryObjectStore();
    const sets = new ActiveSetStore(objects);
    const r = await sets.add('kv', use([[1, 0]]));
    await objects.put(activeSetKey('kv'), Buffer.from(canonicalJson({ ...r, restores: [use([[7, 0]])] })));
    assert.equal(await sets.read('kv'), undefined, 'checksum mismatch');
    await objects.put(activeSetKey('kv'), Buffer.from('{not json'));
    assert.equal(await sets.read('kv'), undefined);
    await objects.put(activeSetKey('kv'), Buffer.from(canonicalJson({ ...r, app: 'other' })));
    assert.equal(await sets.read('kv'), undefined, 'names another app');
    // Written with whitespace: not the text the checksum was taken over, but the record's.
    await objects.put(activeSetKey('kv'), Buffer.from(JSON.stringify(r, null, 2)));
    assert.deepEqual(await sets.read('kv'), r);
  });

  it('k of n: a chunk is prefetched when used in at least minUses of the last window restores', () => {
    const m = manifest([1, 2, 3, 4]);
    const record = { format: 1, app: 'kv', checksum: '', restores: [use([[1, 0], [2, 1]]), use([[2, 1], [3, 2]]), use([[2, 1], [3, 2]])] };
    const plan = (window: number, minUses: number) => planPrefetch(m, record, { window, minUses }).map((p) => p.ref.hash);
    assert.deepEqual(plan(3, 1), [h(1), h(2), h(3)], 'union');
    assert.deepEqual(plan(3, 2), [h(2), h(3)]);
    assert.deepEqual(plan(3, 3), [h(2)]);
    assert.deepEqual(plan(1, 1), [h(2), h(3)], 'only the newest restore');
  });

  it('a used chunk whose bytes changed is found again by its position; unknown ones are dropped', () => {
    // Generation 2: chunk 1 (was hash 2) changed to hash 20; hash 9 was never in the image.
    const m = manifest([1, 20, 3], 2);
    const record = { format: 1, app: 'kv', checksum: '', restores: [use([[2, 1], [3, 2], [9, 7]])] };
    const plan = planPrefetch(m, record).map((p) => [p.file.path, p.ref.offset, p.ref.hash]);
    assert.deepEqual(plan, [
      ['pages-1.img', 4096, h(20)],
      ['pages-1.img', 8192, h(3)],
    ]);
  });

  it('used pages are found again by address wherever the new image put them; without a locator only hashes count', () => {
    // The restore used pages 0x10000 and 0x11000 of task 1, in chunks 2 and 3 (hashes 2, 3). In
    // generation 2 chunk 2's bytes changed (hash 20) and a page appeared in front, so every page
    // moved one chunk on: the address finds the changed chunk, a position would find the wrong one.
    const m = manifest([5, 1, 20, 3], 2);
    const restore = { ...use([[2, 1], [3, 2]]), pages: [[1, 0x10000, 2]] as Array<[number, number, number]> };
    const record = { format: 1, app: 'kv', checksum: '', restores: [restore] };
    const moved = (pid: number, vaddr: number) => (pid === 1 ? { file: 'pages-1.img', offset: (vaddr - 0x10000) + 2 * 4096 } : null);
    assert.deepEqual(planPrefetch(m, record, undefined, moved).map((p) => p.ref.hash), [h(20), h(3)]);
    assert.deepEqual(planPrefetch(m, record).map((p) => p.ref.hash), [h(3)], 'by hash only, no position guess');
    assert.deepEqual(planPrefetch(m, record, undefined, () => null).map((p) => p.ref.hash), [h(3)], 'pages the image does not hold count for nothing');
  });

  it('pages: each used page brings its aligned block, found by address, k of n by block', () => {
    // restore 1 used task 1's page 0x10000 + one page of block 0x20000; restore 2 the other page
    // of that block and task 2's 0x10000 (another task: another block).
    const r1 = { ...use([]), pages: [[1, 0x10000, 1], [1, 0x21000, 1]] as Array<[number, number, number]> };
    const r2 = { ...use([]), pages: [[1, 0x23000, 1], [2, 0x10000, 1]] as Array<[number, number, number]> };
    const record = { format: 1, app: 'kv', checksum: '', restores: [r1, r2] };
    // Blocks of 4 pages here. Task 1's pages are at vaddr - 0x10000 in pages-1.img, but its page
    // 0x12000 has no bytes; task 2's are likewise in pages-2.img.
    const locate = (pid: number, vaddr: number) => (pid === 1 && vaddr === 0x12000 ? null : { file: `pages-${pid}.img`, offset: vaddr - 0x10000 });
    const plan = (window: number, minUses: number) =>
      planPages(record, { window, minUses }, locate, 4)
        .map((p) => `${p.file}@${(p.offset / 4096).toString()}`)
        .sort();
    assert.deepEqual(plan(3, 1), ['pages-1.img@0', 'pages-1.img@1', 'pages-1.img@16', 'pages-1.img@17', 'pages-1.img@18', 'pages-1.img@19', 'pages-1.img@3', 'pages-2.img@0', 'pages-2.img@1', 'pages-2.img@2', 'pages-2.img@3']);
    assert.deepEqual(plan(3, 2), ['pages-1.img@16', 'pages-1.img@17', 'pages-1.img@18', 'pages-1.img@19'], 'only block 0x20000 was used by both');
    assert.deepEqual(plan(1, 1), ['pages-1.img@16', 'pages-1.img@17', 'pages-1.img@18', 'pages-1.img@19', 'pages-2.img@0', 'pages-2.img@1', 'pages-2.img@2', 'pages-2.img@3'], 'the last restore only');
    assert.deepEqual(planPages(undefined, { window: 3, minUses: 1 }, locate), []);
    assert.deepEqual(planPages({ ...record, restores: [use([[1, 0]])] }, { window: 3, minUses: 1 }, locate), [], 'restores without pages plan no pages');
  });

  it('pages: the frontier, the block after each run of blocks the last restore used, is planned too', () => {
    // Blocks of 4 pages (0x4000). Restore 1 used block 0x10000; restore 2 (the last) blocks 0x10000
    // and 0x14000 (one run, two blocks), 0x30000 of task 1 and 0x10000 of task 2.
    const r1 = { ...use([]), pages: [[1, 0x10000, 1]] as Array<[number, number, number]> };
    const r2 = { ...use([]), pages: [[1, 0x13000, 2], [1, 0x30000, 1], [2, 0x10000, 4]] as Array<[number, number, number]> };
    const record = { format: 1, app: 'kv', checksum: '', restores: [r1, r2] };
    // Task 1's page 0x19000 has no bytes in the image; task 2's memory ends at 0x14000.
    const locate = (pid: number, vaddr: number) => (pid === 1 && vaddr === 0x19000) || (pid === 2 && vaddr >= 0x14000) ? null : { file: `pages-${pid}.img`, offset: vaddr - 0x10000 };
    const blocks = (frontierBlocks: number, minUses = 1) =>
      [...new Set(planPages(record, { window: 3, minUses, frontierBlocks }, locate, 4).map((p) => `${p.file}@${Math.floor(p.offset / 0x4000).toString()}`))].sort();
    assert.deepEqual(blocks(0), ['pages-1.img@0', 'pages-1.img@1', 'pages-1.img@8', 'pages-2.img@0']);
    // + 0x18000 (after the run 0x10000-0x17fff; its page 0x19000 left out) and 0x34000; task 2's next block has no bytes.
    assert.deepEqual(blocks(1), ['pages-1.img@0', 'pages-1.img@1', 'pages-1.img@2', 'pages-1.img@8', 'pages-1.img@9', 'pages-2.img@0']);
    assert.equal(planPages(record, { window: 3, minUses: 1, frontierBlocks: 1 }, locate, 4).filter((p) => p.file === 'pages-1.img' && p.offset === 0x9000).length, 0);
    assert.deepEqual(blocks(2), ['pages-1.img@0', 'pages-1.img@1', 'pages-1.img@10', 'pages-1.img@2', 'pages-1.img@3', 'pages-1.img@8', 'pages-1.img@9', 'pages-2.img@0']);
    // The frontier is a prediction: planned whatever minUses says of the blocks actually used.
    assert.deepEqual(blocks(1, 2), ['pages-1.img@0', 'pages-1.img@2', 'pages-1.img@9']);
  });

  it('a record with malformed pages is not trusted', async () => {
    const objects = new MemoryObjectStore();
    const sets = new ActiveSetStore(objects);
    const r = await sets.add('kv', { ...use([[1, 0]]), pages: [[1, 4096, 1]] });
    assert.deepEqual((await sets.read('kv'))?.restores[0]?.pages, [[1, 4096, 1]]);
    const bad = { ...r, restores: [{ ...r.restores[0]!, pages: [[1, -4096, 1]] }] };
    await objects.put(activeSetKey('kv'), Buffer.from(canonicalJson({ ...bad, checksum: undefined })));
    assert.equal(await sets.read('kv'), undefined);
  });
});
