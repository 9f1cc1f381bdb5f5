import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import net, { type AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import { parseConfig } from '../shared/config.js';
import { silentLogger } from '../shared/log.js';
import { Metrics } from '../shared/metrics.js';
import { Hold } from '../gateway/hold.js';
import { RouteTable } from '../gateway/routes.js';
import { TcpListener } from '../gateway/tcp-listener.js';
import { FakeLifecycle } from './helpers/fake-lifecycle.js';
import { until } from './helpers/poll.js';
import { freePort } from './helpers/ports.js';

const ADDR_ECHO = '127.0.1.7';
const ADDR_SHOUT = '127.0.1.8';
const ADDR_SLEEPY = '127.0.1.9';

/** A TCP app: echoes every byte, upper-cased if `shout`; ends when the client ends. */
async function startApp(shout: boolean): Promise<{ server: net.Server; port: number; connections: () => number }> {
  let connections = 0;
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    connections++;
    s.on('data', (d: Buffer) => s.write(shout ? Buffer.from(d.toString('latin1').toUpperCase(), 'latin1') : d));
    s.on('end', () => s.end());
    s.on('error', () => s.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { server, port: (server.address() as AddressInfo).port, connections: () => connections };
}

/** Connects to host:port, sends `data` (then ends if `end`), collects until close. */
function exchange(host: string, port: number, data: Buffer | string, end = true): Promise<{ got: Buffer; error?: Error }> {
  return new Promise((resolve) => {
    const sock = net.connect({ host, port, allowHalfOpen: true });
    const got: Buffer[] = [];
    let error: Error | undefined;
    sock.on('data', (c) => got.push(c));
    sock.on('error', (e) => (error = e));
    sock.on('end', () => sock.end());
    sock.on('close', () => resolve({ got: Buffer.concat(got), error }));
    sock.write(data);
    if (end) sock.end();
  });
}

describe('TcpListener', () => {
  let echo: Awaited<ReturnType<typeof startApp>>;
  let shout: Awaited<ReturnType<typeof startApp>>;
  let lifecycle: FakeLifecycle;
  let metrics: Metrics;
  let hold: Hold;
  let routes: RouteTable;
  let listener: TcpListener;
  const ports = { echo: 0, shout: 0, sleepy: 0 };

  before(async () => {
    echo = await startApp(false);
    shout = await startApp(true);
    ports.echo = await freePort(ADDR_ECHO);
    ports.shout = await freePort(ADDR_SHOUT);
    ports.sleepy = await freePort(ADDR_SLEEPY);
    const cfg = parseConfig(
      `
gateway:
  dns: { zones: [apps.test] }
  admin: { token: test-token-123 }
apps:
  - { name: echo, domains: [echo.apps.test], command: [node, x.js], tcp: [${ports.echo}], address: ${ADDR_ECHO} }
  - { name: shout, domains: [shout.apps.test], command: [node, x.js], tcp: [${ports.shout}], address: ${ADDR_SHOUT} }
  - { name: sleepy, domains: [sleepy.apps.test], command: [node, x.js], tcp: [${ports.sleepy}], address: ${ADDR_SLEEPY}, hold: { timeout: 300ms } }
  - { name: web, domains: [web.apps.test], command: [node, x.js], http: { port: 9001 } }
`,
      'test.yaml',
    );
    routes = new RouteTable(cfg);
    lifecycle = new FakeLifecycle();
    lifecycle.run('echo', { [ports.echo]: { host: '127.0.0.1', port: echo.port } });
    lifecycle.run('shout', { [ports.shout]: { host: '127.0.0.1', port: shout.port } });
    metrics = new Metrics();
    hold = new Hold(lifecycle, metrics, silentLogger());
    listener = new TcpListener({ routes, hold, lifecycle, metrics, log: silentLogger() });
    const addrs = await listener.start();
    assert.deepEqual(
      addrs.map((a) => `${a.address}:${a.port}`).sort(),
      [`${ADDR_ECHO}:${ports.echo}`, `${ADDR_SHOUT}:${ports.shout}`, `${ADDR_SLEEPY}:${ports.sleepy}`].sort(),
    );
  });

  after(async () => {
    await listener.stop();
    await Promise.all([echo, shout].map((a) => new Promise((r) => a.server.close(r))));
  });

  it('routes by destination address and port', async () => {
    assert.equal((await exchange(ADDR_ECHO, ports.echo, 'hello')).got.toString(), 'hello');
    assert.equal((await exchange(ADDR_SHOUT, ports.shout, 'hello')).got.toString(), 'HELLO');
    // Each app's port is only served at that app's own address.
    const wrong = await exchange(ADDR_SHOUT, ports.echo, 'hello');
    assert.equal((wrong.error as NodeJS.ErrnoException | undefined)?.code, 'ECONNREFUSED');
  });

  it('pipes large data both ways with backpressure', async () => {
    const data = randomBytes(4 * 1024 * 1024);
    const { got } = await exchange(ADDR_ECHO, ports.echo, data);
    assert.equal(got.length, data.length);
    assert.ok(got.equals(data));
  });

  it('holds a client while its app wakes, keeping the bytes it sent and its half-close', async () => {
    lifecycle.wakeTo({ [ports.sleepy]: { host: '127.0.0.1', port: echo.port } }, 50);
    const woken = lifecycle.wakesStarted;
    const { got } = await exchange(ADDR_SLEEPY, ports.sleepy, 'sent before the app ran'); // sends, then FIN
    assert.equal(got.toString(), 'sent before the app ran');
    assert.equal(lifecycle.wakesStarted - woken, 1);
    assert.equal(lifecycle.wakeCalls.at(-1)!.trigger, 'tcp');
    lifecycle.store('sleepy');
  });

  it('keeps a held connection open for more traffic once the app runs', async () => {
    lifecycle.wakeTo({ [ports.sleepy]: { host: '127.0.0.1', port: shout.port } }, 30);
    const sock = net.connect(ports.sleepy, ADDR_SLEEPY);
    let got = '';
    sock.on('data', (d) => (got += d.toString()));
    sock.write('one ');
    await until(() => got === 'ONE ', 'the held bytes to be answered');
    sock.write('two');
    await until(() => got === 'ONE TWO', 'more bytes to be answered');
    sock.destroy();
    lifecycle.store('sleepy');
  });

  it('drops the client when the hold times out', async () => {
    lifecycle.onWake = () => {};
    const r = await exchange(ADDR_SLEEPY, ports.sleepy, 'anyone?', false);
    assert.equal(r.got.length, 0);
    assert.equal(hold.held('sleepy'), 0);
  });

  it('drops the client when the wake fails', async () => {
    lifecycle.onWake = (app) => setTimeout(() => lifecycle.fail(app), 10);
    const r = await exchange(ADDR_SLEEPY, ports.sleepy, 'anyone?', false);
    assert.equal(r.got.length, 0);
    lifecycle.onWake = () => {};
  });

  it('aborts the hold when the client goes away', async () => {
    lifecycle.onWake = () => {};
    const aborted = async () => (await metrics.holdOutcomes.get()).values.find((v) => v.labels.app === 'sleepy' && v.labels.outcome === 'aborted')?.value ?? 0;
    const before = await aborted();
    const sock = net.connect(ports.sleepy, ADDR_SLEEPY);
    sock.on('error', () => {});
    await until(() => hold.held('sleepy') === 1, 'the client to be held');
    sock.resetAndDestroy();
    await until(() => hold.held('sleepy') === 0, 'the hold to end');
    assert.equal((await aborted()) - before, 1);
    await until(() => lifecycle.openConnections('sleepy') === 0, 'the connection to be accounted closed');
  });

  it('drops the client when the running app refuses the connection', async () => {
    const closedPort = await freePort();
    lifecycle.run('sleepy', { [ports.sleepy]: { host: '127.0.0.1', port: closedPort } });
    const r = await exchange(ADDR_SLEEPY, ports.sleepy, 'hi', false);
    assert.equal(r.got.length, 0);
    lifecycle.store('sleepy');
  });

  it('accounts every connection as opened and closed', async () => {
    const sock = net.connect(ports.echo, ADDR_ECHO);
    await until(() => lifecycle.openConnections('echo') === 1, 'the connection to be accounted');
    sock.end();
    await until(() => lifecycle.openConnections('echo') === 0, 'the connection to be accounted closed');
    assert.equal(listener.connectionCount, 0);
  });

  it('stop() closes listeners and open connections; it works after a failed start', async () => {
    const taken = net.createServer();
    const busyPort = await new Promise<number>((r) => taken.listen(0, '127.0.1.20', () => r((taken.address() as AddressInfo).port)));
    const freeP = await freePort('127.0.1.21');
    const cfg = parseConfig(
      `
gateway: { dns: { zones: [apps.test] }, admin: { token: test-token-123 } }
apps:
  - { name: a, domains: [a.apps.test], command: [node, x.js], tcp: [${freeP}], address: 127.0.1.21 }
  - { name: b, domains: [b.apps.test], command: [node, x.js], tcp: [${busyPort}], address: 127.0.1.20 }
`,
      'test.yaml',
    );
    const lc = new FakeLifecycle();
    lc.run('a', { [freeP]: { host: '127.0.0.1', port: echo.port } });
    const l = new TcpListener({ routes: new RouteTable(cfg), hold: new Hold(lc, new Metrics(), silentLogger()), lifecycle: lc, metrics: new Metrics(), log: silentLogger() });
    await assert.rejects(l.start(), /EADDRINUSE/);
    // The listener that did start serves until stop().
    const sock = net.connect(freeP, '127.0.1.21');
    let closed = false;
    sock.on('close', () => (closed = true));
    sock.on('error', () => {});
    await until(() => l.connectionCount === 1, 'the connection to be accepted');
    await l.stop();
    await until(() => closed, 'the connection to close');
    const after = await exchange('127.0.1.21', freeP, 'x', false);
    assert.equal((after.error as NodeJS.ErrnoException | undefined)?.code, 'ECONNREFUSED');
    await new Promise((r) => taken.close(r));
  });
});
