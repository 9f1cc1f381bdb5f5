import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { isPicoError } from '../shared/errors.js';
import { FsObjectStore } from '../pagestore/fs-store.js';
import { MemoryObjectStore } from '../pagestore/memory-store.js';
import { openImageStore } from '../pagestore/index.js';
import { collect, getStreamed, isNotFound, ObjectExistsError, StoreError, TEMP_PREFIX, type ObjectStore } from '../pagestore/object-store.js';
import { S3ObjectStore } from '../pagestore/s3-store.js';
import { startS3Server, type S3TestServer } from './helpers/s3-server.js';

// The ObjectStore contract, run against every backend; then what only the fs backend or the
// in-memory fake does.

const work = mkdtempSync(path.join(tmpdir(), 'pico-objstore-'));
after(() => rmSync(work, { recursive: true, force: true }));
let seq = 0;
const fresh = (what: string) => path.join(work, `${what}-${++seq}`);

// The s3 backend runs against a real S3 API server (s3rver in a child process, see
// helpers/s3-server.ts); each store gets its own key prefix in the one bucket.
let s3: S3TestServer | undefined;
const s3Stores: S3ObjectStore[] = [];
const makeS3 = () => {
  const store = new S3ObjectStore({ endpoint: s3!.endpoint, region: s3!.region, bucket: s3!.bucket, prefix: `contract-${++seq}/`, pathStyle: true, credentials: s3!.credentials });
  s3Stores.push(store);
  return store;
};

const backends: Array<{ name: string; make: () => ObjectStore; setup?: () => Promise<void>; teardown?: () => Promise<void> }> = [
  { name: 'fs', make: () => new FsObjectStore({ root: fresh('store') }) },
  { name: 'fs (not durable)', make: () => new FsObjectStore({ root: fresh('store'), durable: false }) },
  { name: 'memory', make: () => new MemoryObjectStore() },
  {
    name: 's3',
    make: makeS3,
    setup: async () => void (s3 = await startS3Server()),
    teardown: async () => {
      for (const st of s3Stores) st.close();
      await s3?.stop();
    },
  },
];

for (const { name, make, setup, teardown } of backends) {
  describe(`ObjectStore contract: ${name}`, () => {
    if (setup) before(setup);
    if (teardown) after(teardown);
    it('puts, gets, heads, lists and deletes', async () => {
      const s = make();
      const body = randomBytes(3000);
      const t0 = Date.now();
      await s.put('apps/kv/0000000001.json', body);
      await s.put('chunks/ab/abcd', Buffer.from('x'));
      await s.put('chunks/ab/abce', Buffer.alloc(0));
      assert.ok((await s.get('apps/kv/0000000001.json')).equals(body));
      assert.equal((await s.get('chunks/ab/abce')).length, 0);
      const info = await s.head('apps/kv/0000000001.json');
      assert.equal(info?.size, 3000);
      assert.ok(info!.lastModified >= t0 - 1000 && info!.lastModified <= Date.now() + 1000);
      assert.equal(await s.head('apps/kv/0000000002.json'), undefined);
      assert.equal(await s.head('apps/kv'), undefined, 'a "directory" is not an object');
      assert.deepEqual((await collect(s.list(''))).sort(), ['apps/kv/0000000001.json', 'chunks/ab/abcd', 'chunks/ab/abce']);
      assert.deepEqual((await collect(s.list('chunks/'))).sort(), ['chunks/ab/abcd', 'chunks/ab/abce']);
      assert.deepEqual(await collect(s.list('chunks/ab/abcd')), ['chunks/ab/abcd']);
      assert.deepEqual(await collect(s.list('nothing/')), []);
      await s.delete('chunks/ab/abcd');
      await s.delete('chunks/ab/abcd'); // idempotent
      await s.delete('no/such/key');
      assert.deepEqual((await collect(s.list('chunks/'))).sort(), ['chunks/ab/abce']);
    });

    it('get may read into a buffer the caller passes', async () => {
      const s = make();
      const body = randomBytes(5000);
      await s.put('k', body);
      const into = Buffer.alloc(8192);
      const got = await s.get('k', into);
      assert.ok(got.equals(body));
      if (got.buffer === into.buffer) assert.equal(got.byteOffset, into.byteOffset);
      const small = Buffer.alloc(100);
      assert.ok((await s.get('k', small)).equals(body), 'too small a buffer is not used');
      assert.ok(small.equals(Buffer.alloc(100)));
      // Reusing the buffer after put resolved does not change the stored object.
      const reused = Buffer.from(body);
      await s.put('r', reused);
      reused.fill(0);
      assert.ok((await s.get('r')).equals(body));
    });

    it('lists by plain string prefix, like S3', async () => {
      const s = make();
      for (const k of ['apps/a/1.json', 'apps/ab/1.json', 'apps/b/1.json', 'apps-x']) await s.put(k, Buffer.from(k));
      assert.deepEqual((await collect(s.list('apps/a'))).sort(), ['apps/a/1.json', 'apps/ab/1.json']);
      assert.deepEqual((await collect(s.list('apps/a/'))).sort(), ['apps/a/1.json']);
      assert.deepEqual((await collect(s.list('apps'))).sort(), ['apps-x', 'apps/a/1.json', 'apps/ab/1.json', 'apps/b/1.json']);
    });

    it('get of an absent key rejects with ObjectNotFoundError (PICO_ERR_IMAGE_MISSING)', async () => {
      const s = make();
      await s.put('a/b', Buffer.from('x'));
      for (const key of ['nope', 'a/b/c', 'a']) {
        await assert.rejects(s.get(key), (err: unknown) => isNotFound(err) && isPicoError(err, 'PICO_ERR_IMAGE_MISSING') && err.key === key);
      }
    });

    it('getStreamed gives the bytes (as they arrive where the backend streams), and rejects an absent key like get', async () => {
      const s = make();
      const body = randomBytes(3 * 1024 * 1024 + 17);
      await s.put('big', body);
      const got = await getStreamed(s, 'big');
      const pieces: Buffer[] = [];
      for await (const piece of Buffer.isBuffer(got) ? [got] : got) pieces.push(piece);
      assert.ok(Buffer.concat(pieces).equals(body));
      if (s instanceof S3ObjectStore) assert.ok(!Buffer.isBuffer(got), 's3 streams the body');
      await assert.rejects(getStreamed(s, 'nope'), (err: unknown) => isNotFound(err) && isPicoError(err, 'PICO_ERR_IMAGE_MISSING'));
    });

    it('overwrites, and exclusive puts create only', async () => {
      const s = make();
      await s.put('k', Buffer.from('one'));
      await s.put('k', Buffer.from('two'));
      assert.equal((await s.get('k')).toString(), 'two');
      await assert.rejects(s.put('k', Buffer.from('three'), { exclusive: true }), (err: unknown) => err instanceof ObjectExistsError);
      assert.equal((await s.get('k')).toString(), 'two');
      // Racing exclusive puts of one key: exactly one wins.
      const results = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => s.put('race', Buffer.from(String(i)), { exclusive: true })));
      assert.equal(results.filter((r) => r.status === 'fulfilled').length, 1);
      const winner = results.findIndex((r) => r.status === 'fulfilled');
      assert.equal((await s.get('race')).toString(), String(winner));
    });

    it('rejects unsafe keys with PICO_ERR_STORE before any I/O', async () => {
      const s = make();
      for (const key of ['', '/abs', '../up', 'a/../b', 'a//b', 'a/./b', 'a/', `a/${TEMP_PREFIX}x`, 'a\\b', 'a\0b']) {
        for (const op of [() => s.put(key, Buffer.from('x')), () => s.get(key), () => s.head(key), () => s.delete(key)]) {
          await assert.rejects(op(), (err: unknown) => err instanceof StoreError && isPicoError(err, 'PICO_ERR_STORE') && /invalid object key/.test(err.message), JSON.stringify(key));
        }
      }
    });

    it('a reader never sees a partial object while it is overwritten', async () => {
      const s = make();
      const a = Buffer.alloc(4 << 20, 0xaa);
      const b = Buffer.alloc(4 << 20, 0xbb);
      await s.put('big', a);
      let done = false;
      const writer = (async () => {
        for (let i = 0; i < 10; i++) await s.put('big', i % 2 ? a : b);
        done = true;
      })();
      let reads = 0;
      while (!done) {
        const got = await s.get('big');
        assert.ok(got.equals(a) || got.equals(b), 'partial or mixed object read');
        reads++;
      }
      await writer;
      assert.ok(reads > 0);
    });
  });
}

describe('FsObjectStore', () => {
  it('maps keys to paths under the root and hides in-progress writes from list', async () => {
    const root = fresh('store');
    const s = new FsObjectStore({ root });
    await s.put('chunks/ab/abcd', Buffer.from('x'));
    assert.equal(s.pathOf('chunks/ab/abcd'), path.join(root, 'chunks', 'ab', 'abcd'));
    assert.deepEqual(readdirSync(path.join(root, 'chunks', 'ab')), ['abcd'], 'no temp file left after a put');
    writeFileSync(path.join(root, 'chunks', 'ab', `${TEMP_PREFIX}123-abcf`), 'partial');
    assert.deepEqual(await collect(s.list('chunks/')), ['chunks/ab/abcd']);
  });

  it('removeStaleTemp deletes old leftovers of interrupted writes, never fresh ones', async () => {
    const root = fresh('store');
    const s = new FsObjectStore({ root });
    await s.put('chunks/ab/abcd', Buffer.from('x'));
    const old = path.join(root, 'chunks', 'ab', `${TEMP_PREFIX}1-old`);
    const young = path.join(root, 'chunks', 'ab', `${TEMP_PREFIX}2-young`);
    writeFileSync(old, 'x');
    writeFileSync(young, 'x');
    const hourAgo = new Date(Date.now() - 2 * 3600_000);
    utimesSync(old, hourAgo, hourAgo);
    assert.equal(await s.removeStaleTemp(3600_000), 1);
    assert.deepEqual(readdirSync(path.join(root, 'chunks', 'ab')).sort(), [`${TEMP_PREFIX}2-young`, 'abcd']);
  });

  it('maps failures to StoreError with the path and errno', async () => {
    const file = fresh('file');
    writeFileSync(file, 'x');
    const s = new FsObjectStore({ root: path.join(file, 'store') });
    await assert.rejects(s.put('a/b', Buffer.from('x')), (err: unknown) => {
      assert.ok(err instanceof StoreError && isPicoError(err, 'PICO_ERR_STORE'));
      assert.equal(err.errno, 'ENOTDIR');
      assert.equal(err.op, 'put');
      assert.equal(err.key, 'a/b');
      assert.match(err.message, new RegExp(`${file}/store/a`));
      return true;
    });
    // Reads of a store that cannot exist are "absent", not failures.
    assert.equal(await s.head('a/b'), undefined);
    assert.deepEqual(await collect(s.list('')), []);
    // A directory where an object should be: a put fails, a get finds nothing.
    const root = fresh('store');
    mkdirSync(path.join(root, 'k'), { recursive: true });
    const t = new FsObjectStore({ root });
    await assert.rejects(t.put('k', Buffer.from('x')), (err: unknown) => err instanceof StoreError && err.errno === 'EISDIR');
    await assert.rejects(t.get('k'), (err: unknown) => isNotFound(err));
    assert.deepEqual(readdirSync(root), ['k'], 'the failed put left no temp file');
  });
});

describe('MemoryObjectStore fault injection', () => {
  it('fails the next N operations of a kind', async () => {
    const s = new MemoryObjectStore();
    s.failNext('put', 2);
    await assert.rejects(s.put('a', Buffer.from('x')), (err: unknown) => err instanceof StoreError && err.errno === 'EIO');
    await assert.rejects(s.put('a', Buffer.from('x')), StoreError);
    await s.put('a', Buffer.from('x'));
    s.failNext('get', 1, () => new Error('boom'));
    await assert.rejects(s.get('a'), /boom/);
    assert.equal((await s.get('a')).toString(), 'x');
    assert.deepEqual(s.counts, { put: 3, get: 2, head: 0, list: 0, delete: 0 });
  });

  it('read-only mode, corruption, ageing, and copies in and out', async () => {
    let now = 1000;
    const s = new MemoryObjectStore({ now: () => now });
    const body = Buffer.from('hello');
    await s.put('a', body);
    body[0] = 0; // the caller's buffer is not the stored one
    const got = await s.get('a');
    got[1] = 0;
    assert.equal((await s.get('a')).toString(), 'hello');
    s.corrupt('a', 0);
    assert.notEqual((await s.get('a')).toString(), 'hello');
    assert.equal((await s.head('a'))?.lastModified, 1000);
    now = 5000;
    s.touch('a', 10);
    assert.equal((await s.head('a'))?.lastModified, 10);
    s.readOnly = true;
    await assert.rejects(s.put('b', Buffer.from('x')), (err: unknown) => err instanceof StoreError && err.errno === 'EROFS');
    await assert.rejects(s.delete('a'), (err: unknown) => err instanceof StoreError && err.errno === 'EROFS');
    assert.deepEqual(s.keys(), ['a']);
    assert.equal(s.size, 5);
  });
});

describe('openImageStore', () => {
  it('opens the fs store the config names, and round-trips through it', async () => {
    const root = fresh('store');
    const images = openImageStore({ kind: 'fs', path: root }, { chunking: { minPages: 2, avgPages: 4, maxPages: 8 } });
    const src = fresh('img');
    mkdirSync(src);
    writeFileSync(path.join(src, 'pages-1.img'), randomBytes(200_000));
    const { manifest } = await images.put('kv', src);
    assert.deepEqual(readdirSync(root).sort(), ['apps', 'chunks']);
    assert.deepEqual(await images.latest('kv'), manifest);
    assert.deepEqual(manifest.chunking, { kind: 'pages', minPages: 2, avgPages: 4, maxPages: 8 });
    assert.equal(manifest.chunkSize, 8 * 4096);
  });
});
