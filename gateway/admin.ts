import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { ListenAddress } from '../shared/config.js';
import { isPicoError, type ErrorCode } from '../shared/errors.js';
import { bearerCheck, jsonServer, listenOn, sendError, sendJson } from '../shared/json-http.js';
import type { Logger } from '../shared/log.js';
import type { Metrics } from '../shared/metrics.js';
import type { Hold } from './hold.js';
import type { Placement } from './placement.js';
import type { RouteTable } from './routes.js';

/*
 * The admin API, on its own listener. Every route but /healthz needs `Authorization: Bearer
 * <token>`. Routes:
 *   GET  /healthz                       liveness, no token
 *   GET  /metrics                       Prometheus text format
 *   GET  /v1/apps                       status of every app
 *   GET  /v1/apps/NAME                  status of one app
 *   POST /v1/apps/NAME/wake             wake and wait (through the hold) until it runs
 *   POST /v1/apps/NAME/checkpoint       swap a running app out and wait until it is stored
 *   GET  /v1/apps/NAME/logs?bytes=N     the tail of the app's stdout/stderr (default 64 KiB)
 *   GET  /v1/workers                    every worker: id, reachable, apps running or waking there
 * Errors are JSON `{ error: { code, message } }` with a stable code.
 */

const STATUS_OF: Partial<Record<ErrorCode, number>> = {
  PICO_ERR_UNKNOWN_APP: 404,
  PICO_ERR_INVALID_STATE: 409,
  PICO_ERR_HOLD_TIMEOUT: 504,
  PICO_ERR_HOLD_QUEUE_FULL: 503,
  PICO_ERR_WAKE_FAILED: 502,
  PICO_ERR_CHECKPOINT_FAILED: 502,
};

export interface AdminServerOptions {
  listen: ListenAddress;
  token: string;
  placement: Placement;
  routes: RouteTable;
  hold: Hold;
  metrics: Metrics;
  log: Logger;
}

export class AdminServer {
  private readonly server: http.Server;
  private readonly authorized: (req: http.IncomingMessage) => boolean;
  private readonly log: Logger;

  constructor(private readonly opts: AdminServerOptions) {
    this.authorized = bearerCheck(opts.token);
    this.log = opts.log.child({ component: 'admin' });
    // wake and checkpoint may take long; bounded by the hold
    this.server = jsonServer(this.log, 'admin', (req, res) => this.route(req, res));
  }

  async start(): Promise<AddressInfo> {
    return listenOn(this.server, this.opts.listen);
  }

  async stop(): Promise<void> {
    if (!this.server.listening) return;
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }


  private async route(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://admin');
    const parts = url.pathname.split('/').filter(Boolean);
    if (url.pathname === '/healthz') return sendJson(res, 200, { ok: true });
    if (!this.authorized(req)) {
      res.setHeader('www-authenticate', 'Bearer realm="picocenter"');
      return sendError(res, 401, 'PICO_ERR_UNAUTHORIZED', 'missing or wrong bearer token');
    }
    const { placement, routes, hold, metrics } = this.opts;
    if (url.pathname === '/metrics' && req.method === 'GET') {
      const body = await metrics.registry.metrics();
      res.writeHead(200, { 'content-type': metrics.registry.contentType });
      res.end(body);
      return;
    }
    if (url.pathname === '/v1/workers' && req.method === 'GET') return sendJson(res, 200, { workers: placement.workerStatus() });
    if (parts[0] !== 'v1' || parts[1] !== 'apps') return sendError(res, 404, 'PICO_ERR_NOT_FOUND', `no route ${url.pathname}`);
    if (parts.length === 2 && req.method === 'GET') return sendJson(res, 200, { apps: placement.status() });
    const name = decodeURIComponent(parts[2] ?? '');
    const route = routes.apps.get(name);
    if (!route) return sendError(res, 404, 'PICO_ERR_UNKNOWN_APP', `no app named ${name}`);
    const statusOf = () => placement.status().find((a) => a.name === name);
    try {
      if (parts.length === 3 && req.method === 'GET') return sendJson(res, 200, statusOf());
      if (parts.length === 4 && req.method === 'POST' && parts[3] === 'wake') {
        const port = route.httpPort ?? route.tcpPorts[0]!;
        const aborted = new AbortController();
        res.on('close', () => aborted.abort());
        await hold.waitForReady(route, port, 'admin', aborted.signal);
        return sendJson(res, 200, statusOf());
      }
      if (parts.length === 4 && req.method === 'GET' && parts[3] === 'logs') {
        const bytes = Math.min(Number(url.searchParams.get('bytes') ?? 65536) || 65536, 16 * 1024 * 1024);
        const text = await placement.logs(name, bytes);
        res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8', 'content-length': Buffer.byteLength(text) });
        res.end(text);
        return;
      }
      if (parts.length === 4 && req.method === 'POST' && parts[3] === 'checkpoint') {
        await placement.checkpoint(name);
        return sendJson(res, 200, statusOf());
      }
    } catch (err) {
      if (isPicoError(err)) return sendError(res, STATUS_OF[err.code] ?? 500, err.code, err.message);
      throw err;
    }
    return sendError(res, 405, 'PICO_ERR_METHOD', `${req.method} ${url.pathname} is not supported`);
  }
}

