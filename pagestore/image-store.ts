/*
 * The page store as the worker sees it: immutable, verified images of apps, one per generation.
 * Implemented on top of an ObjectStore (fs now, S3 later) by the chunked image format.
 *
 * Invariants:
 * - `put` returns only after every byte was written, read back and verified against its sha256
 *   and the manifest's own checksum; only then may the caller remove the container.
 * - A generation is immutable once written; older generations are deleted only after a newer
 *   one verified (`prune`).
 * - `get` verifies everything it reads; a corrupt or missing chunk rejects with
 *   PICO_ERR_IMAGE_CORRUPT / PICO_ERR_IMAGE_MISSING and writes nothing partial at `dir`'s files.
 */

import { PicoError } from '../shared/errors.js';
import type { PageChunking } from './chunker.js';

/**
 * The format new images are written in. Readers accept every format in READABLE_IMAGE_FORMATS:
 *   1  fixed-size chunks: chunk i of a file is bytes [i·chunkSize, min(size, (i+1)·chunkSize))
 *   2  variable chunks (page-aligned CDC, see chunker.ts): each file lists its chunks' `sizes`;
 *      the manifest records the `chunking` that cut them, and `chunkSize` is its largest chunk
 */
export const IMAGE_FORMAT_VERSION = 2;
export const READABLE_IMAGE_FORMATS: readonly number[] = [1, 2];

export interface ImageFile {
  /** path relative to the image directory, '/'-separated */
  path: string;
  /** in bytes */
  size: number;
  /** file mode bits */
  mode: number;
  /** sha256 (hex) of each chunk, in order */
  chunks: string[];
  /**
   * in bytes: the length of each chunk, parallel to `chunks` (each >= 1, summing to `size`).
   * Format 2 always; absent in format 1, whose lengths follow from `chunkSize`. Read chunk
   * positions through fileChunks(), which knows both.
   */
  sizes?: number[];
}

/** How a format-2 image's files were cut into chunks. */
export interface ManifestChunking extends PageChunking {
  kind: 'pages';
}

export interface ImageManifest {
  format: number; // one of READABLE_IMAGE_FORMATS; IMAGE_FORMAT_VERSION when written now
  app: string;
  generation: number;
  createdAt: string;
  /**
   * in bytes: no chunk of the image is longer (what a chunk buffer must hold). Format 1: the
   * fixed chunk length; format 2: the chunking's largest chunk, maxPages · 4096.
   */
  chunkSize: number;
  /** format 2: the chunking parameters (absent in format 1) */
  chunking?: ManifestChunking;
  files: ImageFile[];
  /** sha256 (hex) of the manifest's canonical JSON without this field */
  checksum: string;
}

/** One chunk of one file of an image: what a reader fetches to get the bytes at `offset`. */
export interface ChunkRef {
  /** sha256 (hex) of the chunk, its name in the store */
  hash: string;
  /** in bytes: where the chunk starts in the file */
  offset: number;
  /** in bytes */
  size: number;
}

/**
 * The chunks of `file` in order, with their offsets and sizes, for a manifest of any readable
 * format; they cover [0, file.size) exactly, without gaps. Pure. Expects a manifest that
 * checkManifest accepted; a file whose chunk list does not fit its format throws
 * PICO_ERR_IMAGE_CORRUPT. (Format 1 with chunkSize 0 is a store that keeps whole files: each
 * chunk is the whole file.)
 */
export function fileChunks(manifest: ImageManifest, file: ImageFile): ChunkRef[] {
  const bad = (why: string): never => {
    throw new PicoError('PICO_ERR_IMAGE_CORRUPT', `image of app "${manifest.app}" generation ${manifest.generation}, file ${file.path}: ${why}`);
  };
  const out: ChunkRef[] = [];
  if (manifest.format === 1) {
    const step = manifest.chunkSize;
    file.chunks.forEach((hash, i) => {
      const offset = step > 0 ? i * step : 0;
      out.push({ hash, offset, size: step > 0 ? Math.min(step, file.size - offset) : file.size });
    });
    return out;
  }
  const sizes = file.sizes;
  if (!Array.isArray(sizes) || sizes.length !== file.chunks.length) bad('chunk sizes do not match its chunks');
  let offset = 0;
  file.chunks.forEach((hash, i) => {
    const size = sizes![i]!;
    out.push({ hash, offset, size });
    offset += size;
  });
  if (offset !== file.size) bad(`chunks cover ${offset} bytes, the file has ${file.size}`);
  return out;
}

export interface PutStats {
  /** bytes of the image */
  totalBytes: number;
  /** bytes actually uploaded (chunks the store lacked) */
  uploadedBytes: number;
}

/** What a prune removed. */
export interface PruneStats {
  /** generations of the app deleted */
  deletedGenerations: number[];
  /** unreferenced chunks deleted (of any app) */
  deletedChunks: number;
  /** in bytes */
  freedBytes: number;
}

export interface ImageStore {
  /** Stores the image directory `dir` as the next generation of `app`; verified before it resolves. */
  put(app: string, dir: string): Promise<{ manifest: ImageManifest; stats: PutStats }>;
  /**
   * The newest generation whose manifest verifies, or undefined when the app has none.
   * `expected`: the generation the caller believes newest; its manifest may be read beside the
   * look-up of what is stored (one round trip to the store instead of two). A wrong guess costs a
   * read, never a wrong answer.
   */
  latest(app: string, expected?: number): Promise<ImageManifest | undefined>;
  /**
   * latest(app, expected) in two parts, for a caller that may start on the expected generation
   * before the listing is in: `expected` settles with that generation's manifest as soon as it is
   * read and verifies (undefined when it is missing or corrupt; rejects when the store fails),
   * `newest` with what latest() returns — the answer. A caller that went ahead on `expected` must
   * check that the two agree before anything depends on it. Absent: the caller uses latest().
   */
  lookup?(app: string, expected: number): { expected: Promise<ImageManifest | undefined>; newest: Promise<ImageManifest | undefined> };
  /** Writes the image of `manifest` into the empty directory `dir`, verifying every chunk. */
  get(manifest: ImageManifest, dir: string): Promise<void>;
  /**
   * The bytes of one stored chunk, verified against its sha256 (and `length` in bytes, when
   * given). A missing chunk rejects PICO_ERR_IMAGE_MISSING, a damaged one PICO_ERR_IMAGE_CORRUPT.
   */
  getChunk(hash: string, length?: number): Promise<Buffer>;
  /** chunks this store has in flight at once for one image (get); lazy restores fetch as many */
  readonly concurrency?: number;
  /** Deletes generations older than the newest verified one, and chunks no manifest references. */
  prune(app: string): Promise<PruneStats | void>;
  /** Every app that has at least one stored generation, with its newest generation number. */
  apps(): Promise<Array<{ app: string; generation: number }>>;
}

/** The chunks of `refs` (one file's, in order) that hold bytes of [pos, end); pos < end. */
export function chunksIn(refs: readonly ChunkRef[], pos: number, end: number): ChunkRef[] {
  return refs.slice(chunkAt(refs, pos), chunkAt(refs, end - 1) + 1);
}

/** The bytes [pos, end) as views of `bodies`, the contents of chunksIn(refs, pos, end) in order. */
export function sliceChunks(touched: readonly ChunkRef[], bodies: readonly Buffer[], pos: number, end: number): Buffer[] {
  return touched.map((ref, i) => bodies[i]!.subarray(Math.max(pos, ref.offset) - ref.offset, Math.min(end, ref.offset + ref.size) - ref.offset));
}

/** Index of the chunk holding byte `pos` (binary search over offsets; empty chunks skipped). */
export function chunkAt(refs: readonly ChunkRef[], pos: number): number {
  let lo = 0;
  let hi = refs.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (refs[mid]!.offset <= pos) lo = mid;
    else hi = mid - 1;
  }
  while (lo < refs.length - 1 && refs[lo]!.offset + refs[lo]!.size <= pos) lo++;
  return lo;
}
