/*
 * The worker control protocol: the only way placement (gateway/) talks to a worker. Every
 * message is plain JSON-serialisable data, so the same messages can cross a process or machine
 * boundary later; the in-process transport clones them to keep that honest.
 *
 * Version 1. A change that is not backwards compatible bumps PROTOCOL_VERSION.
 */

export const PROTOCOL_VERSION = 1;

/** Lifecycle states, exactly as in DESIGN.md. */
export const APP_STATES = ['new', 'running', 'checkpointing', 'stored', 'restoring'] as const;
export type AppState = (typeof APP_STATES)[number];

/** What a worker needs to run one app: derived from the app's config by placement. */
export interface AppSpec {
  name: string;
  command: string[];
  cwd: string;
  env: Record<string, string>;
  /** every port the app listens on inside its container: the http port first, then tcp ports */
  ports: number[];
  /** in milliseconds */
  readyTimeoutMs: number;
  /** memory limit of the container in bytes (runtimes with containers); absent: none */
  memoryLimit?: number;
  /** container runtimes: the root filesystem directory; absent: the host's system read-only */
  rootfs?: string;
  /** container runtimes: an OCI bundle directory to run as given (its config.json decides) */
  bundle?: string;
  /** how a checkpointing runtime swaps the app in (see RestoreMode); absent: 'activeset' */
  restore?: RestoreMode;
}

/**
 * How memory comes back at a restore: `full` fetches the whole image, then restores; `lazy`
 * restores at once and pages memory in on demand; `activeset` first fetches the chunks recent
 * restores of the app used (its ActiveSet), then restores lazily.
 */
export const RESTORE_MODES = ['full', 'lazy', 'activeset'] as const;
export type RestoreMode = (typeof RESTORE_MODES)[number];

/** Where the gateway reaches one container port. */
export interface Endpoint {
  host: string;
  port: number;
}

/** container port → endpoint */
export type Endpoints = Record<number, Endpoint>;

export type WorkerRequest =
  | { v: 1; type: 'start'; app: AppSpec } // cold start from nothing
  /**
   * swap in from the app's newest stored image; `generation`: the newest the gateway knows of, a
   * hint (the worker reads that manifest beside its listing of the store, one round trip instead of
   * two, and still restores the newest it finds)
   */
  | { v: 1; type: 'restore'; app: AppSpec; generation?: number }
  | { v: 1; type: 'checkpoint'; app: string } // swap out: store the image, then remove the container
  | { v: 1; type: 'stop'; app: string } // remove the container, store nothing
  | { v: 1; type: 'list' }
  | { v: 1; type: 'logs'; app: string; bytes: number } // the tail of the app's stdout/stderr
  | { v: 1; type: 'cached'; apps: string[] } // how much of each app's image the worker caches
  | { v: 1; type: 'served'; app: string }; // the restored app answered its first traffic (ActiveSet window)

export interface ContainerInfo {
  app: string;
  endpoints: Endpoints;
  pid?: number;
  startedAt: string;
}

/** The newest stored image of an app, as a worker's page store has it. */
export interface StoredImage {
  app: string;
  generation: number;
}

export type WorkerResponse =
  | { v: 1; type: 'running'; app: string; endpoints: Endpoints; restored: boolean }
  | { v: 1; type: 'checkpointed'; app: string; generation: number | null } // null: the runtime keeps no image
  | { v: 1; type: 'stopped'; app: string }
  | { v: 1; type: 'list'; containers: ContainerInfo[]; images: StoredImage[] }
  | { v: 1; type: 'logs'; app: string; text: string }
  /** app → bytes of its newest image the worker holds locally (0: none, or no cache) */
  | { v: 1; type: 'cached'; bytes: Record<string, number> }
  | { v: 1; type: 'noted'; app: string } // answers `served`
  | { v: 1; type: 'error'; code: string; message: string };

/**
 * Unsolicited events from a worker: a container exited on its own (`error`: the worker ended it
 * itself, and why — e.g. its memory could not be paged in), or the worker swapped an app out by
 * itself (its own clean shutdown with `worker.shutdown: checkpoint`).
 */
export type WorkerEvent =
  | { v: 1; type: 'exited'; app: string; code: number | null; signal: string | null; error?: { code: string; message: string } }
  | { v: 1; type: 'checkpointed'; app: string; generation: number | null };

/**
 * One worker as placement sees it. `call` never throws for an app-level failure: it answers
 * `{type:'error'}`; it rejects only when the worker itself cannot be reached.
 */
export interface WorkerConnection {
  readonly id: string;
  call(req: WorkerRequest): Promise<WorkerResponse>;
  onEvent(listener: (ev: WorkerEvent) => void): () => void;
  close(): Promise<void>;
  /**
   * Remote workers: false while the worker cannot be reached (placement sends it no wakes).
   * Absent (an in-process worker): always reachable.
   */
  readonly reachable?: boolean;
  /**
   * Remote workers: called with false when the worker becomes unreachable, and with true each
   * time the link is (re)established — also when it never looked down, because the worker may
   * have restarted in between: placement then asks it what it runs (`list`) and reconciles.
   */
  onReachable?(listener: (reachable: boolean) => void): () => void;
}
