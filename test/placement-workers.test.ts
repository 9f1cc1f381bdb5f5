import assert from 'node:assert/strict';
import { afterEach, describe, it } from 'node:test';
import { parseConfig } from '../shared/config.js';
import { silentLogger } from '../shared/log.js';
import { Metrics } from '../shared/metrics.js';
import type { LifecycleEvent } from '../gateway/lifecycle.js';
import { Placement } from '../gateway/placement.js';
import { FakeWorker } from './helpers/fake-worker.js';
import { until } from './helpers/poll.js';

function setup(ids = ['a', 'b']) {
  const cfg = parseConfig(
    `
gateway:
  dns: { zones: [apps.test] }
  admin: { token: secret-token }
apps:
  - { name: web, domains: [web.apps.test], command: [x], http: { port: 9001 }, idle: 0 }
  - { name: api, domains: [api.apps.test], command: [x], http: { port: 9002 }, idle: 0 }
  - { name: db, domains: [db.apps.test], command: [x], http: { port: 9003 }, idle: 0 }
`,
    'test.yaml',
    '/tmp',
  );
  const workers = ids.map((id) => new FakeWorker(id));
  const placement = new Placement({ config: cfg, workers, metrics: new Metrics(), log: silentLogger(), cachedQueryTimeoutMs: 100 });
  const st = (app: string) => placement.status().find((a) => a.name === app)!;
  const running = (app: string) => until(() => st(app).state === 'running', `${app} running`);
  return { placement, workers, st, running };
}

let current: ReturnType<typeof setup> | undefined;
afterEach(async () => {
  await current?.placement.stop();
  current = undefined;
});

describe('placement across several workers', () => {
  it('a shared store reported by every worker is one stored app', async () => {
    const t = (current = setup());
    t.workers[0]!.images = [{ app: 'web', generation: 4 }];
    t.workers[1]!.images = [{ app: 'web', generation: 5 }];
    await t.placement.init();
    assert.equal(t.st('web').state, 'stored');
    assert.equal(t.st('web').generation, 5);
    assert.equal(t.st('api').state, 'new');
  });

  it('adopts an app a worker still runs, and stops a second copy elsewhere', async () => {
    const t = (current = setup());
    const ep = { 9001: { host: '127.0.0.1', port: 19001 } };
    t.workers[0]!.running.set('web', ep);
    t.workers[1]!.running.set('web', ep);
    await t.placement.init();
    assert.equal(t.st('web').state, 'running');
    const owner = t.st('web').worker;
    const other = t.workers.find((w) => w.id !== owner)!;
    await until(() => other.count('stop') === 1, 'the duplicate stopped');
  });

  it('new apps go to the least loaded worker; an app stays on the worker that ran it', async () => {
    const t = (current = setup());
    t.placement.wake('web', 'http');
    await t.running('web');
    t.placement.wake('api', 'http');
    await t.running('api');
    assert.notEqual(t.st('web').worker, t.st('api').worker);
    const home = t.st('web').worker;
    await t.placement.checkpoint('web');
    t.placement.wake('db', 'http'); // both workers carry one app now: stickiness, not load, places web
    await t.running('db');
    t.placement.wake('web', 'http');
    await t.running('web');
    assert.equal(t.st('web').worker, home, 'restored where it ran last');
  });

  it('a restore on a new worker prefers the one caching most of the image; a slow worker cannot stall it', async () => {
    const t = (current = setup(['a', 'b', 'c']));
    t.workers.forEach((w) => (w.images = [{ app: 'web', generation: 1 }]));
    await t.placement.init();
    t.workers[1]!.cached = { web: 1000 };
    t.workers[2]!.cached = { web: 5000 };
    t.workers[2]!.block('cached'); // c caches most but does not answer in time
    const t0 = Date.now();
    t.placement.wake('web', 'dns');
    await t.running('web');
    assert.equal(t.st('web').worker, 'b');
    assert.ok(Date.now() - t0 < 2000);
    t.workers[2]!.release('cached');
  });

  it('a worker that becomes unreachable loses its apps; the next wake goes elsewhere', async () => {
    const t = (current = setup());
    const events: LifecycleEvent[] = [];
    t.placement.subscribe('web', (ev) => events.push(ev));
    t.placement.wake('web', 'http');
    await t.running('web');
    const home = t.workers.find((w) => w.id === t.st('web').worker)!;
    const other = t.workers.find((w) => w !== home)!;
    home.setReachable(false);
    assert.equal(t.st('web').state, 'new');
    assert.equal(t.st('web').lastError?.code, 'PICO_ERR_WORKER_UNREACHABLE');
    assert.deepEqual(t.placement.workerStatus().find((w) => w.id === home.id), { id: home.id, reachable: false, apps: 0 });
    t.placement.wake('web', 'http');
    await t.running('web');
    assert.equal(t.st('web').worker, other.id);
    // Back again, still running its copy: placement stops it there.
    home.setReachable(true);
    await until(() => home.count('stop') === 1, 'the stale copy stopped');
    assert.equal(t.st('web').worker, other.id);
  });

  it('with no reachable worker a wake fails at once', async () => {
    const t = (current = setup());
    const failed: LifecycleEvent[] = [];
    t.placement.subscribe('web', (ev) => ev.type === 'failed' && failed.push(ev));
    for (const w of t.workers) w.setReachable(false);
    t.placement.wake('web', 'http');
    await until(() => failed.length === 1, 'the failure');
    assert.match(t.st('web').lastError!.message, /no worker is reachable/);
    assert.equal(t.workers.reduce((n, w) => n + w.count('start'), 0), 0);
  });

  it('a worker that restarted is resynced: apps it no longer runs are released', async () => {
    const t = (current = setup(['a']));
    t.placement.wake('web', 'http');
    await t.running('web');
    t.workers[0]!.running.clear(); // restarted: runs nothing
    t.workers[0]!.setReachable(true);
    await until(() => t.st('web').state === 'new', 'web released');
  });

  it('an app its worker checkpointed by itself is stored', async () => {
    const t = (current = setup(['a']));
    t.placement.wake('web', 'http');
    await t.running('web');
    t.workers[0]!.emit({ v: 1, type: 'checkpointed', app: 'web', generation: 7 });
    assert.equal(t.st('web').state, 'stored');
    assert.equal(t.st('web').generation, 7);
  });
});
