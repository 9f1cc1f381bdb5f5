import type { AppConfig, Config } from '../shared/config.js';
import { PicoError, describeError, isPicoError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import type { Metrics } from '../shared/metrics.js';
import { APP_STATES, type AppSpec, type AppState, type Endpoint, type Endpoints, type WorkerConnection, type WorkerEvent } from '../shared/protocol.js';
import type { AppLifecycle, LifecycleEvent, WakeTrigger } from './lifecycle.js';

/*
 * Placement owns every app's lifecycle (DESIGN.md):
 *
 *            start                idle timeout
 *   new ───────────────► running ─────────────► checkpointing ──► stored
 *                          ▲                                        │
 *                          └──────────── restoring ◄──── wake ──────┘
 *
 * Invariants:
 * - At most one operation (start, restore, checkpoint, stop) is in flight per app (`op`).
 * - `endpoints` is set exactly while the state is `running`; listeners hold everything else.
 * - A wake that arrives while checkpointing is remembered and runs once the swap-out settles.
 * - A failure puts the app back in its last good state, records the error and tells the
 *   subscribers, so held clients are answered at once instead of at their deadline.
 * - An app is idle only with no open connection for `idle`; the timer re-checks on firing,
 *   because activity may have happened since it was armed.
 */

type Operation = 'starting' | 'restoring' | 'checkpointing' | 'stopping';

interface AppRecord {
  readonly config: AppConfig;
  readonly spec: AppSpec;
  state: AppState;
  operation?: Operation;
  op?: Promise<void>;
  worker?: WorkerConnection;
  /** the worker that ran the app last (where its logs are) */
  lastWorker?: WorkerConnection;
  endpoints?: Endpoints;
  /** newest image generation; null while the app has none (never swapped out with memory) */
  generation: number | null;
  connections: number;
  lastActivity: number;
  lastWake?: Date;
  lastError?: { code: string; message: string; at: Date };
  idleTimer?: NodeJS.Timeout;
  /** the trigger of a wake that arrived while checkpointing; it runs once the swap-out settles */
  wakeAfterCheckpoint?: WakeTrigger;
  /** restored, and no connection has ended since: the first one that does tells the worker `served` */
  awaitingServed?: boolean;
}

export interface AppStatus {
  name: string;
  state: AppState;
  operation: Operation | null;
  worker: string | null;
  domains: string[];
  connections: number;
  lastWake: string | null;
  /** newest stored image generation; null when the app has none */
  generation: number | null;
  lastError: { code: string; message: string; at: string } | null;
  endpoints: Endpoints | null;
}

export interface WorkerStatus {
  id: string;
  reachable: boolean;
  /** apps running or waking there */
  apps: number;
}

export interface PlacementOptions {
  config: Readonly<Config>;
  workers: WorkerConnection[];
  metrics: Metrics;
  log: Logger;
  /** in ms: how long a restore waits for workers to say how much of the app they cache; default 200 */
  cachedQueryTimeoutMs?: number;
}

export class Placement implements AppLifecycle {
  private readonly apps = new Map<string, AppRecord>();
  private readonly subscribers = new Map<string, Set<(ev: LifecycleEvent) => void>>();
  private readonly workers: WorkerConnection[];
  private readonly metrics: Metrics;
  private readonly log: Logger;
  private readonly unsubscribeWorkers: Array<() => void> = [];
  private stopping = false;
  private readonly shutdown: 'stop' | 'checkpoint';
  private readonly cachedQueryTimeoutMs: number;

  constructor(opts: PlacementOptions) {
    if (opts.workers.length === 0) throw new Error('placement needs at least one worker');
    this.workers = opts.workers;
    this.metrics = opts.metrics;
    this.log = opts.log.child({ component: 'placement' });
    this.shutdown = opts.config.worker.shutdown;
    this.cachedQueryTimeoutMs = opts.cachedQueryTimeoutMs ?? 200;
    for (const app of opts.config.apps) {
      this.apps.set(app.name, {
        config: app,
        spec: toSpec(app, opts.config),
        state: 'new',
        generation: null,
        connections: 0,
        lastActivity: Date.now(),
      });
    }
    for (const w of this.workers) {
      this.unsubscribeWorkers.push(w.onEvent((ev) => this.onWorkerEvent(w, ev)));
      if (w.onReachable) this.unsubscribeWorkers.push(w.onReachable((up) => this.onWorkerReachable(w, up)));
    }
    this.countStates();
  }

  // ── AppLifecycle ───────────────────────────────────────────────────────────────────────

  endpoint(app: string, port: number): Endpoint | undefined {
    const rec = this.apps.get(app);
    return rec?.state === 'running' ? rec.endpoints?.[port] : undefined;
  }

  wake(app: string, trigger: WakeTrigger): void {
    const rec = this.apps.get(app);
    if (!rec || this.stopping) return;
    switch (rec.state) {
      case 'running':
        rec.lastActivity = Date.now();
        return;
      case 'checkpointing':
        rec.wakeAfterCheckpoint ??= trigger;
        return;
      case 'restoring':
        return;
      case 'new':
      case 'stored':
        if (rec.op) return; // a start is already under way
        this.beginWake(rec, trigger);
    }
  }

  subscribe(app: string, listener: (ev: LifecycleEvent) => void): () => void {
    let set = this.subscribers.get(app);
    if (!set) this.subscribers.set(app, (set = new Set()));
    set.add(listener);
    return () => {
      set.delete(listener);
    };
  }

  connectionOpened(app: string): void {
    const rec = this.apps.get(app);
    if (!rec) return;
    rec.connections++;
    rec.lastActivity = Date.now();
    this.metrics.connections.set({ app }, rec.connections);
    clearTimeout(rec.idleTimer);
    rec.idleTimer = undefined;
  }

  connectionClosed(app: string): void {
    const rec = this.apps.get(app);
    if (!rec || rec.connections === 0) return;
    rec.connections--;
    rec.lastActivity = Date.now();
    this.metrics.connections.set({ app }, rec.connections);
    if (rec.awaitingServed && rec.worker) {
      // The end of the first traffic after a restore closes the app's ActiveSet window.
      rec.awaitingServed = false;
      void rec.worker.call({ v: 1, type: 'served', app }).catch(() => undefined);
    }
    if (rec.connections === 0) this.armIdle(rec);
  }

  /**
   * Learns which apps already have a stored image (a restarted system): they start `stored`,
   * so their next wake restores them instead of starting afresh. With a shared page store
   * several workers report the same image: it is one app, and any worker can restore it.
   * Apps a worker still runs (the gateway restarted, the worker did not) are adopted.
   * A worker that cannot be reached is skipped (it is synced when it comes up).
   */
  async init(): Promise<void> {
    await Promise.all(this.workers.map((w) => this.syncWorker(w, true)));
  }

  // ── operations for the admin API ───────────────────────────────────────────────────────

  has(app: string): boolean {
    return this.apps.has(app);
  }

  /** Every worker, whether it can be reached, and how many apps run or wake there. */
  workerStatus(): WorkerStatus[] {
    return this.workers.map((w) => ({ id: w.id, reachable: w.reachable !== false, apps: this.load(w) }));
  }

  status(): AppStatus[] {
    return [...this.apps.values()].map((rec) => ({
      name: rec.config.name,
      state: rec.state,
      operation: rec.operation ?? null,
      worker: rec.worker?.id ?? null,
      domains: [...rec.config.domains],
      connections: rec.connections,
      lastWake: rec.lastWake?.toISOString() ?? null,
      generation: rec.generation,
      lastError: rec.lastError ? { ...rec.lastError, at: rec.lastError.at.toISOString() } : null,
      endpoints: rec.state === 'running' && rec.endpoints ? rec.endpoints : null,
    }));
  }

  /** Swaps a running app out now. Rejects with the reason when it cannot. */
  async checkpoint(app: string): Promise<void> {
    const rec = this.apps.get(app);
    if (!rec) throw new PicoError('PICO_ERR_UNKNOWN_APP', `no app named ${app}`);
    if (rec.state !== 'running' || rec.op) {
      throw new PicoError('PICO_ERR_INVALID_STATE', `app ${app} is ${rec.operation ?? rec.state}, not running`);
    }
    const stored = await this.beginCheckpoint(rec, 'admin');
    if (!stored) throw new PicoError('PICO_ERR_CHECKPOINT_FAILED', rec.lastError?.message ?? 'checkpoint failed');
  }

  /** The tail of an app's stdout/stderr, from the worker that runs (or last ran) it. */
  async logs(app: string, bytes: number): Promise<string> {
    const rec = this.apps.get(app);
    if (!rec) throw new PicoError('PICO_ERR_UNKNOWN_APP', `no app named ${app}`);
    const worker = rec.worker ?? rec.lastWorker ?? this.workers.find((w) => w.reachable !== false) ?? this.workers[0]!;
    const res = await worker.call({ v: 1, type: 'logs', app, bytes });
    if (res.type !== 'logs') throw new PicoError('PICO_ERR_INVALID_STATE', res.type === 'error' ? res.message : `unexpected answer ${res.type}`);
    return res.text;
  }

  /**
   * Clean shutdown: cancels wakes in flight, waits for other operations, then stops every
   * running app — or, with `worker.shutdown: checkpoint`, swaps it out (and stops it if that fails).
   */
  async stop(): Promise<void> {
    this.stopping = true;
    for (const rec of this.apps.values()) clearTimeout(rec.idleTimer);
    // A wake in flight is cancelled (its worker aborts the start), not waited out.
    for (const rec of this.apps.values()) {
      if (rec.operation === 'starting' || rec.operation === 'restoring') {
        void rec.worker?.call({ v: 1, type: 'stop', app: rec.config.name }).catch(() => undefined);
      }
    }
    await Promise.all([...this.apps.values()].map((rec) => rec.op));
    if (this.shutdown === 'checkpoint') {
      await Promise.all(
        [...this.apps.values()]
          .filter((rec) => rec.state === 'running' && rec.worker)
          .map((rec) => this.beginCheckpoint(rec, 'shutdown')),
      );
    }
    await Promise.all(
      [...this.apps.values()]
        .filter((rec) => rec.state === 'running' && rec.worker)
        .map(async (rec) => {
          rec.operation = 'stopping';
          const res = await rec.worker!.call({ v: 1, type: 'stop', app: rec.config.name }).catch((err: unknown) => ({
            v: 1 as const, type: 'error' as const, code: 'PICO_ERR_INTERNAL', message: describeError(err),
          }));
          rec.operation = undefined;
          if (res.type === 'error') this.log.error({ app: rec.config.name, err: res.message }, 'stop failed');
          rec.endpoints = undefined;
          rec.worker = undefined;
          this.setState(rec, rec.generation === null ? 'new' : 'stored');
        }),
    );
    for (const u of this.unsubscribeWorkers) u();
  }

  // ── internals ──────────────────────────────────────────────────────────────────────────

  private beginWake(rec: AppRecord, trigger: WakeTrigger): void {
    const app = rec.config.name;
    const from = rec.state;
    const kind = from === 'new' ? 'start' : 'restore';
    let log = this.log.child({ app });
    const started = performance.now();
    rec.operation = kind === 'start' ? 'starting' : 'restoring';
    if (kind === 'restore') this.setState(rec, 'restoring');
    rec.op = (async () => {
      let error: PicoError | undefined;
      let cause: string | undefined;
      /** how memory came back: a restore mode, or cold (started afresh) */
      let mode = 'cold';
      let worker: WorkerConnection | undefined;
      try {
        // Synchronous unless workers are asked about their caches: then the call goes out at once.
        const picked = this.pickWorker(rec, kind);
        worker = picked instanceof Promise ? await picked : picked;
        if (this.stopping) throw new PicoError('PICO_ERR_SHUTTING_DOWN', `${kind} of ${app} cancelled: the system is stopping`);
        rec.worker = worker;
        rec.lastWorker = worker;
        log = log.child({ worker: worker.id });
        log.info({ trigger, kind }, 'wake');
        const res = await worker.call(
          kind === 'restore' && rec.generation !== null ? { v: 1, type: kind, app: rec.spec, generation: rec.generation } : { v: 1, type: kind, app: rec.spec },
        );
        if (res.type === 'running') {
          rec.endpoints = res.endpoints;
          rec.awaitingServed = res.restored;
          mode = res.restored ? (rec.spec.restore ?? 'activeset') : 'cold';
          rec.lastWake = new Date();
          rec.lastActivity = Date.now();
        } else {
          error = new PicoError('PICO_ERR_WAKE_FAILED', `${kind} of ${app} failed: ${res.type === 'error' ? res.message : res.type}`);
          if (res.type === 'error') cause = res.code;
        }
      } catch (err) {
        if (rec.worker === worker && worker) {
          error = new PicoError('PICO_ERR_WAKE_FAILED', `${kind} of ${app} failed: worker ${worker.id} unreachable: ${describeError(err)}`, { cause: err });
          cause = isPicoError(err) ? err.code : 'PICO_ERR_WORKER_UNREACHABLE';
          // It may finish the wake after all (a timeout, a partition): leave no container behind there.
          void worker.call({ v: 1, type: 'stop', app }).catch(() => undefined);
        } else {
          // No worker was chosen: none reachable, or the system is stopping.
          log.info({ trigger, kind }, 'wake');
          error = isPicoError(err) ? err : new PicoError('PICO_ERR_WAKE_FAILED', describeError(err));
        }
      }
      rec.op = undefined;
      rec.operation = undefined;
      const seconds = (performance.now() - started) / 1000;
      if (error) {
        rec.worker = undefined;
        // status shows the worker's own code (PICO_ERR_IMAGE_CORRUPT…) where it gave one
        rec.lastError = { code: cause ?? error.code, message: error.message, at: new Date() };
        this.metrics.wakes.inc({ app, trigger, result: 'failed' });
        log.error({ err: error.message }, 'wake failed');
        this.setState(rec, from);
        this.emit(app, { type: 'failed', error });
        return;
      }
      this.metrics.wakes.inc({ app, trigger, result: 'ok' });
      this.metrics.wakeSeconds.observe({ app, kind, mode }, seconds);
      log.info({ ms: Math.round(seconds * 1000) }, 'running');
      this.setState(rec, 'running');
      if (this.stopping) return; // stop() waits for this op, then stops the container
      if (rec.connections === 0) this.armIdle(rec);
    })();
  }

  /** Resolves true once the app is stored, false when the swap-out failed (the app runs on). */
  private beginCheckpoint(rec: AppRecord, reason: 'idle' | 'admin' | 'shutdown'): Promise<boolean> {
    const app = rec.config.name;
    const worker = rec.worker!;
    const log = this.log.child({ app, worker: worker.id });
    clearTimeout(rec.idleTimer);
    rec.idleTimer = undefined;
    rec.operation = 'checkpointing';
    rec.wakeAfterCheckpoint = undefined;
    this.setState(rec, 'checkpointing');
    log.info({ reason }, 'checkpoint');
    const done = (async () => {
      let failure: string | undefined;
      try {
        const res = await worker.call({ v: 1, type: 'checkpoint', app });
        if (res.type === 'checkpointed') {
          rec.generation = res.generation;
        } else {
          failure = res.type === 'error' ? res.message : `unexpected answer ${res.type}`;
        }
      } catch (err) {
        failure = `worker ${worker.id} unreachable: ${describeError(err)}`;
      }
      rec.op = undefined;
      rec.operation = undefined;
      if (failure) {
        // The worker resumes the container when a swap-out fails: the app keeps serving.
        rec.lastError = { code: 'PICO_ERR_CHECKPOINT_FAILED', message: `checkpoint of ${app} failed: ${failure}`, at: new Date() };
        this.metrics.checkpoints.inc({ app, result: 'failed' });
        log.error({ err: failure }, 'checkpoint failed; app keeps running');
        rec.lastActivity = Date.now();
        rec.wakeAfterCheckpoint = undefined; // held clients see `running` and go ahead
        this.setState(rec, 'running');
        if (rec.connections === 0) this.armIdle(rec);
        return false;
      }
      this.metrics.checkpoints.inc({ app, result: 'ok' });
      rec.endpoints = undefined;
      rec.worker = undefined;
      log.info({ generation: rec.generation }, 'stored');
      this.setState(rec, 'stored');
      const pending = rec.wakeAfterCheckpoint;
      rec.wakeAfterCheckpoint = undefined;
      if (pending) this.wake(app, pending);
      return true;
    })();
    rec.op = done.then(() => undefined);
    return done;
  }

  private armIdle(rec: AppRecord): void {
    clearTimeout(rec.idleTimer);
    rec.idleTimer = undefined;
    const idle = rec.config.idle;
    if (idle === 0 || rec.state !== 'running' || this.stopping) return;
    const wait = Math.max(0, rec.lastActivity + idle - Date.now());
    rec.idleTimer = setTimeout(() => {
      rec.idleTimer = undefined;
      if (rec.state !== 'running' || rec.op || rec.connections > 0 || this.stopping) return;
      if (Date.now() - rec.lastActivity < idle) return this.armIdle(rec);
      void this.beginCheckpoint(rec, 'idle');
    }, wait);
    rec.idleTimer.unref();
  }

  private onWorkerEvent(worker: WorkerConnection, ev: WorkerEvent): void {
    const rec = this.apps.get(ev.app);
    if (!rec || rec.worker !== worker || rec.state !== 'running' || rec.op) return;
    if (ev.type === 'checkpointed') {
      // The worker swapped the app out by itself (its own clean shutdown): the app is stored.
      rec.generation = ev.generation ?? rec.generation;
      this.log.info({ app: ev.app, worker: worker.id, generation: ev.generation }, 'stored by its worker');
      this.release(rec, rec.generation === null ? 'new' : 'stored');
      return;
    }
    rec.lastError = ev.error
      ? { code: ev.error.code, message: ev.error.message, at: new Date() }
      : { code: 'PICO_ERR_APP_EXITED', message: `app ${ev.app} exited on its own (code ${ev.code}, signal ${ev.signal})`, at: new Date() };
    this.log.warn({ app: ev.app, worker: worker.id, code: ev.code, signal: ev.signal }, 'container exited');
    // Without an image, the next wake is a fresh start.
    this.release(rec, rec.generation === null ? 'new' : 'stored');
  }

  /** The app no longer runs on its worker: forget the endpoints, back to its last good state. */
  private release(rec: AppRecord, state: 'new' | 'stored'): void {
    rec.endpoints = undefined;
    rec.worker = undefined;
    clearTimeout(rec.idleTimer);
    rec.idleTimer = undefined;
    this.setState(rec, state);
  }

  /**
   * A worker became unreachable: its running apps are lost (their connections fail), so they
   * go back to their last good state and the next wake places them again — on a worker that
   * answers. A wake in flight there fails by itself (its call is aborted). When the worker comes
   * back it is synced: what it still runs is adopted or, if placed elsewhere meanwhile, stopped.
   */
  private onWorkerReachable(worker: WorkerConnection, reachable: boolean): void {
    if (this.stopping) return;
    if (reachable) {
      void this.syncWorker(worker, false);
      return;
    }
    const lost = [...this.apps.values()].filter((rec) => rec.worker === worker && rec.state === 'running' && !rec.op);
    for (const rec of lost) {
      rec.lastError = { code: 'PICO_ERR_WORKER_UNREACHABLE', message: `worker ${worker.id} became unreachable while app ${rec.config.name} ran there`, at: new Date() };
      this.release(rec, rec.generation === null ? 'new' : 'stored');
    }
    this.log.warn({ worker: worker.id, lost: lost.map((r) => r.config.name) }, 'worker unreachable: its running apps are lost');
  }

  /**
   * Asks a worker what it stores and runs, and makes placement agree:
   * - an image of an app that is `new` here makes it `stored` (newest generation wins);
   * - a container of an app that runs nowhere is adopted; one of an app placed elsewhere is stopped;
   * - an app placement believes runs there (woken before we asked) but does not, is released.
   */
  private async syncWorker(worker: WorkerConnection, initial: boolean): Promise<void> {
    const asked = Date.now();
    let res;
    try {
      res = await worker.call({ v: 1, type: 'list' });
    } catch (err) {
      this.log.warn({ worker: worker.id, err: describeError(err) }, 'worker not reachable: will sync when it is');
      return;
    }
    if (res.type !== 'list') {
      const err = new PicoError('PICO_ERR_WAKE_FAILED', `worker ${worker.id} cannot list its images: ${res.type === 'error' ? res.message : res.type}`);
      if (initial) throw err;
      this.log.error({ worker: worker.id, err: err.message }, 'worker sync failed');
      return;
    }
    if (this.stopping) return;
    for (const image of res.images) {
      const rec = this.apps.get(image.app);
      if (!rec) continue;
      if (rec.generation === null || image.generation > rec.generation) rec.generation = image.generation;
      if (rec.state !== 'new' || rec.op) continue;
      this.setState(rec, 'stored');
      this.log.info({ app: image.app, worker: worker.id, generation: image.generation }, 'stored image found');
    }
    const runs = new Set<string>();
    for (const c of res.containers) {
      runs.add(c.app);
      const rec = this.apps.get(c.app);
      if (!rec) {
        this.log.warn({ app: c.app, worker: worker.id }, 'worker runs an app that is not configured');
        continue;
      }
      if (rec.worker === worker) continue;
      if ((rec.state === 'new' || rec.state === 'stored') && !rec.op) {
        rec.worker = worker;
        rec.lastWorker = worker;
        rec.endpoints = c.endpoints;
        rec.lastWake = new Date(c.startedAt);
        rec.lastActivity = Date.now();
        this.log.info({ app: c.app, worker: worker.id }, 'adopted running app');
        this.setState(rec, 'running');
        if (rec.connections === 0) this.armIdle(rec);
      } else {
        this.log.warn({ app: c.app, worker: worker.id, placedOn: rec.worker?.id ?? null }, 'app also runs elsewhere: stopping this copy');
        void worker.call({ v: 1, type: 'stop', app: c.app }).catch(() => undefined);
      }
    }
    for (const rec of this.apps.values()) {
      if (rec.worker !== worker || rec.state !== 'running' || rec.op || runs.has(rec.config.name)) continue;
      if (rec.lastWake && rec.lastWake.getTime() >= asked) continue; // woken after we asked
      rec.lastError = { code: 'PICO_ERR_APP_EXITED', message: `app ${rec.config.name} no longer runs on worker ${worker.id} (did it restart?)`, at: new Date() };
      this.log.warn({ app: rec.config.name, worker: worker.id }, 'app no longer runs on its worker');
      this.release(rec, rec.generation === null ? 'new' : 'stored');
    }
  }

  /** Apps running or waking on `worker`. */
  private load(worker: WorkerConnection): number {
    let n = 0;
    for (const rec of this.apps.values()) if (rec.worker === worker) n++;
    return n;
  }

  /**
   * Where a wake runs, among the workers that can be reached now:
   * 1. the worker that ran the app last (its logs, local image and warm caches are there);
   * 2. for a restore, the worker that caches most of the app's image (preferCachedWorker);
   * 3. the least loaded worker; ties go to the first in the config (the embedded one first).
   * Rejects with PICO_ERR_WAKE_FAILED when no worker can be reached.
   */
  private pickWorker(rec: AppRecord, kind: 'start' | 'restore'): WorkerConnection | Promise<WorkerConnection> {
    const reachable = this.workers.filter((w) => w.reachable !== false);
    if (reachable.length === 0) {
      throw new PicoError('PICO_ERR_WAKE_FAILED', `${kind} of ${rec.config.name} failed: no worker is reachable (${this.workers.map((w) => w.id).join(', ')})`);
    }
    if (rec.lastWorker && reachable.includes(rec.lastWorker)) return rec.lastWorker;
    if (reachable.length === 1) return reachable[0]!;
    if (kind === 'restore') return this.preferCachedWorker(rec.config.name, reachable);
    return this.leastLoaded(reachable);
  }

  /**
   * The hook for chunk caches: asks each candidate how many bytes of the app's image it holds
   * (`cached`) and picks the largest; ties (all 0 without caches) go to the least loaded. A worker
   * that does not answer within cachedQueryTimeoutMs counts as 0, so a slow one cannot stall a wake.
   */
  private async preferCachedWorker(app: string, candidates: WorkerConnection[]): Promise<WorkerConnection> {
    const ask = async (w: WorkerConnection): Promise<number> => {
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<number>((resolve) => (timer = setTimeout(() => resolve(0), this.cachedQueryTimeoutMs)));
      const answer = w
        .call({ v: 1, type: 'cached', apps: [app] })
        .then((res) => (res.type === 'cached' ? (res.bytes[app] ?? 0) : 0))
        .catch(() => 0);
      try {
        return await Promise.race([answer, timeout]);
      } finally {
        clearTimeout(timer);
      }
    };
    const bytes = await Promise.all(candidates.map(ask));
    const most = Math.max(...bytes);
    const best = candidates.filter((_, i) => bytes[i] === most);
    if (most > 0) this.log.debug({ app, worker: best[0]!.id, cachedBytes: most }, 'restore placed by cache');
    return this.leastLoaded(best);
  }

  private leastLoaded(candidates: WorkerConnection[]): WorkerConnection {
    let best = candidates[0]!;
    let bestLoad = this.load(best);
    for (const w of candidates.slice(1)) {
      const l = this.load(w);
      if (l < bestLoad) (best = w), (bestLoad = l);
    }
    return best;
  }

  private setState(rec: AppRecord, state: AppState): void {
    if (rec.state === state) return;
    rec.state = state;
    this.countStates();
    this.emit(rec.config.name, { type: 'state', state });
  }

  private emit(app: string, ev: LifecycleEvent): void {
    for (const l of [...(this.subscribers.get(app) ?? [])]) {
      try {
        l(ev);
      } catch (err) {
        this.log.error({ app, err: describeError(err) }, 'lifecycle subscriber threw');
      }
    }
  }

  private countStates(): void {
    const counts = Object.fromEntries(APP_STATES.map((s) => [s, 0])) as Record<AppState, number>;
    for (const rec of this.apps.values()) counts[rec.state]++;
    for (const s of APP_STATES) this.metrics.appsByState.set({ state: s }, counts[s]);
  }
}

/** The worker's view of an app: everything it needs and nothing about routing. */
export function toSpec(app: AppConfig, cfg: Readonly<Config>): AppSpec {
  return {
    name: app.name,
    command: [...app.command],
    cwd: app.cwd!,
    env: { ...app.env },
    ports: [...(app.http ? [app.http.port] : []), ...(app.tcp ?? [])],
    readyTimeoutMs: app.readyTimeout ?? cfg.worker.readyTimeout,
    ...(app.memory !== undefined ? { memoryLimit: app.memory } : {}),
    ...(app.rootfs !== undefined ? { rootfs: app.rootfs } : {}),
    ...(app.bundle !== undefined ? { bundle: app.bundle } : {}),
    restore: app.restore,
  };
}

