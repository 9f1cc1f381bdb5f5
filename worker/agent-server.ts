import { randomUUID } from 'node:crypto';
import http from 'node:http';
import type { Registry } from 'prom-client';
import type { AddressInfo } from 'node:net';
import type { ListenAddress } from '../shared/config.js';
import { describeError } from '../shared/errors.js';
import { bearerCheck, jsonServer, listenOn, sendError, sendJson } from '../shared/json-http.js';
import type { Logger } from '../shared/log.js';
import type { WorkerEvent, WorkerRequest, WorkerResponse } from '../shared/protocol.js';
import { CALL_PATH, EVENTS_PATH, EVENT_BUFFER, HEARTBEAT_MS, MAX_BODY_BYTES, checkRequest, type EventFrame } from '../shared/worker-http.js';

/** What the agent serves: a Worker, or anything that answers the protocol like one (tests). */
export interface ServedWorker {
  readonly id: string;
  handle(req: WorkerRequest): Promise<WorkerResponse>;
  onEvent(listener: (ev: WorkerEvent) => void): () => void;
}

export interface AgentServerOptions {
  worker: ServedWorker;
  listen: ListenAddress;
  /** the bearer token every route but /healthz needs */
  token: string;
  log: Logger;
  /** in ms; default HEARTBEAT_MS (tests shorten it) */
  heartbeatMs?: number;
  /** served at GET /metrics (Prometheus text, bearer token required) */
  metrics?: Registry;
}

/**
 * The worker agent: serves one worker over HTTP/1.1 (the transport in shared/worker-http.ts), so
 * a gateway in another process or on another machine can use it.
 *
 * Lifecycle: start() listens; stop() stops accepting, ends the event streams and closes every
 * connection (calls still in flight are cut: their gateway sees the worker as unreachable).
 * The worker itself is not stopped here: its owner decides between stop and checkpoint.
 */
export class AgentServer {
  private readonly server: http.Server;
  private readonly authorized: (req: http.IncomingMessage) => boolean;
  private readonly log: Logger;
  /** one per agent process: a client that saw another instance missed a restart */
  readonly instance = randomUUID();
  private seq = 0;
  private readonly buffer: Array<{ seq: number; event: WorkerEvent }> = [];
  private readonly streams = new Set<http.ServerResponse>();
  private readonly unsubscribe: () => void;
  private heartbeat?: NodeJS.Timeout;
  private draining = false;

  constructor(private readonly opts: AgentServerOptions) {
    this.authorized = bearerCheck(opts.token);
    this.log = opts.log.child({ component: 'agent', worker: opts.worker.id });
    // a checkpoint of a big app takes minutes; the client bounds it
    this.server = jsonServer(this.log, 'agent', (req, res) => this.route(req, res));
    this.server.keepAliveTimeout = 60_000;
    this.unsubscribe = opts.worker.onEvent((event) => this.publish(event));
  }

  async start(): Promise<AddressInfo> {
    const addr = await listenOn(this.server, this.opts.listen);
    this.heartbeat = setInterval(() => {
      for (const s of this.streams) s.write('\n');
    }, this.opts.heartbeatMs ?? HEARTBEAT_MS);
    this.heartbeat.unref();
    return addr;
  }

  /**
   * From now on every call is answered PICO_ERR_SHUTTING_DOWN (a wake fails at once, cleanly),
   * while event streams stay open: the worker's shutdown events still reach the gateways.
   */
  drain(): void {
    this.draining = true;
  }

  async stop(): Promise<void> {
    this.unsubscribe();
    clearInterval(this.heartbeat);
    for (const s of this.streams) s.end();
    this.streams.clear();
    if (!this.server.listening) return;
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  private publish(event: WorkerEvent): void {
    const frame = { seq: ++this.seq, event };
    this.buffer.push(frame);
    if (this.buffer.length > EVENT_BUFFER) this.buffer.shift();
    const line = `${JSON.stringify(frame)}\n`;
    for (const s of this.streams) s.write(line);
  }


  private async route(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://agent');
    if (url.pathname === '/healthz') return sendJson(res, 200, { ok: true, worker: this.opts.worker.id });
    if (!this.authorized(req)) {
      req.resume();
      res.setHeader('www-authenticate', 'Bearer realm="picocenter-worker"');
      return sendError(res, 401, 'PICO_ERR_UNAUTHORIZED', 'missing or wrong bearer token');
    }
    if (url.pathname === CALL_PATH && req.method === 'POST') return this.call(req, res);
    if (url.pathname === EVENTS_PATH && req.method === 'GET') return this.events(url, req, res);
    if (url.pathname === '/metrics' && req.method === 'GET' && this.opts.metrics) {
      req.resume();
      res.setHeader('content-type', this.opts.metrics.contentType);
      return void res.end(await this.opts.metrics.metrics());
    }
    req.resume();
    return sendError(res, 404, 'PICO_ERR_NOT_FOUND', `no route ${req.method} ${url.pathname}`);
  }

  private async call(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const body = await readBody(req, MAX_BODY_BYTES);
    if (body === undefined) {
      // Answer, then drop the connection: the rest of the oversized body is not worth reading.
      res.setHeader('connection', 'close');
      sendError(res, 400, 'PICO_ERR_BAD_REQUEST', `request body over ${MAX_BODY_BYTES} bytes`);
      return;
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(body.toString('utf8'));
    } catch {
      return sendError(res, 400, 'PICO_ERR_BAD_REQUEST', 'request body is not JSON');
    }
    const checked = checkRequest(parsed);
    if (!checked.ok) return sendError(res, 400, 'PICO_ERR_BAD_REQUEST', `not a worker request: ${checked.reason}`);
    const request = checked.value;
    let answer: WorkerResponse;
    try {
      answer = this.draining
        ? { v: 1, type: 'error', code: 'PICO_ERR_SHUTTING_DOWN', message: `worker ${this.opts.worker.id} is shutting down` }
        : await this.opts.worker.handle(request);
    } catch (err) {
      // Worker.handle answers app-level failures itself; this is anything it let through.
      answer = { v: 1, type: 'error', code: 'PICO_ERR_INTERNAL', message: describeError(err) };
    }
    this.log.debug({ op: request.type, answer: answer.type }, 'call answered');
    sendJson(res, 200, answer);
  }

  private events(url: URL, req: http.IncomingMessage, res: http.ServerResponse): void {
    const sameInstance = url.searchParams.get('instance') === this.instance;
    const firstConnect = !url.searchParams.has('instance');
    const after = sameInstance ? Number(url.searchParams.get('after') ?? 0) || 0 : 0;
    res.writeHead(200, { 'content-type': 'application/x-ndjson', 'cache-control': 'no-store' });
    res.flushHeaders();
    const hello: EventFrame = { hello: { worker: this.opts.worker.id, instance: this.instance, seq: this.seq } };
    res.write(`${JSON.stringify(hello)}\n`);
    // A first connection has nothing to catch up on: what runs now, it learns with `list`.
    if (!firstConnect) for (const f of this.buffer) if (f.seq > after) res.write(`${JSON.stringify(f)}\n`);
    this.streams.add(res);
    this.log.info({ replayedAfter: firstConnect ? null : after }, 'gateway subscribed to events');
    const done = () => this.streams.delete(res);
    req.on('close', done);
    res.on('close', done);
  }
}

/** The body, or undefined when it exceeds `limit` bytes. */
function readBody(req: http.IncomingMessage, limit: number): Promise<Buffer | undefined> {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers['content-length'] ?? 0);
    if (declared > limit) {
      req.resume();
      return resolve(undefined);
    }
    const parts: Buffer[] = [];
    let size = 0;
    req.on('data', (d: Buffer) => {
      size += d.length;
      if (size > limit) {
        req.removeAllListeners('data');
        req.resume();
        resolve(undefined);
        return;
      }
      parts.push(d);
    });
    req.on('end', () => resolve(Buffer.concat(parts)));
    req.on('error', reject);
  });
}

