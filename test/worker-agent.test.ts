import assert from 'node:assert/strict';
import net from 'node:net';
import { after, afterEach, before, describe, it } from 'node:test';
import { request } from 'undici';
import { RemoteWorkerConnection } from '../gateway/remote-worker.js';
import { silentLogger } from '../shared/log.js';
import type { WorkerEvent, WorkerRequest, WorkerResponse } from '../shared/protocol.js';
import { AgentServer, type ServedWorker } from '../worker/agent-server.js';
import { ProcessRuntime } from '../worker/process-runtime.js';
import { Worker } from '../worker/worker.js';
import { until } from './helpers/poll.js';

const TOKEN = 'agent-test-token';

/** A worker that answers like a healthy one; `block(type)` holds operations of that type. */
class ScriptedWorker implements ServedWorker {
  readonly id = 'w1';
  readonly calls: WorkerRequest[] = [];
  private readonly listeners = new Set<(ev: WorkerEvent) => void>();
  private gates = new Map<string, Promise<void>>();
  private releases = new Map<string, () => void>();

  block(type: WorkerRequest['type']): void {
    this.gates.set(type, new Promise((r) => this.releases.set(type, r)));
  }
  release(type: WorkerRequest['type']): void {
    this.releases.get(type)?.();
    this.gates.delete(type);
  }
  emit(ev: WorkerEvent): void {
    for (const l of this.listeners) l(ev);
  }
  onEvent(listener: (ev: WorkerEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
  async handle(req: WorkerRequest): Promise<WorkerResponse> {
    this.calls.push(req);
    await this.gates.get(req.type);
    switch (req.type) {
      case 'start':
      case 'restore':
        return { v: 1, type: 'running', app: req.app.name, endpoints: { 9001: { host: '127.0.0.1', port: 19001 } }, restored: false };
      case 'list':
        return { v: 1, type: 'list', containers: [], images: [{ app: 'web', generation: 3 }] };
      default:
        return { v: 1, type: 'error', code: 'PICO_ERR_TEST', message: `not scripted: ${req.type}` };
    }
  }
}

const spec = { name: 'web', command: ['x'], cwd: '/tmp', env: {}, ports: [9001], readyTimeoutMs: 1000 };

/** A TCP relay that can refuse connections for a while, to make the agent unreachable. */
class Relay {
  private server?: net.Server;
  private readonly sockets = new Set<net.Socket>();
  port = 0;
  constructor(private readonly target: number) {}
  async open(): Promise<void> {
    this.server = net.createServer((client) => {
      const upstream = net.connect(this.target, '127.0.0.1');
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on('close', () => this.sockets.delete(s));
        s.on('error', () => undefined);
      }
      client.pipe(upstream).pipe(client);
      client.on('close', () => upstream.destroy());
      upstream.on('close', () => client.destroy());
    });
    await new Promise<void>((r) => this.server!.listen(this.port, '127.0.0.1', r));
    this.port = (this.server.address() as net.AddressInfo).port;
  }
  /** Closes the listener and cuts every connection through it. */
  async cut(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => this.server!.close(() => r()));
  }
}

describe('worker agent transport', () => {
  let worker: ScriptedWorker;
  let agent: AgentServer;
  let url: string;
  const conns: RemoteWorkerConnection[] = [];

  const connect = (overrides: Partial<ConstructorParameters<typeof RemoteWorkerConnection>[0]> = {}) => {
    const c = new RemoteWorkerConnection({
      id: 'w1', url, token: TOKEN, log: silentLogger(), operationTimeoutMs: 60_000, queryTimeoutMs: 10_000, heartbeatMs: 200, ...overrides,
    });
    conns.push(c);
    return c;
  };

  before(async () => {
    worker = new ScriptedWorker();
    agent = new AgentServer({ worker, listen: { host: '127.0.0.1', port: 0 }, token: TOKEN, log: silentLogger(), heartbeatMs: 200 });
    url = `http://127.0.0.1:${(await agent.start()).port}`;
  });
  afterEach(async () => {
    await Promise.all(conns.splice(0).map((c) => c.close()));
  });
  after(async () => {
    await agent.stop();
  });

  it('a call and its answer cross the wire intact', async () => {
    const c = connect();
    assert.deepEqual(await c.call({ v: 1, type: 'list' }), { v: 1, type: 'list', containers: [], images: [{ app: 'web', generation: 3 }] });
    const res = await c.call({ v: 1, type: 'start', app: spec });
    assert.deepEqual(res, { v: 1, type: 'running', app: 'web', endpoints: { 9001: { host: '127.0.0.1', port: 19001 } }, restored: false });
    assert.deepEqual(worker.calls.at(-1), { v: 1, type: 'start', app: spec });
  });

  it('needs the bearer token (401 without it or with a wrong one)', async () => {
    for (const authorization of [undefined, 'Bearer wrong-token-xx', `Bearer ${TOKEN}x`]) {
      const res = await request(`${url}/v1/call`, {
        method: 'POST',
        headers: authorization ? { authorization } : {},
        body: JSON.stringify({ v: 1, type: 'list' }),
      });
      assert.equal(res.statusCode, 401);
      assert.equal(((await res.body.json()) as { error: { code: string } }).error.code, 'PICO_ERR_UNAUTHORIZED');
    }
    const events = await request(`${url}/v1/events`);
    assert.equal(events.statusCode, 401);
    await events.body.text();
    await assert.rejects(connect({ token: 'wrong-token-xx' }).call({ v: 1, type: 'list' }), { code: 'PICO_ERR_UNAUTHORIZED' });
  });

  it('answers 400 to a malformed or huge body and keeps serving', async () => {
    const post = async (body: string) => {
      const res = await request(`${url}/v1/call`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}` }, body });
      return { status: res.statusCode, body: (await res.body.json()) as { error: { code: string; message: string } } };
    };
    for (const body of ['{not json', '[]', '{"v":1,"type":"start","app":{"name":"web"}}', '{"v":2,"type":"list"}', '{"v":1,"type":"format-disk"}']) {
      const r = await post(body);
      assert.equal(r.status, 400, body);
      assert.equal(r.body.error.code, 'PICO_ERR_BAD_REQUEST');
    }
    const huge = await post(JSON.stringify({ v: 1, type: 'logs', app: 'web', bytes: 1, pad: 'x'.repeat(2 * 1024 * 1024) }));
    assert.equal(huge.status, 400);
    assert.match(huge.body.error.message, /over \d+ bytes/);
    assert.equal((await connect().call({ v: 1, type: 'list' })).type, 'list');
  });

  it('delivers events, and those missed while unreachable after it reconnects', async () => {
    const relay = new Relay(Number(new URL(url).port));
    await relay.open();
    const c = connect({ url: `http://127.0.0.1:${relay.port}` });
    const seen: WorkerEvent[] = [];
    const reach: boolean[] = [];
    c.onEvent((ev) => seen.push(ev));
    c.onReachable((r) => reach.push(r));
    await until(() => reach.includes(true), 'the event stream');
    worker.emit({ v: 1, type: 'exited', app: 'a', code: 1, signal: null });
    await until(() => seen.length === 1, 'the first event');

    await relay.cut();
    await until(() => !c.reachable, 'the worker to look unreachable');
    await assert.rejects(c.call({ v: 1, type: 'list' }), { code: 'PICO_ERR_WORKER_UNREACHABLE' });
    worker.emit({ v: 1, type: 'exited', app: 'b', code: null, signal: 'SIGKILL' });
    await relay.open(); // same port
    await until(() => c.reachable && seen.length >= 2, 'the missed event after reconnecting', 15_000);
    assert.deepEqual(seen.map((e) => e.app), ['a', 'b']);
    assert.deepEqual(reach.filter((r, i) => r !== reach[i - 1]), [true, false, true]);
    await relay.cut();
  });

  it('a call rejects promptly when the agent dies mid-call', async () => {
    const ownWorker = new ScriptedWorker();
    const own = new AgentServer({ worker: ownWorker, listen: { host: '127.0.0.1', port: 0 }, token: TOKEN, log: silentLogger() });
    const port = (await own.start()).port;
    const c = connect({ url: `http://127.0.0.1:${port}` });
    ownWorker.block('restore');
    const call = c.call({ v: 1, type: 'restore', app: spec, generation: 7 });
    await until(() => ownWorker.calls.length === 1, 'the call to arrive');
    const got = ownWorker.calls[0]!;
    assert.equal(got.type === 'restore' ? got.generation : undefined, 7, 'the generation hint crosses the wire');
    const t0 = Date.now();
    await own.stop();
    await assert.rejects(call, { code: 'PICO_ERR_WORKER_UNREACHABLE' });
    assert.ok(Date.now() - t0 < 2000, `rejected after ${Date.now() - t0} ms`);
    ownWorker.release('restore');
    await until(() => !c.reachable, 'the worker to look unreachable');
    await assert.rejects(c.call({ v: 1, type: 'list' }), { code: 'PICO_ERR_WORKER_UNREACHABLE' });
  });

  it('a call nobody answers in time rejects at its deadline', async () => {
    const c = connect({ queryTimeoutMs: 150 });
    worker.block('list');
    try {
      await assert.rejects(c.call({ v: 1, type: 'list' }), /did not answer list within 150 ms/);
    } finally {
      worker.release('list');
    }
  });

  it('a worker nobody listens for is unreachable and calls fail fast', async () => {
    const probe = net.createServer();
    await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
    const port = (probe.address() as net.AddressInfo).port;
    await new Promise<void>((r) => probe.close(() => r()));
    const c = connect({ url: `http://127.0.0.1:${port}` });
    await assert.rejects(c.call({ v: 1, type: 'list' }), { code: 'PICO_ERR_WORKER_UNREACHABLE' });
    await until(() => !c.reachable, 'unreachable');
  });
});

describe('Worker answers cached', () => {
  it('asks its runtime (absent → 0)', async () => {
    const plain = new Worker('w', new ProcessRuntime(silentLogger()), silentLogger());
    assert.deepEqual(await plain.handle({ v: 1, type: 'cached', apps: ['a'] }), { v: 1, type: 'cached', bytes: { a: 0 } });
    const runtime = Object.assign(new ProcessRuntime(silentLogger()), {
      cachedBytes: async (app: string) => {
        if (app === 'bad') throw new Error('cache broken');
        return app === 'a' ? 4096 : 0;
      },
    });
    const w = new Worker('w', runtime, silentLogger());
    assert.deepEqual(await w.handle({ v: 1, type: 'cached', apps: ['a', 'b', 'bad'] }), { v: 1, type: 'cached', bytes: { a: 4096, b: 0, bad: 0 } });
  });
});
