import { watch, type FSWatcher } from 'node:fs';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';

/**
 * Waiting for a file another process creates (runc's PID file, CRIU's socket): `next()` resolves
 * as soon as an entry of that name appears or changes in its directory (inotify), or after
 * `pollMs` — the caller looks again either way, so a missed or unavailable watch costs at most
 * one poll. close() when done.
 */
export class FileWait {
  private wake: () => void = () => undefined;
  private readonly watcher: FSWatcher | null;

  constructor(
    file: string,
    private readonly pollMs: number,
  ) {
    const name = path.basename(file);
    try {
      this.watcher = watch(path.dirname(file), (_event, entry) => {
        if (entry === name) this.wake();
      });
      this.watcher.on('error', () => undefined);
    } catch {
      this.watcher = null;
    }
  }

  async next(): Promise<void> {
    const tick = new AbortController();
    try {
      await Promise.race([delay(this.pollMs, undefined, { signal: tick.signal }).catch(() => undefined), new Promise<void>((resolve) => (this.wake = resolve))]);
    } finally {
      tick.abort();
    }
  }

  close(): void {
    this.watcher?.close();
  }
}
