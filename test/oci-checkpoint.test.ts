import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { once } from 'node:events';
import http from 'node:http';
import { connect as netConnect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { writeBundle, type Bundle } from '../worker/oci/bundle.js';
import { prepareHostDirs } from '../worker/oci/host-dirs.js';
import { checkHost } from '../worker/oci/host-check.js';
import { createNetwork, destroyNetwork, networkFor, routesToContainer, type AppNetwork } from '../worker/oci/netns.js';
import { Runc, RuncError, type Timing } from '../worker/oci/runc.js';
import { until } from './helpers/poll.js';
import { repoFile } from './helpers/paths.js';

/*
 * The whole checkpoint/restore path on this host, in CRIU's zdtm shape: an HTTP counter app
 * (test/fixtures/oci/counter.mjs) builds state in a runc container with its own network
 * namespace, is checkpointed with `runc checkpoint` (the container must then be gone) and
 * restored with `runc restore`, twice; after each restore the app verifies its own state
 * (GET /verify) and the test checks the count, the boot id (start-up did not re-run), the
 * listening socket and the timers.
 *
 * Traffic goes only to the container's address inside the network namespace this test makes,
 * over its veth; every request first checks that the host routes it there.
 */

const root = process.getuid?.() === 0;
const skip = root ? false : 'needs root: runc, CRIU and network namespaces only work as root (CI runs as root)';

const PORT = 8080;
const CYCLES = 2;
const MEMORY_LIMIT = 256 * 1024 * 1024; /* bytes */
/** Checkpoint with established TCP connections allowed, as the runtime will (see README). */
const TCP_ESTABLISHED = true;
const id = `pico-test-${process.pid}`;
// Test slots sit at the top of 10.200.0.0/16, apart from any worker's, and differ per process
// so two test runs on one machine do not collide.
const slot = 16_000 + (process.pid % 384);

describe('oci: an app in a runc container survives checkpoint and restore', { skip, timeout: 300_000 }, () => {
  let work = '';
  let runc: Runc | undefined;
  let net: AppNetwork | undefined;
  let bundle: Bundle | undefined;
  let initPid = 0;
  const timings: { op: string; timing: Timing; firstResponseMs?: number }[] = [];

  before(async () => {
    // As root, a host that cannot checkpoint is a failure with the reason, never a skip.
    const host = await checkHost();
    assert.ok(host.ok, host.message);
    work = mkdtempSync(path.join(tmpdir(), 'pico-oci-'));
    const appDir = path.join(work, 'app');
    mkdirSync(appDir);
    copyFileSync(repoFile('test/fixtures/oci/counter.mjs'), path.join(appDir, 'counter.mjs'));
    runc = new Runc({ criu: host.criu!.path, root: path.join(work, 'runc'), logDir: path.join(work, 'runc-logs') });
    net = networkFor(id, slot);
    await createNetwork(net);
    assert.ok(await routesToContainer(net), `${net.containerAddress} must route over ${net.hostInterface}`);
    const node = process.execPath;
    bundle = writeBundle(path.join(work, 'bundle'), {
      id,
      args: [node, 'counter.mjs'],
      env: { PORT: String(PORT) },
      appDir,
      logDir: path.join(work, 'log'),
      netnsPath: net.path,
      memoryLimit: MEMORY_LIMIT,
      // Node lives under /usr on the project machines; anywhere else, show its directory too.
      readOnlyPaths: node.startsWith('/usr/') ? [] : [path.dirname(node)],
      dirs: await prepareHostDirs(path.join(work, 'state')),
    });
    initPid = (await runc.run(id, bundle.dir)).pid;
    await until(() => get('/state').then(() => true, () => false), `the app answering on ${net.containerAddress}:${PORT}`, 20_000);
  });

  after(async () => {
    // Each step on its own, so a failed start still leaves nothing behind.
    if (runc) await runc.delete(id, { force: true }).catch((e: unknown) => console.error('cleanup: runc delete:', e));
    if (net) await destroyNetwork(net).catch((e: unknown) => console.error('cleanup: netns:', e));
    if (work) rmSync(work, { recursive: true, force: true });
  });

  /** One HTTP request to the container, on a fresh connection that closes after the answer. */
  async function request(method: string, pathname: string): Promise<{ status: number; body: string }> {
    assert.ok(net && (await routesToContainer(net)), 'the container address is not routed to its veth: refusing to send');
    return new Promise((resolve, reject) => {
      const req = http.request(
        { host: net!.containerAddress, port: PORT, method, path: pathname, agent: false, headers: { connection: 'close' }, timeout: 5000 },
        (res) => {
          let body = '';
          res.setEncoding('utf8').on('data', (d: string) => (body += d));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
        },
      );
      req.on('timeout', () => req.destroy(new Error(`${method} ${pathname}: no answer in 5 s`)));
      req.on('error', reject);
      req.end();
    });
  }

  /** A raw TCP connection to the app, sending nothing yet. */
  async function connect(): Promise<Socket> {
    assert.ok(net && (await routesToContainer(net)), 'the container address is not routed to its veth: refusing to send');
    const conn = netConnect({ host: net.containerAddress, port: PORT });
    await once(conn, 'connect');
    return conn;
  }

  async function get(pathname: string): Promise<{ count: number; bootId: string; pid: number; ticks: number }> {
    const r = await request('GET', pathname);
    assert.equal(r.status, 200, r.body);
    return JSON.parse(r.body) as { count: number; bootId: string; pid: number; ticks: number };
  }

  async function inc(): Promise<number> {
    const r = await request('POST', '/inc');
    assert.equal(r.status, 200, r.body);
    return (JSON.parse(r.body) as { count: number }).count;
  }

  async function verify(): Promise<void> {
    const r = await request('GET', '/verify');
    assert.equal(`${r.status} ${r.body}`, '200 PASS');
  }

  it('runs as PID 1 of its own namespaces, reached at its veth address', async () => {
    const s = await get('/state');
    assert.equal(s.pid, 1);
    const state = await runc!.state(id);
    assert.equal(state?.status, 'running');
    assert.equal(state?.pid, initPid);
    assert.equal(memoryLimit(initPid), MEMORY_LIMIT);
    await verify();
  });

  it(`keeps its count, memory, timers and listening socket across ${CYCLES} checkpoint/restore cycles`, async (t) => {
    for (let i = 1; i <= 3; i++) assert.equal(await inc(), i);
    const boot = await get('/state');
    let count = boot.count;

    for (let cycle = 1; cycle <= CYCLES; cycle++) {
      const imagePath = path.join(work, `image-${cycle}`);
      const dump = await runc!.checkpoint(id, { imagePath, workPath: path.join(work, `dump-${cycle}`), tcpEstablished: TCP_ESTABLISHED });
      timings.push({ op: `checkpoint ${cycle}`, timing: dump });

      // Swapped out: runc knows no such container and its processes are gone.
      assert.equal(await runc!.state(id), null);
      await until(() => !running(initPid), `PID ${initPid} to be gone after the checkpoint`, 5000);
      const files = readdirSync(imagePath);
      assert.ok(files.includes('inventory.img') && files.some((f) => /^pages-\d+\.img$/.test(f)), `image files: ${files.join(' ')}`);

      const restored = await runc!.restore(id, {
        bundle: bundle!.dir,
        imagePath,
        workPath: path.join(work, `restore-${cycle}`),
        tcpEstablished: TCP_ESTABLISHED,
      });
      const started = performance.now();
      const back = await get('/state');
      timings.push({ op: `restore ${cycle}`, timing: restored.timing, firstResponseMs: performance.now() - started });
      initPid = restored.pid;
      assert.equal((await runc!.state(id))?.status, 'running');

      assert.equal(back.bootId, boot.bootId, 'the app must come back, not start again');
      assert.equal(back.pid, 1);
      assert.equal(back.count, count);
      assert.equal(memoryLimit(initPid), MEMORY_LIMIT, 'the restored container keeps its memory limit');
      // Timers run again: the tick count moves on from where the dump froze it.
      const ticksAtRestore = back.ticks;
      await until(async () => (await get('/state')).ticks > ticksAtRestore + 5, 'the app\'s timer to tick after the restore');
      assert.equal(await inc(), ++count);
      await verify();
    }
    for (const x of timings) {
      t.diagnostic(
        `${x.op}: ${x.timing.ms.toFixed(0)} ms (criu ${x.timing.criuMs ?? '?'} ms)` +
          (x.firstResponseMs !== undefined ? `, first response ${x.firstResponseMs.toFixed(1)} ms later` : ''),
      );
    }
  });

  it('a checkpoint that CRIU refuses leaves the app running and answering', async () => {
    // An open connection without tcpEstablished: CRIU refuses to dump it, and unfreezes the app.
    const conn = await connect();
    try {
      await assert.rejects(
        runc!.checkpoint(id, { imagePath: path.join(work, 'image-refused'), workPath: path.join(work, 'dump-refused') }),
        (err: unknown) => err instanceof RuncError && err.criuErrors.some((l) => /Connected TCP socket/.test(l)),
      );
    } finally {
      conn.destroy();
    }
    assert.equal((await runc!.state(id))?.status, 'running');
    await verify();
  });

  it('an open client connection survives a swap cycle with tcpEstablished', async () => {
    // What lets the gateway keep a connection to an app across its swap-out.
    const conn = await connect();
    try {
      const boot = await get('/state');
      const imagePath = path.join(work, 'image-conn');
      await runc!.checkpoint(id, { imagePath, workPath: path.join(work, 'dump-conn'), tcpEstablished: true });
      initPid = (await runc!.restore(id, { bundle: bundle!.dir, imagePath, workPath: path.join(work, 'restore-conn'), tcpEstablished: true })).pid;
      let answer = '';
      conn.setEncoding('utf8').on('data', (d: string) => (answer += d));
      conn.write('GET /state HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n');
      await until(() => answer.includes('\r\n\r\n{'), 'an answer on the connection opened before the checkpoint');
      await until(() => answer.endsWith('}'), 'the whole answer');
      const body = JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)) as { bootId: string };
      assert.equal(body.bootId, boot.bootId);
    } finally {
      conn.destroy();
    }
  });

  it('writes stdout to its log across checkpoints, and started up once', () => {
    const lines = readFileSync(bundle!.logFile, 'utf8').trim().split('\n');
    assert.equal(lines.filter((l) => l.startsWith('booted ')).length, 1, lines.join('\n'));
    const incs = lines.filter((l) => l.startsWith('inc ')).map((l) => Number(l.slice(4)));
    assert.deepEqual(incs, Array.from({ length: 3 + CYCLES }, (_, i) => i + 1));
  });
});

/** The memory limit of the cgroup `pid` is in (cgroup v1 or v2), in bytes. */
function memoryLimit(pid: number): number {
  const lines = readFileSync(`/proc/${pid}/cgroup`, 'utf8').trim().split('\n');
  const v1 = lines.map((l) => l.split(':')).find(([, ctrl]) => ctrl!.split(',').includes('memory'));
  const file = v1
    ? `/sys/fs/cgroup/memory${v1[2]}/memory.limit_in_bytes`
    : `/sys/fs/cgroup${lines.find((l) => l.startsWith('0::'))!.slice(3)}/memory.max`;
  return Number(readFileSync(file, 'utf8').trim());
}

/**
 * True while `pid` runs. A zombie counts as gone: the container's init is reparented to the
 * host's PID 1, which on these VMs reaps orphans only every second or two.
 */
function running(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
  } catch {
    return false;
  }
}
