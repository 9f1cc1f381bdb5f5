import { open } from 'node:fs/promises';
import { PicoError, describeError, isPicoError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import type { AppSpec, ContainerInfo, WorkerEvent, WorkerRequest, WorkerResponse } from '../shared/protocol.js';
import type { Container, ContainerRuntime } from './runtime.js';
import { KeyedQueue } from './keyed-queue.js';

/**
 * The worker agent: runs containers through one runtime and answers the control protocol.
 *
 * Operations on one app are serialised (a per-app promise chain), so a checkpoint can never
 * overlap a restore of the same app. A container that exits while no operation expects it
 * produces an `exited` event.
 */
export class Worker {
  private readonly containers = new Map<string, Container>();
  private readonly queue = new KeyedQueue();
  /** apps whose container is being removed on purpose: their exit is not an event */
  private readonly removing = new Set<string>();
  private readonly listeners = new Set<(ev: WorkerEvent) => void>();
  /** starts and restores in flight: a `stop` of the same app cancels them instead of queueing */
  private readonly starting = new Map<string, AbortController>();

  constructor(
    readonly id: string,
    private readonly runtime: ContainerRuntime,
    private readonly log: Logger,
  ) {}

  onEvent(listener: (ev: WorkerEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  async handle(req: WorkerRequest): Promise<WorkerResponse> {
    if (req.type === 'list') return { v: 1, type: 'list', containers: this.list(), images: await this.runtime.storedImages() };
    if (req.type === 'logs') return { v: 1, type: 'logs', app: req.app, text: await readTail(this.runtime.logFile(req.app), req.bytes) };
    if (req.type === 'cached') return { v: 1, type: 'cached', bytes: await this.cachedBytes(req.apps) };
    if (req.type === 'served') {
      this.runtime.served?.(req.app);
      return { v: 1, type: 'noted', app: req.app };
    }
    const app = typeof req.app === 'string' ? req.app : req.app.name;
    if (req.type === 'stop') this.starting.get(app)?.abort();
    // Registered before queueing, so a stop that arrives while the start waits its turn cancels it too.
    let cancel: AbortController | undefined;
    if ((req.type === 'start' || req.type === 'restore') && !this.starting.has(app)) {
      cancel = new AbortController();
      this.starting.set(app, cancel);
    }
    try {
      return await this.queue.run(app, () => this.perform(req, cancel?.signal));
    } catch (err) {
      this.log.warn({ app, op: req.type, err: describeError(err) }, 'worker operation failed');
      return { v: 1, type: 'error', code: isPicoError(err) ? err.code : 'PICO_ERR_INTERNAL', message: describeError(err) };
    } finally {
      if (cancel && this.starting.get(app) === cancel) this.starting.delete(app);
    }
  }

  /**
   * The worker's own clean shutdown (`picocenter worker` on SIGTERM): with `checkpoint`, swaps
   * every container out first (announcing each as a `checkpointed` event, so the gateway knows
   * the app is stored) and stops those that fail; then stops the rest and releases the runtime.
   */
  async shutdown(mode: 'stop' | 'checkpoint'): Promise<void> {
    if (mode === 'checkpoint') {
      // Wakes in flight are cancelled first: a half-started container is not worth an image.
      for (const c of this.starting.values()) c.abort();
      await Promise.all(
        [...this.containers.keys()].map(async (app) => {
          const res = await this.handle({ v: 1, type: 'checkpoint', app });
          if (res.type === 'checkpointed') this.emit({ v: 1, type: 'checkpointed', app, generation: res.generation });
          else this.log.error({ app, err: res.type === 'error' ? res.message : res.type }, 'checkpoint at shutdown failed; stopping the app');
        }),
      );
    }
    await this.stopAll();
  }

  /** Stops every container, then releases the runtime (clean shutdown). */
  async stopAll(): Promise<void> {
    const apps = new Set([...this.containers.keys(), ...this.starting.keys()]);
    await Promise.all([...apps].map((app) => this.handle({ v: 1, type: 'stop', app })));
    await this.runtime.close();
  }

  private async cachedBytes(apps: string[]): Promise<Record<string, number>> {
    const out: Record<string, number> = {};
    await Promise.all(
      apps.map(async (app) => {
        try {
          out[app] = (await this.runtime.cachedBytes?.(app)) ?? 0;
        } catch (err) {
          this.log.debug({ app, err: describeError(err) }, 'cached bytes unknown');
          out[app] = 0;
        }
      }),
    );
    return out;
  }

  private emit(ev: WorkerEvent): void {
    for (const l of this.listeners) l(ev);
  }

  private async perform(req: Exclude<WorkerRequest, { type: 'list' | 'logs' | 'cached' | 'served' }>, signal?: AbortSignal): Promise<WorkerResponse> {
    switch (req.type) {
      case 'start':
      case 'restore': {
        const existing = this.containers.get(req.app.name);
        if (existing) return { v: 1, type: 'running', app: req.app.name, endpoints: existing.endpoints, restored: false };
        if (signal?.aborted) throw new PicoError('PICO_ERR_SHUTTING_DOWN', `${req.type} of ${req.app.name} was cancelled`);
        const container =
          req.type === 'start' ? await this.runtime.start(req.app, signal) : await this.runtime.restore(req.app, signal, req.generation !== undefined ? { generation: req.generation } : {});
        this.adopt(req.app, container);
        return {
          v: 1,
          type: 'running',
          app: req.app.name,
          endpoints: container.endpoints,
          restored: req.type === 'restore' && this.runtime.keepsMemory,
        };
      }
      case 'checkpoint': {
        const container = this.containers.get(req.app);
        if (!container) return { v: 1, type: 'error', code: 'PICO_ERR_INVALID_STATE', message: `app ${req.app} has no container on worker ${this.id}` };
        this.removing.add(req.app);
        try {
          const result = await this.runtime.checkpoint(container);
          this.containers.delete(req.app);
          return { v: 1, type: 'checkpointed', app: req.app, generation: result.generation };
        } finally {
          // A failed checkpoint leaves the container running (the runtime's promise).
          this.removing.delete(req.app);
        }
      }
      case 'stop': {
        const container = this.containers.get(req.app);
        if (container) {
          this.removing.add(req.app);
          try {
            await this.runtime.stop(container);
            this.containers.delete(req.app);
          } finally {
            this.removing.delete(req.app);
          }
        }
        return { v: 1, type: 'stopped', app: req.app };
      }
    }
  }

  private adopt(spec: AppSpec, container: Container): void {
    this.containers.set(spec.name, container);
    void container.exited.then(({ code, signal, error }) => {
      if (this.containers.get(spec.name) !== container || this.removing.has(spec.name)) return;
      this.containers.delete(spec.name);
      this.log.warn({ app: spec.name, code, signal, err: error?.message }, 'container exited on its own');
      this.emit({ v: 1, type: 'exited', app: spec.name, code, signal, ...(error ? { error } : {}) });
    });
  }

  private list(): ContainerInfo[] {
    return [...this.containers.values()].map((c) => ({
      app: c.app,
      endpoints: c.endpoints,
      pid: c.pid,
      startedAt: c.startedAt.toISOString(),
    }));
  }
}

/** The last `bytes` of a file ('' when it does not exist yet). */
async function readTail(file: string, bytes: number): Promise<string> {
  let fh;
  try {
    fh = await open(file, 'r');
  } catch {
    return '';
  }
  try {
    const { size } = await fh.stat();
    const length = Math.min(size, Math.max(0, bytes));
    const buf = Buffer.alloc(length);
    await fh.read(buf, 0, length, size - length);
    return buf.toString('utf8');
  } finally {
    await fh.close();
  }
}
