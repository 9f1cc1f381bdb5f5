import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { silentLogger } from '../shared/log.js';
import { openImageStore } from '../pagestore/index.js';
import { containerIdFor, DEFAULT_PREFIX } from '../worker/oci/app-records.js';
import { NETNS_DIR } from '../worker/oci/netns.js';
import { Runc } from '../worker/oci/runc.js';
import { OciRuntime } from '../worker/oci-runtime.js';
import { CLI, startPicocenter, type RunningPicocenter } from './helpers/picocenter.js';
import { repoFile } from './helpers/paths.js';
import { until } from './helpers/poll.js';
import { trackedSteps } from './helpers/steps.js';
import { freePort } from './helpers/ports.js';
import { ociTestHost } from './helpers/oci-host.js';
import { flipByte } from './helpers/files.js';
import { memoryLimit, type CounterState } from './helpers/oci-client.js';

/*
 * The whole system with `worker.runtime: oci`, in CRIU's zdtm shape: `picocenter up` runs the
 * fixture apps (test/fixtures/oci/*.mjs) in runc containers; each app builds state, is swapped
 * out (CRIU dump into the fs page store) and woken again (restore) through DNS, the HTTP and TCP
 * gateway and the admin API, and then checks its state itself (/verify, VERIFY). Then the
 * failure paths: a read-only store, a flipped byte in a chunk, a SIGKILLed `picocenter up`, and
 * `worker.shutdown: checkpoint` across a SIGTERM.
 *
 * One system (one store, one worker.dataDir) is shared by every case and restarted twice, as an
 * operator would: the cases run in order, and later ones build on the images earlier ones stored.
 * App names carry a per-run suffix: container ids and netns names (`pico-APP`) are host-global.
 */

const exec = promisify(execFile);

const { host, skip } = await ociTestHost();

const TOKEN = 'e2e-oci-secret-token';
const run = randomBytes(3).toString('hex');
const APP = {
  counter: `counter-${run}`,
  twin: `twin-${run}`,
  kv: `kv-${run}`,
  family: `family-${run}`,
  fragile: `fragile-${run}`,
};
const HOST = {
  counter: 'counter.apps.test',
  twin: 'twin.apps.test',
  kv: 'kv.apps.test',
  family: 'family.apps.test',
  fragile: 'fragile.apps.test',
};

interface Family {
  bootId: string;
  pid: number;
  children: { pid: number; port: number }[];
  ipc: { pid: number; count: number; bootId: string }[];
}

interface AppStatus {
  name: string;
  state: string;
  generation: number | null;
  lastError: { code: string; message: string } | null;
  endpoints: Record<string, { host: string; port: number }> | null;
}

describe('picocenter up with the oci runtime: apps swap out and wake with their memory', { skip, timeout: 600_000 }, () => {
  let work = '';
  let storeDir = '';
  let dataDir = '';
  let yaml = '';
  let px: RunningPicocenter | undefined;
  const systems: RunningPicocenter[] = [];
  const mounted: string[] = [];
  let inspect: Runc;
  let kvPort = 0;
  let childPorts: number[] = [];
  const pool = `127.${10 + Math.floor(Math.random() * 200)}.${Math.floor(Math.random() * 250)}.0/24`;

  // What the cases learn and later cases check again (after restarts).
  let counterBoot = '';
  let counterCount = 0;
  let counterGeneration = 0;
  let kvBoot = '';
  // A failed case makes after() print the system's logs.
  const steps = trackedSteps();
  const step = steps.step;

  before(async () => {
    assert.ok(host?.ok, host?.message);
    work = mkdtempSync(path.join(tmpdir(), 'pico-e2e-oci-'));
    storeDir = path.join(work, 'store');
    dataDir = path.join(work, 'data');
    const appsDir = path.join(work, 'apps');
    mkdirSync(appsDir);
    for (const f of ['counter.mjs', 'kv.mjs', 'family.mjs']) copyFileSync(repoFile(`test/fixtures/oci/${f}`), path.join(appsDir, f));
    // Containers see the host's /usr (and /bin, /lib…) read-only plus the app's directory: a Node
    // installed elsewhere (e.g. CI's tool cache) is copied into the app's directory.
    let node = process.execPath;
    if (!/^\/(usr|bin|sbin)\//.test(node)) {
      copyFileSync(node, path.join(appsDir, 'node'));
      node = path.join(appsDir, 'node');
    }
    kvPort = await freePort();
    childPorts = [await freePort(), await freePort()];
    const adminPort = await freePort();
    yaml = `
gateway:
  dns:   { listen: 127.0.0.1:0, zones: [apps.test], ttl: 1s }
  http:  { listen: 127.0.0.1:0 }
  admin: { listen: 127.0.0.1:${adminPort}, token: ${TOKEN} }
  addresses: ${pool}
  hold: { timeout: 90s }
store: { kind: fs, path: ${storeDir} }
worker:
  runtime: oci
  dataDir: ${dataDir}
  readyTimeout: 60s
  shutdown: checkpoint
apps:
  - name: ${APP.counter}
    domains: [${HOST.counter}]
    command: [${node}, counter.mjs]
    cwd: ${appsDir}
    http: { port: 8080 }
    idle: 0
    memory: 256Mi
  - name: ${APP.twin}
    domains: [${HOST.twin}]
    command: [${node}, counter.mjs]
    cwd: ${appsDir}
    http: { port: 8080 }
    idle: 0
  - name: ${APP.kv}
    domains: [${HOST.kv}]
    command: [${node}, kv.mjs]
    cwd: ${appsDir}
    tcp: [${kvPort}]
    idle: 1s
  - name: ${APP.family}
    domains: [${HOST.family}]
    command: [${node}, family.mjs]
    cwd: ${appsDir}
    http: { port: 8080 }
    tcp: [${childPorts.join(', ')}]
    idle: 0
  - name: ${APP.fragile}
    domains: [${HOST.fragile}]
    command: [${node}, counter.mjs]
    cwd: ${appsDir}
    http: { port: 8080 }
    idle: 0
    # A full restore reads every chunk before the app runs, so a bad one fails the wake itself
    # (a lazy restore finds it when the page is read: oci-lazy.test.ts).
    restore: full
`;
    px = await start();
    inspect = new Runc({ criu: host!.criu!.path, root: path.join(dataDir, 'oci', 'runc'), logDir: path.join(work, 'inspect-logs') });
  });

  after(async () => {
    if (steps.failed) {
      for (const [i, s] of systems.entries()) {
        const lines = s.logs.filter((l) => l.level >= 30).slice(-80);
        console.error(`--- picocenter up #${i + 1}, last log lines:\n${lines.map((l) => JSON.stringify(l)).join('\n')}`);
      }
    }
    // Everything, even after a failed case: the store writable again, the system stopped, every
    // container of our runc root killed and every netns of our apps removed (what a restarted
    // worker's clean-up does), then the files.
    for (const dir of mounted.splice(0)) await exec('umount', [dir]).catch((e: unknown) => console.error('cleanup: umount:', e));
    for (const s of systems) {
      if (s.proc.exitCode !== null || s.proc.signalCode !== null) continue;
      const stopped = await Promise.race([s.stop(), new Promise((r) => setTimeout(r, 60_000).unref())]);
      if (stopped === undefined) s.proc.kill('SIGKILL');
    }
    if (host?.criu && dataDir && existsSync(path.join(dataDir, 'oci'))) {
      await new OciRuntime({ log: silentLogger(), imageStore: openImageStore({ kind: 'fs', path: storeDir }), criu: host.criu.path, stateDir: path.join(dataDir, 'oci') })
        .cleanLeftovers()
        .catch((e: unknown) => console.error('cleanup:', e));
    }
    for (const app of Object.values(APP)) {
      const id = containerIdFor(DEFAULT_PREFIX, app);
      if (existsSync(path.join(NETNS_DIR, id))) {
        console.error(`cleanup: netns ${id} was left; removing it`);
        await exec('ip', ['netns', 'del', id]).catch(() => undefined);
      }
    }
    for (const s of systems) rmSync(s.dir, { recursive: true, force: true });
    if (work) rmSync(work, { recursive: true, force: true });
  });

  // ---- the system ----

  async function start(): Promise<RunningPicocenter> {
    // `picocenter up` with oci checks the host (criu runs seven times) and cleans up first.
    const s = await startPicocenter(yaml, { upTimeoutMs: 60_000 });
    systems.push(s);
    return s;
  }

  function sys(): RunningPicocenter {
    assert.ok(px, 'no system running');
    return px;
  }

  async function status(app: string): Promise<AppStatus> {
    const { status: code, body } = await sys().admin('GET', `/v1/apps/${app}`);
    assert.equal(code, 200, JSON.stringify(body));
    return body as AppStatus;
  }

  async function waitState(app: string, state: string, what = `${app} ${state}`): Promise<AppStatus> {
    let last: AppStatus | undefined;
    try {
      return await until(async () => {
        last = await status(app);
        return last.state === state ? last : undefined;
      }, what, 90_000);
    } catch (err) {
      throw new Error(`${(err as Error).message}; last status: ${JSON.stringify(last)}`);
    }
  }

  /** Swaps the app out through the admin API; returns its new generation. */
  async function checkpoint(app: string): Promise<number> {
    const { status: code, body } = await sys().admin('POST', `/v1/apps/${app}/checkpoint`);
    assert.equal(code, 200, JSON.stringify(body));
    assert.equal(body.state, 'stored');
    assert.equal(typeof body.generation, 'number');
    return body.generation as number;
  }

  async function lookup(name: string): Promise<string> {
    const { stdout } = await exec('dig', ['@127.0.0.1', '-p', String(sys().dnsPort), name, 'A', '+short', '+tries=3', '+time=2']);
    return stdout.trim();
  }

  /** HTTP through the gateway's shared listener, routed by Host (held while the app wakes). */
  function viaGateway(hostName: string, method: string, p: string): Promise<{ status: number; body: string; headers: http.IncomingHttpHeaders }> {
    return httpRequest('127.0.0.1', sys().httpPort, hostName, method, p);
  }

  async function counterState(hostName: string): Promise<CounterState> {
    const r = await viaGateway(hostName, 'GET', '/state');
    assert.equal(r.status, 200, r.body);
    return JSON.parse(r.body) as CounterState;
  }

  async function inc(hostName: string): Promise<number> {
    const r = await viaGateway(hostName, 'POST', '/inc');
    assert.equal(r.status, 200, r.body);
    return (JSON.parse(r.body) as { count: number }).count;
  }

  async function verify(hostName: string): Promise<void> {
    const r = await viaGateway(hostName, 'GET', '/verify');
    assert.equal(`${r.status} ${r.body}`, '200 PASS');
  }

  async function assertNoContainer(app: string): Promise<void> {
    assert.equal(await inspect.state(containerIdFor(DEFAULT_PREFIX, app)), null, `runc still has a container of ${app}`);
  }

  // ---- the cases, in order ----


  step('an HTTP counter keeps its count across three swap cycles, driven through DNS and the gateway', async () => {
    assert.equal((await status(APP.counter)).state, 'new');
    assert.equal(await lookup(HOST.counter), '127.0.0.1', 'HTTP apps are looked up to the gateway');
    // The lookup alone starts the app: no connection yet.
    await waitState(APP.counter, 'running', 'counter running after its lookup');
    const first = await counterState(HOST.counter);
    assert.equal(first.app, APP.counter);
    assert.equal(first.count, 0);
    counterBoot = first.bootId;
    let generation = 0;
    let ticks = first.ticks;
    for (let cycle = 1; cycle <= 3; cycle++) {
      for (let i = 0; i < cycle; i++) assert.equal(await inc(HOST.counter), ++counterCount);
      const g = await checkpoint(APP.counter);
      assert.ok(g > generation, `generation ${g} after ${generation}`);
      generation = g;
      const stored = await status(APP.counter);
      assert.equal(stored.state, 'stored');
      assert.equal(stored.generation, g);
      assert.equal(stored.endpoints, null);
      await assertNoContainer(APP.counter);

      // A lookup of a stored app starts its wake before any client connects.
      assert.equal(await lookup(HOST.counter), '127.0.0.1');
      const running = await waitState(APP.counter, 'running', `counter running after lookup ${cycle}`);
      assert.equal(running.generation, g);
      const s = await counterState(HOST.counter);
      assert.deepEqual(
        { bootId: s.bootId, pid: s.pid, count: s.count, app: s.app },
        { bootId: counterBoot, pid: first.pid, count: counterCount, app: APP.counter },
        `cycle ${cycle}: the app came back as it was, without re-running its start-up`,
      );
      assert.ok(s.ticks >= ticks, `ticks went back from ${ticks} to ${s.ticks}`);
      // Its timer runs on after the restore.
      const restoredTicks = s.ticks;
      await until(async () => (await counterState(HOST.counter)).ticks > restoredTicks, 'the restored timer to tick');
      ticks = restoredTicks;
      await verify(HOST.counter);
    }
    counterGeneration = generation;
    // `memory: 256Mi` is the container's cgroup limit, after a restore too.
    const st = await inspect.state(containerIdFor(DEFAULT_PREFIX, APP.counter));
    assert.ok(st && st.status === 'running', `runc state: ${JSON.stringify(st)}`);
    assert.equal(memoryLimit(st.pid), 256 * 1024 * 1024);
    // The wakes were lazy restores with an ActiveSet (the default mode), and the metrics say so.
    const app = APP.counter; // letters, digits and dashes: nothing to escape in a pattern
    await until(async () => {
      const { body } = await sys().admin('GET', '/metrics');
      const text = String(body);
      const value = (re: RegExp) => Number(re.exec(text)?.[1] ?? NaN);
      return (
        value(new RegExp(`picocenter_checkpoint_bytes_total\\{app="${app}",part="image"\\} (\\d+)`)) > 0 &&
        value(new RegExp(`picocenter_restore_chunks_total\\{app="${app}",mode="activeset",how="metadata"\\} (\\d+)`)) > 0 &&
        value(new RegExp(`picocenter_activeset_chunks_total\\{app="${app}",result="hit"\\} (\\d+)`)) > 0 &&
        value(new RegExp(`picocenter_wake_duration_seconds_count\\{app="${app}",kind="restore",mode="activeset"\\} (\\d+)`)) === 3
      );
    }, 'checkpoint, restore and ActiveSet metrics for the counter app');
  });

  step('a TCP key-value app reached at its own address keeps its data across swaps', async () => {
    const address = await lookup(HOST.kv);
    assert.ok(address.startsWith(pool.split('.').slice(0, 3).join('.') + '.'), `kv's address ${address} is from the pool ${pool}`);
    const answers = await kv(address, kvPort, 'SET a 1', 'SET b two words', 'SET a 3', 'BOOT', 'VERIFY');
    kvBoot = answers[3]!;
    assert.deepEqual(answers, ['OK', 'OK', 'OK', kvBoot, 'PASS']);
    assert.match(kvBoot, /^[0-9a-f-]{36}$/);
    // idle: 1s — it swaps itself out once no connection is open.
    const stored = await waitState(APP.kv, 'stored', 'kv swapped out after its idle time');
    assert.ok(stored.generation !== null && stored.generation >= 1);
    await assertNoContainer(APP.kv);

    // Woken by its lookup…
    assert.equal(await lookup(HOST.kv), address);
    assert.deepEqual(await kv(address, kvPort, 'GET a', 'GET b', 'GET c', 'BOOT', 'VERIFY'), ['3', 'two words', 'NIL', kvBoot, 'PASS']);
    assert.deepEqual(await kv(address, kvPort, 'SET c 4'), ['OK']);
    const again = await waitState(APP.kv, 'stored', 'kv swapped out again');
    assert.ok(again.generation! > stored.generation!, `generation ${again.generation} after ${stored.generation}`);

    // …or by a connection alone, held while it restores.
    assert.deepEqual(await kv(address, kvPort, 'GET a', 'GET c', 'BOOT', 'VERIFY'), ['3', '4', kvBoot, 'PASS']);
    await waitState(APP.kv, 'stored', 'kv stored before the next cases');
  });

  step('a multi-process app (a parent with worker children) comes back whole', async () => {
    const address = await lookup(HOST.family);
    await waitState(APP.family, 'running', 'family running after its lookup');
    const before = await familyOf();
    assert.equal(before.children.length, 2);
    assert.deepEqual(before.children.map((c) => c.port), childPorts);
    // Each child is reached at the app's own address, on its own port.
    assert.equal(await childInc(address, childPorts[0]!), 1);
    assert.equal(await childInc(address, childPorts[0]!), 2);
    assert.equal(await childInc(address, childPorts[1]!), 1);

    await checkpoint(APP.family);
    await assertNoContainer(APP.family);
    // Woken by a request to one child, held while the whole tree restores.
    const child0 = await childState(address, childPorts[0]!);
    const after = await familyOf();
    assert.deepEqual(
      { bootId: after.bootId, pid: after.pid, children: after.children },
      { bootId: before.bootId, pid: before.pid, children: before.children },
      'the same parent with the same children',
    );
    // The IPC channels between parent and children still work, and each child kept its memory.
    assert.deepEqual(
      after.ipc,
      before.ipc.map((c, i) => ({ ...c, count: [2, 1][i] })),
    );
    assert.deepEqual(child0, { pid: before.children[0]!.pid, ppid: before.pid, count: 2, bootId: before.ipc[0]!.bootId });
    assert.equal(await childInc(address, childPorts[1]!), 2);

    async function familyOf(): Promise<Family> {
      const r = await viaGateway(HOST.family, 'GET', '/family');
      assert.equal(r.status, 200, r.body);
      return JSON.parse(r.body) as Family;
    }
  });

  step('two apps listening on the same port in their own namespaces both work through the gateway', async () => {
    const twin = await counterState(HOST.twin);
    const counter = await counterState(HOST.counter);
    assert.equal(twin.app, APP.twin);
    assert.equal(counter.app, APP.counter);
    assert.notEqual(twin.bootId, counter.bootId);
    const [t, c] = await Promise.all([status(APP.twin), status(APP.counter)]);
    assert.equal(t.state, 'running');
    assert.equal(c.state, 'running');
    assert.equal(t.endpoints?.['8080']?.port, 8080);
    assert.equal(c.endpoints?.['8080']?.port, 8080);
    assert.notEqual(t.endpoints?.['8080']?.host, c.endpoints?.['8080']?.host, 'each at its own container address');

    assert.equal(await inc(HOST.twin), 1);
    assert.equal(await inc(HOST.twin), 2);
    // One swaps out and back in while the other serves on.
    await checkpoint(APP.twin);
    assert.equal((await counterState(HOST.counter)).count, counterCount);
    const back = await counterState(HOST.twin); // held while it restores
    assert.deepEqual([back.bootId, back.count], [twin.bootId, 2]);
    assert.equal((await counterState(HOST.counter)).count, counterCount);
    await verify(HOST.twin);
    await verify(HOST.counter);
  });

  step('`picocenter logs APP` shows the app\'s output across checkpoints', async () => {
    const { stdout } = await exec(process.execPath, [CLI, 'logs', APP.counter, '--config', sys().configFile]);
    assertCounterLog(stdout);
  });

  step('a store that is not writable: the checkpoint fails, the app runs on and answers; once writable, it swaps out', async () => {
    const boot = await counterState(HOST.fragile);
    assert.equal(await inc(HOST.fragile), 1);
    assert.equal(await inc(HOST.fragile), 2);

    // Root ignores mode bits: make the store a read-only bind mount of itself.
    await exec('mount', ['--bind', storeDir, storeDir]);
    mounted.push(storeDir);
    await exec('mount', ['-o', 'remount,ro,bind', storeDir]);
    try {
      const res = await sys().admin('POST', `/v1/apps/${APP.fragile}/checkpoint`);
      assert.ok(res.status >= 400, `checkpoint answered ${res.status}: ${JSON.stringify(res.body)}`);
      assert.equal(res.body.error.code, 'PICO_ERR_CHECKPOINT_FAILED');
      const st = await status(APP.fragile);
      assert.equal(st.state, 'running');
      assert.equal(st.generation, null, 'no image was stored');
      assert.equal(st.lastError?.code, 'PICO_ERR_CHECKPOINT_FAILED');
      assert.match(st.lastError!.message, /EROFS|read-only/i);
      assert.match(st.lastError!.message, /keeps running/);
      // Still answering, with its memory.
      const s = await counterState(HOST.fragile);
      assert.deepEqual([s.bootId, s.count], [boot.bootId, 2]);
      assert.equal(await inc(HOST.fragile), 3);
      await verify(HOST.fragile);
    } finally {
      await exec('umount', [storeDir]);
      mounted.splice(mounted.indexOf(storeDir), 1);
    }

    const g = await checkpoint(APP.fragile);
    assert.equal((await status(APP.fragile)).generation, g);
    await assertNoContainer(APP.fragile);
    const s = await counterState(HOST.fragile); // held while it restores
    assert.deepEqual([s.bootId, s.count], [boot.bootId, 3]);
    await verify(HOST.fragile);
  });

  step('a flipped byte in a chunk: the wake fails naming the corruption, the client gets 503, nothing runs', async () => {
    const boot = await counterState(HOST.fragile);
    const g = await checkpoint(APP.fragile);
    // A chunk of the app's biggest pages file that no other image shares (chunks are deduplicated).
    const manifest = readManifest(APP.fragile, g);
    const pages = manifest.files.filter((f) => /^pages-\d+\.img$/.test(f.path)).sort((x, y) => y.size - x.size)[0]!;
    const others = new Set(allManifests().filter((m) => !(m.app === APP.fragile && m.generation === g)).flatMap((m) => m.files.flatMap((f) => f.chunks)));
    const chunk = pages.chunks.slice(Math.floor(pages.chunks.length / 2)).find((c) => !others.has(c));
    assert.ok(chunk, 'a chunk only this image has');
    const chunkFile = path.join(storeDir, 'chunks', chunk.slice(0, 2), chunk);
    flipByte(chunkFile, 100);
    // The worker keeps the image it just stored and would restore from that copy: drop it, so
    // this wake has to read the image back from the store.
    const appState = path.join(dataDir, 'oci', 'apps', APP.fragile);
    assert.ok(existsSync(path.join(appState, 'local.json')), 'the worker kept a local copy of the image');
    rmSync(path.join(appState, 'local.json'), { force: true });
    rmSync(path.join(appState, 'local'), { recursive: true, force: true });

    const res = await viaGateway(HOST.fragile, 'GET', '/state');
    assert.equal(res.status, 503, res.body);
    assert.ok(res.headers['retry-after'], 'a 503 says when to retry');
    const st = await status(APP.fragile);
    assert.equal(st.state, 'stored');
    assert.equal(st.generation, g);
    assert.ok(st.lastError, 'the failure is recorded');
    assert.equal(st.lastError.code, 'PICO_ERR_IMAGE_CORRUPT');
    assert.match(st.lastError.message, new RegExp(`generation ${g} cannot be restored: .*${chunk}.*failed its checksum`));
    await assertNoContainer(APP.fragile);

    // The byte put back: the next wake restores the same generation, memory and all.
    flipByte(chunkFile, 100);
    const s = await counterState(HOST.fragile);
    assert.deepEqual([s.bootId, s.count], [boot.bootId, 3]);
    await verify(HOST.fragile);
  });

  step('`picocenter up` killed (SIGKILL) while an app is stored: restarted, the app is stored and wakes with its state', async () => {
    assert.equal(await inc(HOST.counter), ++counterCount);
    counterGeneration = await checkpoint(APP.counter);
    // twin, family and fragile are running: their containers outlive the killed process.
    const running = (await inspect.list()).map((c) => c.id);
    assert.ok(running.includes(containerIdFor(DEFAULT_PREFIX, APP.twin)), `runc has ${running.join(', ')}`);

    const old = sys();
    const exited = once(old.proc, 'exit');
    old.proc.kill('SIGKILL');
    await exited;
    px = undefined;
    px = await start();

    // The new worker removed what the old one left running; the apps with an image are stored.
    assert.deepEqual(await inspect.list(), []);
    const counter = await status(APP.counter);
    assert.equal(counter.state, 'stored');
    assert.equal(counter.generation, counterGeneration);
    assert.equal((await status(APP.kv)).state, 'stored');

    assert.equal(await lookup(HOST.counter), '127.0.0.1');
    await waitState(APP.counter, 'running', 'counter running after its lookup');
    const s = await counterState(HOST.counter);
    assert.deepEqual([s.bootId, s.count], [counterBoot, counterCount]);
    await verify(HOST.counter);
    const address = await lookup(HOST.kv);
    assert.deepEqual(await kv(address, kvPort, 'GET a', 'GET c', 'BOOT', 'VERIFY'), ['3', '4', kvBoot, 'PASS']);
  });

  step('worker.shutdown: checkpoint — SIGTERM swaps running apps out, and they wake with their state after a restart', async () => {
    assert.equal(await inc(HOST.counter), ++counterCount);
    assert.equal((await status(APP.counter)).state, 'running');
    assert.equal(await sys().stop(), 0);
    px = undefined;
    await until(async () => (await inspect.list()).length === 0, 'no container left after the shutdown');
    px = await start();

    const counter = await status(APP.counter);
    assert.equal(counter.state, 'stored');
    assert.ok(counter.generation! > counterGeneration, `generation ${counter.generation} after ${counterGeneration}`);
    const s = await counterState(HOST.counter); // held while it restores
    assert.deepEqual([s.bootId, s.count], [counterBoot, counterCount], 'the count since the last restore was not lost');
    await verify(HOST.counter);
    // Across two restarts of the system, the log shows one start-up and every increment.
    const { stdout } = await exec(process.execPath, [CLI, 'logs', APP.counter, '--config', sys().configFile]);
    assertCounterLog(stdout);
  });

  // ---- helpers that need the case state ----

  function assertCounterLog(text: string): void {
    const boots = [...text.matchAll(/^booted (\S+) listening on 8080$/gm)].map((m) => m[1]);
    assert.deepEqual(boots, [counterBoot], `one start-up in the log:\n${text}`);
    const incs = [...text.matchAll(/^inc (\d+)$/gm)].map((m) => Number(m[1]));
    assert.deepEqual(incs, Array.from({ length: counterCount }, (_, i) => i + 1), `every increment in the log:\n${text}`);
  }

  interface Manifest {
    app: string;
    generation: number;
    files: { path: string; size: number; chunks: string[] }[];
  }

  function readManifest(app: string, generation: number): Manifest {
    return JSON.parse(readFileSync(path.join(storeDir, 'apps', app, `${String(generation).padStart(10, '0')}.json`), 'utf8')) as Manifest;
  }

  function allManifests(): Manifest[] {
    const out: Manifest[] = [];
    for (const app of readdirSync(path.join(storeDir, 'apps'))) {
      for (const f of readdirSync(path.join(storeDir, 'apps', app))) {
        if (/^\d{10}\.json$/.test(f)) out.push(JSON.parse(readFileSync(path.join(storeDir, 'apps', app, f), 'utf8')) as Manifest);
      }
    }
    return out;
  }
});

/*
 * Found by the shutdown case above: `picocenter up` logged "stopped" and then lived on for ~10 s,
 * because worker/oci-runtime.ts left a timer running after each checkpoint (the bound on runc's
 * exit after a dump) and after each stop (the SIGTERM grace period): Promise.race with a bare
 * delay() never cancels the delay, and a pending timer keeps the process alive.
 */
describe('the oci runtime leaves no timer running after a checkpoint or a stop', { skip, timeout: 120_000 }, () => {
  let work = '';
  let runtime: OciRuntime | undefined;
  let stateDir = '';

  before(() => {
    assert.ok(host?.ok, host?.message);
    work = mkdtempSync(path.join(tmpdir(), 'pico-e2e-oci-timers-'));
    stateDir = path.join(work, 'state');
    mkdirSync(path.join(work, 'app'));
    copyFileSync(repoFile('test/fixtures/oci/kv.mjs'), path.join(work, 'app', 'kv.mjs'));
    runtime = new OciRuntime({
      log: silentLogger(),
      imageStore: openImageStore({ kind: 'fs', path: path.join(work, 'store') }),
      criu: host!.criu!.path,
      stateDir,
      prefix: `pe${run}-`,
      stopGraceMs: 3000,
      defaults: { readOnlyPaths: /^\/(usr|bin|sbin)\//.test(process.execPath) ? [] : [path.dirname(process.execPath)] },
    });
  });

  after(async () => {
    for (const c of runtime?.containers() ?? []) await runtime!.stop(c).catch((e: unknown) => console.error('cleanup: stop:', e));
    if (runtime) await runtime.cleanLeftovers().catch((e: unknown) => console.error('cleanup:', e));
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('checkpoint and stop resolve with no timer of theirs left behind', async () => {
    const timers = () => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;
    const spec = { name: `timers-${run}`, command: [process.execPath, 'kv.mjs'], cwd: path.join(work, 'app'), env: {}, ports: [6379], readyTimeoutMs: 30_000 };
    const c = await runtime!.start(spec);
    const beforeCheckpoint = timers();
    await runtime!.checkpoint(c);
    assert.equal(timers(), beforeCheckpoint, 'a timer is left running after the checkpoint');
    // The restore's own timers (a lazy one pages memory in in the background) end with the stop.
    const beforeRestore = timers();
    const restored = await runtime!.restore(spec);
    await runtime!.stop(restored);
    assert.equal(timers(), beforeRestore, 'a timer is left running after the stop');
  });
});

// ---- talking to apps ----

function httpRequest(
  hostAddr: string,
  port: number,
  hostName: string,
  method: string,
  p: string,
): Promise<{ status: number; body: string; headers: http.IncomingHttpHeaders }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: hostAddr, port, method, path: p, agent: false, headers: { host: hostName, connection: 'close' }, timeout: 120_000 },
      (res) => {
        let body = '';
        res.setEncoding('utf8').on('data', (d: string) => (body += d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }));
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${hostName}${p}: no answer in 120 s`)));
    req.on('error', reject);
    req.end();
  });
}

async function childInc(address: string, port: number): Promise<number> {
  const r = await httpRequest(address, port, 'child', 'POST', '/inc');
  assert.equal(r.status, 200, r.body);
  return (JSON.parse(r.body) as { count: number }).count;
}

async function childState(address: string, port: number): Promise<{ pid: number; ppid: number; count: number; bootId: string }> {
  const r = await httpRequest(address, port, 'child', 'GET', '/state');
  assert.equal(r.status, 200, r.body);
  return JSON.parse(r.body);
}

/** Sends each command on one connection (through the gateway) and returns one answer line each. */
async function kv(address: string, port: number, ...commands: string[]): Promise<string[]> {
  const conn = net.connect({ host: address, port });
  try {
    const answers: string[] = [];
    const rl = createInterface({ input: conn });
    await new Promise<void>((resolve, reject) => {
      rl.on('line', (l) => {
        answers.push(l);
        if (answers.length === commands.length) resolve();
      });
      conn.on('error', reject);
      conn.on('close', () => reject(new Error(`connection closed after ${answers.length} of ${commands.length} answers (${answers.join(' | ')})`)));
      setTimeout(() => reject(new Error(`no full answer in 120 s (${answers.length} of ${commands.length})`)), 120_000).unref();
      conn.write(commands.map((c) => `${c}\n`).join(''));
    });
    rl.close();
    return answers;
  } finally {
    conn.destroy();
  }
}

