/*
 * An in-memory ObjectStore for unit tests, with fault injection. It keeps the same contract as
 * the real backends (atomic puts, copies in and out, ObjectNotFoundError, exclusive puts), so a
 * test suite written against it runs unchanged against FsObjectStore.
 *
 * Faults:
 *   failNext('put', 2)         the next 2 puts reject with StoreError (errno EIO by default)
 *   readOnly = true            every put and delete rejects with StoreError EROFS
 *   corrupt(key)               flips one byte of a stored object
 *   remove(key)                deletes an object behind the store's users' backs
 *   hook = async (op, key) =>  runs before every operation: pause, count, or throw
 */
import {
  checkKey,
  ObjectExistsError,
  ObjectNotFoundError,
  StoreError,
  type ObjectInfo,
  type ObjectStore,
  type PutOptions,
} from './object-store.js';

export type StoreOp = 'put' | 'get' | 'head' | 'list' | 'delete';

export interface MemoryObjectStoreOptions {
  /** The clock that stamps lastModified (ms). Default Date.now. */
  now?: () => number;
}

interface Entry {
  body: Buffer;
  lastModified: number;
}

let instances = 0;

export class MemoryObjectStore implements ObjectStore {
  /** `memory:<n>`, distinct per instance */
  readonly location = `memory:${++instances}`;
  /** Every put and delete rejects with EROFS while set. */
  readOnly = false;
  /** Runs before every operation (after the key is checked); may await or throw. */
  hook: ((op: StoreOp, key: string) => void | Promise<void>) | undefined;
  /** Operation counters and bytes moved, for assertions. */
  readonly counts: Record<StoreOp, number> = { put: 0, get: 0, head: 0, list: 0, delete: 0 };
  bytesPut = 0;
  bytesGot = 0;

  private readonly objects = new Map<string, Entry>();
  private readonly failures = new Map<StoreOp, Array<() => Error>>();
  private readonly now: () => number;

  constructor(options: MemoryObjectStoreOptions = {}) {
    this.now = options.now ?? Date.now;
  }

  /** The next `count` calls of `op` reject with `error()` (default: a StoreError with errno EIO). */
  failNext(op: StoreOp, count = 1, error?: () => Error): void {
    const make = error ?? (() => new StoreError(op, undefined, `${this.location} injected ${op} failure (EIO)`, { errno: 'EIO' }));
    const queue = this.failures.get(op) ?? [];
    for (let i = 0; i < count; i++) queue.push(make);
    this.failures.set(op, queue);
  }

  /** Flips one byte (default: the middle one) of the object at `key`. */
  corrupt(key: string, offset?: number): void {
    const e = this.objects.get(key);
    if (!e || e.body.length === 0) throw new Error(`memory store: nothing to corrupt at ${key}`);
    const at = offset ?? e.body.length >> 1;
    const body = Buffer.from(e.body);
    body[at] = body[at]! ^ 0xff;
    e.body = body;
  }

  /** Replaces an object's bytes without any checks (e.g. garbage in a manifest). */
  overwrite(key: string, body: Buffer, lastModified = this.now()): void {
    this.objects.set(key, { body: Buffer.from(body), lastModified });
  }

  /** Deletes an object without going through the hooks or faults. */
  remove(key: string): boolean {
    return this.objects.delete(key);
  }

  /** Sets an object's lastModified, e.g. to age it past a grace period. */
  touch(key: string, lastModified: number): void {
    const e = this.objects.get(key);
    if (!e) throw new Error(`memory store: no object ${key}`);
    e.lastModified = lastModified;
  }

  /** Every key, sorted. */
  keys(): string[] {
    return [...this.objects.keys()].sort();
  }

  /** Total bytes stored. */
  get size(): number {
    let n = 0;
    for (const e of this.objects.values()) n += e.body.length;
    return n;
  }

  private async enter(op: StoreOp, key: string): Promise<void> {
    if (op !== 'list') checkKey(key, op);
    this.counts[op]++;
    await this.hook?.(op, key);
    const queue = this.failures.get(op);
    const fault = queue?.shift();
    if (fault) throw fault();
    if (this.readOnly && (op === 'put' || op === 'delete')) {
      throw new StoreError(op, key, `${this.location} cannot ${op} ${key}: read-only (EROFS)`, { errno: 'EROFS' });
    }
  }

  async put(key: string, body: Buffer, options: PutOptions = {}): Promise<void> {
    await this.enter('put', key);
    if (options.exclusive && this.objects.has(key)) throw new ObjectExistsError(key, this.location);
    this.objects.set(key, { body: Buffer.from(body), lastModified: this.now() });
    this.bytesPut += body.length;
  }

  async get(key: string, into?: Buffer): Promise<Buffer> {
    await this.enter('get', key);
    const e = this.objects.get(key);
    if (!e) throw new ObjectNotFoundError(key, this.location);
    this.bytesGot += e.body.length;
    if (into && into.length >= e.body.length) {
      e.body.copy(into);
      return into.subarray(0, e.body.length);
    }
    return Buffer.from(e.body);
  }

  async head(key: string): Promise<ObjectInfo | undefined> {
    await this.enter('head', key);
    const e = this.objects.get(key);
    return e && { size: e.body.length, lastModified: e.lastModified };
  }

  async *list(prefix: string): AsyncIterable<string> {
    await this.enter('list', prefix);
    // A snapshot, like one page of an S3 listing.
    const keys = [...this.objects.keys()].filter((k) => k.startsWith(prefix));
    yield* keys;
  }

  async delete(key: string): Promise<void> {
    await this.enter('delete', key);
    this.objects.delete(key);
  }
}
