/*
 * The chunked image format: ImageStore on any ObjectStore.
 *
 * Layout in the object store (format 2; format 1 is still read):
 *
 *   chunks/<sha256[0:2]>/<sha256>        content-addressed chunk: a run of bytes of one image
 *                                        file, cut by page-aligned CDC (chunker.ts): whole 4 KiB
 *                                        pages except at a file's end, 1 .. chunkSize bytes;
 *                                        shared by every generation and app whose files contain
 *                                        those bytes
 *   apps/<app>/<generation:10 digits>.json
 *                                        the manifest: format 2, app, generation, createdAt,
 *                                        chunking { kind: 'pages', minPages, avgPages, maxPages },
 *                                        chunkSize (= maxPages · 4096, the largest chunk),
 *                                        files [{ path, size, mode, chunks: [sha256],
 *                                        sizes: [bytes] }] (sizes parallel to chunks, summing to
 *                                        size), checksum = sha256 of the canonical JSON (keys
 *                                        sorted, no whitespace) of the manifest without `checksum`
 *   Format 1 (older images): no `chunking`, no `sizes`; every chunk is `chunkSize` bytes but a
 *   file's last. fileChunks() (image-store.ts) gives the chunk offsets and sizes of either.
 *
 * put(app, dir), in this order:
 *   1. walk `dir` (subdirectories too; regular files only), stream each file through a window
 *      and cut it into chunks (chunker.ts), sha256 each
 *   2. upload each chunk the store lacks (head first), at most `concurrency` chunks in flight —
 *      also the bound on chunk buffers held in memory
 *   3. read every chunk back and check its sha256 — the deduplicated ones too, so a damaged
 *      stored chunk is found and written again from `dir` instead of being referenced again
 *   4. write the manifest LAST, exclusively (a generation is never overwritten): before this step
 *      nothing of the new image is visible to latest(); after it, all its chunks are stored
 *   5. read the manifest back against its checksum, and head() every chunk once more (see the
 *      collection race below; a chunk found gone is written again). A failure deletes the
 *      manifest again and rejects: the caller keeps its container.
 * Puts and prunes of one app run one at a time in this process; another process writing the
 * same generation loses the exclusive write and takes the next number.
 *
 * Garbage collection invariant (prune): a chunk is deleted only if, at the moment of its
 * deletion, (a) no manifest listed after the collection started references it, (b) no put of
 * this process has registered it since the collection started or holds it now, and (c) it was
 * last written more than `gcGraceMs` ago. (b) protects puts in this process: a put registers
 * each chunk before its head() and keeps it until its manifest is written (or it fails), and a
 * put that registers a chunk whose deletion is in flight waits for that deletion, then uploads
 * the chunk again. (c) protects puts of other processes sharing the store, as long as no put
 * takes longer than the grace period from its first upload to its manifest. The one race (c)
 * cannot close: another process's put dedups against an old orphaned chunk that this
 * collection then deletes; that put's step 5 finds the chunk gone and writes it again, and a
 * restore started in between fails cleanly with PICO_ERR_IMAGE_MISSING.
 */
import { createHash, randomBytes } from 'node:crypto';
import { lstat, mkdir, open, readdir, rename, rmdir, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { isPicoError, PicoError, type ErrorCode } from '../shared/errors.js';
import { silentLogger, type Logger } from '../shared/log.js';
import { Bounded, BufferPool, mapBounded } from './bounded.js';
import { chunkingProblem, maxChunkBytes, nextChunkLength, pageChunking, type PageChunking } from './chunker.js';
import { fileChunks, IMAGE_FORMAT_VERSION, READABLE_IMAGE_FORMATS, type ImageFile, type ImageManifest, type ImageStore, type PruneStats, type PutStats } from './image-store.js';
import { isNotFound, ObjectExistsError, type ObjectStore } from './object-store.js';

export const DEFAULT_CONCURRENCY = 8;
/** in bytes: put reads each file through a window this big (or 4 chunks, if larger) */
export const PUT_WINDOW_BYTES = 4 << 20;
/** in ms */
export const DEFAULT_GC_GRACE_MS = 60 * 60 * 1000;
/** in ms */
export const DEFAULT_COLLECT_EVERY_MS = 10 * 60 * 1000;

export interface ChunkedImageStoreOptions {
  store: ObjectStore;
  /**
   * How new images are cut into chunks (a manifest records its own): page-aligned CDC, each
   * field defaulting to DEFAULT_PAGE_CHUNKING (min 4, avg 16, max 64 pages). min = max gives
   * fixed chunks of that many pages.
   */
  chunking?: Partial<PageChunking>;
  /** Chunks in flight per put, get and collection; also bounds put/get memory to about this many chunks. Default 8. */
  concurrency?: number;
  /** Chunks written less than this long ago (ms) are never collected; 0 relies on in-process tracking alone. Default 1 h. */
  gcGraceMs?: number;
  /**
   * prune(app) collects chunks only if the last collection of this instance started at least
   * this long ago (ms); a collection reads every manifest of every app. 0: on every prune.
   * Default 10 min.
   */
  collectEveryMs?: number;
  log?: Logger;
  /** Clock for the grace period (ms since the epoch). Default Date.now. */
  now?: () => number;
}

/** What `put` reports, beyond the interface's two byte counts. */
export interface ChunkedPutStats extends PutStats {
  /** chunks in the image */
  chunks: number;
  /** chunks uploaded (the rest were already stored) */
  uploadedChunks: number;
}

export interface GenerationStatus {
  generation: number;
  /** the manifest parses and its checksum verifies */
  ok: boolean;
  /** why not, when not ok */
  error?: string;
}

const HASH = /^[0-9a-f]{64}$/;
const APP = /^[a-z0-9][a-z0-9._-]{0,127}$/i;
const GENERATION_DIGITS = 10;
const MANIFEST_KEY = /^apps\/([^/]+)\/(\d{10,})\.json$/;
const CHUNK_KEY = /^chunks\/[0-9a-f]{2}\/([0-9a-f]{64})$/;
const PARTIAL_PREFIX = '.pico-partial-';

export function chunkKey(hash: string): string {
  return `chunks/${hash.slice(0, 2)}/${hash}`;
}

export function manifestKey(app: string, generation: number): string {
  return `apps/${app}/${String(generation).padStart(GENERATION_DIGITS, '0')}.json`;
}

export function sha256(data: Buffer | string): string {
  return createHash('sha256').update(data).digest('hex');
}

/** JSON with object keys sorted and no whitespace: the form the manifest checksum is taken over. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    const obj = value as Record<string, unknown>;
    const parts = Object.keys(obj)
      .filter((k) => obj[k] !== undefined)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonicalJson(obj[k])}`);
    return `{${parts.join(',')}}`;
  }
  return JSON.stringify(value);
}

/**
 * Whether `text`, a document stored as canonicalJson of itself with its `checksum` member, holds
 * that checksum: the stored bytes with the member taken out are the very string the writer hashed,
 * so the canonical form need not be built again (~10 ms for the benchmark's 300 MB image's
 * manifest, on the way to every restore). `checksum` must be the top-level member of `text`
 * parsed: if the rest hashes to it, the rest is the writer's string (sha256), and the member can
 * only have stood between the writer's top-level members (anywhere else `text` would not parse
 * with it at the top), so `text` parses to the writer's document. False says nothing: the caller
 * checks the slow way (a document written another way, e.g. with whitespace).
 */
export function storedChecksumHolds(text: string, checksum: string): boolean {
  const member = `${JSON.stringify('checksum')}:${JSON.stringify(checksum)}`;
  const at = text.indexOf(member);
  if (at < 0) return false;
  const end = at + member.length;
  // Followed by another member, or the last one (then preceded by a comma), or the only one.
  const rest = text[end] === ',' ? text.slice(0, at) + text.slice(end + 1) : text[at - 1] === ',' ? text.slice(0, at - 1) + text.slice(end) : text.slice(0, at) + text.slice(end);
  return sha256(rest) === checksum;
}

/** The checksum a manifest must carry. */
export function manifestChecksum(manifest: Omit<ImageManifest, 'checksum'> & { checksum?: string }): string {
  const { checksum: _ignored, ...rest } = manifest;
  return sha256(canonicalJson(rest));
}

/** True when `p` is a safe relative '/'-path for an image file. */
function safeFilePath(p: unknown): p is string {
  if (typeof p !== 'string' || p === '' || p.startsWith('/') || p.includes('\0') || p.includes('\\')) return false;
  return p.split('/').every((s) => s !== '' && s !== '.' && s !== '..' && !s.startsWith(PARTIAL_PREFIX));
}

/**
 * Checks the shape and checksum of a manifest (parsed JSON or an object a caller holds);
 * throws PICO_ERR_IMAGE_CORRUPT saying what is wrong. `expect` pins app and generation to the
 * key the manifest was read from.
 */
export function checkManifest(value: unknown, expect?: { app: string; generation: number }): ImageManifest {
  return checkManifestAs(value, expect);
}

/** checkManifest; `stored`: the text `value` was parsed from, whose checksum may be checked on it (storedChecksumHolds). */
function checkManifestAs(value: unknown, expect: { app: string; generation: number } | undefined, stored?: string): ImageManifest {
  const where = expect ? `manifest of app "${expect.app}" generation ${expect.generation}` : 'manifest';
  const bad = (why: string): never => {
    throw new PicoError('PICO_ERR_IMAGE_CORRUPT', `${where}: ${why}`);
  };
  if (value === null || typeof value !== 'object' || Array.isArray(value)) bad('not a JSON object');
  const m = value as Record<string, unknown>;
  if (typeof m.format !== 'number' || !READABLE_IMAGE_FORMATS.includes(m.format)) {
    bad(`unsupported format ${JSON.stringify(m.format)} (this version reads ${READABLE_IMAGE_FORMATS.join(', ')})`);
  }
  const format = m.format as number;
  if (typeof m.app !== 'string' || !APP.test(m.app)) bad('bad app');
  if (!Number.isSafeInteger(m.generation) || (m.generation as number) < 1) bad('bad generation');
  if (expect && (m.app !== expect.app || m.generation !== expect.generation)) {
    bad(`names app "${String(m.app)}" generation ${String(m.generation)}`);
  }
  if (typeof m.createdAt !== 'string') bad('bad createdAt');
  const chunkSize = m.chunkSize;
  if (!Number.isSafeInteger(chunkSize) || (chunkSize as number) < 1) bad('bad chunkSize');
  if (format >= 2) {
    const c = m.chunking as Record<string, unknown> | null | undefined;
    if (c === null || typeof c !== 'object' || c.kind !== 'pages') bad('bad chunking');
    const why = chunkingProblem(c as unknown as PageChunking);
    if (why) bad(`bad chunking: ${why}`);
    if (chunkSize !== maxChunkBytes(c as unknown as PageChunking)) bad(`chunkSize ${String(chunkSize)} is not the chunking's largest chunk`);
  } else if (m.chunking !== undefined) {
    bad('format 1 has no chunking');
  }
  if (!Array.isArray(m.files)) bad('files is not an array');
  const seen = new Set<string>();
  for (const [i, f] of (m.files as unknown[]).entries()) {
    const file = f as Partial<ImageFile> | null;
    if (file === null || typeof file !== 'object') bad(`files[${i}] is not an object`);
    if (!safeFilePath(file!.path)) bad(`files[${i}] has an unsafe path ${JSON.stringify(file!.path)}`);
    if (seen.has(file!.path!)) bad(`file ${file!.path} appears twice`);
    seen.add(file!.path!);
    if (!Number.isSafeInteger(file!.size) || file!.size! < 0) bad(`file ${file!.path} has a bad size`);
    if (!Number.isInteger(file!.mode) || file!.mode! < 0 || file!.mode! > 0o7777) bad(`file ${file!.path} has a bad mode`);
    if (!Array.isArray(file!.chunks) || !file!.chunks.every((h) => typeof h === 'string' && HASH.test(h))) {
      bad(`file ${file!.path} has bad chunk hashes`);
    }
    if (format === 1) {
      if (file!.sizes !== undefined) bad(`file ${file!.path}: format 1 has no chunk sizes`);
      if (file!.chunks!.length !== Math.ceil(file!.size! / (chunkSize as number))) {
        bad(`file ${file!.path}: ${file!.chunks!.length} chunks do not cover ${file!.size} bytes`);
      }
    } else {
      const sizes = file!.sizes;
      if (!Array.isArray(sizes) || sizes.length !== file!.chunks!.length) bad(`file ${file!.path}: chunk sizes do not match its chunks`);
      let sum = 0;
      for (const n of sizes!) {
        if (!Number.isSafeInteger(n) || n < 1 || n > (chunkSize as number)) bad(`file ${file!.path} has a bad chunk size ${JSON.stringify(n)}`);
        sum += n;
      }
      if (sum !== file!.size) bad(`file ${file!.path}: chunks of ${sum} bytes do not cover ${file!.size} bytes`);
    }
  }
  if (typeof m.checksum !== 'string' || !HASH.test(m.checksum)) bad('no checksum');
  if (stored !== undefined && storedChecksumHolds(stored, m.checksum as string)) return m as unknown as ImageManifest;
  const want = manifestChecksum(m as unknown as ImageManifest);
  if (want !== m.checksum) bad(`checksum mismatch (stored ${m.checksum as string}, computed ${want})`);
  return m as unknown as ImageManifest;
}

/** Parses and checks the bytes of a stored manifest. */
export function parseManifest(body: Buffer, expect?: { app: string; generation: number }): ImageManifest {
  let value: unknown;
  const text = body.toString('utf8');
  try {
    value = JSON.parse(text);
  } catch (err) {
    const where = expect ? `manifest of app "${expect.app}" generation ${expect.generation}` : 'manifest';
    throw new PicoError('PICO_ERR_IMAGE_CORRUPT', `${where}: not valid JSON`, { cause: err });
  }
  return checkManifestAs(value, expect, text);
}

function checkApp(app: string): void {
  if (typeof app !== 'string' || !APP.test(app)) {
    throw new PicoError('PICO_ERR_STORE', `invalid app name ${JSON.stringify(app)} for the page store`);
  }
}

/** Adds what this layer was doing to an error, keeping its code. */
function withContext(err: unknown, what: string, fallback: ErrorCode = 'PICO_ERR_STORE'): PicoError {
  const code = err instanceof PicoError ? err.code : fallback;
  const msg = err instanceof Error ? err.message : String(err);
  return new PicoError(code, `${what}: ${msg}`, { cause: err });
}

/*
 * Chunks that puts of this process are using, and the collections in progress, per store
 * location (every ChunkedImageStore of this process on one store shares it). See the invariant
 * at the top.
 */
class ChunkRegistry {
  private readonly pending = new Map<string, number>();
  private readonly collections = new Set<Set<string>>();
  private readonly deleting = new Map<string, Promise<void>>();

  /** A put is about to rely on chunk `hash` (upload it or find it stored). */
  async hold(hash: string): Promise<void> {
    this.pending.set(hash, (this.pending.get(hash) ?? 0) + 1);
    for (const touched of this.collections) touched.add(hash);
    const d = this.deleting.get(hash);
    if (d) await d.catch(() => {});
  }

  release(hashes: Iterable<string>): void {
    for (const h of hashes) {
      const n = (this.pending.get(h) ?? 1) - 1;
      if (n > 0) this.pending.set(h, n);
      else this.pending.delete(h);
    }
  }

  /** Starts a collection: the returned set holds every chunk held now or later, until `end`. */
  begin(): Set<string> {
    const touched = new Set(this.pending.keys());
    this.collections.add(touched);
    return touched;
  }

  end(touched: Set<string>): void {
    this.collections.delete(touched);
  }

  /** Deletes `hash` through `del` unless a put holds it or held it during this collection. */
  async collect(hash: string, touched: Set<string>, del: () => Promise<void>): Promise<boolean> {
    // The check and the registration below happen in one synchronous step: a put holding the
    // chunk from here on waits for the deletion and then uploads it again.
    if (touched.has(hash) || this.pending.has(hash) || this.deleting.has(hash)) return false;
    const p = del();
    this.deleting.set(hash, p);
    try {
      await p;
      return true;
    } finally {
      this.deleting.delete(hash);
    }
  }
}

/** By `location`: two ObjectStore objects on one directory or bucket share the registry. */
const registries = new Map<string, ChunkRegistry>();

function registryFor(store: ObjectStore): ChunkRegistry {
  let r = registries.get(store.location);
  if (!r) registries.set(store.location, (r = new ChunkRegistry()));
  return r;
}

interface SourceFile {
  rel: string;
  abs: string;
  size: number;
  mode: number;
}

/** Where a put found a chunk's bytes: enough to read them again. */
interface ChunkSource {
  file: SourceFile;
  index: number;
  /** in bytes */
  offset: number;
  length: number;
}

/** Every regular file under `dir`, sorted by relative path. */
async function walkImageDir(dir: string): Promise<SourceFile[]> {
  const out: SourceFile[] = [];
  const visit = async (abs: string, rel: string): Promise<void> => {
    const entries = await readdir(abs, { withFileTypes: true });
    entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const e of entries) {
      const a = path.join(abs, e.name);
      const r = rel === '' ? e.name : `${rel}/${e.name}`;
      if (!safeFilePath(r)) {
        throw new PicoError('PICO_ERR_CHECKPOINT_FAILED', `image directory ${dir}: cannot store a file named ${JSON.stringify(r)}`);
      }
      if (e.isDirectory()) await visit(a, r);
      else if (e.isFile()) {
        const st = await lstat(a);
        out.push({ rel: r, abs: a, size: st.size, mode: st.mode & 0o7777 });
      } else {
        throw new PicoError('PICO_ERR_CHECKPOINT_FAILED', `image directory ${dir}: ${r} is not a regular file or directory`);
      }
    }
  };
  try {
    await visit(dir, '');
  } catch (err) {
    if (err instanceof PicoError) throw err;
    throw withContext(err, `cannot read image directory ${dir}`, 'PICO_ERR_CHECKPOINT_FAILED');
  }
  out.sort((a, b) => (a.rel < b.rel ? -1 : a.rel > b.rel ? 1 : 0));
  return out;
}

/** Reads into `buf` from `position` until it is full or the file ends; returns the bytes read. */
async function readFully(fh: FileHandle, buf: Buffer, position: number): Promise<number> {
  let got = 0;
  while (got < buf.length) {
    const { bytesRead } = await fh.read(buf, got, buf.length - got, position + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return got;
}

async function writeFully(fh: FileHandle, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await fh.write(buf, done, buf.length - done, position + done);
    done += bytesWritten;
  }
}

export class ChunkedImageStore implements ImageStore {
  readonly store: ObjectStore;
  /** how new images are cut */
  readonly chunking: PageChunking;
  /** in bytes: the largest chunk of new images (their manifests' chunkSize) */
  readonly maxChunkBytes: number;
  readonly concurrency: number;
  readonly gcGraceMs: number;
  readonly collectEveryMs: number;
  /** when the last collection started (ms, this.now()); -Infinity before the first */
  private lastCollection = -Infinity;
  private readonly pools = new Map<number, BufferPool>();
  /** put's read windows: PUT_WINDOW_BYTES, or 4 chunks when larger (one per put in progress) */
  private readonly windows: BufferPool;
  private collecting: Promise<{ deletedChunks: number; freedBytes: number }> | undefined;
  private readonly log: Logger;
  private readonly now: () => number;
  private readonly registry: ChunkRegistry;
  /** per app: the tail of its chain of puts and prunes (one at a time per app in this process) */
  private readonly appChains = new Map<string, Promise<unknown>>();

  constructor(options: ChunkedImageStoreOptions) {
    this.store = options.store;
    this.chunking = pageChunking(options.chunking);
    this.maxChunkBytes = maxChunkBytes(this.chunking);
    this.windows = new BufferPool(Math.max(PUT_WINDOW_BYTES, 4 * this.maxChunkBytes), 2);
    this.concurrency = options.concurrency ?? DEFAULT_CONCURRENCY;
    this.gcGraceMs = options.gcGraceMs ?? DEFAULT_GC_GRACE_MS;
    this.collectEveryMs = options.collectEveryMs ?? DEFAULT_COLLECT_EVERY_MS;
    this.log = options.log ?? silentLogger();
    this.now = options.now ?? Date.now;
    this.registry = registryFor(this.store);
    if (!Number.isInteger(this.concurrency) || this.concurrency < 1) throw new RangeError(`concurrency must be a positive integer, got ${this.concurrency}`);
    if (!(this.gcGraceMs >= 0)) throw new RangeError(`gcGraceMs must be >= 0, got ${this.gcGraceMs}`);
  }

  /** The pool of chunk buffers of `size` bytes (one per chunk size in use; idle ones are kept). */
  private buffers(size: number): BufferPool {
    let p = this.pools.get(size);
    if (!p) this.pools.set(size, (p = new BufferPool(size, this.concurrency + 1)));
    return p;
  }

  // ---- put ---------------------------------------------------------------------------------

  /** Runs `fn` after every earlier put or prune of `app` in this process has finished. */
  private async exclusive<T>(app: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.appChains.get(app) ?? Promise.resolve();
    const run = prev.catch(() => {}).then(fn);
    this.appChains.set(app, run);
    try {
      return await run;
    } finally {
      if (this.appChains.get(app) === run) this.appChains.delete(app);
    }
  }

  async put(app: string, dir: string): Promise<{ manifest: ImageManifest; stats: ChunkedPutStats }> {
    checkApp(app);
    return this.exclusive(app, () => this.putNow(app, dir));
  }

  private async putNow(app: string, dir: string): Promise<{ manifest: ImageManifest; stats: ChunkedPutStats }> {
    const started = performance.now();
    const sources = await walkImageDir(dir);
    let generation = (await this.highestGeneration(app)) + 1;
    const held = new Map<string, ChunkSource>();
    const stats: ChunkedPutStats = { totalBytes: 0, uploadedBytes: 0, chunks: 0, uploadedChunks: 0 };
    let manifest: ImageManifest | undefined;
    try {
      // Steps 1 and 2.
      const files: ImageFile[] = [];
      const pool = new Bounded(this.concurrency);
      const window = this.windows.take();
      try {
        const buffers = this.buffers(this.maxChunkBytes);
        for (const src of sources) files.push(await this.putFile(src, window, pool, buffers, held, stats));
        await pool.drain();
      } finally {
        await pool.settle();
        this.windows.give(window);
      }

      // Step 3: read every chunk back before anything references it; repair what does not verify.
      const buffers = this.buffers(this.maxChunkBytes);
      await mapBounded(held, this.concurrency, async ([hash, at]) => {
        const into = buffers.take();
        try {
          await this.getChunk(hash, at.length, into);
        } catch (err) {
          if (!isNotFound(err) && !isPicoError(err, 'PICO_ERR_IMAGE_CORRUPT')) throw err;
          await this.repairChunk(app, hash, at, stats, err);
        } finally {
          buffers.give(into);
        }
      });

      // Step 4: the manifest, last. Exclusive: if another process took this generation meanwhile,
      // take the next one (the chunks are stored already).
      for (let attempt = 0; !manifest; attempt++) {
        const draft = {
          format: IMAGE_FORMAT_VERSION,
          app,
          generation,
          createdAt: new Date().toISOString(),
          chunking: { kind: 'pages' as const, ...this.chunking },
          chunkSize: this.maxChunkBytes,
          files,
        };
        const m: ImageManifest = { ...draft, checksum: manifestChecksum(draft) };
        try {
          await this.store.put(manifestKey(app, generation), Buffer.from(canonicalJson(m)), { exclusive: true });
          manifest = m;
        } catch (err) {
          if (!(err instanceof ObjectExistsError) || attempt >= 2) throw err;
          generation = (await this.highestGeneration(app)) + 1;
        }
      }

      // Step 5: the manifest reads back; every chunk is still there (a collection in another
      // process may have taken an old orphan this put deduplicated against: store it again).
      try {
        const stored = parseManifest(await this.store.get(manifestKey(app, generation)), { app, generation });
        if (stored.checksum !== manifest.checksum) {
          throw new PicoError('PICO_ERR_IMAGE_CORRUPT', `manifest reads back with checksum ${stored.checksum}, wrote ${manifest.checksum}`);
        }
        await mapBounded(held, this.concurrency, async ([hash, at]) => {
          const info = await this.store.head(chunkKey(hash));
          if (!info || info.size !== at.length) await this.repairChunk(app, hash, at, stats, new Error(info ? `size ${info.size}` : 'missing'));
        });
      } catch (err) {
        await this.store.delete(manifestKey(app, generation)).catch((e: unknown) => {
          this.log.error({ app, generation, err: e }, 'could not delete the manifest of an image that failed read-back verification');
        });
        throw withContext(err, 'read-back verification');
      }

      const ms = performance.now() - started;
      this.log.info({ app, generation, ...stats, ms: Math.round(ms), files: files.length }, `image stored: ${stats.uploadedBytes} of ${stats.totalBytes} bytes uploaded`);
      return { manifest, stats };
    } catch (err) {
      throw withContext(err, `storing app "${app}" generation ${generation} from ${dir}`);
    } finally {
      this.registry.release(held.keys());
    }
  }

  /**
   * Steps 1 and 2 for one file: stream it through `window`, cut chunks (chunker.ts), hash each,
   * hand uploads to `pool`. A chunk is cut only from at least maxChunkBytes of window, or at EOF,
   * so the cuts are the file's own whatever the window size. Memory: the window plus at most
   * `concurrency` chunk buffers (a chunk is copied out of the window into one of them, as the
   * window moves on before its upload ends).
   */
  private async putFile(
    src: SourceFile,
    window: Buffer,
    pool: Bounded,
    buffers: BufferPool,
    held: Map<string, ChunkSource>,
    stats: ChunkedPutStats,
  ): Promise<ImageFile> {
    const chunks: string[] = [];
    const sizes: number[] = [];
    let fh: FileHandle;
    try {
      fh = await open(src.abs, 'r');
    } catch (err) {
      throw withContext(err, `cannot read ${src.abs}`, 'PICO_ERR_CHECKPOINT_FAILED');
    }
    /** in bytes: file offset of window[0] */
    let base = 0;
    /** in bytes: window[0 .. filled) holds file bytes; the next chunk starts at window[start] */
    let filled = 0;
    let start = 0;
    let eof = false;
    try {
      for (;;) {
        if (!eof && filled - start < this.maxChunkBytes) {
          window.copyWithin(0, start, filled);
          base += start;
          filled -= start;
          start = 0;
          let n: number;
          try {
            n = await readFully(fh, window.subarray(filled), base + filled);
          } catch (err) {
            throw withContext(err, `cannot read ${src.abs}`, 'PICO_ERR_CHECKPOINT_FAILED');
          }
          filled += n;
          eof = filled < window.length;
        }
        const length = nextChunkLength(window.subarray(start, filled), eof, this.chunking);
        if (length === 0) break; // only at EOF: at least maxChunkBytes remain otherwise
        const offset = base + start;
        const bytes = window.subarray(start, start + length);
        start += length;
        const hash = sha256(bytes);
        const index = chunks.length;
        chunks.push(hash);
        sizes.push(length);
        stats.chunks++;
        stats.totalBytes += length;
        if (held.has(hash)) continue; // this put already stores these bytes

        // Wait for a slot before taking a buffer: at most `concurrency` chunk buffers in use.
        await pool.acquire();
        // Registered in held and in the registry (the task's first step) in one synchronous step.
        held.set(hash, { file: src, index, offset, length });
        const full = buffers.take();
        const buf = full.subarray(0, length);
        bytes.copy(buf);
        pool.spawn(async () => {
          try {
            await this.registry.hold(hash);
            const key = chunkKey(hash);
            const info = await this.store.head(key);
            // A stored chunk of the wrong size cannot be this content: write it again.
            if (info && info.size === buf.length) return;
            await this.store.put(key, buf);
            stats.uploadedBytes += buf.length;
            stats.uploadedChunks++;
          } finally {
            buffers.give(full);
          }
        });
      }
    } finally {
      await fh.close();
    }
    const size = base + filled;
    if (size !== src.size) {
      throw new PicoError('PICO_ERR_CHECKPOINT_FAILED', `${src.abs} changed while it was being stored (${src.size} bytes, then ${size})`);
    }
    return { path: src.rel, size, mode: src.mode, chunks, sizes };
  }

  /**
   * A stored chunk this put relies on is missing or damaged (bit rot, a collection in another
   * process): write it again from the image directory, and check it reads back.
   */
  private async repairChunk(app: string, hash: string, at: ChunkSource, stats: ChunkedPutStats, why: unknown): Promise<void> {
    const where = `chunk ${at.index} (${hash}) of ${at.file.rel}`;
    this.log.warn({ app, chunk: hash, file: at.file.rel, err: why instanceof Error ? why.message : String(why) }, 'stored chunk missing or damaged: writing it again');
    const buf = Buffer.allocUnsafe(at.length);
    let fh: FileHandle | undefined;
    try {
      fh = await open(at.file.abs, 'r');
      if ((await readFully(fh, buf, at.offset)) !== at.length || sha256(buf) !== hash) {
        throw new PicoError('PICO_ERR_CHECKPOINT_FAILED', `${at.file.abs} changed while it was being stored`);
      }
    } catch (err) {
      throw withContext(err, `repairing ${where}`, 'PICO_ERR_CHECKPOINT_FAILED');
    } finally {
      await fh?.close();
    }
    await this.store.put(chunkKey(hash), buf);
    stats.uploadedBytes += at.length;
    stats.uploadedChunks++;
    try {
      await this.getChunk(hash, at.length);
    } catch (err) {
      throw withContext(err, `${where} does not read back after writing it again`);
    }
  }

  // ---- read ----------------------------------------------------------------------------------

  /**
   * Fetches one chunk and checks its sha256 (and length, when known). With `into`, the chunk may
   * be read into it (the result is then a view of `into`).
   */
  async getChunk(hash: string, length?: number, into?: Buffer): Promise<Buffer> {
    if (!HASH.test(hash)) throw new PicoError('PICO_ERR_IMAGE_CORRUPT', `not a chunk hash: ${JSON.stringify(hash)}`);
    const buf = await this.store.get(chunkKey(hash), into);
    const got = sha256(buf);
    if (got !== hash || (length !== undefined && buf.length !== length)) {
      throw new PicoError('PICO_ERR_IMAGE_CORRUPT', `chunk ${hash} failed its checksum (got sha256 ${got}, ${buf.length} bytes)`);
    }
    return buf;
  }

  /** getChunk with the image, file and chunk index in any error. */
  private async fetchChunk(manifest: ImageManifest, file: string, index: number, hash: string, length: number, into?: Buffer): Promise<Buffer> {
    const where = `image of app "${manifest.app}" generation ${manifest.generation}, file ${file}, chunk ${index} (${hash})`;
    try {
      return await this.getChunk(hash, length, into);
    } catch (err) {
      if (isNotFound(err)) throw new PicoError('PICO_ERR_IMAGE_MISSING', `${where}: missing from ${this.store.location}`, { cause: err });
      if (isPicoError(err, 'PICO_ERR_IMAGE_CORRUPT')) throw new PicoError('PICO_ERR_IMAGE_CORRUPT', `${where}: failed its checksum`, { cause: err });
      throw withContext(err, where);
    }
  }

  /** Every generation number stored for `app` (manifest keys, whether or not they verify), newest first. */
  private async generationNumbers(app: string): Promise<number[]> {
    const gens: number[] = [];
    try {
      for await (const key of this.store.list(`apps/${app}/`)) {
        const m = MANIFEST_KEY.exec(key);
        if (m && m[1] === app) gens.push(Number(m[2]));
      }
    } catch (err) {
      throw withContext(err, `listing the images of app "${app}"`);
    }
    return gens.sort((a, b) => b - a);
  }

  private async highestGeneration(app: string): Promise<number> {
    return (await this.generationNumbers(app))[0] ?? 0;
  }

  /**
   * Reads one manifest: the manifest, or why it is unusable ('missing' or the corruption).
   * Store failures reject: a store that is down must not look like an app without images.
   */
  private async readManifest(app: string, generation: number): Promise<ImageManifest | { missing: true } | { corrupt: PicoError }> {
    let body: Buffer;
    try {
      body = await this.store.get(manifestKey(app, generation));
    } catch (err) {
      if (isNotFound(err)) return { missing: true };
      throw withContext(err, `reading the manifest of app "${app}" generation ${generation}`);
    }
    try {
      return parseManifest(body, { app, generation });
    } catch (err) {
      if (isPicoError(err, 'PICO_ERR_IMAGE_CORRUPT')) return { corrupt: err };
      throw err;
    }
  }

  private async newestVerified(
    app: string,
    gens: number[],
    accept?: (m: ImageManifest) => Promise<boolean>,
    read?: { generation: number; manifest: ReturnType<ChunkedImageStore['readManifest']> },
  ): Promise<ImageManifest | undefined> {
    for (const g of gens) {
      const r = await (read?.generation === g ? read.manifest : this.readManifest(app, g));
      if ('corrupt' in r) {
        this.log.warn({ app, generation: g, err: r.corrupt.message }, 'skipping a corrupt manifest');
        continue;
      }
      if ('missing' in r) continue; // deleted since the listing
      if (accept && !(await accept(r))) continue;
      return r;
    }
    return undefined;
  }

  async latest(app: string, expected?: number): Promise<ImageManifest | undefined> {
    checkApp(app);
    if (expected === undefined || !Number.isSafeInteger(expected) || expected < 1) return this.newestVerified(app, await this.generationNumbers(app));
    return this.lookup(app, expected).newest;
  }

  lookup(app: string, expected: number): { expected: Promise<ImageManifest | undefined>; newest: Promise<ImageManifest | undefined> } {
    checkApp(app);
    if (!Number.isSafeInteger(expected) || expected < 1) return { expected: Promise.resolve(undefined), newest: this.latest(app) };
    // The expected manifest is read beside the listing; the listing still decides which is newest.
    const manifest = this.readManifest(app, expected);
    manifest.catch(() => undefined);
    const t0 = performance.now();
    const ms = (): number => Math.round(performance.now() - t0);
    let expectedMs: number | undefined;
    const expectedManifest = manifest.then((r) => {
      expectedMs = ms();
      return 'missing' in r || 'corrupt' in r ? undefined : r;
    });
    expectedManifest.catch(() => undefined); // latest() does not look at it; `newest` reports the failure
    const newest = this.generationNumbers(app).then((gens) => {
      this.log.debug({ app, expected, listMs: ms(), expectedMs: expectedMs ?? null }, 'listed the stored generations');
      return this.newestVerified(app, gens, undefined, { generation: expected, manifest });
    });
    return { expected: expectedManifest, newest };
  }

  /** Every stored generation of `app`, newest first, with whether its manifest verifies. */
  async generations(app: string): Promise<GenerationStatus[]> {
    checkApp(app);
    const out: GenerationStatus[] = [];
    for (const g of await this.generationNumbers(app)) {
      const r = await this.readManifest(app, g);
      if ('missing' in r) continue;
      out.push('corrupt' in r ? { generation: g, ok: false, error: r.corrupt.message } : { generation: g, ok: true });
    }
    return out;
  }

  async apps(): Promise<Array<{ app: string; generation: number }>> {
    const byApp = new Map<string, number[]>();
    try {
      for await (const key of this.store.list('apps/')) {
        const m = MANIFEST_KEY.exec(key);
        if (!m || !APP.test(m[1]!)) continue;
        const list = byApp.get(m[1]!) ?? [];
        list.push(Number(m[2]));
        byApp.set(m[1]!, list);
      }
    } catch (err) {
      throw withContext(err, 'listing stored apps');
    }
    const out: Array<{ app: string; generation: number }> = [];
    for (const [app, gens] of [...byApp].sort(([a], [b]) => (a < b ? -1 : 1))) {
      const m = await this.newestVerified(app, gens.sort((a, b) => b - a));
      if (m) out.push({ app, generation: m.generation });
      else this.log.warn({ app }, 'app has manifests but none verifies');
    }
    return out;
  }

  async get(manifest: ImageManifest, dir: string): Promise<void> {
    const m = checkManifest(manifest);
    const what = `restoring image of app "${m.app}" generation ${m.generation} into ${dir}`;
    const root = path.resolve(dir);
    const created: string[] = []; // directories this call made
    const temps: string[] = [];
    const finals: string[] = [];
    interface Target {
      file: ImageFile;
      tmp: string;
      final: string;
      handle?: Promise<FileHandle>;
      remaining: number;
    }
    const targets: Target[] = [];
    const pool = new Bounded(this.concurrency);
    const buffers = this.buffers(m.chunkSize);

    const mkdirs = async (d: string): Promise<void> => {
      const first = await mkdir(d, { recursive: true });
      if (first !== undefined) {
        // mkdir -p returns the first directory it made; it made every one from there down to d.
        for (let x = d; ; x = path.dirname(x)) {
          created.push(x);
          if (x === first || x === path.dirname(x)) break;
        }
      }
    };
    const finish = async (t: Target): Promise<void> => {
      const fh = await t.handle!;
      t.handle = undefined;
      try {
        await fh.chmod(t.file.mode);
      } finally {
        await fh.close();
      }
    };

    try {
      await mkdirs(root);
      for (const file of m.files) {
        const final = path.join(root, ...file.path.split('/'));
        await mkdirs(path.dirname(final));
        const tmp = path.join(path.dirname(final), `${PARTIAL_PREFIX}${randomBytes(6).toString('hex')}-${path.basename(final)}`);
        targets.push({ file, tmp, final, remaining: file.chunks.length });
      }
      try {
        for (const t of targets) {
          if (t.file.chunks.length === 0) {
            temps.push(t.tmp);
            t.handle = open(t.tmp, 'wx', 0o600);
            await finish(t);
            continue;
          }
          for (const [index, ref] of fileChunks(m, t.file).entries()) {
            await pool.acquire();
            pool.spawn(async () => {
              const into = buffers.take();
              try {
                const buf = await this.fetchChunk(m, t.file.path, index, ref.hash, ref.size, into);
                if (!t.handle) {
                  temps.push(t.tmp);
                  t.handle = open(t.tmp, 'wx', 0o600);
                }
                await writeFully(await t.handle, buf, ref.offset);
              } finally {
                buffers.give(into);
              }
              if (--t.remaining === 0) await finish(t);
            });
          }
        }
        await pool.drain();
      } finally {
        await pool.settle();
      }
      // Every file is complete and verified: give them their names.
      for (const t of targets) {
        await rename(t.tmp, t.final);
        finals.push(t.final);
      }
    } catch (err) {
      for (const t of targets) {
        if (t.handle) await t.handle.then((fh) => fh.close()).catch(() => {});
      }
      await Promise.all([...temps, ...finals].map((f) => unlink(f).catch(() => {})));
      created.sort((a, b) => b.length - a.length); // deepest first
      for (const d of created) await rmdir(d).catch(() => {});
      if (err instanceof PicoError && (err.code === 'PICO_ERR_IMAGE_CORRUPT' || err.code === 'PICO_ERR_IMAGE_MISSING')) {
        this.log.error({ app: m.app, generation: m.generation, err: err.message }, 'image failed verification');
      }
      throw withContext(err, what);
    }
  }

  // ---- prune ---------------------------------------------------------------------------------

  /**
   * Deletes generations of `app` older than its newest verified one (its manifest verifies and
   * every chunk it names is stored with the right size), then collects chunks no manifest
   * references: always with `collect: true`, never with `collect: false`, and by default when
   * no collection ran in the last `collectEveryMs`.
   */
  async prune(app: string, options: { collect?: boolean } = {}): Promise<PruneStats> {
    checkApp(app);
    const stats: PruneStats = { deletedGenerations: [], deletedChunks: 0, freedBytes: 0 };
    // Not while a put of this app is between writing its manifest and verifying it.
    const keeper = await this.exclusive(app, async () => {
      const gens = await this.generationNumbers(app);
      const newest = await this.newestVerified(app, gens, (m) => this.chunksPresent(m));
      if (!newest) return undefined;
      for (const g of gens) {
        if (g >= newest.generation) continue;
        try {
          await this.store.delete(manifestKey(app, g));
        } catch (err) {
          throw withContext(err, `pruning app "${app}": deleting generation ${g}`);
        }
        stats.deletedGenerations.push(g);
      }
      return newest.generation;
    });
    const collect = options.collect ?? (this.collecting === undefined && this.now() - this.lastCollection >= this.collectEveryMs);
    if (collect) {
      const c = await this.collectChunks();
      stats.deletedChunks = c.deletedChunks;
      stats.freedBytes = c.freedBytes;
    }
    if (stats.deletedGenerations.length > 0 || stats.deletedChunks > 0) {
      this.log.info({ app, kept: keeper, ...stats }, 'pruned');
    }
    return stats;
  }

  private async chunksPresent(m: ImageManifest): Promise<boolean> {
    let ok = true;
    const wanted = new Map<string, number>();
    for (const f of m.files) for (const ref of fileChunks(m, f)) wanted.set(ref.hash, ref.size);
    await mapBounded(wanted, this.concurrency, async ([hash, size]) => {
      if (!ok) return;
      const info = await this.store.head(chunkKey(hash));
      if (!info || info.size !== size) {
        ok = false;
        this.log.warn({ app: m.app, generation: m.generation, chunk: hash }, 'generation has a missing or truncated chunk; not pruning older ones on its account');
      }
    });
    return ok;
  }

  /**
   * Deletes chunks that no manifest of any app references (see the invariant at the top). One
   * collection at a time per instance: a call while one runs waits for it, then runs its own.
   */
  async collectChunks(): Promise<{ deletedChunks: number; freedBytes: number }> {
    while (this.collecting) await this.collecting.catch(() => {});
    this.lastCollection = this.now();
    const run = this.collectNow();
    this.collecting = run;
    try {
      return await run;
    } finally {
      this.collecting = undefined;
    }
  }

  private async collectNow(): Promise<{ deletedChunks: number; freedBytes: number }> {
    const touched = this.registry.begin();
    let deletedChunks = 0;
    let freedBytes = 0;
    try {
      const referenced = new Set<string>();
      let unreadable = 0;
      await mapBounded(this.store.list('apps/'), this.concurrency, async (key) => {
        if (!MANIFEST_KEY.test(key)) return;
        let body: Buffer;
        try {
          body = await this.store.get(key);
        } catch (err) {
          if (isNotFound(err)) return;
          throw err;
        }
        // Lenient on purpose: a manifest that fails its checksum still protects what it names.
        try {
          const value = JSON.parse(body.toString('utf8')) as { files?: Array<{ chunks?: unknown }> };
          for (const f of Array.isArray(value.files) ? value.files : []) {
            if (Array.isArray(f?.chunks)) for (const h of f.chunks) if (typeof h === 'string' && HASH.test(h)) referenced.add(h);
          }
        } catch {
          unreadable++;
        }
      });
      if (unreadable > 0) this.log.warn({ manifests: unreadable }, 'unparseable manifests: the chunks they named may be collected');

      const cutoff = this.now() - this.gcGraceMs;
      await mapBounded(this.store.list('chunks/'), this.concurrency, async (key) => {
        const hash = CHUNK_KEY.exec(key)?.[1];
        if (!hash || referenced.has(hash) || touched.has(hash)) return;
        const info = await this.store.head(key);
        if (!info || (this.gcGraceMs > 0 && info.lastModified > cutoff)) return;
        if (await this.registry.collect(hash, touched, () => this.store.delete(key))) {
          deletedChunks++;
          freedBytes += info.size;
        }
      });
    } catch (err) {
      throw withContext(err, 'collecting unreferenced chunks');
    } finally {
      this.registry.end(touched);
    }
    return { deletedChunks, freedBytes };
  }
}
