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
import { createInflateRaw, deflateRaw, type InflateRaw } from 'node:zlib';
import { sha256 } from './chunked-image-store.js';

const deflate = promisify(deflateRaw);

export const RESTORE_PACK_FORMAT = 3;
/** the format before the body was compressed; still read */
const PLAIN_FORMAT = 2;
/** zlib's level for the body: 1 compresses the benchmark's pack nearly as well as 6, at 2.5x the speed */
const DEFLATE_LEVEL = 1;
const MAGIC = Buffer.from('PCPK');
const HEADER = 16;
const HASH = /^[0-9a-f]{64}$/;
/**
 * in bytes: what the inflater hands over at a time. zlib's default (16 KiB) made a thread-pool
 * round trip and a 'data' event per 16 KiB: the benchmark's ActiveSet pack (10 MB inflated) took
 * ~75 ms to read instead of ~30.
 */
const INFLATE_CHUNK = 1024 * 1024;
/** in bytes: the most a pack's body may inflate to (its index says how much, and that much is allocated at once) */
const MAX_BODY = 1024 * 1024 * 1024;

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
export type RestorePacks = Partial<Record<PackPart, Promise<ReadRestorePack | undefined>>>;

/** A pack's bytes: whole, or as they arrive from the store (ObjectStore.getStream). */
export type PackBytes = Buffer | AsyncIterable<Buffer>;

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
 * A pack as read: every entry whose bytes hash to what its index says, the others counted. Slices
 * share the body. Which of them a restore may use is packFor()'s to say.
 */
export interface ReadRestorePack {
  generation: number;
  /** the checksum of the manifest the runs were cut from */
  manifest: string;
  chunks: PackedChunk[];
  runs: PackedRun[];
  /** hashes of the chunks whose bytes did not hash to them */
  badChunks: string[];
  /** runs whose bytes did not hash to what the index says */
  badRuns: number;
}

/**
 * Reads a pack: its frame, then its body, each entry checked against its sha256. Rejects when
 * the frame is not one. Needs nothing of the image it is for, so a restore reads it while the
 * manifest is still on its way.
 *
 * `input` may be the bytes as they arrive (ObjectStore.getStream): the body is then inflated and
 * each entry hashed as soon as its bytes are in, while the rest is still on the link, so that the
 * pack is usable a few milliseconds after its last byte instead of a whole decode later (the
 * benchmark's ActiveSet pack, ~2.2 MB inflating to ~9 MB, took 43–84 ms to decode once in, beside
 * CRIU). Between two pieces of input the event loop has its turns (the image mount's reads).
 */
export async function readRestorePack(input: PackBytes): Promise<ReadRestorePack> {
  let head: Buffer = Buffer.alloc(0);
  let body: BodySink | undefined;
  try {
    for await (const piece of Buffer.isBuffer(input) ? [input] : input) {
      if (body) {
        await body.write(piece);
        continue;
      }
      head = head.length === 0 ? piece : Buffer.concat([head, piece]);
      if (head.length >= 4 && !head.subarray(0, 4).equals(MAGIC)) throw new Error('not a restore pack (bad magic)');
      if (head.length < HEADER) continue;
      const indexEnd = HEADER + head.readUInt32LE(12);
      const format = head.readUInt32LE(4);
      if (format !== RESTORE_PACK_FORMAT && format !== PLAIN_FORMAT) throw new Error(`restore pack format ${format} is not ${PLAIN_FORMAT} or ${RESTORE_PACK_FORMAT}`);
      if (head.length < indexEnd) continue;
      body = new BodySink(format, head.readUInt32LE(8), parseIndex(head.subarray(HEADER, indexEnd)));
      if (head.length > indexEnd) await body.write(head.subarray(indexEnd));
    }
  } catch (err) {
    body?.destroy();
    throw err;
  }
  if (!body) {
    if (head.length < HEADER) throw new Error(head.length >= 4 ? 'restore pack: truncated in its header' : 'not a restore pack (bad magic)');
    throw new Error('restore pack: the index runs past the end');
  }
  return body.end();
}

/**
 * The entries of a read pack that the restore of `manifest` may use: chunks restricted to
 * `wanted` (the hashes it names), runs only when the pack was written for this manifest (run
 * offsets are positions in one image's files). `bad` counts only entries it would have used.
 */
export function packFor(pack: ReadRestorePack, manifest: { checksum: string }, wanted: ReadonlySet<string>): DecodedRestorePack {
  const current = pack.manifest === manifest.checksum;
  return {
    generation: pack.generation,
    current,
    chunks: pack.chunks.filter((c) => wanted.has(c.hash)),
    runs: current ? pack.runs : [],
    bad: pack.badChunks.filter((h) => wanted.has(h)).length + (current ? pack.badRuns : 0),
  };
}

/** readRestorePack, then packFor. */
export async function decodeRestorePack(input: PackBytes, manifest: { checksum: string }, wanted: ReadonlySet<string>): Promise<DecodedRestorePack> {
  return packFor(await readRestorePack(input), manifest, wanted);
}

interface PackIndex {
  manifest: string;
  chunks: Array<[string, number]>;
  runs: Array<[string, number, number, string]>;
  /** in bytes: the body, inflated */
  total: number;
}

function parseIndex(bytes: Buffer): PackIndex {
  let index: { manifest?: unknown; chunks?: unknown; runs?: unknown };
  try {
    index = JSON.parse(bytes.toString('utf8')) as typeof index;
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
  const c = chunks as PackIndex['chunks'];
  const r = runs as PackIndex['runs'];
  const total = c.reduce((n, [, size]) => n + size, 0) + r.reduce((n, [, , length]) => n + length, 0);
  if (total > MAX_BODY) throw new Error(`restore pack: the index names ${total} bytes, more than a pack may hold (${MAX_BODY})`);
  return { manifest: index.manifest, chunks: c, runs: r, total };
}

/**
 * A pack's body as it comes: inflated (format 3) or copied (format 2) into one buffer of the
 * size the index names, each entry checked as soon as its last byte is in. More bytes than the
 * index names stop it at once (a deflate bomb inflates no further than that).
 */
class BodySink {
  private readonly out: Buffer;
  private filled = 0;
  /** the next entry to check, and where its bytes start */
  private next = 0;
  private at = 0;
  private readonly entries: Array<{ size: number; check: (bytes: Buffer) => void }> = [];
  private readonly inflater: InflateRaw | undefined;
  private failure: Error | undefined;
  private readonly inflated: Promise<void> | undefined;
  private readonly result: ReadRestorePack;

  constructor(format: number, generation: number, private readonly index: PackIndex) {
    this.out = Buffer.allocUnsafe(index.total);
    this.result = { generation, manifest: index.manifest, chunks: [], runs: [], badChunks: [], badRuns: 0 };
    for (const [hash, size] of index.chunks) {
      this.entries.push({
        size,
        check: (bytes) => {
          if (sha256(bytes) === hash) this.result.chunks.push({ hash, bytes });
          else this.result.badChunks.push(hash);
        },
      });
    }
    for (const [file, offset, length, hash] of index.runs) {
      this.entries.push({
        size: length,
        check: (bytes) => {
          if (sha256(bytes) === hash) this.result.runs.push({ file, offset, bytes });
          else this.result.badRuns++;
        },
      });
    }
    if (format === PLAIN_FORMAT) return;
    const inflater = createInflateRaw({ chunkSize: INFLATE_CHUNK });
    this.inflater = inflater;
    inflater.on('data', (d: Buffer) => this.take(d));
    this.inflated = new Promise<void>((resolve, reject) => {
      inflater.once('end', resolve);
      inflater.once('error', (err: Error) => reject(this.failure ?? new Error(`restore pack: the body does not inflate (${err.message})`)));
      inflater.once('close', () => (this.failure ? reject(this.failure) : undefined));
    });
    this.inflated.catch(() => undefined);
  }

  async write(piece: Buffer): Promise<void> {
    if (this.failure) throw this.failure;
    if (!this.inflater) {
      if (this.filled + piece.length > this.out.length) throw new Error(`restore pack: the index names ${this.index.total} bytes, the pack holds more`);
      this.take(piece);
      return;
    }
    const inflater = this.inflater;
    if (!inflater.write(piece)) {
      // Destroyed (too many bytes, a broken body) instead of drained: `inflated` tells why.
      await new Promise<void>((resolve) => {
        const go = (): void => {
          inflater.off('drain', go).off('close', go);
          resolve();
        };
        inflater.on('drain', go).on('close', go);
      });
    }
    if (this.failure) throw this.failure;
    if (inflater.destroyed) await this.inflated;
  }

  async end(): Promise<ReadRestorePack> {
    if (this.inflater) {
      this.inflater.end();
      await this.inflated;
    }
    if (this.failure) throw this.failure;
    if (this.filled !== this.out.length) throw new Error(`restore pack: the index names ${this.index.total} bytes, the pack holds ${this.filled}`);
    return this.result;
  }

  /** Gives up (the input broke): the inflater's memory goes now, not at the next collection. */
  destroy(): void {
    this.inflater?.destroy();
  }

  private take(bytes: Buffer): void {
    if (this.failure) return;
    if (this.filled + bytes.length > this.out.length) {
      this.failure = new Error(`restore pack: the body inflates to more than the ${this.index.total} bytes the index names`);
      this.inflater?.destroy();
      return;
    }
    bytes.copy(this.out, this.filled);
    this.filled += bytes.length;
    while (this.next < this.entries.length && this.at + this.entries[this.next]!.size <= this.filled) {
      const e = this.entries[this.next++]!;
      e.check(this.out.subarray(this.at, (this.at += e.size)));
    }
  }
}

