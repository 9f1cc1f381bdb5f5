/*
 * An HTTP proxy in front of an S3 server that injects faults and models a slower network, for
 * tests of the s3 ObjectStore and for benchmarks ("20 ms per request, 100 MB/s").
 *
 *   const proxy = await startFaultProxy({ target: s3.endpoint });
 *   store = new S3ObjectStore({ endpoint: proxy.endpoint, ... });
 *   proxy.inject({ kind: 'status', status: 503, code: 'SlowDown' }, 2);   // the next 2 requests
 *   proxy.inject({ kind: 'drop-body' }, 1, (r) => r.method === 'GET');    // the next GET
 *   proxy.delayMs = 20; proxy.bytesPerSecond = 100e6;                      // every request from now on
 *   await proxy.close();
 *
 * Faults, each for the next `count` requests that `match` (default: any):
 *   status      answer with this status and an S3 XML error (code, message); the request's body
 *               is read first, as a server does
 *   drop        destroy the connection as soon as the request head arrived
 *   drop-body   forward, send the response head and `afterBytes` of its body (default half),
 *               then destroy the connection
 *   drop-response  forward (the server does the work), then destroy the connection instead
 *               of answering: the client cannot know whether its request took effect
 *   stall       never answer (until the client gives up or the proxy closes)
 * Requests keep their headers as sent (Host included), so SigV4 signatures still verify
 * upstream. The delay is added once per request, before it is forwarded. The bandwidth cap is
 * one token bucket per direction (uploads, downloads), shared by all connections: a full-duplex
 * link of that speed.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';

export type Fault =
  | { kind: 'status'; status: number; code?: string; message?: string }
  | { kind: 'drop' }
  | { kind: 'drop-body'; afterBytes?: number }
  | { kind: 'drop-response' }
  | { kind: 'stall' };

export interface ProxiedRequest {
  method: string;
  /** path and query, e.g. /pico/chunks/ab/abcd */
  path: string;
  /** Date.now() when it arrived (in `seen` only) */
  at?: number;
  /** Date.now() when the upstream's answer head came back, and when the answer was sent (in `seen` only) */
  headAt?: number;
  endAt?: number;
}

export interface FaultProxyOptions {
  /** the S3 server, e.g. http://127.0.0.1:PORT */
  target: string;
  /** added to every request. Default 0. */
  delayMs?: number;
  /** per direction; undefined = unlimited */
  bytesPerSecond?: number;
}

export interface FaultProxy {
  /** http://127.0.0.1:PORT */
  endpoint: string;
  /** The next `count` (default 1) requests that `match` get `fault`. Faults queue in order. */
  inject(fault: Fault, count?: number, match?: (req: ProxiedRequest) => boolean): void;
  /** Drops every queued fault. */
  clear(): void;
  delayMs: number;
  bytesPerSecond: number | undefined;
  /** every request seen, in order, with the fault it got */
  readonly seen: Array<ProxiedRequest & { fault?: Fault['kind'] }>;
  /** TCP connections accepted so far */
  readonly connections: number;
  close(): Promise<void>;
}

const DEFAULT_MESSAGES: Record<string, string> = {
  SlowDown: 'Please reduce your request rate.',
  InternalError: 'We encountered an internal error. Please try again.',
  ServiceUnavailable: 'Service is unable to handle request.',
};

/** Token bucket by reservation: each chunk books its transfer time after the previous one's. */
class Link {
  private nextFree = 0;
  constructor(private readonly rate: () => number | undefined) {}
  throttle(): Transform {
    return new Transform({
      transform: (chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback) => {
        const rate = this.rate();
        if (!rate) return cb(null, chunk);
        const now = performance.now();
        const start = Math.max(now, this.nextFree);
        this.nextFree = start + (chunk.length / rate) * 1000;
        const wait = this.nextFree - now;
        if (wait < 1) return cb(null, chunk);
        setTimeout(() => cb(null, chunk), wait);
      },
    });
  }
}

export async function startFaultProxy(options: FaultProxyOptions): Promise<FaultProxy> {
  const target = new URL(options.target);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });
  const queue: Array<{ fault: Fault; left: number; match: ((r: ProxiedRequest) => boolean) | undefined }> = [];
  const seen: Array<ProxiedRequest & { fault?: Fault['kind'] }> = [];
  let seq = 0;

  let connections = 0;
  const proxy: FaultProxy = {
    endpoint: '',
    get connections() {
      return connections;
    },
    delayMs: options.delayMs ?? 0,
    bytesPerSecond: options.bytesPerSecond,
    seen,
    inject(fault, count = 1, match) {
      queue.push({ fault, left: count, match });
    },
    clear() {
      queue.length = 0;
    },
    close: async () => {},
  };
  const up = new Link(() => proxy.bytesPerSecond);
  const down = new Link(() => proxy.bytesPerSecond);

  const takeFault = (r: ProxiedRequest): Fault | undefined => {
    const i = queue.findIndex((q) => !q.match || q.match(r));
    if (i < 0) return undefined;
    const q = queue[i]!;
    if (--q.left <= 0) queue.splice(i, 1);
    return q.fault;
  };

  const handle = async (req: http.IncomingMessage, res: http.ServerResponse): Promise<void> => {
    const r: ProxiedRequest = { method: req.method ?? 'GET', path: req.url ?? '/' };
    const fault = takeFault(r);
    const entry: ProxiedRequest & { fault?: Fault['kind'] } = fault ? { ...r, at: Date.now(), fault: fault.kind } : { ...r, at: Date.now() };
    seen.push(entry);
    if (fault?.kind === 'drop') {
      req.socket.destroy();
      return;
    }
    if (fault?.kind === 'stall') {
      req.resume();
      return;
    }
    if (proxy.delayMs > 0) await sleep(proxy.delayMs);
    if (fault?.kind === 'status') {
      req.resume();
      await new Promise((resolve) => req.once('end', resolve).once('error', resolve));
      const code = fault.code ?? (fault.status === 503 ? 'ServiceUnavailable' : 'InternalError');
      const id = `fault-${++seq}`;
      const body =
        `<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>${code}</Code><Message>${fault.message ?? DEFAULT_MESSAGES[code] ?? code}</Message>` +
        `<RequestId>${id}</RequestId></Error>`;
      res.writeHead(fault.status, { 'content-type': 'application/xml', 'x-amz-request-id': id, 'content-length': Buffer.byteLength(body) });
      res.end(req.method === 'HEAD' ? undefined : body);
      return;
    }
    const headers = { ...req.headers };
    delete headers.connection;
    delete headers['keep-alive'];
    const upstream = http.request({ host: target.hostname, port: target.port, method: req.method, path: req.url, headers, agent });
    const responded = new Promise<void>((resolve, reject) => {
      upstream.once('error', reject);
      upstream.once('response', (upRes) => {
        entry.headAt = Date.now();
        if (fault?.kind === 'drop-response') {
          upRes.resume();
          upRes.once('end', () => req.socket.destroy());
          resolve();
          return;
        }
        const h = { ...upRes.headers };
        delete h.connection;
        delete h['keep-alive'];
        res.writeHead(upRes.statusCode ?? 502, h);
        let body: NodeJS.ReadableStream = upRes;
        if (fault?.kind === 'drop-body') {
          const total = Number(upRes.headers['content-length'] ?? 0);
          let budget = fault.afterBytes ?? Math.floor(total / 2);
          body = upRes.pipe(
            new Transform({
              transform(chunk: Buffer, _enc, cb) {
                if (chunk.length < budget) {
                  budget -= chunk.length;
                  return cb(null, chunk);
                }
                const head = chunk.subarray(0, budget);
                budget = 0;
                // Flush what is allowed, then cut the connection mid-body.
                res.write(head, () => res.socket?.destroy());
                upRes.destroy();
                cb();
              },
            }),
          );
        }
        pipeline(body, down.throttle(), res).then(() => {
          entry.endAt = Date.now();
          resolve();
        }, reject);
      });
    });
    await pipeline(req, up.throttle(), upstream);
    await responded;
  };

  const server = http.createServer({ keepAlive: true }, (req, res) => {
    handle(req, res).catch(() => {
      if (!res.headersSent) {
        res.writeHead(502, { 'content-type': 'text/plain' });
        res.end('fault proxy: upstream failed');
      } else {
        res.socket?.destroy();
      }
    });
  });
  server.on('connection', () => connections++);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  proxy.endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  proxy.close = () =>
    new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
      agent.destroy();
    });
  return proxy;
}
