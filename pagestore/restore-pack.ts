/*
 * A restore pack: the chunks a restore of an app reads before its process resumes — every image
 * file but the memory pages, the pages `criu restore` reads itself, and the ActiveSet — in one
 * object, written when the image is stored. A restore fetches it with one request beside its
 * look-up of the manifest, instead of one request per chunk (~170 for the benchmark's app) after
 * it; against S3 that is the difference between one round trip and a dozen.
 *
 * Layout (format 1), at apps/<app>/restore-pack.bin, the newest image's only:
 *
 *   "PCPK" | u32 format | u32 generation | u32 index length | index: JSON [[sha256, size], …]
 *   | the chunks' bytes, back to back in index order
 *
 * The pack is advice, like the ActiveSet: a reader uses a chunk only when its sha256 is one the
 * manifest being restored names and the bytes hash to it, so a pack that is missing, damaged, of
 * another generation or half-written costs the requests it would have saved, never a restore.
 */
import { sha256 } from './chunked-image-store.js';

export const RESTORE_PACK_FORMAT = 1;
const MAGIC = Buffer.from('PCPK');
const HEADER = 16;
const HASH = /^[0-9a-f]{64}$/;

export interface PackedChunk {
  hash: string;
  bytes: Buffer;
}

export function restorePackKey(app: string): string {
  return `apps/${app}/restore-pack.bin`;
}

export function encodeRestorePack(generation: number, chunks: readonly PackedChunk[]): Buffer {
  const index = Buffer.from(JSON.stringify(chunks.map((c) => [c.hash, c.bytes.length])));
  const head = Buffer.alloc(HEADER);
  MAGIC.copy(head, 0);
  head.writeUInt32LE(RESTORE_PACK_FORMAT, 4);
  head.writeUInt32LE(generation, 8);
  head.writeUInt32LE(index.length, 12);
  return Buffer.concat([head, index, ...chunks.map((c) => c.bytes)]);
}

/**
 * The chunks of a pack whose bytes hash to what the index says, restricted to `wanted` (the
 * hashes the caller may use); throws when the pack's frame is not one. Slices share `buf`.
 */
export function decodeRestorePack(buf: Buffer, wanted: ReadonlySet<string>): { generation: number; chunks: PackedChunk[]; bad: number } {
  if (buf.length < HEADER || !buf.subarray(0, 4).equals(MAGIC)) throw new Error('not a restore pack (bad magic)');
  const format = buf.readUInt32LE(4);
  if (format !== RESTORE_PACK_FORMAT) throw new Error(`restore pack format ${format} is not ${RESTORE_PACK_FORMAT}`);
  const generation = buf.readUInt32LE(8);
  const indexEnd = HEADER + buf.readUInt32LE(12);
  if (indexEnd > buf.length) throw new Error('restore pack: the index runs past the end');
  let index: unknown;
  try {
    index = JSON.parse(buf.subarray(HEADER, indexEnd).toString('utf8'));
  } catch {
    throw new Error('restore pack: the index is not JSON');
  }
  if (!Array.isArray(index) || !index.every((e) => Array.isArray(e) && typeof e[0] === 'string' && HASH.test(e[0]) && Number.isSafeInteger(e[1]) && e[1] >= 0)) {
    throw new Error('restore pack: malformed index');
  }
  const entries = index as Array<[string, number]>;
  const total = entries.reduce((n, [, size]) => n + size, 0);
  if (indexEnd + total !== buf.length) throw new Error(`restore pack: the index names ${total} bytes, the pack holds ${buf.length - indexEnd}`);
  const chunks: PackedChunk[] = [];
  let bad = 0;
  let at = indexEnd;
  for (const [hash, size] of entries) {
    const bytes = buf.subarray(at, at + size);
    at += size;
    if (!wanted.has(hash)) continue;
    if (sha256(bytes) === hash) chunks.push({ hash, bytes });
    else bad++;
  }
  return { generation, chunks, bad };
}
