import type { AppSpec, Endpoints } from '../shared/protocol.js';

/** How a container ended: exit code or the signal that killed it. */
export interface ExitStatus {
  code: number | null;
  signal: string | null;
  /** why the runtime ended the container itself, when it did (e.g. its memory could not be paged in) */
  error?: { code: string; message: string };
}

/** One running instance of an app, as a runtime hands it to the worker. */
export interface Container {
  readonly app: string;
  readonly pid?: number;
  readonly startedAt: Date;
  /** container port → where the gateway reaches it */
  readonly endpoints: Endpoints;
  /** Settles once, when the container is gone for any reason (stop, checkpoint, crash). */
  readonly exited: Promise<ExitStatus>;
}

/** What the caller of a restore knows of the app's image. */
export interface RestoreHint {
  /** the newest generation it knows of (the gateway's record): see ImageStore.latest */
  generation?: number;
}

/** What a swap-out left behind. `generation` is null when the runtime keeps no image. */
export interface CheckpointResult {
  generation: number | null;
}

/**
 * Runs app containers. A runtime reports a container only once its ports accept connections,
 * and never leaves a half-started container behind when it throws.
 */
export interface ContainerRuntime {
  readonly name: string;
  /** True when a swap-out keeps the app's memory (CRIU); false for a cold-start runtime. */
  readonly keepsMemory: boolean;
  /**
   * Starts the app from nothing. When `signal` aborts before the container is ready, the
   * runtime removes what it started and rejects (shutdown must not wait out a ready timeout).
   */
  start(spec: AppSpec, signal?: AbortSignal): Promise<Container>;
  /** Swaps the app out: stores its image (if the runtime keeps one), then removes the container. */
  checkpoint(container: Container): Promise<CheckpointResult>;
  /** Swaps the app in from its newest stored image (a cold-start runtime starts it afresh). */
  restore(spec: AppSpec, signal?: AbortSignal, hint?: RestoreHint): Promise<Container>;
  /** Removes the container, storing nothing. */
  stop(container: Container): Promise<void>;
  /** The newest stored image of every app (empty for a runtime that keeps none). */
  storedImages(): Promise<Array<{ app: string; generation: number }>>;
  /**
   * Bytes of the app's newest image this worker holds locally (a chunk cache, a kept image), so
   * placement can restore the app where the least must be fetched. Absent: 0 for every app.
   */
  cachedBytes?(app: string): Promise<number>;
  /** The file the app's stdout and stderr go to; it survives swap-outs. */
  logFile(app: string): string;
  /** The app served its first traffic since it was restored (optional: for ActiveSet recording). */
  served?(app: string): void;
  /** Releases what the runtime holds (after its containers were stopped). */
  close(): Promise<void>;
}
