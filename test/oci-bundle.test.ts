import assert from 'node:assert/strict';
import { lstatSync, mkdtempSync, readFileSync, readlinkSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { bundleConfig, hasOlderLayout, LOG_FILE, LOG_MOUNT, pathInside, resolveInRootfs, writeBundle, type BundleSpec, type HostFacts } from '../worker/oci/bundle.js';
import { defaultSeccomp } from '../worker/oci/seccomp.js';
import { adaptUserBundle, checkUserConfig, readUserBundle, type UserBundle } from '../worker/oci/user-bundle.js';
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
    dirs: { dev: '/var/lib/picocenter/oci/dev', empty: '/var/lib/picocenter/oci/empty', run: '/var/lib/picocenter/oci/run' },
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

  it('has no tmpfs but /tmp: /dev and the /sys/firmware mask are read-only binds of the worker\'s directories', () => {
    for (const c of [bundleConfig(spec(), merged), bundleConfig(spec({ rootfs: '/srv/rootfs' }), merged)]) {
      const byDest = new Map(c.mounts.map((m) => [m.destination, m]));
      assert.deepEqual(c.mounts.filter((m) => m.type === 'tmpfs').map((m) => m.destination), ['/tmp']);
      // A bind at /dev: runc makes no device nodes of its own. Not nodev, or the nodes would not open.
      assert.deepEqual(byDest.get('/dev'), { destination: '/dev', type: 'bind', source: '/var/lib/picocenter/oci/dev', options: ['bind', 'ro', 'nosuid', 'noexec'] });
      assert.equal(byDest.has('/dev/shm'), false, '/dev/shm is a symlink to /tmp in the /dev directory');
      assert.equal(byDest.get('/dev/pts')?.type, 'devpts');
      assert.equal(byDest.get('/dev/mqueue')?.type, 'mqueue');
      assert.deepEqual(byDest.get('/sys/firmware'), { destination: '/sys/firmware', type: 'bind', source: '/var/lib/picocenter/oci/empty', options: ['bind', 'ro', 'nosuid', 'nodev', 'noexec'] });
      const order = c.mounts.map((m) => m.destination);
      assert.ok(order.indexOf('/dev') < order.indexOf('/dev/pts') && order.indexOf('/sys') < order.indexOf('/sys/firmware'));
      // runc masks a masked directory with a tmpfs: none is left. /proc/acpi cannot be a bind (it is under /proc).
      assert.equal(c.linux.maskedPaths.includes('/proc/acpi'), false);
      assert.equal(c.linux.maskedPaths.includes('/sys/firmware'), false);
      assert.ok(c.linux.readonlyPaths.includes('/proc/acpi'));
      assert.ok(c.linux.maskedPaths.includes('/proc/kcore'));
    }
    assert.throws(() => bundleConfig(spec({ dirs: { dev: 'dev', empty: '/e', run: '/r' } }), merged), /dev directory dev is not absolute/);
  });

  it('tells a container of the older layout (tmpfs /dev) by its init\'s mountinfo', () => {
    const line = (id: number, point: string, type: string) => `${id} 70 0:${id} / ${point} rw,nosuid - ${type} ${type} rw`;
    const older = [line(71, '/', 'ext4'), line(72, '/dev', 'tmpfs'), line(73, '/dev/shm', 'tmpfs'), line(74, '/tmp', 'tmpfs')].join('\n');
    const current = [line(71, '/', 'ext4'), line(72, '/dev', 'ext4'), line(73, '/dev/pts', 'devpts'), line(74, '/tmp', 'tmpfs')].join('\n');
    assert.equal(hasOlderLayout(older), true);
    assert.equal(hasOlderLayout(current), false);
    assert.equal(hasOlderLayout(`${current}\n${line(80, '/dev', 'tmpfs')}\n`), true, 'the mount on top counts');
    assert.equal(hasOlderLayout(''), false);
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

describe('oci bundle config: rootfs layout', () => {
  it('uses the given directory as a read-only root, with a /tmp tmpfs, a read-only /run and no host system mounts', () => {
    const c = bundleConfig(spec({ rootfs: '/srv/rootfs', cwd: '/tmp/apps/hello', readOnlyPaths: ['/opt/node'] }), merged);
    assert.deepEqual(c.root, { path: '/srv/rootfs', readonly: true });
    const byDest = new Map(c.mounts.map((m) => [m.destination, m]));
    for (const p of ['/usr', '/etc', '/opt/node']) assert.equal(byDest.has(p), false, `${p} is a host path: not in a rootfs container`);
    assert.equal(byDest.get('/tmp')?.type, 'tmpfs');
    // /run only holds the log's mount point: a read-only bind of the worker's directory, not a tmpfs.
    assert.deepEqual(byDest.get('/run'), { destination: '/run', type: 'bind', source: '/var/lib/picocenter/oci/run', options: ['bind', 'ro', 'nosuid', 'nodev', 'noexec'] });
    assert.equal(byDest.get(LOG_MOUNT)?.source, '/var/lib/picocenter/logs/hello');
    // A cwd outside the rootfs is the app's directory: mounted read-write at the same path.
    assert.deepEqual(byDest.get('/tmp/apps/hello')?.options, ['bind', 'rw', 'nosuid', 'nodev']);
    assert.equal(c.process.cwd, '/tmp/apps/hello');
    const order = c.mounts.map((m) => m.destination);
    assert.ok(order.indexOf('/run') < order.indexOf(LOG_MOUNT));
    assert.equal(c.process.args[0], '/bin/sh');
  });

  it('a cwd inside the rootfs is the container path, with nothing mounted for it', () => {
    const c = bundleConfig(spec({ rootfs: '/srv/rootfs', appDir: '/srv/rootfs/app', cwd: '/srv/rootfs/app/www' }), merged);
    assert.equal(c.process.cwd, '/app/www');
    assert.equal(c.mounts.some((m) => m.source.startsWith('/srv/rootfs')), false);
    assert.equal(pathInside('/srv/rootfs', '/srv/rootfs'), '/');
    assert.equal(pathInside('/srv/rootfs', '/srv/rootfs-other/x'), null);
    assert.equal(pathInside('/srv/rootfs', '/srv'), null);
  });

  it('resolves /bin/sh inside a rootfs the way the container will (absolute links stay inside)', () => {
    const r = path.join(dir, 'resolve-rootfs');
    mkdirSync(path.join(r, 'usr', 'bin'), { recursive: true });
    writeFileSync(path.join(r, 'usr', 'bin', 'dash'), '');
    symlinkSync('usr/bin', path.join(r, 'bin'));
    symlinkSync('/usr/bin/dash', path.join(r, 'usr', 'bin', 'sh'));
    assert.equal(resolveInRootfs(r, '/bin/sh'), path.join(r, 'usr', 'bin', 'dash'));
    symlinkSync('../../../../etc/passwd', path.join(r, 'usr', 'bin', 'escape'));
    assert.equal(resolveInRootfs(r, '/bin/escape'), null, '.. stops at the rootfs root: /etc/passwd of the rootfs, which is absent');
    symlinkSync('loop', path.join(r, 'loop'));
    assert.equal(resolveInRootfs(r, '/loop'), null);
  });

  it('carries the annotations it is given (the CRIU config file), and none otherwise', () => {
    assert.equal(bundleConfig(spec(), merged).annotations, undefined);
    assert.deepEqual(bundleConfig(spec({ annotations: { 'org.criu.config': '/s/criu.conf' } }), merged).annotations, { 'org.criu.config': '/s/criu.conf' });
  });

  it('every layout carries the default seccomp profile', () => {
    for (const c of [bundleConfig(spec(), merged), bundleConfig(spec({ rootfs: '/srv/rootfs' }), merged)]) {
      assert.deepEqual(c.linux.seccomp, defaultSeccomp());
    }
    const p = defaultSeccomp();
    assert.equal(p.defaultAction, 'SCMP_ACT_ALLOW');
    const denied = p.syscalls.filter((r) => !r.args).flatMap((r) => r.names);
    for (const name of ['kexec_load', 'init_module', 'open_by_handle_at', 'mount', 'unshare', 'setns', 'bpf', 'userfaultfd', 'clone3']) assert.ok(denied.includes(name), name);
    for (const name of ['clone', 'ptrace', 'execve', 'mmap']) assert.ok(!denied.includes(name), `${name} must stay allowed`);
    // clone is denied only with a namespace flag, one rule per flag.
    assert.ok(p.syscalls.filter((r) => r.names.includes('clone')).every((r) => r.args?.[0]?.op === 'SCMP_CMP_MASKED_EQ'));
  });
});

describe('oci bundle config: an operator\'s own bundle', () => {
  const file = '/srv/b/config.json';
  const base = () => ({
    ociVersion: '1.0.2-dev',
    process: { terminal: true, user: { uid: 1000, gid: 1000 }, args: ['node', 'server.js'], env: ['PATH=/usr/bin', 'PORT=1', 'TERM=xterm'], cwd: '/app', rlimits: [{ type: 'RLIMIT_NOFILE', hard: 1048576, soft: 1024 }] },
    root: { path: 'rootfs', readonly: true },
    hostname: 'mine',
    mounts: [
      { destination: '/proc', type: 'proc', source: 'proc' },
      { destination: '/data', type: 'bind', source: 'data', options: ['rbind', 'rw'] },
    ],
    hooks: { prestart: [{ path: '/usr/bin/evil' }] },
    linux: { namespaces: [{ type: 'network' }, { type: 'uts' }], resources: { memory: { limit: 1, swap: 5 } }, maskedPaths: ['/proc/kcore'] },
  });
  const user = (config: unknown): UserBundle => ({ dir: '/srv/b', configFile: file, config: checkUserConfig(config, file), rootfs: '/srv/b/rootfs' });
  const overrides = { id: 'pico-mine', env: { PORT: '8080', APP_NAME: 'mine' }, logDir: '/var/lib/pico/log', netnsPath: '/var/run/netns/pico-mine' };

  it('overrides only what Picocenter controls, and keeps the rest of config.json', () => {
    const c = adaptUserBundle(user(base()), { ...overrides, memoryLimit: 64 << 20 }, merged) as any;
    assert.equal(c.process.terminal, false);
    assert.deepEqual(c.process.args.slice(4), ['node', 'server.js']);
    assert.equal(c.process.args[0], '/bin/sh');
    assert.deepEqual(c.process.env, ['PATH=/usr/bin', 'PORT=8080', 'TERM=xterm', 'APP_NAME=mine']);
    assert.deepEqual(c.process.user, { uid: 1000, gid: 1000 });
    assert.equal(c.process.cwd, '/app');
    assert.deepEqual(c.process.rlimits, [{ type: 'RLIMIT_NOFILE', hard: 20000, soft: 1024 }]);
    assert.equal(c.root.path, '/srv/b/rootfs');
    assert.equal(c.root.readonly, true);
    assert.equal(c.hostname, 'mine');
    assert.deepEqual(c.mounts.map((m: { destination: string }) => m.destination), ['/proc', '/data', '/run', LOG_MOUNT]);
    assert.equal(c.mounts[1].source, '/srv/b/data', 'a relative bind source is the user bundle\'s');
    assert.equal(c.mounts[3].source, '/var/lib/pico/log');
    assert.deepEqual(c.linux.namespaces, [{ type: 'uts' }, { type: 'pid' }, { type: 'mount' }, { type: 'network', path: '/var/run/netns/pico-mine' }]);
    assert.equal(c.linux.cgroupsPath, '/picocenter/pico-mine');
    assert.deepEqual(c.linux.resources.memory, { limit: 64 << 20, swap: 5 });
    assert.deepEqual(c.linux.maskedPaths, ['/proc/kcore']);
    assert.deepEqual(c.linux.seccomp, defaultSeccomp());
    assert.equal(c.hooks, undefined, 'hooks would run on the host');
    assert.equal(c.annotations, undefined);
    const b = base() as any;
    b.annotations = { mine: 'x', 'org.criu.config': '/theirs.conf' };
    const a = adaptUserBundle(user(b), { ...overrides, annotations: { 'org.criu.config': '/s/criu.conf' } }, merged) as any;
    assert.deepEqual(a.annotations, { mine: 'x', 'org.criu.config': '/s/criu.conf' }, 'CRIU is configured by Picocenter');
  });

  it('keeps the bundle\'s own seccomp profile, memory limit and /run tmpfs', () => {
    const b = base() as any;
    b.linux.seccomp = { defaultAction: 'SCMP_ACT_ERRNO', syscalls: [] };
    b.mounts.push({ destination: '/run', type: 'tmpfs', source: 'tmpfs' });
    const c = adaptUserBundle(user(b), overrides, merged) as any;
    assert.deepEqual(c.linux.seccomp, { defaultAction: 'SCMP_ACT_ERRNO', syscalls: [] });
    assert.deepEqual(c.linux.resources.memory, { limit: 1, swap: 5 });
    assert.equal(c.mounts.filter((m: { destination: string }) => m.destination === '/run').length, 1);
    b.mounts.at(-1).type = 'bind';
    assert.throws(() => adaptUserBundle(user(b), overrides, merged), /config\.json: mounts: \/run is a bind mount; Picocenter needs \/run to be a tmpfs/);
  });

  it('refuses a config.json that is not an OCI config, naming the file and the field', () => {
    const bad = (mutate: (c: any) => void, why: RegExp) => {
      const c = base() as any;
      mutate(c);
      assert.throws(() => checkUserConfig(c, file), (err: Error) => err.message.startsWith(`bundle config ${file}: `) && why.test(err.message));
    };
    assert.throws(() => checkUserConfig([], file), /not a JSON object/);
    bad((c) => delete c.ociVersion, /ociVersion is missing/);
    bad((c) => (c.process.args = 'node'), /process\.args/);
    bad((c) => (c.process.cwd = 'app'), /process\.cwd must be an absolute path/);
    bad((c) => (c.process.env = [1]), /process\.env/);
    bad((c) => delete c.root, /root\.path is missing/);
    bad((c) => (c.mounts = [{ destination: 'x' }]), /mounts\[0\]\.destination/);
    bad((c) => (c.linux.namespaces = [{}]), /linux\.namespaces/);
  });

  it('readUserBundle says which file cannot be read or parsed', () => {
    const b = path.join(dir, 'user-bundle');
    mkdirSync(b, { recursive: true });
    assert.throws(() => readUserBundle(b), new RegExp(`bundle config ${path.join(b, 'config.json')} cannot be read: ENOENT`));
    writeFileSync(path.join(b, 'config.json'), '{');
    assert.throws(() => readUserBundle(b), /config\.json is not valid JSON/);
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
