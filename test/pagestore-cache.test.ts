import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { after, describe, it } from 'node:test';
import { pino } from 'pino';
import { isPicoError } from '../shared/errors.js';
import { ChunkCache, type ChunkCacheOptions } from '../pagestore/chunk-cache.js';
import { sha256 } from '../pagestore/chunked-image-store.js';
import { until } from './helpers/poll.js';

// The worker's chunk cache: memory and disk tiers, verification, single flight, bounds. Chunks
// are small random buffers; every test makes its own cache (and disk directory).

const KiB = 1024;
const work = mkdtempSync(path.join(tmpdir(), 'pico-chunkcache-'));
after(() => rmSync(work, { recursive: true, force: true }));
let seq = 0;
const fresh = (what: string) => path.join(work, `${what}-${++seq}`);

interface Chunk {
  hash: string;
  buf: Buffer;
}
function chunk(bytes = KiB): Chunk {
  const buf = randomBytes(bytes);
  return { hash: sha256(buf), buf };
}

/** A fetch that counts its calls and hands out a fresh copy each time (as a store would). */
function fetcher(c: Chunk) {
  const f = async () => {
    f.calls++;
    return Buffer.from(c.buf);
  };
  f.calls = 0;
  return f;
}

const open = (o: ChunkCacheOptions) => ChunkCache.open(o);

/** Where the disk tier keeps a chunk. */
const fileOf = (dir: string, hash: string) => path.join(dir, hash.slice(0, 2), hash);

/** Every file under `dir` (relative paths). */
function filesUnder(dir: string): string[] {
  const out: string[] = [];
  const visit = (d: string, rel: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) visit(path.join(d, e.name), r);
      else out.push(r);
    }
  };
  visit(dir, '');
  return out.sort();
}

function chunkFileBytes(dir: string): number {
  return filesUnder(dir)
    .filter((f) => /^[0-9a-f]{2}\/[0-9a-f]{64}$/.test(f))
    .reduce((n, f) => n + statSync(path.join(dir, f)).size, 0);
}

/** A logger whose lines a test can read. */
function capturingLogger() {
  const lines: Array<{ level: number; msg: string; [k: string]: unknown }> = [];
  const stream = new Writable({
    write(data: Buffer, _enc, cb) {
      for (const l of data.toString().split('\n')) if (l) lines.push(JSON.parse(l));
      cb();
    },
  });
  return { log: pino({ level: 'debug' }, stream), lines };
}

describe('chunk cache: memory tier', () => {
  it('fetches once, then answers from memory with the same verified bytes', async () => {
    const cache = await open({ memoryBytes: 64 * KiB });
    const c = chunk();
    const f = fetcher(c);
    const first = await cache.get(c.hash, c.buf.length, f);
    assert.equal(first.from, 'fetch');
    assert.deepEqual(first.buf, c.buf);
    assert.ok(cache.has(c.hash));
    const second = await cache.get(c.hash, c.buf.length, f);
    assert.equal(second.from, 'memory');
    assert.equal(second.buf, first.buf, 'the cached buffer itself');
    assert.equal(f.calls, 1);
    const s = cache.stats();
    assert.deepEqual(s.memory, { bytes: KiB, chunks: 1 });
    assert.deepEqual(s.hits, { memory: 1, disk: 0 });
    assert.equal(s.misses, 1);
    await cache.close();
  });

  it('single flight: concurrent gets of one chunk share one fetch', async () => {
    const cache = await open({ memoryBytes: 64 * KiB });
    const c = chunk();
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let calls = 0;
    const fetch = async () => {
      calls++;
      await gate;
      return Buffer.from(c.buf);
    };
    const gets = Array.from({ length: 20 }, () => cache.get(c.hash, c.buf.length, fetch));
    await until(() => calls > 0, 'the fetch to start');
    release();
    const results = await Promise.all(gets);
    assert.equal(calls, 1);
    for (const r of results) {
      assert.equal(r.from, 'fetch');
      assert.equal(r.buf, results[0]!.buf);
    }
    assert.equal(cache.stats().misses, 1);
    await cache.close();
  });

  it('a fetch that fails rejects every sharer unchanged, and the next get fetches again', async () => {
    const cache = await open({ memoryBytes: 64 * KiB });
    const c = chunk();
    const boom = new Error('store down');
    let calls = 0;
    const failing = async () => {
      calls++;
      throw boom;
    };
    const both = await Promise.allSettled([cache.get(c.hash, KiB, failing), cache.get(c.hash, KiB, failing)]);
    assert.equal(calls, 1);
    for (const r of both) assert.equal(r.status === 'rejected' && r.reason, boom);
    assert.equal(cache.has(c.hash), false);
    assert.equal((await cache.get(c.hash, KiB, fetcher(c))).from, 'fetch');
    await cache.close();
  });

  it('a corrupt fetch rejects PICO_ERR_IMAGE_CORRUPT and is not cached', async () => {
    const cache = await open({ memoryBytes: 64 * KiB });
    const c = chunk();
    const bad = Buffer.from(c.buf);
    bad[100] ^= 1;
    await assert.rejects(cache.get(c.hash, KiB, async () => bad), (e) => isPicoError(e, 'PICO_ERR_IMAGE_CORRUPT'));
    assert.equal(cache.has(c.hash), false);
    // right bytes, wrong length for the image: rejected too
    await assert.rejects(cache.get(c.hash, KiB + 1, fetcher(c)), (e) => isPicoError(e, 'PICO_ERR_IMAGE_CORRUPT'));
    assert.equal(cache.has(c.hash), false);
    assert.equal(cache.stats().corrupt, 2);
    const ok = fetcher(c);
    assert.equal((await cache.get(c.hash, KiB, ok)).from, 'fetch');
    assert.equal(ok.calls, 1);
    await cache.close();
  });

  it('rejects hashes that are not 64 lowercase hex before any I/O', async () => {
    const dir = fresh('disk');
    const cache = await open({ memoryBytes: 64 * KiB, diskBytes: 64 * KiB, diskPath: dir });
    const c = chunk();
    const f = fetcher(c);
    for (const h of [c.hash.toUpperCase(), c.hash.slice(1), `../${c.hash.slice(3)}`, '', `${c.hash}\n`]) {
      await assert.rejects(cache.get(h, KiB, f), (e) => isPicoError(e, 'PICO_ERR_IMAGE_CORRUPT'), JSON.stringify(h));
      assert.equal(cache.has(h), false);
    }
    assert.throws(() => cache.put('../../etc/passwd', c.buf), (e) => isPicoError(e, 'PICO_ERR_IMAGE_CORRUPT'));
    assert.equal(f.calls, 0);
    await cache.close();
    assert.deepEqual(filesUnder(dir), []);
  });

  it('stays within memoryBytes and evicts the least recently used chunk', async () => {
    const cache = await open({ memoryBytes: 3 * KiB });
    const [a, b, c, d, e] = [chunk(), chunk(), chunk(), chunk(), chunk()] as [Chunk, Chunk, Chunk, Chunk, Chunk];
    for (const x of [a, b, c]) await cache.get(x.hash, KiB, fetcher(x));
    assert.equal((await cache.get(a.hash, KiB, fetcher(a))).from, 'memory'); // a is now the most recent
    await cache.get(d.hash, KiB, fetcher(d)); // evicts b
    assert.deepEqual([a, b, c, d].map((x) => cache.has(x.hash)), [true, false, true, true]);
    cache.put(e.hash, e.buf); // evicts c
    assert.deepEqual([a, c, d, e].map((x) => cache.has(x.hash)), [true, false, true, true]);
    const s = cache.stats();
    assert.deepEqual(s.memory, { bytes: 3 * KiB, chunks: 3 });
    assert.equal(s.evictions, 2);
    // a chunk larger than the whole tier is returned but not kept
    const big = chunk(4 * KiB);
    assert.equal((await cache.get(big.hash, big.buf.length, fetcher(big))).from, 'fetch');
    assert.equal(cache.has(big.hash), false);
    assert.ok(cache.stats().memory.bytes <= 3 * KiB);
    await cache.close();
  });

  it('never holds more than memoryBytes, whatever the order of gets and puts', async () => {
    const cache = await open({ memoryBytes: 10 * KiB });
    const chunks = Array.from({ length: 30 }, (_, i) => chunk(((i * 7) % 5) * KiB + 100));
    for (let i = 0; i < 200; i++) {
      const x = chunks[(i * 13) % chunks.length]!;
      if (i % 3 === 0) cache.put(x.hash, Buffer.from(x.buf));
      else await cache.get(x.hash, x.buf.length, fetcher(x));
      assert.ok(cache.stats().memory.bytes <= 10 * KiB, `after step ${i}: ${cache.stats().memory.bytes}`);
    }
    await cache.close();
  });

  it('cachedBytes counts the chunks held in either tier, each once', async () => {
    const dir = fresh('disk');
    const cache = await open({ memoryBytes: 2 * KiB, diskBytes: 64 * KiB, diskPath: dir });
    const [a, b, c] = [chunk(KiB), chunk(KiB), chunk(KiB)] as [Chunk, Chunk, Chunk];
    const absent = chunk(KiB);
    for (const x of [a, b, c]) await cache.get(x.hash, KiB, fetcher(x)); // a goes to disk
    await cache.flush();
    assert.equal(cache.cachedBytes([]), 0);
    assert.equal(cache.cachedBytes([a.hash]), KiB);
    assert.equal(cache.cachedBytes([a.hash, b.hash, c.hash, absent.hash]), 3 * KiB);
    assert.equal(cache.cachedBytes([b.hash, b.hash, 'nonsense']), KiB);
    await cache.close();
  });
});

describe('chunk cache: disk tier', () => {
  it('demotes evicted chunks to disk and serves them from there, verified', async () => {
    const dir = fresh('disk');
    const cache = await open({ memoryBytes: 2 * KiB, diskBytes: 64 * KiB, diskPath: dir });
    const [a, b, c] = [chunk(), chunk(), chunk()] as [Chunk, Chunk, Chunk];
    for (const x of [a, b, c]) await cache.get(x.hash, KiB, fetcher(x));
    await cache.flush();
    assert.deepEqual(readFileSync(fileOf(dir, a.hash)), a.buf);
    assert.deepEqual(filesUnder(dir), [`${a.hash.slice(0, 2)}/${a.hash}`], 'no temp files left');
    assert.deepEqual(cache.stats().disk, { bytes: KiB, chunks: 1 });
    assert.ok(cache.has(a.hash));
    const f = fetcher(a);
    const got = await cache.get(a.hash, KiB, f);
    assert.equal(got.from, 'disk');
    assert.deepEqual(got.buf, a.buf);
    assert.equal(f.calls, 0);
    assert.equal(cache.stats().hits.disk, 1);
    assert.equal((await cache.get(a.hash, KiB, f)).from, 'memory', 'a disk hit is kept in memory');
    await cache.close();
  });

  it('with the memory tier off, fetched chunks go straight to disk', async () => {
    const dir = fresh('disk');
    const cache = await open({ memoryBytes: 0, diskBytes: 64 * KiB, diskPath: dir });
    const a = chunk();
    await cache.get(a.hash, KiB, fetcher(a));
    await cache.flush();
    assert.ok(existsSync(fileOf(dir, a.hash)));
    assert.equal((await cache.get(a.hash, KiB, fetcher(a))).from, 'disk');
    assert.deepEqual(cache.stats().memory, { bytes: 0, chunks: 0 });
    await cache.close();
  });

  it('a disk chunk flipped by one byte is detected, deleted and fetched again', async () => {
    const dir = fresh('disk');
    const { log, lines } = capturingLogger();
    const cache = await open({ memoryBytes: KiB, diskBytes: 64 * KiB, diskPath: dir, log });
    const [a, b] = [chunk(), chunk()] as [Chunk, Chunk];
    await cache.get(a.hash, KiB, fetcher(a));
    await cache.get(b.hash, KiB, fetcher(b)); // a → disk
    await cache.flush();
    const file = fileOf(dir, a.hash);
    const bytes = readFileSync(file);
    bytes[513] ^= 0x01;
    writeFileSync(file, bytes);
    const f = fetcher(a);
    const got = await cache.get(a.hash, KiB, f);
    assert.equal(got.from, 'fetch');
    assert.deepEqual(got.buf, a.buf);
    assert.equal(f.calls, 1);
    assert.equal(cache.stats().corrupt, 1);
    assert.ok(lines.some((l) => l.level === 40 && l.chunk === a.hash && /checksum/.test(l.msg)), 'logged');
    // the bad file is deleted (its queued delete runs before any later rewrite of the chunk)
    await cache.flush();
    assert.equal(existsSync(file), false);
    // a later demotion writes the good bytes again
    await cache.get(b.hash, KiB, fetcher(b)); // a → disk again
    await cache.flush();
    assert.deepEqual(readFileSync(file), a.buf);
    await cache.close();
  });

  it('a disk chunk deleted behind its back is fetched again', async () => {
    const dir = fresh('disk');
    const cache = await open({ memoryBytes: KiB, diskBytes: 64 * KiB, diskPath: dir });
    const [a, b] = [chunk(), chunk()] as [Chunk, Chunk];
    await cache.get(a.hash, KiB, fetcher(a));
    await cache.get(b.hash, KiB, fetcher(b));
    await cache.flush();
    rmSync(fileOf(dir, a.hash));
    assert.equal((await cache.get(a.hash, KiB, fetcher(a))).from, 'fetch');
    assert.equal(cache.stats().corrupt, 0);
    await cache.close();
  });

  it('stays within diskBytes, deleting the least recently used files', async () => {
    const dir = fresh('disk');
    const cache = await open({ memoryBytes: KiB, diskBytes: 4 * KiB, diskPath: dir });
    const chunks = Array.from({ length: 10 }, () => chunk());
    for (const x of chunks) {
      await cache.get(x.hash, KiB, fetcher(x));
      assert.ok(cache.stats().disk.bytes <= 4 * KiB);
    }
    await cache.flush();
    // memory: chunk 9; disk: chunks 5..8 (0..4 were deleted, oldest first)
    assert.deepEqual(cache.stats().disk, { bytes: 4 * KiB, chunks: 4 });
    assert.equal(chunkFileBytes(dir), 4 * KiB);
    assert.deepEqual(chunks.map((x) => cache.has(x.hash)), [false, false, false, false, false, true, true, true, true, true]);
    for (const x of chunks.slice(5, 9)) assert.ok(existsSync(fileOf(dir, x.hash)));
    // a disk hit makes its chunk the most recent there too
    assert.equal((await cache.get(chunks[5]!.hash, KiB, fetcher(chunks[5]!))).from, 'disk'); // 9 demoted to disk
    await cache.flush();
    assert.ok(existsSync(fileOf(dir, chunks[5]!.hash)), 'chunk 5 stays on disk too');
    assert.ok(existsSync(fileOf(dir, chunks[9]!.hash)));
    assert.equal(cache.has(chunks[6]!.hash), false, 'chunk 6 was the least recently used on disk');
    assert.ok(chunkFileBytes(dir) <= 4 * KiB);
    // a chunk larger than the disk tier is not kept there
    const big = chunk(5 * KiB);
    assert.equal((await cache.get(big.hash, big.buf.length, fetcher(big))).from, 'fetch');
    await cache.flush();
    assert.equal(cache.has(big.hash), false);
    assert.equal(existsSync(fileOf(dir, big.hash)), false);
    assert.ok(cache.stats().evictions > 0);
    await cache.close();
  });

  it('reopening re-indexes the disk tier, removes temp files and leaves foreign files alone', async () => {
    const dir = fresh('disk');
    const first = await open({ memoryBytes: KiB, diskBytes: 64 * KiB, diskPath: dir });
    const chunks = Array.from({ length: 5 }, () => chunk());
    for (const x of chunks) await cache_get(first, x);
    await first.close(); // waits for the writes: chunks 0..3 are on disk
    assert.equal(chunkFileBytes(dir), 4 * KiB);
    // what a crash or an operator leaves behind
    const sub = chunks[0]!.hash.slice(0, 2);
    const temp = path.join(dir, sub, `.pico-tmp-0123456789ab-${chunks[0]!.hash}`);
    writeFileSync(temp, 'partial');
    writeFileSync(path.join(dir, 'README'), 'mine');
    writeFileSync(path.join(dir, sub, 'notes.txt'), 'mine too');
    mkdirSync(path.join(dir, 'zz'));
    writeFileSync(path.join(dir, 'zz', chunks[4]!.hash), 'not under its prefix');
    // give recency by mtime: chunk 0 oldest … chunk 3 newest
    chunks.slice(0, 4).forEach((x, i) => utimesSync(fileOf(dir, x.hash), 1_000_000 + i, 1_000_000 + i));

    const second = await open({ memoryBytes: KiB, diskBytes: 64 * KiB, diskPath: dir });
    assert.deepEqual(second.stats().disk, { bytes: 4 * KiB, chunks: 4 });
    assert.equal(existsSync(temp), false, 'temp file removed');
    for (const f of ['README', `${sub}/notes.txt`, `zz/${chunks[4]!.hash}`]) assert.ok(existsSync(path.join(dir, f)), f);
    assert.equal(second.has(chunks[4]!.hash), false);
    for (const x of chunks.slice(0, 4)) {
      const f = fetcher(x);
      assert.equal((await second.get(x.hash, KiB, f)).from, 'disk');
      assert.equal(f.calls, 0);
    }
    await second.close();

    // a smaller bound: evicted down to it at open, oldest by mtime first
    chunks.slice(0, 4).forEach((x, i) => utimesSync(fileOf(dir, x.hash), 1_000_000 + i, 1_000_000 + i));
    const third = await open({ memoryBytes: KiB, diskBytes: 2 * KiB, diskPath: dir });
    assert.deepEqual(third.stats().disk, { bytes: 2 * KiB, chunks: 2 });
    assert.equal(chunkFileBytes(dir), 2 * KiB);
    assert.deepEqual(chunks.slice(0, 4).map((x) => third.has(x.hash)), [false, false, true, true]);
    assert.ok(existsSync(path.join(dir, 'README')));
    await third.close();
  });

  it('close() waits for the disk writes in flight', async () => {
    const dir = fresh('disk');
    const cache = await open({ memoryBytes: KiB, diskBytes: 256 * KiB, diskPath: dir });
    const chunks = Array.from({ length: 50 }, () => chunk());
    for (const x of chunks) cache.put(x.hash, x.buf); // 49 demotions queued
    const stuck = chunk();
    void cache.get(stuck.hash, KiB, () => new Promise<Buffer>(() => {})); // a fetch that never answers does not hold close() up
    await cache.close();
    assert.equal(chunkFileBytes(dir), 49 * KiB);
    assert.ok(filesUnder(dir).every((f) => !f.includes('.pico-tmp-')));
    await assert.rejects(cache.get(chunks[0]!.hash, KiB, fetcher(chunks[0]!)), (e) => isPicoError(e, 'PICO_ERR_SHUTTING_DOWN'));
  });

  it('an unusable disk path at open degrades to memory only', async () => {
    const blocker = fresh('file');
    writeFileSync(blocker, 'a file where a directory should be');
    const { log, lines } = capturingLogger();
    const cache = await open({ memoryBytes: KiB, diskBytes: 64 * KiB, diskPath: path.join(blocker, 'cache'), log });
    const [a, b] = [chunk(), chunk()] as [Chunk, Chunk];
    assert.equal((await cache.get(a.hash, KiB, fetcher(a))).from, 'fetch');
    assert.equal((await cache.get(b.hash, KiB, fetcher(b))).from, 'fetch');
    assert.equal((await cache.get(b.hash, KiB, fetcher(b))).from, 'memory');
    assert.equal((await cache.get(a.hash, KiB, fetcher(a))).from, 'fetch', 'evicted, nowhere to demote to');
    await cache.flush();
    assert.deepEqual(cache.stats().disk, { bytes: 0, chunks: 0 });
    assert.equal(lines.filter((l) => l.level === 40).length, 1);
    await cache.close();
  });

  it('disk write failures after open never fail a get and are logged once', async () => {
    const dir = fresh('disk');
    const { log, lines } = capturingLogger();
    const cache = await open({ memoryBytes: KiB, diskBytes: 64 * KiB, diskPath: dir, log });
    // the directory disappears and a file takes its place: every write fails (ENOTDIR)
    rmSync(dir, { recursive: true });
    writeFileSync(dir, 'in the way');
    const chunks = Array.from({ length: 6 }, () => chunk());
    for (const x of chunks) assert.equal((await cache.get(x.hash, KiB, fetcher(x))).from, 'fetch');
    await until(async () => {
      await cache.flush();
      return cache.stats().disk.chunks === 0;
    }, 'failed writes to leave the disk index');
    for (const x of chunks.slice(0, 5)) assert.equal(cache.has(x.hash), false);
    assert.equal((await cache.get(chunks[0]!.hash, KiB, fetcher(chunks[0]!))).from, 'fetch');
    assert.equal((await cache.get(chunks[0]!.hash, KiB, fetcher(chunks[0]!))).from, 'memory');
    await cache.flush();
    const warns = lines.filter((l) => l.level === 40);
    assert.equal(warns.length, 1, JSON.stringify(warns));
    assert.equal(warns[0]!.op, 'write');
    assert.ok(lines.filter((l) => l.level === 20 && l.op === 'write').length >= 4, 'later ones at debug');
    await cache.close();
    assert.equal(readFileSync(dir, 'utf8'), 'in the way', 'nothing written outside the disk path');
  });

  it('a chunk being written to disk is served from its buffer meanwhile', async () => {
    const dir = fresh('disk');
    const cache = await open({ memoryBytes: KiB, diskBytes: 64 * KiB, diskPath: dir });
    const [a, b] = [chunk(), chunk()] as [Chunk, Chunk];
    cache.put(a.hash, a.buf);
    cache.put(b.hash, b.buf); // a's write is queued, not yet done
    assert.ok(cache.has(a.hash));
    assert.equal(cache.cachedBytes([a.hash, b.hash]), 2 * KiB);
    const f = fetcher(a);
    const got = await cache.get(a.hash, KiB, f);
    assert.deepEqual(got.buf, a.buf);
    assert.equal(f.calls, 0);
    await cache.close();
  });
});

/** get with a counting fetcher, for loops. */
function cache_get(cache: ChunkCache, x: Chunk) {
  return cache.get(x.hash, x.buf.length, fetcher(x));
}
