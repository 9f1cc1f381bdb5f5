/*
 * A real S3 API server for tests and benchmarks: s3rver 3.7.1 (npm, pure JS, runs on Node 20) in
 * a child process, listening on 127.0.0.1 port 0, storing into a temp directory.
 *
 *   const s3 = await startS3Server();             // bucket "pico" exists
 *   new S3ObjectStore({ endpoint: s3.endpoint, region: s3.region, bucket: s3.bucket,
 *                       pathStyle: true, credentials: s3.credentials });
 *   await s3.stop();                               // kills the child, removes its directory
 *
 * A child process, not the test's own: the server's disk I/O and request handling must not
 * share the event loop whose timing the tests and benchmarks measure, and a stop is a clean kill.
 * The child also exits when its parent goes away (its stdin closes).
 *
 * s3rver is a fake S3 and cuts corners that real S3 does not. Two are fixed here, in the child,
 * so the ObjectStore contract can be tested against it with S3's semantics (set `faithful: false`
 * to get plain s3rver):
 * - Writes are atomic. s3rver writes an object in place (a concurrent GET can read a prefix),
 *   answers the PUT before the file is flushed, stores a body cut short by a dropped connection,
 *   and removes empty directories racing with writes into them. Here a body is written to a
 *   staging file and checked against Content-Length, then moved into place (rename) under one
 *   lock that also covers deletes, GET's open and listings: each object operation is atomic, as
 *   S3 promises since 2020.
 * - Conditional creates: `PUT` with `If-None-Match: *` answers 412 PreconditionFailed when the
 *   key exists (atomically, under the same lock), as AWS S3 does since 2024-08. s3rver ignores
 *   the header.
 * One fix is always applied: s3rver makes ListObjectsV2 continuation tokens with single DES,
 * which OpenSSL 3 (Node >= 17) no longer has, so every listing that needs a second page fails
 * with 500. Here its 'des' cipher calls are mapped to AES-128-CBC (the tokens are opaque and
 * only this process reads them back).
 * Credentials: s3rver knows one access key id, S3RVER (secret S3RVER); any other key id gets
 * 403 InvalidAccessKeyId. It does not verify SigV4 signatures, so a wrong secret goes unnoticed.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { AsyncLocalStorage } from 'node:async_hooks';
import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream, mkdtempSync, rmSync } from 'node:fs';
import { mkdir, rename, stat, unlink, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';

export interface S3ServerOptions {
  /** Buckets to create. Default ['pico']. */
  buckets?: string[];
  /** Atomic writes and If-None-Match (see above). Default true. */
  faithful?: boolean;
  /** Where the objects go. Default a new temp directory, removed by stop(). */
  directory?: string;
}

export interface S3TestServer {
  /** http://127.0.0.1:PORT */
  endpoint: string;
  port: number;
  region: string;
  /** the first bucket */
  bucket: string;
  credentials: { accessKeyId: string; secretAccessKey: string };
  directory: string;
  /** the child's pid */
  pid: number;
  stop(): Promise<void>;
}

export const S3_TEST_CREDENTIALS = Object.freeze({ accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' });

const self = fileURLToPath(import.meta.url);

export async function startS3Server(options: S3ServerOptions = {}): Promise<S3TestServer> {
  const buckets = options.buckets ?? ['pico'];
  const ownDir = options.directory === undefined;
  const directory = options.directory ?? mkdtempSync(path.join(tmpdir(), 'pico-s3rver-'));
  const child = spawn(process.execPath, [self, '--serve', JSON.stringify({ buckets, faithful: options.faithful ?? true, directory })], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const cleanupDir = () => {
    if (ownDir) rmSync(directory, { recursive: true, force: true });
  };
  let port: number;
  try {
    port = await new Promise<number>((resolve, reject) => {
      let out = '';
      const onData = (d: Buffer) => {
        out += d.toString();
        const nl = out.indexOf('\n');
        if (nl < 0) return;
        child.stdout!.off('data', onData);
        try {
          resolve((JSON.parse(out.slice(0, nl)) as { port: number }).port);
        } catch (err) {
          reject(new Error(`s3rver child said ${JSON.stringify(out)}: ${String(err)}`));
        }
      };
      child.stdout!.on('data', onData);
      child.once('exit', (code, signal) => reject(new Error(`s3rver child exited (${code ?? signal}) before listening`)));
      child.once('error', reject);
    });
  } catch (err) {
    child.kill('SIGKILL');
    cleanupDir();
    throw err;
  }
  let stopping: Promise<void> | undefined;
  return {
    endpoint: `http://127.0.0.1:${port}`,
    port,
    region: 'us-east-1',
    bucket: buckets[0]!,
    credentials: { ...S3_TEST_CREDENTIALS },
    directory,
    pid: child.pid!,
    stop: () => (stopping ??= stopChild(child).finally(cleanupDir)),
  };
}

function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill('SIGTERM');
  });
}

// ---- the child ---------------------------------------------------------------------------

/** The parts of s3rver this file touches (it ships no types). */
interface S3rverStore {
  rootDirectory: string;
  getResourcePath(bucket: string, key: string | undefined, resource: string): string;
  getObject(bucket: string, key: string, options?: unknown): Promise<unknown>;
  putObject(object: { bucket: string; key: string; content: NodeJS.ReadableStream | Buffer; metadata: Record<string, string> }): Promise<{ size: number; md5: string }>;
  deleteObject(bucket: string, key: string): Promise<void>;
  listObjects(bucket: string, options: unknown): Promise<unknown>;
}

async function serve(config: { buckets: string[]; faithful: boolean; directory: string }): Promise<void> {
  const require = createRequire(import.meta.url);
  const crypto = require('node:crypto') as typeof import('node:crypto');
  const { createCipheriv, createDecipheriv } = crypto;
  const widen = (b: Buffer) => Buffer.concat([b, b]);
  // s3rver's bucket controller looks these up at call time: its tokens use 'des' (see above).
  Object.assign(crypto, {
    createCipheriv: (alg: string, key: Buffer, iv: Buffer, ...rest: []) =>
      alg === 'des' ? createCipheriv('aes-128-cbc', widen(key), widen(iv)) : createCipheriv(alg, key, iv, ...rest),
    createDecipheriv: (alg: string, key: Buffer, iv: Buffer, ...rest: []) =>
      alg === 'des' ? createDecipheriv('aes-128-cbc', widen(key), widen(iv)) : createDecipheriv(alg, key, iv, ...rest),
  });
  const S3rver = require('s3rver') as new (options: Record<string, unknown>) => {
    run(): Promise<{ port: number }>;
    middleware: Array<(ctx: unknown, next: () => Promise<void>) => Promise<void>>;
  };
  const FilesystemStore = require('s3rver/lib/stores/filesystem') as { prototype: S3rverStore };
  const S3Error = require('s3rver/lib/models/error') as new (code: string, message: string, detail?: Record<string, string>) => Error;

  const server = new S3rver({
    address: '127.0.0.1',
    port: 0,
    silent: true,
    directory: config.directory,
    configureBuckets: config.buckets.map((name) => ({ name })),
  });

  if (config.faithful) {
    const conditional = new AsyncLocalStorage<{ ifNoneMatch: boolean; contentLength: number | undefined }>();
    // First in the chain: remember what the store layer needs of the request's headers.
    server.middleware.unshift((ctx, next) => {
      const c = ctx as { method: string; get(h: string): string };
      const len = c.get('content-length');
      return conditional.run({ ifNoneMatch: c.method === 'PUT' && c.get('if-none-match') === '*', contentLength: len === '' ? undefined : Number(len) }, next);
    });

    // One lock for every step that changes or reads the namespace (renames, unlinks, open, walk).
    let tail: Promise<unknown> = Promise.resolve();
    const locked = <T>(fn: () => Promise<T>): Promise<T> => {
      const run = tail.then(fn, fn);
      tail = run.catch(() => {});
      return run;
    };
    const proto = FilesystemStore.prototype;
    const { getObject, deleteObject, listObjects } = proto;
    proto.getObject = function (this: S3rverStore, ...args) {
      return locked(() => getObject.apply(this, args));
    };
    proto.deleteObject = function (this: S3rverStore, ...args) {
      return locked(() => deleteObject.apply(this, args));
    };
    proto.listObjects = function (this: S3rverStore, ...args) {
      return locked(() => listObjects.apply(this, args));
    };
    const staging = path.join(config.directory, '.staging');
    await mkdir(staging, { recursive: true });
    const ALLOWED = ['cache-control', 'content-disposition', 'content-encoding', 'content-language', 'content-type', 'expires', 'x-amz-storage-class', 'x-amz-website-redirect-location'];
    proto.putObject = async function (this: S3rverStore, object) {
      const req = conditional.getStore();
      const tmp = path.join(staging, randomBytes(8).toString('hex'));
      const md5 = createHash('md5');
      let size = 0;
      try {
        const counter = new Transform({
          transform(chunk: Buffer, _enc, cb) {
            md5.update(chunk);
            size += chunk.length;
            cb(null, chunk);
          },
        });
        if (Buffer.isBuffer(object.content)) {
          md5.update(object.content);
          size = object.content.length;
          await writeFile(tmp, object.content);
        } else {
          await pipeline(object.content, counter, createWriteStream(tmp));
        }
        if (req?.contentLength !== undefined && req.contentLength !== size) {
          throw new S3Error('IncompleteBody', 'You did not provide the number of bytes specified by the Content-Length HTTP header.');
        }
        const digest = md5.digest('hex');
        const meta: Record<string, string> = {};
        for (const [k, v] of Object.entries(object.metadata)) if (ALLOWED.includes(k) || k.startsWith('x-amz-meta-')) meta[k] = v;
        const objectPath = this.getResourcePath(object.bucket, object.key, 'object');
        const metaTmp = `${tmp}.meta`;
        const md5Tmp = `${tmp}.md5`;
        await writeFile(metaTmp, JSON.stringify(meta, null, 2));
        await writeFile(md5Tmp, digest);
        await locked(async () => {
          if (req?.ifNoneMatch && (await stat(objectPath).then(() => true, () => false))) {
            throw new S3Error('PreconditionFailed', 'At least one of the pre-conditions you specified did not hold', { Condition: 'If-None-Match' });
          }
          await mkdir(path.dirname(objectPath), { recursive: true });
          await rename(metaTmp, this.getResourcePath(object.bucket, object.key, 'metadata.json'));
          await rename(md5Tmp, this.getResourcePath(object.bucket, object.key, 'object.md5'));
          await rename(tmp, objectPath);
        });
        return { size, md5: digest };
      } finally {
        for (const f of [tmp, `${tmp}.meta`, `${tmp}.md5`]) await unlink(f).catch(() => {});
      }
    };
  }

  const { port } = await server.run();
  process.stdout.write(`${JSON.stringify({ port })}\n`);
  // Nothing to flush: every write finished before its response was sent.
  const stop = () => process.exit(0);
  process.on('SIGTERM', stop);
  process.stdin.on('end', stop);
  process.stdin.on('close', stop);
  process.stdin.resume();
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href && process.argv[2] === '--serve') {
  serve(JSON.parse(process.argv[3]!)).catch((err: unknown) => {
    console.error('s3rver child failed:', err);
    process.exit(1);
  });
}
