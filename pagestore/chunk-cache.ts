/*
 * The worker's chunk cache: verified chunks of images, kept in memory and optionally on a local
 * disk, so that a lazy restore reads most of its chunks without a round trip to the page store.
 *
 *   get(hash, size, fetch)
 *     │ memory tier ── hit ─────────────────────────────────────────────► { buf, from: 'memory' }
 *     │ (also: a chunk still being written to disk is served from its buffer, as 'memory')
 *     ▼ miss: one flight per hash, shared by every concurrent get of it
 *   disk tier ── read, sha256 ── ok ── kept in memory ────────────────► { buf, from: 'disk' }
 *     │                         bad ── file deleted, `corrupt`++, logged ─┐
 *     ▼ absent / unreadable ◄──────────────────────────────────────────────┘
 *   fetch() ── sha256 + size ── ok ── kept in memory (or on disk when
 *                             │       memory is off or too small) ──────► { buf, from: 'fetch' }
 *                            bad ── PICO_ERR_IMAGE_CORRUPT, nothing kept
 *
 *   memory eviction (LRU by bytes) ──► demoted to disk: written asynchronously
 *   disk eviction (LRU by bytes) ─────► file deleted
 *
 * Layout of the disk tier: DIR/<hash[0:2]>/<hash>, one file per chunk. A write goes to
 * DIR/<hash[0:2]>/.pico-tmp-<random>-<hash> and is renamed into place, so a crashed process never
 * leaves a partial chunk under its final name. Writes are not fsynced (this is a cache): after a
 * machine crash a final name may hold a torn file, which the sha256 check on every disk read
 * detects and deletes. open() re-indexes what is there (names and sizes only; recency by mtime),
 * deletes leftover temp files and evicts down to `diskBytes`. Files whose names are not chunk
 * names are left alone; nothing is ever written outside DIR.
 *
 * Invariants and races:
 * - The disk index (hash → size) is what the bound applies to. A chunk's bytes are reserved in
 *   it *before* its file is written, so the chunk files and in-flight writes together never
 *   exceed `diskBytes` (apart from files whose delete is still queued).
 * - Every file operation on one hash (write, delete) runs through one queue per hash, in the
 *   order it was decided: a delete decided before a rewrite can never remove the rewritten file.
 *   Reads are not queued: a read racing a delete sees ENOENT and falls through to fetch; a read
 *   racing a rename sees the whole old file or the whole new one (same bytes: content-addressed).
 * - Disk I/O failures (full, read-only, permissions, a file where the directory should be) never
 *   fail a get: the chunk is served from memory or fetched. Each kind (operation + errno) is
 *   logged once at warn, then at debug.
 * - Buffers handed out are the cached ones: callers must not modify them (the FUSE read handler
 *   copies them into the kernel's buffer). Buffers given to put() or returned by fetch() become
 *   the cache's: the caller must not modify or reuse them either.
 */
import { randomBytes } from 'node:crypto';
import { lstat, mkdir, readdir, readFile, rename, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { LRUCache } from 'lru-cache';
import { PicoError } from '../shared/errors.js';
import { silentLogger, type Logger } from '../shared/log.js';
import { sha256 } from './chunked-image-store.js';
import { TEMP_PREFIX } from './object-store.js';

export interface ChunkCacheOptions {
  /** in bytes; 0 disables the memory tier */
  memoryBytes: number;
  /** in bytes; 0 or absent: no disk tier */
  diskBytes?: number;
  /** directory of the disk tier (created; chunks as files named by hash, e.g. DIR/ab/abcdef…); required when diskBytes > 0 */
  diskPath?: string;
  /** default: silentLogger() */
  log?: Logger;
}

/** Where a get found its chunk. */
export type ChunkSourceKind = 'memory' | 'disk' | 'fetch';

export interface ChunkCacheStats {
  /** chunks held in memory; bytes in bytes */
  memory: { bytes: number; chunks: number };
  /** chunks on disk, including writes in flight (their bytes are reserved) */
  disk: { bytes: number; chunks: number };
  /** gets answered from memory (each call); disk reads that verified (one per flight) */
  hits: { memory: number; disk: number };
  /** fetches (one per flight: concurrent gets sharing one fetch count once) */
  misses: number;
  /** chunks dropped from either tier to make room (a memory eviction that demotes to disk counts too) */
  evictions: number;
  /** chunks that failed their sha256 or size: fetched ones rejected, disk files deleted */
  corrupt: number;
}

const HASH = /^[0-9a-f]{64}$/;
const SUBDIR = /^[0-9a-f]{2}$/;

function errnoOf(err: unknown): string {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : 'unknown';
}

function checkHash(hash: string): void {
  if (typeof hash !== 'string' || !HASH.test(hash)) {
    throw new PicoError('PICO_ERR_IMAGE_CORRUPT', `not a chunk hash (64 lowercase hex): ${JSON.stringify(hash)}`);
  }
}

/** lru-cache sizes must be positive integers; an empty chunk is accounted as one byte. */
const sizeOf = (bytes: number): number => Math.max(1, bytes);

/**
 * A buffer that owns its memory: a view into a larger allocation (a slice of a pooled buffer)
 * would pin all of it while the cache accounts only for the view.
 */
function owned(buf: Buffer): Buffer {
  if (buf.byteOffset === 0 && buf.buffer.byteLength === buf.length) return buf;
  const copy = Buffer.allocUnsafeSlow(buf.length);
  buf.copy(copy);
  return copy;
}

function checkBytes(name: string, value: number | undefined, required: boolean): number {
  if (value === undefined && !required) return 0;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw new PicoError('PICO_ERR_CONFIG', `chunk cache: ${name} must be a non-negative integer number of bytes, got ${String(value)}`);
  }
  return value;
}

type Loaded = { buf: Buffer; from: ChunkSourceKind };

export class ChunkCache {
  private readonly log: Logger;
  private readonly memoryBytes: number;
  private readonly diskBytes: number;
  private readonly diskPath: string | undefined;
  /** hash → verified bytes; null when memoryBytes is 0 */
  private readonly memory: LRUCache<string, Buffer> | null;
  /** hash → size of the chunk file (or of its write in flight); null without a usable disk tier */
  private disk: LRUCache<string, number> | null = null;
  /** chunks whose disk write is queued or running: hash → their verified bytes */
  private readonly writing = new Map<string, Buffer>();
  /** the tail of each hash's queue of file operations */
  private readonly fileOps = new Map<string, Promise<void>>();
  /** single flight: the disk read or fetch in progress for a hash */
  private readonly flights = new Map<string, Promise<Loaded>>();
  /** `op:errno` of disk failures already logged at warn */
  private readonly loggedFailures = new Set<string>();
  private readonly counts = { memoryHits: 0, diskHits: 0, misses: 0, evictions: 0, corrupt: 0 };
  private closed = false;

  private constructor(opts: ChunkCacheOptions) {
    this.log = opts.log ?? silentLogger();
    this.memoryBytes = checkBytes('memoryBytes', opts.memoryBytes, true);
    this.diskBytes = checkBytes('diskBytes', opts.diskBytes, false);
    if (this.diskBytes > 0 && !opts.diskPath) throw new PicoError('PICO_ERR_CONFIG', 'chunk cache: diskBytes is set but diskPath is not');
    this.diskPath = this.diskBytes > 0 && opts.diskPath ? path.resolve(opts.diskPath) : undefined;
    this.memory =
      this.memoryBytes > 0
        ? new LRUCache<string, Buffer>({
            maxSize: this.memoryBytes,
            sizeCalculation: (buf) => sizeOf(buf.length),
            // Synchronous, inside the set() that evicts: demotion only touches the disk index.
            dispose: (buf, hash, reason) => {
              if (reason !== 'evict') return;
              this.counts.evictions++;
              this.toDisk(hash, buf);
            },
          })
        : null;
  }

  /** Opens the cache; with a disk tier, creates or re-indexes its directory. Never fails on disk trouble (the tier is then off). */
  static async open(opts: ChunkCacheOptions): Promise<ChunkCache> {
    const cache = new ChunkCache(opts);
    if (cache.diskPath) await cache.openDisk(cache.diskPath);
    return cache;
  }

  /**
   * The verified bytes of chunk `hash` (`size` bytes): from memory, else disk, else `fetch()`.
   * Concurrent calls for one hash share one disk read or fetch (single flight). A fetched chunk
   * is checked (sha256 and size) before it is cached or returned; a bad one rejects with
   * PICO_ERR_IMAGE_CORRUPT and is not cached (`fetchVerifies`: `fetch` checks the sha256 itself,
   * only the size is checked here). fetch errors propagate unchanged (and the next get fetches
   * again). The returned buffer is the cache's own: do not modify it.
   */
  async get(hash: string, size: number, fetch: () => Promise<Buffer>, opts: { fetchVerifies?: boolean } = {}): Promise<{ buf: Buffer; from: ChunkSourceKind }> {
    checkHash(hash);
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`chunk ${hash}: size must be a non-negative integer, got ${size}`);
    if (this.closed) throw new PicoError('PICO_ERR_SHUTTING_DOWN', `chunk cache is closed (get of chunk ${hash})`);

    const held = this.memory?.get(hash) ?? this.writing.get(hash);
    if (held) {
      this.counts.memoryHits++;
      return { buf: this.sized(hash, held, size), from: 'memory' };
    }
    let flight = this.flights.get(hash);
    if (!flight) {
      const started = this.load(hash, size, fetch, opts.fetchVerifies ?? false);
      const done = () => {
        if (this.flights.get(hash) === started) this.flights.delete(hash);
      };
      started.then(done, done);
      this.flights.set(hash, started);
      flight = started;
    }
    const { buf, from } = await flight;
    return { buf: this.sized(hash, buf, size), from };
  }

  /**
   * Puts already-verified bytes in (e.g. a chunk a checkpoint just uploaded): they are not hashed
   * again here. `buf` becomes the cache's: the caller must not modify or reuse it.
   */
  put(hash: string, buf: Buffer): void {
    checkHash(hash);
    if (this.closed) return;
    this.keep(hash, owned(buf));
  }

  /** Whether the chunk is in either tier (no I/O; a disk file is verified only when read). */
  has(hash: string): boolean {
    return (this.memory?.has(hash) ?? false) || this.writing.has(hash) || (this.disk?.has(hash) ?? false);
  }

  /** Bytes of these chunks the cache holds, either tier, each distinct chunk once (no I/O, no recency change). */
  cachedBytes(hashes: Iterable<string>): number {
    let total = 0;
    const seen = new Set<string>();
    for (const hash of hashes) {
      if (seen.has(hash)) continue;
      seen.add(hash);
      const bytes = this.memory?.peek(hash)?.length ?? this.writing.get(hash)?.length ?? this.disk?.peek(hash);
      if (bytes !== undefined) total += bytes;
    }
    return total;
  }

  stats(): ChunkCacheStats {
    return {
      memory: { bytes: this.memory?.calculatedSize ?? 0, chunks: this.memory?.size ?? 0 },
      disk: { bytes: this.disk?.calculatedSize ?? 0, chunks: this.disk?.size ?? 0 },
      hits: { memory: this.counts.memoryHits, disk: this.counts.diskHits },
      misses: this.counts.misses,
      evictions: this.counts.evictions,
      corrupt: this.counts.corrupt,
    };
  }

  /** Resolves when every disk write and delete decided so far has finished (never rejects). */
  async flush(): Promise<void> {
    while (this.fileOps.size > 0) await Promise.all(this.fileOps.values());
  }

  /**
   * Stops taking chunks in (get rejects PICO_ERR_SHUTTING_DOWN; a fetch still in flight is
   * returned to its callers but not kept), waits for in-flight disk writes and deletes, and drops
   * the memory tier. The disk tier stays for the next open(). No file operation starts after it.
   */
  async close(): Promise<void> {
    this.closed = true;
    await this.flush();
    this.memory?.clear();
  }

  // ---- internals -------------------------------------------------------------------------------

  /** A verified chunk whose length must also match what the caller's manifest says. */
  private sized(hash: string, buf: Buffer, size: number): Buffer {
    if (buf.length !== size) {
      throw new PicoError('PICO_ERR_IMAGE_CORRUPT', `chunk ${hash} is ${buf.length} bytes, not the ${size} the image says`);
    }
    return buf;
  }

  /** One flight: the disk tier, else fetch. */
  private async load(hash: string, size: number, fetch: () => Promise<Buffer>, fetchVerifies: boolean): Promise<Loaded> {
    if (this.disk?.get(hash) !== undefined) {
      // (get, not has: a disk hit makes the chunk the most recently used there too)
      const buf = await this.readDisk(hash);
      if (buf) {
        this.counts.diskHits++;
        this.keep(hash, buf);
        return { buf, from: 'disk' };
      }
    }
    this.counts.misses++;
    const got = await fetch();
    // A fetch that checks the sha256 itself (the page store's getChunk) is not hashed twice.
    const hashOk = Buffer.isBuffer(got) && (fetchVerifies || sha256(got) === hash);
    if (!hashOk || got.length !== size) {
      this.counts.corrupt++;
      const bytes = Buffer.isBuffer(got) ? got.length : undefined;
      this.log.warn({ chunk: hash, bytes, expectedBytes: size }, 'chunk cache: fetched chunk failed its checksum; not cached');
      throw new PicoError(
        'PICO_ERR_IMAGE_CORRUPT',
        hashOk ? `fetched chunk ${hash} is ${bytes} bytes, not the ${size} the image says` : `fetched chunk ${hash} failed its sha256 (${bytes ?? 'no'} bytes)`,
      );
    }
    const buf = owned(got);
    this.keep(hash, buf);
    return { buf, from: 'fetch' };
  }

  /** Keeps verified bytes: in memory when they fit there, else on disk. */
  private keep(hash: string, buf: Buffer): void {
    if (this.closed) return;
    if (this.memory && sizeOf(buf.length) <= this.memoryBytes) this.memory.set(hash, buf);
    else this.toDisk(hash, buf);
  }

  /** Reserves the chunk's bytes in the disk index and queues its write (or just marks it used). */
  private toDisk(hash: string, buf: Buffer): void {
    const disk = this.disk;
    if (!disk || this.closed || sizeOf(buf.length) > this.diskBytes || this.writing.has(hash)) return;
    if (disk.get(hash) !== undefined) return; // already there: now most recently used
    disk.set(hash, buf.length); // may evict others: their deletes are queued
    this.writing.set(hash, buf);
    this.queue(hash, async () => {
      try {
        await this.writeChunkFile(hash, buf);
      } catch (err) {
        this.diskFailure('write', err, hash);
        this.writing.delete(hash);
        this.disk?.delete(hash); // queues a delete after this write: removes nothing, harmlessly
        return;
      }
      this.writing.delete(hash);
    });
  }

  private chunkFile(hash: string): string {
    return path.join(this.diskPath!, hash.slice(0, 2), hash);
  }

  private async writeChunkFile(hash: string, buf: Buffer): Promise<void> {
    const final = this.chunkFile(hash);
    const dir = path.dirname(final);
    const tmp = path.join(dir, `${TEMP_PREFIX}${randomBytes(6).toString('hex')}-${hash}`);
    try {
      try {
        await writeFile(tmp, buf, { flag: 'wx' });
      } catch (err) {
        if (errnoOf(err) !== 'ENOENT') throw err;
        await mkdir(dir, { recursive: true });
        await writeFile(tmp, buf, { flag: 'wx' });
      }
      await rename(tmp, final);
    } catch (err) {
      await unlink(tmp).catch(() => {});
      throw err;
    }
  }

  /** The verified bytes of a disk chunk, or undefined (absent, unreadable or corrupt: then dropped). */
  private async readDisk(hash: string): Promise<Buffer | undefined> {
    let buf: Buffer;
    try {
      buf = await readFile(this.chunkFile(hash));
    } catch (err) {
      if (errnoOf(err) === 'ENOENT') this.log.debug({ chunk: hash }, 'chunk cache: disk chunk vanished; fetching it');
      else this.diskFailure('read', err, hash);
      if (!this.writing.has(hash)) this.disk?.delete(hash);
      return undefined;
    }
    if (sha256(buf) !== hash) {
      this.counts.corrupt++;
      this.log.warn({ chunk: hash, bytes: buf.length, file: this.chunkFile(hash) }, 'chunk cache: disk chunk failed its checksum; deleted, fetching it again');
      if (!this.writing.has(hash)) this.disk?.delete(hash);
      return undefined;
    }
    return owned(buf);
  }

  private async deleteChunkFile(hash: string): Promise<void> {
    try {
      await unlink(this.chunkFile(hash));
    } catch (err) {
      // ENOTDIR: the directory is gone (a file took its place): there is no chunk file either
      if (!['ENOENT', 'ENOTDIR'].includes(errnoOf(err))) this.diskFailure('delete', err, hash);
    }
  }

  /** Runs `op` after every file operation already queued for `hash`. `op` handles its own errors. */
  private queue(hash: string, op: () => Promise<void>): void {
    // After close() nothing new starts: a delete skipped here leaves a file the next open() indexes
    // and the next read verifies; a write skipped leaves nothing.
    if (this.closed) return;
    const prev = this.fileOps.get(hash) ?? Promise.resolve();
    const next = prev.then(op).catch((err: unknown) => this.diskFailure('queue', err, hash));
    this.fileOps.set(hash, next);
    void next.then(() => {
      if (this.fileOps.get(hash) === next) this.fileOps.delete(hash);
    });
  }

  private diskFailure(op: string, err: unknown, hash?: string): void {
    const errno = errnoOf(err);
    const kind = `${op}:${errno}`;
    const fields = { op, errno, diskPath: this.diskPath, chunk: hash, err };
    if (this.loggedFailures.has(kind)) {
      this.log.debug(fields, `chunk cache: disk tier ${op} failed (${errno})`);
    } else {
      this.loggedFailures.add(kind);
      this.log.warn(fields, `chunk cache: disk tier ${op} failed (${errno}); serving from memory and the page store (logged once per kind)`);
    }
  }

  /** Creates or re-indexes the disk tier; on failure the cache runs without it. */
  private async openDisk(dir: string): Promise<void> {
    const found: Array<{ hash: string; size: number; mtimeMs: number }> = [];
    try {
      await mkdir(dir, { recursive: true });
      for (const sub of await readdir(dir, { withFileTypes: true })) {
        if (!sub.isDirectory() || !SUBDIR.test(sub.name)) continue;
        const subdir = path.join(dir, sub.name);
        for (const e of await readdir(subdir, { withFileTypes: true })) {
          if (!e.isFile()) continue; // symlinks and directories are not ours
          const file = path.join(subdir, e.name);
          if (e.name.startsWith(TEMP_PREFIX)) {
            await unlink(file).catch((err: unknown) => this.diskFailure('delete', err));
          } else if (HASH.test(e.name) && e.name.startsWith(sub.name)) {
            const st = await lstat(file).catch(() => undefined);
            if (st?.isFile()) found.push({ hash: e.name, size: st.size, mtimeMs: st.mtimeMs });
          }
        }
      }
    } catch (err) {
      this.diskFailure('open', err);
      return; // no disk tier
    }
    const disk = new LRUCache<string, number>({
      maxSize: this.diskBytes,
      sizeCalculation: (size) => sizeOf(size),
      // Anything leaving the index loses its file; the delete is queued behind the hash's writes.
      dispose: (_size, hash, reason) => {
        if (reason === 'set') return;
        if (reason === 'evict') this.counts.evictions++;
        this.queue(hash, () => this.deleteChunkFile(hash));
      },
    });
    this.disk = disk;
    // Oldest first, so the newest end up most recently used; set() evicts down to the bound.
    found.sort((a, b) => a.mtimeMs - b.mtimeMs);
    for (const f of found) {
      if (sizeOf(f.size) > this.diskBytes) this.queue(f.hash, () => this.deleteChunkFile(f.hash));
      else disk.set(f.hash, f.size);
    }
    await this.flush();
    this.log.debug({ diskPath: dir, chunks: disk.size, bytes: disk.calculatedSize }, 'chunk cache: disk tier opened');
  }
}
