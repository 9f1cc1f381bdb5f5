import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { ChunkCache } from '../pagestore/chunk-cache.js';
import { manifestChecksum, sha256 } from '../pagestore/chunked-image-store.js';
import type { ImageManifest, ImageStore } from '../pagestore/image-store.js';
import { encodeRestorePack, readRestorePack } from '../pagestore/restore-pack.js';
import { silentLogger } from '../shared/log.js';
import { LazyImage } from '../worker/oci/lazy-image.js';
import { PE_LAZY, PE_PRESENT } from '../worker/oci/pagemap.js';
import { pagemapImage } from './helpers/pagemap.js';
import { until } from './helpers/poll.js';
import { watchdog } from './helpers/watchdog.js';

/*
 * The lazy image of an activeset restore with a restore pack: the pack alone brings what the
 * restore reads before the process resumes, and the mount answers reads of its page runs; the
 * page cache warming reads them without making the kernel read ahead into chunks nobody asked
 * for. A real FUSE mount, read by a child process (this one serves it).
 */
watchdog(120_000, 'test/oci-lazy-image.test.js');

const skipReason =
  process.getuid?.() !== 0 ? 'FUSE mount tests need root (mount(2) of a fuse filesystem)'
  : !existsSync('/dev/fuse') ? 'FUSE mount tests need /dev/fuse'
  : undefined;

const KiB = 1024;
const CHUNK = 64 * KiB;
const work = mkdtempSync(path.join(tmpdir(), 'pico-lazy-image-'));
after(() => rmSync(work, { recursive: true, force: true }));

// pages-1.img: 64 chunks of 64 KiB, chunk i filled with byte i; core-1.img: one small chunk.
const chunks = new Map<string, Buffer>();
const addChunk = (b: Buffer): string => {
  const h = sha256(b);
  chunks.set(h, b);
  return h;
};
const pageHashes = Array.from({ length: 64 }, (_, i) => addChunk(Buffer.alloc(CHUNK, i)));
const core = Buffer.from('core image bytes');
const coreChunk = { hash: sha256(core), bytes: core };
const draft = {
  format: 2,
  app: 'kv',
  generation: 3,
  createdAt: '2026-12-01T00:00:00.000Z',
  chunkSize: CHUNK,
  files: [
    { path: 'core-1.img', size: core.length, mode: 0o600, chunks: [addChunk(core)], sizes: [core.length] },
    { path: 'pages-1.img', size: 64 * CHUNK, mode: 0o600, chunks: pageHashes, sizes: pageHashes.map(() => CHUNK) },
  ],
};
const manifest = { ...draft, checksum: manifestChecksum(draft as unknown as ImageManifest) } as ImageManifest;

// The same image with a pagemap: pages-1.img holds 64 lazy memory regions of one chunk each, so
// the first page of every chunk is a region head (restore-plan.ts, regionHeads).
const pagemap = pagemapImage(pageHashes.map((_, i) => ({ vaddr: (i + 1) * 0x100000, pages: CHUNK / 4096, flags: PE_PRESENT | PE_LAZY })));
const pagemapChunk = { hash: addChunk(pagemap), bytes: pagemap };
const mappedDraft = { ...draft, files: [...draft.files, { path: 'pagemap-1.img', size: pagemap.length, mode: 0o600, chunks: [pagemapChunk.hash], sizes: [pagemap.length] }] };
const mapped = { ...mappedDraft, checksum: manifestChecksum(mappedDraft as unknown as ImageManifest) } as ImageManifest;

// Runs as a restore pack carries them: the bytes of the image at their offsets. One is longer
// than the kernel's largest read, and most end inside a chunk.
const runs = [
  [3 * CHUNK + 8192, 16],
  [10 * CHUNK, 5],
  [20 * CHUNK + 4096, 40],
  [30 * CHUNK, 1],
  [40 * CHUNK + 4096, 100],
].map(([offset, pages]) => ({ file: 'pages-1.img', offset: offset!, bytes: Buffer.alloc(pages! * 4096, Math.floor(offset! / CHUNK)) }));

/** A store that counts what it is asked for (chunks of pages-1.img by index, others as -1); `slow` waits for `until`. */
function countingStore(slow?: { chunk: number; until: Promise<void> }): ImageStore & { asked: number[] } {
  const asked: number[] = [];
  return {
    asked,
    getChunk: async (hash: string) => {
      const i = pageHashes.indexOf(hash);
      asked.push(i);
      if (slow && i === slow.chunk) await slow.until;
      return chunks.get(hash)!;
    },
  } as unknown as ImageStore & { asked: number[] };
}

function dd(file: string, skip: number, count: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn('dd', [`if=${file}`, 'bs=4096', 'iflag=skip_bytes,count_bytes', `skip=${skip}`, `count=${count}`, 'status=none'], { stdio: ['ignore', 'pipe', 'inherit'] });
    const out: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(Buffer.concat(out)) : reject(new Error(`dd exited ${code}`))));
  });
}

async function open(store: ImageStore, name: string, sweepAfterMisses?: number, image = manifest): Promise<LazyImage> {
  return LazyImage.open({
    sweepAfterMisses,
    manifest: image,
    mountpoint: path.join(work, name),
    store,
    cache: await ChunkCache.open({ memoryBytes: 64 * 1024 * 1024 }),
    prefetch: () => [],
    onFailure: async () => undefined,
    log: silentLogger(),
  });
}

/** Runs `fn` on a fresh lazy image over a counting store, then closes the image. */
async function withImage(name: string, fn: (img: LazyImage, store: ImageStore & { asked: number[] }) => Promise<void>, sweepAfterMisses?: number): Promise<void> {
  const store = countingStore();
  const img = await open(store, name, sweepAfterMisses);
  try {
    await fn(img, store);
  } finally {
    await img.close();
  }
}

describe('lazy image with a restore pack', { skip: skipReason }, () => {
  it('takes metadata and pages from the pack, serves the runs, and warms them without reading ahead into chunks', async () => {
    await withImage('a', async (img, store) => {
      const pack = await encodeRestorePack(3, { manifest: manifest.checksum, chunks: [coreChunk], runs });
      await img.prefetch(undefined, { restore: readRestorePack(pack), activeset: Promise.resolve(undefined) });
      const s = img.stats();
      assert.equal(s.packed, 1);
      assert.equal(s.packedPages, 162);
      assert.equal(s.prefetched + s.eager, 0, 'no memory chunk fetched whole');
      assert.deepEqual(store.asked, [], 'nothing fetched from the store');
      await img.warmPageCache();
      assert.deepEqual(store.asked, [], 'warming read no chunk');
      const file = path.join(img.path, 'pages-1.img');
      assert.deepEqual(await dd(file, 20 * CHUNK + 8192, 4096), Buffer.alloc(4096, 20), 'a run page, as the pack has it');
      assert.deepEqual(await dd(path.join(img.path, 'core-1.img'), 0, core.length), core);
      assert.equal(img.prefetchedPage('pages-1.img', 10 * CHUNK + 4096), true);
      assert.equal(img.prefetchedPage('pages-1.img', 10 * CHUNK + 5 * 4096), false, 'just past a run');
      assert.deepEqual(store.asked, []);
      assert.deepEqual(await dd(file, 12 * CHUNK, 4096), Buffer.alloc(4096, 12), 'elsewhere: the chunk');
      assert.equal(store.asked[0], 12, 'then its neighbours');
    });
  });

  it('reads wait for the packs that may carry their bytes, then are served from them', async () => {
    await withImage('c', async (img, store) => {
      let deliver!: (b: Buffer) => void;
      const late = new Promise<Buffer>((resolve) => (deliver = resolve)).then(readRestorePack);
      // The restore pack carries the page at 50 chunks (as it carries the pages criu restore reads).
      const eager = { file: 'pages-1.img', offset: 50 * CHUNK, bytes: Buffer.alloc(4096, 50) };
      const restorePack = await encodeRestorePack(3, { manifest: manifest.checksum, chunks: [coreChunk], runs: [eager] });
      const prefetched = img.prefetch(undefined, { restore: readRestorePack(restorePack), activeset: late });
      const file = path.join(img.path, 'pages-1.img');
      const reading = dd(file, 10 * CHUNK, 4096);
      const metadata = await dd(path.join(img.path, 'core-1.img'), 0, core.length);
      assert.deepEqual(metadata, core, 'a metadata read needs only the restore pack');
      assert.deepEqual(await dd(file, 50 * CHUNK, 4096), eager.bytes, 'so does a page it carries');
      await new Promise((r) => setTimeout(r, 200));
      assert.deepEqual(store.asked, [], 'the page read waits for the ActiveSet pack instead of fetching its chunk');
      deliver(await encodeRestorePack(3, { manifest: manifest.checksum, chunks: [], runs }));
      assert.deepEqual(await reading, Buffer.alloc(4096, 10));
      await prefetched;
      assert.deepEqual(store.asked, [], 'answered from the run');
      assert.equal(img.stats().packedPages, 163);
    });
  });

  it('a pack of another image: its chunks are used, its runs are not; memory is prefetched by chunk', async () => {
    await withImage('b', async (img, store) => {
      const pack = await encodeRestorePack(2, { manifest: 'f'.repeat(64), chunks: [coreChunk], runs });
      await img.prefetch(undefined, { restore: readRestorePack(pack) });
      assert.equal(img.stats().packed, 1);
      assert.equal(img.stats().packedPages, 0);
      assert.equal(img.prefetchedPage('pages-1.img', 10 * CHUNK), false);
      assert.deepEqual(await dd(path.join(img.path, 'pages-1.img'), 10 * CHUNK, 4096), Buffer.alloc(4096, 10), 'the chunk, not the foreign run');
    });
  });

  it('a read of pages that misses the prefetch brings the chunks around it; past sweepAfterMisses misses, the sweep starts', async () => {
    await withImage(
      'd',
      async (img, store) => {
        const pack = await encodeRestorePack(3, { manifest: manifest.checksum, chunks: [coreChunk], runs });
        await img.prefetch(undefined, { restore: readRestorePack(pack), activeset: Promise.resolve(undefined) });
        const file = path.join(img.path, 'pages-1.img');
        const asked = (): number[] => [...new Set(store.asked)].sort((a, b) => a - b);
        assert.deepEqual(await dd(file, 12 * CHUNK, 4096), Buffer.alloc(4096, 12));
        await until(() => store.asked.length === 9, 'the chunks around chunk 12');
        assert.deepEqual(asked(), [8, 9, 10, 11, 12, 13, 14, 15, 16], '4 on either side (10 holds a run, but not whole)');
        assert.deepEqual(await dd(file, 14 * CHUNK, 4096), Buffer.alloc(4096, 14), 'a neighbour: no miss');
        assert.deepEqual(await dd(file, 20 * CHUNK + 4096, 4096), Buffer.alloc(4096, 20), 'a run: no miss');
        // The runs hold chunks 41-45 whole: they are never fetched.
        assert.deepEqual(await dd(file, 47 * CHUNK, 4096), Buffer.alloc(4096, 47));
        await until(() => store.asked.length === 15, 'the chunks around chunk 47');
        assert.deepEqual(asked().slice(9), [46, 47, 48, 49, 50, 51]);
        assert.equal(img.stats().nearby, 13);
        assert.equal(img.stats().swept, 0);
        // The third miss starts the sweep: every chunk no run holds whole (21 and 41-45 are).
        assert.deepEqual(await dd(file, 60 * CHUNK, 4096), Buffer.alloc(4096, 60));
        await until(() => new Set(store.asked).size === 58, 'the sweep fetching every chunk no run holds whole');
        assert.deepEqual([21, 41, 42, 43, 44, 45].filter((i) => store.asked.includes(i)), []);
        assert.equal(store.asked.length, 58, 'each chunk fetched once');
        assert.equal(img.stats().nearby, 13, 'the sweep, not the neighbours, brings the rest');
      },
      3,
    );
  });
  it('a read of a region head takes its own chunk or the heads pack, whichever comes first', async () => {
    let release!: () => void;
    const slowChunk = 30;
    const store = countingStore({ chunk: slowChunk, until: new Promise<void>((resolve) => (release = resolve)) });
    const img = await open(store, 'e', undefined, mapped);
    try {
      const restorePack = await encodeRestorePack(3, { manifest: mapped.checksum, chunks: [coreChunk, pagemapChunk], runs: [] });
      await img.prefetch(undefined, { restore: readRestorePack(restorePack), activeset: Promise.resolve(undefined) });
      let deliver!: (b: Buffer) => void;
      img.fetchHeads(new Promise<Buffer>((resolve) => (deliver = resolve)).then(readRestorePack));
      const file = path.join(img.path, 'pages-1.img');
      // The pack is late (before, this read waited for it, up to PACK_WAIT_MS): the chunk answers.
      assert.deepEqual(await dd(file, 12 * CHUNK, 4096), Buffer.alloc(4096, 12));
      assert.ok(store.asked.includes(12), 'the head read fetched its chunk');
      // The chunk is late: the pack, once in, answers; the bytes tell which did.
      const reading = dd(file, slowChunk * CHUNK, 4096);
      await until(() => store.asked.includes(slowChunk), 'the head read fetching its chunk');
      deliver(await encodeRestorePack(3, { manifest: mapped.checksum, chunks: [], runs: [{ file: 'pages-1.img', offset: slowChunk * CHUNK, bytes: Buffer.alloc(CHUNK, 0xee) }] }));
      assert.deepEqual(await reading, Buffer.alloc(4096, 0xee), "the pack's bytes, while the chunk is still on its way");
    } finally {
      release();
      await img.close();
    }
  });
});
