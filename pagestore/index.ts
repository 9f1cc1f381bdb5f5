/*
 * The page store's public surface. The composition root opens the configured store with
 * `openImageStore(config.store)`; the worker sees only the ImageStore interface.
 */
import type { Config } from '../shared/config.js';
import type { Logger } from '../shared/log.js';
import { ChunkedImageStore, type ChunkedImageStoreOptions } from './chunked-image-store.js';
import { FsObjectStore } from './fs-store.js';
import { S3ObjectStore, type S3ObjectStoreOptions } from './s3-store.js';

export * from './image-store.js';
export * from './object-store.js';
export * from './chunked-image-store.js';
export * from './activeset.js';
export { ChunkCache, type ChunkCacheOptions, type ChunkCacheStats, type ChunkSourceKind } from './chunk-cache.js';
export { mountImage, cleanStaleMount, type ImageMount, type ImageMountOptions } from './image-mount.js';
export * from './chunker.js';
export { FsObjectStore, type FsObjectStoreOptions } from './fs-store.js';
export { MemoryObjectStore, type MemoryObjectStoreOptions, type StoreOp } from './memory-store.js';
export { S3ObjectStore, S3StoreError, type S3ObjectStoreOptions } from './s3-store.js';

/** chunks in flight per put and get on S3 (fs: DEFAULT_CONCURRENCY) */
export const S3_CONCURRENCY = 32;

/**
 * The ImageStore for the config's `store` section: `kind: fs` → a directory; `kind: s3` → a
 * bucket (credentials from the AWS SDK's standard chain unless `s3.credentials` is given).
 * `s3` overrides or adds S3ObjectStore options the config does not carry (retries, timeouts…).
 */
export function openImageStore(
  store: Config['store'],
  options: { log?: Logger; s3?: Partial<S3ObjectStoreOptions> } & Omit<ChunkedImageStoreOptions, 'store' | 'log'> = {},
): ChunkedImageStore {
  const { s3, ...rest } = options;
  switch (store.kind) {
    case 'fs':
      return new ChunkedImageStore({ ...rest, store: new FsObjectStore({ root: store.path }) });
    case 's3': {
      const objects = new S3ObjectStore({
        endpoint: store.endpoint,
        region: store.region,
        bucket: store.bucket,
        prefix: store.prefix,
        pathStyle: store.pathStyle,
        ...(rest.log ? { log: rest.log.child({ store: 's3' }) } : {}),
        ...s3,
      });
      // S3 is bound by request latency, not bandwidth: keep more chunks in flight than on disk.
      return new ChunkedImageStore({ concurrency: S3_CONCURRENCY, ...rest, store: objects });
    }
  }
}
