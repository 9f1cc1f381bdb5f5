import { readFile } from 'node:fs/promises';
import path from 'node:path';
import type { ActiveSetStore, PageLocator, PlannedChunk } from '../../pagestore/activeset.js';
import { fileChunks, type ImageManifest } from '../../pagestore/image-store.js';
import type { PackedChunk, PackedRun } from '../../pagestore/restore-pack.js';
import { readLocalChunk } from './local-image.js';
import { eagerRanges, PAGE_SIZE, PE_LAZY, pageOffset, parsePagemap, type Pagemap } from './pagemap.js';

/*
 * What a lazy restore of an image reads before its process resumes, and the pages it is about to
 * touch: the checkpoint that stored the image packs them into two objects (writeRestorePack,
 * pagestore/restore-pack.ts) — the metadata as chunks, the pages as runs — and a restore without
 * them prefetches them chunk by chunk (lazy-image.ts).
 *   metadata  every file but the memory pages: `criu restore` reads them whole, one by one
 *   eager     the memory pages `criu restore` reads itself (not marked lazy: stacks, private
 *             file mappings), found through each task's pagemap
 *   ActiveSet the pages the app is about to touch (pagestore/activeset.ts), by the same pagemaps
 */

/** CRIU's memory pages files: the only files a lazy restore reads on demand */
export const PAGES = /^pages-\d+\.img$/;
/** a task's pagemap: where each of its pages is in a pages file */
export const PAGEMAP = /^pagemap-(\d+)\.img$/;

export interface TaskPagemap {
  pid: number;
  map: Pagemap;
}

/** The chunks of every file but the memory pages, the pagemaps first. */
export function metadataChunks(manifest: ImageManifest): PlannedChunk[] {
  const first: PlannedChunk[] = [];
  const rest: PlannedChunk[] = [];
  for (const file of manifest.files) {
    if (PAGES.test(file.path)) continue;
    for (const ref of fileChunks(manifest, file)) (PAGEMAP.test(file.path) ? first : rest).push({ file, ref });
  }
  return [...first, ...rest];
}

/** The chunks holding the pages `criu restore` reads itself. */
export function eagerChunks(manifest: ImageManifest, maps: readonly TaskPagemap[]): PlannedChunk[] {
  const out: PlannedChunk[] = [];
  for (const { map } of maps) {
    const file = manifest.files.find((f) => f.path === `pages-${map.pagesId}.img`);
    if (!file) continue;
    const chunks = fileChunks(manifest, file);
    for (const r of eagerRanges(map)) {
      for (const ref of chunks) if (ref.offset < r.offset + r.length && ref.offset + ref.size > r.offset) out.push({ file, ref });
    }
  }
  return out;
}

/** Where each task's pages are in the image the pagemaps came from. */
export function pagemapLocator(maps: readonly TaskPagemap[]): PageLocator {
  const byPid = new Map(maps.map((m) => [m.pid, m.map]));
  return (pid, vaddr) => {
    const map = byPid.get(pid);
    const offset = map ? pageOffset(map, vaddr) : null;
    return map && offset !== null ? { file: `pages-${map.pagesId}.img`, offset } : null;
  };
}

/**
 * in bytes: the most the kernel reads in one piece of a FUSE file: a large read's piece, or its
 * readahead where the mount's could not be shrunk to a page (image-mount.ts: pageReadahead)
 */
const READAHEAD_BYTES = 128 * 1024;

/**
 * The chunks the kernel's readahead may ask for along with `chunks` (memory pages): those
 * within READAHEAD_BYTES after the end of each run of them. A read of the mount waits for every
 * chunk it covers, so a fault on a prefetched page would otherwise wait for the store to deliver
 * the chunk after it.
 */
export function readaheadChunks(manifest: ImageManifest, chunks: readonly PlannedChunk[]): PlannedChunk[] {
  const planned = new Set(chunks.map((p) => p.ref.hash));
  const out: PlannedChunk[] = [];
  for (const file of manifest.files) {
    if (!PAGES.test(file.path)) continue;
    const refs = fileChunks(manifest, file);
    let until = -1;
    for (const ref of refs) {
      if (planned.has(ref.hash)) until = ref.offset + ref.size + READAHEAD_BYTES;
      else if (ref.offset < until) out.push({ file, ref });
    }
  }
  return out;
}

/** `lists` joined, each chunk (by hash) once, in first-seen order. */
export function distinctChunks(...lists: ReadonlyArray<readonly PlannedChunk[]>): PlannedChunk[] {
  const seen = new Set<string>();
  const out: PlannedChunk[] = [];
  for (const list of lists) {
    for (const p of list) {
      if (seen.has(p.ref.hash)) continue;
      seen.add(p.ref.hash);
      out.push(p);
    }
  }
  return out;
}

/** A byte range of an image file. */
export interface FileRange {
  file: string;
  offset: number;
  length: number;
}

/** The byte ranges of the pages files that `criu restore` reads itself (see eagerChunks). */
export function eagerPageRanges(maps: readonly TaskPagemap[]): FileRange[] {
  return maps.flatMap(({ map }) => eagerRanges(map).map((r) => ({ file: `pages-${map.pagesId}.img`, ...r })));
}

/** regionHeads(): at most this many pages (16 MiB) */
export const MAX_REGION_HEADS = 4096;

/**
 * The first page of each lazy region of every task (a pagemap entry: memory dumped back to back,
 * e.g. one of V8's 256 KiB heap pages), the largest regions first, at most `max`. Allocators keep
 * their bookkeeping at the start of each region (V8's page headers and marking bitmaps), and a
 * garbage collection reads it for every region at once: on the benchmark's app, one wake in
 * about four ran one on its first request and faulted on 27–40 page headers no recent restore
 * had used, one serial round trip to the store (~33 ms) each. In the ActiveSet pack they made
 * every wake slower (a 40–60 % larger pack to fetch and decode beside CRIU), so they have a pack
 * of their own, asked for once the process resumed.
 */
export function regionHeads(maps: readonly TaskPagemap[], max = MAX_REGION_HEADS): FileRange[] {
  return maps
    .flatMap(({ map }) => map.entries.filter((e) => e.offset !== null && (e.flags & PE_LAZY) !== 0).map((e) => ({ e, file: `pages-${map.pagesId}.img` })))
    .sort((a, b) => b.e.pages - a.e.pages)
    .slice(0, max)
    .map(({ e, file }) => ({ file, offset: e.offset!, length: PAGE_SIZE }));
}

/** `ranges` as the fewest ranges covering the same bytes: sorted, overlapping and touching ones joined. */
export function joinRanges(ranges: readonly FileRange[]): FileRange[] {
  const sorted = ranges.filter((r) => r.length > 0).sort((a, b) => (a.file < b.file ? -1 : a.file > b.file ? 1 : a.offset - b.offset));
  const out: FileRange[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && last.file === r.file && r.offset <= last.offset + last.length) last.length = Math.max(last.length, r.offset + r.length - last.offset);
    else out.push({ ...r });
  }
  return out;
}

/** The bytes of `r` in the image at `dir`, read chunk by chunk, each checked against its sha256. */
async function readRange(manifest: ImageManifest, dir: string, r: FileRange): Promise<Buffer> {
  const file = manifest.files.find((f) => f.path === r.file);
  if (!file || r.offset + r.length > file.size) throw new Error(`${r.file} has no bytes at [${r.offset}, ${r.offset + r.length})`);
  const end = r.offset + r.length;
  const parts: Buffer[] = [];
  for (const ref of fileChunks(manifest, file)) {
    if (ref.offset + ref.size <= r.offset || ref.offset >= end) continue;
    const bytes = await readLocalChunk(dir, file, ref);
    if (!bytes) throw new Error(`${file.path} does not hold the chunk its manifest names at ${ref.offset}`);
    parts.push(bytes.subarray(Math.max(0, r.offset - ref.offset), Math.min(ref.size, end - ref.offset)));
  }
  return Buffer.concat(parts);
}

/**
 * Writes the app's two restore packs for `manifest` (pagestore/restore-pack.ts), read from `dir`,
 * the directory the image was stored from: the restore pack (the metadata chunks, and as runs
 * the pages `criu restore` reads itself) and the ActiveSet pack (as runs, the ActiveSet's pages
 * as the app's record plans them for this image, less those already in the restore pack) and
 * the heads pack (the region heads in neither, once the app has an ActiveSet).
 * Returns what was packed.
 */
export async function writeRestorePack(
  manifest: ImageManifest,
  dir: string,
  activeSets: ActiveSetStore,
): Promise<{ chunks: number; runs: number; eagerPages: number; activeSetRuns: number; activeSetPages: number; headPages: number; bytes: number }> {
  const maps: TaskPagemap[] = [];
  for (const file of manifest.files) {
    const m = PAGEMAP.exec(file.path);
    if (m) maps.push({ pid: Number(m[1]), map: parsePagemap(await readFile(path.join(dir, file.path))) });
  }
  const record = await activeSets.read(manifest.app);
  const eager = joinRanges(eagerPageRanges(maps));
  const inRanges = (ranges: FileRange[], r: FileRange): boolean => ranges.some((e) => e.file === r.file && e.offset <= r.offset && r.offset < e.offset + e.length);
  const active = joinRanges(
    activeSets
      .planPages(record, pagemapLocator(maps))
      .map((p) => ({ ...p, length: PAGE_SIZE }))
      .filter((r) => !inRanges(eager, r)),
  );
  // With the first ActiveSet: before it, a restore prefetches nothing but what CRIU reads.
  const heads = record ? regionHeads(maps).filter((r) => !inRanges(eager, r) && !inRanges(active, r)) : [];
  const chunks: PackedChunk[] = [];
  for (const p of metadataChunks(manifest)) {
    const bytes = await readLocalChunk(dir, p.file, p.ref);
    if (!bytes) throw new Error(`${p.file.path} does not hold the chunk its manifest names at ${p.ref.offset}`);
    chunks.push({ hash: p.ref.hash, bytes });
  }
  const runs = async (ranges: FileRange[]): Promise<PackedRun[]> => {
    const out: PackedRun[] = [];
    for (const r of ranges) out.push({ file: r.file, offset: r.offset, bytes: await readRange(manifest, dir, r) });
    return out;
  };
  const [restoreBytes, activeSetBytes, headsBytes] = await Promise.all([
    activeSets.putPack(manifest.app, 'restore', manifest.generation, { manifest: manifest.checksum, chunks, runs: await runs(eager) }),
    runs(active).then((r) => activeSets.putPack(manifest.app, 'activeset', manifest.generation, { manifest: manifest.checksum, chunks: [], runs: r })),
    runs(heads).then((r) => activeSets.putPack(manifest.app, 'heads', manifest.generation, { manifest: manifest.checksum, chunks: [], runs: r })),
  ]);
  // The page counts tell a dump whose pagemap marked (nearly) every page non-lazy: such a restore
  // faults on nothing, so it records no ActiveSet.
  const pages = (ranges: FileRange[]): number => ranges.reduce((n, r) => n + r.length / PAGE_SIZE, 0);
  return { chunks: chunks.length, runs: eager.length, eagerPages: pages(eager), activeSetRuns: active.length, activeSetPages: pages(active), headPages: heads.length, bytes: restoreBytes + activeSetBytes + headsBytes };
}
