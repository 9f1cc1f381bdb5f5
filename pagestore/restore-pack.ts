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
 * Each image has up to three. The first two are written side by side and fetched side by side,
 * so that the restore can start on the first while the second is still on its way:
 *   restore    apps/<app>/restore-pack.bin: every image file but the memory pages (chunks) and
 *              the pages `criu restore` reads itself (runs): what the restore reads before the
 *              process resumes; small (~300 KB for the benchmark's app, ~70 KB compressed)
 *   activeset  apps/<app>/activeset-pack.bin: the ActiveSet's pages (runs), which the process
 *              faults on once it runs (~9 MB, ~2 MB compressed)
 * The third is asked for once the process resumed, so that it takes neither the link from the
 * manifest nor the CPU from CRIU:
 *   heads      apps/<app>/heads-pack.bin: the first page of each memory region not in the other
 *              two (~700 pages for the benchmark's app), which a garbage collection reads all
 *              at once
 * Only the newest image's are kept.
 *
 * Layout (format 3):
 *
 *   "PCPK" | u32 format | u32 generation | u32 index length
 *   | index: JSON { manifest: checksum, chunks: [[sha256, size], …], runs: [[file, offset, length, sha256], …] }
 *   | the body, raw DEFLATE (level 1): the chunks' bytes, then the runs' bytes, back to back in
 *     index order
 *
 * Compressed because the pack is on the way to the first response: the benchmark app's ActiveSet
 * pack (V8 heap and code) goes from 9.1 MB to 2.1 MB, ~70 ms less on a 100 MB/s link, for ~20 ms
 * of inflating on the thread pool (zlib), not the event loop. Format 2 (the same, the body
 * uncompressed) is still read.
 *
 * The pack is advice, like the ActiveSet: a reader uses a chunk only when its sha256 is one the
 * manifest being restored names and the bytes hash to it; a run only when the pack was written
 * for that very manifest (its checksum: run offsets are positions in one image's files) and the
 * bytes hash to the run's sha256. A pack that is missing, damaged, of another image or half-
 * written costs the requests it would have saved, never a restore.
 */
import { promisify } from 'node:util';
import { deflateRaw, inflateRaw } from 'node:zlib';
import { sha256 } from './chunked-image-store.js';

const deflate = promisify(deflateRaw);
const inflate = promisify(inflateRaw);

export const RESTORE_PACK_FORMAT = 3;
/** the format before the body was compressed; still read */
const PLAIN_FORMAT = 2;
/** zlib's level for the body: 1 compresses the benchmark's pack nearly as well as 6, at 2.5x the speed */
const DEFLATE_LEVEL = 1;
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
/**
 * restore: what `criu restore` reads; activeset: the ActiveSet's pages; heads: the first page of
 * each memory region (restore-plan.ts, regionHeads), asked for only once the process resumed
 */
export type PackPart = 'restore' | 'activeset' | 'heads';
/** the parts a restore asks for beside the manifest's look-up */
export const PACK_PARTS: readonly PackPart[] = ['restore', 'activeset'];

export function restorePackKey(app: string, part: PackPart = 'restore'): string {
  return `apps/${app}/${part === 'restore' ? 'restore' : part === 'activeset' ? 'activeset' : 'heads'}-pack.bin`;
}

/** An image's two packs as a restore reads them: each may be missing (undefined) or fail. */
export type RestorePacks = Partial<Record<PackPart, Promise<Buffer | undefined>>>;

/** The pack's bytes (compressed on the thread pool). */
export async function encodeRestorePack(generation: number, pack: RestorePackContents): Promise<Buffer> {
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
  const body = await deflate(Buffer.concat([...pack.chunks.map((c) => c.bytes), ...pack.runs.map((r) => r.bytes)]), { level: DEFLATE_LEVEL });
  return Buffer.concat([head, index, body]);
}

const isSize = (n: unknown): n is number => Number.isSafeInteger(n) && (n as number) >= 0;

/**
 * The entries of a pack that the restore of `manifest` may use: chunks restricted to `wanted`
 * (the hashes it names), runs only when the pack was written for this manifest; each checked
 * against its sha256. Rejects when the pack's frame is not one. Slices share the body (`buf`
 * itself in format 2). The hashing (~10 MB for the benchmark's app) leaves the event loop a turn
 * after each MiB (verifier).
 */
export async function decodeRestorePack(buf: Buffer, manifest: { checksum: string }, wanted: ReadonlySet<string>): Promise<DecodedRestorePack> {
  if (buf.length < HEADER || !buf.subarray(0, 4).equals(MAGIC)) throw new Error('not a restore pack (bad magic)');
  const format = buf.readUInt32LE(4);
  if (format !== RESTORE_PACK_FORMAT && format !== PLAIN_FORMAT) throw new Error(`restore pack format ${format} is not ${PLAIN_FORMAT} or ${RESTORE_PACK_FORMAT}`);
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
  const body = format === PLAIN_FORMAT ? buf.subarray(indexEnd) : await inflateBody(buf.subarray(indexEnd), total);
  if (body.length !== total) throw new Error(`restore pack: the index names ${total} bytes, the pack holds ${body.length}`);
  const current = index.manifest === manifest.checksum;
  const out: DecodedRestorePack = { generation, current, chunks: [], runs: [], bad: 0 };
  let at = 0;
  const slice = (size: number): Buffer => body.subarray(at, (at += size));
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

/** The body of a format-3 pack, inflated: never more than the `total` bytes its index names (+1, to tell). */
async function inflateBody(deflated: Buffer, total: number): Promise<Buffer> {
  try {
    return await inflate(deflated, { maxOutputLength: total + 1 });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ERR_BUFFER_TOO_LARGE') throw new Error(`restore pack: the body inflates to more than the ${total} bytes the index names`);
    throw new Error(`restore pack: the body does not inflate (${(err as Error).message})`);
  }
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
