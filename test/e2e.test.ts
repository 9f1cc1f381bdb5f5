import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { tmpdir } from 'node:os';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { request } from 'undici';
import { CLI, startPicocenter, type RunningPicocenter } from './helpers/picocenter.js';
import { until } from './helpers/poll.js';
import { freePort } from './helpers/ports.js';
import { repoFile } from './helpers/paths.js';

const run = promisify(execFile);

async function dig(port: number, name: string, type = 'A', extra: string[] = []): Promise<string> {
  const { stdout } = await run('dig', [`@127.0.0.1`, '-p', String(port), name, type, '+tries=1', '+time=2', ...extra]);
  return stdout;
}

function get(px: RunningPicocenter, host: string, p = '/') {
  return request(`http://127.0.0.1:${px.httpPort}${p}`, { headers: { host } });
}

/** One line of text sent to a raw TCP address, the echo read back. */
function echoOnce(host: string, port: number, text: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host, port });
    let got = '';
    s.setEncoding('utf8');
    s.on('connect', () => s.write(text));
    s.on('data', (d) => {
      got += d;
      if (got.length >= text.length) s.end();
    });
    s.on('close', () => resolve(got));
    s.on('error', reject);
  });
}

function pidFromBody(body: string): number {
  return Number(/pid (\d+)/.exec(body)?.[1]);
}

describe('picocenter up, end to end', () => {
  let px: RunningPicocenter;
  let helloPort: number;
  let echoPort: number;
  let adminPort: number;
  let dualPort: number;
  const pool = `127.${10 + Math.floor(Math.random() * 200)}.${Math.floor(Math.random() * 250)}.0/24`;

  before(async () => {
    helloPort = await freePort();
    echoPort = await freePort();
    adminPort = await freePort();
    dualPort = await freePort();
    px = await startPicocenter(`
gateway:
  dns:   { listen: 127.0.0.1:0, zones: [apps.test], ttl: 7s }
  http:  { listen: 127.0.0.1:0 }
  admin: { listen: 127.0.0.1:${adminPort}, token: e2e-secret-token }
  addresses: ${pool}
  hold: { timeout: 10s }
apps:
  - name: hello
    domains: [hello.apps.test, www.hello.apps.test]
    command: [node, ${repoFile('examples/hello/server.js')}]
    http: { port: ${helloPort} }
    idle: 0
  - name: echo
    domains: [echo.apps.test]
    command: [node, ${repoFile('examples/echo/server.js')}]
    tcp: [${echoPort}]
    idle: 0
  - name: sleepy
    domains: [sleepy.apps.test]
    command: [node, ${repoFile('examples/hello/server.js')}]
    http: { port: ${await freePort()} }
    idle: 300ms
  - name: slow
    domains: [slow.apps.test]
    command: [node, -e, "setInterval(() => {}, 1000)"]
    http: { port: ${await freePort()} }
    readyTimeout: 1m
    hold: { timeout: 300ms }
  - name: dual
    domains: [dual.apps.test]
    command: [node, ${repoFile('examples/hello/server.js')}]
    http: { port: ${dualPort} }
    tcp: [${dualPort}]
  - name: broken
    domains: [broken.apps.test]
    command: [node, -e, "process.exit(2)"]
    http: { port: ${await freePort()} }
`);
  });
  after(async () => {
    await px?.stop();
  });

  it('a DNS lookup starts the wake of a sleeping app before any connection', async () => {
    assert.equal(await px.appState('echo'), 'new');
    await dig(px.dnsPort, 'echo.apps.test');
    await until(async () => (await px.appState('echo')) === 'running', 'echo running after its lookup');
  });

  it('answers DNS for app names with the address each app is reached at', async () => {
    const hello = await dig(px.dnsPort, 'hello.apps.test');
    assert.match(hello, /status: NOERROR/);
    assert.match(hello, /flags: qr aa/);
    assert.match(hello, /hello\.apps\.test\.\s+7\s+IN\s+A\s+127\.0\.0\.1/);
    const echo = (await dig(px.dnsPort, 'echo.apps.test', 'A', ['+short'])).trim();
    assert.ok(echo.startsWith(pool.split('.').slice(0, 3).join('.') + '.'), `echo's address ${echo} is from the pool ${pool}`);
    assert.match(await dig(px.dnsPort, 'apps.test', 'SOA'), /IN\s+SOA\s/);
    assert.match(await dig(px.dnsPort, 'nope.apps.test'), /status: NXDOMAIN/);
    assert.match(await dig(px.dnsPort, 'example.com'), /status: REFUSED/);
  });

  it('routes HTTP by Host, holds the request while the app wakes, then answers it', async () => {
    const res = await get(px, 'HELLO.apps.test:8080');
    assert.equal(res.statusCode, 200);
    assert.match(await res.body.text(), /^hello from hello/);
    const alias = await get(px, 'www.hello.apps.test');
    assert.equal(alias.statusCode, 200);
    await alias.body.text();
    const unknown = await get(px, 'nobody.apps.test');
    assert.equal(unknown.statusCode, 404);
    await unknown.body.text();
  });

  it('routes raw TCP by the app\'s own address and port', async () => {
    const address = (await dig(px.dnsPort, 'echo.apps.test', 'A', ['+short'])).trim();
    assert.equal(await echoOnce(address, echoPort, 'ping\n'), 'ping\n');
  });

  it('an app with its own address serves HTTP by Host and raw TCP there', async () => {
    const address = (await dig(px.dnsPort, 'dual.apps.test', 'A', ['+short'])).trim();
    assert.notEqual(address, '127.0.0.1');
    const res = await request(`http://${address}:${px.httpPort}/`, { headers: { host: 'dual.apps.test' } });
    assert.equal(res.statusCode, 200);
    assert.match(await res.body.text(), /^hello from dual/);
    const raw = await echoOnce(address, dualPort, 'GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n');
    assert.match(raw, /^HTTP\/1\.1 200 OK/);
  });

  it('50 concurrent requests to a sleeping app: one wake, 50 answers', async () => {
    await px.admin('POST', '/v1/apps/hello/checkpoint');
    assert.equal(await px.appState('hello'), 'stored');
    const before = await wakesOf(px, 'hello');
    const answers = await Promise.all(
      Array.from({ length: 50 }, async () => {
        const res = await get(px, 'hello.apps.test');
        return { status: res.statusCode, body: await res.body.text() };
      }),
    );
    assert.ok(answers.every((a) => a.status === 200), JSON.stringify(answers.filter((a) => a.status !== 200)));
    assert.equal(new Set(answers.map((a) => pidFromBody(a.body))).size, 1, 'all answered by one process');
    assert.equal((await wakesOf(px, 'hello')) - before, 1);
  });

  it('swaps an idle app out and wakes it again on the next request', async () => {
    const first = await get(px, 'sleepy.apps.test');
    const pid1 = pidFromBody(await first.body.text());
    await until(async () => (await px.appState('sleepy')) === 'stored', 'sleepy swapped out after idle');
    const second = await get(px, 'sleepy.apps.test');
    assert.equal(second.statusCode, 200);
    const pid2 = pidFromBody(await second.body.text());
    assert.notEqual(pid1, pid2, 'a cold start runs a new process');
  });

  it('answers 504 when the hold deadline passes before the app is ready', async () => {
    const res = await get(px, 'slow.apps.test');
    assert.equal(res.statusCode, 504);
    await res.body.text();
  });

  it('answers 503 with Retry-After when the wake fails, and records the error', async () => {
    const res = await get(px, 'broken.apps.test');
    assert.equal(res.statusCode, 503);
    assert.ok(res.headers['retry-after']);
    await res.body.text();
    const { body } = await px.admin('GET', '/v1/apps/broken');
    assert.equal(body.state, 'new');
    assert.match(body.lastError.message, /exited before it was ready \(code 2/);
  });

  it('the admin API needs the token', async () => {
    assert.equal((await px.admin('GET', '/v1/apps', null)).status, 401);
    assert.equal((await px.admin('GET', '/v1/apps', 'wrong-token-123')).status, 401);
    assert.equal((await px.admin('GET', '/metrics', null)).status, 401);
    assert.equal((await px.admin('GET', '/healthz', null)).status, 200);
    const metrics = await px.admin('GET', '/metrics');
    assert.equal(metrics.status, 200);
    assert.match(metrics.body, /picocenter_wake_duration_seconds_bucket/);
    assert.match(metrics.body, /picocenter_apps\{state="running"\}/);
    assert.match(metrics.body, /picocenter_held_connections/);
  });

  it('the CLI shows status and wakes and checkpoints apps', async () => {
    const { stdout: json } = await run(process.execPath, [CLI, 'status', '--json', '--config', px.configFile]);
    const apps = JSON.parse(json) as Array<{ name: string; state: string; worker: string | null; lastWake: string | null }>;
    assert.deepEqual(apps.map((a) => a.name).sort(), ['broken', 'dual', 'echo', 'hello', 'sleepy', 'slow']);
    const hello = apps.find((a) => a.name === 'hello')!;
    assert.equal(hello.state, 'running');
    assert.equal(hello.worker, 'local');
    assert.ok(hello.lastWake);
    const { stdout: table } = await run(process.execPath, [CLI, 'status', '--config', px.configFile]);
    assert.match(table, /^APP\s+STATE\s+WORKER\s+LAST WAKE/);
    assert.match(table, /\nhello\s+running\s+local\s+\d{4}-/);
    const { stdout: cp } = await run(process.execPath, [CLI, 'checkpoint', 'hello', '--config', px.configFile]);
    assert.equal(cp.trim(), 'hello: stored');
    const { stdout: wk } = await run(process.execPath, [CLI, 'wake', 'hello', '--config', px.configFile]);
    assert.equal(wk.trim(), 'hello: running');
    await assert.rejects(run(process.execPath, [CLI, 'wake', 'nosuch', '--config', px.configFile]), /PICO_ERR_UNKNOWN_APP/);
    const { stdout: logs } = await run(process.execPath, [CLI, 'logs', 'hello', '--config', px.configFile]);
    assert.match(logs, new RegExp(`hello listening on 127\\.0\\.0\\.1:${helloPort}`));
  });

  it('SIGTERM stops the apps it started and exits cleanly', async () => {
    const res = await get(px, 'hello.apps.test');
    const pid = pidFromBody(await res.body.text());
    assert.equal(await px.stop(), 0);
    assert.throws(() => process.kill(pid, 0), { code: 'ESRCH' });
  });
});

describe('picocenter stopping', () => {
  it('a second SIGTERM exits at once, without waiting for a clean stop', async () => {
    const port = await freePort();
    const px = await startPicocenter(`
gateway:
  dns:   { listen: 127.0.0.1:0, zones: [apps.test] }
  http:  { listen: 127.0.0.1:0 }
  admin: { listen: 127.0.0.1:0, token: e2e-secret-token }
apps:
  - name: stubborn
    domains: [stubborn.apps.test]
    command: [node, -e, "process.on('SIGTERM', () => console.log('ignoring SIGTERM')); require('http').createServer((q, s) => s.end(String(process.pid))).listen(Number(process.env.PORT), '127.0.0.1')"]
    http: { port: ${port} }
`);
    const res = await get(px, 'stubborn.apps.test');
    const pid = Number(await res.body.text());
    try {
      px.proc.kill('SIGTERM'); // the clean stop now waits out the app's grace period
      await until(() => px.logs.some((l) => l.msg === 'shutting down'), 'the first signal to be handled');
      assert.equal(await px.stop(), 1); // a clean stop exits 0, after the app's grace period
    } finally {
      try {
        process.kill(-pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  });
});

describe('picocenter with a broken config', () => {
  it('exits 1 naming the file, line and key', async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'pico-e2e-'));
    const file = path.join(dir, 'broken-config.yaml');
    writeFileSync(file, 'gateway:\n  dns: { zones: [apps.test] }\n  admin: { token: secret-token }\n  htp: {}\n');
    const err = await run(process.execPath, [CLI, 'up', '--config', file])
      .then(
        () => assert.fail('accepted'),
        (e: { code: number; stderr: string }) => e,
      )
      .finally(() => rmSync(dir, { recursive: true, force: true }));
    assert.equal(err.code, 1);
    assert.match(err.stderr, /broken-config\.yaml:4: gateway\.htp: unknown key/);
  });
});

async function wakesOf(px: RunningPicocenter, app: string): Promise<number> {
  const { body } = await px.admin('GET', '/metrics');
  let total = 0;
  for (const m of (body as string).matchAll(new RegExp(`picocenter_wakes_total\\{app="${app}",trigger="\\w+",result="ok"\\} (\\d+)`, 'g'))) {
    total += Number(m[1]);
  }
  return total;
}
