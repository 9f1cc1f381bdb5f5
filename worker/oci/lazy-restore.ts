import { mkdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import type { Logger } from '../../shared/log.js';
import type { RestoreMode } from '../../shared/protocol.js';
import type { RestorePacks } from '../../pagestore/restore-pack.js';
import { covering, type ActiveSetRecord, type ActiveSetStore, type PageLocator, type PageRange, type PlannedChunk, type UsedChunk } from '../../pagestore/activeset.js';
import type { ChunkCache } from '../../pagestore/chunk-cache.js';
import { fileChunks, type ImageManifest, type ImageStore } from '../../pagestore/image-store.js';
import { imageUnreadable, LazyImage, noImageStats, type LazyImageStats } from './lazy-image.js';
import { LazyPagesDaemon, type PageFault } from './lazy-pages.js';
import { LazyRelay } from './lazy-relay.js';
import { mountPending, type PendingMount } from '../../pagestore/image-mount.js';
import { PAGE_SIZE } from './pagemap.js';

/*
 * One lazy restore (modes `lazy` and `activeset`), from the mount to the last page:
 *
 *   prepare()      FUSE mount, then at once: the prefetch (the ActiveSet in activeset mode)
 *                  and the relay  [the relay awaited; reads of the mount wait for the packs
 *                  they need]
 *     or begin()   before the manifest is known: the mount, without its image (its readers
 *                  wait: image-mount.ts, mountPending), and the relay; then, as soon as the
 *                  manifest is in, attach(): the image served on that mount and the prefetch.
 *                  `runc restore` starts between the two, so that its own start-up (all it
 *                  does before it reads the image) overlaps the manifest's look-up
 *   (the runtime: `runc restore --lazy-pages`, connecting to the relay)
 *   spawnDaemon()  `criu lazy-pages` on the mount, behind the relay (which waits for it); the
 *                  process resumes once CRIU is done, and its faults are served
 *   restored()     asks for the heads pack (lazy-image.ts, fetchHeads); arms the fallback: the
 *                  rest of memory follows after sweepAfterMs
 *   served()       the app answered its first traffic: after a grace the ActiveSet window
 *                  closes, the relay lets CRIU's daemon copy the rest of memory, and the rest of
 *                  the image is fetched in the background
 *   finished       the daemon exited: every page is in (or the restore failed); the mount is gone,
 *                  this restore's ActiveSet is stored
 *
 * The ActiveSet of this restore is the chunks holding the pages the restored processes faulted
 * on (the daemon's log names each fault's page, lazy-pages.ts) up to the window's end. Reads
 * of the FUSE directory cannot tell faults from the daemon's background copy, which starts as
 * soon as the process runs and interleaves with the faults; the log can.
 *
 * Failure: a chunk that cannot be had calls `onPageFailure` (the runtime kills the container)
 * before the read fails; `failure` then holds the error. A daemon that dies otherwise leaves the
 * process without pages too: `finished` reports it and the runtime kills the container.
 */

export interface LazyRestoreOptions extends LazyBeginOptions {
  manifest: ImageManifest;
  /** a local copy of this very image, read before the store */
  localDir?: string;
}

/** What a lazy restore needs before its manifest is known (begin()). */
export interface LazyBeginOptions {
  app: string;
  mode: Exclude<RestoreMode, 'full'>;
  mountpoint: string;
  workDir: string;
  criu: string;
  store: ImageStore;
  cache: ChunkCache;
  /** where ActiveSets live; absent: activeset mode prefetches nothing and records nothing */
  activeSets?: ActiveSetStore;
  /**
   * the app's ActiveSet record, when the caller started reading it already (beside its look-up
   * of the manifest: one round trip to the store less); else prepare() reads it
   */
  activeSet?: Promise<ActiveSetRecord | undefined>;
  /** the app's restore packs (pagestore/restore-pack.ts), read likewise; activeset mode only */
  packs?: RestorePacks;
  /** in ms: the ActiveSet window stays open this long after served(); default 500 */
  graceMs?: number;
  /**
   * in ms: the background fetch of the rest of the image starts this long after the process
   * resumed, or when the ActiveSet window closes if that is sooner; default 5000. Until then the
   * worker's event loop serves the app's first page faults alone (see restored()).
   */
  sweepAfterMs?: number;
  /** the restore could not get a page: kill the container (awaited before the read fails) */
  onPageFailure(err: unknown): Promise<void>;
  log: Logger;
}

export interface LazyOutcome {
  ok: boolean;
  /** why not */
  error?: Error;
  image: LazyImageStats;
  /** chunks of this restore's ActiveSet */
  used: number;
  /** of them, prefetched (hits) and not (misses) */
  hits: number;
  misses: number;
}

export class LazyRestore {
  /** set once a page could not be had */
  failure: Error | undefined;
  readonly finished: Promise<LazyOutcome>;
  private image: LazyImage | undefined;
  /** begin()'s mount, until attach() serves the image on it */
  private pending: PendingMount | undefined;
  private manifest: ImageManifest | undefined;
  private daemon: LazyPagesDaemon | undefined;
  private windowEnd = Infinity;
  private readonly startedAt = performance.now();
  private resolveFinished!: (o: LazyOutcome) => void;
  private aborted = false;
  private settling: Promise<void> | undefined;
  private sweepTimer: NodeJS.Timeout | undefined;
  private relay: LazyRelay | undefined;

  private constructor(private readonly o: LazyBeginOptions) {
    this.finished = new Promise((resolve) => (this.resolveFinished = resolve));
  }

  get imagePath(): string {
    return this.o.mountpoint;
  }

  /**
   * Mounts the image, then starts the prefetch and the relay side by side (see startDaemon).
   * Resolves once the restore may connect; the prefetch goes on. Throws with nothing left
   * mounted or running.
   */
  static async prepare(o: LazyRestoreOptions): Promise<LazyRestore> {
    const r = new LazyRestore(o);
    try {
      await r.attach(o.manifest, o.localDir);
      await r.startDaemon();
    } catch (err) {
      await r.abort();
      throw r.failure ?? err;
    }
    o.log.debug({ ms: Math.round(performance.now() - r.startedAt) }, 'the restore may connect to the lazy-pages daemon');
    return r;
  }

  /** Whether begin() can be used here: it needs the relay (python3), which waits for the daemon. */
  static canBegin(): boolean {
    return LazyRelay.available();
  }

  /**
   * The part of a restore that needs no manifest: the mount (its readers wait for attach()) and
   * the relay. Resolves once the restore may connect. Throws with nothing left mounted or
   * running. Only where canBegin(): without the relay the daemon would have to listen first,
   * and it cannot before it read the image.
   */
  static async begin(o: LazyBeginOptions): Promise<LazyRestore> {
    const r = new LazyRestore(o);
    try {
      r.pending = await mountPending(o.mountpoint, { log: o.log, what: `the image of ${o.app}` });
      await r.startDaemon();
    } catch (err) {
      await r.abort();
      throw err;
    }
    o.log.debug({ ms: Math.round(performance.now() - r.startedAt) }, 'the restore may connect to the lazy-pages daemon; its image is not known yet');
    return r;
  }

  /**
   * Serves `manifest`'s image (on begin()'s mount, or a mount of its own) and starts the
   * prefetch, which goes on after this resolves. Throws (imageUnreadable) when the image cannot
   * be served; the caller aborts.
   */
  async attach(manifest: ImageManifest, localDir?: string): Promise<void> {
    const o = this.o;
    if (this.aborted) throw this.failure ?? new Error(`the restore of ${o.app} was aborted`);
    this.manifest = manifest;
    // The mount is served without waiting for the record: it only adds to what the packs bring
    // (whole, usually), and the prefetch waits for it where it needs it.
    const sets = o.mode === 'activeset' ? o.activeSets : undefined;
    const record: Promise<ActiveSetRecord | undefined> = sets
      ? (o.activeSet ?? sets.read(o.app)).catch((err: unknown) => {
          o.log.warn({ err: (err as Error).message }, 'cannot read the ActiveSet; restoring without prefetch');
          return undefined;
        })
      : Promise.resolve(undefined);
    const image = await LazyImage.open({
      manifest,
      mountpoint: o.mountpoint,
      ...(this.pending ? { mount: this.pending } : {}),
      store: o.store,
      cache: o.cache,
      ...(localDir ? { localDir } : {}),
      prefetch: () => record.then((r) => (r && sets ? sets.plan(manifest, r) : [])),
      onFailure: async (err) => {
        this.failure ??= imageUnreadable(o.app, manifest.generation, err);
        await o.onPageFailure(this.failure);
      },
      log: o.log,
    }).catch((err: unknown) => {
      throw imageUnreadable(o.app, manifest.generation, err);
    });
    this.image = image;
    this.pending = undefined;
    if (this.aborted) {
      // aborted while the image was being opened: settle() closed the mount it knew of, if any
      await image.close().catch(() => undefined);
      throw this.failure ?? new Error(`the restore of ${o.app} was aborted`);
    }
    o.log.debug({ ms: Math.round(performance.now() - this.startedAt) }, 'the lazy image is mounted');
    // Not awaited: the daemon and `runc restore` start at once, and their reads of the mount wait
    // for the packs that carry what they read (lazy-image.ts). A chunk that cannot be had fails
    // the read that needs it (after onFailure): the restore fails visibly there.
    const plan = async (locate: PageLocator): Promise<readonly PlannedChunk[]> => {
      const r = await record;
      return r && sets ? sets.plan(manifest, r, locate) : [];
    };
    void image.prefetch(plan, o.mode === 'activeset' ? o.packs : undefined).then(
      () => {
        if (!this.aborted) void image.warmPageCache(); // beside `criu restore`, which does not read those pages
      },
      (err: unknown) => {
        if (!this.aborted) o.log.warn({ err: (err as Error).message }, 'the prefetch stopped; reads fetch what they need');
      },
    );
  }

  /**
   * The restore cannot go on (its manifest could not be had): `err` is its failure from now on,
   * and everything stops; readers of the mount waiting for the image fail (ENOTCONN).
   */
  async fail(err: Error): Promise<void> {
    this.failure ??= err;
    await this.abort();
  }

  /**
   * Where python3 is there: starts the relay (in the restore's work directory) and resolves once
   * it listens; the restore may then connect to it, and the relay waits for the daemon, which
   * spawnDaemon() starts (in a directory of its own inside it) once `runc restore` has been
   * asked for, so that the daemon's start is not on the way to runc's (spawner.ts: where it
   * cannot be used, each start is a fork of this large process). Until release() the daemon
   * serves page faults only. Without the relay: starts the daemon, which then copies all of
   * memory as soon as the process resumes, and resolves once it listens.
   */
  private async startDaemon(): Promise<void> {
    rmSync(this.o.workDir, { recursive: true, force: true });
    mkdirSync(this.o.workDir, { recursive: true });
    if (!LazyRelay.available()) {
      this.o.log.warn('no python3: the lazy-pages relay cannot run, so CRIU copies all memory while the app serves its first traffic');
      return this.spawnDaemonIn(this.o.workDir);
    }
    this.relay = await LazyRelay.start(this.o.workDir, path.join(this.o.workDir, 'daemon'));
    void this.relay.failure().then((why) => {
      if (why && !this.aborted) this.o.log.error({ err: why }, 'the lazy-pages relay failed');
    });
  }

  /**
   * Starts the daemon behind the relay (see startDaemon); call once `runc restore` was spawned.
   * Idempotent; nothing to do without the relay (the daemon runs already) or once aborted. A
   * daemon that fails to start kills the container (onPageFailure) and fails the restore.
   */
  spawnDaemon(): void {
    if (!this.relay || this.daemon || this.aborted) return;
    this.spawnDaemonIn(path.join(this.o.workDir, 'daemon')).catch((err: unknown) => {
      if (this.aborted) return;
      this.failure ??= new Error(`app ${this.o.app}: criu lazy-pages did not start: ${(err as Error).message}`);
      void this.o.onPageFailure(this.failure);
    });
  }

  private spawnDaemonIn(dir: string): Promise<void> {
    const daemon = (this.daemon = LazyPagesDaemon.spawn(this.o.criu, this.o.mountpoint, dir));
    void daemon.exit.then(() => this.settleOnce());
    return daemon.listening().then(() => this.o.log.debug({ ms: Math.round(performance.now() - this.startedAt), spawnMs: daemon.spawnMs }, 'the lazy-pages daemon listens'));
  }

  /** What was fetched before the process resumed (for the restore's log line). */
  prefetchStats(): { metadata: number; prefetched: number; eager: number; packedPages: number; ms: number } {
    const s = this.image?.stats();
    return { metadata: s?.metadata ?? 0, prefetched: s?.prefetched ?? 0, eager: s?.eager ?? 0, packedPages: s?.packedPages ?? 0, ms: s?.prefetchMs ?? 0 };
  }

  /**
   * The process runs. The rest of the image is fetched in the background, but not at once: the
   * FUSE reads of the app's page faults are answered on this process's event loop, and a sweep
   * of hundreds of fetches (each hashed here) would make every fault wait behind them just when
   * the app answers its first traffic. Until the sweep starts, the lazy-pages daemon's own
   * background reads fetch what they need one read at a time.
   */
  restored(): void {
    this.sweepTimer = setTimeout(() => this.copyRest(), this.o.sweepAfterMs ?? 5000);
    // Now, not beside the manifest: it would take the link from it and the CPU from CRIU.
    if (this.o.mode === 'activeset' && this.o.activeSets && this.o.packs) this.image?.fetchHeads(this.o.activeSets.readPack(this.o.app, 'heads'));
  }

  /** The first traffic is over (or did not come): fetch, and let CRIU copy, the rest of memory. */
  private copyRest(): void {
    this.relay?.release();
    this.image?.sweep();
  }

  /** The app answered its first traffic: the ActiveSet window closes `graceMs` from now. */
  served(): void {
    if (this.windowEnd !== Infinity) return;
    const grace = this.o.graceMs ?? 500;
    this.windowEnd = performance.now() + grace;
    if (this.sweepTimer) {
      clearTimeout(this.sweepTimer);
      this.sweepTimer = setTimeout(() => this.copyRest(), grace);
    }
  }

  /** The restore failed or the container is being removed: stop the daemon, unmount. */
  async abort(): Promise<void> {
    this.aborted = true;
    this.relay?.kill();
    this.daemon?.kill();
    // A reader of a mount still waiting for its image (the daemon, runc) waits for the mount to
    // go, not for a signal: a FUSE request the server has taken ignores even SIGKILL.
    await this.pending?.close();
    if (this.daemon) await this.daemon.exit;
    await this.settleOnce();
  }

  private settleOnce(): Promise<void> {
    return (this.settling ??= this.settle());
  }

  /** Daemon gone: unmount, then (if the restore went well) store this restore's ActiveSet. */
  private async settle(): Promise<void> {
    const exit = this.daemon ? await this.daemon.exit : null;
    clearTimeout(this.sweepTimer);
    this.relay?.kill();
    await (this.image ?? this.pending)?.close().catch((err: unknown) => this.o.log.error({ err: (err as Error).message }, 'cannot unmount the image'));
    const stats = this.image?.stats() ?? noImageStats();
    let error = this.failure;
    if (!error && !this.aborted && exit && exit.code !== 0) {
      const why = this.daemon!.errors().slice(-2).join(' | ');
      error = new Error(`criu lazy-pages exited ${exit.signal ? `on ${exit.signal}` : `with code ${exit.code}`}${why ? `: ${why}` : ''}`);
    }
    const faults = error || this.aborted ? [] : (this.daemon?.faults() ?? []).filter((f) => f.at <= this.windowEnd);
    const { used, hits } = this.usedChunks(faults);
    if (this.o.log.isLevelEnabled('debug')) {
      // Which pages the prefetch did not bring, and when: [pid, address, ms since the restore began].
      const missed = faults.filter((f) => !this.image?.prefetchedPage(f.file, f.offset));
      if (missed.length > 0) this.o.log.debug({ faults: faults.length, missed: missed.slice(0, 100).map((f) => [f.pid, f.vaddr.toString(16), Math.round(f.at - this.startedAt)]) }, 'faults the prefetch missed');
    }
    if (used.length > 0 && this.o.activeSets) {
      await this.o.activeSets
        .add(this.o.app, { at: new Date().toISOString(), generation: this.manifest!.generation, chunks: used, pages: pageRanges(faults) })
        .catch((err: unknown) => this.o.log.warn({ err: (err as Error).message }, 'cannot store the ActiveSet'));
    }
    const outcome: LazyOutcome = { ok: !error && !this.aborted, image: stats, used: used.length, hits, misses: used.length - hits, ...(error ? { error } : {}) };
    this.o.log.info({ ...outcome, error: error?.message, ms: Math.round(performance.now() - this.startedAt) }, 'lazy restore finished');
    this.resolveFinished(outcome);
  }

  /**
   * The chunks holding the pages faulted on, each once, and how many of them were hits: every
   * page faulted on in them had been prefetched.
   */
  private usedChunks(faults: PageFault[]): { used: UsedChunk[]; hits: number } {
    const byFile = new Map<string, PlannedChunk[]>();
    const manifest = this.manifest;
    if (manifest) for (const file of manifest.files) byFile.set(file.path, fileChunks(manifest, file).map((ref) => ({ file, ref })));
    const out = new Map<string, { chunk: UsedChunk; hit: boolean }>();
    for (const f of faults) {
      const p = covering(byFile.get(f.file), f.offset);
      if (!p) continue;
      const hit = this.image?.prefetchedPage(f.file, f.offset) ?? false;
      const u = out.get(p.ref.hash);
      if (u) u.hit &&= hit;
      else out.set(p.ref.hash, { chunk: { file: p.file.path, offset: p.ref.offset, hash: p.ref.hash }, hit });
    }
    const used = [...out.values()];
    return { used: used.map((u) => u.chunk), hits: used.filter((u) => u.hit).length };
  }
}

/** The faulted pages as runs of consecutive pages per task, sorted. */
export function pageRanges(faults: readonly PageFault[]): PageRange[] {
  const pages = [...new Set(faults.map((f) => `${f.pid}:${f.vaddr - (f.vaddr % PAGE_SIZE)}`))]
    .map((k) => k.split(':').map(Number) as [number, number])
    .sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const out: PageRange[] = [];
  for (const [pid, vaddr] of pages) {
    const last = out[out.length - 1];
    if (last && last[0] === pid && last[1] + last[2] * PAGE_SIZE === vaddr) last[2]++;
    else out.push([pid, vaddr, 1]);
  }
  return out;
}
