import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { MAX_SLOT, networkFor, type AppNetwork } from './netns.js';

/*
 * What the `oci` runtime keeps on disk per app, so that a worker that restarts (or crashed) finds
 * every app's container id, network and files again:
 *
 *   STATE/runc/                  runc's state root (--root): only Picocenter's containers
 *   STATE/runc-logs/             runc's own logs and PID files, per container and operation
 *   STATE/criu.conf              the CRIU config file runc hands to CRIU (org.criu.config)
 *   STATE/dev/, empty/, run/     what every container binds read-only at /dev, /sys/firmware
 *                                and (rootfs layout) /run: host-dirs.ts
 *   STATE/apps/APP/app.json      { app, id, slot }: written once, before anything else exists
 *   STATE/apps/APP/bundle/       config.json + rootfs skeleton (rewritten on every start/restore)
 *   STATE/apps/APP/log/app.log   the app's stdout and stderr, across checkpoints
 *   STATE/apps/APP/staging/      a checkpoint's image until the page store verified it
 *   STATE/apps/APP/restore/      an image fetched from the page store, while it is restored
 *   STATE/apps/APP/local/        the app's newest image kept on the worker while it is stored,
 *   STATE/apps/APP/local.json    and which manifest it is (local-image.ts)
 *   STATE/apps/APP/work/         CRIU's logs of the last dump and restore (dump/, restore/)
 *
 * The container id and the netns name are the same, a pure function of the app's name. The
 * network slot (its /30 in 10.200.0.0/16) is chosen once per app and kept in app.json: an app
 * restores into the same addresses it was dumped with, even after a worker restart.
 */

export interface AppRecord {
  app: string;
  /** runc container id and netns name */
  id: string;
  slot: number;
}

export interface SlotRange {
  /** first slot the runtime may use */
  first: number;
  /** how many slots from `first` */
  count: number;
}

export const DEFAULT_PREFIX = 'pico-';
/** The lower slots; the spike's tests use 16000 and up. */
export const DEFAULT_SLOTS: SlotRange = { first: 0, count: 16_000 };

const CONTAINER_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
const PREFIX = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,15}$/;
const APP_NAME = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

/** The container id (and netns name) of `app`: `PREFIX` + app, or a hashed form when too long. */
export function containerIdFor(prefix: string, app: string): string {
  const plain = `${prefix}${app}`;
  if (plain.length <= 64 && CONTAINER_ID.test(plain)) return plain;
  const hash = createHash('sha256').update(app).digest('hex').slice(0, 8);
  return `${prefix}${app.slice(0, 64 - prefix.length - 9)}-${hash}`;
}

export class AppRecords {
  readonly appsDir: string;
  private readonly records = new Map<string, AppRecord>();

  constructor(
    readonly stateDir: string,
    readonly prefix: string,
    readonly slots: SlotRange,
  ) {
    if (!PREFIX.test(prefix)) throw new Error(`container prefix ${JSON.stringify(prefix)} is not [A-Za-z0-9][A-Za-z0-9_.-]{0,15}`);
    if (!(slots.first >= 0 && slots.count >= 1 && slots.first + slots.count - 1 <= MAX_SLOT)) {
      throw new Error(`slots ${slots.first}..${slots.first + slots.count - 1} are not within 0..${MAX_SLOT}`);
    }
    this.appsDir = path.join(stateDir, 'apps');
    mkdirSync(this.appsDir, { recursive: true });
    for (const name of readdirSync(this.appsDir)) {
      try {
        const r = JSON.parse(readFileSync(path.join(this.appsDir, name, 'app.json'), 'utf8')) as AppRecord;
        if (r.app === name && Number.isInteger(r.slot) && typeof r.id === 'string') this.records.set(name, r);
      } catch {
        // a directory without a record: nothing of it can exist outside it (the record comes first)
      }
    }
  }

  /** Every app this state directory has a record of. */
  all(): AppRecord[] {
    return [...this.records.values()];
  }

  get(app: string): AppRecord | undefined {
    return this.records.get(app);
  }

  /** The app's record, made (slot chosen and written to disk) on first use. */
  ensure(app: string): AppRecord {
    const known = this.records.get(app);
    if (known) return known;
    if (!APP_NAME.test(app)) throw new Error(`app name ${JSON.stringify(app)} is not lowercase letters, digits and dashes`);
    const record: AppRecord = { app, id: containerIdFor(this.prefix, app), slot: this.freeSlot(app) };
    const dir = this.dir(app);
    mkdirSync(dir, { recursive: true });
    const tmp = path.join(dir, 'app.json.tmp');
    writeFileSync(tmp, `${JSON.stringify(record)}\n`);
    renameSync(tmp, path.join(dir, 'app.json'));
    this.records.set(app, record);
    return record;
  }

  network(record: AppRecord): AppNetwork {
    return networkFor(record.id, record.slot);
  }

  dir(app: string): string {
    return path.join(this.appsDir, app);
  }

  paths(app: string) {
    const dir = this.dir(app);
    return {
      dir,
      bundle: path.join(dir, 'bundle'),
      logDir: path.join(dir, 'log'),
      staging: path.join(dir, 'staging'),
      restore: path.join(dir, 'restore'),
      /** a lazy restore's FUSE image directory */
      mount: path.join(dir, 'mnt'),
      local: { dir: path.join(dir, 'local'), record: path.join(dir, 'local.json') },
      dumpWork: path.join(dir, 'work', 'dump'),
      restoreWork: path.join(dir, 'work', 'restore'),
    };
  }

  /**
   * A slot no other app of this state directory holds and whose host interface does not exist
   * (another worker's or test's). Probing starts at a hash of the name, so an app usually gets
   * the same slot in a fresh state directory too.
   */
  private freeSlot(app: string): number {
    const used = new Set([...this.records.values()].map((r) => r.slot));
    const start = createHash('sha256').update(app).digest().readUInt32BE(0) % this.slots.count;
    for (let i = 0; i < this.slots.count; i++) {
      const slot = this.slots.first + ((start + i) % this.slots.count);
      if (used.has(slot)) continue;
      if (existsSync(`/sys/class/net/${networkFor('x', slot).hostInterface}`)) continue;
      return slot;
    }
    throw new Error(`no free network slot in ${this.slots.first}..${this.slots.first + this.slots.count - 1}`);
  }
}
