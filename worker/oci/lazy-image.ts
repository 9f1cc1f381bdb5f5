import { open, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { PicoError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import type { PageLocator, PlannedChunk } from '../../pagestore/activeset.js';
import { mapBounded } from '../../pagestore/bounded.js';
import type { ChunkCache } from '../../pagestore/chunk-cache.js';
import { mountImage, type ImageMount, type PendingMount, type ServeOptions } from '../../pagestore/image-mount.js';
import { chunkAt, chunksIn, fileChunks, sliceChunks, type ChunkRef, type ImageFile, type ImageManifest, type ImageStore } from '../../pagestore/image-store.js';
import { PageRuns } from '../../pagestore/page-runs.js';
import { packFor, type DecodedRestorePack, type PackedRun, type PackPart, type ReadRestorePack, type RestorePacks } from '../../pagestore/restore-pack.js';
import { readLocalChunk } from './local-image.js';
import { PAGE_SIZE, parsePagemap } from './pagemap.js';
import { distinctChunks, eagerChunks, joinRanges, metadataChunks, pagemapLocator, PAGEMAP, PAGES, readaheadChunks, regionHeads, type FileRange, type TaskPagemap } from './restore-plan.js';

/*
 * The image of a lazy restore: a FUSE directory (pagestore/image-mount.ts) whose reads are
 * answered chunk by chunk from, in order, the worker's chunk cache, the worker's local copy of
 * this very image (each chunk checked against its sha256 as it is read), or the page store.
 *
 * Timeline of one restore:
 *   open()        mount
 *   prefetch()    bring in, all in parallel, every file but the memory pages (CRIU reads them
 *                 whole, one by one, before the process resumes), the memory pages `criu
 *                 restore` reads itself, and the ActiveSet: from the restore packs, else chunk
 *                 by chunk. Reads of the mount wait for the packs that may carry their bytes: a
 *                 fault on a page a pack carries waits for the pack rather than for its chunk
 *   (meanwhile the caller starts `criu lazy-pages` on `path`; then `runc restore --lazy-pages`)
 *   sweep()       fetch every other chunk in file order, `concurrency` at a time: CRIU's daemon
 *                 copies the pages nobody faulted on in about that order, and it is single-
 *                 threaded — a fault waits behind whatever read it is doing, so that read must
 *                 find its chunk here already. Starts by itself once reads of memory pages
 *                 missed the prefetch sweepAfterMisses times
 *   close()       once the daemon exited (every page is in the process): unmount
 *
 * A chunk that cannot be had (store down past its retries, a bad checksum) fails the read that
 * needed it, after `onFailure` (the caller kills the container: a process must never run on
 * with a page it could not get).
 */

/** warmPageCache(): reads in flight, and bytes per read (of memory pages: the kernel's largest FUSE read) */
const WARM_READERS = 2;
const WARM_READ = 1024 * 1024;
const WARM_PAGES_READ = 128 * 1024;
/** in ms: how long reads of the mount wait for a restore pack before they fetch chunk by chunk */
const PACK_WAIT_MS = 5000;
/** reads of memory pages that fetched their chunk, past which the sweep starts at once (see sweepAfterMisses) */
const SWEEP_AFTER_MISSES = 256;
/** chunks on either side of a memory chunk a read missed, fetched beside it (see missed()) */
const NEARBY_CHUNKS = 4;

export interface LazyImageOptions {
  manifest: ImageManifest;
  mountpoint: string;
  /**
   * the mount, made before the manifest was known (mountPending at `mountpoint`): served with
   * this image instead of mounting anew, and closed by close() as if it were this image's own
   */
  mount?: PendingMount;
  store: ImageStore;
  cache: ChunkCache;
  /** a local copy of exactly this image (same manifest), read before the store */
  localDir?: string;
  /**
   * the ActiveSet's chunks known by hash (see prefetch()); may settle after the mount is served.
   * Called only when no ActiveSet pack for this image came: planning takes the event loop (~4 ms
   * for the benchmark's image) just when the restore pack is in.
   */
  prefetch: () => readonly PlannedChunk[] | Promise<readonly PlannedChunk[]>;
  /** fetches in flight for the prefetch and the sweep; default: the store's concurrency, else 16 */
  concurrency?: number;
  /**
   * Reads of memory pages that had to fetch their chunk (prefetch misses) after which the sweep
   * starts at once rather than when the caller asks; default 256. Each miss is a serial round
   * trip (the daemon serves one fault at a time), so an app touching memory its ActiveSet does
   * not predict (a full GC walks all of its heap) would otherwise page in thousands of chunks one
   * round trip each. Not sooner: the sweep takes the link and the CPU from the faults (measured
   * with the S3 benchmark: a miss took ~30 ms before a sweep started at 32 misses, 100–250 ms
   * after, and the wake got slower).
   */
  sweepAfterMisses?: number;
  onFailure(err: unknown): Promise<void>;
  log: Logger;
}

export interface LazyImageStats {
  /** chunks of the image's other files (everything but memory pages), fetched before the restore */
  metadata: number;
  /** ActiveSet chunks of memory pages fetched before the restore */
  prefetched: number;
  /** chunks of the memory pages `criu restore` reads itself (not lazy), fetched before the restore */
  eager: number;
  /** chunks taken from the app's restore pack (one request) rather than fetched one by one */
  packed: number;
  /** memory pages taken from the pack's runs (the ActiveSet and the pages CRIU reads itself) */
  packedPages: number;
  /** in ms */
  prefetchMs: number;
  /** chunks a read found in the cache (memory or disk) */
  hits: number;
  /** chunks a read had to fetch itself (local copy or store) */
  demand: number;
  /** chunk fetches started because a read of memory pages missed a chunk beside them (see missed()) */
  nearby: number;
  /** chunks the sweep fetched */
  swept: number;
  /** in bytes, from the page store (not the cache or the local copy) */
  storeBytes: number;
}

/** The stats of an image that fetched nothing. */
export function noImageStats(): LazyImageStats {
  return { metadata: 0, prefetched: 0, eager: 0, packed: 0, packedPages: 0, prefetchMs: 0, hits: 0, demand: 0, nearby: 0, swept: 0, storeBytes: 0 };
}

export class LazyImage {
  readonly path: string;
  private mount: ImageMount | undefined;
  private readonly counts = noImageStats();
  /** memory chunks prefetched whole (without a pack for this image) */
  private prefetchedPages: PlannedChunk[] = [];
  /** the packs' page runs, which the mount answers reads from */
  private readonly runs = new PageRuns();
  /** runs and files the mount's server process could not take (ImageMount.hold): warm() reads them */
  private readonly notResident: FileRange[] = [];
  /** files the server holds whole (and warms itself) */
  private readonly residentFiles = new Set<string>();
  /** each pack, settled once unpacked (true: for this image and whole); set by prefetch() */
  private readonly packsIn: Partial<Record<PackPart, Promise<boolean>>> = {};
  private warming: Promise<void> | undefined;
  private sweeping: Promise<void> | undefined;
  /** reads of memory pages that fetched their chunk */
  private misses = 0;
  /** the region heads' offsets by pages file, once fetchHeads() read the pagemaps */
  private heads: Map<string, Set<number>> | undefined;
  private readonly refsByFile = new Map<string, ChunkRef[]>();
  /** every chunk hash the manifest names (memoised for each pack's unpack()) */
  private chunkNames: Set<string> | undefined;
  private closed = false;
  private readonly concurrency: number;
  private readonly openedAt = performance.now();

  private constructor(private readonly o: LazyImageOptions) {
    this.path = o.mountpoint;
    this.concurrency = o.concurrency ?? o.store.concurrency ?? 16;
  }

  /**
   * Mounts the image, or serves it on `o.mount` (nothing fetched yet: see prefetch()). Throws
   * with nothing left mounted, but for `o.mount`: that is the caller's to close.
   */
  static async open(o: LazyImageOptions): Promise<LazyImage> {
    const img = new LazyImage(o);
    const serve: ServeOptions = {
      manifest: o.manifest,
      chunk: (ref, file) => img.demand(file, ref),
      onFailure: (err) => o.onFailure(err),
      held: (file, pos, end) => img.held(file, pos, end),
    };
    img.mount = o.mount ? o.mount.serve(serve) : await mountImage({ mountpoint: o.mountpoint, ...serve, log: o.log });
    return img;
  }

  /**
   * Fetches what the restore reads before the process resumes, and the ActiveSet. From the
   * app's restore packs (`packs`, pagestore/restore-pack.ts) when they were written for this
   * image: the restore pack brings every file but the memory pages (chunks) and the pages
   * `criu restore` reads itself (runs), the ActiveSet pack the ActiveSet's pages (runs); the
   * mount answers reads of those pages from the runs, and a read waits for the pack that may
   * carry it (so the restore need not wait for this). What no pack brought goes chunk by chunk,
   * in one go: every file but the memory pages (`criu restore` reads them whole, one by one) and
   * the chunks of the ActiveSet known by hash; as soon as the pagemaps are in (they are among
   * those files), also the chunks of the pages `criu restore` reads itself, of the ActiveSet's
   * pages found by address (`plan`), and those the kernel would read ahead with them
   * (restore-plan.ts: readaheadChunks). Resolves when all of it is here; rejects on the first
   * chunk that cannot be had. The pagemaps are advice here: one that does not parse costs
   * prefetching, not the restore (CRIU reads it and fails visibly if it is really broken).
   */
  async prefetch(plan?: (locate: PageLocator) => readonly PlannedChunk[] | Promise<readonly PlannedChunk[]>, packs: RestorePacks = {}): Promise<void> {
    const t0 = performance.now();
    this.packsIn.restore = packs.restore ? this.unpack(packs.restore, 'restore') : Promise.resolve(false);
    this.packsIn.activeset = packs.activeset ? this.unpack(packs.activeset, 'activeset') : Promise.resolve(false);
    const metadata = metadataChunks(this.o.manifest);
    this.counts.metadata = metadata.length;
    const wanted = new Set<string>();
    const pages: PlannedChunk[] = [];
    const add = (list: readonly PlannedChunk[]): PlannedChunk[] => {
      const fresh = distinctChunks(list).filter((p) => !wanted.has(p.ref.hash));
      for (const p of fresh) {
        wanted.add(p.ref.hash);
        if (PAGES.test(p.file.path)) pages.push(p);
      }
      return fresh;
    };
    const fetch = (list: readonly PlannedChunk[], kind: 'prefetched' | 'eager'): Promise<void> =>
      this.each(list, async (p) => {
        await this.chunk(p.file, p.ref);
        if (PAGES.test(p.file.path)) this.counts[kind]++;
      });
    // What a pack brought is in the cache (chunks) or the mount's runs (pages): chunk by chunk
    // only what no pack for this image brought. The pagemaps lead the first batch: the second
    // waits for them.
    const restorePacked = await this.packsIn.restore;
    const activeSetPacked = this.packsIn.activeset;
    const first = fetch(add(metadata), 'prefetched');
    const second = activeSetPacked.then(async (activeSetOk) => {
      if (restorePacked && activeSetOk) return;
      const byHash = activeSetOk ? [] : add(await this.o.prefetch());
      const maps = await this.pagemaps();
      const eager = restorePacked ? [] : add(eagerChunks(this.o.manifest, maps));
      const byAddress = !activeSetOk && plan ? add(await plan(pagemapLocator(maps))) : [];
      // Not warmed, not counted as prefetched: only there for the kernel's readahead.
      const core = pages.length;
      const ahead = add(readaheadChunks(this.o.manifest, pages));
      pages.splice(core);
      await Promise.all([fetch(byHash, 'prefetched'), fetch(eager, 'eager'), fetch(byAddress, 'prefetched'), this.each(ahead, (p) => this.chunk(p.file, p.ref).then(() => undefined))]);
    });
    await Promise.all([first, second]);
    this.prefetchedPages = pages;
    this.counts.prefetchMs = Math.round(performance.now() - t0);
  }

  /**
   * The bytes [pos, end) of `file` when a pack's runs hold them, for the mount. A read waits for
   * the packs that may carry its bytes (each settles within PACK_WAIT_MS, whatever the store
   * does) rather than fetching them chunk by chunk beside them: every read for the restore pack
   * (the metadata chunks it brings go to the cache), a read of memory pages not in it for the
   * ActiveSet pack too; a read of a region head, once fetchHeads() asked for its pack, takes
   * that pack or its own chunks, whichever comes first. Before prefetch() started, nothing is
   * held.
   */
  private async held(file: ImageFile, pos: number, end: number): Promise<Buffer | undefined> {
    const { restore, activeset, heads } = this.packsIn;
    if (restore) await restore;
    if (!PAGES.test(file.path)) return undefined;
    const now = this.runs.read(file.path, pos, end);
    if (now) return now;
    if (activeset) {
      await activeset;
      const got = this.runs.read(file.path, pos, end);
      if (got) return got;
    }
    if (!heads || !this.isHead(file.path, pos, end)) return undefined;
    // The heads pack or the read's own chunks, whichever is first. The pack lands 40-60 ms after
    // the process resumed (a round trip, ~1 MB, its decoding), one chunk in one round trip: a
    // lone fault on a region head takes the chunk, a garbage collection's burst of them the pack
    // (it is in by the second or third fault). A failed fetch counts as not held: the mount then
    // fetches the chunk itself and fails the read visibly.
    const touched = chunksIn(this.chunksOf(file), pos, end);
    const own = Promise.all(touched.map((ref) => this.demand(file, ref))).then((bodies) => Buffer.concat(sliceChunks(touched, bodies, pos, end)));
    own.catch(() => undefined);
    const packed = heads.then(() => this.runs.read(file.path, pos, end));
    return (await Promise.race([packed, own])) ?? own;
  }

  /**
   * Takes the app's heads pack (restore-plan.ts, regionHeads), asked for once the process
   * resumed: until it is in (within PACK_WAIT_MS, whatever the store does), a read of a region
   * head that no run holds races it against its own chunks (see held()) — in a garbage
   * collection's burst of such faults, a round trip or two and then the pack, instead of a
   * round trip each. Once only.
   */
  fetchHeads(pack: Promise<ReadRestorePack | undefined>): void {
    pack.catch(() => undefined); // unpack() reports a failure; until it runs, nothing is unhandled
    if (this.packsIn.heads || this.closed) return;
    this.packsIn.heads = this.pagemaps()
      .then((maps) => {
        this.heads = new Map();
        for (const r of regionHeads(maps)) {
          let set = this.heads.get(r.file);
          if (!set) this.heads.set(r.file, (set = new Set()));
          set.add(r.offset);
        }
      })
      .catch(() => undefined)
      .then(() => this.unpack(pack, 'heads'));
  }

  /** Whether [pos, end) of `file` holds a region head (known once fetchHeads() read the pagemaps). */
  private isHead(file: string, pos: number, end: number): boolean {
    const set = this.heads?.get(file);
    if (!set) return false;
    for (let at = pos - (pos % PAGE_SIZE); at < end; at += PAGE_SIZE) if (set.has(at)) return true;
    return false;
  }

  /**
   * Puts the chunks of one of the app's restore packs that this image names into the cache and
   * its page runs into the mount (each entry checked against its hash). True when the pack was
   * written for this very image and all of it was good (then its part of the plan needs nothing
   * else). A pack that cannot be had (or not within PACK_WAIT_MS) or read costs only that: the
   * prefetch fetches its part chunk by chunk.
   */
  private async unpack(pack: Promise<ReadRestorePack | undefined>, part: PackPart): Promise<boolean> {
    const names = (this.chunkNames ??= new Set(this.o.manifest.files.flatMap((f) => f.chunks)));
    // The pack is read as its bytes arrive (ActiveSetStore.readPack), maybe before this image
    // was known: the wait covers its whole download.
    const decoding = pack.then((read) => read && packFor(read, this.o.manifest, names));
    decoding.catch(() => undefined);
    let timer: NodeJS.Timeout | undefined;
    let got: DecodedRestorePack | undefined;
    try {
      got = await Promise.race([
        decoding,
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`not fetched within ${PACK_WAIT_MS} ms`)), PACK_WAIT_MS);
        }),
      ]);
    } catch (err) {
      this.o.log.warn({ part, err: (err as Error).message }, 'cannot fetch or read a restore pack; prefetching its part chunk by chunk');
      return false;
    } finally {
      clearTimeout(timer);
    }
    if (!got || this.closed) return false;
    const { chunks, runs, current, bad } = got;
    for (const c of chunks) if (!this.o.cache.has(c.hash)) this.o.cache.put(c.hash, Buffer.from(c.bytes));
    // The runs stay slices of the pack's body (most of it): a copy costs a page fault per page of
    // fresh memory, ~13 µs each on these hosts. The cache's chunks are copied: the cache outlives
    // the pack.
    const added = this.runs.add(runs);
    // The mount's server answers reads of these by itself from now on (the app's first faults,
    // CRIU's many small reads of the other files), not through this event loop, and reads them
    // into the page cache.
    const files = this.wholeFiles(chunks);
    if (await this.mount?.hold([...files, ...added])) for (const f of files) this.residentFiles.add(f.file);
    else this.notResident.push(...added.map((r) => ({ file: r.file, offset: r.offset, length: r.bytes.length })));
    this.counts.packed += chunks.length;
    this.counts.packedPages = Math.round(this.runs.bytes / PAGE_SIZE);
    const pages = runs.reduce((n, r) => n + r.bytes.length, 0) / PAGE_SIZE;
    this.o.log.debug({ part, chunks: chunks.length, pages, inMs: Math.round(performance.now() - this.openedAt) }, 'a restore pack is in');
    if (this.o.log.isLevelEnabled('trace')) this.o.log.trace({ part, runs: runs.map((r) => [r.file, r.offset, r.bytes.length]) }, 'the page runs of a restore pack');
    if (bad > 0) this.o.log.warn({ part, bad }, 'entries of a restore pack failed their checksum; its part is prefetched chunk by chunk');
    return current && bad === 0;
  }

  /** The image's files but the memory pages that `chunks` hold whole, as runs. */
  private wholeFiles(chunks: ReadonlyArray<{ hash: string; bytes: Buffer }>): PackedRun[] {
    if (chunks.length === 0) return [];
    const byHash = new Map(chunks.map((c) => [c.hash, c.bytes]));
    const out: PackedRun[] = [];
    for (const file of this.o.manifest.files) {
      if (PAGES.test(file.path)) continue;
      const parts = this.chunksOf(file).map((ref) => byHash.get(ref.hash));
      if (parts.every((b) => b !== undefined)) out.push({ file: file.path, offset: 0, bytes: Buffer.concat(parts as Buffer[]) });
    }
    return out;
  }

  /** Whether the page at `offset` of `file` was prefetched (held in a run, or its chunk fetched whole). */
  prefetchedPage(file: string, offset: number): boolean {
    if (this.runs.has(file, offset)) return true;
    return this.prefetchedPages.some((p) => p.file.path === file && p.ref.offset <= offset && offset < p.ref.offset + p.ref.size);
  }

  /**
   * Reads what was prefetched through the mount, so that it is in the kernel's page cache (the
   * mount keeps it across opens) when it is read: the image's other files first (CRIU reads them
   * in small pieces, and the mount reads ahead one page only), then the prefetched memory pages. A page
   * fault is then answered by CRIU's daemon from the page cache instead of a FUSE round trip to
   * this process per page (~650 of them for the first request of the benchmark's app). Runs
   * beside `criu restore`; never fails (a page not warmed is read through FUSE as before). What
   * the mount's server holds resident it warms itself, sooner (fuse-server.ts): this reads the
   * rest.
   *
   * Async reads of the mount use libuv's thread pool while the mount's answers may need it too
   * (the chunk cache's disk tier): at most WARM_READERS reads are in flight, so the pool (4) is
   * never all blocked on the mount.
   */
  warmPageCache(): Promise<void> {
    return (this.warming ??= this.warm());
  }

  private async warm(): Promise<void> {
    const pieces = (r: FileRange, size: number): FileRange[] => {
      const out: FileRange[] = [];
      for (let at = r.offset; at < r.offset + r.length; at += size) out.push({ file: r.file, offset: at, length: Math.min(size, r.offset + r.length - at) });
      return out;
    };
    const metadata = this.o.manifest.files.filter((f) => !PAGES.test(f.path) && !this.residentFiles.has(f.path)).flatMap((f) => pieces({ file: f.path, offset: 0, length: f.size }, WARM_READ));
    // Memory pages last to first, in pieces the kernel reads whole: read forward, the kernel
    // reads ahead past the end of each range, into chunks nobody asked for (a fetch each).
    const pages = joinRanges([...this.notResident, ...this.prefetchedPages.map((p) => ({ file: p.file.path, offset: p.ref.offset, length: p.ref.size }))])
      .flatMap((r) => pieces(r, WARM_PAGES_READ))
      .reverse();
    const reads = [...metadata, ...pages];
    const files = new Map<string, Promise<FileHandle>>();
    const scratch = Array.from({ length: WARM_READERS }, () => Buffer.allocUnsafe(WARM_READ));
    let next = 0;
    const reader = async (buf: Buffer): Promise<void> => {
      while (next < reads.length && !this.closed) {
        const r = reads[next++]!;
        let fh = files.get(r.file);
        if (!fh) files.set(r.file, (fh = open(path.join(this.path, r.file), 'r')));
        await (await fh).read(buf, 0, r.length, r.offset);
      }
    };
    const t0 = performance.now();
    try {
      const [, server] = await Promise.all([Promise.all(scratch.map(reader)), this.mount?.warmed()]);
      const ms = Math.round(performance.now() - t0);
      this.o.log.debug({ reads: reads.length, pageReads: pages.length, serverBytes: server?.bytes, serverFailed: server?.failed, ms, sinceOpen: Math.round(performance.now() - this.openedAt) }, 'the page cache is warm');
    } catch (err) {
      if (!this.closed) this.o.log.debug({ err: (err as Error).message }, 'warming the page cache stopped');
    } finally {
      for (const fh of files.values()) await fh.then((h) => h.close()).catch(() => undefined);
    }
  }

  /** Every task's pagemap, read through the cache; one that cannot be read or parsed is left out (logged). */
  private async pagemaps(): Promise<TaskPagemap[]> {
    const out: TaskPagemap[] = [];
    for (const file of this.o.manifest.files) {
      const m = PAGEMAP.exec(file.path);
      if (!m) continue;
      try {
        const parts = await Promise.all(fileChunks(this.o.manifest, file).map(async (ref) => (await this.chunk(file, ref)).buf));
        out.push({ pid: Number(m[1]), map: parsePagemap(Buffer.concat(parts)) });
      } catch (err) {
        if (this.closed) throw err;
        this.o.log.warn({ file: file.path, err: (err as Error).message }, 'cannot read a pagemap: its pages are not prefetched');
      }
    }
    return out;
  }

  /**
   * A read of memory pages had to fetch its chunk. Faults come in neighbourhoods (an object
   * graph lies in a few heap pages; measured on the benchmark's misses: with the 4 chunks on
   * either side fetched at each miss, about half of the later misses would have been hits), so
   * the chunks around it are fetched beside it, before the next fault asks. Past
   * sweepAfterMisses misses, the sweep starts instead.
   */
  private missed(file: ImageFile, ref: ChunkRef): void {
    if (this.sweeping || this.closed) return;
    if (++this.misses === (this.o.sweepAfterMisses ?? SWEEP_AFTER_MISSES)) {
      this.o.log.info({ misses: this.misses }, 'the app faults on memory its prefetch did not bring: fetching the rest of the image now');
      this.sweep();
      return;
    }
    const refs = this.chunksOf(file);
    const at = chunkAt(refs, ref.offset);
    for (let i = Math.max(0, at - NEARBY_CHUNKS); i <= at + NEARBY_CHUNKS && i < refs.length; i++) {
      const r = refs[i]!;
      if (i === at || this.o.cache.has(r.hash) || this.runs.read(file.path, r.offset, r.offset + r.size)) continue;
      this.counts.nearby++;
      // Not awaited, and a failure is no one's: the read that needs the chunk fetches it again.
      this.chunk(file, r).catch(() => undefined);
    }
  }

  /** The file's chunks in offset order (memoised: the manifest never changes). */
  private chunksOf(file: ImageFile): ChunkRef[] {
    let refs = this.refsByFile.get(file.path);
    if (!refs) this.refsByFile.set(file.path, (refs = fileChunks(this.o.manifest, file)));
    return refs;
  }

  /** Starts fetching every chunk not cached yet, in file order (see the timeline above). */
  sweep(): void {
    if (this.sweeping || this.closed) return;
    const all: PlannedChunk[] = [];
    for (const file of this.o.manifest.files) {
      for (const ref of fileChunks(this.o.manifest, file)) {
        // A chunk the runs hold whole is never read (the mount answers its reads from them).
        if (!this.runs.read(file.path, ref.offset, ref.offset + ref.size)) all.push({ file, ref });
      }
    }
    this.sweeping = this.each(all, async (p) => {
      if (this.closed || this.o.cache.has(p.ref.hash)) return;
      await this.chunk(p.file, p.ref);
      this.counts.swept++;
    }).catch((err: unknown) => {
      // Not fatal by itself: a read that needs the chunk fetches it again, and fails visibly.
      if (!this.closed) this.o.log.warn({ err: (err as Error).message }, 'background fetch of the image stopped');
    });
  }

  stats(): LazyImageStats {
    return { ...this.counts };
  }

  /** Unmounts (lazily if CRIU still holds a file) and stops the sweep. Idempotent. */
  async close(): Promise<void> {
    this.closed = true;
    await this.warming; // its reads hold files of the mount open
    await this.mount?.close();
    this.mount = undefined;
    await this.sweeping;
  }

  /** A chunk a read of the mount needs, counted as a hit or a demand fetch (a miss, for memory pages). */
  private async demand(file: ImageFile, ref: ChunkRef): Promise<Buffer> {
    const got = await this.chunk(file, ref);
    if (got.from === 'fetch') {
      this.counts.demand++;
      this.o.log.trace({ file: file.path, offset: ref.offset, size: ref.size }, 'a read of the mount fetched a chunk');
      if (PAGES.test(file.path)) this.missed(file, ref);
    } else this.counts.hits++;
    return got.buf;
  }

  private chunk(file: ImageFile, ref: ChunkRef): ReturnType<ChunkCache['get']> {
    // Every source below checks the chunk's sha256 before returning it.
    return this.o.cache.get(
      ref.hash,
      ref.size,
      async () => {
        if (this.o.localDir) {
          const local = await readLocalChunk(this.o.localDir, file, ref).catch(() => null);
          if (local) return local;
        }
        const buf = await this.o.store.getChunk(ref.hash, ref.size);
        this.counts.storeBytes += buf.length;
        return buf;
      },
      { fetchVerifies: true },
    );
  }

  /** Runs `fn` over `items`, `concurrency` at a time, until closed; rejects with the first failure. */
  private each<T>(items: readonly T[], fn: (item: T) => Promise<void>): Promise<void> {
    return mapBounded(items, this.concurrency, (item) => (this.closed ? Promise.resolve() : fn(item)));
  }
}

/** The error a lazy restore reports when the image cannot be read. */
export function imageUnreadable(app: string, generation: number, err: unknown): PicoError {
  const code = err instanceof PicoError && (err.code === 'PICO_ERR_IMAGE_CORRUPT' || err.code === 'PICO_ERR_IMAGE_MISSING') ? err.code : 'PICO_ERR_STORE';
  return new PicoError(code, `app ${app}: generation ${generation}: a page could not be fetched: ${(err as Error)?.message ?? String(err)}`, { cause: err });
}
