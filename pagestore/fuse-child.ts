/*
 * The mounting process's side of an image mount's FUSE server (fuse-server.ts): starts it,
 * answers its reads over fuse-wire.ts, and ends it.
 *
 *   start()  takes the spare server (warmFuseServer) or spawns one, and sends it the listing
 *            (or none yet: list() sends it later); resolves once the kernel initialised the mount
 *            (READY). Rejects — with the server ended — on FAILED, an early exit or
 *            startTimeoutMs.
 *   (up)     each READ is passed to `read`; its slices are written into the READ's slot of the
 *            window (one pwritev) and answered PLACED, or else written after a DATA header in one
 *            writev to the channel; a rejection becomes ERROR -EIO.
 *   hold()   appends bytes of the image to the resident store and names them in a RESIDENT
 *            frame: the server answers reads of them by itself from then on, and reads them
 *            into the page cache (fuse-wire.ts); warmed() says when it has.
 *   end()    closes the channel: the server exits at EOF. SIGKILL after END_TIMEOUT_MS; resolves
 *            once the exit was seen or after a second END_TIMEOUT_MS — never hangs. Then closes
 *            the window.
 *   lost     the server went away while up (crashed, killed, broke the protocol): `onLost`
 *            once, at the first sign (the channel closing or the exit, whichever is seen first).
 *            A server that broke the protocol is SIGKILLed first. Once the server is dead the
 *            kernel fails the mount's pending and later requests (ENOTCONN) by itself.
 *
 * The server runs this process's own `node` binary, in a session of its own (a terminal's ^C
 * must not kill it under a live mount: end() is how it stops), without NODE_OPTIONS (a preload
 * could spawn or listen for signals there, which the server must never do).
 */
import { randomBytes } from 'node:crypto';
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, unlinkSync, writev, writevSync } from 'node:fs';
import type { Socket } from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { holdLoop } from '../shared/child-ref.js';
import type { Logger } from '../shared/log.js';
import { describeError } from '../shared/errors.js';
import {
  errorReply,
  Frame,
  frame,
  FrameReader,
  header,
  NO_SLOT,
  parseReadRequest,
  parseWarmed,
  placedReply,
  residentFrame,
  WIRE_VERSION,
  WireError,
  type FuseListing,
  type Hello,
} from './fuse-wire.js';

const SERVER = fileURLToPath(new URL('./fuse-server.js', import.meta.url));
const EIO = -5;
/** in ms: how long end() waits for the server to exit, before and after SIGKILL */
const END_TIMEOUT_MS = 2_000;
/** stderr lines of the server kept for error messages */
const STDERR_TAIL_LINES = 5;
/** tmpfs, for the window: its pages are memory, never written back to a disk */
const WINDOW_DIR = '/dev/shm';
/**
 * Slots of the window: more than libfuse 2 has threads (fuse_loop_mt runs at most 10 workers,
 * each with one request); a read finding none free is answered DATA.
 */
const WINDOW_SLOTS = 16;
/** in bytes: the kernel's largest FUSE read without max_pages (which libfuse 2 never asks for) */
const WINDOW_SLOT_BYTES = 128 * 1024;
/** in bytes: at most this much of an image is made resident (tmpfs is memory); hold() skips the rest */
const MAX_RESIDENT_BYTES = 512 * 1024 * 1024;

/** Bytes of the listing's file `file` from `offset`, for hold(). */
export interface HeldBytes {
  file: number;
  offset: number;
  bytes: Buffer;
}

export interface FuseChildOptions {
  /** a real path, mounted over */
  mountpoint: string;
  /** absent: the server holds every request but getattr of the root until list() */
  listing?: FuseListing;
  /**
   * Answers one read of file `file` (an index into the listing's files): the bytes as slices, at most
   * `length` in all (fewer only at EOF); the slices are written out as they are and must not
   * change. A rejection answers EIO.
   */
  read(file: number, offset: number, length: number): Promise<Buffer[]>;
  /** the server went away while up (see above); called once, never after end() */
  onLost(err: Error): void;
  /** in ms */
  startTimeoutMs: number;
  log?: Logger;
}

type State = 'starting' | 'up' | 'lost' | 'ending';

export class FuseChild {
  readonly pid: number;
  private readonly child: ChildProcess;
  private readonly channel: Socket;
  private state: State = 'starting';
  private readonly exited: Promise<void>;
  private readonly stderrTail: string[] = [];
  private startSettled: ((err?: Error) => void) | undefined;
  /** the window's file descriptor, until end() */
  private window: number | undefined;
  /** the resident store's file descriptor, until end() */
  private resident: number | undefined;
  /** in bytes: how much of the resident store hold() has taken */
  private residentBytes = 0;
  /** in bytes: resident runs the server was told of, and (its WARMED) is done warming */
  private sentBytes = 0;
  private warmedBytes = { done: 0, failed: 0 };
  /** hold()s whose RESIDENT is not sent yet */
  private readonly holding = new Set<Promise<boolean>>();
  private readonly warmWaiters: Array<{ bytes: number; resolve(w: { bytes: number; failed: number }): void }> = [];

  private constructor(private readonly o: FuseChildOptions) {
    const server = takeSpare() ?? spawnServer(o.log);
    this.window = server.window;
    this.resident = server.resident;
    this.child = server.child;
    this.pid = this.child.pid ?? -1;
    this.channel = this.child.stdio[3] as Socket;
    this.exited = new Promise((resolve) => this.child.once('exit', () => resolve()));
    server.use();

    this.child.once('error', (err) => this.gone(`could not be started: ${err.message}`));
    this.child.once('exit', (code, signal) => {
      const how = signal ? `on ${signal}` : `with code ${code}`;
      if (this.state === 'ending') o.log?.debug({ server: this.pid, code, signal }, 'image mount server exited');
      else o.log?.warn({ server: this.pid, code, signal }, 'image mount server exited unexpectedly');
      this.gone(`exited ${how}`);
    });
    this.readStderr();

    const reader = new FrameReader({ frame: (type, id, payload) => this.onFrame(type, id, payload) });
    this.channel.on('data', (chunk: Buffer) => {
      try {
        reader.push(chunk);
      } catch (err) {
        this.child.kill('SIGKILL');
        this.gone((err as Error).message);
      }
    });
    this.channel.on('error', (err) => this.gone(`channel: ${err.message}`));
    this.channel.on('close', () => this.gone('closed its channel'));
  }

  /** Starts the server for `o.mountpoint`; resolves once the mount is up (see above). */
  static async start(o: FuseChildOptions): Promise<FuseChild> {
    const c = new FuseChild(o);
    let timer: NodeJS.Timeout | undefined;
    try {
      await new Promise<void>((resolve, reject) => {
        c.startSettled = (err) => (err ? reject(err) : resolve());
        timer = setTimeout(() => reject(new Error(`the kernel did not initialise the mount within ${o.startTimeoutMs} ms`)), o.startTimeoutMs);
        const hello: Hello = {
          mountpoint: o.mountpoint,
          listing: o.listing ?? null,
          window: c.window === undefined ? null : { slots: WINDOW_SLOTS, slotBytes: WINDOW_SLOT_BYTES },
          resident: c.resident !== undefined,
        };
        c.channel.write(frame(Frame.HELLO, WIRE_VERSION, Buffer.from(JSON.stringify(hello), 'utf8')));
      });
    } catch (err) {
      await c.end();
      throw err;
    } finally {
      clearTimeout(timer);
      c.startSettled = undefined;
    }
    c.state = 'up';
    return c;
  }

  /** The listing of a mount started without one; once. */
  list(listing: FuseListing): void {
    this.send(frame(Frame.LISTING, 0, Buffer.from(JSON.stringify(listing), 'utf8')));
  }

  /**
   * Makes `held` resident (see above), after the listing: resolves true once the server was told,
   * or false when there is no resident store, it is full, the mount is not up, or the store
   * cannot be written (then logged) — reads of those bytes are then answered through `read` as
   * before. Never rejects.
   */
  hold(held: readonly HeldBytes[]): Promise<boolean> {
    const fd = this.resident;
    const runs = held.filter((h) => h.bytes.length > 0);
    const bytes = runs.reduce((n, h) => n + h.bytes.length, 0);
    if (runs.length === 0) return Promise.resolve(true);
    if (fd === undefined || this.state !== 'up' || this.residentBytes + bytes > MAX_RESIDENT_BYTES) return Promise.resolve(false);
    const at = this.residentBytes;
    this.residentBytes += bytes;
    // Off this thread: megabytes into tmpfs while the restore's reads want this event loop.
    const told = new Promise<boolean>((resolve) =>
      writev(
        fd,
        runs.map((h) => h.bytes),
        at,
        (err, written) => {
          if (err || written !== bytes) {
            this.o.log?.warn({ err: err ? describeError(err) : `${written} of ${bytes} bytes written` }, 'cannot write the resident store of an image mount; its reads go through this process');
            return resolve(false);
          }
          if (this.state === 'up') {
            let pos = at;
            const named = runs.map((h) => {
              const r = { file: h.file, offset: h.offset, length: h.bytes.length, at: pos };
              pos += h.bytes.length;
              return r;
            });
            this.send(residentFrame(named));
            this.sentBytes += bytes;
          }
          resolve(this.state === 'up');
        },
      ),
    );
    this.holding.add(told);
    void told.then(() => this.holding.delete(told));
    return told;
  }

  /**
   * Resolves once the server is done reading what every hold() so far made resident into the
   * page cache (or could not: `failed` bytes); at once without a resident store, and when the
   * server goes away or is ended. In bytes.
   */
  async warmed(): Promise<{ bytes: number; failed: number }> {
    await Promise.all(this.holding);
    const bytes = this.sentBytes;
    if (this.warmedBytes.done >= bytes || this.state !== 'up') return { bytes: this.warmedBytes.done, failed: this.warmedBytes.failed };
    return new Promise((resolve) => this.warmWaiters.push({ bytes, resolve }));
  }

  private wakeWarmWaiters(all: boolean): void {
    const { done, failed } = this.warmedBytes;
    for (let i = this.warmWaiters.length - 1; i >= 0; i--) {
      const w = this.warmWaiters[i]!;
      if (!all && done < w.bytes) continue;
      this.warmWaiters.splice(i, 1);
      w.resolve({ bytes: done, failed });
    }
  }

  /** Ends the server (see above). Idempotent; never rejects. */
  async end(): Promise<void> {
    this.state = 'ending';
    this.wakeWarmWaiters(true);
    this.channel.destroy();
    warmFuseServer(this.o.log); // the next mount's
    if (await this.exitWithin(END_TIMEOUT_MS)) return this.closeWindow();
    this.o.log?.warn({ server: this.pid }, `image mount server did not exit within ${END_TIMEOUT_MS} ms of its channel closing; SIGKILL`);
    this.child.kill('SIGKILL');
    if (!(await this.exitWithin(END_TIMEOUT_MS))) this.o.log?.error({ server: this.pid }, 'image mount server: no exit seen after SIGKILL');
    this.closeWindow();
  }

  private closeWindow(): void {
    if (this.window !== undefined) closeSync(this.window);
    if (this.resident !== undefined) closeSync(this.resident);
    this.window = undefined;
    this.resident = undefined;
  }

  private onFrame(type: number, id: number, payload: Buffer): void {
    switch (type) {
      case Frame.READ: {
        const { file, offset, length, slot } = parseReadRequest(payload);
        if (slot !== NO_SLOT && slot >= WINDOW_SLOTS) throw new WireError(`slot ${slot}`);
        Promise.resolve()
          .then(() => this.o.read(file, offset, length))
          .then(
            (slices) => this.answer(id, slot, slices),
            () => this.send(errorReply(id, EIO)),
          );
        return;
      }
      case Frame.WARMED:
        this.warmedBytes = parseWarmed(payload);
        return this.wakeWarmWaiters(false);
      case Frame.READY:
        if (!this.startSettled) throw new WireError('READY twice');
        return this.startSettled();
      case Frame.FAILED:
        if (!this.startSettled) throw new WireError('FAILED after READY');
        return this.startSettled(new Error(payload.toString('utf8')));
      default:
        throw new WireError(`frame type ${type} from the server`);
    }
  }

  private answer(id: number, slot: number, slices: Buffer[]): void {
    if (!this.channel.writable) return;
    const bytes = slices.reduce((n, s) => n + s.length, 0);
    if (slot !== NO_SLOT && this.window !== undefined && bytes <= WINDOW_SLOT_BYTES) {
      try {
        // Synchronous, but tmpfs: a copy into memory, like the copy into the reply it replaces.
        if (!bytes || writevSync(this.window, slices, slot * WINDOW_SLOT_BYTES) === bytes) return this.send(placedReply(id, bytes));
      } catch (err) {
        this.o.log?.warn({ err: describeError(err) }, 'cannot write the image mount window; answering through the channel');
      }
    }
    // One writev: the header and views of the chunks, no copy on this side.
    this.channel.cork();
    this.channel.write(header(Frame.DATA, id, bytes));
    for (const s of slices) if (s.length) this.channel.write(s);
    this.channel.uncork();
  }

  private send(b: Buffer): void {
    if (this.channel.writable) this.channel.write(b);
  }

  /** The server or its channel is gone: fail a start, or report a loss while up — once. */
  private gone(why: string): void {
    if (this.state === 'starting') {
      // What it printed before dying (fuse-native not loadable…) says more than the exit code.
      void this.stderrClosed().then(() => this.startSettled?.(this.error(why)));
      return;
    }
    if (this.state !== 'up') return;
    this.state = 'lost';
    this.wakeWarmWaiters(true);
    this.child.kill('SIGKILL'); // a channel broken without an exit: make sure the mount dies with it
    this.o.onLost(this.error(why));
  }

  private error(why: string): Error {
    const tail = this.stderrTail.length ? ` (it said: ${this.stderrTail.join(' | ')})` : '';
    return new Error(`the FUSE server of ${this.o.mountpoint} (pid ${this.pid}) ${why}${tail}`);
  }

  /** Resolves when the server's stderr closed, or after END_TIMEOUT_MS. */
  private stderrClosed(): Promise<void> {
    const stderr = this.child.stderr!;
    if (stderr.destroyed || stderr.readableEnded) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, END_TIMEOUT_MS);
      stderr.once('close', () => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  private readStderr(): void {
    let partial = '';
    this.child.stderr!.setEncoding('utf8');
    this.child.stderr!.on('data', (text: string) => {
      const lines = (partial + text).split('\n');
      partial = lines.pop()!;
      for (const line of lines) {
        if (!line.trim()) continue;
        this.stderrTail.push(line.trim());
        if (this.stderrTail.length > STDERR_TAIL_LINES) this.stderrTail.shift();
        this.o.log?.warn({ server: this.pid, line }, 'image mount server says');
      }
    });
  }

  private async exitWithin(ms: number): Promise<boolean> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return true;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), ms);
    });
    try {
      return await Promise.race([this.exited.then(() => true), timedOut]);
    } finally {
      clearTimeout(timer);
    }
  }
}

interface Server {
  child: ChildProcess;
  window: number | undefined;
  resident: number | undefined;
  /** holds the event loop from now on (a spare does not) */
  use(): void;
}

/**
 * A server started ahead and idle until its HELLO: starting `node` takes ~170 ms of CPU here,
 * which a lazy restore should not wait for. It holds no reference on the event loop, and exits
 * when this process goes (its channel closes).
 */
let spare: Server | undefined;

/** Starts the spare server now, if there is none. */
export function warmFuseServer(log?: Logger): void {
  if (spare) return;
  const s = spawnServer(log);
  holdLoop(s.child, false);
  const forget = (): void => {
    if (spare !== s) return;
    spare = undefined;
    closeFiles(s);
  };
  s.child.once('exit', forget);
  s.child.once('error', forget);
  spare = s;
}

/** The spare, if it is still alive (it is then this caller's). */
function takeSpare(): Server | undefined {
  const s = spare;
  spare = undefined;
  if (!s) return undefined;
  if (s.child.exitCode === null && s.child.signalCode === null) return s;
  closeFiles(s);
  return undefined;
}

function closeFiles(s: Server): void {
  if (s.window !== undefined) closeSync(s.window);
  if (s.resident !== undefined) closeSync(s.resident);
}

function spawnServer(log: Logger | undefined): Server {
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  const window = openShm('window', log);
  // Only beside a window: without tmpfs there is neither.
  const resident = window === undefined ? undefined : openShm('resident', log);
  const child = spawn(process.execPath, [SERVER], { stdio: ['ignore', 'ignore', 'pipe', 'pipe', window ?? 'ignore', resident ?? 'ignore'], detached: true, env });
  // An 'error' (spawn failed) before a FuseChild listens must not be thrown: it sees the exit.
  child.on('error', () => undefined);
  return {
    child,
    window,
    resident,
    use: () => holdLoop(child, true),
  };
}

/**
 * An unlinked file in WINDOW_DIR (fuse-wire.ts: the window for the bytes of reads, or the
 * resident store), or nothing when there is no tmpfs to put it on: every read is then answered
 * through the channel.
 */
function openShm(what: 'window' | 'resident', log: Logger | undefined): number | undefined {
  const p = path.join(WINDOW_DIR, `picocenter-mount-${what}-${process.pid}-${randomBytes(6).toString('hex')}`);
  try {
    const fd = openSync(p, 'wx+', 0o600);
    unlinkSync(p);
    return fd;
  } catch (err) {
    log?.warn({ dir: WINDOW_DIR, err: describeError(err) }, `no ${what} file for the image mount; reads go through the channel (slower)`);
    return undefined;
  }
}
