import type { WorkerConnection, WorkerEvent, WorkerRequest, WorkerResponse } from '../../shared/protocol.js';

type Gate = { resolve: () => void; promise: Promise<void> };

function gate(): Gate {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { resolve, promise };
}

/**
 * A worker that runs nothing: it records every request and answers as a healthy worker would.
 * Tests can make the next operations fail, or hold them until released, to drive races.
 */
export class FakeWorker implements WorkerConnection {
  /** what `cached` reports: app → bytes */
  cached: Record<string, number> = {};
  /** while false, the worker looks down (placement sends it no wakes) */
  reachable = true;
  private readonly reachableListeners = new Set<(reachable: boolean) => void>();

  constructor(readonly id = 'fake') {}

  /** Makes the worker look down or up again, as a remote connection would report it. */
  setReachable(reachable: boolean): void {
    this.reachable = reachable;
    for (const l of this.reachableListeners) l(reachable);
  }

  onReachable(listener: (reachable: boolean) => void): () => void {
    this.reachableListeners.add(listener);
    return () => this.reachableListeners.delete(listener);
  }

  readonly calls: WorkerRequest[] = [];
  /** what a checkpoint reports it stored (null: no image, as a cold-start runtime) */
  checkpointGeneration: number | null = null;
  /** what `list` reports as stored */
  images: Array<{ app: string; generation: number }> = [];
  failNext: Partial<Record<WorkerRequest['type'], string>> = {};
  /** what runs here now, as `list` reports it: app → endpoints */
  readonly running = new Map<string, Record<number, { host: string; port: number }>>();
  private gates: Partial<Record<WorkerRequest['type'], Gate>> = {};
  private readonly listeners = new Set<(ev: WorkerEvent) => void>();

  /** Operations of `type` wait until release(type) is called. */
  block(type: WorkerRequest['type']): void {
    this.gates[type] = gate();
  }

  release(type: WorkerRequest['type']): void {
    const g = this.gates[type];
    delete this.gates[type];
    g?.resolve();
  }

  count(type: WorkerRequest['type']): number {
    return this.calls.filter((c) => c.type === type).length;
  }

  emit(ev: WorkerEvent): void {
    for (const l of this.listeners) l(ev);
  }

  async call(req: WorkerRequest): Promise<WorkerResponse> {
    this.calls.push(req);
    await this.gates[req.type]?.promise;
    const failure = this.failNext[req.type];
    if (failure) {
      delete this.failNext[req.type];
      return { v: 1, type: 'error', code: 'PICO_ERR_TEST', message: failure };
    }
    switch (req.type) {
      case 'start':
      case 'restore': {
        const endpoints = Object.fromEntries(req.app.ports.map((p) => [p, { host: '127.0.0.1', port: p + 10000 }]));
        this.running.set(req.app.name, endpoints);
        return { v: 1, type: 'running', app: req.app.name, endpoints, restored: req.type === 'restore' };
      }
      case 'checkpoint':
        this.running.delete(req.app);
        return { v: 1, type: 'checkpointed', app: req.app, generation: this.checkpointGeneration };
      case 'stop':
        this.running.delete(req.app);
        return { v: 1, type: 'stopped', app: req.app };
      case 'list':
        return {
          v: 1,
          type: 'list',
          containers: [...this.running].map(([app, endpoints]) => ({ app, endpoints, startedAt: new Date().toISOString() })),
          images: this.images,
        };
      case 'logs':
        return { v: 1, type: 'logs', app: req.app, text: '' };
      case 'cached':
        return { v: 1, type: 'cached', bytes: Object.fromEntries(req.apps.map((a) => [a, this.cached[a] ?? 0])) };
      case 'served':
        return { v: 1, type: 'noted', app: req.app };
    }
  }

  onEvent(listener: (ev: WorkerEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  async close(): Promise<void> {}
}
