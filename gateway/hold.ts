import { PicoError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import type { Metrics } from '../shared/metrics.js';
import type { Endpoint } from '../shared/protocol.js';
import type { AppLifecycle, WakeTrigger } from './lifecycle.js';
import type { AppRoute } from './routes.js';

/** How a hold ended; the `outcome` label of picocenter_holds_total. */
export type HoldOutcome = 'ready' | 'timeout' | 'failed' | 'queue_full' | 'aborted';

/**
 * The one wait-for-ready primitive: every listener that needs an app's endpoint asks here, and
 * nothing else in the gateway waits for an app.
 *
 * Results of waitForReady:
 *   resolves Endpoint              the app is running; connect to this endpoint
 *   rejects PICO_ERR_HOLD_QUEUE_FULL   route.holdQueue clients of the app are held already
 *   rejects PICO_ERR_WAKE_FAILED       the wake failed (the app is back in its last good state)
 *   rejects PICO_ERR_HOLD_TIMEOUT      route.holdTimeoutMs passed first (0 = no deadline)
 *   rejects signal.reason              the caller aborted (its client went away)
 *
 * Wakes: the first hold of an app while none is pending calls lifecycle.wake once; holds that
 * join while it is pending ride on that wake. Every pending hold of an app ends on the same
 * events ('running' or 'failed'), so the next hold after those starts a new wake.
 */
export class Hold {
  /** clients held right now, per app (mirrors the picocenter_held_connections gauge) */
  private readonly heldByApp = new Map<string, number>();

  constructor(
    private readonly lifecycle: AppLifecycle,
    private readonly metrics: Metrics,
    private readonly log: Logger,
  ) {}

  /** Number of clients held for `app` right now. */
  held(app: string): number {
    return this.heldByApp.get(app) ?? 0;
  }

  waitForReady(route: AppRoute, port: number, trigger: WakeTrigger, signal?: AbortSignal): Promise<Endpoint> {
    const app = route.name;
    const ready = this.lifecycle.endpoint(app, port);
    if (ready) return Promise.resolve(ready);
    if (signal?.aborted) {
      this.metrics.holdOutcomes.inc({ app, outcome: 'aborted' });
      return Promise.reject(abortReason(signal));
    }
    const pending = this.held(app);
    if (pending >= route.holdQueue) {
      this.metrics.holdOutcomes.inc({ app, outcome: 'queue_full' });
      return Promise.reject(
        new PicoError('PICO_ERR_HOLD_QUEUE_FULL', `${pending} clients are held for app ${app} already (hold queue ${route.holdQueue})`),
      );
    }

    return new Promise<Endpoint>((resolve, reject) => {
      this.heldByApp.set(app, pending + 1);
      this.metrics.held.inc({ app });
      const started = Date.now();
      let done = false;
      let timer: NodeJS.Timeout | undefined;
      let unsubscribe: (() => void) | undefined;

      // The single exit: every path that ends the hold comes through here exactly once.
      const finish = (outcome: HoldOutcome, endpoint: Endpoint | undefined, err?: unknown): void => {
        if (done) return;
        done = true;
        if (timer) clearTimeout(timer);
        unsubscribe?.();
        signal?.removeEventListener('abort', onAbort);
        const left = this.held(app) - 1;
        if (left > 0) this.heldByApp.set(app, left);
        else this.heldByApp.delete(app);
        this.metrics.held.dec({ app });
        this.metrics.holdOutcomes.inc({ app, outcome });
        this.log.debug({ app, port, trigger, outcome, heldMs: Date.now() - started }, 'hold ended');
        if (endpoint) resolve(endpoint);
        else reject(err);
      };
      const onAbort = (): void => finish('aborted', undefined, abortReason(signal!));

      const unsub = this.lifecycle.subscribe(app, (ev) => {
        if (ev.type === 'failed') {
          finish('failed', undefined, new PicoError('PICO_ERR_WAKE_FAILED', `wake of app ${app} failed: ${ev.error.message}`, { cause: ev.error }));
        } else if (ev.state === 'running') {
          // 'running' without an endpoint for this port is not ready; keep waiting (the deadline bounds it).
          const endpoint = this.lifecycle.endpoint(app, port);
          if (endpoint) finish('ready', endpoint);
        }
      });
      if (done) unsub(); // a lifecycle that replays state on subscribe may have ended us already
      else unsubscribe = unsub;
      if (done) return;

      // Check again now that we listen: a wake that completed between the first check and
      // subscribe() emitted its 'running' before we could hear it.
      const endpoint = this.lifecycle.endpoint(app, port);
      if (endpoint) return finish('ready', endpoint);

      if (route.holdTimeoutMs > 0) {
        timer = setTimeout(
          () => finish('timeout', undefined, new PicoError('PICO_ERR_HOLD_TIMEOUT', `app ${app} was not running after ${route.holdTimeoutMs} ms`)),
          route.holdTimeoutMs,
        );
      }
      signal?.addEventListener('abort', onAbort, { once: true });
      // Last, because wake() may emit synchronously (an immediate failure) and end this hold.
      if (pending === 0) this.lifecycle.wake(app, trigger);
    });
  }
}

function abortReason(signal: AbortSignal): unknown {
  return signal.reason ?? new DOMException('the hold was aborted', 'AbortError');
}
