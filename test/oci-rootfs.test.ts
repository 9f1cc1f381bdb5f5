import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, linkSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { isPicoError } from '../shared/errors.js';
import { createLogger, silentLogger } from '../shared/log.js';
import type { AppSpec } from '../shared/protocol.js';
import { hostFacts } from '../worker/oci/bundle.js';
import { containerIdFor } from '../worker/oci/app-records.js';
import { run } from '../worker/oci/exec.js';
import { NETNS_DIR } from '../worker/oci/netns.js';
import { Runc } from '../worker/oci/runc.js';
import { OciRuntime } from '../worker/oci-runtime.js';
import { DirImageStore } from './helpers/dir-image-store.js';
import { repoFile } from './helpers/paths.js';
import { ociTestHost, ociTestOptions } from './helpers/oci-host.js';
import { request, state, inc, verify, memoryLimit } from './helpers/oci-client.js';

/*
 * Root filesystems and confinement of the `oci` runtime, in CRIU's zdtm shape (the app builds
 * state, is checkpointed and restored, and verifies its state itself):
 * - an app in a given rootfs directory (a minimal tree made here: node, its libraries, dash as
 *   /bin/sh — hard links of the host's files) survives checkpoint/restore, and the rootfs is not
 *   written to;
 * - an app from a given OCI bundle (config.json from `runc spec`, adapted by the runtime; the
 *   user's files are not written to) survives checkpoint/restore; a broken bundle fails the wake
 *   with PICO_ERR_WAKE_FAILED naming the file;
 * - the default seccomp profile denies `unshare` inside the container, before and after a
 *   checkpoint/restore cycle (CRIU dumps and restores the filter).
 */

const { host, skip } = await ociTestHost();

const log = process.env.PICO_TEST_LOG ? createLogger({ level: 'debug' }) : silentLogger();
const prefix = `pr${process.pid}-`;
// Apart from the worker's default slots' usual picks, oci-runtime.test.ts (12000+) and the spike's (16000+).
const slotBase = 11_000 + (process.pid % 20) * 50;

describe('oci runtime: root filesystems, bundles, seccomp', { skip, timeout: 300_000 }, () => {
  let work = '';
  let store: DirImageStore;
  let runtime: OciRuntime;
  let inspect: Runc;

  before(async () => {
    assert.ok(host?.ok, host?.message);
    work = mkdtempSync(path.join(tmpdir(), 'pico-ocirootfs-'));
    store = new DirImageStore(path.join(work, 'store'));
    const stateDir = path.join(work, 'state');
    runtime = new OciRuntime(ociTestOptions(host!, { log, imageStore: store, stateDir, prefix, slots: { first: slotBase, count: 50 } }));
    inspect = new Runc({ criu: host!.criu!.path, root: path.join(stateDir, 'runc'), logDir: path.join(work, 'inspect-logs') });
  });

  after(async () => {
    if (runtime) {
      for (const c of runtime.containers()) await runtime.stop(c).catch((e: unknown) => console.error('cleanup: stop:', e));
      await runtime.cleanLeftovers().catch((e: unknown) => console.error('cleanup:', e));
    }
    if (work) rmSync(work, { recursive: true, force: true });
  });

  function appDir(name: string, fixture: string): string {
    const dir = path.join(work, 'apps', name);
    mkdirSync(dir, { recursive: true });
    copyFileSync(repoFile(`test/fixtures/oci/${fixture}`), path.join(dir, fixture));
    return dir;
  }

  async function assertGone(app: string): Promise<void> {
    const id = containerIdFor(prefix, app);
    assert.equal(await inspect.state(id), null, `runc still has ${id}`);
    assert.ok(!existsSync(path.join(NETNS_DIR, id)), `netns ${id} is still there`);
  }

  it('an app in a given rootfs directory survives checkpoint/restore, and the rootfs is not written to', async () => {
    const rootfs = makeRootfs(path.join(work, 'rootfs'));
    const before = listTree(rootfs);
    const dir = appDir('rooted', 'counter.mjs');
    const s: AppSpec = { name: 'rooted', command: ['/usr/bin/node', 'counter.mjs'], cwd: dir, env: {}, ports: [8080], readyTimeoutMs: 20_000, rootfs };
    let c = await runtime.start(s);
    const ep = c.endpoints[8080]!;
    // The container's root is the given tree: its /usr/bin holds exactly what was put there.
    assert.deepEqual(readdirSync(`/proc/${c.pid}/root/usr/bin`).sort(), ['dash', 'node', 'sh']);
    assert.equal((await inc(ep)).count, 1);
    assert.equal((await inc(ep)).count, 2);
    const boot = await state(ep);
    assert.equal(boot.app, 'rooted');

    assert.equal((await runtime.checkpoint(c)).generation, 1);
    c = await runtime.restore(s);
    const back = await state(ep);
    assert.equal(back.bootId, boot.bootId, 'restored, not started again');
    assert.equal(back.count, 2);
    assert.equal((await inc(ep)).count, 3);
    assert.equal(await verify(ep), '200 PASS');
    assert.deepEqual(readdirSync(`/proc/${c.pid}/root/usr/bin`).sort(), ['dash', 'node', 'sh']);
    await runtime.stop(c);
    await assertGone('rooted');
    assert.deepEqual(listTree(rootfs), before, 'nothing in the rootfs was added, removed or changed');
  });

  it('an app from a given OCI bundle survives checkpoint/restore; the bundle\'s files are not written to', async () => {
    const bundle = path.join(work, 'bundle');
    mkdirSync(bundle, { recursive: true });
    const rootfs = makeRootfs(path.join(bundle, 'rootfs'));
    mkdirSync(path.join(rootfs, 'app'));
    copyFileSync(repoFile('test/fixtures/oci/counter.mjs'), path.join(rootfs, 'app', 'counter.mjs'));
    // runc's own template, as an operator would start from: terminal true, `sh`, rootfs relative.
    const spec = await run('runc', ['spec', '--bundle', bundle], { timeoutMs: 10_000 });
    assert.equal(spec.code, 0, spec.stderr);
    const config = JSON.parse(readFileSync(path.join(bundle, 'config.json'), 'utf8')) as { process: Record<string, unknown> };
    config.process.args = ['node', 'counter.mjs'];
    config.process.cwd = '/app';
    config.process.env = [...(config.process.env as string[]), 'GREETING=hello'];
    writeFileSync(path.join(bundle, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
    const before = { config: sha256File(path.join(bundle, 'config.json')), tree: listTree(bundle) };

    // command and cwd are the bundle's: the spec's are not used.
    const s: AppSpec = { name: 'bundled', command: ['/nonexistent'], cwd: '/nonexistent', env: { EXTRA: '1' }, ports: [8080], readyTimeoutMs: 20_000, memoryLimit: 128 * 1024 * 1024, bundle };
    let c = await runtime.start(s);
    const ep = c.endpoints[8080]!;
    const adapted = JSON.parse(readFileSync(path.join(runtime.stateDir, 'apps', 'bundled', 'bundle', 'config.json'), 'utf8')) as {
      process: { terminal: boolean; env: string[] };
      annotations?: Record<string, string>;
      root: { path: string };
      linux: { namespaces: Array<{ type: string; path?: string }>; resources: { memory: { limit: number } } };
    };
    assert.equal(adapted.process.terminal, false);
    if (runtime.networkLock === 'nftables') assert.equal(adapted.annotations?.['org.criu.config'], path.join(runtime.stateDir, 'criu.conf'));
    assert.equal(adapted.root.path, rootfs);
    assert.deepEqual(adapted.linux.namespaces.find((n) => n.type === 'network'), { type: 'network', path: path.join(NETNS_DIR, containerIdFor(prefix, 'bundled')) });
    for (const e of ['GREETING=hello', 'EXTRA=1', 'PORT=8080', 'APP_NAME=bundled', 'TERM=xterm']) assert.ok(adapted.process.env.includes(e), e);
    assert.equal(memoryLimit(c.pid!), 128 * 1024 * 1024);

    assert.equal((await inc(ep)).count, 1);
    const boot = await state(ep);
    assert.equal(boot.app, 'bundled');
    await runtime.checkpoint(c);
    c = await runtime.restore(s);
    const back = await state(ep);
    assert.equal(back.bootId, boot.bootId, 'restored, not started again');
    assert.equal(back.count, 1);
    assert.equal((await inc(ep)).count, 2);
    assert.equal(await verify(ep), '200 PASS');
    assert.equal(memoryLimit(c.pid!), 128 * 1024 * 1024, 'the restored container keeps its memory limit');
    // The log is the runtime's, as for any app.
    assert.match(readFileSync(runtime.logFile('bundled'), 'utf8'), /^booted /);
    await runtime.stop(c);
    await assertGone('bundled');
    assert.equal(sha256File(path.join(bundle, 'config.json')), before.config, 'config.json is untouched');
    assert.deepEqual(listTree(bundle), before.tree, 'nothing in the bundle was added, removed or changed');
  });

  it('a bundle whose config.json is missing, broken or not runnable fails the wake, naming the file and the problem', async () => {
    const bundle = path.join(work, 'broken-bundle');
    mkdirSync(path.join(bundle, 'rootfs'), { recursive: true });
    const file = path.join(bundle, 'config.json');
    const s: AppSpec = { name: 'broken-bundle', command: ['x'], cwd: bundle, env: {}, ports: [8080], readyTimeoutMs: 5_000, bundle };
    const cases: Array<[string | null, RegExp]> = [
      [null, /config\.json cannot be read: ENOENT/],
      ['{"ociVersion": "1.0.2", "process": ', /config\.json is not valid JSON/],
      ['{"ociVersion": "1.0.2", "process": {"args": [], "cwd": "/"}, "root": {"path": "rootfs"}}', /process\.args must be a non-empty array/],
      ['{"ociVersion": "1.0.2", "process": {"args": ["node"], "cwd": "/"}, "root": {"path": "missing"}}', /root\.path "missing" .* is not a directory/],
      ['{"ociVersion": "1.0.2", "process": {"args": ["node"], "cwd": "/"}, "root": {"path": "rootfs"}}', /has no executable \/bin\/sh/],
    ];
    for (const [text, why] of cases) {
      rmSync(file, { force: true });
      if (text !== null) writeFileSync(file, text);
      await assert.rejects(runtime.start(s), (err: unknown) => {
        assert.ok(isPicoError(err, 'PICO_ERR_WAKE_FAILED'), String(err));
        assert.ok(err.message.includes(file), err.message);
        assert.match(err.message, why);
        return true;
      });
      await assertGone('broken-bundle');
    }
  });

  it('the default seccomp profile denies unshare inside the container, before and after a checkpoint/restore', async () => {
    const dir = appDir('guarded', 'guarded.mjs');
    const s: AppSpec = { name: 'guarded', command: [process.execPath, 'guarded.mjs'], cwd: dir, env: {}, ports: [8080], readyTimeoutMs: 20_000 };
    let c = await runtime.start(s);
    const ep = c.endpoints[8080]!;
    const denied = async (): Promise<void> => {
      const g = JSON.parse((await request(ep, 'GET', '/guard')).body) as Record<string, { status: number; stderr: string }>;
      for (const k of ['unshareUser', 'unshareMount']) {
        assert.equal(g[k]!.status, 1, `${k}: ${JSON.stringify(g[k])}`);
        assert.match(g[k]!.stderr, /unshare failed: Operation not permitted/, k);
      }
    };
    const first = JSON.parse((await request(ep, 'GET', '/state')).body) as { bootId: string; seccomp: string };
    assert.equal(first.seccomp, '2', 'the app runs under a seccomp filter');
    await denied();
    await request(ep, 'POST', '/inc');

    await runtime.checkpoint(c);
    c = await runtime.restore(s);
    const back = JSON.parse((await request(ep, 'GET', '/state')).body) as { bootId: string; seccomp: string; count: number };
    assert.equal(back.bootId, first.bootId, 'restored, not started again');
    assert.equal(back.count, 1);
    assert.equal(back.seccomp, '2', 'CRIU restored the filter');
    await denied();
    assert.equal((await request(ep, 'GET', '/verify')).body, 'PASS');
    await runtime.stop(c);
    await assertGone('guarded');
  });
});

// ---- a minimal root filesystem ----

/**
 * node, dash as /bin/sh and the libraries both load, at their paths on this host, plus the
 * top-level /usr symlinks of a merged-/usr host and empty mount points. Files are hard links of
 * the host's (copies across filesystems): the container's root is read-only, so it cannot change them.
 */
function makeRootfs(dir: string): string {
  const layout = hostFacts().layout;
  mkdirSync(dir, { recursive: true });
  for (const [p, v] of Object.entries(layout)) if (v !== 'dir') symlinkSync(v.link, path.join(dir, p));
  for (const d of ['proc', 'dev', 'sys', 'sys/firmware', 'tmp', 'run']) mkdirSync(path.join(dir, d));
  const dash = realpathSync('/bin/sh');
  const node = realpathSync(process.execPath);
  const files = new Set<string>([dash, node]);
  for (const bin of [dash, node]) for (const lib of sharedLibraries(bin)) files.add(lib);
  for (const f of files) {
    // The directory as it really is on the host, the file under the name the loader asks for.
    const at = path.join(dir, realpathSync(path.dirname(f)), path.basename(f));
    mkdirSync(path.dirname(at), { recursive: true });
    try {
      linkSync(realpathSync(f), at);
    } catch {
      copyFileSync(realpathSync(f), at);
    }
  }
  symlinkSync(dash, path.join(dir, realpathSync(path.dirname('/bin/sh')), 'sh'));
  return dir;
}

/** The absolute paths `ldd` lists for `bin` (the loader included). */
function sharedLibraries(bin: string): string[] {
  const out: string[] = [];
  const text = execFileSync('ldd', [bin], { encoding: 'utf8' });
  for (const line of text.split('\n')) {
    const m = /=>\s*(\/\S+)/.exec(line) ?? /^\s*(\/\S+)/.exec(line);
    if (m) out.push(m[1]!);
  }
  return out;
}

/** Every entry under `dir` with its type, size, mtime and link target: a tree's fingerprint. */
function listTree(dir: string): string[] {
  const out: string[] = [];
  const visit = (d: string, rel: string): void => {
    for (const name of readdirSync(d).sort()) {
      const p = path.join(d, name);
      const st = lstatSync(p);
      const r = `${rel}/${name}`;
      if (st.isSymbolicLink()) out.push(`${r} -> ${readlinkSync(p)}`);
      else if (st.isDirectory()) {
        out.push(`${r}/ ${st.mtimeMs}`);
        visit(p, r);
      } else out.push(`${r} ${st.size} ${st.mtimeMs}`);
    }
  };
  visit(dir, '');
  return out;
}

function sha256File(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

// ---- talking to containers (only over a veth of ours) ----

/** The memory limit of the cgroup `pid` is in (cgroup v1 or v2), in bytes. */
