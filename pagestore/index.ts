/*
 * The page store's public surface. The composition root opens the configured store with
 * `openImageStore(config.store)`; the worker sees only the ImageStore interface.
 */
import type { Config } from '../shared/config.js';
import { PicoError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import { ChunkedImageStore, type ChunkedImageStoreOptions } from './chunked-image-store.js';
import { FsObjectStore } from './fs-store.js';

export * from './image-store.js';
export * from './object-store.js';
export * from './chunked-image-store.js';
export { FsObjectStore, type FsObjectStoreOptions } from './fs-store.js';
export { MemoryObjectStore, type MemoryObjectStoreOptions, type StoreOp } from './memory-store.js';

/** The ImageStore for the config's `store` section (`kind: fs` → a directory). */
export function openImageStore(
  store: Config['store'],
  options: { log?: Logger } & Omit<ChunkedImageStoreOptions, 'store' | 'log'> = {},
): ChunkedImageStore {
  switch (store.kind) {
    case 'fs':
      return new ChunkedImageStore({ ...options, store: new FsObjectStore({ root: store.path }) });
    case 's3':
      throw new PicoError('PICO_ERR_CONFIG', 'store.kind s3 is not supported by this build yet');
  }
}
