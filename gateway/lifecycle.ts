import type { PicoError } from '../shared/errors.js';
import type { AppState, Endpoint } from '../shared/protocol.js';

/** What caused a wake; a label on the wakes metric and in logs. */
export type WakeTrigger = 'dns' | 'http' | 'tcp' | 'admin';

export type LifecycleEvent =
  | { type: 'state'; state: AppState }
  | { type: 'failed'; error: PicoError }; // a wake failed; the app is back in its last good state

/**
 * The part of placement that listeners and the hold see. Placement implements it; the gateway's
 * listeners never touch workers.
 */
export interface AppLifecycle {
  /** The endpoint of `port` if the app is running now; undefined otherwise. */
  endpoint(app: string, port: number): Endpoint | undefined;
  /** Starts a wake unless the app is running or already waking. Cheap and idempotent. */
  wake(app: string, trigger: WakeTrigger): void;
  /** Events of one app, in order. Returns the unsubscribe function. */
  subscribe(app: string, listener: (ev: LifecycleEvent) => void): () => void;
  /** Connection accounting: an app with an open connection is never idle. */
  connectionOpened(app: string): void;
  connectionClosed(app: string): void;
}
