import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parseConfig } from '../shared/config.js';
import { isPicoError, type PicoError } from '../shared/errors.js';
import { chunkKey, ChunkedImageStore, manifestKey } from '../pagestore/chunked-image-store.js';
import { openImageStore } from '../pagestore/index.js';
import { collect, isNotFound, ObjectExistsError } from '../pagestore/object-store.js';
import { S3ObjectStore, S3StoreError, type S3ObjectStoreOptions } from '../pagestore/s3-store.js';
import { startFaultProxy, type FaultProxy } from './helpers/s3-fault-proxy.js';
import { startS3Server, type S3TestServer } from './helpers/s3-server.js';
import { repoFile } from './helpers/paths.js';

// The s3 backend against a real S3 API server (s3rver in a child process), directly and through
// a fault-injecting proxy. The ObjectStore contract itself runs over s3 in
// pagestore-object-store.test.ts; this file covers what only S3 has: the image store on a bucket,
// retries and backoff, error mapping, the standard credentials chain, listing pages, keep-alive.

const KiB = 1024;
const MiB = 1024 * KiB;
const work = mkdtempSync(path.join(tmpdir(), 'pico-s3-'));
let seq = 0;
const fresh = (what: string) => path.join(work, `${what}-${++seq}`);

let s3: S3TestServer;
let proxy: FaultProxy;
const stores: S3ObjectStore[] = [];

before(async () => {
  s3 = await startS3Server({ buckets: ['pico', 'other'] });
  proxy = await startFaultProxy({ target: s3.endpoint });
});
after(async () => {
  for (const s of stores) s.close();
  await proxy?.close();
  await s3?.stop();
  rmSync(work, { recursive: true, force: true });
});

/** A store on its own prefix; `via: 'proxy'` sends it through the fault proxy. Fast retries by default. */
function store(options: Partial<S3ObjectStoreOptions> & { via?: 'proxy' } = {}): S3ObjectStore {
  const { via, ...rest } = options;
  const s = new S3ObjectStore({
    endpoint: via === 'proxy' ? proxy.endpoint : s3.endpoint,
    region: s3.region,
    bucket: s3.bucket,
    prefix: `t${++seq}/`,
    pathStyle: true,
    credentials: s3.credentials,
    retryBaseDelayMs: 5,
    ...rest,
  });
  stores.push(s);
  return s;
}

function imageDir(spec: Record<string, Buffer>): string {
  const dir = fresh('img');
  mkdirSync(dir);
  for (const [rel, data] of Object.entries(spec)) {
    mkdirSync(path.dirname(path.join(dir, rel)), { recursive: true });
    writeFileSync(path.join(dir, rel), data);
  }
  return dir;
}

function assertSameFiles(actual: string, expected: string): void {
  const names = (d: string) => readdirSync(d, { recursive: true, withFileTypes: true }).filter((e) => e.isFile()).map((e) => path.relative(d, path.join(e.parentPath, e.name))).sort();
  assert.deepEqual(names(actual), names(expected));
  for (const n of names(expected)) assert.ok(readFileSync(path.join(actual, n)).equals(readFileSync(path.join(expected, n))), n);
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

const isPut = (r: { method: string }) => r.method === 'PUT';
const isGet = (r: { method: string }) => r.method === 'GET';

describe('ChunkedImageStore on S3', () => {
  const CHUNK = 64 * KiB;

  it('opens the README\'s s3 config through the standard credentials chain (env), and round-trips a 20 MB image', async () => {
    // The `store:` example of pagestore/README.md, pointed at the test server.
    const readme = readFileSync(repoFile('pagestore/README.md'), 'utf8');
    const example = /## S3 backend\s+```yaml\n([\s\S]*?)```/.exec(readme)?.[1];
    assert.ok(example?.includes('kind: s3'), 'the README has an s3 store example');
    const cfg = parseConfig(
      `gateway:\n  dns: { zones: [apps.test] }\n  admin: { token: secret-token }\n` +
        example!.replace('http://127.0.0.1:9000', s3.endpoint) +
        `apps:\n  - name: web\n    domains: [web.apps.test]\n    command: [node, server.js]\n    http: { port: 9001 }\n`,
      'pico.yaml',
      work,
    );
    assert.ok(cfg.store.kind === 's3' && cfg.store.endpoint === s3.endpoint && cfg.store.prefix === 'images/' && cfg.store.pathStyle);
    // No credentials in the config: the SDK's chain finds them in the environment. Instance
    // metadata is switched off so that a miss can never send a request off this machine.
    const env = { AWS_ACCESS_KEY_ID: s3.credentials.accessKeyId, AWS_SECRET_ACCESS_KEY: s3.credentials.secretAccessKey, AWS_EC2_METADATA_DISABLED: 'true', AWS_PROFILE: undefined, AWS_SESSION_TOKEN: undefined };
    const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
    const setEnv = (vars: Record<string, string | undefined>) => {
      for (const [k, v] of Object.entries(vars)) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    };
    setEnv(env);
    try {
      const images = openImageStore(cfg.store);
      assert.match(images.store.location, /^s3:\/\/pico\/images\/ at http:\/\/127\.0\.0\.1:\d+$/);
      const src = imageDir({ 'pages-1.img': randomBytes(20 * MiB), 'core-1.img': randomBytes(3000), 'empty.img': Buffer.alloc(0), 'sub/x.img': randomBytes(MiB + 7) });
      const { manifest, stats } = await images.put('kv', src);
      // Content-defined chunks of random bytes: all distinct, so every chunk was uploaded.
      const distinct = new Set(manifest.files.flatMap((f) => f.chunks));
      assert.equal(manifest.format, 2);
      assert.equal(stats.uploadedChunks, distinct.size);
      assert.equal(stats.uploadedChunks, stats.chunks);
      assert.deepEqual(await images.latest('kv'), manifest);
      const out = fresh('restore');
      await images.get(manifest, out);
      assertSameFiles(out, src);
      // The objects are under the prefix, in the documented layout.
      const raw = store({ prefix: '' });
      const keys = await collect(raw.list('images/'));
      assert.ok(keys.includes(`images/${manifestKey('kv', 1)}`));
      assert.equal(keys.filter((k) => k.startsWith('images/chunks/')).length, distinct.size);
      (images.store as S3ObjectStore).close();
    } finally {
      setEnv(saved);
    }
  });

  it('dedups, detects a corrupt and a missing chunk, and collects orphans', async () => {
    const objects = store();
    // Fixed chunks of CHUNK bytes (min = max pages): the counts below are exact.
    const images = new ChunkedImageStore({ store: objects, chunking: { minPages: CHUNK / 4096, maxPages: CHUNK / 4096 }, gcGraceMs: 0, collectEveryMs: 0 });
    const big = randomBytes(40 * CHUNK + 5);
    const src = imageDir({ 'pages-1.img': big, 'zero.img': Buffer.alloc(8 * CHUNK) });
    const first = await images.put('app', src);
    assert.equal(first.stats.uploadedChunks, 41 + 1);

    const again = await images.put('app', src);
    assert.equal(again.stats.uploadedBytes, 0, 'an unchanged image uploads nothing');
    big[17 * CHUNK + 3]! ^= 1;
    writeFileSync(path.join(src, 'pages-1.img'), big);
    const changed = await images.put('app', src);
    assert.deepEqual([changed.stats.uploadedChunks, changed.stats.uploadedBytes], [1, CHUNK]);

    // A flipped byte in a stored chunk: the restore fails visibly and leaves nothing behind.
    const bad = changed.manifest.files[0]!.chunks[5]!;
    const stored = await objects.get(chunkKey(bad));
    stored[100]! ^= 0xff;
    await objects.put(chunkKey(bad), stored);
    const out = fresh('restore');
    await rejectsWith(images.get(changed.manifest, out), 'PICO_ERR_IMAGE_CORRUPT', /app "app"/, /generation 3/, /file pages-1\.img/, /chunk 5/);
    assert.equal(existsSync(out), false);

    // A chunk gone from the bucket.
    await objects.delete(chunkKey(bad));
    await rejectsWith(images.get(changed.manifest, fresh('restore')), 'PICO_ERR_IMAGE_MISSING', /chunk 5/);

    // The next put repairs it (read-back finds it gone); prune drops generations 1-2 and the
    // one chunk only they used.
    const repaired = await images.put('app', src);
    assert.equal(repaired.stats.uploadedChunks, 1);
    const pruned = await images.prune('app');
    assert.deepEqual(pruned.deletedGenerations.sort(), [1, 2, 3]);
    assert.equal(pruned.deletedChunks, 1);
    const restored = fresh('restore');
    await images.get((await images.latest('app'))!, restored);
    assertSameFiles(restored, src);
  });
});

describe('S3ObjectStore retries', () => {
  it('503 SlowDown for the next 2 requests: the put succeeds on the third attempt, after throttled backoff', async () => {
    // random() = 1: the backoff is exactly base·5·2^(n-1) when throttled: 50 + 100 ms.
    const s = store({ via: 'proxy', retryBaseDelayMs: 10, random: () => 1 });
    proxy.inject({ kind: 'status', status: 503, code: 'SlowDown' }, 2, isPut);
    const t0 = performance.now();
    await s.put('k', Buffer.from('hello'));
    const ms = performance.now() - t0;
    assert.ok(ms >= 150, `backed off ${ms.toFixed(0)} ms`);
    assert.deepEqual(s.stats, { requests: 3, retries: 2, throttled: 2 });
    assert.equal((await s.get('k')).toString(), 'hello');
    assert.deepEqual(proxy.seen.filter((r) => r.path.split('?')[0]!.endsWith(`/${s.prefix}k`) && isPut(r)).map((r) => r.fault ?? 'ok'), ['status', 'status', 'ok']);
  });

  it('a persistent 500: put rejects PICO_ERR_STORE after maxAttempts, in bounded time', async () => {
    const s = store({ via: 'proxy', maxAttempts: 4, retryBaseDelayMs: 20, retryMaxDelayMs: 40 });
    proxy.inject({ kind: 'status', status: 500, code: 'InternalError' }, 100, isPut);
    try {
      const t0 = performance.now();
      const err = await rejectsWith(s.put('k', Buffer.from('x')), 'PICO_ERR_STORE', /cannot put k: InternalError \(HTTP 500\) after 4 attempts/, /s3:\/\/pico\/t\d+\//);
      assert.ok(performance.now() - t0 < 1000);
      assert.ok(err instanceof S3StoreError);
      assert.deepEqual([err.op, err.key, err.errno, err.httpStatus, err.attempts], ['put', 'k', 'InternalError', 500, 4]);
      assert.match(err.requestId ?? '', /^fault-/);
      assert.equal(s.stats.retries, 3);
    } finally {
      proxy.clear();
    }
  });

  it('a connection dropped mid-get is retried; so is one dropped before the answer', async () => {
    const s = store({ via: 'proxy' });
    const body = randomBytes(4 * MiB);
    await s.put('big', body);
    proxy.inject({ kind: 'drop-body', afterBytes: MiB }, 1, isGet);
    const into = Buffer.alloc(8 * MiB);
    const got = await s.get('big', into);
    assert.ok(got.equals(body));
    assert.equal(got.buffer, into.buffer, 'read into the caller\'s buffer');
    assert.equal(s.stats.retries, 1);

    proxy.inject({ kind: 'drop' }, 1, isPut);
    await s.put('other', body);
    assert.ok((await s.get('other')).equals(body));
    assert.equal(s.stats.retries, 2);
  });

  it('a request that stalls past idleTimeoutMs is retried', async () => {
    const s = store({ via: 'proxy', idleTimeoutMs: 300 });
    await s.put('k', Buffer.from('x'));
    proxy.inject({ kind: 'stall' }, 1, isGet);
    const t0 = performance.now();
    assert.equal((await s.get('k')).toString(), 'x');
    assert.ok(performance.now() - t0 >= 250);
    assert.equal(s.stats.retries, 1);
  });

  it('an exclusive put whose answer was lost: the retry finds its own bytes and succeeds; someone else\'s is ObjectExistsError', async () => {
    const s = store({ via: 'proxy' });
    proxy.inject({ kind: 'drop-response' }, 1, isPut);
    await s.put('m', Buffer.from('mine'), { exclusive: true });
    assert.equal(s.stats.retries, 1);
    assert.equal((await s.get('m')).toString(), 'mine');
    await assert.rejects(s.put('m', Buffer.from('theirs'), { exclusive: true }), ObjectExistsError);
  });

  it('an unreachable server: PICO_ERR_STORE ECONNREFUSED after the retries', async () => {
    const dead = await startFaultProxy({ target: s3.endpoint });
    const endpoint = dead.endpoint;
    await dead.close();
    const s = store({ endpoint, maxAttempts: 3 });
    const err = await rejectsWith(s.get('k'), 'PICO_ERR_STORE', /ECONNREFUSED after 3 attempts/);
    assert.equal((err as S3StoreError).errno, 'ECONNREFUSED');
  });
});

describe('S3ObjectStore errors', () => {
  it('a missing bucket is a clear PICO_ERR_STORE for every operation, never "absent", and is not retried', async () => {
    const s = store({ bucket: 'no-such-bucket' });
    for (const [op, run] of [
      ['get', () => s.get('k')],
      ['head', () => s.head('k')],
      ['list', () => collect(s.list(''))],
      ['put', () => s.put('k', Buffer.from('x'))],
    ] as const) {
      const err = await rejectsWith(run(), 'PICO_ERR_STORE', /NoSuchBucket \(HTTP 404\)/, /s3:\/\/no-such-bucket\//, /the bucket must exist/);
      assert.ok(!isNotFound(err), op);
      assert.deepEqual([(err as S3StoreError).op, (err as S3StoreError).attempts], [op, 1]);
    }
  });

  it('wrong credentials: PICO_ERR_STORE naming the S3 code, with a hint, not retried', async () => {
    // (s3rver checks the access key id only; AWS answers a wrong secret with SignatureDoesNotMatch, same hint)
    const s = store({ credentials: { accessKeyId: 'NOT-A-KEY', secretAccessKey: 'wrong' } });
    const err = await rejectsWith(s.put('k', Buffer.from('x')), 'PICO_ERR_STORE', /InvalidAccessKeyId \(HTTP 403\)/, /check the credentials/);
    assert.equal((err as S3StoreError).attempts, 1);
  });

  it('the prefix: "images" and "images/" name the same store; an unusable prefix is PICO_ERR_CONFIG', async () => {
    const a = store({ prefix: 'shared-prefix' });
    const b = store({ prefix: 'shared-prefix/' });
    await a.put('x/y', Buffer.from('1'));
    assert.equal((await b.get('x/y')).toString(), '1');
    assert.deepEqual(await collect(store({ prefix: '' }).list('shared-prefix/')), ['shared-prefix/x/y']);
    for (const prefix of ['/abs', 'a//b', '../up']) {
      assert.throws(() => store({ prefix }), (err: unknown) => isPicoError(err, 'PICO_ERR_CONFIG'), prefix);
    }
  });
});

describe('S3ObjectStore connections and listing', () => {
  it('lists page by page with the prefix cut off, each key once', async () => {
    const s = store({ via: 'proxy', listPageSize: 7 });
    const keys = Array.from({ length: 30 }, (_, i) => `chunks/${String(i).padStart(2, '0')}/k${i}`);
    await Promise.all(keys.map((k) => s.put(k, Buffer.from(k))));
    await s.put('apps/a/1.json', Buffer.from('{}'));
    const before = proxy.seen.length;
    const listed = await collect(s.list('chunks/'));
    assert.deepEqual(listed.sort(), keys.sort());
    assert.equal(proxy.seen.length - before, 5, 'ceil(30 / 7) ListObjectsV2 pages');
  });

  it('keeps connections alive: sequential requests share one, parallel ones stay within maxSockets', async () => {
    const s = store({ via: 'proxy', maxSockets: 8 });
    await s.put('warm', Buffer.from('x'));
    const c0 = proxy.connections;
    for (let i = 0; i < 20; i++) await s.head('warm');
    assert.equal(proxy.connections - c0, 0, 'sequential requests reuse the kept-alive connection');
    await Promise.all(Array.from({ length: 64 }, (_, i) => s.put(`p/${i}`, randomBytes(64 * KiB))));
    assert.ok(proxy.connections - c0 <= 8, `${proxy.connections - c0} connections for 64 parallel puts`);
  });

  it('getStream reads a body nobody iterates to its end, so it never holds its connection; a broken body throws from the iteration', async () => {
    const s = store({ via: 'proxy', maxSockets: 1 });
    const big = randomBytes(2 * 1024 * KiB);
    await s.put('big', big);
    await s.put('small', Buffer.from('small'));
    await s.getStream('big'); // never iterated (a restore that failed before it read its pack)
    assert.equal((await s.get('small')).toString(), 'small', 'the one connection was freed');
    const late = await s.getStream('big');
    await new Promise((resolve) => setTimeout(resolve, 50));
    const pieces: Buffer[] = [];
    for await (const piece of late) pieces.push(piece);
    assert.ok(Buffer.concat(pieces).equals(big), 'iterated after it was all in: every byte, in order');
    proxy.inject({ kind: 'drop-body', afterBytes: 1000 }, 1, (r) => r.method === 'GET');
    const broken = await s.getStream('big');
    await assert.rejects(async () => {
      for await (const _ of broken) void _;
    });
  });

  it('against plain s3rver, which ignores If-None-Match: an exclusive put still refuses an existing key (HEAD first)', async () => {
    const plain = await startS3Server({ faithful: false });
    try {
      const s = new S3ObjectStore({ endpoint: plain.endpoint, region: plain.region, bucket: plain.bucket, pathStyle: true, credentials: plain.credentials });
      stores.push(s);
      await s.put('m', Buffer.from('one'), { exclusive: true });
      await assert.rejects(s.put('m', Buffer.from('two'), { exclusive: true }), ObjectExistsError);
      assert.equal((await s.get('m')).toString(), 'one');
    } finally {
      await plain.stop();
    }
  });
});
