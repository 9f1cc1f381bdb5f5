import { PicoError } from '../../shared/errors.js';
import type { AppState, Endpoint } from '../../shared/protocol.js';
import type { AppLifecycle, LifecycleEvent, WakeTrigger } from '../../gateway/lifecycle.js';

/**
 * An AppLifecycle without placement, for listener and hold tests. Apps are 'stored' until the
 * test (or the wake behaviour it chose) makes them run. Like placement, wake() is idempotent:
 * `wakesStarted` counts wakes that actually started, `wakeCalls` every call.
 */
export class FakeLifecycle implements AppLifecycle {
  readonly wakeCalls: Array<{ app: string; trigger: WakeTrigger }> = [];
  wakesStarted = 0;
  /** what a started wake does; default: nothing until the test calls run() or fail() */
  onWake: (app: string) => void = () => {};
  readonly opened = new Map<string, number>();
  readonly closed = new Map<string, number>();
  private readonly states = new Map<string, AppState>();
  private readonly endpoints = new Map<string, Record<number, Endpoint>>();
  private readonly listeners = new Map<string, Set<(ev: LifecycleEvent) => void>>();

  state(app: string): AppState {
    return this.states.get(app) ?? 'stored';
  }

  /** The app runs with these endpoints (port → endpoint); emits 'running'. */
  run(app: string, endpoints: Record<number, Endpoint>): void {
    this.endpoints.set(app, endpoints);
    this.setState(app, 'running');
  }

  /** The app is swapped out; emits 'stored'. */
  store(app: string): void {
    this.endpoints.delete(app);
    this.setState(app, 'stored');
  }

  /** The wake in progress failed; emits 'failed', the app stays stored. */
  fail(app: string, message = 'restore failed'): void {
    this.states.set(app, 'stored');
    this.emit(app, { type: 'failed', error: new PicoError('PICO_ERR_WAKE_FAILED', message) });
  }

  /** Wakes make the app run with `endpoints` after `delayMs`. */
  wakeTo(endpoints: Record<number, Endpoint>, delayMs = 20): void {
    this.onWake = (app) => setTimeout(() => this.run(app, endpoints), delayMs);
  }

  listenerCount(app: string): number {
    return this.listeners.get(app)?.size ?? 0;
  }

  openConnections(app: string): number {
    return (this.opened.get(app) ?? 0) - (this.closed.get(app) ?? 0);
  }

  endpoint(app: string, port: number): Endpoint | undefined {
    return this.state(app) === 'running' ? this.endpoints.get(app)?.[port] : undefined;
  }

  wake(app: string, trigger: WakeTrigger): void {
    this.wakeCalls.push({ app, trigger });
    const s = this.state(app);
    if (s === 'running' || s === 'restoring') return;
    this.wakesStarted++;
    this.setState(app, 'restoring');
    this.onWake(app);
  }

  subscribe(app: string, listener: (ev: LifecycleEvent) => void): () => void {
    let set = this.listeners.get(app);
    if (!set) this.listeners.set(app, (set = new Set()));
    set.add(listener);
    return () => set.delete(listener);
  }

  connectionOpened(app: string): void {
    this.opened.set(app, (this.opened.get(app) ?? 0) + 1);
  }

  connectionClosed(app: string): void {
    this.closed.set(app, (this.closed.get(app) ?? 0) + 1);
  }

  private setState(app: string, state: AppState): void {
    this.states.set(app, state);
    this.emit(app, { type: 'state', state });
  }

  private emit(app: string, ev: LifecycleEvent): void {
    for (const l of [...(this.listeners.get(app) ?? [])]) l(ev);
  }
}
