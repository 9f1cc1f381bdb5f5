import assert from 'node:assert/strict';
import { execFile, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { Agent, request } from 'undici';
import { CLI, startCli, startPicocenter, type LogLine, type RunningPicocenter } from './helpers/picocenter.js';
import { until } from './helpers/poll.js';
import { freePort } from './helpers/ports.js';
import { repoFile } from './helpers/paths.js';

const run = promisify(execFile);
const WORKER_TOKEN = 'worker-secret-token';

interface RunningWorker {
  proc: ChildProcess;
  url: string;
  logs: LogLine[];
  exit: Promise<number | null>;
}

/** Starts `picocenter worker` (process runtime) on a free port; resolves once it logs its URL. */
async function startWorker(id: string, shutdown: 'stop' | 'checkpoint' = 'stop'): Promise<RunningWorker> {
  const dir = mkdtempSync(path.join(tmpdir(), 'pico-worker-'));
  const configFile = path.join(dir, 'worker.yaml');
  writeFileSync(
    configFile,
    `
gateway: { dns: { zones: [apps.test] }, admin: { token: unused-admin-token } }
worker: { runtime: process, listen: 127.0.0.1:0, token: ${WORKER_TOKEN}, shutdown: ${shutdown} }
`,
  );
  const { proc, logs, up, exit } = await startCli(['worker', '--config', configFile, '--id', id], dir, 'picocenter worker up');
  // Gone with the process, however it ended: its directory held only the config.
  const removed = exit.then((code) => (rmSync(dir, { recursive: true, force: true }), code));
  return { proc, url: up.url as string, logs, exit: removed };
}

function gatewayConfig(workerUrl: string, helloPort: number, adminPort = 0): string {
  return `
gateway:
  embeddedWorker: false
  dns:   { listen: 127.0.0.1:0, zones: [apps.test] }
  http:  { listen: 127.0.0.1:0 }
  admin: { listen: 127.0.0.1:${adminPort}, token: e2e-secret-token }
  hold: { timeout: 10s }
workers:
  - { id: w2, url: "${workerUrl}", token: ${WORKER_TOKEN} }
apps:
  - name: hello
    domains: [hello.apps.test]
    command: [node, ${repoFile('examples/hello/server.js')}]
    http: { port: ${helloPort} }
    idle: 0
`;
}

/** A request on a new connection: a kept-alive one stays piped to the app it reached before. */
function get(px: RunningPicocenter, host: string) {
  return request(`http://127.0.0.1:${px.httpPort}/`, { headers: { host }, dispatcher: new Agent({ pipelining: 0 }) });
}

function killGroup(pid: number): void {
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

describe('picocenter up with a remote worker (picocenter worker)', () => {
  let worker: RunningWorker;
  let px: RunningPicocenter;
  const appPids: number[] = [];

  before(async () => {
    worker = await startWorker('w2');
    px = await startPicocenter(gatewayConfig(worker.url, await freePort(), await freePort())); // the CLI needs a fixed admin port
  });
  after(async () => {
    await px?.stop();
    if (worker && worker.proc.exitCode === null && worker.proc.signalCode === null) worker.proc.kill('SIGKILL');
    // kill -9 of the worker leaves its app processes behind (they run in their own groups)
    for (const pid of appPids) killGroup(pid);
  });

  it('wakes an app on the remote worker and forwards the request', async () => {
    const res = await get(px, 'hello.apps.test');
    assert.equal(res.statusCode, 200);
    const body = await res.body.text();
    assert.match(body, /^hello from hello \(pid \d+/);
    appPids.push(Number(/pid (\d+)/.exec(body)![1]));
    const { body: st } = await px.admin('GET', '/v1/apps/hello');
    assert.equal(st.state, 'running');
    assert.equal(st.worker, 'w2');
    const { body: workers } = await px.admin('GET', '/v1/workers');
    assert.deepEqual(workers, { workers: [{ id: 'w2', reachable: true, apps: 1 }] });
    assert.ok(worker.logs.some((l) => l.msg === 'gateway subscribed to events'));
  });

  it('kill -9 of the worker: the next request gets 503 at once, the gateway serves on', async () => {
    worker.proc.kill('SIGKILL');
    await worker.exit;
    await until(async () => (await px.admin('GET', '/v1/workers')).body.workers[0].reachable === false, 'w2 unreachable');
    assert.ok(px.logs.some((l) => l.msg === 'worker unreachable' && l.worker === 'w2'));
    const { body: st } = await px.admin('GET', '/v1/apps/hello');
    assert.notEqual(st.state, 'running');
    assert.equal(st.lastError.code, 'PICO_ERR_WORKER_UNREACHABLE');

    const t0 = Date.now();
    const res = await get(px, 'hello.apps.test');
    assert.equal(res.statusCode, 503);
    assert.ok(res.headers['retry-after']);
    await res.body.text();
    assert.ok(Date.now() - t0 < 3000, `503 after ${Date.now() - t0} ms`);

    // The rest of the gateway is unaffected.
    const unknown = await get(px, 'nobody.apps.test');
    assert.equal(unknown.statusCode, 404);
    await unknown.body.text();
    const { stdout } = await run(process.execPath, [CLI, 'status', '--config', px.configFile]);
    assert.match(stdout, /\nWORKER\s+REACHABLE\s+APPS\nw2\s+NO\s+0/);
  });
});

describe('picocenter worker stopping', () => {
  it('SIGTERM stops its apps and exits 0; the gateway sees the worker go', async () => {
    const worker = await startWorker('w3');
    const helloPort = await freePort();
    const px = await startPicocenter(gatewayConfig(worker.url, helloPort).replace('id: w2', 'id: w3'));
    let pid = 0;
    try {
      const res = await get(px, 'hello.apps.test');
      assert.equal(res.statusCode, 200);
      pid = Number(/pid (\d+)/.exec(await res.body.text())![1]);
      worker.proc.kill('SIGTERM');
      assert.equal(await worker.exit, 0);
      assert.throws(() => process.kill(pid, 0), { code: 'ESRCH' });
      await until(async () => (await px.appState('hello')) === 'new', 'hello released by the gateway');
    } finally {
      if (worker.proc.exitCode === null) worker.proc.kill('SIGKILL');
      if (pid) killGroup(pid);
      await px.stop();
    }
  });
});
