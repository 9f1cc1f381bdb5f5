import type { WorkerConnection, WorkerEvent, WorkerRequest, WorkerResponse } from '../shared/protocol.js';
import type { Worker } from './worker.js';

/**
 * A worker in the same process, reached through the same protocol a remote one speaks.
 * Messages are cloned both ways so nothing can depend on sharing objects with the worker.
 */
export class LocalWorkerConnection implements WorkerConnection {
  readonly id: string;
  constructor(private readonly worker: Worker) {
    this.id = worker.id;
  }

  async call(req: WorkerRequest): Promise<WorkerResponse> {
    return structuredClone(await this.worker.handle(structuredClone(req)));
  }

  onEvent(listener: (ev: WorkerEvent) => void): () => void {
    return this.worker.onEvent((ev) => listener(structuredClone(ev)));
  }

  async close(): Promise<void> {
    await this.worker.stopAll();
  }
}
