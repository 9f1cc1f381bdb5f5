/*
 * The `fs` ObjectStore: objects are files under a root directory, a key's '/' segments are its
 * subdirectories. The default page store.
 *
 * Atomic write, in this order:
 *   1. create ROOT/dir/.pico-tmp-<random>-<name> exclusively (O_EXCL), write the whole body
 *   2. fsync it                                   (durable)
 *   3. rename over ROOT/dir/<name>                or, exclusive: link() to it (fails with EEXIST
 *                                                  if the key exists), then unlink the temp name
 *   4. fsync ROOT/dir, so the new name survives a crash   (durable)
 * A reader opens either the old file or the new one, never a partial one. A crash between 1 and
 * 3 leaves a temp file that `list` never shows; `removeStaleTemp` deletes such leftovers.
 *
 * Every failure is a StoreError (PICO_ERR_STORE) whose message names the path and errno
 * (EACCES, ENOSPC, EROFS, ENOTDIR...); an absent object is ObjectNotFoundError.
 */
import { randomBytes } from 'node:crypto';
import { link, mkdir, open, readdir, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import {
  checkKey,
  ObjectExistsError,
  ObjectNotFoundError,
  StoreError,
  TEMP_PREFIX,
  type ObjectInfo,
  type ObjectStore,
  type PutOptions,
} from './object-store.js';

export interface FsObjectStoreOptions {
  /** The directory holding the objects; created (with its parents) on the first write. */
  root: string;
  /**
   * fsync each object and its directory before `put` resolves. Default true. false is faster
   * and fine for tests and benchmarks, but a machine crash may then lose recent writes.
   */
  durable?: boolean;
}

/** errno codes that mean "this path names no file" when reading. */
const ABSENT = new Set(['ENOENT', 'ENOTDIR', 'EISDIR']);

function errnoOf(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

export class FsObjectStore implements ObjectStore {
  readonly root: string;
  readonly location: string;
  private readonly durable: boolean;

  constructor(options: FsObjectStoreOptions) {
    this.root = path.resolve(options.root);
    this.location = `fs:${this.root}`;
    this.durable = options.durable ?? true;
  }

  /** The file that holds `key` (the key is checked first). */
  pathOf(key: string, op = 'resolve'): string {
    checkKey(key, op);
    return path.join(this.root, ...key.split('/'));
  }

  async put(key: string, body: Buffer, options: PutOptions = {}): Promise<void> {
    const file = this.pathOf(key, 'put');
    const dir = path.dirname(file);
    const tmp = path.join(dir, `${TEMP_PREFIX}${randomBytes(6).toString('hex')}-${path.basename(file)}`);
    let step = tmp;
    let tmpCreated = false;
    try {
      let fh;
      try {
        fh = await open(tmp, 'wx', 0o644);
      } catch (err) {
        if (errnoOf(err) !== 'ENOENT') throw err;
        step = dir;
        await mkdirs(dir);
        step = tmp;
        fh = await open(tmp, 'wx', 0o644);
      }
      tmpCreated = true;
      try {
        await fh.writeFile(body);
        if (this.durable) await fh.sync();
      } finally {
        await fh.close();
      }
      step = file;
      if (options.exclusive) {
        try {
          await link(tmp, file);
        } catch (err) {
          if (errnoOf(err) === 'EEXIST') throw new ObjectExistsError(key, this.location);
          throw err;
        }
        await unlink(tmp).catch(() => {});
      } else {
        await rename(tmp, file);
      }
      tmpCreated = false;
      if (this.durable) {
        step = dir;
        await syncDir(dir);
      }
    } catch (err) {
      if (tmpCreated) await unlink(tmp).catch(() => {});
      if (err instanceof ObjectExistsError) throw err;
      throw this.fail('put', key, step, err);
    }
  }

  async get(key: string, into?: Buffer): Promise<Buffer> {
    const file = this.pathOf(key, 'get');
    let fh: FileHandle | undefined;
    try {
      fh = await open(file, 'r');
      const st = await fh.stat();
      if (!st.isFile()) throw Object.assign(new Error(`EISDIR: not a file, open '${file}'`), { code: 'EISDIR' });
      const buf = into && into.length >= st.size ? into.subarray(0, st.size) : Buffer.allocUnsafe(st.size);
      let got = 0;
      while (got < buf.length) {
        const { bytesRead } = await fh.read(buf, got, buf.length - got, got);
        if (bytesRead === 0) break;
        got += bytesRead;
      }
      return got === buf.length ? buf : buf.subarray(0, got);
    } catch (err) {
      if (ABSENT.has(errnoOf(err) ?? '')) throw new ObjectNotFoundError(key, this.location, { cause: err });
      throw this.fail('get', key, file, err);
    } finally {
      await fh?.close().catch(() => {});
    }
  }

  async head(key: string): Promise<ObjectInfo | undefined> {
    const file = this.pathOf(key, 'head');
    try {
      const st = await stat(file);
      return st.isFile() ? { size: st.size, lastModified: st.mtimeMs } : undefined;
    } catch (err) {
      if (ABSENT.has(errnoOf(err) ?? '')) return undefined;
      throw this.fail('head', key, file, err);
    }
  }

  async *list(prefix: string): AsyncIterable<string> {
    // Walk only the directory the prefix's complete segments name; filter by the rest.
    const cut = prefix.lastIndexOf('/');
    const base = cut < 0 ? '' : prefix.slice(0, cut);
    if (base !== '') checkKey(base, 'list');
    yield* this.walk(base, prefix);
  }

  private async *walk(dirKey: string, prefix: string): AsyncIterable<string> {
    const dir = dirKey === '' ? this.root : path.join(this.root, ...dirKey.split('/'));
    let entries;
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch (err) {
      if (ABSENT.has(errnoOf(err) ?? '')) return;
      throw this.fail('list', prefix, dir, err);
    }
    for (const e of entries) {
      if (e.name.startsWith(TEMP_PREFIX)) continue;
      const key = dirKey === '' ? e.name : `${dirKey}/${e.name}`;
      if (e.isDirectory()) {
        const asDir = `${key}/`;
        if (asDir.startsWith(prefix) || prefix.startsWith(asDir)) yield* this.walk(key, prefix);
      } else if (e.isFile() && key.startsWith(prefix)) {
        yield key;
      }
    }
  }

  async delete(key: string): Promise<void> {
    const file = this.pathOf(key, 'delete');
    try {
      await unlink(file);
    } catch (err) {
      const code = errnoOf(err);
      if (code === 'ENOENT' || code === 'ENOTDIR') return;
      throw this.fail('delete', key, file, err);
    }
  }

  /**
   * Deletes temp files that writes interrupted by a crash left behind, if older than
   * `olderThanMs` (so that writes in flight are never touched). Returns how many it removed.
   */
  async removeStaleTemp(olderThanMs = 3_600_000): Promise<number> {
    const cutoff = Date.now() - olderThanMs;
    let removed = 0;
    const visit = async (dir: string): Promise<void> => {
      let entries;
      try {
        entries = await readdir(dir, { withFileTypes: true });
      } catch (err) {
        if (ABSENT.has(errnoOf(err) ?? '')) return;
        throw this.fail('list', undefined, dir, err);
      }
      for (const e of entries) {
        const p = path.join(dir, e.name);
        if (e.isDirectory()) await visit(p);
        else if (e.name.startsWith(TEMP_PREFIX)) {
          const st = await stat(p).catch(() => undefined);
          if (st && st.mtimeMs < cutoff && (await unlink(p).then(() => true, () => false))) removed++;
        }
      }
    };
    await visit(this.root);
    return removed;
  }

  private fail(op: string, key: string | undefined, file: string, err: unknown): StoreError {
    if (err instanceof StoreError) return err;
    const errno = errnoOf(err);
    const what = err instanceof Error ? err.message : String(err);
    return new StoreError(op, key, `${this.location}: cannot ${op} ${key ?? file} (${file}): ${what}`, { cause: err, errno });
  }
}

/**
 * mkdir -p that reports the real errno: Node's recursive mkdir turns e.g. EROFS into ENOENT.
 * A directory that exists already (made by a concurrent put) is fine.
 */
async function mkdirs(dir: string): Promise<void> {
  try {
    await mkdir(dir);
  } catch (err) {
    const code = errnoOf(err);
    if (code === 'EEXIST') return;
    if (code !== 'ENOENT' || path.dirname(dir) === dir) throw err;
    await mkdirs(path.dirname(dir));
    try {
      await mkdir(dir);
    } catch (err2) {
      if (errnoOf(err2) !== 'EEXIST') throw err2;
    }
  }
}

async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
