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

export const IMAGE_FORMAT_VERSION = 1;

export interface ImageFile {
  /** path relative to the image directory, '/'-separated */
  path: string;
  /** in bytes */
  size: number;
  /** file mode bits */
  mode: number;
  /** sha256 (hex) of each chunk, in order */
  chunks: string[];
}

export interface ImageManifest {
  format: number; // IMAGE_FORMAT_VERSION
  app: string;
  generation: number;
  createdAt: string;
  /** in bytes */
  chunkSize: number;
  files: ImageFile[];
  /** sha256 (hex) of the manifest's canonical JSON without this field */
  checksum: string;
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
  /** The newest generation whose manifest verifies, or undefined when the app has none. */
  latest(app: string): Promise<ImageManifest | undefined>;
  /** Writes the image of `manifest` into the empty directory `dir`, verifying every chunk. */
  get(manifest: ImageManifest, dir: string): Promise<void>;
  /** Deletes generations older than the newest verified one, and chunks no manifest references. */
  prune(app: string): Promise<PruneStats | void>;
  /** Every app that has at least one stored generation, with its newest generation number. */
  apps(): Promise<Array<{ app: string; generation: number }>>;
}
