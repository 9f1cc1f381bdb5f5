import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { silentLogger } from '../shared/log.js';
import { openImageStore } from '../pagestore/index.js';
import { containerIdFor, DEFAULT_PREFIX } from '../worker/oci/app-records.js';
import { NETNS_DIR } from '../worker/oci/netns.js';
import { OciRuntime } from '../worker/oci-runtime.js';
import { startCli, startPicocenter, type LogLine, type RunningPicocenter } from './helpers/picocenter.js';
import { ociTestHost } from './helpers/oci-host.js';
import { repoFile } from './helpers/paths.js';
import type { CounterState } from './helpers/oci-client.js';
import { until } from './helpers/poll.js';
import { trackedSteps } from './helpers/steps.js';
import { freePort } from './helpers/ports.js';
import { startS3Server, type S3TestServer } from './helpers/s3-server.js';

/*
 * Two `picocenter worker` processes with the oci runtime behind one `picocenter up` (no embedded
 * worker), sharing a page store in a real S3 API server (s3rver in a child process): an app
 * checkpointed by one worker is restored by the other, which never ran it and starts with an
 * empty chunk cache and no local image, so every byte it restores comes from S3.
 *
 *   client ─► gateway ─► wa: start, swap out (idle) ─► S3 ◄─ wa: restore, swap out again
 *                                                      │    (the restore's ActiveSet goes to S3)
 *                  wa stopped (SIGTERM) ─► unreachable │
 *   client ─► gateway ─► wb: activeset restore ◄───────┘    (ActiveSet prefetched from S3)
 *
 * The counter app (test/fixtures/oci/counter.mjs) is the zdtm-style witness: its count and boot
 * id only survive through its memory, and /verify checks 32 MiB of it against a hash taken at
 * start-up. Which worker did what is read off the three processes' logs, so a cold start on wb
 * (count 0, a new boot id) or a restore on wa cannot pass.
 *
 * Both workers run on this host, so they share what the host has once: the app's netns name
 * (pico-APP) and the 10.200.0.0/16 slots. wa keeps the stored app's netns (worker.shutdown: stop
 * only stops running apps); wb picks another slot (the interface exists) and makes the netns
 * afresh under the same name, as a worker on another machine would make its own.
 */

const exec = promisify(execFile);

const { host, skip } = await ociTestHost();

const ADMIN_TOKEN = 'e2e-oci-workers-admin';
const WORKER_TOKEN = 'e2e-oci-workers-secret';
// Container ids and netns names (`pico-APP`) are host-global: a per-run name.
const APP = `relay-${randomBytes(3).toString('hex')}`;
const HOST = 'relay.apps.test';

interface RunningWorker {
  id: string;
  dir: string;
  dataDir: string;
  url: string;
  logs: LogLine[];
  exit: Promise<number | null>;
  kill(signal: NodeJS.Signals): void;
  running(): boolean;
}

describe('two oci workers on one S3 page store: one checkpoints, the other restores', { skip, timeout: 300_000 }, () => {
  let work = '';
  let s3: S3TestServer | undefined;
  const workers: RunningWorker[] = [];
  let px: RunningPicocenter | undefined;
  // A failed case makes after() print the system's logs.
  const steps = trackedSteps();
  const step = steps.step;

  before(async () => {
    assert.ok(host?.ok, host?.message);
    work = mkdtempSync(path.join(tmpdir(), 'pico-e2e-oci-workers-'));
    const appDir = path.join(work, 'app');
    mkdirSync(appDir);
    copyFileSync(repoFile('test/fixtures/oci/counter.mjs'), path.join(appDir, 'counter.mjs'));
    // Containers see the host's /usr (and /bin, /lib…) read-only plus the app's directory: a Node
    // installed elsewhere (e.g. CI's tool cache) is copied into the app's directory.
    let node = process.execPath;
    if (!/^\/(usr|bin|sbin)\//.test(node)) {
      copyFileSync(node, path.join(appDir, 'node'));
      node = path.join(appDir, 'node');
    }
    s3 = await startS3Server();
    const store = `{ kind: s3, endpoint: "${s3.endpoint}", region: ${s3.region}, bucket: ${s3.bucket}, prefix: images/, pathStyle: true }`;
    // Each worker: its own state directory and a chunk cache in memory only, so it starts empty.
    workers.push(...(await Promise.all(['wa', 'wb'].map((id) => startWorker(id, store)))));
    const [wa, wb] = workers as [RunningWorker, RunningWorker];
    px = await startPicocenter(
      `
gateway:
  embeddedWorker: false
  dns:   { listen: 127.0.0.1:0, zones: [apps.test] }
  http:  { listen: 127.0.0.1:0 }
  admin: { listen: 127.0.0.1:${await freePort()}, token: ${ADMIN_TOKEN} }
  hold: { timeout: 90s }
store: ${store}
worker: { runtime: oci }
workers:
  - { id: wa, url: "${wa.url}", token: ${WORKER_TOKEN} }
  - { id: wb, url: "${wb.url}", token: ${WORKER_TOKEN} }
apps:
  - name: ${APP}
    domains: [${HOST}]
    command: [${node}, counter.mjs]
    cwd: ${appDir}
    http: { port: 8080 }
    # Swapped out 2 s after its last connection: long enough not to happen between the
    # requests of one step, short enough to keep the test quick.
    idle: 2s
    memory: 256Mi
`,
      { upTimeoutMs: 30_000 },
    );
  });

  after(async () => {
    if (steps.failed) {
      for (const [name, logs] of [['picocenter up', px?.logs ?? []], ...workers.map((w) => [`picocenter worker ${w.id}`, w.logs] as const)] as const) {
        const lines = logs.filter((l) => l.level >= 30).slice(-60);
        console.error(`--- ${name}, last log lines:\n${lines.map((l) => JSON.stringify(l)).join('\n')}`);
      }
    }
    await px?.stop();
    // A worker that does not stop cleanly in time is killed; its containers are removed below.
    for (const w of workers) {
      if (!w.running()) continue;
      w.kill('SIGTERM');
      let timer: NodeJS.Timeout | undefined;
      const stopped = await Promise.race([w.exit.then(() => true), new Promise((r) => (timer = setTimeout(r, 30_000, false)))]);
      clearTimeout(timer); // a pending timer would keep this test process alive for its 30 s
      if (!stopped) {
        w.kill('SIGKILL');
        await w.exit;
      }
    }
    // What a restarted worker on each state directory would clean up: containers of its runc
    // root, netns of its apps (wb's netns of the app has the name wa's had: each removes it).
    if (host?.criu) {
      for (const w of workers) {
        await new OciRuntime({ log: silentLogger(), imageStore: openImageStore({ kind: 'fs', path: path.join(work, 'cleanup-store') }), criu: host.criu.path, stateDir: path.join(w.dataDir, 'oci') })
          .cleanLeftovers()
          .catch((e: unknown) => console.error(`cleanup of ${w.id}:`, e));
      }
    }
    const id = containerIdFor(DEFAULT_PREFIX, APP);
    if (existsSync(path.join(NETNS_DIR, id))) {
      console.error(`cleanup: netns ${id} was left; removing it`);
      await exec('ip', ['netns', 'del', id]).catch(() => undefined);
    }
    await s3?.stop();
    if (px) rmSync(px.dir, { recursive: true, force: true });
    if (work) rmSync(work, { recursive: true, force: true });
  });

  /** `picocenter worker` with the oci runtime on a free port; resolves once it logs its URL. */
  async function startWorker(id: string, store: string): Promise<RunningWorker> {
    const dir = path.join(work, id);
    mkdirSync(dir);
    const dataDir = path.join(dir, 'data');
    writeFileSync(
      path.join(dir, 'worker.yaml'),
      `
gateway: { dns: { zones: [apps.test] }, admin: { token: unused-admin-token } }
store: ${store}
worker:
  runtime: oci
  listen: 127.0.0.1:0
  token: ${WORKER_TOKEN}
  dataDir: ${dataDir}
  readyTimeout: 60s
  shutdown: stop
  cache: { memory: 256Mi, disk: 0 }
`,
    );
    // No credentials in the config: the SDK's chain finds them in the environment. Instance
    // metadata is off, so that a miss can never send a request off this machine.
    const env = {
      AWS_ACCESS_KEY_ID: s3!.credentials.accessKeyId,
      AWS_SECRET_ACCESS_KEY: s3!.credentials.secretAccessKey,
      AWS_EC2_METADATA_DISABLED: 'true',
      AWS_PROFILE: undefined,
      AWS_SESSION_TOKEN: undefined,
    };
    // An oci worker checks the host first (criu runs several times) and cleans up its state dir.
    const { proc, logs, up, exit } = await startCli(['worker', '--config', path.join(dir, 'worker.yaml'), '--id', id], dir, 'picocenter worker up', 60_000, env);
    return {
      id,
      dir,
      dataDir,
      url: up.url as string,
      logs,
      exit,
      kill: (signal) => void proc.kill(signal),
      running: () => proc.exitCode === null && proc.signalCode === null,
    };
  }

  // ---- talking to the system ----

  function sys(): RunningPicocenter {
    assert.ok(px, 'no gateway running');
    return px;
  }

  async function status(): Promise<{ state: string; worker: string | null; generation: number | null; lastError: unknown }> {
    const { status: code, body } = await sys().admin('GET', `/v1/apps/${APP}`);
    assert.equal(code, 200, JSON.stringify(body));
    return body;
  }

  async function waitStored(after: number | null): Promise<number> {
    let last;
    try {
      return await until(async () => {
        last = await status();
        return last.state === 'stored' && last.generation !== null && (after === null || last.generation > after) ? last.generation : undefined;
      }, `${APP} stored after generation ${after}`, 90_000);
    } catch (err) {
      throw new Error(`${(err as Error).message}; last status: ${JSON.stringify(last)}`);
    }
  }

  async function counterState(): Promise<CounterState> {
    const r = await viaGateway(sys().httpPort, 'GET', '/state');
    assert.equal(r.status, 200, r.body);
    return JSON.parse(r.body) as CounterState;
  }

  async function inc(): Promise<number> {
    const r = await viaGateway(sys().httpPort, 'POST', '/inc');
    assert.equal(r.status, 200, r.body);
    return (JSON.parse(r.body) as { count: number }).count;
  }

  /** The gateway's log lines about the app's wakes: which worker, start or restore. */
  function wakes(): { worker: unknown; kind: unknown }[] {
    return sys().logs.filter((l) => l.msg === 'wake' && l.app === APP).map((l) => ({ worker: l.worker, kind: l.kind }));
  }

  /**
   * The `n`th wake, once the gateway's log shows it. Logs are written asynchronously and come
   * through another pipe than the answer: a line may arrive after the answer it preceded.
   */
  async function wake(n: number): Promise<{ worker: unknown; kind: unknown }> {
    return until(() => wakes()[n - 1], `wake ${n} in the gateway's log`);
  }

  function logged(w: RunningWorker, msg: string): LogLine[] {
    return w.logs.filter((l) => l.msg === msg && l.app === APP);
  }

  /** Waits until `w` has logged `msg` about the app `count` times (see wake()); returns them. */
  async function loggedTimes(w: RunningWorker, msg: string, count: number): Promise<LogLine[]> {
    await until(() => logged(w, msg).length >= count, `${count} × "${msg}" in ${w.id}'s log`);
    return logged(w, msg);
  }


  // ---- the case ----

  step('wb restores from S3, with its empty cache and the ActiveSet wa recorded, what wa checkpointed', async () => {
    const [wa, wb] = workers as [RunningWorker, RunningWorker];

    // 1. The first wake is a start; ties go to the first worker in the config: wa.
    const first = await counterState();
    assert.equal(first.app, APP);
    assert.equal(first.count, 0);
    assert.deepEqual(await wake(1), { worker: 'wa', kind: 'start' });
    for (let i = 1; i <= 3; i++) assert.equal(await inc(), i);
    const g1 = await waitStored(null);

    // 2. A wake restores it on wa (the worker that ran it last) in activeset mode. There is no
    //    ActiveSet yet; this restore records one and stores it in S3 before wa can swap the app
    //    out again (a checkpoint waits until every page is in, and the ActiveSet is stored first).
    //    Now and then (seen in 4 runs over two sessions) CRIU writes the first image with no
    //    page marked lazy: it restores all of memory itself, nothing faults, nothing is recorded
    //    — cause unknown ('restore packs stored' logs eagerPages at debug). Then wa takes one
    //    more cycle, whose restore must record one.
    let count = 3;
    let stored = g1;
    let cycles = 0;
    for (let recordedOne = false; !recordedOne; ) {
      cycles++;
      assert.equal(await inc(), ++count);
      assert.deepEqual(await wake(1 + cycles), { worker: 'wa', kind: 'restore' });
      const next = await waitStored(stored);
      const waRestores = await loggedTimes(wa, 'container restored', cycles);
      assert.equal(waRestores.length, cycles, `wa restored the app ${cycles} times`);
      assert.equal(waRestores[cycles - 1]!.generation, stored);
      const recorded = (await loggedTimes(wa, 'lazy restore finished', cycles))[cycles - 1]!;
      assert.equal(recorded.ok, true, JSON.stringify(recorded));
      const image = recorded.image as { demand: number; packedPages: number };
      const allEager = (recorded.used as number) === 0 && image.demand === 0 && image.packedPages > 8 * 1024;
      recordedOne = (recorded.used as number) > 0;
      assert.ok(recordedOne || (allEager && cycles === 1), `wa's restore recorded an ActiveSet: ${JSON.stringify(recorded)}`);
      if (!recordedOne) console.log(`# wa's first image had every page restored by CRIU itself (${image.packedPages} pages): one more cycle`);
      stored = next;
    }
    const g2 = stored;
    assert.deepEqual(
      (await loggedTimes(wa, 'checkpoint stored', 1 + cycles)).map((l) => l.generation).at(-1),
      g2,
    );
    assert.deepEqual(logged(wb, 'container restored'), [], 'wb has not run the app');

    // 3. wa goes away; the gateway finds it unreachable (its event stream is gone) and places
    //    the next wake on the one worker that answers.
    wa.kill('SIGTERM');
    assert.equal(await wa.exit, 0);
    await until(async () => {
      const { body } = await sys().admin('GET', '/v1/workers');
      return (body.workers as { id: string; reachable: boolean }[]).find((w) => w.id === 'wa')?.reachable === false;
    }, 'wa unreachable', 30_000);
    assert.equal((await status()).state, 'stored');

    // 4. The next request is held while wb restores the app: its memory is as wa left it.
    const restored = await counterState();
    assert.deepEqual(
      { bootId: restored.bootId, count: restored.count, app: restored.app },
      { bootId: first.bootId, count, app: APP },
      'the app came back with its memory, without re-running its start-up',
    );
    assert.deepEqual(await wake(2 + cycles), { worker: 'wb', kind: 'restore' });
    assert.equal(await inc(), count + 1);
    const verified = await viaGateway(sys().httpPort, 'GET', '/verify');
    assert.equal(`${verified.status} ${verified.body}`, '200 PASS');

    // wb restored generation g2 lazily, from the store (it has no local image), prefetching the
    // ActiveSet wa's restore stored; and every page it then needed came to its empty cache too.
    const wbRestores = await loggedTimes(wb, 'container restored', 1);
    assert.equal(wbRestores.length, 1, 'wb restored the app once');
    const r = wbRestores[0]!;
    assert.deepEqual({ generation: r.generation, mode: r.mode, image: r.image }, { generation: g2, mode: 'activeset', image: 'store' });
    // The ActiveSet came as page runs in the restore packs wa's checkpoint stored.
    assert.ok((r.prefetch as { packedPages: number }).packedPages > 0, `wb prefetched the ActiveSet: ${JSON.stringify(r.prefetch)}`);
    assert.deepEqual(logged(wb, 'container running'), [], 'wb never started the app');
    const finished = await until(() => logged(wb, 'lazy restore finished')[0], 'wb paged every page in', 90_000);
    assert.equal(finished.ok, true, JSON.stringify(finished));
    assert.ok((finished.hits as number) > 0, `wb's faults hit the prefetched ActiveSet: ${JSON.stringify(finished)}`);
    assert.equal(logged(wa, 'container restored').length, cycles, 'wa restored nothing more');
  });
});

/** HTTP through the gateway's shared listener, routed by Host (held while the app wakes). */
function viaGateway(port: number, method: string, p: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: '127.0.0.1', port, method, path: p, agent: false, headers: { host: HOST, connection: 'close' }, timeout: 120_000 },
      (res) => {
        let body = '';
        res.setEncoding('utf8').on('data', (d: string) => (body += d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${HOST}${p}: no answer in 120 s`)));
    req.on('error', reject);
    req.end();
  });
}
