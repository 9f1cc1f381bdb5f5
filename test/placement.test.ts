import assert from 'node:assert/strict';
import { afterEach, describe, it } from 'node:test';
import { parseConfig } from '../shared/config.js';
import { silentLogger } from '../shared/log.js';
import { Metrics } from '../shared/metrics.js';
import type { LifecycleEvent } from '../gateway/lifecycle.js';
import { Placement } from '../gateway/placement.js';
import { FakeWorker } from './helpers/fake-worker.js';
import { until } from './helpers/poll.js';

function setup(idle = '0') {
  const cfg = parseConfig(
    `
gateway:
  dns: { zones: [apps.test] }
  admin: { token: secret-token }
apps:
  - { name: web, domains: [web.apps.test], command: [x], http: { port: 9001 }, idle: ${idle} }
`,
    'test.yaml',
    '/tmp',
  );
  const worker = new FakeWorker();
  const metrics = new Metrics();
  const placement = new Placement({ config: cfg, workers: [worker], metrics, log: silentLogger() });
  const events: LifecycleEvent[] = [];
  placement.subscribe('web', (ev) => events.push(ev));
  const state = () => placement.status()[0]!.state;
  return { placement, worker, metrics, events, state };
}

let current: ReturnType<typeof setup> | undefined;
afterEach(async () => {
  await current?.placement.stop();
  current = undefined;
});

describe('placement', () => {
  it('starts a new app once for many concurrent wakes', async () => {
    const t = (current = setup());
    t.worker.block('start');
    for (let i = 0; i < 50; i++) t.placement.wake('web', 'http');
    assert.equal(t.state(), 'new');
    assert.equal(t.placement.status()[0]!.operation, 'starting');
    assert.equal(t.placement.endpoint('web', 9001), undefined);
    t.worker.release('start');
    await until(() => t.state() === 'running', 'running');
    assert.equal(t.worker.count('start'), 1);
    assert.deepEqual(t.placement.endpoint('web', 9001), { host: '127.0.0.1', port: 19001 });
    assert.deepEqual(t.events, [{ type: 'state', state: 'running' }]);
    const wakes = await t.metrics.registry.getSingleMetricAsString('picocenter_wakes_total');
    assert.match(wakes, /picocenter_wakes_total\{app="web",trigger="http",result="ok"\} 1/);
  });

  it('swaps out after idle with no connections, then restores on the next wake', async () => {
    const t = (current = setup('50ms'));
    t.placement.wake('web', 'dns');
    await until(() => t.state() === 'stored', 'idle swap-out');
    assert.equal(t.worker.count('checkpoint'), 1);
    assert.equal(t.placement.endpoint('web', 9001), undefined);
    t.placement.wake('web', 'tcp');
    await until(() => t.state() === 'running', 'running again');
    assert.equal(t.worker.count('restore'), 1);
    assert.deepEqual(
      t.events.map((e) => (e.type === 'state' ? e.state : e.type)),
      ['running', 'checkpointing', 'stored', 'restoring', 'running'],
    );
  });

  it('a restore names the generation the last swap-out stored (the worker reads that manifest first)', async () => {
    const t = (current = setup('50ms'));
    t.worker.checkpointGeneration = 4;
    t.placement.wake('web', 'dns');
    await until(() => t.state() === 'stored', 'idle swap-out');
    t.placement.wake('web', 'tcp');
    await until(() => t.state() === 'running', 'running again');
    const restore = t.worker.calls.find((c) => c.type === 'restore');
    assert.equal(restore?.type === 'restore' ? restore.generation : undefined, 4);
    const start = t.worker.calls.find((c) => c.type === 'start');
    assert.ok(start && !('generation' in start), 'a start names none');
  });

  it('never swaps out an app with an open connection', async () => {
    const t = (current = setup('30ms'));
    t.placement.wake('web', 'http');
    await until(() => t.state() === 'running', 'running');
    t.placement.connectionOpened('web');
    // The idle timer was disarmed by the connection; wait well past `idle` while polling state.
    const deadline = Date.now() + 200;
    await until(() => Date.now() > deadline || t.state() !== 'running', 'the idle period to pass');
    assert.equal(t.state(), 'running');
    t.placement.connectionClosed('web');
    await until(() => t.state() === 'stored', 'swap-out after the connection closed');
  });

  it('a wake during checkpointing runs once the swap-out settles', async () => {
    const t = (current = setup());
    t.placement.wake('web', 'http');
    await until(() => t.state() === 'running', 'running');
    t.worker.block('checkpoint');
    const done = t.placement.checkpoint('web');
    assert.equal(t.state(), 'checkpointing');
    t.placement.wake('web', 'http');
    t.placement.wake('web', 'http');
    t.worker.release('checkpoint');
    await done;
    await until(() => t.state() === 'running', 'running after the wake');
    assert.equal(t.worker.count('restore'), 1);
  });

  it('a failed wake returns to the last good state and tells subscribers', async () => {
    const t = (current = setup());
    t.worker.failNext.start = 'boom';
    t.placement.wake('web', 'http');
    await until(() => t.events.some((e) => e.type === 'failed'), 'failure event');
    assert.equal(t.state(), 'new');
    const st = t.placement.status()[0]!;
    assert.equal(st.lastError?.code, 'PICO_ERR_TEST'); // the worker's own code
    assert.match(st.lastError!.message, /boom/);
    t.placement.wake('web', 'http');
    await until(() => t.state() === 'running', 'the retry');
  });

  it('a failed checkpoint keeps the app running and records the error', async () => {
    const t = (current = setup());
    t.placement.wake('web', 'http');
    await until(() => t.state() === 'running', 'running');
    t.worker.failNext.checkpoint = 'disk full';
    await assert.rejects(t.placement.checkpoint('web'), { code: 'PICO_ERR_CHECKPOINT_FAILED' });
    assert.equal(t.state(), 'running');
    assert.ok(t.placement.endpoint('web', 9001));
    assert.match(t.placement.status()[0]!.lastError!.message, /disk full/);
  });

  it('rejects a checkpoint of an app that is not running', async () => {
    const t = (current = setup());
    await assert.rejects(t.placement.checkpoint('web'), { code: 'PICO_ERR_INVALID_STATE' });
    await assert.rejects(t.placement.checkpoint('nope'), { code: 'PICO_ERR_UNKNOWN_APP' });
  });

  it('a container that exits on its own leaves the app ready to wake again', async () => {
    const t = (current = setup());
    t.placement.wake('web', 'http');
    await until(() => t.state() === 'running', 'running');
    t.worker.emit({ v: 1, type: 'exited', app: 'web', code: 1, signal: null });
    assert.equal(t.state(), 'new');
    assert.equal(t.placement.endpoint('web', 9001), undefined);
    assert.equal(t.placement.status()[0]!.lastError?.code, 'PICO_ERR_APP_EXITED');
  });

  it('stop() cancels a wake in flight and stops what runs', async () => {
    const t = (current = setup());
    t.worker.block('start');
    t.placement.wake('web', 'http');
    const stopped = t.placement.stop();
    // The cancel goes out while the start is still blocked: shutdown does not wait it out.
    await until(() => t.worker.count('stop') === 1, 'the cancelling stop');
    t.worker.release('start');
    await stopped;
    // This fake finishes the start regardless, so placement stops the container it got.
    assert.deepEqual(t.worker.calls.map((c) => c.type), ['start', 'stop', 'stop']);
    assert.equal(t.state(), 'new');
    current = undefined;
  });

  it('counts apps per state', async () => {
    const t = (current = setup());
    t.placement.wake('web', 'http');
    await until(() => t.state() === 'running', 'running');
    const text = await t.metrics.registry.getSingleMetricAsString('picocenter_apps');
    assert.match(text, /picocenter_apps\{state="running"\} 1/);
    assert.match(text, /picocenter_apps\{state="new"\} 0/);
  });
});
