/*
 * The wire between an image mount (fuse-child.ts, in the mounting process) and its FUSE server
 * process (fuse-server.ts): length-prefixed binary frames on one stream socket (the server's
 * fd 3), little-endian, and a window for the bytes of reads (the server's fd 4). Both ends are
 * the same build, but the format is still a contract: HELLO carries WIRE_VERSION and the server
 * refuses any other.
 *
 *   frame   u32 length (bytes after this field) | u8 type | u32 id | payload (length - 5 bytes)
 *
 *   mounting process → server
 *     HELLO   id = WIRE_VERSION  payload: UTF-8 JSON Hello. First frame, once.
 *     LISTING id = 0             payload: UTF-8 JSON FuseListing. Once, after a HELLO without
 *                                one (a mount made before its image is known); until then the
 *                                server answers getattr of '/' and holds every other request
 *     PLACED  id = request id    payload: u32 bytes — the bytes read are in the READ's slot
 *     DATA    id = request id    payload: the bytes read
 *     ERROR   id = request id    payload: i32 negative errno (-EIO…)
 *     RESIDENT id = 0            payload: u32 n | n × (u32 file | f64 offset | u32 length | f64
 *                                at): bytes of the image now in the resident store (below), file
 *                                `file`'s [offset, offset + length) at `at`; any number of times,
 *                                after the listing
 *   server → mounting process
 *     READY   id = 0             the kernel initialised the mount
 *     FAILED  id = 0             payload: UTF-8 reason; the server exits
 *     READ    id = request id    payload: u32 file (index into FuseListing.files) | f64 offset
 *                                (bytes; an integer below 2^53) | u32 length (bytes) | u32 slot
 *                                (NO_SLOT: none)
 *     WARMED  id = 0             payload: f64 done | f64 failed — bytes of the RESIDENT runs so
 *                                far that the server is done reading into the page cache (read,
 *                                failed, or resident already), and of them failed; each time it
 *                                has nothing left to read
 *
 * Every READ gets exactly one PLACED, DATA or ERROR with its id, in any order (the chunks of
 * one read may be cached, of another not); the bytes read are at most the length asked, fewer
 * only at EOF. Ids are the server's; they wrap at 2^32.
 *
 * The window is an unlinked file in /dev/shm (tmpfs: memory) of Hello.window.slots slots of
 * slotBytes each. The server lends a READ a free slot when its length fits one; the mounting
 * process pwrite()s the bytes there and answers PLACED, and the server pread()s them straight
 * into libfuse's buffer, then frees the slot. Bytes through the socket instead cost several
 * wake-ups per 128 KiB read (the socket buffer fills), measured 4x slower here. A READ without
 * a slot, or when the window cannot be written, is answered DATA.
 *
 * The resident store (the server's fd 5, when Hello.resident) is a second unlinked file in
 * /dev/shm: the mounting process appends bytes of the image it holds whole (a restore pack's
 * runs, the image's small files) and then names them in a RESIDENT frame. From then on the
 * server answers a read that resident bytes cover wholly by itself, with no READ: the app's
 * first page faults and CRIU's reads of its small files then never wait for the mounting
 * process's event loop, which is busiest just then (the store's answers, the packs' decoding).
 * Resident bytes are the image's, which never changes: they are never taken back.
 */

export const WIRE_VERSION = 3;

export const Frame = { HELLO: 1, DATA: 2, ERROR: 3, READY: 4, FAILED: 5, READ: 6, PLACED: 7, LISTING: 8, RESIDENT: 9, WARMED: 10 } as const;
export type Frame = (typeof Frame)[keyof typeof Frame];

/** in bytes: length | type | id */
export const HEADER_BYTES = 9;
/** in bytes: the payload of a READ */
const READ_PAYLOAD_BYTES = 20;
/** a READ's slot when it has none */
export const NO_SLOT = 0xffff_ffff;
/** in bytes: the largest payload either end accepts (a HELLO of a very large image; DATA is ≤ 1 MiB) */
export const MAX_PAYLOAD_BYTES = 64 * 1024 * 1024;

/** The first frame's payload. */
export interface Hello {
  /** a real path, mounted over */
  mountpoint: string;
  /** null: it follows in a LISTING frame */
  listing: FuseListing | null;
  /** the window (fd 4 of the server), or null: every read is answered DATA */
  window: { slots: number; slotBytes: number } | null;
  /** whether the server has a resident store (fd 5); without one no RESIDENT frame comes */
  resident: boolean;
}

/** Bytes of the image in the resident store: file `file`'s [offset, offset + length) at `at`. */
export interface ResidentRun {
  file: number;
  offset: number;
  length: number;
  at: number;
}

/** What the server needs to answer everything but reads. */
export interface FuseListing {
  /** in ms since the epoch: every file's and directory's mtime, atime and ctime */
  mtimeMs: number;
  /** FUSE paths ('/a/b.img'); READ names a file by its index here */
  files: Array<{ path: string; size: number; mode: number }>;
  /** FUSE path of each directory ('/' included) → the names in it */
  dirs: Array<[string, string[]]>;
}

export function header(type: Frame, id: number, payloadBytes: number): Buffer {
  const b = Buffer.allocUnsafe(HEADER_BYTES);
  b.writeUInt32LE(payloadBytes + 5, 0);
  b.writeUInt8(type, 4);
  b.writeUInt32LE(id, 5);
  return b;
}

/** A whole small frame (everything but DATA, whose bytes are written after their header). */
export function frame(type: Frame, id: number, payload?: Buffer): Buffer {
  const h = header(type, id, payload?.length ?? 0);
  return payload?.length ? Buffer.concat([h, payload]) : h;
}

export function readRequest(id: number, file: number, offset: number, length: number, slot: number): Buffer {
  const b = Buffer.allocUnsafe(HEADER_BYTES + READ_PAYLOAD_BYTES);
  b.writeUInt32LE(5 + READ_PAYLOAD_BYTES, 0);
  b.writeUInt8(Frame.READ, 4);
  b.writeUInt32LE(id, 5);
  b.writeUInt32LE(file, 9);
  b.writeDoubleLE(offset, 13);
  b.writeUInt32LE(length, 21);
  b.writeUInt32LE(slot, 25);
  return b;
}

export function parseReadRequest(payload: Buffer): { file: number; offset: number; length: number; slot: number } {
  if (payload.length !== READ_PAYLOAD_BYTES) throw new WireError(`a READ of ${payload.length} bytes`);
  return { file: payload.readUInt32LE(0), offset: payload.readDoubleLE(4), length: payload.readUInt32LE(12), slot: payload.readUInt32LE(16) };
}

/** in bytes: one run of a RESIDENT frame */
const RESIDENT_RUN_BYTES = 24;

export function residentFrame(runs: readonly ResidentRun[]): Buffer {
  const b = Buffer.allocUnsafe(HEADER_BYTES + 4 + runs.length * RESIDENT_RUN_BYTES);
  b.writeUInt32LE(5 + 4 + runs.length * RESIDENT_RUN_BYTES, 0);
  b.writeUInt8(Frame.RESIDENT, 4);
  b.writeUInt32LE(0, 5);
  b.writeUInt32LE(runs.length, 9);
  let at = 13;
  for (const r of runs) {
    b.writeUInt32LE(r.file, at);
    b.writeDoubleLE(r.offset, at + 4);
    b.writeUInt32LE(r.length, at + 12);
    b.writeDoubleLE(r.at, at + 16);
    at += RESIDENT_RUN_BYTES;
  }
  return b;
}

/** The runs of a RESIDENT frame; throws WireError on one that is not whole integers ≥ 0 below 2^53. */
export function parseResident(payload: Buffer): ResidentRun[] {
  const n = payload.length >= 4 ? payload.readUInt32LE(0) : -1;
  if (n < 0 || payload.length !== 4 + n * RESIDENT_RUN_BYTES) throw new WireError(`a RESIDENT of ${payload.length} bytes`);
  const out: ResidentRun[] = [];
  for (let i = 0, at = 4; i < n; i++, at += RESIDENT_RUN_BYTES) {
    const r = { file: payload.readUInt32LE(at), offset: payload.readDoubleLE(at + 4), length: payload.readUInt32LE(at + 12), at: payload.readDoubleLE(at + 16) };
    if (!Number.isSafeInteger(r.offset) || r.offset < 0 || !Number.isSafeInteger(r.at) || r.at < 0) throw new WireError(`a resident run at ${r.offset} (store ${r.at})`);
    out.push(r);
  }
  return out;
}

export function warmedFrame(done: number, failed: number): Buffer {
  const b = Buffer.allocUnsafe(HEADER_BYTES + 16);
  b.writeUInt32LE(5 + 16, 0);
  b.writeUInt8(Frame.WARMED, 4);
  b.writeUInt32LE(0, 5);
  b.writeDoubleLE(done, 9);
  b.writeDoubleLE(failed, 17);
  return b;
}

export function parseWarmed(payload: Buffer): { done: number; failed: number } {
  if (payload.length !== 16) throw new WireError(`a WARMED of ${payload.length} bytes`);
  return { done: payload.readDoubleLE(0), failed: payload.readDoubleLE(8) };
}

export function placedReply(id: number, bytes: number): Buffer {
  return reply(Frame.PLACED, id, bytes);
}

export function errorReply(id: number, errno: number): Buffer {
  return reply(Frame.ERROR, id, errno);
}

/** A frame of one 32-bit value (PLACED: bytes, ERROR: -errno). */
function reply(type: number, id: number, value: number): Buffer {
  const b = Buffer.allocUnsafe(HEADER_BYTES + 4);
  b.writeUInt32LE(5 + 4, 0);
  b.writeUInt8(type, 4);
  b.writeUInt32LE(id, 5);
  b.writeInt32LE(value, 9);
  return b;
}

export class WireError extends Error {
  constructor(message: string) {
    super(`image mount wire: ${message}`);
    this.name = 'WireError';
  }
}

export interface FrameSink {
  /**
   * A frame's header arrived: return a buffer of at least `bytes` to copy its payload straight
   * into (the server puts DATA into libfuse's own buffer this way), or nothing to have it
   * collected. May throw (WireError) to refuse it.
   */
  target?(type: number, id: number, bytes: number): Buffer | undefined;
  /** A whole frame; `payload` is the target's first `bytes` when one was given. */
  frame(type: number, id: number, payload: Buffer): void;
}

/**
 * Cuts a byte stream into frames. A payload that arrives whole in one chunk is passed as a view
 * of it (no copy); one split across chunks is copied once, into the sink's target or a buffer
 * of its own. Throws WireError on a malformed stream; the stream is then unusable.
 */
export class FrameReader {
  private readonly head = Buffer.alloc(HEADER_BYTES);
  private headGot = 0;
  private type = 0;
  private id = 0;
  private body: Buffer | undefined;
  private bodyBytes = 0;
  private bodyGot = 0;

  constructor(private readonly sink: FrameSink) {}

  /** Whether the stream ended between frames. */
  get idle(): boolean {
    return this.headGot === 0;
  }

  push(chunk: Buffer): void {
    let at = 0;
    while (at < chunk.length) {
      if (this.headGot < HEADER_BYTES) {
        const n = Math.min(HEADER_BYTES - this.headGot, chunk.length - at);
        chunk.copy(this.head, this.headGot, at, at + n);
        this.headGot += n;
        at += n;
        if (this.headGot < HEADER_BYTES) return;
        const length = this.head.readUInt32LE(0);
        if (length < 5 || length - 5 > MAX_PAYLOAD_BYTES) throw new WireError(`a frame of ${length} bytes`);
        this.type = this.head.readUInt8(4);
        this.id = this.head.readUInt32LE(5);
        this.bodyBytes = length - 5;
        this.bodyGot = 0;
        const target = this.sink.target?.(this.type, this.id, this.bodyBytes);
        if (target && target.length < this.bodyBytes) throw new WireError(`${this.bodyBytes} bytes for a buffer of ${target.length}`);
        if (target) this.body = target;
        else if (chunk.length - at >= this.bodyBytes) {
          // the whole payload is here: a view, no copy (each chunk a socket reads is fresh)
          this.body = chunk.subarray(at, at + this.bodyBytes);
          this.bodyGot = this.bodyBytes;
          at += this.bodyBytes;
        } else this.body = Buffer.allocUnsafe(this.bodyBytes);
      }
      if (this.bodyGot < this.bodyBytes) {
        const n = Math.min(this.bodyBytes - this.bodyGot, chunk.length - at);
        chunk.copy(this.body!, this.bodyGot, at, at + n);
        this.bodyGot += n;
        at += n;
        if (this.bodyGot < this.bodyBytes) return;
      }
      const body = this.body!;
      this.body = undefined;
      this.headGot = 0;
      this.sink.frame(this.type, this.id, body.length === this.bodyBytes ? body : body.subarray(0, this.bodyBytes));
    }
  }
}
