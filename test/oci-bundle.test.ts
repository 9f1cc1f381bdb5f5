import assert from 'node:assert/strict';
import { lstatSync, mkdtempSync, readFileSync, readlinkSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { bundleConfig, LOG_FILE, LOG_MOUNT, writeBundle, type BundleSpec, type HostFacts } from '../worker/oci/bundle.js';
import { compareVersions, isNoise } from '../worker/oci/criu.js';
import { MAX_SLOT, networkFor } from '../worker/oci/netns.js';

// Pure parts of the oci groundwork: no root, no runc. The real thing is test/oci-checkpoint.test.ts.

const merged: HostFacts = { layout: { '/bin': { link: 'usr/bin' }, '/lib': { link: 'usr/lib' }, '/lib64': { link: 'usr/lib64' } }, nofileHard: 20000 };
const split: HostFacts = { layout: { '/bin': 'dir', '/lib': 'dir' }, nofileHard: 1 << 20 };

function spec(over: Partial<BundleSpec> = {}): BundleSpec {
  return {
    id: 'hello',
    args: ['node', 'server.js'],
    env: { PORT: '8080' },
    appDir: '/tmp/apps/hello',
    logDir: '/var/lib/picocenter/logs/hello',
    netnsPath: '/var/run/netns/pico-hello',
    ...over,
  };
}

const dir = mkdtempSync(path.join(tmpdir(), 'pico-oci-bundle-'));
after(() => rmSync(dir, { recursive: true, force: true }));

describe('oci bundle config', () => {
  it('runs the command through /bin/sh, which points stdio at the log inside the container', () => {
    const c = bundleConfig(spec(), merged);
    assert.deepEqual(c.process.args, ['/bin/sh', '-c', `exec "$@" </dev/null >>${LOG_MOUNT}/${LOG_FILE} 2>&1`, 'sh', 'node', 'server.js']);
    assert.equal(c.process.terminal, false);
    assert.equal(c.process.cwd, '/tmp/apps/hello');
    assert.ok(c.process.env.includes('PORT=8080'));
    assert.ok(c.process.env.some((e) => e.startsWith('PATH=')));
    assert.equal(c.process.noNewPrivileges, true);
    assert.deepEqual(c.process.capabilities.bounding, ['CAP_AUDIT_WRITE', 'CAP_KILL', 'CAP_NET_BIND_SERVICE']);
  });

  it('shows the host system read-only and the app directory read-write at its own path', () => {
    const c = bundleConfig(spec(), merged);
    assert.equal(c.root.readonly, true);
    const byDest = new Map(c.mounts.map((m) => [m.destination, m]));
    for (const p of ['/usr', '/etc']) assert.deepEqual(byDest.get(p)?.options?.includes('ro'), true, p);
    assert.equal(byDest.has('/bin'), false, 'on a merged-/usr host /bin is a symlink in the rootfs, not a mount');
    assert.deepEqual(byDest.get('/tmp/apps/hello'), { destination: '/tmp/apps/hello', type: 'bind', source: '/tmp/apps/hello', options: ['bind', 'rw', 'nosuid', 'nodev'] });
    assert.equal(byDest.get(LOG_MOUNT)?.source, '/var/lib/picocenter/logs/hello');
    assert.equal(byDest.get('/tmp')?.type, 'tmpfs');
    assert.equal(byDest.has('/sys/fs/cgroup'), false);
    // An app directory under /tmp must be mounted after the /tmp tmpfs, or the tmpfs hides it.
    const order = c.mounts.map((m) => m.destination);
    assert.ok(order.indexOf('/tmp') < order.indexOf('/tmp/apps/hello'));

    const s = bundleConfig(spec(), split);
    assert.equal(s.mounts.find((m) => m.destination === '/bin')?.options?.includes('ro'), true, 'a real /bin directory is bound read-only');
  });

  it('gives the container its own namespaces and joins the app\'s network namespace by path', () => {
    const c = bundleConfig(spec({ memoryLimit: 256 * 1024 * 1024 }), merged);
    assert.deepEqual(c.linux.namespaces.map((n) => n.type).sort(), ['ipc', 'mount', 'network', 'pid', 'uts']);
    assert.deepEqual(c.linux.namespaces.find((n) => n.type === 'network'), { type: 'network', path: '/var/run/netns/pico-hello' });
    assert.deepEqual(c.linux.resources.memory, { limit: 268435456 });
    assert.equal(bundleConfig(spec(), merged).linux.resources.memory, undefined);
    assert.equal(c.hostname, 'hello');
  });

  it('caps RLIMIT_NOFILE at the worker\'s own hard limit (root lacks CAP_SYS_RESOURCE here)', () => {
    assert.deepEqual(bundleConfig(spec(), merged).process.rlimits, [{ type: 'RLIMIT_NOFILE', hard: 20000, soft: 20000 }]);
    assert.deepEqual(bundleConfig(spec(), split).process.rlimits, [{ type: 'RLIMIT_NOFILE', hard: 65536, soft: 65536 }]);
  });

  it('refuses what runc or CRIU would trip over later', () => {
    assert.throws(() => bundleConfig(spec({ id: '../x' }), merged), /container id/);
    assert.throws(() => bundleConfig(spec({ args: [] }), merged), /empty command/);
    assert.throws(() => bundleConfig(spec({ appDir: 'relative' }), merged), /app directory relative is not absolute/);
    assert.throws(() => bundleConfig(spec({ memoryLimit: 0 }), merged), /memory limit/);
  });

  it('writes config.json and a skeleton rootfs with the host\'s /usr symlinks and every mount point', () => {
    const b = writeBundle(path.join(dir, 'bundle'), spec({ logDir: path.join(dir, 'log') }), merged);
    assert.deepEqual(JSON.parse(readFileSync(path.join(b.dir, 'config.json'), 'utf8')), b.config);
    const rootfs = path.join(b.dir, 'rootfs');
    assert.equal(readlinkSync(path.join(rootfs, 'bin')), 'usr/bin');
    assert.ok(lstatSync(path.join(rootfs, 'lib64')).isSymbolicLink());
    for (const m of b.config.mounts) assert.ok(statSync(path.join(rootfs, m.destination)).isDirectory(), m.destination);
    assert.equal(b.logFile, path.join(dir, 'log', LOG_FILE));
    // Rewriting the bundle of a stored app (before its restore) must work.
    writeBundle(path.join(dir, 'bundle'), spec({ logDir: path.join(dir, 'log') }), merged);
  });
});

describe('oci network addressing', () => {
  it('gives each slot its own /30 of 10.200.0.0/16 and its own host interface', () => {
    assert.deepEqual(networkFor('pico-a', 0), {
      name: 'pico-a',
      path: '/var/run/netns/pico-a',
      hostInterface: 'pico0',
      hostAddress: '10.200.0.1',
      containerAddress: '10.200.0.2',
      prefixLength: 30,
    });
    const last = networkFor('pico-z', MAX_SLOT);
    assert.equal(last.hostAddress, '10.200.255.253');
    assert.equal(last.containerAddress, '10.200.255.254');
    assert.ok(last.hostInterface.length <= 15, 'IFNAMSIZ');
    assert.equal(networkFor('x', 64).containerAddress, '10.200.1.2');
    assert.throws(() => networkFor('x', MAX_SLOT + 1), /slot/);
    assert.throws(() => networkFor('x', -1), /slot/);
    assert.throws(() => networkFor('a/b', 1), /netns name/);
  });
});

describe('criu helpers', () => {
  it('compares dotted versions numerically', () => {
    assert.equal(compareVersions('4.2.1', '4.2'), 1);
    assert.equal(compareVersions('4.10', '4.2'), 1);
    assert.equal(compareVersions('3.17.1', '4.2'), -1);
    assert.equal(compareVersions('1.1.5+ds1', '1.0'), 1);
    assert.equal(compareVersions('6.18.44-fc-v782', '6.16'), 1);
    assert.equal(compareVersions('4.2', '4.2.0'), 0);
  });

  it('knows the lines every criu run prints here that mean nothing', () => {
    assert.ok(isNoise("Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted"));
    assert.ok(isNoise("Warn  (criu/kerndat.c:1290): Can't keep kdat cache on non-tempfs"));
    assert.ok(!isNoise('Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds'));
  });
});
