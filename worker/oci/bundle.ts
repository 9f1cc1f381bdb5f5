import { lstatSync, mkdirSync, readFileSync, readlinkSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { parseMountinfo } from './mountinfo.js';
import { defaultSeccomp, type SeccompProfile } from './seccomp.js';

/**
 * OCI bundles for apps, in one of two layouts (a third, an operator's own OCI bundle, is
 * user-bundle.ts):
 *
 *   host layout (default)   the host's system read-only plus the app's own directory
 *   rootfs layout           a given root filesystem directory (BundleSpec.rootfs)
 *
 * Host layout, inside a container:
 *   /            an empty skeleton directory of the bundle, read-only
 *   /proc, /sys  runc's, with its masked and read-only paths (see "Only /tmp is a tmpfs")
 *   /dev         the worker's prepared directory (HostDirs.dev, host-dirs.ts), read-only: the
 *                device nodes and symlinks of runc's own /dev, devpts at /dev/pts, mqueue at
 *                /dev/mqueue, and /dev/shm a symlink to /tmp
 *   /usr, /etc   the host's, bind-mounted read-only; /bin, /lib, /lib64, /sbin are the host's
 *                symlinks into /usr (merged-/usr hosts) or read-only binds of their own
 *   /tmp         a tmpfs (its contents are part of the image: CRIU dumps tmpfs)
 *   APP DIR      the app's directory, read-write, at the SAME path as on the host, so a command
 *                and cwd written for the `process` runtime work unchanged
 *   /run/picocenter/app.log
 *                the app's stdout and stderr. The container's stdio must not be a file or pipe
 *                of the host's mount namespace or CRIU cannot dump it ("Can't lookup mount"), so
 *                the app's command is run by /bin/sh, which reopens 0/1/2 INSIDE the container
 *                (</dev/null, >>app.log) and then execs the app as PID 1. The log is a host file
 *                on a bind mount: it survives checkpoints, and truncating or appending to it
 *                while the app is stored does not break the restore (verified with CRIU 4.2.1).
 *
 * Rootfs layout, inside a container:
 *   /            the given directory, read-only (mounted as it is: no copy, no overlay)
 *   /proc, /dev, /sys   as in the host layout
 *   /tmp         a tmpfs, as in the host layout
 *   /run         an empty directory of the worker (HostDirs.run), read-only, that holds only the
 *                log's mount point, so the log mount needs nothing in the rootfs. As in the host
 *                layout, the app cannot write /run.
 *   /run/picocenter/app.log   the app's log, as in the host layout
 *   APP DIR      only when the app's cwd lies OUTSIDE the rootfs: that directory, read-write, at
 *                the same path (as in the host layout: the app's own writable directory). A cwd
 *                INSIDE the rootfs is simply the container's working directory (its path
 *                relative to the rootfs), read-only like the rest of it; the app then writes to
 *                /tmp (part of the image) only.
 *   The command, env and cwd come from the app's spec; the stdio redirection needs /bin/sh in
 *   the rootfs (checked by writeBundle). Nothing in the rootfs is written, except that runc
 *   creates a mount point (an empty directory) that the rootfs lacks: /proc, /dev, /sys, /tmp,
 *   /run, the app directory's path when it is outside the rootfs and not under /tmp, and at a
 *   restore /sys/firmware (runc makes the restore's mount points before sysfs is mounted).
 *
 * Only /tmp is a tmpfs. CRIU dumps and restores every tmpfs by running `tar` (and gzip), ~15 ms
 * each way even when it is empty, at every checkpoint and restore. So where runc would put a
 * tmpfs, these layouts put something CRIU restores without one:
 *   /dev           a read-only bind of HostDirs.dev. With /dev a bind, runc makes no device nodes
 *                  of its own; its device cgroup still allows only its default devices.
 *   /dev/shm       a symlink to /tmp: glibc's shm_open and sem_open work through it, so POSIX
 *                  shared memory is part of the image, and shares /tmp's size.
 *   /sys/firmware  masked by a read-only bind of an empty directory (HostDirs.empty) instead of
 *                  runc's read-only tmpfs.
 *   /proc/acpi     runc refuses bind mounts inside /proc, so only a tmpfs could mask it: it is
 *                  read-only instead (runc binds it onto itself). The mask is there against writes
 *                  (ACPI wake-up settings and the like), which read-only prevents too; what it no
 *                  longer hides is what its files show when read.
 * The other masked paths are files, which runc covers with /dev/null. (A host with /proc/asound or
 * /proc/scsi directories still gets a tmpfs over each: none of the project's machines has them.)
 * An image carries the mounts it was dumped with, and CRIU restores those whatever the bundle
 * says (only bind sources come from the bundle): an image of an older layout restores, but an
 * image of what it restored would not (hasOlderLayout).
 *
 * Namespaces: PID, mount, IPC, UTS of its own; network: the app's namespace by path (netns.ts),
 * which runc then declares external to CRIU, so it is neither dumped nor restored — it must exist
 * at `netnsPath` before `runc run` and `runc restore`.
 *
 * Security: runc's default capabilities (AUDIT_WRITE, KILL, NET_BIND_SERVICE), noNewPrivileges,
 * and the default seccomp profile of seccomp.ts (runc has no built-in default).
 */

/** Where the log directory is mounted inside the container, and the log's name in it. */
export const LOG_MOUNT = '/run/picocenter';
export const LOG_FILE = 'app.log';

const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
const DEFAULT_TMP_BYTES = 64 * 1024 * 1024;
/** size of an operator's bundle's /run tmpfs: it only holds the log mount point */
const RUN_BYTES = 1024 * 1024;
/** open files an app may have, capped by the worker's own hard limit (see hostFacts) */
const NOFILE = 65536;
/** runc's own defaults (`runc spec`): the capabilities an app keeps. */
const CAPABILITIES = ['CAP_AUDIT_WRITE', 'CAP_KILL', 'CAP_NET_BIND_SERVICE'];
/** Top-level host paths that are either symlinks into /usr or directories to bind read-only. */
const SYSTEM_LINKS = ['/bin', '/sbin', '/lib', '/lib32', '/lib64', '/libx32'];
const CONTAINER_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

export interface BundleSpec {
  /** the runc container id; also the container's hostname */
  id: string;
  /** the app's command: argv[0] is looked up on PATH inside the container */
  args: string[];
  env: Record<string, string>;
  /** the app's directory on the host; mounted read-write at the same path inside */
  appDir: string;
  /** working directory inside the container; default appDir */
  cwd?: string;
  /** host directory mounted at LOG_MOUNT; the app's stdout and stderr append to LOG_FILE there */
  logDir: string;
  /** the app's network namespace (a path under /var/run/netns); see netns.ts */
  netnsPath: string;
  /** memory limit in bytes; absent: none */
  memoryLimit?: number;
  /** more host paths to show read-only at the same path, e.g. a Node installed under /opt */
  readOnlyPaths?: string[];
  /** size of /tmp in bytes; default 64 MiB */
  tmpBytes?: number;
  /**
   * A root filesystem directory (absolute) to use as the container's root instead of the host's
   * system; readOnlyPaths are then ignored (they are host paths).
   */
  rootfs?: string;
  /** config.json annotations, e.g. org.criu.config (the CRIU config file runc hands to CRIU) */
  annotations?: Record<string, string>;
  /** the worker's host directories mounted read-only in every container (host-dirs.ts) */
  dirs: HostDirs;
}

/** Host directories that stand in for tmpfs mounts; prepareHostDirs() (host-dirs.ts) makes them. */
export interface HostDirs {
  /** the container's /dev: device nodes, symlinks and mount points */
  dev: string;
  /** an empty directory, bound over /sys/firmware */
  empty: string;
  /** the rootfs layout's /run: LOG_MOUNT's mount point and nothing else */
  run: string;
}

/** The part of the OCI runtime spec (1.0.2) that the bundles use. */
export interface OciConfig {
  ociVersion: string;
  process: {
    terminal: boolean;
    user: { uid: number; gid: number };
    args: string[];
    env: string[];
    cwd: string;
    capabilities: Record<'bounding' | 'effective' | 'permitted' | 'ambient', string[]>;
    rlimits: { type: string; hard: number; soft: number }[];
    noNewPrivileges: boolean;
  };
  root: { path: string; readonly: boolean };
  hostname: string;
  mounts: OciMount[];
  linux: {
    cgroupsPath: string;
    resources: { devices: { allow: boolean; access: string }[]; memory?: { limit: number } };
    namespaces: { type: string; path?: string }[];
    maskedPaths: string[];
    readonlyPaths: string[];
    seccomp: SeccompProfile;
  };
  annotations?: Record<string, string>;
}

export interface OciMount {
  destination: string;
  type: string;
  source: string;
  options?: string[];
}

/** What a bundle depends on in the host: read once, passed in, so bundleConfig stays pure. */
export interface HostFacts {
  /** each top-level system path: the target of its symlink into /usr, or a directory */
  layout: Record<string, { link: string } | 'dir'>;
  /**
   * The worker's hard RLIMIT_NOFILE. runc cannot raise an app's limit past it: on these hosts
   * root lacks CAP_SYS_RESOURCE (hard limit 20000), and a higher rlimit in config.json fails
   * `runc run` with "error setting rlimit type 7: operation not permitted".
   */
  nofileHard: number;
}

export function hostFacts(): HostFacts {
  const layout: HostFacts['layout'] = {};
  for (const p of SYSTEM_LINKS) {
    try {
      const st = lstatSync(p);
      if (st.isSymbolicLink()) layout[p] = { link: readlinkSync(p) };
      else if (st.isDirectory()) layout[p] = 'dir';
    } catch {
      // absent on this host (e.g. /lib32): nothing to show
    }
  }
  let nofileHard = NOFILE;
  try {
    const m = /^Max open files\s+\S+\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
    if (m && m[1] !== 'unlimited') nofileHard = Number(m[1]);
  } catch {
    // no /proc: keep the default
  }
  return { layout, nofileHard };
}

/** The config.json for `spec`, as a pure function of it and the host's layout. */
export function bundleConfig(spec: BundleSpec, host: HostFacts = hostFacts()): OciConfig {
  validate(spec);
  const nofile = Math.min(NOFILE, host.nofileHard);
  const ro = (p: string): OciMount => ({ destination: p, type: 'bind', source: p, options: ['bind', 'ro', 'nosuid', 'nodev'] });
  const rw = (source: string, destination: string): OciMount => ({ destination, type: 'bind', source, options: ['bind', 'rw', 'nosuid', 'nodev'] });
  const tmp: OciMount = { destination: '/tmp', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'nodev', 'mode=1777', `size=${spec.tmpBytes ?? DEFAULT_TMP_BYTES}`] };
  // In the rootfs layout, a cwd inside the rootfs is a path of the container; outside, it is the
  // app's own directory, mounted at the same path.
  const inside = spec.rootfs !== undefined ? pathInside(spec.rootfs, spec.cwd ?? spec.appDir) : null;
  const mounts: OciMount[] = [
    ...standardMounts(spec.dirs),
    ...(spec.rootfs === undefined
      ? [
          ro('/usr'),
          ro('/etc'),
          ...Object.entries(host.layout)
            .filter(([, v]) => v === 'dir')
            .map(([p]) => ro(p)),
          // Before the paths below: an app or log directory under /tmp is mounted on top of this tmpfs.
          tmp,
          ...(spec.readOnlyPaths ?? []).map(ro),
          rw(spec.appDir, spec.appDir),
        ]
      : [
          tmp,
          { destination: '/run', type: 'bind', source: spec.dirs.run, options: ['bind', 'ro', 'nosuid', 'nodev', 'noexec'] },
          ...(inside === null ? [rw(spec.appDir, spec.appDir)] : []),
        ]),
    rw(spec.logDir, LOG_MOUNT),
  ];
  const env = { PATH: DEFAULT_PATH, ...spec.env };
  return {
    ociVersion: '1.0.2-dev',
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: stdioWrapper(spec.args),
      env: Object.entries(env).map(([k, v]) => `${k}=${v}`),
      cwd: inside ?? spec.cwd ?? spec.appDir,
      capabilities: { bounding: CAPABILITIES, effective: CAPABILITIES, permitted: CAPABILITIES, ambient: CAPABILITIES },
      rlimits: [{ type: 'RLIMIT_NOFILE', hard: nofile, soft: nofile }],
      noNewPrivileges: true,
    },
    root: { path: spec.rootfs ?? 'rootfs', readonly: true },
    hostname: spec.id,
    mounts,
    linux: {
      cgroupsPath: cgroupsPathFor(spec.id),
      resources: {
        devices: [{ allow: false, access: 'rwm' }],
        ...(spec.memoryLimit !== undefined ? { memory: { limit: spec.memoryLimit } } : {}),
      },
      namespaces: [{ type: 'pid' }, { type: 'network', path: spec.netnsPath }, { type: 'ipc' }, { type: 'uts' }, { type: 'mount' }],
      // runc's defaults, less /proc/acpi and /sys/firmware ("Only /tmp is a tmpfs", at the top).
      maskedPaths: ['/proc/asound', '/proc/kcore', '/proc/keys', '/proc/latency_stats', '/proc/timer_list', '/proc/timer_stats', '/proc/sched_debug', '/proc/scsi'],
      readonlyPaths: ['/proc/acpi', '/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger'],
      seccomp: defaultSeccomp(),
    },
    ...(spec.annotations && Object.keys(spec.annotations).length > 0 ? { annotations: { ...spec.annotations } } : {}),
  };
}

/**
 * /proc, /dev and /sys as runc's own `runc spec` has them, less /sys/fs/cgroup (apps need no
 * cgroup tree; one less mount to dump) and with no tmpfs ("Only /tmp is a tmpfs", above). /dev
 * must not be nodev: its device nodes must open.
 */
function standardMounts(dirs: HostDirs): OciMount[] {
  return [
    { destination: '/proc', type: 'proc', source: 'proc' },
    { destination: '/dev', type: 'bind', source: dirs.dev, options: ['bind', 'ro', 'nosuid', 'noexec'] },
    { destination: '/dev/pts', type: 'devpts', source: 'devpts', options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620', 'gid=5'] },
    { destination: '/dev/mqueue', type: 'mqueue', source: 'mqueue', options: ['nosuid', 'noexec', 'nodev'] },
    { destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] },
    { destination: '/sys/firmware', type: 'bind', source: dirs.empty, options: ['bind', 'ro', 'nosuid', 'nodev', 'noexec'] },
  ];
}

/** The /run tmpfs of an operator's own bundle (user-bundle.ts): LOG_MOUNT's mount point lives in it. */
export const RUN_TMPFS: OciMount = { destination: '/run', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'nodev', 'mode=755', `size=${RUN_BYTES}`] };

/**
 * Whether a host- or rootfs-layout container, by its init's /proc/PID/mountinfo, still has the
 * mounts of the layout before /dev became a bind (a tmpfs /dev). Such a container was restored
 * from an image of that layout: CRIU restores the mounts an image has, whatever the bundle says.
 * It runs, but an image of it does not restore with the current bundle (CRIU: "Failed to move
 * mount … /dev/shm"), so it must not be checkpointed.
 */
export function hasOlderLayout(mountinfo: string): boolean {
  // the last mount on /dev is the one on top
  const dev = parseMountinfo(mountinfo).filter((m) => m.mountpoint === '/dev').at(-1);
  return dev?.fstype === 'tmpfs';
}

/**
 * The app's command, run by /bin/sh, which points stdin at /dev/null and stdout and stderr at the
 * log INSIDE the container (see the top of this file), then execs the command as PID 1.
 */
export function stdioWrapper(args: readonly string[]): string[] {
  return ['/bin/sh', '-c', `exec "$@" </dev/null >>${LOG_MOUNT}/${LOG_FILE} 2>&1`, 'sh', ...args];
}

/** The cgroup (relative to each hierarchy's root) of container `id`. */
export function cgroupsPathFor(id: string): string {
  return `/picocenter/${id}`;
}

/** `p` as a path of the container whose root is `rootfs`, or null when `p` is outside it. */
export function pathInside(rootfs: string, p: string): string | null {
  const rel = path.relative(rootfs, p);
  if (rel === '') return '/';
  if (rel.startsWith('..') || path.isAbsolute(rel)) return null;
  return `/${rel.split(path.sep).join('/')}`;
}

/**
 * Where absolute path `p` of a root filesystem leads on the host: symlinks are followed the way
 * the container will see them (an absolute target is taken relative to `rootfs`, `..` stops at
 * its root). null when something on the way does not exist or the links loop.
 */
export function resolveInRootfs(rootfs: string, p: string): string | null {
  let parts = p.split('/').filter(Boolean);
  const done: string[] = [];
  for (let hops = 0; parts.length > 0; ) {
    const name = parts.shift()!;
    if (name === '.') continue;
    if (name === '..') {
      done.pop();
      continue;
    }
    const host = path.join(rootfs, ...done, name);
    let st;
    try {
      st = lstatSync(host);
    } catch {
      return null;
    }
    if (st.isSymbolicLink()) {
      if (++hops > 40) return null;
      const target = readlinkSync(host);
      if (target.startsWith('/')) done.length = 0;
      parts = [...target.split('/').filter(Boolean), ...parts];
      continue;
    }
    done.push(name);
  }
  return path.join(rootfs, ...done);
}

/** Throws unless the root filesystem `rootfs` has an executable /bin/sh (stdioWrapper needs it). */
export function assertShell(rootfs: string, what: string): void {
  const sh = resolveInRootfs(rootfs, '/bin/sh');
  let ok = false;
  try {
    const st = sh ? statSync(sh) : null;
    ok = st !== null && st.isFile() && (st.mode & 0o111) !== 0;
  } catch {
    ok = false;
  }
  if (!ok) {
    throw new Error(
      `${what} has no executable /bin/sh: Picocenter runs the app through it to point stdout and stderr at the app's log ` +
        'inside the container (CRIU cannot dump stdio that is a file or pipe of the host)',
    );
  }
}

export interface Bundle {
  dir: string;
  config: OciConfig;
  /** the app's log on the host */
  logFile: string;
}

/**
 * Writes `dir/config.json` and the skeleton `dir/rootfs` (mount points and the host's /usr
 * symlinks). Rewriting an existing bundle is safe while its app is stored: a restore reads the
 * same config (mount destinations and the netns path must not change between dump and restore).
 */
export function writeBundle(dir: string, spec: BundleSpec, host: HostFacts = hostFacts()): Bundle {
  const config = bundleConfig(spec, host);
  if (spec.rootfs !== undefined) {
    // Not ours to write into: runc makes what mount points it lacks.
    if (!isDirectory(spec.rootfs)) throw new Error(`rootfs ${spec.rootfs} is not a directory`);
    assertShell(spec.rootfs, `rootfs ${spec.rootfs}`);
    return writeConfig(dir, config, spec.logDir);
  }
  const rootfs = path.join(dir, config.root.path);
  mkdirSync(rootfs, { recursive: true });
  for (const [p, v] of Object.entries(host.layout)) {
    const at = path.join(rootfs, p);
    if (v === 'dir') continue;
    rmSync(at, { force: true, recursive: false });
    symlinkSync(v.link, at);
  }
  // Mount points, made now: runc would create them too, but only while / is still writable.
  for (const m of config.mounts) mkdirSync(path.join(rootfs, m.destination), { recursive: true });
  return writeConfig(dir, config, spec.logDir);
}

/** Writes `dir/config.json` (and makes the log directory): the part every layout shares. */
export function writeConfig<C extends object>(dir: string, config: C, logDir: string): { dir: string; config: C; logFile: string } {
  mkdirSync(dir, { recursive: true });
  mkdirSync(logDir, { recursive: true });
  writeFileSync(path.join(dir, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
  return { dir, config, logFile: path.join(logDir, LOG_FILE) };
}

function isDirectory(p: string): boolean {
  try {
    return statSync(p).isDirectory();
  } catch {
    return false;
  }
}

function validate(spec: BundleSpec): void {
  if (!CONTAINER_ID.test(spec.id)) throw new Error(`container id ${JSON.stringify(spec.id)} is not [A-Za-z0-9][A-Za-z0-9_.-]{0,63}`);
  if (spec.args.length === 0) throw new Error(`container ${spec.id}: empty command`);
  const paths = [
    ['app directory', spec.appDir],
    ['log directory', spec.logDir],
    ['netns path', spec.netnsPath],
    ...(spec.readOnlyPaths ?? []).map((r) => ['read-only path', r]),
    ...Object.entries(spec.dirs).map(([k, v]) => [`${k} directory`, v]),
  ];
  if (spec.rootfs !== undefined) paths.push(['rootfs', spec.rootfs]);
  if (spec.cwd !== undefined) paths.push(['working directory', spec.cwd]);
  for (const [what, p] of paths as [string, string][]) {
    if (!path.isAbsolute(p)) throw new Error(`container ${spec.id}: ${what} ${p} is not absolute`);
  }
  if (spec.memoryLimit !== undefined && !(Number.isSafeInteger(spec.memoryLimit) && spec.memoryLimit > 0)) {
    throw new Error(`container ${spec.id}: memory limit ${spec.memoryLimit} is not a positive number of bytes`);
  }
}
