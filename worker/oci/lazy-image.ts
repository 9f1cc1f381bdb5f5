import { open } from 'node:fs/promises';
import path from 'node:path';
import { PicoError } from '../../shared/errors.js';
import type { Logger } from '../../shared/log.js';
import type { PlannedChunk } from '../../pagestore/activeset.js';
import { mapBounded } from '../../pagestore/bounded.js';
import { sha256 } from '../../pagestore/chunked-image-store.js';
import type { ChunkCache } from '../../pagestore/chunk-cache.js';
import { mountImage, type ImageMount } from '../../pagestore/image-mount.js';
import { fileChunks, type ChunkRef, type ImageFile, type ImageManifest, type ImageStore } from '../../pagestore/image-store.js';

/*
 * The image of a lazy restore: a FUSE directory (pagestore/image-mount.ts) whose reads are
 * answered chunk by chunk from, in order, the worker's chunk cache, the worker's local copy of
 * this very image (each chunk checked against its sha256 as it is read), or the page store.
 *
 * Timeline of one restore:
 *   open()        mount, then fetch into the cache, all in parallel, every file but the memory
 *                 pages (CRIU reads them whole, one by one, before the process resumes) and the
 *                 ActiveSet (awaited: the process must not resume before the chunks it is about
 *                 to touch are here)
 *   (the caller runs `criu lazy-pages` on `path` and `runc restore --lazy-pages`)
 *   sweep()       fetch every other chunk in file order, `concurrency` at a time: CRIU's daemon
 *                 copies the pages nobody faulted on in about that order, and it is single-
 *                 threaded — a fault waits behind whatever read it is doing, so that read must
 *                 find its chunk here already
 *   close()       once the daemon exited (every page is in the process): unmount
 *
 * A chunk that cannot be had (store down past its retries, a bad checksum) fails the read that
 * needed it, after `onFailure` (the caller kills the container: a process must never run on
 * with a page it could not get).
 */

/** CRIU's memory pages files: the only files a lazy restore reads on demand */
const PAGES = /^pages-\d+\.img$/;

export interface LazyImageOptions {
  manifest: ImageManifest;
  mountpoint: string;
  store: ImageStore;
  cache: ChunkCache;
  /** a local copy of exactly this image (same manifest), read before the store */
  localDir?: string;
  /** the ActiveSet: fetched before open() resolves */
  prefetch: readonly PlannedChunk[];
  /** fetches in flight for the prefetch and the sweep; default 16 */
  concurrency?: number;
  onFailure(err: unknown): Promise<void>;
  log: Logger;
}

export interface LazyImageStats {
  /** chunks of the image's other files (everything but memory pages), fetched before the restore */
  metadata: number;
  /** ActiveSet chunks of memory pages fetched before the restore */
  prefetched: number;
  /** in ms */
  prefetchMs: number;
  /** chunks a read found in the cache (memory or disk) */
  hits: number;
  /** chunks a read had to fetch itself (local copy or store) */
  demand: number;
  /** chunks the sweep fetched */
  swept: number;
  /** in bytes, from the page store (not the cache or the local copy) */
  storeBytes: number;
}

export class LazyImage {
  readonly path: string;
  private mount: ImageMount | undefined;
  private readonly counts: LazyImageStats = { metadata: 0, prefetched: 0, prefetchMs: 0, hits: 0, demand: 0, swept: 0, storeBytes: 0 };
  private sweeping: Promise<void> | undefined;
  private closed = false;
  private readonly concurrency: number;

  private constructor(private readonly o: LazyImageOptions) {
    this.path = o.mountpoint;
    this.concurrency = o.concurrency ?? 16;
  }

  static async open(o: LazyImageOptions): Promise<LazyImage> {
    const img = new LazyImage(o);
    try {
      img.mount = await mountImage({
        mountpoint: o.mountpoint,
        manifest: o.manifest,
        chunk: async (ref, file) => {
          const got = await img.chunk(file, ref);
          if (got.from === 'fetch') img.counts.demand++;
          else img.counts.hits++;
          return got.buf;
        },
        onFailure: (err) => o.onFailure(err),
        log: o.log,
      });
      // Every file but the memory pages is read whole by `criu restore` before the process
      // resumes, one file at a time: fetch them all at once first, with the ActiveSet.
      const wanted = new Map<string, PlannedChunk>();
      for (const file of o.manifest.files) {
        if (PAGES.test(file.path)) continue;
        for (const ref of fileChunks(o.manifest, file)) wanted.set(ref.hash, { file, ref });
      }
      const metadata = wanted.size;
      for (const p of o.prefetch) wanted.set(p.ref.hash, p);
      img.counts.metadata = metadata;
      const t0 = performance.now();
      await img.each([...wanted.values()], async (p) => {
        await img.chunk(p.file, p.ref);
        if (PAGES.test(p.file.path)) img.counts.prefetched++;
      });
      img.counts.prefetchMs = Math.round(performance.now() - t0);
      return img;
    } catch (err) {
      await img.close();
      throw err;
    }
  }

  /** Starts fetching every chunk not cached yet, in file order (see the timeline above). */
  sweep(): void {
    if (this.sweeping || this.closed) return;
    const all: PlannedChunk[] = [];
    for (const file of this.o.manifest.files) for (const ref of fileChunks(this.o.manifest, file)) all.push({ file, ref });
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
    await this.mount?.close();
    this.mount = undefined;
    await this.sweeping;
  }

  private chunk(file: ImageFile, ref: ChunkRef): ReturnType<ChunkCache['get']> {
    // Every source below checks the chunk's sha256 before returning it.
    return this.o.cache.get(
      ref.hash,
      ref.size,
      async () => {
        if (this.o.localDir) {
          const local = await readLocal(this.o.localDir, file, ref).catch(() => null);
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

/** One chunk from the local copy of the image, or null when it is not there intact. */
async function readLocal(dir: string, file: ImageFile, ref: ChunkRef): Promise<Buffer | null> {
  const fh = await open(path.join(dir, ...file.path.split('/')), 'r');
  try {
    const buf = Buffer.allocUnsafe(ref.size);
    const { bytesRead } = await fh.read(buf, 0, ref.size, ref.offset);
    return bytesRead === ref.size && sha256(buf) === ref.hash ? buf : null;
  } finally {
    await fh.close();
  }
}

/** The error a lazy restore reports when the image cannot be read. */
export function imageUnreadable(app: string, generation: number, err: unknown): PicoError {
  const code = err instanceof PicoError && (err.code === 'PICO_ERR_IMAGE_CORRUPT' || err.code === 'PICO_ERR_IMAGE_MISSING') ? err.code : 'PICO_ERR_STORE';
  return new PicoError(code, `app ${app}: generation ${generation}: a page could not be fetched: ${(err as Error)?.message ?? String(err)}`, { cause: err });
}
