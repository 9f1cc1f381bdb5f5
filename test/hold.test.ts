import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseConfig } from '../shared/config.js';
import { isPicoError } from '../shared/errors.js';
import { silentLogger } from '../shared/log.js';
import { Metrics } from '../shared/metrics.js';
import type { Endpoint } from '../shared/protocol.js';
import { Hold } from '../gateway/hold.js';
import { RouteTable, type AppRoute } from '../gateway/routes.js';
import { FakeLifecycle } from './helpers/fake-lifecycle.js';

const CONFIG = `
gateway:
  dns: { zones: [apps.test] }
  admin: { token: test-token-123 }
apps:
  - name: web
    domains: [web.apps.test]
    command: [node, x.js]
    http: { port: 9001 }
    hold: { timeout: 200ms, queue: 3 }
  - name: big
    domains: [big.apps.test]
    command: [node, y.js]
    http: { port: 9002 }
`;

const EP: Endpoint = { host: '127.0.0.1', port: 40001 };

function setup() {
  const routes = new RouteTable(parseConfig(CONFIG, 'test.yaml'));
  const lifecycle = new FakeLifecycle();
  const metrics = new Metrics();
  const hold = new Hold(lifecycle, metrics, silentLogger());
  return { lifecycle, metrics, hold, web: routes.apps.get('web')!, big: routes.apps.get('big')! };
}

async function metricValue(metrics: Metrics, name: 'held' | 'holdOutcomes', labels: Record<string, string>): Promise<number> {
  const { values } = await metrics[name].get();
  const v = values.find((x) => Object.entries(labels).every(([k, val]) => (x.labels as Record<string, unknown>)[k] === val));
  return v?.value ?? 0;
}

function expectCode(code: string) {
  return (err: unknown) => {
    assert.ok(isPicoError(err), `expected a PicoError, got ${String(err)}`);
    assert.equal(err.code, code);
    return true;
  };
}

/** Asserts nothing of the hold is left behind for `route`. */
async function assertCleanedUp(s: ReturnType<typeof setup>, route: AppRoute) {
  assert.equal(s.hold.held(route.name), 0);
  assert.equal(s.lifecycle.listenerCount(route.name), 0);
  assert.equal(await metricValue(s.metrics, 'held', { app: route.name }), 0);
}

describe('Hold', () => {
  it('returns a running app\'s endpoint at once, without subscribing or waking', async () => {
    const s = setup();
    s.lifecycle.run('web', { 9001: EP });
    assert.deepEqual(await s.hold.waitForReady(s.web, 9001, 'http'), EP);
    assert.equal(s.lifecycle.wakeCalls.length, 0);
    assert.equal(s.lifecycle.listenerCount('web'), 0);
  });

  it('wakes a stored app and resolves when it runs', async () => {
    const s = setup();
    const p = s.hold.waitForReady(s.web, 9001, 'http');
    assert.deepEqual(s.lifecycle.wakeCalls, [{ app: 'web', trigger: 'http' }]);
    assert.equal(s.hold.held('web'), 1);
    assert.equal(await metricValue(s.metrics, 'held', { app: 'web' }), 1);
    s.lifecycle.run('web', { 9001: EP });
    assert.deepEqual(await p, EP);
    await assertCleanedUp(s, s.web);
    assert.equal(await metricValue(s.metrics, 'holdOutcomes', { app: 'web', outcome: 'ready' }), 1);
  });

  it('wakes once for many concurrent holds and answers all of them', async () => {
    const s = setup();
    s.lifecycle.wakeTo({ 9002: EP }, 10);
    const all = Array.from({ length: 50 }, () => s.hold.waitForReady(s.big, 9002, 'http'));
    assert.equal(s.hold.held('big'), 50);
    const eps = await Promise.all(all);
    assert.equal(eps.length, 50);
    for (const ep of eps) assert.deepEqual(ep, EP);
    assert.equal(s.lifecycle.wakeCalls.length, 1);
    await assertCleanedUp(s, s.big);
    assert.equal(await metricValue(s.metrics, 'holdOutcomes', { app: 'big', outcome: 'ready' }), 50);
  });

  it('rejects every held client with PICO_ERR_WAKE_FAILED when the wake fails, and the next hold wakes again', async () => {
    const s = setup();
    const a = s.hold.waitForReady(s.web, 9001, 'http');
    const b = s.hold.waitForReady(s.web, 9001, 'dns');
    s.lifecycle.fail('web', 'no image');
    await assert.rejects(a, expectCode('PICO_ERR_WAKE_FAILED'));
    await assert.rejects(b, expectCode('PICO_ERR_WAKE_FAILED'));
    await assertCleanedUp(s, s.web);
    assert.equal(await metricValue(s.metrics, 'holdOutcomes', { app: 'web', outcome: 'failed' }), 2);

    const c = s.hold.waitForReady(s.web, 9001, 'http');
    assert.equal(s.lifecycle.wakeCalls.length, 2);
    s.lifecycle.run('web', { 9001: EP });
    assert.deepEqual(await c, EP);
  });

  it('rejects with PICO_ERR_HOLD_TIMEOUT after the app\'s hold timeout', async () => {
    const s = setup();
    await assert.rejects(s.hold.waitForReady(s.web, 9001, 'http'), expectCode('PICO_ERR_HOLD_TIMEOUT'));
    await assertCleanedUp(s, s.web);
    assert.equal(await metricValue(s.metrics, 'holdOutcomes', { app: 'web', outcome: 'timeout' }), 1);
  });

  it('rejects with PICO_ERR_HOLD_QUEUE_FULL beyond the app\'s hold queue', async () => {
    const s = setup();
    const held = [1, 2, 3].map(() => s.hold.waitForReady(s.web, 9001, 'http'));
    await assert.rejects(s.hold.waitForReady(s.web, 9001, 'http'), expectCode('PICO_ERR_HOLD_QUEUE_FULL'));
    assert.equal(await metricValue(s.metrics, 'holdOutcomes', { app: 'web', outcome: 'queue_full' }), 1);
    assert.equal(s.hold.held('web'), 3);
    s.lifecycle.run('web', { 9001: EP });
    await Promise.all(held);
    await assertCleanedUp(s, s.web);
  });

  it('rejects and cleans up when the caller aborts', async () => {
    const s = setup();
    const ac = new AbortController();
    const p = s.hold.waitForReady(s.web, 9001, 'http', ac.signal);
    const other = s.hold.waitForReady(s.web, 9001, 'http');
    ac.abort();
    await assert.rejects(p, (err: unknown) => (err as Error).name === 'AbortError');
    assert.equal(s.hold.held('web'), 1);
    assert.equal(await metricValue(s.metrics, 'holdOutcomes', { app: 'web', outcome: 'aborted' }), 1);
    s.lifecycle.run('web', { 9001: EP });
    assert.deepEqual(await other, EP);
    await assertCleanedUp(s, s.web);
  });

  it('rejects at once for an already aborted signal, without waking', async () => {
    const s = setup();
    await assert.rejects(s.hold.waitForReady(s.web, 9001, 'http', AbortSignal.abort()), (err: unknown) => (err as Error).name === 'AbortError');
    assert.equal(s.lifecycle.wakeCalls.length, 0);
    await assertCleanedUp(s, s.web);
  });

  it('does not lose a wake-up that happens between the first check and subscribing', async () => {
    const s = setup();
    // The app starts running inside subscribe(), before the new listener is registered: only
    // the check after subscribing can see it.
    const subscribe = s.lifecycle.subscribe.bind(s.lifecycle);
    s.lifecycle.subscribe = (app, listener) => {
      s.lifecycle.run(app, { 9001: EP });
      return subscribe(app, listener);
    };
    assert.deepEqual(await s.hold.waitForReady(s.web, 9001, 'http'), EP);
    assert.equal(s.lifecycle.wakeCalls.length, 0);
    await assertCleanedUp(s, s.web);
  });

  it('keeps waiting while the app runs without an endpoint for the port', async () => {
    const s = setup();
    const p = s.hold.waitForReady(s.web, 9001, 'http');
    s.lifecycle.run('web', { 7000: EP });
    await assert.rejects(p, expectCode('PICO_ERR_HOLD_TIMEOUT'));
    await assertCleanedUp(s, s.web);
  });

  it('ends cleanly when wake() fails synchronously', async () => {
    const s = setup();
    s.lifecycle.onWake = (app) => s.lifecycle.fail(app, 'no worker');
    await assert.rejects(s.hold.waitForReady(s.web, 9001, 'http'), expectCode('PICO_ERR_WAKE_FAILED'));
    await assertCleanedUp(s, s.web);
  });
});
