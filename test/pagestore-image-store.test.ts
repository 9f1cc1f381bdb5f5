import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { isPicoError, PicoError } from '../shared/errors.js';
import {
  canonicalJson,
  checkManifest,
  chunkKey,
  ChunkedImageStore,
  manifestChecksum,
  manifestKey,
  parseManifest,
  sha256,
  storedChecksumHolds,
  type ChunkedImageStoreOptions,
} from '../pagestore/chunked-image-store.js';
import { DEFAULT_PAGE_CHUNKING, PAGE_SIZE, type PageChunking } from '../pagestore/chunker.js';
import { FsObjectStore } from '../pagestore/fs-store.js';
import { fileChunks, type ChunkRef, type ImageManifest, type ImageStore } from '../pagestore/image-store.js';
import { MemoryObjectStore, type StoreOp } from '../pagestore/memory-store.js';
import { until } from './helpers/poll.js';
import { collect, type ObjectInfo, type ObjectStore, type PutOptions } from '../pagestore/object-store.js';

// One ImageStore suite, run against the fs backend and the in-memory fake. Images are temp
// directories of files; every test makes its own store.

const KiB = 1024;
const MiB = 1024 * KiB;
const work = mkdtempSync(path.join(tmpdir(), 'pico-imagestore-'));
after(() => rmSync(work, { recursive: true, force: true }));
let seq = 0;
const fresh = (what: string) => path.join(work, `${what}-${++seq}`);

/** Forwards to another store, running `hook` first: lets a test pause any operation of the fs backend too. */
class HookedStore implements ObjectStore {
  hook: ((op: StoreOp, key: string) => void | Promise<void>) | undefined;
  constructor(readonly inner: ObjectStore) {}
  get location() {
    return this.inner.location;
  }
  async put(key: string, body: Buffer, options?: PutOptions): Promise<void> {
    await this.hook?.('put', key);
    return this.inner.put(key, body, options);
  }
  async get(key: string, into?: Buffer): Promise<Buffer> {
    await this.hook?.('get', key);
    return this.inner.get(key, into);
  }
  async head(key: string): Promise<ObjectInfo | undefined> {
    await this.hook?.('head', key);
    return this.inner.head(key);
  }
  async *list(prefix: string): AsyncIterable<string> {
    await this.hook?.('list', prefix);
    yield* this.inner.list(prefix);
  }
  async delete(key: string): Promise<void> {
    await this.hook?.('delete', key);
    return this.inner.delete(key);
  }
}

interface Backend {
  name: string;
  /** a new empty store, plus ways to damage it behind the image store's back */
  make(): {
    store: HookedStore;
    corrupt(key: string): void;
    remove(key: string): void;
    overwrite(key: string, body: Buffer): void;
    keys(): Promise<string[]>;
  };
}

const backends: Backend[] = [
  {
    name: 'fs',
    make() {
      const fs = new FsObjectStore({ root: fresh('store'), durable: false });
      return {
        store: new HookedStore(fs),
        corrupt(key) {
          const p = fs.pathOf(key);
          const b = readFileSync(p);
          b[b.length >> 1] ^= 0xff;
          writeFileSync(p, b);
        },
        remove(key) {
          rmSync(fs.pathOf(key));
        },
        overwrite(key, body) {
          writeFileSync(fs.pathOf(key), body);
        },
        keys: async () => (await collect(fs.list(''))).sort(),
      };
    },
  },
  {
    name: 'memory',
    make() {
      const mem = new MemoryObjectStore();
      return {
        store: new HookedStore(mem),
        corrupt: (key) => mem.corrupt(key),
        remove: (key) => void mem.remove(key),
        overwrite: (key, body) => mem.overwrite(key, body),
        keys: async () => mem.keys(),
      };
    },
  },
];

type Spec = Record<string, Buffer | { data: Buffer; mode: number }>;

/** Makes an image directory from `spec` (path → bytes, or bytes and mode). */
function imageDir(spec: Spec): string {
  const dir = fresh('img');
  mkdirSync(dir);
  for (const [rel, v] of Object.entries(spec)) {
    const p = path.join(dir, rel);
    mkdirSync(path.dirname(p), { recursive: true });
    const { data, mode } = Buffer.isBuffer(v) ? { data: v, mode: 0o644 } : v;
    writeFileSync(p, data);
    chmodSync(p, mode);
  }
  return dir;
}

/** Every file under `dir`: relative path → { bytes, mode }. */
function readTree(dir: string): Map<string, { data: Buffer; mode: number }> {
  const out = new Map<string, { data: Buffer; mode: number }>();
  const visit = (d: string, rel: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) visit(path.join(d, e.name), r);
      else out.set(r, { data: readFileSync(path.join(d, e.name)), mode: statSync(path.join(d, e.name)).mode & 0o7777 });
    }
  };
  visit(dir, '');
  return out;
}

function assertSameTree(actual: string, expected: string): void {
  const a = readTree(actual);
  const e = readTree(expected);
  assert.deepEqual([...a.keys()].sort(), [...e.keys()].sort());
  for (const [k, v] of e) {
    const got = a.get(k)!;
    assert.ok(got.data.equals(v.data), `content of ${k}`);
    assert.equal(got.mode.toString(8), v.mode.toString(8), `mode of ${k}`);
  }
}

async function rejectsWith(p: Promise<unknown>, code: string, ...patterns: RegExp[]): Promise<PicoError> {
  try {
    await p;
  } catch (err) {
    assert.ok(isPicoError(err), `expected a PicoError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    for (const re of patterns) assert.match(err.message, re);
    return err;
  }
  assert.fail(`expected rejection with ${code}`);
}

/** Opens a gate later: `wait()` blocks until `open()`. */
function gate() {
  let open!: () => void;
  const opened = new Promise<void>((r) => (open = r));
  return { open, wait: () => opened };
}

function chunkKeysOf(...manifests: ImageManifest[]): Set<string> {
  return new Set(manifests.flatMap((m) => m.files.flatMap((f) => f.chunks.map(chunkKey))));
}

// Most tests check the store's mechanics (dedup, repair, collection) by counting chunks: they
// cut fixed chunks of CHUNK bytes (min = max pages). The round trip and the format-2 tests use
// the default content-defined chunking.
const CHUNK = 64 * KiB;
const FIXED: Partial<PageChunking> = { minPages: CHUNK / PAGE_SIZE, maxPages: CHUNK / PAGE_SIZE };

for (const backend of backends) {
  describe(`ChunkedImageStore on the ${backend.name} store`, () => {
    const open = (opts: Partial<ChunkedImageStoreOptions> = {}) => {
      const b = backend.make();
      const images = new ChunkedImageStore({ store: b.store, chunking: FIXED, gcGraceMs: 0, collectEveryMs: 0, ...opts });
      return { ...b, images };
    };

    it('round-trips a directory: empty file, odd sizes, a 20 MB file, subdirectories, modes', async () => {
      const { images, store } = open({ chunking: undefined });
      const src = imageDir({
        'core-1.img': { data: randomBytes(3000), mode: 0o600 },
        'empty.img': Buffer.alloc(0),
        'one-chunk.img': randomBytes(MiB),
        'odd.img': randomBytes(MiB + MiB / 2 + 7),
        'pages-1.img': randomBytes(20 * MiB),
        'sub/dir/inventory.img': { data: randomBytes(100), mode: 0o400 },
        'x.img': { data: Buffer.from('exec'), mode: 0o755 },
      });
      const { manifest, stats } = await images.put('kv', src);
      assert.equal(manifest.generation, 1);
      assert.equal(manifest.format, 2);
      assert.equal(manifest.app, 'kv');
      assert.deepEqual(manifest.chunking, { kind: 'pages', ...DEFAULT_PAGE_CHUNKING });
      assert.equal(manifest.chunkSize, 256 * KiB);
      assert.deepEqual(
        manifest.files.map((f) => [f.path, f.size]),
        [
          ['core-1.img', 3000],
          ['empty.img', 0],
          ['odd.img', MiB + MiB / 2 + 7],
          ['one-chunk.img', MiB],
          ['pages-1.img', 20 * MiB],
          ['sub/dir/inventory.img', 100],
          ['x.img', 4],
        ],
      );
      // Files shorter than minPages pages are one chunk; an empty one has none.
      for (const [p, n] of [['core-1.img', 1], ['empty.img', 0], ['sub/dir/inventory.img', 1], ['x.img', 1]] as const) {
        assert.equal(manifest.files.find((f) => f.path === p)!.chunks.length, n, p);
      }
      // Content-defined chunks: page-aligned cuts, none over 64 pages, ~19 pages on average.
      for (const f of manifest.files) {
        const refs = fileChunks(manifest, f);
        assert.deepEqual(refs.map((r) => r.size), f.sizes);
        refs.forEach((r, i) => {
          assert.ok(r.size >= 1 && r.size <= 256 * KiB, `${f.path} chunk ${i}: ${r.size} bytes`);
          if (i < refs.length - 1) assert.equal(r.size % PAGE_SIZE, 0, `${f.path} chunk ${i} is whole pages`);
        });
      }
      const pages = manifest.files.find((f) => f.path === 'pages-1.img')!;
      const mean = pages.size / pages.chunks.length;
      assert.ok(mean > 60 * KiB && mean < 92 * KiB, `mean chunk ${mean} bytes`);
      const chunks = manifest.files.reduce((n, f) => n + f.chunks.length, 0);
      const total = 3000 + MiB + MiB + MiB / 2 + 7 + 20 * MiB + 100 + 4;
      assert.deepEqual(stats, { totalBytes: total, uploadedBytes: total, chunks, uploadedChunks: chunks });
      assert.equal(manifest.checksum, manifestChecksum(manifest));
      // What is stored is the canonical JSON, and parses back to the same manifest.
      const stored = await store.get(manifestKey('kv', 1));
      assert.equal(stored.toString(), canonicalJson(manifest));
      assert.deepEqual(parseManifest(stored, { app: 'kv', generation: 1 }), manifest);

      assert.deepEqual(await images.latest('kv'), manifest);
      const out = fresh('restore');
      await images.get(manifest, out);
      assertSameTree(out, src);
      assert.deepEqual(await images.apps(), [{ app: 'kv', generation: 1 }]);
    });

    it('dedups: the same directory again uploads nothing; one changed byte uploads one chunk', async () => {
      const { images, store } = open();
      const big = randomBytes(40 * CHUNK + 5);
      const src = imageDir({ 'pages-1.img': big, 'core.img': randomBytes(999), 'zero.img': Buffer.alloc(8 * CHUNK) });
      const first = await images.put('app', src);
      // 8 chunks of zeros are one chunk: uploaded once.
      assert.equal(first.stats.chunks, 41 + 1 + 8);
      assert.equal(first.stats.uploadedChunks, 41 + 1 + 1);
      assert.equal(first.stats.uploadedBytes, big.length + 999 + CHUNK);

      const puts: string[] = [];
      store.hook = (op, key) => void (op === 'put' && puts.push(key));
      const again = await images.put('app', src);
      assert.equal(again.manifest.generation, 2);
      assert.equal(again.stats.uploadedBytes, 0);
      assert.equal(again.stats.totalBytes, first.stats.totalBytes);
      assert.deepEqual(puts, [manifestKey('app', 2)]);

      big[17 * CHUNK + 3] ^= 1;
      writeFileSync(path.join(src, 'pages-1.img'), big);
      puts.length = 0;
      const changed = await images.put('app', src);
      assert.equal(changed.stats.uploadedBytes, CHUNK);
      assert.equal(changed.stats.uploadedChunks, 1);
      assert.deepEqual(puts, [chunkKey(changed.manifest.files[1]!.chunks[17]!), manifestKey('app', 3)]);
      const out = fresh('restore');
      await images.get(changed.manifest, out);
      assertSameTree(out, src);
    });

    it('latest(app, expected): the expected manifest is read while the listing is out; a wrong guess still gives the newest', async () => {
      const b = open();
      const { images } = b;
      const v = imageDir({ 'a.img': randomBytes(2 * CHUNK) });
      for (let i = 0; i < 3; i++) await images.put('app', v);
      // The listing waits until the manifest of generation 3 was asked for: one round trip, not two.
      let asked = false;
      b.store.hook = async (op, key) => {
        if (op === 'get' && key === manifestKey('app', 3)) asked = true;
        if (op === 'list') await until(() => asked, 'the expected manifest to be read beside the listing');
      };
      assert.equal((await images.latest('app', 3))!.generation, 3);
      b.store.hook = undefined;
      for (const guess of [1, 2, 4, 99, 0, -1, 1.5]) assert.equal((await images.latest('app', guess))!.generation, 3, `guess ${guess}`);
      // The guess is the newest but does not verify: the one before it is the answer.
      b.corrupt(manifestKey('app', 3));
      assert.equal((await images.latest('app', 3))!.generation, 2);
      assert.equal(await images.latest('none', 1), undefined);
    });

    it('lookup(app, expected): the expected manifest settles while the listing is held; newest is latest()\'s answer', async () => {
      const b = open();
      const { images } = b;
      const v = imageDir({ 'a.img': randomBytes(2 * CHUNK) });
      for (let i = 0; i < 3; i++) await images.put('app', v);
      let release: (() => void) | undefined;
      b.store.hook = async (op) => {
        if (op === 'list') await new Promise<void>((resolve) => (release = resolve));
      };
      const l = images.lookup('app', 2);
      let listed = false;
      void l.newest.then(() => (listed = true));
      assert.equal((await l.expected)!.generation, 2, 'the expected manifest, while the listing is out');
      assert.equal(listed, false);
      await until(() => release !== undefined, 'the listing to be asked for');
      release!();
      assert.equal((await l.newest)!.generation, 3, 'the listing decides: 3 is the newest');
      b.store.hook = undefined;
      assert.equal(await images.lookup('app', 4).expected, undefined, 'a generation not stored');
      assert.equal((await images.lookup('app', 4).newest)!.generation, 3);
      assert.equal(await images.lookup('app', 0).expected, undefined, 'not a generation');
      b.corrupt(manifestKey('app', 3));
      const corrupt = images.lookup('app', 3);
      assert.equal(await corrupt.expected, undefined, 'a manifest that does not verify is never the expected one');
      assert.equal((await corrupt.newest)!.generation, 2);
    });

    it('numbers generations upward and never changes a stored one', async () => {
      const b = open();
      const { images } = b;
      const v1 = imageDir({ 'a.img': randomBytes(3 * CHUNK) });
      const v2 = imageDir({ 'a.img': randomBytes(3 * CHUNK), 'b.img': randomBytes(10) });
      const g1 = await images.put('app', v1);
      const m1bytes = await b.store.get(manifestKey('app', 1));
      const g2 = await images.put('app', v2);
      const g3 = await images.put('app', v1);
      assert.deepEqual([g1, g2, g3].map((r) => r.manifest.generation), [1, 2, 3]);
      assert.ok((await b.store.get(manifestKey('app', 1))).equals(m1bytes));
      assert.equal((await images.latest('app'))!.generation, 3);
      // Each generation restores its own content.
      for (const [m, src] of [[g1.manifest, v1], [g2.manifest, v2], [g3.manifest, v1]] as const) {
        const out = fresh('restore');
        await images.get(m, out);
        assertSameTree(out, src);
      }
      // Another app's generations are its own.
      assert.equal((await images.put('other', v2)).manifest.generation, 1);
      assert.deepEqual(await images.apps(), [{ app: 'app', generation: 3 }, { app: 'other', generation: 1 }]);
      // Concurrent puts of one app get distinct generations.
      const [a, c] = await Promise.all([images.put('app', v1), images.put('app', v2)]);
      assert.deepEqual([a.manifest.generation, c.manifest.generation].sort(), [4, 5]);
    });

    it('a flipped byte in a chunk: get rejects PICO_ERR_IMAGE_CORRUPT naming app, generation, file, chunk; nothing partial is left', async () => {
      const b = open();
      const src = imageDir({ 'a.img': randomBytes(5 * CHUNK), 'b.img': randomBytes(7 * CHUNK + 1), 'sub/c.img': randomBytes(10) });
      const { manifest } = await b.images.put('web', src);
      const bad = manifest.files[1]!.chunks[4]!;
      b.corrupt(chunkKey(bad));

      // Into a directory that does not exist yet: it is not left behind.
      const out = fresh('restore');
      await rejectsWith(b.images.get(manifest, out), 'PICO_ERR_IMAGE_CORRUPT', /app "web"/, /generation 1/, /file b\.img/, new RegExp(`chunk 4 \\(${bad}\\)`));
      assert.equal(existsSync(out), false);

      // Into an existing directory: only what was there before remains.
      const existing = fresh('restore');
      mkdirSync(existing);
      writeFileSync(path.join(existing, 'keep'), 'x');
      await rejectsWith(b.images.get(manifest, existing), 'PICO_ERR_IMAGE_CORRUPT');
      assert.deepEqual(readdirSync(existing), ['keep']);

      // A later put of the same bytes does not reference the damaged chunk again: its read-back
      // finds it and writes it again from the image directory, which repairs generation 1 too.
      const again = await b.images.put('web', src);
      assert.equal(again.manifest.generation, 2);
      assert.equal(again.stats.uploadedChunks, 1);
      assert.equal(again.stats.uploadedBytes, CHUNK);
      const repaired = fresh('restore');
      await b.images.get(manifest, repaired);
      assertSameTree(repaired, src);
    });

    it('a missing chunk: get rejects PICO_ERR_IMAGE_MISSING; prune keeps older generations', async () => {
      const b = open();
      const v1 = imageDir({ 'a.img': randomBytes(2 * CHUNK) });
      const v2 = imageDir({ 'a.img': randomBytes(2 * CHUNK) });
      await b.images.put('app', v1);
      const { manifest } = await b.images.put('app', v2);
      b.remove(chunkKey(manifest.files[0]!.chunks[1]!));
      const out = fresh('restore');
      await rejectsWith(b.images.get(manifest, out), 'PICO_ERR_IMAGE_MISSING', /app "app" generation 2, file a\.img, chunk 1/);
      assert.equal(existsSync(out), false);
      // Generation 2 is not verified (a chunk is gone): prune must not delete generation 1 for it.
      const stats = await b.images.prune('app');
      assert.deepEqual(stats.deletedGenerations, []);
      assert.deepEqual((await b.images.generations('app')).map((g) => g.generation), [2, 1]);
      const again = fresh('restore');
      await b.images.get(await readManifest(b.store, 'app', 1), again);
      assertSameTree(again, v1);
    });

    it('a corrupt manifest: latest() falls back to the previous good generation; its number is never reused', async () => {
      const b = open();
      const v1 = imageDir({ 'a.img': randomBytes(CHUNK) });
      const v2 = imageDir({ 'a.img': randomBytes(CHUNK) });
      await b.images.put('app', v1);
      await b.images.put('app', v2);
      b.corrupt(manifestKey('app', 2));
      assert.equal((await b.images.latest('app'))!.generation, 1);
      const gens = await b.images.generations('app');
      assert.deepEqual(gens.map((g) => [g.generation, g.ok]), [[2, false], [1, true]]);
      assert.deepEqual(await b.images.apps(), [{ app: 'app', generation: 1 }]);

      // Garbage, a valid manifest with a wrong checksum, and one naming another generation.
      b.overwrite(manifestKey('app', 2), Buffer.from('{"format":1,'));
      assert.equal((await b.images.latest('app'))!.generation, 1);
      const m1 = await readManifest(b.store, 'app', 1);
      b.overwrite(manifestKey('app', 2), Buffer.from(canonicalJson({ ...m1, generation: 2 })));
      assert.equal((await b.images.latest('app'))!.generation, 1);
      b.overwrite(manifestKey('app', 2), Buffer.from(canonicalJson(m1)));
      assert.equal((await b.images.latest('app'))!.generation, 1);

      const { manifest } = await b.images.put('app', v2);
      assert.equal(manifest.generation, 3);
      assert.equal((await b.images.latest('app'))!.generation, 3);
      // A tampered manifest handed to get() is refused before anything is read.
      await rejectsWith(b.images.get({ ...manifest, files: [] }, fresh('restore')), 'PICO_ERR_IMAGE_CORRUPT', /checksum/);
      // An unsafe path is refused even with a matching checksum.
      const evilDraft = { ...manifest, files: [{ ...manifest.files[0]!, path: '../escape.img' }] };
      const evil = { ...evilDraft, checksum: manifestChecksum(evilDraft) };
      await rejectsWith(b.images.get(evil, fresh('restore')), 'PICO_ERR_IMAGE_CORRUPT', /unsafe path/);
      assert.equal(existsSync(path.join(work, 'escape.img')), false);
    });

    it('a store failing mid-put: PICO_ERR_STORE, and latest() still shows only the previous generation', async () => {
      const b = open();
      const v1 = imageDir({ 'a.img': randomBytes(3 * CHUNK) });
      const v2 = imageDir({ 'a.img': randomBytes(30 * CHUNK) });
      await b.images.put('app', v1);
      let puts = 0;
      b.store.hook = (op, key) => {
        if (op === 'put' && ++puts === 12) throw new PicoError('PICO_ERR_STORE', `injected failure writing ${key} (ENOSPC)`);
      };
      await rejectsWith(b.images.put('app', v2), 'PICO_ERR_STORE', /storing app "app" generation 2/, /ENOSPC/);
      b.store.hook = undefined;
      assert.equal((await b.images.latest('app'))!.generation, 1);
      assert.equal(await b.store.head(manifestKey('app', 2)), undefined);
      // The manifest write failing is just as invisible.
      b.store.hook = (op, key) => {
        if (op === 'put' && key.startsWith('apps/')) throw new PicoError('PICO_ERR_STORE', 'injected EROFS');
      };
      await rejectsWith(b.images.put('app', v2), 'PICO_ERR_STORE', /EROFS/);
      b.store.hook = undefined;
      assert.equal((await b.images.latest('app'))!.generation, 1);
      // The next put works, and finds the chunks the failed ones left.
      const ok = await b.images.put('app', v2);
      assert.equal(ok.manifest.generation, 2);
      assert.equal(ok.stats.uploadedBytes, 0);
    });

    it('read-back after the manifest is written: a manifest that does not read back is deleted again; a vanished chunk is written again', async () => {
      const b = open();
      const v1 = imageDir({ 'a.img': randomBytes(2 * CHUNK) });
      await b.images.put('app', v1);
      const v2 = imageDir({ 'a.img': randomBytes(2 * CHUNK) });
      b.store.hook = (op, key) => {
        if (op === 'get' && key === manifestKey('app', 2)) b.corrupt(key);
      };
      await rejectsWith(b.images.put('app', v2), 'PICO_ERR_IMAGE_CORRUPT', /read-back verification/, /generation 2/);
      assert.equal(await b.store.head(manifestKey('app', 2)), undefined);
      assert.equal((await b.images.latest('app'))!.generation, 1);

      // A chunk deleted (by a collection in another process) after the manifest went in.
      let victim: string | undefined;
      b.store.hook = (op, key) => {
        if (op === 'put' && key.startsWith('chunks/')) victim ??= key;
        if (op === 'get' && key === manifestKey('app', 2) && victim) b.remove(victim);
      };
      const v3 = imageDir({ 'a.img': randomBytes(2 * CHUNK) });
      const { manifest, stats } = await b.images.put('app', v3);
      b.store.hook = undefined;
      assert.equal(manifest.generation, 2);
      assert.equal(stats.uploadedChunks, 3);
      const out = fresh('restore');
      await b.images.get(manifest, out);
      assertSameTree(out, v3);
    });

    it('prune keeps the newest generation, collects orphaned chunks, and keeps chunks another app uses', async () => {
      const b = open();
      const shared = randomBytes(4 * CHUNK);
      const v1 = imageDir({ 'a.img': shared, 'b.img': randomBytes(3 * CHUNK) });
      const v2 = imageDir({ 'a.img': randomBytes(4 * CHUNK), 'b.img': randomBytes(3 * CHUNK) });
      const v3 = imageDir({ 'a.img': randomBytes(4 * CHUNK), 'b.img': randomBytes(CHUNK) });
      const other = imageDir({ 'x.img': shared });
      await b.images.put('app', v1);
      await b.images.put('app', v2);
      const { manifest: m3 } = await b.images.put('app', v3);
      const { manifest: mo } = await b.images.put('other', other);
      const before = await b.keys();

      const stats = await b.images.prune('app');
      assert.deepEqual(stats.deletedGenerations.sort(), [1, 2]);
      const chunks = (await b.keys()).filter((k) => k.startsWith('chunks/'));
      assert.deepEqual(new Set(chunks), chunkKeysOf(m3, mo));
      assert.equal(stats.deletedChunks, before.filter((k) => k.startsWith('chunks/')).length - chunks.length);
      assert.equal(stats.deletedChunks, 3 + 7); // b.img of v1, all of v2
      assert.equal(stats.freedBytes, 10 * CHUNK);
      assert.deepEqual((await b.images.generations('app')).map((g) => g.generation), [3]);

      for (const [app, m, src] of [['app', m3, v3], ['other', mo, other]] as const) {
        assert.deepEqual(await b.images.latest(app), m);
        const out = fresh('restore');
        await b.images.get(m, out);
        assertSameTree(out, src);
      }
      // Nothing more to do the second time.
      assert.deepEqual(await b.images.prune('app'), { deletedGenerations: [], deletedChunks: 0, freedBytes: 0 });
    });

    it('prune collects at most once per collectEveryMs unless asked to', async () => {
      let now = 1_000_000;
      const b = open({ collectEveryMs: 60_000, now: () => now });
      await b.images.put('app', imageDir({ 'a.img': randomBytes(2 * CHUNK) }));
      await b.images.put('app', imageDir({ 'a.img': randomBytes(2 * CHUNK) }));
      const lists: string[] = [];
      b.store.hook = (op, key) => void (op === 'list' && lists.push(key));
      assert.equal((await b.images.prune('app')).deletedChunks, 2);
      assert.ok(lists.includes('chunks/'));
      await b.images.put('app', imageDir({ 'a.img': randomBytes(2 * CHUNK) }));
      lists.length = 0;
      const second = await b.images.prune('app');
      assert.deepEqual([second.deletedGenerations, second.deletedChunks], [[2], 0]);
      assert.ok(!lists.includes('chunks/'), 'collected again within collectEveryMs');
      assert.equal((await b.images.prune('app', { collect: true })).deletedChunks, 2);
      now += 60_000;
      await b.images.put('app', imageDir({ 'a.img': randomBytes(2 * CHUNK) }));
      assert.equal((await b.images.prune('app')).deletedChunks, 2);
    });

    it('prune leaves orphaned chunks younger than the grace period', async () => {
      const b = open({ gcGraceMs: 60_000 });
      const v1 = imageDir({ 'a.img': randomBytes(2 * CHUNK) });
      const v2 = imageDir({ 'a.img': randomBytes(2 * CHUNK) });
      await b.images.put('app', v1);
      await b.images.put('app', v2);
      const before = await b.keys();
      const stats = await b.images.prune('app');
      assert.deepEqual(stats.deletedGenerations, [1]);
      assert.equal(stats.deletedChunks, 0);
      assert.equal((await b.keys()).length, before.length - 1);
      // Later, past the grace period, they go.
      const later = new ChunkedImageStore({ store: b.store, chunking: FIXED, gcGraceMs: 60_000, collectEveryMs: 0, now: () => Date.now() + 120_000 });
      assert.equal((await later.prune('app')).deletedChunks, 2);
    });

    it('a put whose chunks prune is about to collect (dedup hit, manifest not yet written) loses nothing', async () => {
      const b = open();
      const v1 = imageDir({ 'a.img': randomBytes(6 * CHUNK) });
      const v2 = imageDir({ 'a.img': randomBytes(6 * CHUNK) });
      await b.images.put('app', v1);
      await b.images.put('app', v2);
      await b.images.prune('app', { collect: false }); // generation 1 gone; its chunks are orphans now

      // Pause the collection right after it listed the manifests, i.e. before it looks at chunks.
      const listedManifests = gate();
      const resumeCollection = gate();
      // Pause the put just before it writes its manifest (all its chunks found stored already).
      const putAtManifest = gate();
      const resumePut = gate();
      b.store.hook = async (op, key) => {
        if (op === 'list' && key === 'chunks/') {
          listedManifests.open();
          await resumeCollection.wait();
        }
        if (op === 'put' && key === manifestKey('late', 1)) {
          putAtManifest.open();
          await resumePut.wait();
        }
      };
      const pruning = b.images.prune('app');
      await listedManifests.wait();
      const putting = b.images.put('late', v1); // the same bytes as the orphaned generation 1
      await putAtManifest.wait();
      resumeCollection.open();
      const stats = await pruning;
      assert.equal(stats.deletedChunks, 0, 'the chunks the put relies on were collected');
      resumePut.open();
      const { manifest, stats: putStats } = await putting;
      assert.equal(putStats.uploadedBytes, 0);
      b.store.hook = undefined;
      const out = fresh('restore');
      await b.images.get(manifest, out);
      assertSameTree(out, v1);
    });

    it('a put that finishes while a collection runs keeps its chunks', async () => {
      const b = open();
      const v1 = imageDir({ 'a.img': randomBytes(6 * CHUNK) });
      const v2 = imageDir({ 'a.img': randomBytes(6 * CHUNK) });
      await b.images.put('app', v1);
      await b.images.put('app', v2);
      await b.images.prune('app', { collect: false });
      const listed = gate();
      const resume = gate();
      b.store.hook = async (op, key) => {
        if (op === 'list' && key === 'chunks/') {
          listed.open();
          await resume.wait();
        }
      };
      const pruning = b.images.prune('other');
      await listed.wait();
      // The put registers, dedups against the orphans, writes its manifest and releases, all
      // while the collection holds a manifest listing that predates it.
      const { manifest } = await b.images.put('late', v1);
      resume.open();
      assert.equal((await pruning).deletedChunks, 0);
      b.store.hook = undefined;
      const out = fresh('restore');
      await b.images.get(manifest, out);
      assertSameTree(out, v1);
      // Once no put needs them... they are referenced by `late` now, so they stay for good.
      assert.equal((await b.images.prune('app')).deletedChunks, 0);
    });

    it('a put of chunks whose deletion is in flight waits for it, then uploads them again', async () => {
      const b = open();
      const orphan = randomBytes(4 * CHUNK);
      await b.images.put('app', imageDir({ 'a.img': orphan }));
      await b.images.put('app', imageDir({ 'a.img': randomBytes(4 * CHUNK) }));
      await b.images.prune('app', { collect: false });
      // Hold every deletion of the collection until the put is waiting on them.
      let deletes = 0;
      const resume = gate();
      const extra = randomBytes(100);
      const extraKey = chunkKey(sha256(extra));
      let putReachedExtra = false;
      b.store.hook = async (op, key) => {
        if (op === 'delete') {
          deletes++;
          await resume.wait();
        }
        if (op === 'head' && key === extraKey) putReachedExtra = true;
      };
      const pruning = b.images.prune('app');
      await until(() => deletes === 4, 'the collection to delete the 4 orphaned chunks');
      // The put needs the 4 chunks being deleted (a.img), then one more (z.img): once it heads
      // z.img's chunk, it has registered all of a.img's and is waiting for their deletion.
      const src = imageDir({ 'a.img': orphan, 'z.img': extra });
      const putting = b.images.put('late', src);
      await until(() => putReachedExtra, 'the put to reach z.img');
      resume.open();
      assert.equal((await pruning).deletedChunks, 4);
      const { manifest, stats } = await putting;
      assert.equal(stats.uploadedChunks, 5, 'the deleted chunks were uploaded again');
      b.store.hook = undefined;
      const out = fresh('restore');
      await b.images.get(manifest, out);
      assertSameTree(out, src);
    });

    it('puts and prunes of many apps at once: every newest generation stays restorable', async () => {
      const b = open({ concurrency: 4 });
      const pool = Array.from({ length: 12 }, () => randomBytes(CHUNK));
      const pick = (n: number) => Buffer.concat(Array.from({ length: n }, () => pool[Math.floor(Math.random() * pool.length)]!));
      const apps = ['a', 'b', 'c', 'd'];
      const expected = new Map<string, string>();
      await Promise.all(
        apps.map(async (app) => {
          for (let round = 0; round < 6; round++) {
            const src = imageDir({ 'pages.img': pick(3), 'core.img': pick(1) });
            await b.images.put(app, src);
            expected.set(app, src);
            await b.images.prune(apps[(round + app.charCodeAt(0)) % apps.length]!);
          }
        }),
      );
      for (const app of apps) {
        const m = await b.images.latest(app);
        assert.ok(m, app);
        const out = fresh('restore');
        await b.images.get(m, out);
        assertSameTree(out, expected.get(app)!);
      }
    });

    it('refuses what it cannot store faithfully', async () => {
      const b = open();
      await rejectsWith(b.images.put('../x', imageDir({})), 'PICO_ERR_STORE', /invalid app name/);
      await rejectsWith(b.images.latest('a/b'), 'PICO_ERR_STORE', /invalid app name/);
      await rejectsWith(b.images.put('app', fresh('nonexistent')), 'PICO_ERR_CHECKPOINT_FAILED', /cannot read image directory/);
      const withLink = imageDir({ 'a.img': Buffer.from('x') });
      execFileSync('ln', ['-s', 'a.img', path.join(withLink, 'link.img')]);
      await rejectsWith(b.images.put('app', withLink), 'PICO_ERR_CHECKPOINT_FAILED', /link\.img is not a regular file/);
      await rejectsWith(b.images.put('app', imageDir({ 'sub/.pico-partial-x': Buffer.from('x') })), 'PICO_ERR_CHECKPOINT_FAILED', /cannot store a file named/);
      assert.equal(await b.images.latest('app'), undefined);
      assert.deepEqual(await b.images.apps(), []);
      // An empty image directory is a valid (empty) image.
      const { manifest } = await b.images.put('app', imageDir({}));
      assert.deepEqual(manifest.files, []);
    });
  });
}

async function readManifest(store: ObjectStore, app: string, generation: number): Promise<ImageManifest> {
  return parseManifest(await store.get(manifestKey(app, generation)), { app, generation });
}

describe('ChunkedImageStore on a real unwritable or full directory', () => {
  const isRoot = process.getuid?.() === 0;
  let mnt: string | undefined;
  before(() => {
    if (!isRoot) return;
    const d = fresh('mnt');
    mkdirSync(d);
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', d], { stdio: 'ignore' });
      mnt = d;
    } catch {
      // no mount permission: the EROFS/ENOSPC cases fall back to chmod/ENOTDIR below
    }
  });
  after(() => {
    if (mnt) execFileSync('umount', [mnt]);
  });

  it('a store path under a regular file (ENOTDIR): put rejects PICO_ERR_STORE naming path and errno', async () => {
    const file = fresh('file');
    writeFileSync(file, 'not a directory');
    const images = new ChunkedImageStore({ store: new FsObjectStore({ root: path.join(file, 'store') }), chunking: FIXED, gcGraceMs: 0, collectEveryMs: 0 });
    const err = await rejectsWith(images.put('app', imageDir({ 'a.img': randomBytes(100) })), 'PICO_ERR_STORE', /ENOTDIR/, new RegExp(file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')));
    assert.ok(err.message.length > 0);
    assert.equal(await images.latest('app'), undefined);
  });

  it('a read-only store (EROFS; chmod 0555 when not root): put rejects PICO_ERR_STORE, the previous generation stays latest', async (t) => {
    let root: string;
    let makeReadOnly: () => void;
    if (mnt) {
      root = path.join(mnt, 'ro');
      makeReadOnly = () => execFileSync('mount', ['-o', 'remount,ro', mnt!]);
    } else if (!isRoot) {
      root = fresh('store');
      makeReadOnly = () => execFileSync('chmod', ['-R', 'a-w', root]);
    } else {
      t.skip('root without mount permission: no way to make a directory unwritable');
      return;
    }
    const images = new ChunkedImageStore({ store: new FsObjectStore({ root }), chunking: FIXED, gcGraceMs: 0, collectEveryMs: 0 });
    const v1 = imageDir({ 'a.img': randomBytes(2 * CHUNK) });
    await images.put('app', v1);
    makeReadOnly();
    try {
      await rejectsWith(images.put('app', imageDir({ 'a.img': randomBytes(2 * CHUNK) })), 'PICO_ERR_STORE', mnt ? /EROFS/ : /EACCES/, /storing app "app" generation 2/);
      assert.equal((await images.latest('app'))!.generation, 1);
      const out = fresh('restore');
      await images.get((await images.latest('app'))!, out);
      assertSameTree(out, v1);
    } finally {
      if (mnt) execFileSync('mount', ['-o', 'remount,rw', mnt]);
      else execFileSync('chmod', ['-R', 'u+w', root]);
    }
  });

  it('a full store (ENOSPC): put rejects PICO_ERR_STORE and leaves no temp files', async (t) => {
    if (!mnt) {
      t.skip('needs root to mount a small tmpfs');
      return;
    }
    const root = path.join(mnt, 'full');
    const fs = new FsObjectStore({ root });
    const images = new ChunkedImageStore({ store: fs, chunking: FIXED, gcGraceMs: 0, collectEveryMs: 0 });
    await rejectsWith(images.put('app', imageDir({ 'a.img': randomBytes(6 * MiB) })), 'PICO_ERR_STORE', /ENOSPC/);
    assert.equal(await images.latest('app'), undefined);
    const leftovers = execFileSync('find', [root, '-name', '.pico-tmp-*']).toString();
    assert.equal(leftovers, '');
    // Collecting what the failed put left frees the space again.
    const stats = await images.prune('app');
    assert.ok(stats.deletedChunks > 0);
    assert.deepEqual(await collect(fs.list('')), []);
  });
});

/** Deterministic bytes: mulberry32 seeded with `seed`. */
function seededBytes(bytes: number, seed: number): Buffer {
  const out = Buffer.alloc(bytes);
  let s = seed >>> 0;
  for (let i = 0; i + 4 <= bytes; i += 4) {
    s = (s + 0x6d2b79f5) | 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    out.writeUInt32LE((t ^ (t >>> 14)) >>> 0, i);
  }
  return out;
}

describe('image format 2 and the formats before it', () => {
  const open = (opts: Partial<ChunkedImageStoreOptions> = {}) => {
    const store = new MemoryObjectStore();
    return { store, images: new ChunkedImageStore({ store, gcGraceMs: 0, collectEveryMs: 0, ...opts }) };
  };

  /** Stores `files` the way the format-1 code did: fixed `chunkSize` chunks, manifest by hand. */
  async function putFormat1(store: ObjectStore, app: string, generation: number, chunkSize: number, files: Record<string, Buffer>): Promise<ImageManifest> {
    const list: ImageManifest['files'] = [];
    for (const [p, data] of Object.entries(files).sort(([a], [b]) => (a < b ? -1 : 1))) {
      const chunks: string[] = [];
      for (let o = 0; o < data.length; o += chunkSize) {
        const chunk = data.subarray(o, o + chunkSize);
        chunks.push(sha256(chunk));
        await store.put(chunkKey(sha256(chunk)), Buffer.from(chunk));
      }
      list.push({ path: p, size: data.length, mode: 0o644, chunks });
    }
    const draft = { format: 1, app, generation, createdAt: '2025-01-01T00:00:00.000Z', chunkSize, files: list };
    const m: ImageManifest = { ...draft, checksum: manifestChecksum(draft) };
    await store.put(manifestKey(app, generation), Buffer.from(canonicalJson(m)), { exclusive: true });
    return m;
  }

  it('a format-1 image written by the old code is still read, restored, kept by prune until a newer one verifies', async () => {
    const { store, images } = open();
    const files = { 'pages-1.img': seededBytes(3 * MiB + 5000, 1), 'core-1.img': seededBytes(3000, 2), 'empty.img': Buffer.alloc(0) };
    const src = imageDir(files);
    const old = await putFormat1(store, 'legacy', 1, MiB, files);
    assert.deepEqual(await images.latest('legacy'), old);
    assert.deepEqual(
      fileChunks(old, old.files.find((f) => f.path === 'pages-1.img')!).map((c) => [c.offset, c.size]),
      [[0, MiB], [MiB, MiB], [2 * MiB, MiB], [3 * MiB, 5000]],
    );
    const out = fresh('restore');
    await images.get(old, out);
    assertSameTree(out, src);
    // Prune verifies a format-1 generation's chunks by their fixed sizes: nothing to delete.
    assert.deepEqual((await images.prune('legacy', { collect: true })).deletedGenerations, []);
    assert.equal((await images.prune('legacy', { collect: true })).deletedChunks, 0);
    // The next checkpoint is format 2; then the format-1 generation and its chunks go.
    const { manifest } = await images.put('legacy', src);
    assert.deepEqual([manifest.format, manifest.generation], [2, 2]);
    const pruned = await images.prune('legacy', { collect: true });
    assert.deepEqual(pruned.deletedGenerations, [1]);
    assert.deepEqual(new Set(await store.keys()), new Set([manifestKey('legacy', 2), ...chunkKeysOf(manifest)]));
    const again = fresh('restore');
    await images.get(manifest, again);
    assertSameTree(again, src);
  });

  it('checkManifest: reads formats 1 and 2, refuses anything else or chunk sizes that do not fit', async () => {
    const { images } = open();
    const src = imageDir({ 'a.img': seededBytes(600 * KiB + 7, 3), 'b.img': seededBytes(10, 4) });
    const { manifest } = await images.put('app', src);
    assert.equal(checkManifest(manifest), manifest);
    const resealed = (m: Record<string, unknown>) => ({ ...m, checksum: manifestChecksum(m as unknown as ImageManifest) });
    const tamper = (change: (m: ImageManifest) => unknown): unknown => {
      const m = structuredClone(manifest) as ImageManifest;
      change(m);
      return resealed(m as unknown as Record<string, unknown>);
    };
    const cases: Array<[unknown, RegExp]> = [
      [tamper((m) => (m.format = 3)), /unsupported format 3 \(this version reads 1, 2\)/],
      [tamper((m) => (m.format = 0)), /unsupported format 0/],
      [tamper((m) => delete m.files[0]!.sizes), /chunk sizes do not match/],
      [tamper((m) => m.files[0]!.sizes!.pop()), /chunk sizes do not match/],
      [tamper((m) => (m.files[0]!.sizes![0]! += 1)), /do not cover/],
      [tamper((m) => { m.files[1]!.sizes = [0]; m.files[1]!.size = 0; }), /bad chunk size 0/],
      [tamper((m) => { m.files[1]!.sizes = [300 * KiB]; m.files[1]!.size = 300 * KiB; }), /bad chunk size 307200/],
      [tamper((m) => (m.chunkSize = MiB)), /not the chunking's largest chunk/],
      [tamper((m) => delete m.chunking), /bad chunking/],
      [tamper((m) => (m.chunking = { kind: 'pages', minPages: 8, avgPages: 16, maxPages: 4 })), /bad chunking: maxPages must be >= minPages/],
      [tamper((m) => ((m.chunking as { kind: string }).kind = 'bytes')), /bad chunking/],
      [tamper((m) => (m.format = 1)), /format 1 has no chunking/],
    ];
    for (const [value, re] of cases) {
      assert.throws(() => checkManifest(value), (err: unknown) => isPicoError(err, 'PICO_ERR_IMAGE_CORRUPT') && re.test(err.message), re.source);
    }
    // A format-1 manifest carrying format-2 sizes is refused too.
    const f1 = resealed({ ...manifest, format: 1, chunking: undefined, chunkSize: MiB });
    assert.throws(() => checkManifest(f1), /format 1 has no chunk sizes/);
  });

  it('parseManifest checks the checksum on the stored text, and judges other layouts and changed bytes as before', async () => {
    const { images } = open();
    const { manifest } = await images.put('app', imageDir({ 'a.img': seededBytes(600 * KiB + 7, 5), 'b.img': seededBytes(10, 6) }));
    const stored = canonicalJson(manifest);
    const { checksum, ...rest } = manifest;
    const member = `"checksum":"${checksum}"`;
    assert.equal(storedChecksumHolds(stored, checksum), true);
    assert.deepEqual(parseManifest(Buffer.from(stored)), manifest);
    // The member last, or the only one: the text still holds it.
    const last = `${canonicalJson(rest).slice(0, -1)},${member}}`;
    assert.equal(storedChecksumHolds(last, checksum), true);
    assert.deepEqual(parseManifest(Buffer.from(last)), manifest);
    assert.equal(storedChecksumHolds(`{${member}}`, sha256('{}')), false, 'another checksum');
    // Another layout of the same manifest: not on the text, but the canonical form verifies.
    const pretty = JSON.stringify(manifest, null, 2);
    assert.equal(storedChecksumHolds(pretty, checksum), false);
    assert.deepEqual(parseManifest(Buffer.from(pretty)), manifest);
    // Changed bytes fail both ways: a value, two chunks swapped, the member moved into a nested object.
    const bad = (text: string, re: RegExp) =>
      assert.throws(() => parseManifest(Buffer.from(text)), (err: unknown) => isPicoError(err, 'PICO_ERR_IMAGE_CORRUPT') && re.test(err.message), text.slice(0, 80));
    bad(stored.replace('"a.img"', '"c.img"'), /checksum mismatch/);
    const [h0, h1] = manifest.files.find((f) => f.path === 'a.img')!.chunks;
    bad(stored.replace(h0!, 'X').replace(h1!, h0!).replace('X', h1!), /checksum mismatch/);
    bad(stored.replace(`${member},`, '').replace('"chunking":{', `"chunking":{${member},`), /no checksum/);
  });

  it('fileChunks: offsets and sizes cover each file exactly, for format 1, format 2 and whole-file chunks', async () => {
    const { images } = open();
    const sizes = [0, 1, PAGE_SIZE, PAGE_SIZE + 1, 5 * MiB + 123];
    const src = imageDir(Object.fromEntries(sizes.map((n, i) => [`f${i}.img`, seededBytes(n, 10 + i)])));
    const { manifest } = await images.put('app', src);
    const f1 = { format: 1, app: 'app', generation: 1, createdAt: 'x', chunkSize: MiB, checksum: 'x' };
    const whole = { ...f1, chunkSize: 0 };
    for (const f of manifest.files) {
      const data = readFileSync(path.join(src, f.path));
      const check = (refs: ChunkRef[], what: string) => {
        let at = 0;
        for (const r of refs) {
          assert.equal(r.offset, at, `${what} ${f.path}: no gap`);
          assert.ok(r.size >= 1, `${what} ${f.path}: no empty chunk`);
          assert.equal(sha256(data.subarray(r.offset, r.offset + r.size)), r.hash, `${what} ${f.path}: the chunk's bytes`);
          at += r.size;
        }
        assert.equal(at, f.size, `${what} ${f.path}: covers the file`);
      };
      check(fileChunks(manifest, f), 'format 2');
      const fixed = [];
      for (let o = 0; o < data.length; o += MiB) fixed.push(sha256(data.subarray(o, o + MiB)));
      check(fileChunks({ ...f1, files: [] } as ImageManifest, { ...f, sizes: undefined, chunks: fixed }), 'format 1');
      if (f.size > 0) check(fileChunks({ ...whole, files: [] } as ImageManifest, { ...f, sizes: undefined, chunks: [sha256(data)] }), 'whole files');
      // The verified bytes of each chunk, through the ImageStore interface.
      const refs = fileChunks(manifest, f);
      if (refs.length > 0) {
        const last = refs.at(-1)!;
        const store: ImageStore = images;
        assert.ok((await store.getChunk(last.hash, last.size)).equals(data.subarray(last.offset)));
        await rejectsWith(store.getChunk(last.hash, last.size + 1), 'PICO_ERR_IMAGE_CORRUPT');
      }
    }
    await rejectsWith(images.getChunk('0'.repeat(64)), 'PICO_ERR_IMAGE_MISSING');
    // Sizes that do not fit the file: refused, not silently mis-positioned.
    const f = manifest.files.at(-1)!;
    assert.throws(() => fileChunks(manifest, { ...f, sizes: f.sizes!.slice(1) }), (err: unknown) => isPicoError(err, 'PICO_ERR_IMAGE_CORRUPT'));
    assert.throws(() => fileChunks(manifest, { ...f, size: f.size + 1 }), /cover/);
  });

  it('re-checkpointing a slightly changed dump (scattered pages changed, one page inserted early) uploads a small share', async () => {
    // A synthetic 'dump': 24 MiB of pages, a quarter of them zero (as in real heaps), the rest
    // distinct. The next dump changes 8 scattered pages and has one more page near the start.
    const pages = 6 * 1024;
    const first = Buffer.alloc(pages * PAGE_SIZE);
    for (let p = 0; p < pages; p++) if (p % 4 !== 3) seededBytes(PAGE_SIZE, 1000 + p).copy(first, p * PAGE_SIZE);
    const second = Buffer.concat([first.subarray(0, 7 * PAGE_SIZE), seededBytes(PAGE_SIZE, 7), first.subarray(7 * PAGE_SIZE)]);
    for (let i = 0; i < 8; i++) {
      const at = (300 + i * 743) * PAGE_SIZE + 64 * i;
      for (let j = 0; j < 32; j++) second[at + j] ^= 0xa5;
    }
    const small = { 'core-1.img': seededBytes(3000, 5), 'mm-1.img': seededBytes(12000, 6) };
    const v1 = imageDir({ 'pages-1.img': first, ...small });
    const v2 = imageDir({ 'pages-1.img': second, ...small });

    const cdc = open();
    await cdc.images.put('app', v1);
    const { manifest, stats } = await cdc.images.put('app', v2);
    const share = stats.uploadedBytes / stats.totalBytes;
    assert.ok(share < 0.15, `content-defined chunks: ${(share * 100).toFixed(1)}% uploaded`); // 5.4% with these seeds
    const out = fresh('restore');
    await cdc.images.get(manifest, out);
    assertSameTree(out, v2);

    // The same two dumps in fixed 1 MiB chunks (format 1's default): the inserted page moves
    // every later chunk, so nearly everything is uploaded again.
    const fixed = open({ chunking: { minPages: 256, maxPages: 256 } });
    await fixed.images.put('app', v1);
    const again = await fixed.images.put('app', v2);
    assert.ok(again.stats.uploadedBytes / again.stats.totalBytes > 0.5, `fixed chunks: ${again.stats.uploadedBytes} bytes uploaded`);
  });

  it('the chunking option is validated', () => {
    const store = new MemoryObjectStore();
    for (const chunking of [{ minPages: 0 }, { maxPages: 2 }, { avgPages: -1 }, { maxPages: 1e9 }]) {
      assert.throws(() => new ChunkedImageStore({ store, chunking }), RangeError, JSON.stringify(chunking));
    }
    assert.deepEqual(new ChunkedImageStore({ store, chunking: { avgPages: 8 } }).chunking, { minPages: 4, avgPages: 8, maxPages: 64 });
  });
});
