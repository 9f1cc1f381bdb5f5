/*
 * ActiveSets: which chunks of an app's image its restored process touched while it served its
 * first traffic, kept per app across restores, and the set to prefetch at the next restore.
 *
 * Layout in the object store (format 1), beside the app's manifests:
 *
 *   apps/<app>/activeset.json   { format, app, restores: [{ at, generation, chunks: [{ file,
 *                               offset, hash }], pages?: [[pid, vaddr, count]] }], checksum },
 *                               newest restore last, at most `keep` restores; checksum as a
 *                               manifest's (canonical JSON)
 *
 * Each used chunk is kept by hash, and the pages used by virtual address: chunks are
 * content-addressed, so an unchanged chunk keeps its hash in the next generation; a page whose
 * bytes changed is found again by its address, which the next image's pagemap maps to its new
 * place (`locate`; offsets in a pages file shift whenever an earlier page appears or goes, so a
 * file position is a poor key — it is the fallback for records without pages). The ActiveSet to
 * prefetch is every chunk of the manifest being restored that was used in at least `minUses` of
 * the last `window` restores (the original system's "k of the last n" policy).
 *
 * Beside it, apps/<app>/restore-pack.bin and activeset-pack.bin hold the bytes a restore
 * prefetches, in two objects (restore-pack.ts); the ActiveSet's pages in them are planned by
 * planPages, in blocks of ACTIVESET_BLOCK_PAGES.
 *
 * An ActiveSet is advice: a missing, damaged or stale record costs prefetching, never a restore.
 * Writes race only between two restores of one app on two workers; the last one wins.
 */
import { getStreamed, isNotFound, type ObjectStore } from './object-store.js';
import { canonicalJson, sha256, storedChecksumHolds } from './chunked-image-store.js';
import { fileChunks, type ChunkRef, type ImageFile, type ImageManifest } from './image-store.js';
import { encodeRestorePack, PACK_PARTS, readRestorePack, restorePackKey, type PackPart, type ReadRestorePack, type RestorePackContents, type RestorePacks } from './restore-pack.js';

export const ACTIVESET_FORMAT_VERSION = 1;
const PAGE_SIZE = 4096;

/** One chunk a restore used. */
export interface UsedChunk {
  /** image file path, as in the manifest */
  file: string;
  /** in bytes: where the chunk starts in the file */
  offset: number;
  hash: string;
}

/** Pages a restore used: [pid, first page's virtual address, pages], page-aligned. */
export type PageRange = [number, number, number];

export interface RestoreUse {
  /** ISO time of the restore */
  at: string;
  generation: number;
  chunks: UsedChunk[];
  /** the pages behind `chunks`, by address; absent in records written before they were kept */
  pages?: PageRange[];
}

/** Where a task's page is in the image being restored (its pagemap), or null when it has no bytes there. */
export type PageLocator = (pid: number, vaddr: number) => { file: string; offset: number } | null;

export interface ActiveSetRecord {
  format: number;
  app: string;
  restores: RestoreUse[];
  checksum: string;
}

export interface ActiveSetPolicy {
  /** restores looked at (n); default 3 */
  window: number;
  /** a chunk is prefetched when used in at least this many of them (k); default 1 */
  minUses: number;
  /** restores kept in the record; default = window */
  keep?: number;
  /**
   * planPages() also plans this many blocks after each run of blocks the last restore used
   * (where the image has bytes); default 0. See FRONTIER_BLOCKS.
   */
  frontierBlocks?: number;
}

/**
 * Allocators hand out memory in address order: V8's heap and glibc's arenas go on from where the
 * last wake left off, so each wake's first request touches the block after the last one's — a
 * block no earlier restore used. Measured on the benchmark's app: a V8 region moved one 64 KiB
 * block per wake (…250000, then …260000), and such pages were most of the misses left, each a
 * serial round trip to the store (~26 ms) before the app could answer.
 */
export const FRONTIER_BLOCKS = 1;

export const DEFAULT_ACTIVESET_POLICY: ActiveSetPolicy = { window: 3, minUses: 1, frontierBlocks: FRONTIER_BLOCKS };

/** One chunk of the image being restored, with the file it belongs to. */
export interface PlannedChunk {
  file: ImageFile;
  ref: ChunkRef;
}

export function activeSetKey(app: string): string {
  return `apps/${app}/activeset.json`;
}

export class ActiveSetStore {
  constructor(
    private readonly store: ObjectStore,
    private readonly policy: ActiveSetPolicy = DEFAULT_ACTIVESET_POLICY,
  ) {}

  /** The app's record, or undefined when it has none or it does not verify. Store failures reject. */
  async read(app: string): Promise<ActiveSetRecord | undefined> {
    let body: Buffer;
    try {
      body = await this.store.get(activeSetKey(app));
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
    return parseActiveSet(body, app);
  }

  /** Adds one restore's use to the app's record (dropping the oldest beyond `keep`). */
  async add(app: string, use: RestoreUse): Promise<ActiveSetRecord> {
    const prev = await this.read(app).catch(() => undefined);
    const keep = this.policy.keep ?? this.policy.window;
    const restores = [...(prev?.restores ?? []), use].slice(-keep);
    const draft = { format: ACTIVESET_FORMAT_VERSION, app, restores };
    const record: ActiveSetRecord = { ...draft, checksum: recordChecksum(draft) };
    await this.store.put(activeSetKey(app), Buffer.from(canonicalJson(record)));
    return record;
  }

  /**
   * Replaces one of the app's restore packs (restore-pack.ts) with these entries of `generation`.
   * Written after the image is stored; a reader checks every entry, and runs against the
   * manifest too, so no ordering with the manifest (or the other pack) is needed.
   */
  async putPack(app: string, part: PackPart, generation: number, contents: RestorePackContents): Promise<number> {
    const body = await encodeRestorePack(generation, contents);
    await this.store.put(restorePackKey(app, part), body);
    return body.length;
  }

  /**
   * One of the app's restore packs, read (readRestorePack) as its bytes arrive where the store
   * streams them, or undefined when it has none. Store failures and a pack that is not one reject.
   */
  async readPack(app: string, part: PackPart = 'restore'): Promise<ReadRestorePack | undefined> {
    let bytes;
    try {
      bytes = await getStreamed(this.store, restorePackKey(app, part));
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
    return readRestorePack(bytes);
  }

  /**
   * Both of the app's restore packs, asked for at once and each read as its bytes arrive; each
   * promise is already caught (unhandled rejections: none). Both go beside the manifest's
   * look-up: `runc restore` starts before the manifest is in (lazy-restore.ts, begin), so what
   * waits for the packs is CRIU's first reads and the first page faults, not the look-up. (Asked
   * for after the manifest, the ActiveSet pack arrived while CRIU ran: CRIU took 130–140 ms then,
   * against 77–117 ms with the pack asked for at once, in session 7's S3 benchmark; in session
   * 9's, with the pack read as it arrives, the manifest came no sooner and the pack later.)
   */
  readPacks(app: string): RestorePacks {
    const packs: RestorePacks = {};
    for (const part of PACK_PARTS) {
      const p = this.readPack(app, part);
      p.catch(() => undefined);
      packs[part] = p;
    }
    return packs;
  }

  /** The chunks of `manifest` to prefetch, by the policy; empty without a record. See planPrefetch. */
  plan(manifest: ImageManifest, record: ActiveSetRecord | undefined, locate?: PageLocator): PlannedChunk[] {
    return planPrefetch(manifest, record, this.policy, locate);
  }

  /** The pages of an image to prefetch, by the policy; empty without a record. See planPages. */
  planPages(record: ActiveSetRecord | undefined, locate: PageLocator): PageLocation[] {
    return planPages(record, this.policy, locate);
  }
}

/** sha256 of the record's canonical JSON without its checksum (as a manifest's). */
function recordChecksum(r: object): string {
  return sha256(canonicalJson({ ...r, checksum: undefined }));
}

/** Parses a stored record; undefined when it is not one (wrong shape, app or checksum). */
export function parseActiveSet(body: Buffer, app: string): ActiveSetRecord | undefined {
  let v: unknown;
  const text = body.toString('utf8');
  try {
    v = JSON.parse(text);
  } catch {
    return undefined;
  }
  const r = v as Partial<ActiveSetRecord> | null;
  if (!r || typeof r !== 'object' || r.format !== ACTIVESET_FORMAT_VERSION || r.app !== app || !Array.isArray(r.restores)) return undefined;
  if (typeof r.checksum !== 'string' || !(storedChecksumHolds(text, r.checksum) || recordChecksum(r) === r.checksum)) return undefined;
  for (const u of r.restores) {
    if (!u || !Array.isArray(u.chunks)) return undefined;
    for (const c of u.chunks) {
      if (!c || typeof c.file !== 'string' || !Number.isSafeInteger(c.offset) || typeof c.hash !== 'string') return undefined;
    }
    if (u.pages !== undefined && (!Array.isArray(u.pages) || !u.pages.every((r) => Array.isArray(r) && r.length === 3 && r.every((n) => Number.isSafeInteger(n) && n >= 0)))) return undefined;
  }
  return r as ActiveSetRecord;
}

/**
 * Every chunk of `manifest` used in at least `minUses` of the record's last `window` restores:
 * a used chunk counts for the manifest chunk with its hash; a used page (restores that kept
 * pages) for the chunk `locate` puts it in; in older records, an unmatched chunk counts for the
 * one covering its position. Without `locate` (the pagemaps not read yet) pages count for
 * nothing: the plan is the part known from hashes alone. In file order, each chunk once.
 */
export function planPrefetch(
  manifest: ImageManifest,
  record: ActiveSetRecord | undefined,
  policy: ActiveSetPolicy = DEFAULT_ACTIVESET_POLICY,
  locate?: PageLocator,
): PlannedChunk[] {
  if (!record || record.restores.length === 0) return [];
  const chunks = new Map<string, PlannedChunk[]>(); // file path → its chunks in order
  const byHash = new Map<string, PlannedChunk>();
  for (const file of manifest.files) {
    const list = fileChunks(manifest, file).map((ref) => ({ file, ref }));
    chunks.set(file.path, list);
    for (const p of list) if (!byHash.has(p.ref.hash)) byHash.set(p.ref.hash, p);
  }
  const uses = new Map<PlannedChunk, number>();
  for (const use of record.restores.slice(-policy.window)) {
    const seen = new Set<PlannedChunk>();
    for (const u of use.chunks) {
      const p = byHash.get(u.hash) ?? (use.pages ? undefined : covering(chunks.get(u.file), u.offset));
      if (p) seen.add(p);
    }
    if (use.pages && locate) {
      for (const [pid, vaddr, count] of use.pages) {
        for (let i = 0; i < count; i++) {
          const at = locate(pid, vaddr + i * PAGE_SIZE);
          const p = at && covering(chunks.get(at.file), at.offset);
          if (p) seen.add(p);
        }
      }
    }
    for (const p of seen) uses.set(p, (uses.get(p) ?? 0) + 1);
  }
  const out: PlannedChunk[] = [];
  for (const list of chunks.values()) for (const p of list) if ((uses.get(p) ?? 0) >= policy.minUses) out.push(p);
  return out;
}

/** A page of an image file: where its bytes start. */
export interface PageLocation {
  file: string;
  offset: number;
}

/**
 * in pages: the ActiveSet is planned in aligned blocks of virtual memory this long, each block
 * holding a used page whole. Measured on the benchmark's app over four restores: the pages used
 * by the last three restores alone missed 20–35 of the ~650 pages the next one used (each miss
 * a round trip to the store while the app waits), 16-page blocks 2–12, for 3x the bytes (~8 MB
 * against the ~19 MB of whole chunks).
 */
export const ACTIVESET_BLOCK_PAGES = 16;

/**
 * The pages of the image `locate` reads to prefetch: every page in a block (ACTIVESET_BLOCK_PAGES
 * of virtual memory of one task) that held a page used in at least `minUses` of the record's last
 * `window` restores, where the image has bytes for it, and the policy's frontierBlocks blocks
 * after each run of blocks the last restore used (FRONTIER_BLOCKS says why). Restores recorded
 * without pages count for nothing here (planPrefetch places them by chunk). Each page once, in no
 * particular order.
 */
export function planPages(record: ActiveSetRecord | undefined, policy: ActiveSetPolicy, locate: PageLocator, blockPages = ACTIVESET_BLOCK_PAGES): PageLocation[] {
  if (!record) return [];
  const blockBytes = blockPages * PAGE_SIZE;
  const uses = new Map<string, { pid: number; start: number; n: number }>();
  for (const use of record.restores.slice(-policy.window)) {
    const seen = new Set<string>();
    for (const [pid, vaddr, count] of use.pages ?? []) {
      for (const b of blocksOf(pid, vaddr, count, blockBytes)) {
        if (seen.has(b.key)) continue;
        seen.add(b.key);
        const u = uses.get(b.key);
        if (u) u.n++;
        else uses.set(b.key, { pid, start: b.start, n: 1 });
      }
    }
  }
  // The frontier: the blocks after each run of blocks the last restore used. One inside a run
  // (the last restore used it too) is planned already, or not by the policy.
  const last = (record.restores.at(-1)?.pages ?? []).map(([pid, vaddr, count]) => blocksOf(pid, vaddr, count, blockBytes));
  const lastBlocks = new Set(last.flat().map((b) => b.key));
  for (const run of last) {
    const end = run.at(-1)!;
    for (let i = 1; i <= (policy.frontierBlocks ?? 0); i++) {
      const start = end.start + i * blockBytes;
      const key = `${end.pid}:${start}`;
      if (lastBlocks.has(key)) break;
      const u = uses.get(key);
      if (u) u.n = Math.max(u.n, policy.minUses);
      else uses.set(key, { pid: end.pid, start, n: policy.minUses });
    }
  }
  const out: PageLocation[] = [];
  for (const { pid, start, n } of uses.values()) {
    if (n < policy.minUses) continue;
    for (let i = 0; i < blockPages; i++) {
      const at = locate(pid, start + i * PAGE_SIZE);
      if (at) out.push(at);
    }
  }
  return out;
}

/** The blocks (keyed `pid:start`) a run of `count` pages from `vaddr` of task `pid` lies in, in order. */
function blocksOf(pid: number, vaddr: number, count: number, blockBytes: number): Array<{ key: string; pid: number; start: number }> {
  const out: Array<{ key: string; pid: number; start: number }> = [];
  for (let start = Math.floor(vaddr / blockBytes) * blockBytes; start < vaddr + Math.max(count, 1) * PAGE_SIZE; start += blockBytes) out.push({ key: `${pid}:${start}`, pid, start });
  return out;
}

/** The chunk of a file (chunks in offset order) that holds byte `offset`. */
export function covering(list: readonly PlannedChunk[] | undefined, offset: number): PlannedChunk | undefined {
  if (!list) return undefined;
  let lo = 0;
  let hi = list.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const r = list[mid]!.ref;
    if (offset < r.offset) hi = mid - 1;
    else if (offset >= r.offset + r.size) lo = mid + 1;
    else return list[mid];
  }
  return undefined;
}
