/*
 * The FUSE server of one image mount: a process of its own, started by fuse-child.ts with the
 * mounting process's `node`. It mounts with fuse-native, answers getattr, readdir, access,
 * statfs and open from the listing it got once (in the HELLO, or in a LISTING after it), and
 * forwards every read to the mounting process over its channel (fd 3, fuse-wire.ts), reading the
 * answer into libfuse's buffer from the window (fd 4) or the channel.
 *
 * A mount made before its listing (a restore starts `runc restore` while the manifest is still
 * on its way): getattr of the root is answered at once (runc opens the image directory first),
 * every other request is held, each on its libfuse thread, until the LISTING comes; nothing is
 * ever answered ENOENT for want of the listing, so the kernel caches no wrong negative entry. If
 * the listing never comes, the mounting process unmounts and ends this process: the held
 * requests then fail (ENOTCONN) at their readers.
 *
 * Why a process of its own: libfuse 2 serves the mount on threads (fuse_loop_mt) that do not
 * block signals, and cancels them (pthread_cancel) when the mount goes away. In a process where
 * libuv has a signal handler installed — one that spawns children (SIGCHLD) or listens for a
 * signal — that handler can run on a libfuse thread, take libuv's signal lock (a token read from
 * a pipe) and be cancelled at the write that gives it back. The next signal then blocks the
 * main thread forever. Hence the invariants of this process:
 * - It never spawns a process and never listens for a signal, so libuv installs no signal
 *   handler here. That rules out fuse-native's unmount (it runs `fusermount -uz`) and
 *   `process.stdout`/`process.stderr` (on a TTY they listen for SIGWINCH): it writes to fd 2
 *   with writeSync (a pipe the mounting process reads into its log).
 * - It lives as long as its channel. When the mounting process closes it (after unmounting) or
 *   dies, the server exits at once, without unmounting: after a crash of the mounting process
 *   the mount is left dead (ENOTCONN) for cleanStaleMount (image-mount.ts) to remove.
 * - A read waits for its answer however long it takes: the mounting process bounds it
 *   (chunkTimeoutMs + failureTimeoutMs), and fuse-native's own deadline would answer ETIMEDOUT
 *   without either.
 * - Anything unexpected (a malformed frame, an answer to no request) ends the process: the
 *   mounting process sees it gone and fails the mount, rather than serving wrong bytes.
 * - A read that resident bytes (fuse-wire.ts) cover wholly is answered here, from the resident
 *   store; any other goes to the mounting process, which holds those bytes too. A resident
 *   store that cannot be read answers nothing: the read goes to the mounting process.
 * - Resident bytes are also read through the mount as soon as they come (warm()), so that the
 *   kernel's page cache holds them before the restored process faults on them: a fault is then
 *   answered by CRIU's daemon from the page cache (~4 µs) instead of by a FUSE round trip here
 *   (~100 µs: four thread wake-ups). Those reads are this process's own, asynchronous (libuv's
 *   pool threads wait in the kernel; this thread answers them), never synchronous: a synchronous
 *   read of the mount would wait for this very thread. The files are closed once the queue is
 *   empty: an open file of the mount would make its unmount busy.
 */
import { close, open, read, readSync, writeSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import Fuse from 'fuse-native';
import { Frame, FrameReader, NO_SLOT, parseResident, readRequest, warmedFrame, WIRE_VERSION, WireError, frame, type FuseListing, type Hello, type ResidentRun } from './fuse-wire.js';
import { insertDisjoint, spanOf } from './page-runs.js';

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const O_ACCMODE = 0o3;
const O_RDONLY = 0;
const O_TRUNC = 0o1000;
const W_OK = 2;
/** in seconds: the image never changes while mounted */
const ATTR_CACHE_S = 3600;

/** the window's file descriptor (fuse-wire.ts) */
const WINDOW_FD = 4;
/** the resident store's file descriptor (fuse-wire.ts) */
const RESIDENT_FD = 5;
/** warm(): reads in flight (libuv's pool has 4 threads, and nothing else uses it here), bytes each */
const WARMERS = 4;
const WARM_READ = 128 * 1024;

interface PendingRead {
  /** libfuse's buffer for the answer: valid until `done` is called, never after */
  buf: Buffer;
  /** lent to this read until it is answered, or NO_SLOT */
  slot: number;
  done(result: number): void;
}

const channel = new net.Socket({ fd: 3, readable: true, writable: true });
const pending = new Map<number, PendingRead>();
let nextId = 0;
/** slots of the window no read holds */
const freeSlots: number[] = [];
let slotBytes = 0;
let started = false;
/** the listing's operations, once it came; until then requests wait in `held` */
let listed: Fuse.Operations | undefined;
const held: Array<(ops: Fuse.Operations) => void> = [];
/** the listing's file sizes and paths (FUSE paths: '/a.img'), by index, once it came */
let fileSizes: number[] = [];
let filePaths: string[] = [];
let mountedAt = '';
/** whether the HELLO gave a resident store */
let hasResident = false;
/** by file index: the resident runs, in offset order, none overlapping */
const resident = new Map<number, ResidentRun[]>();
const runLength = (r: ResidentRun): number => r.length;

function say(line: string): void {
  try {
    writeSync(2, `${line}\n`);
  } catch {
    // nobody reads stderr any more: the mounting process is gone, and so is this one shortly
  }
}

/** Exits now; the kernel answers whatever is still pending (ENOTCONN) once /dev/fuse closes. */
function exit(code: number, why?: string): never {
  if (why) say(why);
  process.exit(code);
}

const reader = new FrameReader({
  target(type, id, bytes) {
    if (type !== Frame.DATA) return undefined;
    const p = pending.get(id);
    if (!p) throw new WireError(`DATA for request ${id}, which is not pending`);
    if (bytes > p.buf.length) throw new WireError(`${bytes} bytes for a read of ${p.buf.length}`);
    return p.buf;
  },
  frame(type, id, payload) {
    if (type === Frame.HELLO) return start(id, payload);
    if (type === Frame.LISTING) return list(payload);
    if (type === Frame.RESIDENT) return addResident(payload);
    const p = pending.get(id);
    if (!p || (type !== Frame.DATA && type !== Frame.PLACED && type !== Frame.ERROR)) throw new WireError(`frame type ${type} for request ${id}`);
    pending.delete(id);
    let result: number;
    if (type === Frame.DATA) result = payload.length;
    else if (type === Frame.PLACED) result = fromWindow(p, payload);
    else {
      const errno = payload.length === 4 ? payload.readInt32LE(0) : 0;
      result = errno < 0 ? errno : Fuse.EIO;
    }
    if (p.slot !== NO_SLOT) freeSlots.push(p.slot);
    p.done(result);
  },
});

channel.on('data', (chunk: Buffer) => {
  try {
    reader.push(chunk);
  } catch (err) {
    exit(1, `image mount server: ${(err as Error).message}`);
  }
});
channel.on('error', (err: NodeJS.ErrnoException) => {
  // ECONNRESET, EPIPE: the mounting process closed the channel (with requests of ours unread) or died
  if (err.code === 'ECONNRESET' || err.code === 'EPIPE') exit(0);
  exit(1, `image mount server: channel: ${err.message}`);
});
channel.on('end', () => exit(0));
channel.on('close', () => exit(0));

/** Reads a PLACED answer from the read's slot into libfuse's buffer; the byte count. */
function fromWindow(p: PendingRead, payload: Buffer): number {
  const bytes = payload.length === 4 ? payload.readUInt32LE(0) : -1;
  if (p.slot === NO_SLOT || bytes < 0 || bytes > p.buf.length) throw new WireError(`PLACED ${bytes} bytes for a read of ${p.buf.length} in slot ${p.slot}`);
  const got = bytes && readSync(WINDOW_FD, p.buf, 0, bytes, p.slot * slotBytes);
  if (got !== bytes) throw new WireError(`${got} of ${bytes} bytes in slot ${p.slot}`);
  return bytes;
}

/** A RESIDENT frame: its runs are answered from the resident store from now on. */
function addResident(payload: Buffer): void {
  if (!hasResident || !listed) throw new WireError(hasResident ? 'RESIDENT before the listing' : 'RESIDENT without a resident store');
  for (const r of parseResident(payload)) {
    const size = fileSizes[r.file];
    if (size === undefined || r.offset + r.length > size) throw new WireError(`resident bytes [${r.offset}, ${r.offset + r.length}) of file ${r.file}, which has ${size ?? 'no'} bytes`);
    if (r.length === 0) continue;
    let list = resident.get(r.file);
    if (!list) resident.set(r.file, (list = []));
    // An overlap is the same bytes (the image never changes): it is kept out, and not warmed.
    if (insertDisjoint(list, r, runLength)) warm(r);
    else warmedDone += r.length;
  }
  if (warming === 0) channel.write(warmedFrame(warmedDone, warmedFailed));
}

/** What warm() has still to read, in pieces of at most WARM_READ, taken from the end. */
const warmQueue: Array<{ file: number; offset: number; length: number }> = [];
let warming = 0;
/** in bytes, of the resident runs: done warming (WARMED), and of them failed */
let warmedDone = 0;
let warmedFailed = 0;
/** the mount's files warm() opened, by index, until the queue is empty */
const warmFiles = new Map<number, Promise<number>>();
const warmBuffers: Buffer[] = [];

/**
 * Queues the resident run `r` to be read through the mount (see the top). Each run is read from
 * its end back to its start: read forward, the kernel's readahead would read a page past the
 * run's end, which is not resident (a fetch from the store, in the mounting process). Queued
 * runs are taken first come, first served. Best effort: a read that fails ends nothing but
 * itself.
 */
function warm(r: ResidentRun): void {
  const pieces: typeof warmQueue = [];
  for (let at = r.offset; at < r.offset + r.length; at += WARM_READ) pieces.push({ file: r.file, offset: at, length: Math.min(WARM_READ, r.offset + r.length - at) });
  warmQueue.unshift(...pieces);
  while (warming < WARMERS && warmQueue.length > 0) {
    warming++;
    warmer(warmBuffers.pop() ?? Buffer.allocUnsafe(WARM_READ));
  }
}

function warmer(buf: Buffer): void {
  const next = warmQueue.pop();
  if (!next) {
    warmBuffers.push(buf);
    if (--warming > 0) return;
    closeWarmFiles();
    channel.write(warmedFrame(warmedDone, warmedFailed));
    return;
  }
  const finished = (ok: boolean): void => {
    warmedDone += next.length;
    if (!ok) warmedFailed += next.length;
    warmer(buf);
  };
  let fd = warmFiles.get(next.file);
  if (!fd) {
    fd = new Promise((resolve, reject) => open(path.join(mountedAt, filePaths[next.file]!), 'r', (err, got) => (err ? reject(err) : resolve(got))));
    fd.catch(() => undefined);
    warmFiles.set(next.file, fd);
  }
  fd.then(
    (got) => read(got, buf, 0, next.length, next.offset, (err, n) => finished(!err && n === next.length)),
    () => finished(false),
  );
}

function closeWarmFiles(): void {
  for (const fd of warmFiles.values()) fd.then((got) => close(got, () => undefined), () => undefined);
  warmFiles.clear();
}

/**
 * Reads [pos, pos + len) of file `file` (cut at its end) from the resident store into `buf` when
 * resident runs cover all of it: the byte count; else undefined.
 */
function fromResident(file: number, buf: Buffer, len: number, pos: number): number | undefined {
  const list = resident.get(file);
  const end = Math.min(fileSizes[file] ?? 0, pos + len);
  const span = list && spanOf(list, pos, end, runLength);
  if (!span) return undefined;
  try {
    for (let i = span.first, at = pos; at < end; i++) {
      const r = list[i]!;
      const n = Math.min(end, r.offset + r.length) - at;
      if (readSync(RESIDENT_FD, buf, at - pos, n, r.at + (at - r.offset)) !== n) return undefined;
      at += n;
    }
  } catch {
    return undefined;
  }
  return end - pos;
}

function start(version: number, payload: Buffer): void {
  if (started) throw new WireError('a second HELLO');
  started = true;
  if (version !== WIRE_VERSION) return fail(`wire version ${version}; this server speaks ${WIRE_VERSION}`);
  let hello: Hello;
  try {
    hello = JSON.parse(payload.toString('utf8')) as Hello;
  } catch (err) {
    return fail(`unreadable HELLO: ${(err as Error).message}`);
  }
  const { mountpoint, listing, window } = hello;
  hasResident = hello.resident === true;
  mountedAt = mountpoint;
  if (window) {
    slotBytes = window.slotBytes;
    for (let i = window.slots - 1; i >= 0; i--) freeSlots.push(i);
  }
  if (listing) listed = operations(listing);
  const fuse = new Fuse(mountpoint, deferred(), {
    timeout: false,
    kernelCache: true,
    entryTimeout: ATTR_CACHE_S,
    attrTimeout: ATTR_CACHE_S,
    fsname: 'picocenter',
    subtype: 'image',
    // Not `autoUnmount`: libfuse 2 would run a fusermount child for the mount's lifetime.
  });
  fuse.mount((err) => {
    if (err) return fail(err.message);
    channel.write(frame(Frame.READY, 0));
  });
}

/** The LISTING of a mount made without one: answers what waited for it. */
function list(payload: Buffer): void {
  if (!started || listed) throw new WireError(listed ? 'a second listing' : 'a LISTING before the HELLO');
  let listing: FuseListing;
  try {
    listing = JSON.parse(payload.toString('utf8')) as FuseListing;
  } catch (err) {
    throw new WireError(`unreadable LISTING: ${(err as Error).message}`);
  }
  const ops = operations(listing);
  listed = ops;
  for (const answer of held.splice(0)) answer(ops);
}

/**
 * The operations fuse-native is given: the listing's once it is here; before, getattr of the
 * root is answered and every other request waits for the listing (see the top).
 */
function deferred(): Fuse.Operations {
  const rootStat = dirStat(new Date());
  const out: Record<string, (...args: unknown[]) => void> = {};
  for (const name of OPERATIONS) {
    out[name] = (...args: unknown[]) => {
      if (!listed && name === 'getattr' && args[0] === '/') return (args[1] as (code: number, stat: Fuse.Stat) => void)(0, rootStat);
      const run = (ops: Fuse.Operations) => (ops[name] as (...a: unknown[]) => void)(...args);
      if (listed) return run(listed);
      held.push(run);
    };
  }
  return out as Fuse.Operations;
}

function fail(why: string): void {
  channel.end(frame(Frame.FAILED, 0, Buffer.from(why, 'utf8')), () => exit(1));
}

function dirStat(mtime: Date): Fuse.Stat {
  return { mode: S_IFDIR | 0o755, size: 4096, nlink: 2, uid: 0, gid: 0, mtime, atime: mtime, ctime: mtime };
}

/** Every operation operations() implements, by name. */
const OPERATIONS = [
  'getattr', 'readdir', 'access', 'statfs', 'open', 'release', 'read', 'write', 'create', 'truncate', 'ftruncate', 'unlink', 'rename',
  'link', 'symlink', 'mkdir', 'rmdir', 'mknod', 'chmod', 'chown', 'utimens', 'setxattr', 'removexattr',
] as const satisfies ReadonlyArray<keyof Fuse.Operations>;

function operations(listing: FuseListing): Fuse.Operations {
  const files = new Map(listing.files.map((f, index) => [f.path, { ...f, index }]));
  fileSizes = listing.files.map((f) => f.size);
  filePaths = listing.files.map((f) => f.path);
  const dirs = new Map(listing.dirs);
  const mtime = new Date(listing.mtimeMs);
  const totalBytes = listing.files.reduce((n, f) => n + f.size, 0);
  const fileStat = (f: { size: number; mode: number }): Fuse.Stat => ({
    mode: S_IFREG | (f.mode & 0o7777),
    size: f.size,
    nlink: 1,
    uid: 0,
    gid: 0,
    blksize: 128 * 1024,
    blocks: Math.ceil(f.size / 512),
    mtime,
    atime: mtime,
    ctime: mtime,
  });
  const rofs = (...args: unknown[]) => (args[args.length - 1] as Fuse.Done)(Fuse.EROFS);

  return {
    getattr(p, cb) {
      const f = files.get(p);
      if (f) return cb(0, fileStat(f));
      if (dirs.has(p)) return cb(0, dirStat(mtime));
      cb(Fuse.ENOENT);
    },
    readdir(p, cb) {
      const names = dirs.get(p);
      if (names) return cb(0, ['.', '..', ...names]);
      cb(files.has(p) ? Fuse.ENOTDIR : Fuse.ENOENT);
    },
    access(p, mode, cb) {
      if (!files.has(p) && !dirs.has(p)) return cb(Fuse.ENOENT);
      cb(mode & W_OK ? Fuse.EROFS : 0);
    },
    statfs(_p, cb) {
      cb(0, {
        bsize: 4096,
        frsize: 4096,
        blocks: Math.ceil(totalBytes / 4096),
        bfree: 0,
        bavail: 0,
        files: files.size + dirs.size,
        ffree: 0,
        favail: 0,
        fsid: 0,
        flag: 1, // ST_RDONLY
        namemax: 255,
      });
    },
    open(p, flags, cb) {
      const f = files.get(p);
      if (!f) return cb(dirs.has(p) ? Fuse.EISDIR : Fuse.ENOENT);
      if ((flags & O_ACCMODE) !== O_RDONLY || flags & O_TRUNC) return cb(Fuse.EROFS);
      cb(0, f.index + 1); // the file handle names the file: reads need no lookup by path
    },
    release(_p, _fh, cb) {
      cb(0);
    },
    read(p, fh, buf, len, pos, cb) {
      const index = fh >= 1 && fh <= listing.files.length ? fh - 1 : files.get(p)?.index;
      if (index === undefined) return cb(Fuse.EBADF);
      const got = fromResident(index, buf, len, pos);
      if (got !== undefined) return cb(got);
      const id = nextId;
      nextId = (nextId + 1) >>> 0;
      const slot = len <= slotBytes ? (freeSlots.pop() ?? NO_SLOT) : NO_SLOT;
      pending.set(id, { buf, slot, done: cb });
      channel.write(readRequest(id, index, pos, len, slot));
    },
    write: rofs,
    create: rofs,
    truncate: rofs,
    ftruncate: rofs,
    unlink: rofs,
    rename: rofs,
    link: rofs,
    symlink: rofs,
    mkdir: rofs,
    rmdir: rofs,
    mknod: rofs,
    chmod: rofs,
    chown: rofs,
    utimens: rofs,
    setxattr: rofs,
    removexattr: rofs,
  };
}
