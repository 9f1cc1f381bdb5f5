import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, describe, it } from 'node:test';
import { isPicoError, PicoError } from '../shared/errors.js';
import { createLogger, silentLogger } from '../shared/log.js';
import type { AppSpec, Endpoint } from '../shared/protocol.js';
import { AppRecords, containerIdFor } from '../worker/oci/app-records.js';
import { NETNS_DIR } from '../worker/oci/netns.js';
import { Runc } from '../worker/oci/runc.js';
import { OciRuntime, type OciRuntimeOptions } from '../worker/oci-runtime.js';
import type { Container } from '../worker/runtime.js';
import { ChunkedImageStore } from '../pagestore/chunked-image-store.js';
import { FsObjectStore } from '../pagestore/fs-store.js';
import { fileChunks } from '../pagestore/image-store.js';
import { DirImageStore } from './helpers/dir-image-store.js';
import { repoFile } from './helpers/paths.js';
import { until } from './helpers/poll.js';
import { ociTestHost, ociTestOptions } from './helpers/oci-host.js';
import { flipByte } from './helpers/files.js';
import { assertRouted, request, state, inc, verify, memoryLimit } from './helpers/oci-client.js';

/*
 * The `oci` runtime through the ContainerRuntime interface, in CRIU's zdtm shape: each app
 * (test/fixtures/oci/*.mjs) builds state in its container, is checkpointed into an image store and
 * restored, and then verifies its own state. Failure paths: the store refusing the image, CRIU
 * refusing the dump, a corrupt image, a worker killed with containers running or with a dump not
 * yet stored.
 *
 * Traffic goes only to container addresses routed over the runtime's veths (checked per request).
 * The image store is a directory-copy fake with real sha256 verification (helpers/dir-image-store.ts).
 */

const { host, skip } = await ociTestHost();

const log = process.env.PICO_TEST_LOG ? createLogger({ level: 'debug' }) : silentLogger();
const prefix = `pt${process.pid}-`;
// Slots apart from a worker's (0..15999 by default) and the spike test's (16000+), per process.
const slotBase = 12_000 + (process.pid % 30) * 100;

describe('oci runtime: per-app records (no root needed)', () => {
  it('container ids are the prefixed app name, or a hashed form that fits runc\'s 64 characters', () => {
    assert.equal(containerIdFor('pico-', 'mail'), 'pico-mail');
    const long1 = containerIdFor('pico-', `${'a'.repeat(62)}1`);
    const long2 = containerIdFor('pico-', `${'a'.repeat(62)}2`);
    for (const id of [long1, long2]) assert.match(id, /^pico-a+-[0-9a-f]{8}$/);
    assert.ok(long1.length <= 64);
    assert.notEqual(long1, long2);
    assert.equal(containerIdFor('pico-', `${'a'.repeat(62)}1`), long1, 'deterministic');
  });

  it('a slot is chosen once per app, kept on disk, and found again by a new instance', () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'pico-records-'));
    try {
      const a = new AppRecords(dir, 'pr-', { first: 16_300, count: 3 });
      const mail = a.ensure('mail');
      const dns = a.ensure('dns');
      assert.equal(mail.id, 'pr-mail');
      assert.notEqual(mail.slot, dns.slot);
      for (const r of [mail, dns]) assert.ok(r.slot >= 16_300 && r.slot < 16_303);
      assert.deepEqual(a.ensure('mail'), mail);
      const b = new AppRecords(dir, 'other-', { first: 16_300, count: 3 });
      assert.deepEqual(b.get('mail'), mail, 'a restarted worker finds the same id and slot');
      assert.deepEqual(b.ensure('dns'), dns);
      b.ensure('web');
      assert.throws(() => b.ensure('full'), /no free network slot in 16300..16302/);
      assert.throws(() => b.ensure('Not_An_App'), /not lowercase letters, digits and dashes/);
      assert.equal(b.network(mail).containerAddress, `10.200.${(mail.slot * 4) >> 8}.${((mail.slot * 4) & 255) + 2}`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('oci runtime: apps swap out and back in with their memory', { skip, timeout: 300_000 }, () => {
  let work = '';
  let store: DirImageStore;
  let runtime: OciRuntime;
  let inspect: Runc;
  const stateDirs: string[] = [];
  const runtimes: OciRuntime[] = [];
  const workers: ChildProcess[] = [];

  function options(stateDir: string, slotOffset: number, extra: Partial<OciRuntimeOptions> = {}): OciRuntimeOptions {
    stateDirs.push(stateDir);
    return ociTestOptions(host!, { log, imageStore: store, stateDir, prefix, slots: { first: slotBase + slotOffset, count: 50 }, ...extra });
  }

  before(async () => {
    assert.ok(host?.ok, host?.message);
    work = mkdtempSync(path.join(tmpdir(), 'pico-ocirt-'));
    store = new DirImageStore(path.join(work, 'store'));
    runtime = new OciRuntime(
      options(path.join(work, 'state'), 0, {
        apps: { refuser: { tcpEstablished: false }, counter: { memoryLimit: 256 * 1024 * 1024 } },
      }),
    );
    runtimes.push(runtime);
    inspect = new Runc({ criu: host!.criu!.path, root: path.join(work, 'state', 'runc'), logDir: path.join(work, 'inspect-logs') });
  });

  after(async () => {
    for (const w of workers) w.kill('SIGKILL');
    // Stop what the runtimes know of, then sweep every state directory as a restarted worker
    // would (kills runc containers, removes every app's netns) — even after a failed test.
    for (const r of runtimes) {
      for (const c of r.containers()) await r.stop(c).catch((e: unknown) => console.error('cleanup: stop:', e));
    }
    for (const dir of new Set(stateDirs)) {
      await new OciRuntime({ log, imageStore: store, criu: host!.criu!.path, stateDir: dir, prefix })
        .cleanLeftovers()
        .catch((e: unknown) => console.error('cleanup:', e));
    }
    if (work) rmSync(work, { recursive: true, force: true });
  });

  function spec(name: string, fixture: string, ports: number[]): AppSpec {
    const dir = path.join(work, 'apps', name);
    mkdirSync(dir, { recursive: true });
    copyFileSync(repoFile(`test/fixtures/oci/${fixture}`), path.join(dir, fixture));
    // Full restores: these tests are about the image on the worker and in the store (lazy ones: oci-lazy.test.ts).
    return { name, command: [process.execPath, fixture], cwd: dir, env: {}, ports, readyTimeoutMs: 20_000, restore: 'full' };
  }

  /** The container of `app` is gone: runc knows no such container, its netns is removed. */
  async function assertGone(app: string, r: Runc = inspect): Promise<void> {
    const id = containerIdFor(prefix, app);
    assert.equal(await r.state(id), null, `runc still has ${id}`);
    assert.ok(!existsSync(path.join(NETNS_DIR, id)), `netns ${id} is still there`);
  }

  /** Stored: runc knows no such container; its netns is kept (CRIU-locked) for the wake. */
  async function assertStored(app: string): Promise<void> {
    const id = containerIdFor(prefix, app);
    assert.equal(await inspect.state(id), null, `runc still has ${id}`);
    assert.ok(existsSync(path.join(NETNS_DIR, id)), `netns ${id} is not kept while the app is stored`);
  }

  it('an HTTP counter app keeps its count across three checkpoint/restore cycles', async (t) => {
    const s = spec('counter', 'counter.mjs', [8080]);
    let c = await runtime.start(s);
    const ep = c.endpoints[8080]!;
    assert.match(ep.host, /^10\.200\.\d+\.\d+$/);
    assert.equal(ep.port, 8080);
    for (let i = 1; i <= 3; i++) assert.equal((await inc(ep)).count, i);
    const boot = await state(ep);
    assert.equal(boot.pid, 1);
    assert.equal(boot.app, 'counter');
    let count = 3;
    const gets = store.calls.get;

    for (let cycle = 1; cycle <= 3; cycle++) {
      const t0 = performance.now();
      const result = await runtime.checkpoint(c);
      const ckptMs = performance.now() - t0;
      assert.equal(result.generation, cycle);
      assert.ok(result.imageBytes > 32 * 1024 * 1024, `image of ${result.imageBytes} bytes holds the app's 32 MiB`);
      await c.exited; // settles on a swap-out
      await assertStored('counter');
      assert.equal((await store.latest('counter'))?.generation, cycle);
      assert.equal(localGeneration(runtime, 'counter'), cycle, 'the dump stays on the worker as the local image');

      const t1 = performance.now();
      c = await runtime.restore(s);
      const restoreMs = performance.now() - t1;
      assert.deepEqual(c.endpoints[8080], ep, 'the app comes back at the same address');
      const back = await state(ep);
      t.diagnostic(`cycle ${cycle}: checkpoint ${ckptMs.toFixed(0)} ms (dump ${result.dumpMs}, store ${result.storeMs}), restore until ready ${restoreMs.toFixed(0)} ms, image ${(result.imageBytes / 1e6).toFixed(1)} MB`);
      assert.equal(back.bootId, boot.bootId, 'the app must come back, not start again');
      assert.equal(store.calls.get, gets, 'restored from the local image: nothing fetched');
      assert.equal(localGeneration(runtime, 'counter'), null, 'a restore consumes the local image');
      assert.equal(back.pid, 1);
      assert.equal(back.count, count);
      assert.equal(memoryLimit(c.pid!), 256 * 1024 * 1024, 'the restored container keeps its memory limit');
      if (runtime.cgroupYard) {
        // CRIU took the host's cgroup mounts instead of mounting its own (worker/oci/cgroup-host.ts).
        const criuLog = readFileSync(path.join(runtime.stateDir, 'apps', 'counter', 'work', 'restore', 'restore.log'), 'utf8');
        assert.ok(criuLog.includes(`Opening ${runtime.cgroupYard} as cg yard`), 'restore.log names the yard');
      } else t.diagnostic('this host\'s cgroups are not laid out as CRIU\'s yard: CRIU mounts its own');
      await until(async () => (await state(ep)).ticks > back.ticks + 5, "the app's timer to tick after the restore");
      assert.equal((await inc(ep)).count, ++count);
      assert.equal(await verify(ep), '200 PASS');
    }
    // Older generations are pruned once a newer one is stored.
    assert.deepEqual(readdirSync(path.join(store.root, 'counter')), ['3']);
    // One start-up, every increment logged, across the cycles.
    const lines = readFileSync(runtime.logFile('counter'), 'utf8').trim().split('\n');
    assert.equal(lines.filter((l) => l.startsWith('booted ')).length, 1, lines.join('\n'));
    assert.deepEqual(lines.filter((l) => l.startsWith('inc ')).map((l) => Number(l.slice(4))), [1, 2, 3, 4, 5, 6]);

    await runtime.stop(c);
    assert.deepEqual(await c.exited, { code: 0, signal: null }, 'SIGTERM: the app closed and exited 0');
    await assertGone('counter');
  });

  it('a TCP key-value app keeps its data', async () => {
    const s = spec('kv', 'kv.mjs', [6379]);
    let c = await runtime.start(s);
    const ep = c.endpoints[6379]!;
    const sets = Array.from({ length: 200 }, (_, i) => `SET key${i} value ${i * i}`);
    assert.deepEqual(await kv(ep, ...sets), sets.map(() => 'OK'));
    const [boot] = await kv(ep, 'BOOT');
    await runtime.checkpoint(c);
    await assertStored('kv');
    c = await runtime.restore(s);
    assert.deepEqual(await kv(ep, 'BOOT', 'GET key0', 'GET key199', 'GET nothing', 'VERIFY'), [boot, 'value 0', `value ${199 * 199}`, 'NIL', 'PASS']);
    assert.deepEqual(await kv(ep, 'SET after restore', 'GET after', 'VERIFY'), ['OK', 'restore', 'PASS']);
    await runtime.stop(c);
    await assertGone('kv');
  });

  it('a multi-process app (a parent with worker children) comes back whole', async () => {
    const s = spec('family', 'family.mjs', [8080, 9001, 9002]);
    let c = await runtime.start(s);
    const [p0, p1, p2] = [c.endpoints[8080]!, c.endpoints[9001]!, c.endpoints[9002]!];
    assert.equal(p1.host, p0.host);
    for (let i = 0; i < 3; i++) await request(p1, 'POST', '/inc');
    await request(p2, 'POST', '/inc');
    const before = JSON.parse((await request(p0, 'GET', '/family')).body) as Family;
    assert.equal(before.pid, 1);
    assert.equal(before.children.length, 2);
    assert.deepEqual(before.ipc.map((x) => x.count), [3, 1]);

    await runtime.checkpoint(c);
    await assertStored('family');
    c = await runtime.restore(s);

    const after = JSON.parse((await request(p0, 'GET', '/family')).body) as Family;
    // Same tree, same PIDs in the container's PID namespace, same memory, IPC channels working.
    assert.deepEqual(after, before);
    for (const [ep, child] of [[p1, before.children[0]!], [p2, before.children[1]!]] as const) {
      const st = JSON.parse((await request(ep, 'GET', '/state')).body) as { pid: number; ppid: number };
      assert.equal(st.pid, child.pid);
      assert.equal(st.ppid, 1);
    }
    assert.equal(JSON.parse((await request(p1, 'POST', '/inc')).body).count, 4);
    // The host sees the whole tree: the init and its two children.
    assert.equal(childrenOf(c.pid!).length, 2);
    await runtime.stop(c);
    await assertGone('family');
  });

  it('two apps listening on the same port both work, and swap independently', async () => {
    const [sa, sb] = [spec('twin-a', 'counter.mjs', [8080]), spec('twin-b', 'counter.mjs', [8080])];
    let a = await runtime.start(sa);
    const b = await runtime.start(sb);
    const [ea, eb] = [a.endpoints[8080]!, b.endpoints[8080]!];
    assert.notEqual(ea.host, eb.host);
    assert.equal(ea.port, eb.port);
    await inc(ea);
    for (let i = 0; i < 4; i++) await inc(eb);
    assert.deepEqual([(await state(ea)).app, (await state(ea)).count], ['twin-a', 1]);
    assert.deepEqual([(await state(eb)).app, (await state(eb)).count], ['twin-b', 4]);
    await runtime.checkpoint(a);
    assert.equal((await state(eb)).count, 4, 'twin-b serves while twin-a is stored');
    a = await runtime.restore(sa);
    assert.deepEqual([(await state(ea)).app, (await state(ea)).count], ['twin-a', 1]);
    assert.equal(await verify(eb), '200 PASS');
    await Promise.all([runtime.stop(a), runtime.stop(b)]);
    await assertGone('twin-a');
    await assertGone('twin-b');
  });

  it('a store that refuses the image: the container is resumed and keeps serving', async () => {
    const s = spec('resume', 'counter.mjs', [8080]);
    const c = await runtime.start(s);
    const ep = c.endpoints[8080]!;
    await inc(ep);
    await inc(ep);
    const boot = await state(ep);
    const pidBefore = c.pid;
    let exited = false;
    void c.exited.then(() => (exited = true));
    store.failPut = new PicoError('PICO_ERR_STORE', 'store not writable: EACCES');
    try {
      await assert.rejects(runtime.checkpoint(c), (err: unknown) => {
        assert.ok(isPicoError(err, 'PICO_ERR_CHECKPOINT_FAILED'), String(err));
        assert.match(err.message, /store not writable/);
        assert.match(err.message, /resumed and keeps running/);
        return true;
      });
    } finally {
      store.failPut = null;
    }
    // The app was dumped and restored from its dump: same app, same memory, new host PID.
    const back = await state(ep);
    assert.equal(back.bootId, boot.bootId);
    assert.equal(back.count, 2);
    assert.equal((await inc(ep)).count, 3);
    assert.equal(await verify(ep), '200 PASS');
    assert.notEqual(c.pid, pidBefore);
    assert.equal(exited, false, 'the container did not exit: it is the same container');
    assert.equal(await store.latest('resume'), undefined, 'nothing was stored');
    assert.equal(existsSync(path.join(runtime.stateDir, 'apps', 'resume', 'staging')), false);
    // The resumed container is a full citizen: a checkpoint now succeeds and restores.
    assert.equal((await runtime.checkpoint(c)).generation, 1);
    assert.equal(exited, true);
    const r = await runtime.restore(s);
    assert.equal((await state(ep)).count, 3);
    await runtime.stop(r);
    await assertGone('resume');
  });

  it('a dump that CRIU refuses leaves the app running and answering', async () => {
    // tcpEstablished is off for this app: an open connection makes CRIU refuse the dump.
    const s = spec('refuser', 'counter.mjs', [8080]);
    const c = await runtime.start(s);
    const ep = c.endpoints[8080]!;
    const pid = c.pid;
    const conn = await connect(ep);
    try {
      await assert.rejects(runtime.checkpoint(c), (err: unknown) => {
        assert.ok(isPicoError(err, 'PICO_ERR_CHECKPOINT_FAILED'), String(err));
        assert.match(err.message, /Connected TCP socket/);
        assert.match(err.message, /keeps running/);
        return true;
      });
    } finally {
      conn.destroy();
    }
    assert.equal(c.pid, pid, 'the very same processes');
    assert.equal((await inspect.state(containerIdFor(prefix, 'refuser')))?.status, 'running');
    assert.equal((await inc(ep)).count, 1);
    assert.equal(await verify(ep), '200 PASS');
    await runtime.stop(c);
    await assertGone('refuser');
  });

  it('a corrupt image is refused with a clear error and leaves nothing running; no image is PICO_ERR_IMAGE_MISSING', async () => {
    const s = spec('fragile', 'counter.mjs', [8080]);
    const c = await runtime.start(s);
    await inc(c.endpoints[8080]!);
    const { generation } = await runtime.checkpoint(c);
    const manifest = (await store.latest('fragile'))!;
    const pages = manifest.files.filter((f) => /^pages-\d+\.img$/.test(f.path)).sort((x, y) => y.size - x.size)[0]!;
    flipByte(store.filePath('fragile', generation, pages.path), Math.floor(pages.size / 2));
    // The worker's local copy is damaged too: its sha256 check refuses it, and the fetch finds
    // the store's copy corrupt.
    flipByte(path.join(runtime.stateDir, 'apps', 'fragile', 'local', pages.path), Math.floor(pages.size / 2));

    await assert.rejects(runtime.restore(s), (err: unknown) => {
      assert.ok(isPicoError(err, 'PICO_ERR_IMAGE_CORRUPT'), String(err));
      assert.match(err.message, new RegExp(`fragile: generation ${generation} cannot be restored: .*${pages.path} fails its sha256`));
      return true;
    });
    assert.equal(runtime.containers().some((x) => x.app === 'fragile'), false);
    await assertStored('fragile'); // still stored: nothing runs, its netns waits for a good image
    assert.equal(existsSync(path.join(runtime.stateDir, 'apps', 'fragile', 'restore')), false);
    assert.equal(localGeneration(runtime, 'fragile'), null, 'the damaged local image is deleted');

    await assert.rejects(runtime.restore(spec('never-stored', 'counter.mjs', [8080])), (err: unknown) => {
      assert.ok(isPicoError(err, 'PICO_ERR_IMAGE_MISSING'), String(err));
      assert.match(err.message, /never-stored has no stored image/);
      return true;
    });
    await assertGone('never-stored');
  });

  it('the local image: a restore skips the fetch; a damaged or stale copy is refused and the image fetched; a stop deletes it', async () => {
    const s = spec('local', 'counter.mjs', [8080]);
    let c = await runtime.start(s);
    const ep = c.endpoints[8080]!;
    await inc(ep);
    const boot = await state(ep);
    const localFile = (rel: string) => path.join(runtime.stateDir, 'apps', 'local', 'local', rel);

    // 1. The store's copy is damaged, the local one is not: the restore uses the local one.
    //    (The trade-off: a store corruption is found by the next restore that fetches.)
    let { generation } = await runtime.checkpoint(c);
    let manifest = (await store.latest('local'))!;
    const pages = () => manifest.files.filter((f) => /^pages-\d+\.img$/.test(f.path)).sort((x, y) => y.size - x.size)[0]!;
    flipByte(store.filePath('local', generation, pages().path), 4096);
    let gets = store.calls.get;
    c = await runtime.restore(s);
    assert.equal(store.calls.get, gets, 'not fetched');
    assert.deepEqual([(await state(ep)).bootId, (await inc(ep)).count], [boot.bootId, 2]);

    // 2. The local copy is damaged (a byte flipped, same size): the sha256 check refuses it and
    //    the image is fetched from the store.
    ({ generation } = await runtime.checkpoint(c));
    manifest = (await store.latest('local'))!;
    flipByte(localFile(pages().path), 4096);
    gets = store.calls.get;
    c = await runtime.restore(s);
    assert.equal(store.calls.get, gets + 1, 'fetched');
    assert.deepEqual([(await state(ep)).bootId, (await inc(ep)).count], [boot.bootId, 3]);

    // 3. A truncated file is caught by the size check alone.
    const sizeOnly = new OciRuntime(options(runtime.stateDir, 0, { localImageCheck: 'size' }));
    runtimes.push(sizeOnly);
    ({ generation } = await runtime.checkpoint(c));
    manifest = (await store.latest('local'))!;
    truncateSync(localFile(pages().path), pages().size - 4096);
    gets = store.calls.get;
    c = await sizeOnly.restore(s);
    assert.equal(store.calls.get, gets + 1, 'fetched');
    assert.deepEqual([(await state(ep)).bootId, (await inc(ep)).count], [boot.bootId, 4]);

    // 4. A newer generation stored elsewhere (another worker): the local copy is stale, not used.
    ({ generation } = await sizeOnly.checkpoint(c));
    const stale = readFileSync(path.join(runtime.stateDir, 'apps', 'local', 'local.json'), 'utf8');
    c = await sizeOnly.restore(s);
    await inc(ep);
    await sizeOnly.checkpoint(c);
    writeFileSync(path.join(runtime.stateDir, 'apps', 'local', 'local.json'), stale); // the record of the older one
    gets = store.calls.get;
    c = await sizeOnly.restore(s);
    assert.equal(store.calls.get, gets + 1, 'fetched');
    assert.deepEqual([(await state(ep)).bootId, (await state(ep)).count], [boot.bootId, 5]);
    assert.equal(await verify(ep), '200 PASS');

    // 5. A stop deletes it (here: one made by a checkpoint whose container was then started again).
    await sizeOnly.checkpoint(c);
    assert.equal(localGeneration(runtime, 'local'), generation + 2);
    c = await sizeOnly.start(s);
    await sizeOnly.stop(c);
    assert.equal(localGeneration(runtime, 'local'), null);
    assert.equal(existsSync(path.join(runtime.stateDir, 'apps', 'local', 'local')), false);
    await assertGone('local');
  });

  it('`exited` settles with the status when an app dies on its own, and its netns goes', async () => {
    const s = spec('crasher', 'kv.mjs', [6379]);
    const c = await runtime.start(s);
    const conn = await connect(c.endpoints[6379]!);
    conn.on('error', () => {});
    conn.write('EXIT 7\n');
    // runc is an unref'd child (it may outlive its worker): once the connection closes, nothing
    // else would keep this process's event loop alive until runc's exit is reported.
    const keepAlive = setInterval(() => {}, 1000);
    try {
      assert.deepEqual(await c.exited, { code: 7, signal: null });
    } finally {
      clearInterval(keepAlive);
    }
    conn.destroy();
    await until(async () => !existsSync(path.join(NETNS_DIR, containerIdFor(prefix, 'crasher'))), 'the netns of the crashed app to go');
    await assertGone('crasher');
    assert.equal(runtime.containers().some((x) => x.app === 'crasher'), false);
    // …and it can start again at once.
    const again = await runtime.start(s);
    assert.deepEqual(await kv(again.endpoints[6379]!, 'VERIFY'), ['PASS']);
    await runtime.stop(again);
  });

  it('an app that exits before it is ready fails the start with its log, and nothing is left', async () => {
    const s = spec('broken', 'counter.mjs', [8080]);
    s.command = [process.execPath, '-e', 'console.error("cannot open the database"); process.exit(3)'];
    await assert.rejects(runtime.start(s), (err: unknown) => {
      assert.ok(isPicoError(err, 'PICO_ERR_APP_EXITED'), String(err));
      assert.match(err.message, /code 3/);
      assert.match(err.message, /cannot open the database/);
      return true;
    });
    await assertGone('broken');
  });

  it('an abort signal cancels a start or restore still waiting for its ports, leaving nothing', async () => {
    const s = spec('sleeper', 'counter.mjs', [8080]);
    s.command = [process.execPath, '-e', 'setInterval(() => {}, 1000); process.on("SIGTERM", () => process.exit(0))'];
    const ac = new AbortController();
    const t0 = performance.now();
    setTimeout(() => ac.abort(), 300);
    await assert.rejects(runtime.start(s, ac.signal), (err: unknown) => {
      assert.ok(isPicoError(err, 'PICO_ERR_SHUTTING_DOWN'), String(err));
      return true;
    });
    assert.ok(performance.now() - t0 < 10_000, 'cancelled, not the 20 s ready timeout');
    await assertGone('sleeper');
    // Already aborted: nothing is even tried.
    await assert.rejects(runtime.restore(spec('counter', 'counter.mjs', [8080]), AbortSignal.abort()), (err: unknown) => isPicoError(err, 'PICO_ERR_SHUTTING_DOWN'));
  });

  it('a killed worker: the next one removes its leftovers, stores its unstored dump, and restores every stored app', async () => {
    const stateDir = path.join(work, 'state-restart');
    const storeDir = path.join(work, 'store-restart');
    const s = spec('kv-restart', 'kv.mjs', [6379]);
    const id = containerIdFor(prefix, 'kv-restart');
    // This worker removes an app's netns at the swap-out (the default keeps it).
    const { log: _log, imageStore: _store, ...runtimeOpts } = options(stateDir, 50, { keepNetworkWhileStored: false });
    const cfg = { runtime: runtimeOpts, storeDir, spec: s };
    const restartedStore = new DirImageStore(storeDir);
    const restartInspect = new Runc({ criu: host!.criu!.path, root: path.join(stateDir, 'runc'), logDir: path.join(work, 'inspect-logs') });

    // Worker 1 stores generation 1, restores it, takes more writes, and is killed.
    const w1 = await startWorker(cfg);
    const ep = (await w1.cmd('start')).endpoints[6379] as Endpoint;
    assert.deepEqual(await kv(ep, 'SET a 1'), ['OK']);
    const [boot] = await kv(ep, 'BOOT');
    assert.equal((await w1.cmd('checkpoint')).generation, 1);
    await assertGone('kv-restart', restartInspect);
    await w1.cmd('restore');
    assert.deepEqual(await kv(ep, 'SET b 2'), ['OK']);
    await w1.kill();
    assert.equal((await restartInspect.state(id))?.status, 'running', 'the container outlived its worker');

    // Worker 2 (create: host check + leftovers): the orphan is removed; generation 1 restores.
    const { runtime: r2, leftovers } = await OciRuntime.create({ log, imageStore: restartedStore, ...runtimeOpts, hostReport: host! });
    runtimes.push(r2);
    assert.deepEqual(leftovers, { containers: [id], recovered: [], discarded: [] });
    await assertGone('kv-restart', restartInspect);
    let c: Container = await r2.restore(s);
    assert.deepEqual(c.endpoints[6379], ep);
    assert.deepEqual(await kv(ep, 'BOOT', 'GET a', 'GET b', 'VERIFY'), [boot, '1', 'NIL', 'PASS']);
    assert.equal((await r2.checkpoint(c)).generation, 2);

    // Worker 3 restores generation 2, takes a write, dumps — and dies while the store has it.
    const w3 = await startWorker(cfg);
    await w3.cmd('restore');
    assert.deepEqual(await kv(ep, 'SET c 3'), ['OK']);
    await w3.cmd('hang-store');
    w3.send('checkpoint');
    await w3.event('put');
    await w3.kill();
    // The dump ended the container; its netns (CRIU-locked) waits for a worker to clean it up.
    assert.equal(await restartInspect.state(id), null);
    assert.ok(existsSync(path.join(NETNS_DIR, id)));

    // Worker 4 stores the finished dump (generation 3) and restores it: the write is not lost.
    const { runtime: r4, leftovers: l4 } = await OciRuntime.create({ log, imageStore: restartedStore, ...runtimeOpts, hostReport: host! });
    runtimes.push(r4);
    assert.deepEqual(l4, { containers: [], recovered: [{ app: 'kv-restart', generation: 3 }], discarded: [] });
    await assertGone('kv-restart', restartInspect);
    c = await r4.restore(s);
    assert.deepEqual(await kv(ep, 'BOOT', 'GET a', 'GET c', 'VERIFY'), [boot, '1', '3', 'PASS']);
    await r4.stop(c);
    await assertGone('kv-restart', restartInspect);
  });

  it('with the real page store (chunked, fs): swap cycles, a flipped byte in a chunk is refused', async () => {
    const storeRoot = path.join(work, 'pagestore');
    const chunked = new ChunkedImageStore({ store: new FsObjectStore({ root: storeRoot }), log });
    const r = new OciRuntime(options(path.join(work, 'state-chunked'), 100, { imageStore: chunked }));
    runtimes.push(r);
    const s = spec('paged', 'counter.mjs', [8080]);
    let c = await r.start(s);
    const ep = c.endpoints[8080]!;
    await inc(ep);
    const boot = await state(ep);
    const first = await r.checkpoint(c);
    let gets = 0;
    const get = chunked.get.bind(chunked);
    chunked.get = (m, dir) => (gets++, get(m, dir));
    c = await r.restore(s);
    assert.equal(gets, 0, 'restored from the local image, checked chunk by chunk against the manifest');
    assert.equal((await inc(ep)).count, 2);
    const second = await r.checkpoint(c);
    assert.equal(second.generation, first.generation + 1);
    assert.ok(second.uploadedBytes <= second.imageBytes);
    c = await r.restore(s);
    assert.deepEqual([(await state(ep)).bootId, (await state(ep)).count], [boot.bootId, 2]);
    assert.equal(await verify(ep), '200 PASS');
    await r.checkpoint(c);

    // Flip a byte in one chunk of the biggest pages file of the newest generation.
    const manifest = (await chunked.latest('paged'))!;
    const pages = manifest.files.filter((f) => /^pages-\d+\.img$/.test(f.path)).sort((x, y) => y.size - x.size)[0]!;
    const index = Math.floor(pages.chunks.length / 2);
    const chunk = pages.chunks[index]!;
    flipByte(path.join(storeRoot, 'chunks', chunk.slice(0, 2), chunk), 100);
    // …and the same byte of the worker's local copy, which its per-chunk sha256 check refuses.
    flipByte(path.join(work, 'state-chunked', 'apps', 'paged', 'local', pages.path), fileChunks(manifest, pages)[index]!.offset + 100);
    await assert.rejects(r.restore(s), (err: unknown) => {
      assert.ok(isPicoError(err, 'PICO_ERR_IMAGE_CORRUPT'), String(err));
      assert.match(err.message, /^app paged: generation \d+ cannot be restored: /);
      return true;
    });
    assert.equal(r.containers().length, 0);
    assert.equal(await new Runc({ criu: host!.criu!.path, root: path.join(work, 'state-chunked', 'runc'), logDir: path.join(work, 'inspect-logs') }).state(containerIdFor(prefix, 'paged')), null);
  });

  it('create() refuses a host that cannot run the runtime, with the report\'s words', async () => {
    const report = { ...host!, ok: false, message: 'the oci runtime cannot run on this host: no usable criu; run scripts/install-oci.sh (as root)' };
    await assert.rejects(OciRuntime.create({ log, imageStore: store, stateDir: path.join(work, 'state-refused'), hostReport: report }), (err: unknown) => {
      assert.ok(isPicoError(err, 'PICO_ERR_HOST_UNSUPPORTED'), String(err));
      assert.equal(err.message, report.message);
      return true;
    });
  });

  // ---- a worker process (test/fixtures/oci/worker-proc.mjs) ----

  interface WorkerProc {
    cmd(c: string): Promise<Record<string, any>>;
    send(c: string): void;
    event(name: string): Promise<void>;
    kill(): Promise<void>;
  }

  async function startWorker(cfg: unknown): Promise<WorkerProc> {
    const proc = spawn(process.execPath, [repoFile('test/fixtures/oci/worker-proc.mjs'), JSON.stringify(cfg)], { stdio: ['pipe', 'pipe', 'inherit'] });
    workers.push(proc);
    const lines: Record<string, any>[] = [];
    createInterface({ input: proc.stdout! }).on('line', (l) => {
      lines.push(JSON.parse(l) as Record<string, any>);
    });
    const exit = once(proc, 'exit');
    async function next(match: (x: Record<string, any>) => boolean, what: string): Promise<Record<string, any>> {
      return until(() => {
        const i = lines.findIndex(match);
        if (i < 0) return undefined;
        return lines.splice(i, 1)[0];
      }, what, 60_000);
    }
    await next((x) => x.ready === true, 'the worker process to be ready');
    return {
      async cmd(c) {
        proc.stdin!.write(`${c}\n`);
        const r = await next((x) => x.event === undefined, `the worker's answer to ${c}`);
        if (!r.ok) throw new Error(`worker ${c}: ${r.code}: ${r.message}`);
        return r;
      },
      send(c) {
        proc.stdin!.write(`${c}\n`);
      },
      async event(name) {
        await next((x) => x.event === name, `the worker's ${name} event`);
      },
      async kill() {
        proc.kill('SIGKILL');
        await exit;
      },
    };
  }
});

interface Family {
  bootId: string;
  pid: number;
  children: { pid: number; port: number }[];
  ipc: { pid: number; count: number; bootId: string }[];
}

// ---- talking to containers ----

/** Refuses to send anywhere but over a veth of ours: without its netns the address would leave the host. */

async function connect(ep: Endpoint): Promise<Socket> {
  await assertRouted(ep);
  const conn = netConnect({ host: ep.host, port: ep.port });
  await once(conn, 'connect');
  return conn;
}

/** Sends each command on one connection and returns one answer line per command. */
async function kv(ep: Endpoint, ...commands: string[]): Promise<string[]> {
  const conn = await connect(ep);
  try {
    const answers: string[] = [];
    const rl = createInterface({ input: conn });
    const done = new Promise<void>((resolve, reject) => {
      rl.on('line', (l) => {
        answers.push(l);
        if (answers.length === commands.length) resolve();
      });
      conn.on('error', reject);
      conn.on('close', () => reject(new Error(`connection closed after ${answers.length} of ${commands.length} answers`)));
      setTimeout(() => reject(new Error(`no full answer in 5 s (${answers.length} of ${commands.length})`)), 5000).unref();
    });
    conn.write(commands.map((c) => `${c}\n`).join(''));
    await done;
    rl.close();
    return answers;
  } finally {
    conn.destroy();
  }
}

// ---- the host's view ----

/** The memory limit of the cgroup `pid` is in (cgroup v1 or v2), in bytes. */

/** The generation of the app's local image, or null when it has none. */
function localGeneration(r: OciRuntime, app: string): number | null {
  try {
    return (JSON.parse(readFileSync(path.join(r.stateDir, 'apps', app, 'local.json'), 'utf8')) as { generation: number }).generation;
  } catch {
    return null;
  }
}

function childrenOf(pid: number): number[] {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}
