/*
 * A stored image as a read-only directory (FUSE), for lazy restore: `criu lazy-pages` and
 * `criu restore` read the image files here, and every read is served chunk by chunk from a
 * chunk source (the worker's cache, else the page store). The reads of `pages-*.img` are the
 * restored process's page faults, so `onRead` is where the ActiveSet is observed.
 *
 *   kernel ──FUSE request──► server process (fuse-server.ts: fuse-native, libfuse threads)
 *                              getattr, readdir, open, statfs: answered from the listing
 *     read(path, buf, len, pos)  ──READ {id, file, offset, length}──► this event loop (fuse-child.ts)
 *                                                                      ImageServer.read: onRead each
 *                                                                      chunk → chunk() (memo: in
 *                                                                      flight + LRU) → slices
 *     ▲                                                                            │
 *     └── bytes or -errno ◄── copied into libfuse's buffer ◄── DATA {id, bytes} | ERROR {id, errno}
 *
 * Invariants:
 * - libfuse runs in the server process only, never here: its threads take signals and are
 *   cancelled at unmount, which can freeze a process where libuv handles signals (this one
 *   spawns runc, criu, fusermount…; see fuse-server.ts). What bytes a read gets is decided here.
 * - Reads still wait for THIS process's event loop: this process must never read a file of the
 *   mount synchronously (the read would wait for itself, forever); an asynchronous read works
 *   but holds a libuv pool thread that chunk() may need. Readers are other processes (criu,
 *   tests' children). Metadata is the server's alone: stat, readdir, open and close of the
 *   mount never wait for this process, so stat'ing or walking the mount here is safe.
 * - The image is immutable, so the kernel page cache is kept across opens (`kernel_cache`) and
 *   attributes are cached long: a page read once is not asked for again while the mount lives.
 *   `onRead` therefore sees the first touch of each chunk. The kernel reads ahead one page only
 *   (pageReadahead): small reads arrive as asked, large ones in pieces of up to 128 KiB.
 * - A read is answered with data only when every chunk it touches was had and had the size the
 *   manifest says. Otherwise `onFailure` is awaited first (bounded by failureTimeoutMs) and only
 *   then the read gets EIO: the restore kills the half-restored container before the process
 *   could run on without the page. Failed chunks are not remembered: a later read tries again.
 * - If the server process dies while mounted, the kernel fails the mount's pending and later
 *   requests at once (ENOTCONN at the reader) — before this process can know: `onFailure(err)`
 *   (no file, no chunk) is called as soon as it sees the server gone. The mount stays dead until
 *   close().
 * - If this process dies, the server exits without unmounting (it never spawns; fusermount is a
 *   spawn): the mount is left dead (ENOTCONN) for cleanStaleMount.
 * - close() never hangs: the unmount is bounded, and a busy mount (a reader still has a file
 *   open) is detached lazily (`fusermount -uz`); then the server is ended (SIGKILL if it does
 *   not exit), so files still open on a lazily detached mount fail from then on (ENOTCONN).
 */
import { execFile } from 'node:child_process';
import { mkdir, readdir, readFile, realpath, rmdir, stat, writeFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describeError, PicoError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
export { warmFuseServer } from './fuse-child.js';
import { FuseChild } from './fuse-child.js';
import { chunksIn, fileChunks, sliceChunks, type ChunkRef, type ImageFile, type ImageManifest } from './image-store.js';

/** in ms: how long an fusermount/umount run is waited for */
const COMMAND_TIMEOUT_MS = 5_000;

/*
 * Runs fusermount or umount, bounded. Seen here (about one run in four of the mount tests): a
 * finished fusermount left as a zombie whose exit the event loop never observed, so a plain
 * execFile promise never settled and close() hung. Callers check /proc/self/mountinfo for the
 * outcome instead of trusting the exit alone.
 */
function execFileP(cmd: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = execFile(cmd, args, (err) => {
      clearTimeout(timer);
      if (err) reject(err);
      else resolve();
    });
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${cmd} ${args.join(' ')}: no exit seen within ${COMMAND_TIMEOUT_MS} ms`));
    }, COMMAND_TIMEOUT_MS);
  });
}

export interface ImageMountOptions {
  /** created if missing; must be empty */
  mountpoint: string;
  manifest: ImageManifest;
  /**
   * The verified bytes of one chunk (cache, else store); may reject. The buffer is kept (see
   * cacheBytes), so the source must not reuse it.
   */
  chunk(ref: ChunkRef, file: ImageFile): Promise<Buffer>;
  /** each chunk a read touches, once per read, before it is fetched (the ActiveSet is recorded from this) */
  onRead?(file: ImageFile, ref: ChunkRef): void;
  /**
   * Bytes held outside the chunks (a restore pack's page runs): the bytes [pos, end) of `file`
   * when they are held whole, answered with no chunk and no onRead; else undefined, and the
   * chunks answer. May wait for them to arrive (a promise; it must settle, and a rejection
   * counts as undefined).
   */
  held?(file: ImageFile, pos: number, end: number): Buffer | undefined | Promise<Buffer | undefined>;
  /**
   * A chunk could not be had. Awaited (bounded by failureTimeoutMs, default 10 s) BEFORE the
   * failed read is answered with EIO: the restore uses it to kill the half-restored container
   * first, so the process never runs on with a page it could not get. Called once per failed
   * fetch (reads waiting for the same chunk share it).
   * Also called once, without `file` and `ref`, when the mount's server process died while
   * mounted: every read of the mount fails from then on (already, when this is called).
   */
  onFailure?(err: unknown, file: ImageFile | undefined, ref: ChunkRef | undefined): Promise<void>;
  /** in ms; default 10 000 */
  failureTimeoutMs?: number;
  /** in ms; a chunk() not settled by then is a failure (PICO_ERR_STORE). Default 30 000; 0: no bound */
  chunkTimeoutMs?: number;
  /**
   * in ms; how long a chunk that could not be had stays failed: reads of it meanwhile get EIO at
   * once, without another fetch or onFailure (the kernel follows a failed readahead with a read
   * of its own for the same pages). Default 5000; 0: every read tries again.
   */
  failedChunkTtlMs?: number;
  /**
   * in bytes; recently fetched chunks kept in memory, so the kernel's 128 KiB reads of one chunk
   * (and its parallel readahead) fetch it once. At least one chunk is always kept. Default 32 MiB.
   */
  cacheBytes?: number;
  log?: Logger;
}

export interface ImageMount {
  readonly path: string;
  /** the pid of the mount's server process (fuse-server.ts), which alone holds its /dev/fuse */
  readonly serverPid: number;
  /**
   * reads: read requests answered (with data, with 0 at EOF, or with EIO); bytes: bytes served;
   * fromPages: reads answered by `held`; chunks: chunk fetches started (calls of chunk());
   * failures: fetches that failed (each passed to onFailure once)
   */
  stats(): { reads: number; bytes: number; fromPages: number; chunks: number; failures: number };
  /**
   * Bytes of image files (by manifest path) that the server process may answer reads of by
   * itself from now on, without asking this process (fuse-wire.ts: the resident store); they
   * must be the image's, checked already. The server also reads them through the mount, into
   * the kernel's page cache (fuse-server.ts). Resolves true once the server has them, false when
   * it cannot take them (those reads are then asked here as before); never rejects. Reads of
   * resident bytes do not reach `held`, `chunk` or `onRead`, nor these stats.
   */
  hold(runs: ReadonlyArray<{ file: string; offset: number; bytes: Buffer }>): Promise<boolean>;
  /**
   * Resolves once the server is done reading what hold() made resident into the page cache: in
   * bytes, and of them the bytes whose read failed (left to be read through FUSE when asked). At
   * once without a resident store, or once the server is gone or ended. Never rejects.
   */
  warmed(): Promise<{ bytes: number; failed: number }>;
  /**
   * unmounts (lazily if busy: `fusermount -uz` fallback), then ends the server process; idempotent;
   * never throws on an already-gone mount
   */
  close(): Promise<void>;
}

const MOUNT_TIMEOUT_MS = 10_000;

interface Entry {
  /** FUSE path: '/a/b.img' */
  fusePath: string;
  file: ImageFile;
  refs: ChunkRef[];
}

/**
 * A mount made before its image is known (mountPending): getattr of its root is answered, every
 * other request waits (on the server's side) until serve() lists the image. Nothing of it is
 * answered ENOENT meanwhile, so a reader that comes early (runc opening the image directory,
 * then waiting for descriptors.json) only waits.
 */
export interface PendingMount {
  readonly path: string;
  /** the pid of the mount's server process (fuse-server.ts) */
  readonly serverPid: number;
  /**
   * Lists `opts.manifest` and serves its reads from now on; once. Throws PICO_ERR_IMAGE_CORRUPT
   * for a manifest whose files do not lay out as a directory: the mount stays as it was, for
   * close().
   */
  serve(opts: ServeOptions): ImageMount;
  /** as ImageMount.close(); what still waits for the listing fails (ENOTCONN) */
  close(): Promise<void>;
}

export type ServeOptions = Omit<ImageMountOptions, 'mountpoint' | 'log'>;

/** Mounts `manifest` read-only at `mountpoint`; resolves once the kernel has initialised the mount. */
export async function mountImage(opts: ImageMountOptions): Promise<ImageMount> {
  layout(opts.manifest); // a manifest that cannot be listed is refused before anything is mounted
  const pending = await mountPending(opts.mountpoint, { ...(opts.log ? { log: opts.log } : {}), what: `the image of ${opts.manifest.app}` });
  try {
    return pending.serve(opts);
  } catch (err) {
    await pending.close();
    throw err;
  }
}

/**
 * Mounts an empty, read-only directory at `mountpoint` whose image serve() gives later (see
 * PendingMount); resolves once the kernel has initialised the mount. `what` names the image in
 * errors.
 */
export async function mountPending(mountpoint: string, o: { log?: Logger; what: string }): Promise<PendingMount> {
  let log = o.log;
  await cleanStaleMount(mountpoint, log);
  const created = await prepareMountpoint(mountpoint);
  const mnt = await realpath(mountpoint);

  let entries: Entry[] = [];
  let server: ImageServer | undefined;
  let lostWith: Error | undefined;
  let closing: Promise<void> | undefined;
  let child: FuseChild;
  try {
    child = await FuseChild.start({
      mountpoint: mnt,
      // Reads come only after the listing: a file must be opened first.
      read: (index, offset, length) => {
        const e = entries[index];
        if (!server || !e) return Promise.reject(new Error(`no file ${index}`));
        return server.read(e, length, offset);
      },
      onLost: (err) => {
        if (closing) return;
        lostWith = err;
        server?.lost(err);
      },
      startTimeoutMs: MOUNT_TIMEOUT_MS,
      ...(log ? { log } : {}),
    });
  } catch (err) {
    await unmount(mnt, log).catch(() => {});
    if (created) await rmdir(mnt).catch(() => {});
    throw new PicoError('PICO_ERR_HOST_UNSUPPORTED', `cannot mount ${o.what} at ${mnt}: ${describeError(err)}`, { cause: err });
  }
  await pageReadahead(mnt, log);

  const close = (): Promise<void> =>
    (closing ??= (async () => {
      try {
        await unmount(mnt, log);
      } catch (err) {
        log?.error({ mountpoint: mnt, err: describeError(err) }, 'image mount could not be unmounted');
      }
      // After the unmount: a server ended first would leave the mount dead in between.
      await child.end();
      if (created) await rmdir(mnt).catch(() => {});
      server?.dropCache();
      log?.debug({ mountpoint: mnt, ...server?.stats() }, 'image unmounted');
    })());

  return {
    path: mnt,
    serverPid: child.pid,
    close,
    serve(opts) {
      if (server) throw new PicoError('PICO_ERR_INVALID_STATE', `${mnt} serves an image already`);
      const laid = layout(opts.manifest);
      log = o.log?.child({ app: opts.manifest.app, generation: opts.manifest.generation });
      entries = laid.files;
      server = new ImageServer(opts, log);
      child.list({
        mtimeMs: validDate(opts.manifest.createdAt).getTime(),
        files: laid.files.map((e) => ({ path: e.fusePath, size: e.file.size, mode: e.file.mode })),
        dirs: [...laid.dirs],
      });
      if (lostWith) server.lost(lostWith);
      const totalBytes = opts.manifest.files.reduce((n, f) => n + f.size, 0);
      log?.debug({ mountpoint: mnt, files: laid.files.length, bytes: totalBytes, server: child.pid }, 'image mounted');
      const srv = server;
      const index = new Map(laid.files.map((e, i) => [e.file.path, i]));
      const hold: ImageMount['hold'] = (runs) =>
        child.hold(runs.flatMap((r) => {
          const file = index.get(r.file);
          return file === undefined || r.offset + r.bytes.length > entries[file]!.file.size ? [] : [{ file, offset: r.offset, bytes: r.bytes }];
        }));
      return { path: mnt, serverPid: child.pid, stats: () => srv.stats(), hold, warmed: () => child.warmed(), close };
    },
  };
}

/**
 * Lazily unmounts `mountpoint` if it is a dead FUSE mount (its server process is gone: stat
 * fails with ENOTCONN), e.g. one left behind by a crashed worker. Anything else — no such path,
 * a plain directory, a live mount — is left alone.
 */
export async function cleanStaleMount(mountpoint: string, log?: Logger): Promise<void> {
  try {
    await stat(mountpoint);
    return;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code !== 'ENOTCONN' && code !== 'ECONNABORTED') return;
  }
  const mnt = path.resolve(mountpoint);
  log?.warn({ mountpoint: mnt }, 'removing a dead image mount');
  try {
    await execFileP('fusermount', ['-uz', mnt]);
  } catch (err) {
    // fusermount refuses mounts it does not find in its table; root can still detach them.
    await execFileP('umount', ['-l', mnt]).catch((err2: unknown) => {
      throw new PicoError('PICO_ERR_HOST_UNSUPPORTED', `cannot remove the dead mount at ${mnt}: ${describeError(err)}; ${describeError(err2)}`);
    });
  }
}

/** Serves reads of image files from chunks, with the fetch memo and the counters. */
class ImageServer {
  private readonly counters = { reads: 0, bytes: 0, fromPages: 0, chunks: 0, failures: 0 };
  /** by chunk hash: fetches in flight and recently had chunks (Map order = LRU order) */
  private readonly inFlight = new Map<string, Promise<Buffer>>();
  /** by chunk hash: fetches that failed (settled after their onFailure), until failedChunkTtlMs */
  private readonly failed = new Map<string, { at: number; result: Promise<Buffer> }>();
  private readonly failedChunkTtlMs: number;
  private readonly cache = new Map<string, Buffer>();
  private cachedBytes = 0;
  private readonly cacheBytes: number;
  private readonly failureTimeoutMs: number;
  private readonly chunkTimeoutMs: number;

  constructor(
    private readonly opts: ServeOptions,
    private readonly log: Logger | undefined,
  ) {
    this.cacheBytes = opts.cacheBytes ?? 32 * 1024 * 1024;
    this.failureTimeoutMs = opts.failureTimeoutMs ?? 10_000;
    this.chunkTimeoutMs = opts.chunkTimeoutMs ?? 30_000;
    this.failedChunkTtlMs = opts.failedChunkTtlMs ?? 5000;
  }

  stats() {
    return { ...this.counters };
  }

  dropCache() {
    this.failed.clear();
    this.cache.clear();
    this.cachedBytes = 0;
  }

  /**
   * The file's bytes at [pos, pos + len), as views of its chunks; fewer only at EOF. Rejects
   * (the read gets EIO) when a chunk could not be had, after onFailure.
   */
  async read(e: Entry, len: number, pos: number): Promise<Buffer[]> {
    try {
      const end = Math.min(e.file.size, pos + len);
      if (pos >= end) return [];
      const held = await Promise.resolve(this.opts.held?.(e.file, pos, end)).catch(() => undefined);
      if (held) {
        this.counters.fromPages++;
        this.counters.bytes += end - pos;
        return [held];
      }
      const touched = chunksIn(e.refs, pos, end);
      for (const ref of touched) {
        try {
          this.opts.onRead?.(e.file, ref);
        } catch (err) {
          this.log?.warn({ file: e.file.path, chunk: ref.hash, err: describeError(err) }, 'onRead threw');
        }
      }
      const bodies = await Promise.all(touched.map((ref) => this.fetch(e.file, ref)));
      this.counters.bytes += end - pos;
      return sliceChunks(touched, bodies, pos, end);
    } finally {
      this.counters.reads++;
    }
  }

  /** The server process died while mounted: every read fails already; tell the restore. */
  lost(err: Error): void {
    this.log?.error({ err: describeError(err) }, 'the image mount server is gone: every read of the mount fails');
    if (!this.opts.onFailure) return;
    withTimeout(
      Promise.resolve().then(() => this.opts.onFailure!(err, undefined, undefined)),
      this.failureTimeoutMs,
      () => new Error(`onFailure did not settle within ${this.failureTimeoutMs} ms`),
    ).catch((err2: unknown) => this.log?.error({ err: describeError(err2) }, 'onFailure failed'));
  }

  private fetch(file: ImageFile, ref: ChunkRef): Promise<Buffer> {
    const had = this.cache.get(ref.hash);
    if (had && had.length === ref.size) {
      this.cache.delete(ref.hash);
      this.cache.set(ref.hash, had);
      return Promise.resolve(had);
    }
    let p = this.inFlight.get(ref.hash);
    if (p) return p;
    const failed = this.failed.get(ref.hash);
    if (failed) {
      if (Date.now() - failed.at < this.failedChunkTtlMs) return failed.result;
      this.failed.delete(ref.hash);
    }
    p = this.fetchOnce(file, ref);
    const fetching = p;
    this.inFlight.set(ref.hash, p);
    p.then(
      () => this.inFlight.delete(ref.hash),
      () => {
        this.inFlight.delete(ref.hash);
        if (this.failedChunkTtlMs > 0) this.failed.set(ref.hash, { at: Date.now(), result: fetching });
      },
    );
    return p;
  }

  private async fetchOnce(file: ImageFile, ref: ChunkRef): Promise<Buffer> {
    this.counters.chunks++;
    let body: Buffer;
    try {
      body = await withTimeout(
        Promise.resolve().then(() => this.opts.chunk(ref, file)),
        this.chunkTimeoutMs,
        () => new PicoError('PICO_ERR_STORE', `chunk ${ref.hash} was not had within ${this.chunkTimeoutMs} ms`),
      );
      if (!Buffer.isBuffer(body) || body.length !== ref.size) {
        throw new PicoError(
          'PICO_ERR_IMAGE_CORRUPT',
          `chunk ${ref.hash} is ${Buffer.isBuffer(body) ? body.length : typeof body} bytes, the manifest says ${ref.size}`,
        );
      }
    } catch (err) {
      this.counters.failures++;
      this.log?.error({ file: file.path, offset: ref.offset, chunk: ref.hash, err: describeError(err) }, 'chunk could not be had; the read fails with EIO');
      if (this.opts.onFailure) {
        await withTimeout(
          Promise.resolve().then(() => this.opts.onFailure!(err, file, ref)),
          this.failureTimeoutMs,
          () => new Error(`onFailure did not settle within ${this.failureTimeoutMs} ms`),
        ).catch((err2: unknown) => this.log?.error({ file: file.path, chunk: ref.hash, err: describeError(err2) }, 'onFailure failed'));
      }
      throw err;
    }
    this.remember(ref.hash, body);
    return body;
  }

  private remember(hash: string, body: Buffer) {
    const old = this.cache.get(hash);
    if (old) {
      this.cache.delete(hash);
      this.cachedBytes -= old.length;
    }
    this.cache.set(hash, body);
    this.cachedBytes += body.length;
    for (const [h, b] of this.cache) {
      if (this.cachedBytes <= this.cacheBytes || this.cache.size <= 1) break;
      this.cache.delete(h);
      this.cachedBytes -= b.length;
    }
  }
}

/** Index of the chunk holding byte `end - 1`. */
/**
 * The files of the image (in manifest order: the server names them by index) and its
 * directories by FUSE path ('/a/b'); rejects unsafe or overlapping paths.
 */
function layout(manifest: ImageManifest): { files: Entry[]; dirs: Map<string, string[]> } {
  const corrupt = (why: string) =>
    new PicoError('PICO_ERR_IMAGE_CORRUPT', `image ${manifest.app}/${manifest.generation} cannot be mounted: ${why}`);
  const files = new Map<string, Entry>();
  const dirs = new Map<string, Set<string>>([['/', new Set()]]);
  for (const file of manifest.files) {
    const parts = file.path.split('/');
    if (parts.some((s) => s === '' || s === '.' || s === '..' || s.includes('\0'))) throw corrupt(`unsafe path ${JSON.stringify(file.path)}`);
    const sizes = file.sizes;
    const expected = sizes ? sizes.length : Math.ceil(file.size / manifest.chunkSize);
    if (file.chunks.length !== expected) throw corrupt(`${file.path} lists ${file.chunks.length} chunks, ${sizes ? 'sizes' : 'its size'} says ${expected}`);
    const refs = fileChunks(manifest, file);
    const covered = refs.reduce((n, r) => (Number.isSafeInteger(r.size) && r.size >= 0 ? n + r.size : NaN), 0);
    if (covered !== file.size) throw corrupt(`the chunks of ${file.path} cover ${covered} bytes, its size is ${file.size}`);
    let dir = '/';
    for (const name of parts.slice(0, -1)) {
      dirs.get(dir)!.add(name);
      dir = dir === '/' ? `/${name}` : `${dir}/${name}`;
      if (!dirs.has(dir)) dirs.set(dir, new Set());
    }
    dirs.get(dir)!.add(parts[parts.length - 1]!);
    const fusePath = `/${file.path}`;
    if (files.has(fusePath)) throw corrupt(`${file.path} is listed twice`);
    files.set(fusePath, { fusePath, file, refs });
  }
  for (const p of files.keys()) if (dirs.has(p)) throw corrupt(`${p.slice(1)} is both a file and a directory`);
  return { files: [...files.values()], dirs: new Map([...dirs].map(([k, v]) => [k, [...v]])) };
}

/** Creates the mountpoint if missing (→ true: close removes it again); it must be an empty directory. */
async function prepareMountpoint(mountpoint: string): Promise<boolean> {
  let created = false;
  try {
    created = (await mkdir(mountpoint, { recursive: true })) !== undefined;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  }
  const entries = await readdir(mountpoint);
  if (entries.length) throw new PicoError('PICO_ERR_INVALID_STATE', `mountpoint ${mountpoint} is not empty (${entries.slice(0, 3).join(', ')}…)`);
  return created;
}

/**
 * Detaches the mount. A plain unmount first; when the mount is busy (a reader still has a file
 * open) or the plain one fails for another reason while it is still mounted, a lazy one. An
 * already-gone mount is fine.
 */
async function unmount(mnt: string, log: Logger | undefined): Promise<void> {
  try {
    await execFileP('fusermount', ['-u', mnt]);
    return;
  } catch (err) {
    if (!isMounted(mnt)) return;
    log?.warn({ mountpoint: mnt, err: describeError(err).trim() }, 'image mount busy; unmounting lazily');
  }
  try {
    await execFileP('fusermount', ['-uz', mnt]);
  } catch (err) {
    if (!isMounted(mnt)) return;
    await execFileP('umount', ['-l', mnt]).catch(() => {
      throw err;
    });
  }
}

/** Whether `mnt` (a real path) is a mount point in this mount namespace. */
function isMounted(mnt: string): boolean {
  let text: string;
  try {
    text = readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return true; // cannot tell: assume it is, so the caller tries harder
  }
  return mountinfoLine(text, mnt) !== undefined;
}

/** The fields of the last mountinfo line (the mount on top) whose mount point is `mnt`. */
function mountinfoLine(text: string, mnt: string): string[] | undefined {
  let found: string[] | undefined;
  for (const line of text.split('\n')) {
    const fields = line.split(' ');
    if (unescapeMountPath(fields[4] ?? '') === mnt) found = fields;
  }
  return found;
}

/**
 * Shrinks the kernel's readahead for the mount to one page (its backing device's read_ahead_kb,
 * root only): a small read then arrives as the reader asked — a page fault's page, not the
 * 128 KiB around it — so a read of pages that `held` has needs no chunk, and a miss waits for
 * its own chunk only, not for its neighbours too. Large reads (CRIU's copy of the rest of memory,
 * the page cache warming) still arrive in pieces of up to 128 KiB: the kernel lets a read as
 * large as that through whole. Not 0: with readahead off, the kernel reads every page with a
 * request of its own, large reads too. Best effort: without it reads are served all the same,
 * only some wait for more chunks.
 */
async function pageReadahead(mnt: string, log: Logger | undefined): Promise<void> {
  try {
    const dev = mountinfoLine(await readFile('/proc/self/mountinfo', 'utf8'), mnt)?.[2];
    if (!dev || !/^\d+:\d+$/.test(dev)) throw new Error(`no device of ${mnt} in mountinfo`);
    await writeFile(`/sys/class/bdi/${dev}/read_ahead_kb`, '4');
  } catch (err) {
    log?.debug({ mountpoint: mnt, err: describeError(err) }, 'cannot shrink the readahead of the image mount');
  }
}

function unescapeMountPath(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

function validDate(s: string): Date {
  const d = new Date(s);
  return Number.isNaN(d.getTime()) ? new Date(0) : d;
}

function withTimeout<T>(p: Promise<T>, ms: number, error: () => Error): Promise<T> {
  if (!ms) return p;
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(error()), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}
