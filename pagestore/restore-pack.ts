/*
 * A restore pack: what a restore of an app reads before its process resumes and the pages it is
 * about to touch, in one object written when the image is stored. A restore fetches it with one
 * request beside its look-up of the manifest, instead of one request per chunk after it; against
 * S3 that is the difference between one round trip and a dozen.
 *
 * Two kinds of entries:
 *   chunks  whole chunks, content-addressed (every image file but the memory pages, which
 *           `criu restore` reads whole)
 *   runs    byte ranges of the memory pages files, page-granular: the pages `criu restore` reads
 *           itself and the ActiveSet's pages. A chunk holds ~20 pages on average of which a
 *           restore touches a few; packing the pages alone makes the pack several times smaller
 *           than packing their chunks.
 *
 * Each image has two, written side by side and fetched side by side, so that the restore can
 * start on the first while the second is still on its way:
 *   restore    apps/<app>/restore-pack.bin: every image file but the memory pages (chunks) and
 *              the pages `criu restore` reads itself (runs): what the restore reads before the
 *              process resumes; small (~0.7 MB for the benchmark's app)
 *   activeset  apps/<app>/activeset-pack.bin: the ActiveSet's pages (runs), which the process
 *              faults on once it runs (~7 MB)
 * Only the newest image's are kept.
 *
 * Layout (format 2):
 *
 *   "PCPK" | u32 format | u32 generation | u32 index length
 *   | index: JSON { manifest: checksum, chunks: [[sha256, size], …], runs: [[file, offset, length, sha256], …] }
 *   | the chunks' bytes, then the runs' bytes, back to back in index order
 *
 * The pack is advice, like the ActiveSet: a reader uses a chunk only when its sha256 is one the
 * manifest being restored names and the bytes hash to it; a run only when the pack was written
 * for that very manifest (its checksum: run offsets are positions in one image's files) and the
 * bytes hash to the run's sha256. A pack that is missing, damaged, of another image or half-
 * written costs the requests it would have saved, never a restore.
 */
import { sha256 } from './chunked-image-store.js';

export const RESTORE_PACK_FORMAT = 2;
const MAGIC = Buffer.from('PCPK');
const HEADER = 16;
const HASH = /^[0-9a-f]{64}$/;

export interface PackedChunk {
  hash: string;
  bytes: Buffer;
}

/** Bytes of an image file at `offset`. */
export interface PackedRun {
  file: string;
  offset: number;
  bytes: Buffer;
}

export interface RestorePackContents {
  /** the checksum of the manifest the runs were cut from */
  manifest: string;
  chunks: readonly PackedChunk[];
  runs: readonly PackedRun[];
}

export interface DecodedRestorePack {
  generation: number;
  chunks: PackedChunk[];
  /** whether the pack was written for the manifest being restored */
  current: boolean;
  /** empty unless `current` */
  runs: PackedRun[];
  /** entries whose bytes did not hash to what the index says */
  bad: number;
}

/** Which of an image's two packs (see the top of this file). */
export type PackPart = 'restore' | 'activeset';
export const PACK_PARTS: readonly PackPart[] = ['restore', 'activeset'];

export function restorePackKey(app: string, part: PackPart = 'restore'): string {
  return part === 'restore' ? `apps/${app}/restore-pack.bin` : `apps/${app}/activeset-pack.bin`;
}

/** An image's two packs as a restore reads them: each may be missing (undefined) or fail. */
export type RestorePacks = Partial<Record<PackPart, Promise<Buffer | undefined>>>;

export function encodeRestorePack(generation: number, pack: RestorePackContents): Buffer {
  const index = Buffer.from(
    JSON.stringify({
      manifest: pack.manifest,
      chunks: pack.chunks.map((c) => [c.hash, c.bytes.length]),
      runs: pack.runs.map((r) => [r.file, r.offset, r.bytes.length, sha256(r.bytes)]),
    }),
  );
  const head = Buffer.alloc(HEADER);
  MAGIC.copy(head, 0);
  head.writeUInt32LE(RESTORE_PACK_FORMAT, 4);
  head.writeUInt32LE(generation, 8);
  head.writeUInt32LE(index.length, 12);
  return Buffer.concat([head, index, ...pack.chunks.map((c) => c.bytes), ...pack.runs.map((r) => r.bytes)]);
}

const isSize = (n: unknown): n is number => Number.isSafeInteger(n) && (n as number) >= 0;

/**
 * The entries of a pack that the restore of `manifest` may use: chunks restricted to `wanted`
 * (the hashes it names), runs only when the pack was written for this manifest; each checked
 * against its sha256. Rejects when the pack's frame is not one. Slices share `buf`. The hashing
 * (~10 MB for the benchmark's app) leaves the event loop a turn after each MiB (verifier).
 */
export async function decodeRestorePack(buf: Buffer, manifest: { checksum: string }, wanted: ReadonlySet<string>): Promise<DecodedRestorePack> {
  if (buf.length < HEADER || !buf.subarray(0, 4).equals(MAGIC)) throw new Error('not a restore pack (bad magic)');
  const format = buf.readUInt32LE(4);
  if (format !== RESTORE_PACK_FORMAT) throw new Error(`restore pack format ${format} is not ${RESTORE_PACK_FORMAT}`);
  const generation = buf.readUInt32LE(8);
  const indexEnd = HEADER + buf.readUInt32LE(12);
  if (indexEnd > buf.length) throw new Error('restore pack: the index runs past the end');
  let index: { manifest?: unknown; chunks?: unknown; runs?: unknown };
  try {
    index = JSON.parse(buf.subarray(HEADER, indexEnd).toString('utf8')) as typeof index;
  } catch {
    throw new Error('restore pack: the index is not JSON');
  }
  const chunks = index?.chunks;
  const runs = index?.runs;
  if (
    typeof index?.manifest !== 'string' ||
    !Array.isArray(chunks) ||
    !chunks.every((e) => Array.isArray(e) && e.length === 2 && typeof e[0] === 'string' && HASH.test(e[0]) && isSize(e[1])) ||
    !Array.isArray(runs) ||
    !runs.every((e) => Array.isArray(e) && e.length === 4 && typeof e[0] === 'string' && isSize(e[1]) && isSize(e[2]) && typeof e[3] === 'string' && HASH.test(e[3]))
  ) {
    throw new Error('restore pack: malformed index');
  }
  const chunkEntries = chunks as Array<[string, number]>;
  const runEntries = runs as Array<[string, number, number, string]>;
  const total = chunkEntries.reduce((n, [, size]) => n + size, 0) + runEntries.reduce((n, [, , length]) => n + length, 0);
  if (indexEnd + total !== buf.length) throw new Error(`restore pack: the index names ${total} bytes, the pack holds ${buf.length - indexEnd}`);
  const current = index.manifest === manifest.checksum;
  const out: DecodedRestorePack = { generation, current, chunks: [], runs: [], bad: 0 };
  let at = indexEnd;
  const slice = (size: number): Buffer => buf.subarray(at, (at += size));
  const verified = verifier();
  for (const [hash, size] of chunkEntries) {
    const bytes = slice(size);
    if (!wanted.has(hash)) continue;
    if (await verified(bytes, hash)) out.chunks.push({ hash, bytes });
    else out.bad++;
  }
  if (!current) return out;
  for (const [file, offset, length, hash] of runEntries) {
    const bytes = slice(length);
    if (await verified(bytes, hash)) out.runs.push({ file, offset, bytes });
    else out.bad++;
  }
  return out;
}

/** in bytes: hashed between two turns of the event loop */
const HASH_SLICE = 1024 * 1024;

/**
 * Checks bytes against their sha256, giving the event loop a turn after every HASH_SLICE bytes
 * hashed: it answers the image mount's reads and the restore's children meanwhile.
 */
function verifier(): (bytes: Buffer, hash: string) => Promise<boolean> {
  let since = 0;
  return async (bytes, hash) => {
    if (since >= HASH_SLICE) {
      since = 0;
      await new Promise((resolve) => setImmediate(resolve));
    }
    since += bytes.length;
    return sha256(bytes) === hash;
  };
}
