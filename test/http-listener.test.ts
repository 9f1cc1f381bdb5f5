import assert from 'node:assert/strict';
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { Client, Pool, request } from 'undici';
import { parseConfig } from '../shared/config.js';
import { silentLogger } from '../shared/log.js';
import { Metrics } from '../shared/metrics.js';
import { Hold } from '../gateway/hold.js';
import { BODY_CHUNKED, BODY_CLOSE, BODY_LENGTH, BODY_NONE, ChunkedScanner, RequestHead, ResponseHead } from '../gateway/http-head.js';
import { HttpListener } from '../gateway/http-listener.js';
import { RouteTable } from '../gateway/routes.js';
import { FakeLifecycle } from './helpers/fake-lifecycle.js';
import { until } from './helpers/poll.js';

const CONFIG = `
gateway:
  dns: { zones: [apps.test] }
  admin: { token: test-token-123 }
  http: { listen: 127.0.0.1:0, maxHeaderSize: 4Ki }
apps:
  - { name: web, domains: [web.apps.test, www.apps.test], command: [node, x.js], http: { port: 9001 } }
  - { name: api, domains: [api.apps.test], command: [node, x.js], http: { port: 9002 } }
  - { name: sleepy, domains: [sleepy.apps.test], command: [node, x.js], http: { port: 9003 }, hold: { timeout: 300ms, queue: 3 } }
  - { name: many, domains: [many.apps.test], command: [node, x.js], http: { port: 9004 } }
  - { name: dead, domains: [dead.apps.test], command: [node, x.js], http: { port: 9005 } }
  - { name: flaky, domains: [flaky.apps.test], command: [node, x.js], http: { port: 9006 } }
  - { name: raw, domains: [raw.apps.test], command: [node, x.js], tcp: [7000], address: 127.0.1.9 }
`;

// ─── upstream apps ───────────────────────────────────────────────────────────

interface Upstream {
  name: string;
  server: http.Server;
  port: number;
  /** TCP connections the gateway opened to this app */
  connections: number;
  /** requests this app received */
  requests: number;
  /** resolves the /stream response's second half */
  releaseStream: (() => void) | null;
}

async function startUpstream(name: string): Promise<Upstream> {
  const up: Upstream = { name, server: http.createServer(), port: 0, connections: 0, requests: 0, releaseStream: null };
  const server = up.server;
  server.keepAliveTimeout = 60_000;
  server.on('connection', () => up.connections++);
  server.on('request', (req, res) => {
    up.requests++;
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const url = req.url ?? '';
      res.setHeader('x-app', name);
      if (url === '/stream') {
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.write('first;');
        up.releaseStream = () => res.end('second');
      } else if (url === '/chunked') {
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.write('a'.repeat(10));
        setImmediate(() => {
          res.write('b'.repeat(20_000));
          setImmediate(() => res.end('c'));
        });
      } else if (url === '/204') {
        res.writeHead(204).end();
      } else if (url === '/304') {
        res.writeHead(304, { etag: '"x"' }).end();
      } else if (url.startsWith('/big/')) {
        const size = Number(url.slice(5));
        res.writeHead(200, { 'content-length': size });
        const block = Buffer.alloc(64 * 1024, 'x');
        let left = size;
        const pump = (): void => {
          while (left > 0) {
            const n = Math.min(left, block.length);
            left -= n;
            if (!res.write(block.subarray(0, n))) return void res.once('drain', pump);
          }
          res.end();
        };
        pump();
      } else {
        const body = JSON.stringify({ app: name, method: req.method, url, headers: req.headers, body: Buffer.concat(chunks).toString() });
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
        res.end(body);
      }
    });
  });
  // A toy upgrade protocol: after 101, every byte comes back upper-cased.
  server.on('upgrade', (req, socket, head) => {
    socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: shout\r\nConnection: Upgrade\r\n\r\n');
    const shout = (b: Buffer): void => void socket.write(b.toString().toUpperCase());
    if (head.length) shout(head);
    socket.on('data', shout);
    socket.on('end', () => socket.end());
    socket.on('error', () => socket.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  up.port = (server.address() as AddressInfo).port;
  return up;
}

// ─── raw client helpers ──────────────────────────────────────────────────────

/** Sends `data` on a fresh connection and returns everything received until the gateway closes. */
function rawExchange(port: number, data: string | Buffer): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, '127.0.0.1');
    const got: Buffer[] = [];
    sock.on('data', (c) => got.push(c));
    sock.on('error', reject);
    sock.on('close', () => resolve(Buffer.concat(got).toString('latin1')));
    sock.write(data);
  });
}

/** A raw connection that collects what it receives. */
function rawConnection(port: number): Promise<{ sock: net.Socket; received: () => string; closed: () => boolean }> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, '127.0.0.1');
    const got: Buffer[] = [];
    let closed = false;
    sock.on('data', (c) => got.push(c));
    sock.on('close', () => (closed = true));
    sock.on('error', () => {});
    sock.once('connect', () => resolve({ sock, received: () => Buffer.concat(got).toString('latin1'), closed: () => closed }));
    sock.once('error', reject);
  });
}

function statusOf(raw: string): number {
  return Number(raw.slice(9, 12));
}

function countResponses(raw: string): number {
  return raw.split('HTTP/1.1 ').length - 1;
}

// ─── the harness ─────────────────────────────────────────────────────────────

describe('HttpListener', () => {
  let web: Upstream;
  let api: Upstream;
  let lifecycle: FakeLifecycle;
  let metrics: Metrics;
  let hold: Hold;
  let routes: RouteTable;
  let listener: HttpListener;
  let port: number;
  let origin: string;
  const clients: Array<Client | Pool> = [];
  const extraListeners: HttpListener[] = [];

  before(async () => {
    web = await startUpstream('web');
    api = await startUpstream('api');
    const cfg = parseConfig(CONFIG, 'test.yaml');
    routes = new RouteTable(cfg);
    lifecycle = new FakeLifecycle();
    lifecycle.run('web', { 9001: { host: '127.0.0.1', port: web.port } });
    lifecycle.run('api', { 9002: { host: '127.0.0.1', port: api.port } });
    metrics = new Metrics();
    hold = new Hold(lifecycle, metrics, silentLogger());
    listener = new HttpListener({
      listen: cfg.gateway.http.listen, maxHeaderSize: cfg.gateway.http.maxHeaderSize, routes, hold, lifecycle, metrics, log: silentLogger(),
    });
    port = (await listener.start()).port;
    origin = `http://127.0.0.1:${port}`;
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.destroy()));
    await Promise.all(extraListeners.map((l) => l.stop()));
    await listener.stop();
    web.server.closeAllConnections();
    api.server.closeAllConnections();
    await Promise.all([web, api].map((u) => new Promise((r) => u.server.close(r))));
  });

  function client(opts: ConstructorParameters<typeof Client>[1] = {}): Client {
    const c = new Client(origin, { pipelining: 1, ...opts });
    clients.push(c);
    return c;
  }

  async function get(c: Client | Pool, host: string, path = '/', method: 'GET' | 'HEAD' = 'GET') {
    const res = await c.request({ path, method, headers: { host } });
    const text = await res.body.text();
    return { status: res.statusCode, headers: res.headers, text, json: () => JSON.parse(text) };
  }

  describe('routing', () => {
    it('routes by Host, case-insensitively and ignoring the port', async () => {
      const c = client();
      assert.equal((await get(c, 'web.apps.test')).json().app, 'web');
      assert.equal((await get(c, 'WWW.Apps.Test:8080')).json().app, 'web');
      assert.equal((await get(c, 'API.apps.test.')).json().app, 'api');
    });

    it('answers 404 with a short text body for an unknown host', async () => {
      const res = await request(origin, { headers: { host: 'nope.apps.test' } });
      assert.equal(res.statusCode, 404);
      assert.match(res.headers['content-type'] as string, /^text\/plain/);
      assert.match(await res.body.text(), /no app/);
    });

    it('answers 404 for an app without an HTTP port', async () => {
      const raw = await rawExchange(port, 'GET / HTTP/1.1\r\nHost: raw.apps.test\r\n\r\n');
      assert.equal(statusOf(raw), 404);
    });

    it('answers 400 when an HTTP/1.1 request has no Host', async () => {
      const raw = await rawExchange(port, 'GET / HTTP/1.1\r\nAccept: */*\r\n\r\n');
      assert.equal(statusOf(raw), 400);
      assert.match(raw, /\r\nConnection: close\r\n/i);
    });

    it('switches upstream when a later request on the connection is for another app', async () => {
      const c = client();
      const apps: string[] = [];
      for (const host of ['web.apps.test', 'api.apps.test', 'api.apps.test', 'web.apps.test']) apps.push((await get(c, host)).json().app);
      assert.deepEqual(apps, ['web', 'api', 'api', 'web']);
    });

    it('keeps pipelined responses in order across a host switch', async () => {
      const req = (host: string, path: string) => `GET ${path} HTTP/1.1\r\nHost: ${host}\r\n\r\n`;
      const raw = await rawExchange(
        port,
        req('web.apps.test', '/1') + req('api.apps.test', '/2') + req('web.apps.test', '/3') +
          'GET /4 HTTP/1.1\r\nHost: api.apps.test\r\nConnection: close\r\n\r\n',
      );
      const bodies = [...raw.matchAll(/\{"app":"(\w+)","method":"GET","url":"(\/\d)"/g)].map((m) => `${m[1]}${m[2]}`);
      assert.deepEqual(bodies, ['web/1', 'api/2', 'web/3', 'api/4']);
    });
  });

  describe('forwarding', () => {
    it('serves many requests on one keep-alive connection through one upstream connection', async () => {
      const before = web.connections;
      const c = client();
      for (let i = 0; i < 200; i++) assert.equal((await get(c, 'web.apps.test', `/n${i}`)).json().url, `/n${i}`);
      assert.equal(web.connections - before, 1);
    });

    it('answers pipelined requests in order', async () => {
      const reqs = Array.from({ length: 5 }, (_, i) => `GET /p${i} HTTP/1.1\r\nHost: web.apps.test\r\n\r\n`).join('');
      const raw = await rawExchange(port, `${reqs}GET /last HTTP/1.1\r\nHost: web.apps.test\r\nConnection: close\r\n\r\n`);
      const urls = [...raw.matchAll(/"url":"([^"]+)"/g)].map((m) => m[1]);
      assert.deepEqual(urls, ['/p0', '/p1', '/p2', '/p3', '/p4', '/last']);
    });

    it('answers a deep pipeline in order, beyond what it forwards at once', async () => {
      const reqs = Array.from({ length: 300 }, (_, i) => `GET /d${i} HTTP/1.1\r\nHost: web.apps.test\r\n\r\n`).join('');
      const raw = await rawExchange(port, `${reqs}GET /last HTTP/1.1\r\nHost: web.apps.test\r\nConnection: close\r\n\r\n`);
      const urls = [...raw.matchAll(/"url":"([^"]+)"/g)].map((m) => m[1]);
      assert.deepEqual(urls, [...Array.from({ length: 300 }, (_, i) => `/d${i}`), '/last']);
    });

    it('answers a client that half-closes after its request', async () => {
      const raw = await new Promise<string>((resolve, reject) => {
        const sock = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
        const got: Buffer[] = [];
        sock.on('data', (c) => got.push(c));
        sock.on('error', reject);
        sock.on('end', () => resolve(Buffer.concat(got).toString()));
        sock.end('GET /half HTTP/1.1\r\nHost: web.apps.test\r\n\r\n');
      });
      assert.equal(statusOf(raw), 200);
      assert.match(raw, /"url":"\/half"/);
    });

    it('answers pipelined requests from undici', async () => {
      const c = client({ pipelining: 10 });
      const all = await Promise.all(Array.from({ length: 30 }, (_, i) => get(c, 'web.apps.test', `/q${i}`)));
      assert.deepEqual(all.map((r) => r.json().url), Array.from({ length: 30 }, (_, i) => `/q${i}`));
    });

    it('passes request bodies with Content-Length and chunked, then the connection goes on', async () => {
      const c = client();
      const a = await c.request({ path: '/post', method: 'POST', headers: { host: 'web.apps.test' }, body: 'x'.repeat(100_000) });
      const ja = (await a.body.json()) as { body: string; headers: Record<string, string> };
      assert.equal(ja.body.length, 100_000);
      assert.equal(ja.headers['content-length'], '100000');

      async function* pieces() {
        yield 'hello ';
        yield 'chunked ';
        yield 'y'.repeat(50_000);
      }
      const b = await c.request({ path: '/post', method: 'POST', headers: { host: 'web.apps.test' }, body: Readable.from(pieces()) });
      const jb = (await b.body.json()) as { body: string; headers: Record<string, string> };
      assert.equal(jb.headers['transfer-encoding'], 'chunked');
      assert.equal(jb.body, `hello chunked ${'y'.repeat(50_000)}`);

      assert.equal((await get(c, 'web.apps.test', '/after')).json().url, '/after');
    });

    it('passes a chunked body with extensions and trailers unchanged', async () => {
      const body = '5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n';
      const raw = await rawExchange(
        port,
        `POST /t HTTP/1.1\r\nHost: web.apps.test\r\nTransfer-Encoding: chunked\r\n\r\n${body}GET /next HTTP/1.1\r\nHost: web.apps.test\r\nConnection: close\r\n\r\n`,
      );
      assert.equal(countResponses(raw), 2);
      assert.match(raw, /"body":"hello"/);
      assert.match(raw, /"url":"\/next"/);
    });

    it('streams a long-lived response without buffering it', async () => {
      const c = client();
      const res = await c.request({ path: '/stream', method: 'GET', headers: { host: 'web.apps.test' } });
      const it = res.body[Symbol.asyncIterator]();
      const first = await it.next();
      assert.equal(Buffer.from(first.value as Buffer).toString(), 'first;'); // arrived while the app still holds the rest
      await until(() => web.releaseStream, 'the stream handler');
      web.releaseStream!();
      web.releaseStream = null;
      let rest = '';
      for (let r = await it.next(); !r.done; r = await it.next()) rest += Buffer.from(r.value as Buffer).toString();
      assert.equal(rest, 'second');
      assert.equal((await get(c, 'web.apps.test', '/after-stream')).json().url, '/after-stream');
    });

    it('passes chunked responses and keeps the connection', async () => {
      const c = client();
      const r = await get(c, 'web.apps.test', '/chunked');
      assert.equal(r.text, `${'a'.repeat(10)}${'b'.repeat(20_000)}c`);
      assert.equal(r.headers['transfer-encoding'], 'chunked');
      assert.equal((await get(c, 'web.apps.test', '/after')).json().url, '/after');
    });

    it('passes a large response with backpressure', async () => {
      const c = client();
      const res = await c.request({ path: `/big/${8 * 1024 * 1024}`, method: 'GET', headers: { host: 'web.apps.test' } });
      let n = 0;
      for await (const chunk of res.body) {
        n += (chunk as Buffer).length;
        if (n < 1024 * 1024) await new Promise((r) => setTimeout(r, 1)); // a slow reader at first
      }
      assert.equal(n, 8 * 1024 * 1024);
    });

    it('knows that HEAD, 204 and 304 responses have no body', async () => {
      const c = client();
      const h = await get(c, 'web.apps.test', '/head', 'HEAD');
      assert.equal(h.status, 200);
      assert.ok(Number(h.headers['content-length']) > 0);
      assert.equal(h.text, '');
      assert.equal((await get(c, 'web.apps.test', '/204')).status, 204);
      assert.equal((await get(c, 'web.apps.test', '/304')).status, 304);
      assert.equal((await get(c, 'web.apps.test', '/after')).json().url, '/after');
    });

    it('pipelines HEAD, 204 and 304 correctly on raw bytes', async () => {
      const raw = await rawExchange(
        port,
        'HEAD /h HTTP/1.1\r\nHost: web.apps.test\r\n\r\nGET /204 HTTP/1.1\r\nHost: web.apps.test\r\n\r\n' +
          'GET /304 HTTP/1.1\r\nHost: web.apps.test\r\n\r\nGET /end HTTP/1.1\r\nHost: web.apps.test\r\nConnection: close\r\n\r\n',
      );
      const statuses = [...raw.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((m) => m[1]);
      assert.deepEqual(statuses, ['200', '204', '304', '200']);
      assert.match(raw, /"url":"\/end"/);
    });

    it('switches to a two-way byte pipe after 101 Switching Protocols', async () => {
      const { sock, received, closed } = await rawConnection(port);
      // The first tunnel bytes travel in the same packet as the upgrade request.
      sock.write('GET /ws HTTP/1.1\r\nHost: web.apps.test\r\nUpgrade: shout\r\nConnection: Upgrade\r\n\r\nhello ');
      await until(() => received().includes('HELLO '), 'the first tunnel bytes');
      assert.match(received(), /^HTTP\/1\.1 101 /);
      sock.write('GET / HTTP/1.1\r\n'); // HTTP-looking bytes are tunnel data now
      await until(() => received().includes('GET / HTTP/1.1\r\n'), 'more tunnel bytes');
      sock.end();
      await until(() => closed(), 'the tunnel to close');
    });

    it('sets X-Forwarded-For, -Proto and -Host and changes nothing else', async () => {
      const c = client();
      const r = (await get(c, 'Web.apps.test:8080', '/xf?a=1')).json();
      assert.equal(r.headers['x-forwarded-for'], '127.0.0.1');
      assert.equal(r.headers['x-forwarded-proto'], 'http');
      assert.equal(r.headers['x-forwarded-host'], 'Web.apps.test:8080');
      assert.equal(r.headers.host, 'Web.apps.test:8080');
      assert.equal(r.url, '/xf?a=1');

      const raw = await rawExchange(
        port,
        'GET /xf2 HTTP/1.1\r\nHost: web.apps.test\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\n' +
          'X-Custom:  kept  \r\nx-forwarded-host: evil.example\r\nConnection: close\r\n\r\n',
      );
      const body = JSON.parse(raw.slice(raw.indexOf('\r\n\r\n') + 4)) as { headers: Record<string, string> };
      assert.equal(body.headers['x-forwarded-for'], '10.0.0.1, 127.0.0.1');
      assert.equal(body.headers['x-forwarded-proto'], 'http');
      assert.equal(body.headers['x-forwarded-host'], 'web.apps.test');
      assert.equal(body.headers['x-custom'], 'kept');

      const raw2 = await rawExchange(port, 'GET /xf3 HTTP/1.1\r\nHost: web.apps.test\r\nX-Forwarded-For:\r\nConnection: close\r\n\r\n');
      const body2 = JSON.parse(raw2.slice(raw2.indexOf('\r\n\r\n') + 4)) as { headers: Record<string, string> };
      assert.equal(body2.headers['x-forwarded-for'], '127.0.0.1');
    });

    it('reconnects when the app closed an idle upstream connection', async () => {
      const c = client();
      assert.equal((await get(c, 'web.apps.test', '/one')).json().url, '/one');
      const before = web.connections;
      // The app closes the idle connection: on loopback its FIN is in the gateway's socket when
      // close() returns, and one turn of the (shared) event loop lets the gateway handle it.
      web.server.closeIdleConnections();
      await new Promise((r) => setImmediate(r));
      assert.equal((await get(c, 'web.apps.test', '/two')).json().url, '/two');
      assert.equal(web.connections - before, 1);
    });
  });

  describe('bad requests', () => {
    it('answers garbage with 400 and keeps serving', async () => {
      const raw = await rawExchange(port, 'this is not http\r\n\r\n');
      assert.equal(statusOf(raw), 400);
      assert.match(raw, /Content-Length: \d+\r\n/);
      const raw2 = await rawExchange(port, Buffer.from([0, 1, 2, 255, 13, 10, 13, 10]));
      assert.equal(statusOf(raw2), 400);
      assert.equal((await get(client(), 'web.apps.test')).status, 200);
    });

    it('answers a huge head with 431', async () => {
      const raw = await rawExchange(port, `GET / HTTP/1.1\r\nHost: web.apps.test\r\nX-Big: ${'a'.repeat(5000)}\r\n\r\n`);
      assert.equal(statusOf(raw), 431);
      const raw2 = await rawExchange(port, `GET / HTTP/1.1\r\nHost: web.apps.test\r\nX-Big: ${'a'.repeat(5000)}`); // never ends
      assert.equal(statusOf(raw2), 431);
      assert.equal((await get(client(), 'web.apps.test')).status, 200);
    });

    const smuggling: Array<[string, string]> = [
      ['Content-Length with Transfer-Encoding', 'POST / HTTP/1.1\r\nHost: web.apps.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n'],
      ['two different Content-Lengths', 'POST / HTTP/1.1\r\nHost: web.apps.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde'],
      ['a Content-Length list', 'POST / HTTP/1.1\r\nHost: web.apps.test\r\nContent-Length: 4, 5\r\n\r\nabcde'],
      ['a signed Content-Length', 'POST / HTTP/1.1\r\nHost: web.apps.test\r\nContent-Length: +4\r\n\r\nabcd'],
      ['a final coding other than chunked', 'POST / HTTP/1.1\r\nHost: web.apps.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n'],
      ['an unknown coding', 'POST / HTTP/1.1\r\nHost: web.apps.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n'],
      ['chunked twice', 'POST / HTTP/1.1\r\nHost: web.apps.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n'],
      ['Transfer-Encoding in HTTP/1.0', 'POST / HTTP/1.0\r\nHost: web.apps.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n'],
      ['obs-fold', 'GET / HTTP/1.1\r\nHost: web.apps.test\r\nX-A: a\r\n b\r\n\r\n'],
      ['whitespace before the colon', 'POST / HTTP/1.1\r\nHost: web.apps.test\r\nContent-Length : 4\r\n\r\nabcd'],
      ['a bare LF inside the head', 'GET / HTTP/1.1\r\nHost: web.apps.test\nX-A: b\r\n\r\n'],
      ['bare LF line endings', 'GET / HTTP/1.1\nHost: web.apps.test\n\n'],
      ['a NUL in a value', 'GET / HTTP/1.1\r\nHost: web.apps.test\r\nX-A: a\0b\r\n\r\n'],
      ['two Hosts', 'GET / HTTP/1.1\r\nHost: web.apps.test\r\nHost: api.apps.test\r\n\r\n'],
      ['two spaces in the request line', 'GET  / HTTP/1.1\r\nHost: web.apps.test\r\n\r\n'],
      ['a bad version', 'GET / HTTP/1.x\r\nHost: web.apps.test\r\n\r\n'],
    ];
    for (const [what, bytes] of smuggling) {
      it(`rejects ${what} with 400 before anything reaches the app`, async () => {
        const before = web.requests;
        const raw = await rawExchange(port, bytes);
        assert.equal(statusOf(raw), 400, raw);
        assert.equal(countResponses(raw), 1);
        assert.equal(web.requests, before);
      });
    }

    it('answers a broken chunked body with 400', async () => {
      const raw = await rawExchange(port, 'POST / HTTP/1.1\r\nHost: web.apps.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n');
      assert.equal(statusOf(raw), 400);
      assert.equal(countResponses(raw), 1);
    });

    it('answers a request after a bad one in the same pipeline with nothing but the 400', async () => {
      const raw = await rawExchange(port, 'GET /ok HTTP/1.1\r\nHost: web.apps.test\r\n\r\nGET / HTTP/1.1\r\nHost:\r\n\r\nGET /never HTTP/1.1\r\nHost: web.apps.test\r\n\r\n');
      assert.deepEqual([...raw.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((m) => m[1]), ['200', '400']);
      assert.doesNotMatch(raw, /never/);
    });

    it('answers HTTP/2 with 505 and CONNECT with 501', async () => {
      assert.equal(statusOf(await rawExchange(port, 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n')), 505);
      assert.equal(statusOf(await rawExchange(port, 'CONNECT web.apps.test:443 HTTP/1.1\r\nHost: web.apps.test\r\n\r\n')), 501);
    });

    it('closes a client that does not complete its head in time (408)', async () => {
      const slow = new HttpListener({
        listen: { host: '127.0.0.1', port: 0 }, maxHeaderSize: 4096, routes, hold, lifecycle, metrics, log: silentLogger(), headerTimeoutMs: 300,
      });
      extraListeners.push(slow);
      const slowPort = (await slow.start()).port;
      const { sock, received, closed } = await rawConnection(slowPort);
      sock.write('GET / HTTP/1.1\r\nHost: web.apps.test\r\n');
      const drip = setInterval(() => sock.writable && sock.write('X-Drip: 1\r\n'), 50);
      try {
        await until(() => closed(), 'the slow client to be closed');
      } finally {
        clearInterval(drip);
      }
      assert.equal(statusOf(received()), 408);
      // An idle keep-alive connection closes silently.
      const idle = await rawConnection(slowPort);
      await until(() => idle.closed(), 'the idle connection to be closed');
      assert.equal(idle.received(), '');
    });
  });

  describe('holding', () => {
    it('answers a held request once the app has woken', async () => {
      lifecycle.wakeTo({ 9003: { host: '127.0.0.1', port: web.port } }, 30);
      const started = lifecycle.wakesStarted;
      const r = await get(client(), 'sleepy.apps.test', '/woken');
      assert.equal(r.status, 200);
      assert.equal(r.json().url, '/woken');
      assert.equal(lifecycle.wakesStarted - started, 1);
      assert.equal(lifecycle.wakeCalls.at(-1)!.trigger, 'http');
      lifecycle.store('sleepy');
    });

    it('wakes a stopped app once for 50 concurrent requests and answers all 50', async () => {
      lifecycle.wakeTo({ 9004: { host: '127.0.0.1', port: api.port } }, 50);
      const startedCalls = lifecycle.wakeCalls.length;
      const pool = new Pool(origin, { connections: 50, pipelining: 1 });
      clients.push(pool);
      const all = await Promise.all(Array.from({ length: 50 }, (_, i) => get(pool, 'many.apps.test', `/m${i}`)));
      assert.deepEqual(all.map((r) => r.status), Array(50).fill(200));
      assert.deepEqual(new Set(all.map((r) => r.json().url)).size, 50);
      assert.equal(lifecycle.wakeCalls.length - startedCalls, 1);
      lifecycle.onWake = () => {};
    });

    it('answers 504 when the app does not run before the hold timeout', async () => {
      lifecycle.onWake = () => {};
      const r = await get(client(), 'sleepy.apps.test');
      assert.equal(r.status, 504);
      assert.equal(hold.held('sleepy'), 0);
    });

    it('answers 503 with Retry-After when the wake fails', async () => {
      lifecycle.onWake = (app) => setTimeout(() => lifecycle.fail(app), 20);
      const r = await get(client(), 'flaky.apps.test');
      assert.equal(r.status, 503);
      assert.ok(Number(r.headers['retry-after']) >= 1);
      lifecycle.onWake = () => {};
    });

    it('answers 503 when the hold queue is full', async () => {
      lifecycle.onWake = () => {};
      const held = await Promise.all([1, 2, 3].map(() => rawConnection(port)));
      for (const h of held) h.sock.write('GET / HTTP/1.1\r\nHost: sleepy.apps.test\r\n\r\n');
      await until(() => hold.held('sleepy') === 3, 'three held clients');
      const raw = await rawExchange(port, 'GET / HTTP/1.1\r\nHost: sleepy.apps.test\r\n\r\n');
      assert.equal(statusOf(raw), 503);
      assert.match(raw, /\r\nRetry-After: \d+\r\n/);
      for (const h of held) h.sock.destroy();
      await until(() => hold.held('sleepy') === 0, 'the held clients to go');
    });

    it('aborts the hold when the client goes away, and accounts the connection', async () => {
      lifecycle.onWake = () => {};
      const aborted = async () => (await metrics.holdOutcomes.get()).values.find((v) => v.labels.app === 'sleepy' && v.labels.outcome === 'aborted')?.value ?? 0;
      const abortedBefore = await aborted();
      const openBefore = lifecycle.openConnections('sleepy');
      const { sock } = await rawConnection(port);
      sock.write('GET / HTTP/1.1\r\nHost: sleepy.apps.test\r\n\r\n');
      await until(() => hold.held('sleepy') === 1, 'the client to be held');
      assert.equal(lifecycle.openConnections('sleepy'), openBefore + 1);
      sock.destroy();
      await until(() => hold.held('sleepy') === 0, 'the hold to end');
      assert.equal((await aborted()) - abortedBefore, 1);
      await until(() => lifecycle.openConnections('sleepy') === openBefore, 'the connection to be accounted closed');
    });

    it('answers 502 when the running app refuses the connection, and never retries', async () => {
      const closedPort = await new Promise<number>((resolve) => {
        const s = net.createServer().listen(0, '127.0.0.1', () => {
          const p = (s.address() as AddressInfo).port;
          s.close(() => resolve(p));
        });
      });
      lifecycle.run('dead', { 9005: { host: '127.0.0.1', port: closedPort } });
      const r = await get(client(), 'dead.apps.test');
      assert.equal(r.status, 502);
    });
  });

  describe('accounting and lifecycle', () => {
    it('counts open connections per app and releases them on close', async () => {
      const c = new Client(origin);
      await get(c, 'api.apps.test');
      assert.ok(lifecycle.openConnections('api') >= 1);
      await c.close();
      for (const cl of clients.splice(0)) await cl.destroy();
      const apps = [...routes.apps.keys()];
      await until(() => apps.every((a) => lifecycle.openConnections(a) === 0), 'connections to be accounted closed');
    });

    it('stop() closes open connections and the listener', async () => {
      const l = new HttpListener({ listen: { host: '127.0.0.1', port: 0 }, maxHeaderSize: 4096, routes, hold, lifecycle, metrics, log: silentLogger() });
      const p = (await l.start()).port;
      const { closed } = await rawConnection(p);
      await until(() => l.connectionCount === 1, 'the connection to be accepted');
      await l.stop();
      await until(() => closed(), 'the connection to close');
      await assert.rejects(rawConnection(p));
    });

    it('stop() works after a failed start', async () => {
      const l = new HttpListener({ listen: { host: '127.0.0.1', port }, maxHeaderSize: 4096, routes, hold, lifecycle, metrics, log: silentLogger() });
      await assert.rejects(l.start(), /EADDRINUSE/);
      await l.stop();
      await new HttpListener({ listen: { host: '127.0.0.1', port: 0 }, maxHeaderSize: 4096, routes, hold, lifecycle, metrics, log: silentLogger() }).stop();
    });
  });
});

describe('http-head', () => {
  const head = (text: string) => {
    const buf = Buffer.from(text, 'latin1');
    return { buf, end: buf.indexOf('\r\n\r\n') + 4 };
  };

  it('scans what routing and framing need from a request head', () => {
    const r = new RequestHead();
    let { buf, end } = head('HEAD /x HTTP/1.1\r\nhOsT: a.test:80 \r\nContent-Length: 12\r\n\r\n');
    assert.equal(r.scan(buf, 0, end), 0);
    assert.equal(r.isHead, true);
    assert.equal(buf.toString('latin1', r.hostStart, r.hostEnd), 'a.test:80');
    assert.equal(r.body, BODY_LENGTH);
    assert.equal(r.contentLength, 12);
    assert.equal(r.keepAlive, true);

    ({ buf, end } = head('GET / HTTP/1.0\r\nHost: a\r\n\r\n'));
    assert.equal(r.scan(buf, 0, end), 0);
    assert.equal(r.keepAlive, false); // HTTP/1.0 closes unless it asks for keep-alive
    ({ buf, end } = head('GET / HTTP/1.0\r\nHost: a\r\nConnection: Keep-Alive\r\n\r\n'));
    assert.equal(r.scan(buf, 0, end), 0);
    assert.equal(r.keepAlive, true);

    ({ buf, end } = head('GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n'));
    assert.equal(r.scan(buf, 0, end), 0);
    assert.equal(r.upgrade, true);

    ({ buf, end } = head('POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n'));
    assert.equal(r.scan(buf, 0, end), 0);
    assert.equal(r.body, BODY_CHUNKED);
    assert.equal(r.isHead, false);
  });

  it('scans what framing needs from a response head', () => {
    const r = new ResponseHead();
    let { buf, end } = head('HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n');
    assert.ok(r.scan(buf, 0, end));
    assert.equal(r.status, 204);
    assert.equal(r.keepAlive, true);
    ({ buf, end } = head('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'));
    assert.ok(r.scan(buf, 0, end));
    assert.equal(r.body, BODY_CHUNKED);
    ({ buf, end } = head('HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n'));
    assert.ok(r.scan(buf, 0, end));
    assert.equal(r.body, BODY_NONE);
    ({ buf, end } = head('HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n'));
    assert.ok(r.scan(buf, 0, end));
    assert.equal(r.body, BODY_CLOSE);
    assert.equal(r.keepAlive, false);
    ({ buf, end } = head('HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n'));
    assert.equal(r.scan(buf, 0, end), false);
    ({ buf, end } = head('HTTP/2 200\r\n\r\n'));
    assert.equal(r.scan(buf, 0, end), false);
  });

  it('finds the end of a chunked body wherever the bytes are split', () => {
    const body = Buffer.from('5;name=value\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\n\r\n', 'latin1');
    const after = Buffer.from('GET /next', 'latin1');
    const all = Buffer.concat([body, after]);
    const scanner = new ChunkedScanner(1024);
    for (let split = 0; split <= all.length; split++) {
      scanner.reset();
      const first = all.subarray(0, split);
      let end = scanner.scan(first, 0, first.length);
      let consumed = end;
      if (!scanner.done) {
        const second = all.subarray(split);
        end = scanner.scan(second, 0, second.length);
        consumed = split + end;
      }
      assert.equal(scanner.failed, false, `split at ${split}`);
      assert.equal(scanner.done, true, `split at ${split}`);
      assert.equal(consumed, body.length, `split at ${split}`);
    }
  });

  it('rejects broken chunked framing', () => {
    for (const bad of ['zz\r\n', '5\r\nhelloX\r\n', '5\nhello\r\n', 'ffffffffffffffffff\r\n', '\r\n', '5 x\r\n']) {
      const scanner = new ChunkedScanner(1024);
      const buf = Buffer.from(bad, 'latin1');
      scanner.scan(buf, 0, buf.length);
      assert.equal(scanner.failed, true, JSON.stringify(bad));
    }
  });
});
