import { setTimeout as delay } from 'node:timers/promises';
import { Pool } from 'undici';
import { PicoError, describeError, isPicoError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import type { WorkerConnection, WorkerEvent, WorkerRequest, WorkerResponse } from '../shared/protocol.js';
import { CALL_PATH, EVENTS_PATH, HEARTBEAT_MS, MAX_BODY_BYTES, MAX_RESPONSE_BYTES, checkFrame, checkResponse } from '../shared/worker-http.js';

export interface RemoteWorkerOptions {
  id: string;
  /** the agent's base URL, e.g. http://10.0.0.7:7401 */
  url: string;
  token: string;
  log: Logger;
  /** in ms: how long start, restore, checkpoint and stop may take before the call rejects */
  operationTimeoutMs: number;
  /** in ms: the same for list, logs and cached */
  queryTimeoutMs: number;
  /** in ms: establishing a TCP connection to the agent; default 5 s */
  connectTimeoutMs?: number;
  /** in ms: the agent's heartbeat period; silence for 3× this means the link is lost. Default HEARTBEAT_MS */
  heartbeatMs?: number;
}

const OPERATIONS = new Set<WorkerRequest['type']>(['start', 'restore', 'checkpoint', 'stop']);
/** in ms: reconnect attempts to an unreachable worker back off up to this */
const MAX_BACKOFF_MS = 5000;
/** in bytes: one event line can never be this long; longer means a broken peer */
const MAX_LINE_BYTES = 1024 * 1024;

/*
 * A worker in another process or on another machine, reached over the HTTP transport in
 * shared/worker-http.ts. Reachability is decided by the event stream alone:
 *
 *   (start) ── connect ok ──► reachable ── stream lost ──► connect again at once ── ok ──► reachable
 *      │                          ▲                             │ fails
 *      └──── connect fails ───────┼──────────────────────► unreachable ── retry, backoff 100 ms … 5 s
 *                                 └──────────── connect ok ─────┘
 *
 * A stream that breaks but reconnects at once (an agent restart, a dropped proxy connection)
 * never looks down; listeners still hear `true` again and resync. While unreachable, calls
 * reject at once, and calls in flight when it became unreachable are aborted, so a wake never
 * waits out the long operation timeout on a worker that is gone.
 */
export class RemoteWorkerConnection implements WorkerConnection {
  readonly id: string;
  private readonly pool: Pool;
  private readonly log: Logger;
  private readonly listeners = new Set<(ev: WorkerEvent) => void>();
  private readonly reachableListeners = new Set<(reachable: boolean) => void>();
  private readonly inflight = new Set<AbortController>();
  private readonly stopEvents = new AbortController();
  private isReachable = true; // optimistic until the first connect says otherwise
  private closed = false;
  private instance?: string;
  private lastSeq = 0;
  private readonly loop: Promise<void>;

  constructor(private readonly opts: RemoteWorkerOptions) {
    this.id = opts.id;
    this.log = opts.log.child({ worker: opts.id });
    const url = new URL(opts.url);
    this.pool = new Pool(url.origin, {
      connect: { timeout: opts.connectTimeoutMs ?? 5000 },
      // Our own per-call deadline bounds calls; the stream is bounded by its heartbeat.
      headersTimeout: 0,
      bodyTimeout: 0,
      keepAliveTimeout: 30_000,
    });
    this.loop = this.runEvents();
  }

  get reachable(): boolean {
    return this.isReachable;
  }

  onEvent(listener: (ev: WorkerEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  onReachable(listener: (reachable: boolean) => void): () => void {
    this.reachableListeners.add(listener);
    return () => this.reachableListeners.delete(listener);
  }

  async call(req: WorkerRequest): Promise<WorkerResponse> {
    if (this.closed) throw new PicoError('PICO_ERR_SHUTTING_DOWN', `connection to worker ${this.id} is closed`);
    if (!this.isReachable) throw new PicoError('PICO_ERR_WORKER_UNREACHABLE', `worker ${this.id} is unreachable`);
    const timeoutMs = OPERATIONS.has(req.type) ? this.opts.operationTimeoutMs : this.opts.queryTimeoutMs;
    const abort = new AbortController();
    const timer = setTimeout(
      () => abort.abort(new PicoError('PICO_ERR_WORKER_UNREACHABLE', `worker ${this.id} did not answer ${req.type} within ${timeoutMs} ms`)),
      timeoutMs,
    );
    this.inflight.add(abort);
    try {
      const res = await this.pool.request({
        path: CALL_PATH,
        method: 'POST',
        headers: { authorization: `Bearer ${this.opts.token}`, 'content-type': 'application/json' },
        body: JSON.stringify(req),
        signal: abort.signal,
      });
      const text = await readCapped(res.body, MAX_RESPONSE_BYTES);
      if (res.statusCode !== 200) {
        const err = parseError(text);
        throw new PicoError(
          res.statusCode === 401 ? 'PICO_ERR_UNAUTHORIZED' : 'PICO_ERR_BAD_REQUEST',
          `worker ${this.id} refused ${req.type} (HTTP ${res.statusCode}): ${err}`,
        );
      }
      let parsed: unknown;
      try {
        parsed = JSON.parse(text);
      } catch {
        throw new PicoError('PICO_ERR_BAD_REQUEST', `worker ${this.id} answered ${req.type} with something that is not JSON`);
      }
      const checked = checkResponse(parsed);
      if (!checked.ok) throw new PicoError('PICO_ERR_BAD_REQUEST', `worker ${this.id} answered ${req.type} with a malformed response: ${checked.reason}`);
      return checked.value;
    } catch (err) {
      if (abort.signal.aborted && isPicoError(abort.signal.reason)) throw abort.signal.reason;
      if (isPicoError(err)) throw err;
      throw new PicoError('PICO_ERR_WORKER_UNREACHABLE', `worker ${this.id} unreachable during ${req.type}: ${describeError(err)}`, { cause: err });
    } finally {
      clearTimeout(timer);
      this.inflight.delete(abort);
    }
  }

  /** Disconnects; the remote worker and its containers are not touched. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.stopEvents.abort();
    for (const c of this.inflight) c.abort(new PicoError('PICO_ERR_SHUTTING_DOWN', `connection to worker ${this.id} closed`));
    await this.loop;
    await this.pool.destroy();
  }

  /** `abortCalls`: the worker is silent (not merely refusing us), so calls in flight will never be answered. */
  private setReachable(reachable: boolean, detail: Record<string, unknown> = {}, abortCalls = true): void {
    const changed = reachable !== this.isReachable;
    this.isReachable = reachable;
    if (changed) {
      if (reachable) this.log.info({ url: this.opts.url, ...detail }, 'worker reachable');
      else this.log.warn({ url: this.opts.url, ...detail }, 'worker unreachable');
    }
    if (!reachable) {
      if (!changed) return;
      if (abortCalls) for (const c of this.inflight) c.abort(new PicoError('PICO_ERR_WORKER_UNREACHABLE', `worker ${this.id} became unreachable`));
    }
    for (const l of [...this.reachableListeners]) {
      try {
        l(reachable);
      } catch (err) {
        this.log.error({ err: describeError(err) }, 'reachability listener threw');
      }
    }
  }

  private async runEvents(): Promise<void> {
    let backoff = 100;
    let previousFailed = false;
    while (!this.closed) {
      let connectedAt = 0;
      try {
        await this.streamOnce(() => {
          connectedAt = Date.now();
          backoff = 100;
          previousFailed = false;
        });
        if (!this.closed) this.log.warn('worker event stream ended; reconnecting');
      } catch (err) {
        if (this.closed) break;
        if (connectedAt === 0) {
          // Could not (re)connect: the worker is down (or refuses us).
          this.setReachable(false, { err: describeError(err) }, !(err instanceof StreamRefused));
          if (!previousFailed) this.log.debug({ err: describeError(err) }, 'worker event stream: connect failed');
          previousFailed = true;
        } else {
          this.log.warn({ err: describeError(err) }, 'worker event stream lost; reconnecting');
        }
      }
      if (this.closed) break;
      // A stream that was up for a while reconnects at once; failures and flapping back off.
      if (connectedAt === 0 || Date.now() - connectedAt < 1000) {
        await delay(backoff, undefined, { signal: this.stopEvents.signal }).catch(() => undefined);
        backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
      }
    }
  }

  /** One event stream, from connect to its end. Calls `connected` after the hello line. */
  private async streamOnce(connected: () => void): Promise<void> {
    const silence = 3 * (this.opts.heartbeatMs ?? HEARTBEAT_MS);
    const abort = new AbortController();
    const onStop = () => abort.abort();
    this.stopEvents.signal.addEventListener('abort', onStop, { once: true });
    let idle: NodeJS.Timeout | undefined;
    const feed = () => {
      clearTimeout(idle);
      idle = setTimeout(() => abort.abort(new Error(`no heartbeat from worker ${this.id} for ${silence} ms`)), silence);
    };
    try {
      const query = this.instance ? `?instance=${encodeURIComponent(this.instance)}&after=${this.lastSeq}` : '';
      feed();
      const res = await this.pool.request({
        path: `${EVENTS_PATH}${query}`,
        method: 'GET',
        headers: { authorization: `Bearer ${this.opts.token}` },
        signal: abort.signal,
      });
      if (res.statusCode !== 200) {
        const text = await readCapped(res.body, MAX_BODY_BYTES).catch(() => '');
        throw new StreamRefused(`event stream refused (HTTP ${res.statusCode}): ${parseError(text)}`);
      }
      let pending = '';
      let greeted = false;
      for await (const chunk of res.body) {
        feed();
        pending += (chunk as Buffer).toString('utf8');
        if (pending.length > MAX_LINE_BYTES) throw new Error('event stream line too long');
        let nl: number;
        while ((nl = pending.indexOf('\n')) >= 0) {
          const line = pending.slice(0, nl).trim();
          pending = pending.slice(nl + 1);
          if (line === '') continue; // heartbeat
          let parsed: unknown;
          try {
            parsed = JSON.parse(line);
          } catch {
            throw new Error('event stream sent a line that is not JSON');
          }
          const frame = checkFrame(parsed);
          if (!frame.ok) throw new Error(`event stream sent a malformed frame: ${frame.reason}`);
          const f = frame.value;
          if ('hello' in f) {
            if (f.hello.worker !== this.id) {
              this.log.warn({ agentId: f.hello.worker }, 'the agent at this url calls itself by another id');
            }
            if (this.instance !== f.hello.instance) {
              // First contact: start from now. A restarted worker: its numbering starts over.
              if (this.instance) this.log.info('worker restarted (new agent instance)');
              this.lastSeq = this.instance ? 0 : f.hello.seq;
              this.instance = f.hello.instance;
            }
            greeted = true;
            connected();
            this.setReachable(true);
          } else if (greeted && f.seq > this.lastSeq) {
            this.lastSeq = f.seq;
            for (const l of [...this.listeners]) {
              try {
                l(f.event);
              } catch (err) {
                this.log.error({ err: describeError(err) }, 'worker event listener threw');
              }
            }
          }
        }
      }
    } catch (err) {
      if (abort.signal.aborted && abort.signal.reason instanceof Error) throw abort.signal.reason;
      throw err;
    } finally {
      clearTimeout(idle);
      this.stopEvents.signal.removeEventListener('abort', onStop);
      if (!abort.signal.aborted) abort.abort();
    }
  }
}

/** The agent answered the event stream with an error status: it is alive but will not serve us. */
class StreamRefused extends Error {}

async function readCapped(body: AsyncIterable<unknown> & { destroy?: (err?: Error) => unknown }, limit: number): Promise<string> {
  const parts: Buffer[] = [];
  let size = 0;
  for await (const chunk of body) {
    const b = chunk as Buffer;
    size += b.length;
    if (size > limit) {
      body.destroy?.();
      throw new PicoError('PICO_ERR_BAD_REQUEST', `response over ${limit} bytes`);
    }
    parts.push(b);
  }
  return Buffer.concat(parts).toString('utf8');
}

function parseError(text: string): string {
  try {
    const e = (JSON.parse(text) as { error?: { code?: string; message?: string } }).error;
    if (e) return `${e.code}: ${e.message}`;
  } catch {
    // not JSON
  }
  return text.slice(0, 200);
}
