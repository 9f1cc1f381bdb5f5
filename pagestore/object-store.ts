/*
 * ObjectStore: the one small interface the page store needs from where bytes live. Backends: `fs`
 * (a local directory, fs-store.ts), `s3` (later), and an in-memory fake for unit tests
 * (memory-store.ts). Everything above it (the chunked image format, caches, ActiveSets) is
 * written against this interface only.
 *
 * Contract every backend keeps:
 * - Keys are '/'-separated relative paths: no empty, '.' or '..' segment, no leading '/', no NUL
 *   or backslash, and no segment starting with TEMP_PREFIX (reserved for in-progress writes).
 *   `checkKey` enforces it; a bad key rejects with PICO_ERR_STORE before any I/O.
 * - `put` is atomic: a reader sees either no object or the whole new one, never a prefix. With
 *   `{ exclusive: true }` it creates the object only if the key is absent and otherwise rejects
 *   with ObjectExistsError, atomically (two writers racing for one key: exactly one wins).
 * - `get` of an absent key rejects with ObjectNotFoundError (code PICO_ERR_IMAGE_MISSING: every
 *   object in the page store is part of an image). Other failures reject with StoreError
 *   (PICO_ERR_STORE) carrying the operation, key and errno.
 * - `head` resolves undefined for an absent key; `lastModified` (ms since the epoch) is when the
 *   object was last written — the garbage collector's grace period is measured against it.
 * - `list(prefix)` yields every key that starts with `prefix` (plain string prefix, like S3), in
 *   no particular order, each once. Objects written or deleted during a listing may or may not
 *   appear. In-progress writes never appear.
 * - `delete` of an absent key resolves (deletes are idempotent).
 */
import { PicoError } from '../shared/errors.js';

export interface ObjectInfo {
  /** in bytes */
  size: number;
  /** ms since the epoch */
  lastModified: number;
}

export interface PutOptions {
  /** Create only: reject with ObjectExistsError if the key exists (the check and the write are one atomic step). */
  exclusive?: boolean;
}

export interface ObjectStore {
  /** The store is done with `body` once the returned promise resolves; the caller may reuse it. */
  put(key: string, body: Buffer, options?: PutOptions): Promise<void>;
  /**
   * The object's bytes. With `into` large enough, a backend may read them into it and return a
   * view of it (callers that reuse buffers avoid fresh allocations); it may also ignore `into`.
   */
  get(key: string, into?: Buffer): Promise<Buffer>;
  /**
   * The object's bytes as they arrive, for a reader that can use them before the last one is in
   * (a restore pack, decoded while it downloads). Resolves once the store answered; rejects as
   * get() does when the object cannot be had. A failure after that is thrown by the iteration
   * and not retried. Optional: getStreamed() falls back to get().
   */
  getStream?(key: string): Promise<AsyncIterable<Buffer>>;
  head(key: string): Promise<ObjectInfo | undefined>;
  list(prefix: string): AsyncIterable<string>;
  delete(key: string): Promise<void>;
  /** For messages: where this store is, e.g. `fs:/var/lib/picocenter/images`. */
  readonly location: string;
}

/** store.getStream(key) when the store streams, else get(key) as one piece. */
export async function getStreamed(store: ObjectStore, key: string): Promise<AsyncIterable<Buffer> | Buffer> {
  return store.getStream ? store.getStream(key) : store.get(key);
}

/** Names of in-progress writes start with this; no key segment may. */
export const TEMP_PREFIX = '.pico-tmp-';

/** A store operation failed (unwritable, full, unreachable...): PICO_ERR_STORE. */
export class StoreError extends PicoError {
  /** the operation: put, get, head, list, delete */
  readonly op: string;
  readonly key: string | undefined;
  /** the system error code when there is one: EACCES, ENOSPC, EROFS... */
  readonly errno: string | undefined;
  constructor(op: string, key: string | undefined, message: string, options?: { cause?: unknown; errno?: string }) {
    super('PICO_ERR_STORE', message, options);
    this.name = 'StoreError';
    this.op = op;
    this.key = key;
    this.errno = options?.errno;
  }
}

/** The key names no object. */
export class ObjectNotFoundError extends PicoError {
  readonly key: string;
  constructor(key: string, location: string, options?: { cause?: unknown }) {
    super('PICO_ERR_IMAGE_MISSING', `no object ${key} in ${location}`, options);
    this.name = 'ObjectNotFoundError';
    this.key = key;
  }
}

/** An exclusive put found the key taken. */
export class ObjectExistsError extends PicoError {
  readonly key: string;
  constructor(key: string, location: string, options?: { cause?: unknown }) {
    super('PICO_ERR_STORE', `object ${key} already exists in ${location}`, options);
    this.name = 'ObjectExistsError';
    this.key = key;
  }
}

export function isNotFound(err: unknown): err is ObjectNotFoundError {
  return err instanceof ObjectNotFoundError;
}

const BAD_KEY_CHARS = /[\0\\]/;

/** Throws StoreError unless `key` is a valid object key (see the contract above). */
export function checkKey(key: string, op: string): void {
  const bad = (why: string): never => {
    throw new StoreError(op, key, `invalid object key ${JSON.stringify(key)}: ${why}`);
  };
  if (typeof key !== 'string' || key.length === 0) bad('empty');
  if (key.length > 1024) bad('longer than 1024 characters');
  if (BAD_KEY_CHARS.test(key)) bad('contains NUL or backslash');
  if (key.startsWith('/')) bad('absolute');
  for (const seg of key.split('/')) {
    if (seg === '') bad('empty segment');
    if (seg === '.' || seg === '..') bad(`"${seg}" segment`);
    if (seg.startsWith(TEMP_PREFIX)) bad(`segment starts with the reserved ${TEMP_PREFIX}`);
  }
}

/** Collects an AsyncIterable (e.g. `list`) into an array. */
export async function collect<T>(items: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of items) out.push(x);
  return out;
}
