/*
 * The `s3` ObjectStore: objects are S3 objects `<prefix><key>` in one bucket, through
 * @aws-sdk/client-s3 (v3). Works against AWS S3 and S3-compatible servers (path-style for most of
 * the latter). Credentials come from the SDK's standard chain unless given.
 *
 * How the contract maps onto S3:
 * - put    PutObject: atomic by S3 semantics (a reader sees the old or the new object, never a
 *          prefix). Exclusive: HeadObject first (rejects the common case even on servers that
 *          ignore conditional writes), then PutObject with `If-None-Match: *`, which AWS S3 (since
 *          2024-08) and current S3-compatible servers evaluate atomically: 412 → ObjectExistsError.
 *          A server that ignores the header leaves a race between the head and the put (two
 *          writers racing for one key may both "win"; the later one's bytes stay).
 *          `conditionalWrites: false` drops the header for servers that reject it.
 * - get    GetObject; the body is read fully (into the caller's buffer when it is large enough)
 *          and its length checked against Content-Length. NoSuchKey → ObjectNotFoundError.
 * - head   HeadObject; 404 → undefined. A HEAD response has no body, so "no such bucket" looks
 *          like "no such key": the first 404 makes one HeadBucket, and a missing bucket rejects.
 * - list   ListObjectsV2, page by page (1000 keys), keys with the prefix cut off.
 * - delete DeleteObject (S3 deletes are idempotent).
 *
 * Retries, here and not in the SDK (the client runs with maxAttempts 1): a GetObject resolves at
 * the response head, and a connection that drops while the body streams fails outside the SDK's
 * retry loop. So one loop covers each whole operation (request + body):
 *
 *   attempt ──ok──► done
 *      │ retryable: throttling (SlowDown, 429, 503), other 5xx, RequestTimeout, network errors
 *      │            (ECONNRESET, ECONNREFUSED, EPIPE, timeouts), a body shorter than announced
 *      ▼
 *   sleep random(0, min(maxDelay, base · 2^(attempt-1)))   full jitter; base ×5 when throttled
 *      └──► attempt again, at most `maxAttempts` in all; then StoreError (PICO_ERR_STORE)
 *
 * An exclusive put whose earlier attempt may have landed (the response was lost) and that then
 * gets 412 reads the object back: the same bytes mean it was ours, and the put succeeds.
 *
 * Connections are kept alive (one http/https Agent per store, `maxSockets` parallel requests),
 * `Expect: 100-continue` is off (bodies are chunks of a few MiB: the extra round trip costs more
 * than it saves), and the SDK's CRC32 request/response checksums are only used where S3 requires
 * them: every chunk and manifest is verified against its sha256 above this layer anyway.
 */
import http from 'node:http';
import https from 'node:https';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Readable } from 'node:stream';
import {
  DeleteObjectCommand,
  GetObjectCommand,
  type GetObjectCommandOutput,
  HeadBucketCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  type S3ClientConfig,
} from '@aws-sdk/client-s3';
import { NodeHttpHandler } from '@smithy/node-http-handler';
import { PicoError } from '../shared/errors.js';
import { silentLogger, type Logger } from '../shared/log.js';
import {
  checkKey,
  ObjectExistsError,
  ObjectNotFoundError,
  StoreError,
  type ObjectInfo,
  type ObjectStore,
  type PutOptions,
} from './object-store.js';

export interface S3ObjectStoreOptions {
  /** S3 API endpoint, e.g. http://127.0.0.1:9000. Default: AWS S3 for `region`. */
  endpoint?: string;
  region: string;
  /** The bucket; it must exist. */
  bucket: string;
  /**
   * Prepended to every key, e.g. `images/`. '' (default) uses the whole bucket. A non-empty prefix
   * without a trailing '/' gets one: `images` and `images/` are the same store.
   */
  prefix?: string;
  /** Path-style URLs (endpoint/bucket/key) instead of virtual-hosted (bucket.endpoint/key). Default false. */
  pathStyle?: boolean;
  /** Default: the SDK's standard chain (environment, shared config and credentials files, SSO, web identity, ECS/EC2 roles). */
  credentials?: S3ClientConfig['credentials'];
  /** Attempts per operation, retries included; 1 = no retries. Default 5. */
  maxAttempts?: number;
  /** Backoff before the first retry is random(0, this); it doubles per retry (×5 when throttled). Default 100 ms. */
  retryBaseDelayMs?: number;
  /** The most one backoff sleeps. Default 5000 ms. */
  retryMaxDelayMs?: number;
  /** Uniform [0, 1) source for the jitter, for tests. Default Math.random. */
  random?: () => number;
  /** Requests in flight at once per store (keep-alive sockets). Default 64. */
  maxSockets?: number;
  /** Connecting may take this long (then the attempt fails and is retried). Default 5000 ms; 0 = none. */
  connectTimeoutMs?: number;
  /** A request whose socket is silent this long (no bytes either way) fails and is retried. Default 30000 ms; 0 = none. */
  idleTimeoutMs?: number;
  /** Keys per ListObjectsV2 page (MaxKeys). Default 1000, S3's maximum. */
  listPageSize?: number;
  /** Send `If-None-Match: *` on exclusive puts. Default true; false for servers that reject the header. */
  conditionalWrites?: boolean;
  /** Retries are logged at debug level, giving up at warn. Default: silent. */
  log?: Logger;
  /** A ready client to use instead of building one (tests); it is not destroyed by close(). */
  client?: S3Client;
}

/** A failed S3 operation: a StoreError whose `errno` is the S3 error code (SlowDown, NoSuchBucket…) or the network error code. */
export class S3StoreError extends StoreError {
  /** HTTP status of the last response, when there was one */
  readonly httpStatus: number | undefined;
  /** attempts made, retries included */
  readonly attempts: number;
  /** the S3 request id of the last response, for the provider's support */
  readonly requestId: string | undefined;
  constructor(op: string, key: string | undefined, message: string, options: { cause?: unknown; errno?: string; httpStatus?: number; attempts: number; requestId?: string }) {
    super(op, key, message, options);
    this.name = 'S3StoreError';
    this.httpStatus = options.httpStatus;
    this.attempts = options.attempts;
    this.requestId = options.requestId;
  }
}

/** What one failed attempt was, for the retry decision and the message. */
interface Failure {
  /** S3 error code or system error code */
  code: string | undefined;
  status: number | undefined;
  retryable: boolean;
  throttled: boolean;
  requestId: string | undefined;
  message: string;
}

const THROTTLING_CODES = new Set([
  'SlowDown', 'Throttling', 'ThrottlingException', 'ThrottledException', 'RequestThrottled', 'RequestThrottledException',
  'TooManyRequests', 'TooManyRequestsException', 'RequestLimitExceeded', 'BandwidthLimitExceeded',
]);
/** S3 error codes worth another attempt that do not come with a 5xx status */
const TRANSIENT_CODES = new Set(['RequestTimeout', 'RequestTimeoutException', 'InternalError', 'ServiceUnavailable', 'OperationAborted', 'ConditionalRequestConflict']);
const NETWORK_CODES = new Set([
  'ECONNRESET', 'ECONNREFUSED', 'ECONNABORTED', 'EPIPE', 'ETIMEDOUT', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'ENETDOWN',
  'ERR_STREAM_PREMATURE_CLOSE', 'TimeoutError', 'TruncatedBody',
]);
const RETRYABLE_STATUS = new Set([429, 500, 502, 503, 504]);

function classify(err: unknown): Failure {
  const e = (err ?? {}) as { name?: unknown; code?: unknown; Code?: unknown; message?: unknown; $metadata?: { httpStatusCode?: number; requestId?: string }; $retryable?: { throttling?: boolean } };
  const status = e.$metadata?.httpStatusCode;
  const sysCode = typeof e.code === 'string' ? e.code : undefined;
  const name = typeof e.name === 'string' ? e.name : undefined;
  // Service errors carry the S3 code as their name; system errors as `code`.
  const code = status !== undefined ? (typeof e.Code === 'string' ? e.Code : name) : (sysCode ?? name);
  const throttled = THROTTLING_CODES.has(code ?? '') || status === 429 || status === 503 || e.$retryable?.throttling === true;
  const retryable =
    throttled ||
    (status !== undefined && RETRYABLE_STATUS.has(status)) ||
    TRANSIENT_CODES.has(code ?? '') ||
    NETWORK_CODES.has(code ?? '') ||
    NETWORK_CODES.has(sysCode ?? '') ||
    name === 'TimeoutError';
  const message = typeof e.message === 'string' && e.message !== '' && e.message !== 'UnknownError' ? e.message : String(code ?? err);
  return { code, status, retryable, throttled, requestId: e.$metadata?.requestId, message };
}

/** Hints for the failures an operator can fix. */
function hint(code: string | undefined): string {
  switch (code) {
    case 'NoSuchBucket':
      return ' (the bucket must exist: create it, or fix store.bucket)';
    case 'AccessDenied':
    case 'InvalidAccessKeyId':
    case 'SignatureDoesNotMatch':
    case 'ExpiredToken':
    case 'InvalidToken':
      return ' (check the credentials the SDK\'s standard chain finds, and the bucket policy)';
    case 'PermanentRedirect':
    case 'AuthorizationHeaderMalformed':
    case 'IllegalLocationConstraintException':
      return ' (the bucket is in another region: fix store.region)';
    case 'CredentialsProviderError':
      return ' (no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role)';
    default:
      return '';
  }
}

/** Normalises a configured prefix: '' or 'a/b/' (a valid key followed by '/'). */
function normalisePrefix(prefix: string | undefined): string {
  if (!prefix) return '';
  const p = prefix.endsWith('/') ? prefix : `${prefix}/`;
  try {
    checkKey(p.slice(0, -1), 'configure');
  } catch (err) {
    throw new PicoError('PICO_ERR_CONFIG', `store.prefix ${JSON.stringify(prefix)} is not a usable key prefix: ${(err as Error).message}`);
  }
  return p;
}

export class S3ObjectStore implements ObjectStore {
  readonly location: string;
  readonly bucket: string;
  /** '' or ending in '/' */
  readonly prefix: string;
  readonly client: S3Client;
  /** Counters for tests and metrics: requests sent (attempts), retries among them, throttled responses. */
  readonly stats = { requests: 0, retries: 0, throttled: 0 };

  private readonly ownsClient: boolean;
  private readonly maxAttempts: number;
  private readonly baseDelayMs: number;
  private readonly maxDelayMs: number;
  private readonly random: () => number;
  private readonly conditionalWrites: boolean;
  private readonly listPageSize: number;
  private readonly log: Logger;
  /** set once any response proved the bucket exists */
  private bucketSeen = false;

  constructor(options: S3ObjectStoreOptions) {
    this.bucket = options.bucket;
    this.prefix = normalisePrefix(options.prefix);
    this.location = `s3://${this.bucket}/${this.prefix}${options.endpoint ? ` at ${options.endpoint}` : ` in ${options.region}`}`;
    this.maxAttempts = options.maxAttempts ?? 5;
    this.baseDelayMs = options.retryBaseDelayMs ?? 100;
    this.maxDelayMs = options.retryMaxDelayMs ?? 5000;
    this.random = options.random ?? Math.random;
    this.conditionalWrites = options.conditionalWrites ?? true;
    this.listPageSize = options.listPageSize ?? 1000;
    this.log = options.log ?? silentLogger();
    if (!Number.isInteger(this.maxAttempts) || this.maxAttempts < 1) throw new RangeError(`maxAttempts must be a positive integer, got ${this.maxAttempts}`);
    if (options.client) {
      this.client = options.client;
      this.ownsClient = false;
    } else {
      const maxSockets = options.maxSockets ?? 64;
      this.client = new S3Client({
        region: options.region,
        ...(options.endpoint ? { endpoint: options.endpoint } : {}),
        forcePathStyle: options.pathStyle ?? false,
        ...(options.credentials ? { credentials: options.credentials } : {}),
        maxAttempts: 1, // retries are ours: see the comment at the top
        expectContinueHeader: false,
        requestChecksumCalculation: 'WHEN_REQUIRED',
        responseChecksumValidation: 'WHEN_REQUIRED',
        requestHandler: new NodeHttpHandler({
          httpAgent: new http.Agent({ keepAlive: true, maxSockets }),
          httpsAgent: new https.Agent({ keepAlive: true, maxSockets }),
          connectionTimeout: options.connectTimeoutMs ?? 5000,
          socketTimeout: options.idleTimeoutMs ?? 30_000,
        }),
      });
      this.ownsClient = true;
    }
  }

  private s3Key(key: string): string {
    return this.prefix + key;
  }

  async put(key: string, body: Buffer, options: PutOptions = {}): Promise<void> {
    checkKey(key, 'put');
    if (options.exclusive && (await this.head(key))) throw new ObjectExistsError(key, this.location);
    const conditional = options.exclusive && this.conditionalWrites;
    await this.retrying('put', key, async (attempt) => {
      try {
        await this.client.send(
          new PutObjectCommand({
            Bucket: this.bucket,
            Key: this.s3Key(key),
            Body: body,
            ContentLength: body.length,
            ...(conditional ? { IfNoneMatch: '*' } : {}),
          }),
        );
      } catch (err) {
        const f = classify(err);
        if (conditional && (f.status === 412 || f.code === 'PreconditionFailed')) {
          // Taken. If an earlier attempt of ours may have landed, the object may be ours.
          if (attempt > 1 && (await this.get(key).then((b) => b.equals(body), () => false))) return;
          throw new ObjectExistsError(key, this.location, { cause: err });
        }
        throw err;
      }
    });
    this.bucketSeen = true;
  }

  async get(key: string, into?: Buffer): Promise<Buffer> {
    checkKey(key, 'get');
    const out = await this.retrying('get', key, async () => {
      const res = await this.getObject(key);
      return readBody(res.Body as Readable | undefined, res.ContentLength, into);
    });
    this.bucketSeen = true;
    return out;
  }

  async getStream(key: string): Promise<AsyncIterable<Buffer>> {
    checkKey(key, 'get');
    const res = await this.retrying('get', key, () => this.getObject(key));
    this.bucketSeen = true;
    // Read at once whoever iterates: a pack nobody decodes (a restore that failed first) must
    // not keep its connection busy.
    return drained(streamedBody(key, res.Body as Readable | undefined, res.ContentLength));
  }

  private async getObject(key: string): Promise<GetObjectCommandOutput> {
    try {
      return await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: this.s3Key(key) }));
    } catch (err) {
      const f = classify(err);
      if (f.code === 'NoSuchKey') {
        this.bucketSeen = true;
        throw new ObjectNotFoundError(key, this.location, { cause: err });
      }
      if (f.status === 404 && f.code !== 'NoSuchBucket') {
        // A 404 without S3's code (some servers, some proxies): absent only if the bucket is there.
        if (!this.bucketSeen) await this.checkBucket('get', key);
        throw new ObjectNotFoundError(key, this.location, { cause: err });
      }
      throw err;
    }
  }

  async head(key: string): Promise<ObjectInfo | undefined> {
    checkKey(key, 'head');
    const out = await this.retrying('head', key, async () => {
      try {
        const res = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: this.s3Key(key) }));
        return { size: res.ContentLength ?? 0, lastModified: res.LastModified?.getTime() ?? 0 };
      } catch (err) {
        if (classify(err).status === 404) return undefined;
        throw err;
      }
    });
    if (out === undefined && !this.bucketSeen) await this.checkBucket('head', key);
    this.bucketSeen = true;
    return out;
  }

  async *list(prefix: string): AsyncIterable<string> {
    // The next page starts at the continuation token, or (servers that send none) after the last key.
    let next: { ContinuationToken: string } | { StartAfter: string } | undefined;
    do {
      const from = next;
      const page = await this.retrying('list', prefix, () =>
        this.client.send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.s3Key(prefix), MaxKeys: this.listPageSize, ...from })),
      );
      this.bucketSeen = true;
      let last: string | undefined;
      for (const o of page.Contents ?? []) {
        if (o.Key === undefined) continue;
        last = o.Key;
        if (o.Key.startsWith(this.prefix)) yield o.Key.slice(this.prefix.length);
      }
      next = !page.IsTruncated ? undefined : page.NextContinuationToken ? { ContinuationToken: page.NextContinuationToken } : last ? { StartAfter: last } : undefined;
    } while (next);
  }

  async delete(key: string): Promise<void> {
    checkKey(key, 'delete');
    await this.retrying('delete', key, () => this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: this.s3Key(key) })));
    this.bucketSeen = true;
  }

  /** Closes the kept-alive connections (only of a client this store built). */
  close(): void {
    if (this.ownsClient) this.client.destroy();
  }

  /** A 404 from HeadObject before the bucket was ever seen: is it the bucket that is missing? */
  private async checkBucket(op: string, key: string): Promise<void> {
    await this.retrying(op, key, async () => {
      try {
        await this.client.send(new HeadBucketCommand({ Bucket: this.bucket }));
      } catch (err) {
        const f = classify(err);
        // HeadBucket has no body either: its 404 is the bucket's.
        if (f.status === 404) throw Object.assign(new Error('The specified bucket does not exist'), { name: 'NoSuchBucket', $metadata: { httpStatusCode: 404, requestId: f.requestId } });
        throw err;
      }
    });
  }

  /** Runs `attempt` until it succeeds, fails for good, or `maxAttempts` ran out. PicoErrors pass through untouched. */
  private async retrying<T>(op: string, key: string | undefined, attempt: (n: number) => Promise<T>): Promise<T> {
    for (let n = 1; ; n++) {
      this.stats.requests++;
      try {
        return await attempt(n);
      } catch (err) {
        if (err instanceof PicoError) throw err;
        const f = classify(err);
        if (f.throttled) this.stats.throttled++;
        if (!f.retryable || n >= this.maxAttempts) {
          const what = `${f.code ?? 'error'}${f.status !== undefined ? ` (HTTP ${f.status})` : ''}`;
          const tries = n > 1 ? ` after ${n} attempts` : '';
          const target = op === 'list' ? `keys under ${JSON.stringify(key ?? '')}` : key;
          const message = `${this.location}: cannot ${op} ${target}: ${what}${tries}: ${f.message}${hint(f.code)}`;
          if (f.retryable) this.log.warn({ op, key, code: f.code, status: f.status, attempts: n }, 'S3 request failed, giving up after retries');
          throw new S3StoreError(op, key, message, { cause: err, errno: f.code, httpStatus: f.status, attempts: n, requestId: f.requestId });
        }
        const base = f.throttled ? this.baseDelayMs * 5 : this.baseDelayMs;
        const ms = Math.round(this.random() * Math.min(this.maxDelayMs, base * 2 ** (n - 1)));
        this.stats.retries++;
        this.log.debug({ op, key, code: f.code, status: f.status, attempt: n, backoffMs: ms }, 'S3 request failed, retrying');
        await sleep(ms);
      }
    }
  }
}

/** The body's pieces as they come; one that ends short of its Content-Length throws at the end. */
async function* streamedBody(key: string, body: Readable | undefined, length: number | undefined): AsyncIterable<Buffer> {
  let got = 0;
  for await (const c of body ?? []) {
    got += (c as Buffer).length;
    yield c as Buffer;
  }
  if (length !== undefined && got !== length) throw new StoreError('get', key, `s3 get ${key}: the body ended after ${got} of ${length} bytes`);
}

/**
 * The pieces of `source`, read to its end in the background from now on, and yielded to whoever
 * iterates as they come (each iteration from the first piece); pieces that came while the reader
 * was busy are yielded as one (a reader that pays per piece, like an inflater, catches up).
 */
function drained(source: AsyncIterable<Buffer>): AsyncIterable<Buffer> {
  const pieces: Buffer[] = [];
  let end: { ok: true } | { ok: false; failure: unknown } | undefined;
  let waiters: Array<() => void> = [];
  const wake = (): void => {
    const w = waiters;
    waiters = [];
    for (const f of w) f();
  };
  void (async () => {
    try {
      for await (const piece of source) {
        pieces.push(piece);
        wake();
      }
      end = { ok: true };
    } catch (failure) {
      end = { ok: false, failure };
    }
    wake();
  })();
  return {
    async *[Symbol.asyncIterator]() {
      for (let i = 0; ; ) {
        if (i < pieces.length) {
          const batch = pieces.slice(i);
          i = pieces.length;
          yield batch.length === 1 ? batch[0]! : Buffer.concat(batch);
        } else if (end) {
          if (!end.ok) throw end.failure;
          return;
        } else await new Promise<void>((resolve) => waiters.push(resolve));
      }
    },
  };
}

/**
 * Reads a response body fully: into `into` when it is at least `length` bytes, else into a new
 * buffer. A body that ends short of `length` is a TruncatedBody error (retried).
 */
async function readBody(body: Readable | undefined, length: number | undefined, into?: Buffer): Promise<Buffer> {
  if (!body) {
    if (length) throw Object.assign(new Error(`response has no body, expected ${length} bytes`), { code: 'TruncatedBody' });
    return Buffer.alloc(0);
  }
  if (length === undefined) {
    // No Content-Length (chunked): collect, then copy into the caller's buffer if it fits.
    const parts: Buffer[] = [];
    for await (const c of body) parts.push(c as Buffer);
    const all = Buffer.concat(parts);
    if (into && into.length >= all.length) {
      all.copy(into);
      return into.subarray(0, all.length);
    }
    return all;
  }
  const out = into && into.length >= length ? into.subarray(0, length) : Buffer.allocUnsafe(length);
  let got = 0;
  try {
    for await (const c of body) {
      const chunk = c as Buffer;
      if (got + chunk.length > length) throw Object.assign(new Error(`response body longer than its Content-Length ${length}`), { code: 'TruncatedBody' });
      chunk.copy(out, got);
      got += chunk.length;
    }
  } catch (err) {
    body.destroy();
    throw err;
  }
  if (got !== length) throw Object.assign(new Error(`response body ended after ${got} of ${length} bytes`), { code: 'TruncatedBody' });
  return out;
}
