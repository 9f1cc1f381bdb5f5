import net, { type AddressInfo } from 'node:net';
import type { ListenAddress } from '../shared/config.js';
import type { Logger } from '../shared/log.js';
import type { Metrics } from '../shared/metrics.js';
import type { Hold } from './hold.js';
import { HttpConnection, type HttpContext } from './http-connection.js';
import type { AppLifecycle } from './lifecycle.js';
import type { RouteTable } from './routes.js';

export interface HttpListenerOptions {
  listen: ListenAddress;
  /** in bytes: the largest request head accepted (config gateway.http.maxHeaderSize) */
  maxHeaderSize: number;
  routes: RouteTable;
  hold: Hold;
  lifecycle: AppLifecycle;
  /** unused for now: connection and hold metrics are kept by the lifecycle and the hold */
  metrics: Metrics;
  log: Logger;
  /** in ms; default 30 s: an idle connection must deliver a complete request head within this */
  headerTimeoutMs?: number;
  /** in ms; default 10 s: connecting to a running app's endpoint, before the client gets 502 */
  connectTimeoutMs?: number;
}

/**
 * The HTTP/1.1 listener: apps are routed by Host, each client connection is forwarded as raw
 * bytes to one upstream connection (see HttpConnection). The chain, outermost first:
 *
 *   accept → scan request head (400/431/501/505) → route by Host (404) → hold until the app
 *   has an endpoint (503/504) → connect (502) → forward bytes both ways
 *
 * Lifecycle: start() listens; stop() closes the listener and every connection and works after
 * a failed or partial start.
 */
export class HttpListener {
  private readonly opts: HttpListenerOptions;
  private readonly ctx: HttpContext;
  private server: net.Server | null = null;
  private sweep: NodeJS.Timeout | null = null;
  private nextId = 1;

  constructor(opts: HttpListenerOptions) {
    this.opts = opts;
    const headerTimeoutMs = opts.headerTimeoutMs ?? 30_000;
    this.ctx = {
      routes: opts.routes,
      hold: opts.hold,
      lifecycle: opts.lifecycle,
      log: opts.log.child({ listener: 'http' }),
      maxHeaderSize: opts.maxHeaderSize,
      headerTimeoutMs,
      connectTimeoutMs: opts.connectTimeoutMs ?? 10_000,
      now: Date.now(),
      connections: new Set(),
    };
  }

  async start(): Promise<AddressInfo> {
    if (this.server) throw new Error('the HTTP listener is started already');
    const server = net.createServer({ allowHalfOpen: true, noDelay: true }, (socket) => {
      const conn = new HttpConnection(socket, this.ctx, this.nextId++);
      this.ctx.connections.add(conn);
    });
    this.server = server;
    server.on('error', (err) => this.ctx.log.error({ err: err.message }, 'HTTP listener error'));
    // Timeouts are checked by one coarse sweep, so the request path never arms a timer.
    const sweepMs = Math.max(50, Math.min(1000, Math.floor(this.ctx.headerTimeoutMs / 10)));
    this.sweep = setInterval(() => {
      const now = (this.ctx.now = Date.now());
      for (const conn of this.ctx.connections) conn.tick(now);
    }, sweepMs);
    this.sweep.unref();
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error): void => reject(err);
      server.once('error', onError);
      server.listen(this.opts.listen.port, this.opts.listen.host, () => {
        server.removeListener('error', onError);
        resolve();
      });
    });
    const addr = server.address() as AddressInfo;
    this.ctx.log.info({ address: addr.address, port: addr.port }, 'HTTP listener started');
    return addr;
  }

  async stop(): Promise<void> {
    if (this.sweep) clearInterval(this.sweep);
    this.sweep = null;
    const server = this.server;
    this.server = null;
    for (const conn of [...this.ctx.connections]) conn.destroy();
    if (server?.listening) await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  /** Client connections open right now. */
  get connectionCount(): number {
    return this.ctx.connections.size;
  }
}
