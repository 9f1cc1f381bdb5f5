import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { request } from 'undici';
import { silentLogger } from '../shared/log.js';
import type { AppSpec } from '../shared/protocol.js';
import { ProcessRuntime } from '../worker/process-runtime.js';
import type { RestoreHint } from '../worker/runtime.js';
import { Worker } from '../worker/worker.js';
import { freePort } from './helpers/ports.js';
import { until } from './helpers/poll.js';
import { repoFile } from './helpers/paths.js';

const dir = mkdtempSync(path.join(tmpdir(), 'pico-runtime-'));
const runtime = new ProcessRuntime(silentLogger());
const worker = new Worker('test', runtime, silentLogger());
after(async () => {
  await worker.stopAll();
  rmSync(dir, { recursive: true, force: true });
});

function spec(name: string, port: number, over: Partial<AppSpec> = {}): AppSpec {
  return { name, command: ['node', repoFile('examples/hello/server.js')], cwd: dir, env: {}, ports: [port], readyTimeoutMs: 10_000, ...over };
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe('process runtime', () => {
  it('starts the command with PORT and reports it running once the port accepts', async () => {
    const port = await freePort();
    const res = await worker.handle({ v: 1, type: 'start', app: spec('hello', port, { env: { APP_NAME: 'greeter' } }) });
    assert.equal(res.type, 'running');
    assert.deepEqual(res.type === 'running' && res.endpoints[port], { host: '127.0.0.1', port });
    const body = await (await request(`http://127.0.0.1:${port}/`)).body.text();
    assert.match(body, /^hello from hello/); // APP_NAME is the worker's to set
  });

  it('a restore request\'s generation reaches the runtime as its hint', async () => {
    const hints: unknown[] = [];
    const recording = new (class extends ProcessRuntime {
      override restore(s: AppSpec, signal?: AbortSignal, hint?: RestoreHint) {
        hints.push(hint);
        return super.restore(s, signal);
      }
    })(silentLogger());
    const w = new Worker('hinted', recording, silentLogger());
    try {
      const port = await freePort();
      assert.equal((await w.handle({ v: 1, type: 'restore', app: spec('hinted', port), generation: 3 })).type, 'running');
      await w.handle({ v: 1, type: 'stop', app: 'hinted' });
      assert.equal((await w.handle({ v: 1, type: 'restore', app: spec('hinted', port) })).type, 'running');
      assert.deepEqual(hints, [{ generation: 3 }, {}]);
    } finally {
      await w.stopAll();
    }
  });

  it('checkpoint (a cold-start runtime: stop) removes the process group', async () => {
    const port = await freePort();
    const script = path.join(dir, 'parent.js');
    writeFileSync(
      script,
      `import { spawn } from 'node:child_process'; import net from 'node:net';
       const child = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000)'], { stdio: 'ignore' });
       (await import('node:fs')).writeFileSync(${JSON.stringify(path.join(dir, 'child.pid'))}, String(child.pid));
       net.createServer(() => {}).listen(Number(process.env.PORT), '127.0.0.1');`,
    );
    const pids: number[] = [];
    const res = await worker.handle({ v: 1, type: 'start', app: spec('parent', port, { command: ['node', script] }) });
    assert.equal(res.type, 'running');
    const list = await worker.handle({ v: 1, type: 'list' });
    assert.ok(list.type === 'list');
    const info = list.containers.find((c) => c.app === 'parent')!;
    pids.push(info.pid!, Number(readFileSync(path.join(dir, 'child.pid'), 'utf8')));
    assert.ok(alive(pids[1]!), 'the child process runs');
    const done = await worker.handle({ v: 1, type: 'checkpoint', app: 'parent' });
    assert.deepEqual(done, { v: 1, type: 'checkpointed', app: 'parent', generation: null });
    await until(() => !alive(pids[0]!) && !alive(pids[1]!), 'the app and its child to be gone');
    await assert.rejects(
      new Promise((resolve, reject) => net.connect(port, '127.0.0.1').on('connect', resolve).on('error', reject)),
      { code: 'ECONNREFUSED' },
    );
  });

  it('fails clearly when the command exits before it is ready, with its stderr', async () => {
    const port = await freePort();
    const res = await worker.handle({ v: 1, type: 'start', app: spec('crash', port, { command: ['node', '-e', 'console.error("no config found"); process.exit(3)'] }) });
    assert.equal(res.type, 'error');
    assert.ok(res.type === 'error');
    assert.equal(res.code, 'PICO_ERR_APP_EXITED');
    assert.match(res.message, /code 3/);
    assert.match(res.message, /no config found/);
  });

  it('fails when the command does not exist', async () => {
    const res = await worker.handle({ v: 1, type: 'start', app: spec('missing', await freePort(), { command: ['/nonexistent/binary'] }) });
    assert.ok(res.type === 'error');
    assert.equal(res.code, 'PICO_ERR_APP_EXITED');
    assert.match(res.message, /ENOENT/);
  });

  it('kills an app whose port never opens, after readyTimeout', async () => {
    const res = await worker.handle({
      v: 1,
      type: 'start',
      app: spec('silent', await freePort(), { command: ['node', '-e', 'setInterval(() => {}, 1000)'], readyTimeoutMs: 300 }),
    });
    assert.ok(res.type === 'error');
    assert.equal(res.code, 'PICO_ERR_READY_TIMEOUT');
    const list = await worker.handle({ v: 1, type: 'list' });
    assert.ok(list.type === 'list' && !list.containers.some((c) => c.app === 'silent'));
  });

  it('reports a container that exits on its own as an event', async () => {
    const port = await freePort();
    const events: string[] = [];
    const off = worker.onEvent((ev) => events.push(ev.type === 'exited' ? `${ev.app}:${ev.code}` : `${ev.app}:${ev.type}`));
    const script = path.join(dir, 'short.js');
    writeFileSync(script, `import net from 'node:net'; net.createServer().listen(Number(process.env.PORT), '127.0.0.1'); setTimeout(() => process.exit(7), 200);`);
    const res = await worker.handle({ v: 1, type: 'start', app: spec('short', port, { command: ['node', script] }) });
    assert.equal(res.type, 'running');
    await until(() => events.includes('short:7'), 'the exit event');
    off();
  });

  it('a stop cancels a start that is still waiting for its ports', async () => {
    const starting = worker.handle({
      v: 1,
      type: 'start',
      app: spec('never-ready', await freePort(), { command: ['node', '-e', 'setInterval(() => {}, 1000)'], readyTimeoutMs: 600_000 }),
    });
    const stopped = await worker.handle({ v: 1, type: 'stop', app: 'never-ready' });
    assert.equal(stopped.type, 'stopped');
    const res = await starting;
    assert.ok(res.type === 'error');
    assert.equal(res.code, 'PICO_ERR_SHUTTING_DOWN');
  });
});
