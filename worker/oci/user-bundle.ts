import { readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { assertShell, cgroupsPathFor, LOG_MOUNT, RUN_TMPFS, stdioWrapper, writeConfig, type HostFacts, type OciMount } from './bundle.js';
import { defaultSeccomp } from './seccomp.js';

/**
 * An operator's own OCI bundle (`apps[].bundle`: a directory with config.json and usually
 * rootfs/), run with its config.json as the base. The user's files are never written: the
 * adapted config goes into the runtime's own bundle directory (STATE/apps/APP/bundle), with the
 * root filesystem named by absolute path.
 *
 * What Picocenter overrides, because it must control it — everything else is the bundle's:
 *   process.terminal   false: a container's stdio must be something CRIU can dump
 *   process.args       wrapped in `/bin/sh -c 'exec "$@" …'`, which points stdout and stderr at the
 *                      app's log inside the container (bundle.ts); the rootfs needs /bin/sh
 *   process.env        + the app's env from the config, APP_NAME, PORTS and PORT (these win)
 *   process.rlimits    RLIMIT_NOFILE capped at the worker's hard limit (runc cannot raise it)
 *   root.path          resolved against the user's bundle directory (absolute)
 *   mounts             relative bind sources resolved against the user's bundle directory; a
 *                      tmpfs at /run when the bundle has no mount there, and the app's log
 *                      directory at /run/picocenter (a /run mount that is not a tmpfs is refused:
 *                      the log's mount point would be made in the user's files)
 *   linux.namespaces   network: the app's netns by path (our veth, our address); pid and mount
 *                      added when missing (a restore needs them)
 *   linux.cgroupsPath  /picocenter/ID, like every Picocenter container
 *   linux.resources.memory.limit   the app's `memory`, when given
 *   linux.seccomp      the default profile (seccomp.ts) when the bundle has none
 *   annotations        org.criu.config when the runtime configures CRIU (its network lock)
 *   hooks              dropped: they would run on the host, as root, at every start and wake
 * The command and working directory are the bundle's (the config's `command` and `cwd` are not
 * used). A config.json that cannot be read or is not an OCI config fails the wake with
 * PICO_ERR_WAKE_FAILED naming the file and what is wrong with it.
 */

/** What Picocenter decides for one app's container. */
export interface UserBundleOverrides {
  /** the runc container id */
  id: string;
  /** added to (and winning over) the bundle's process.env */
  env: Record<string, string>;
  /** host directory mounted at LOG_MOUNT */
  logDir: string;
  /** the app's network namespace */
  netnsPath: string;
  /** in bytes; absent: the bundle's own limit, if any */
  memoryLimit?: number;
  /** set over the bundle's own annotations (org.criu.config: CRIU is Picocenter's to configure) */
  annotations?: Record<string, string>;
}

/** A config.json as read: any JSON object, checked for the fields Picocenter relies on. */
export type UserConfig = Record<string, unknown> & {
  process: Record<string, unknown> & { args: string[]; env?: string[]; cwd: string; rlimits?: Array<{ type: string; hard: number; soft: number }> };
  root: Record<string, unknown> & { path: string };
  mounts?: Array<OciMount & Record<string, unknown>>;
  linux?: Record<string, unknown>;
};

export interface UserBundle {
  /** the user's bundle directory, absolute */
  dir: string;
  /** its config.json */
  configFile: string;
  config: UserConfig;
  /** the root filesystem, absolute */
  rootfs: string;
}

/** Reads and checks `dir/config.json`; every error names the file and the problem. */
export function readUserBundle(dir: string): UserBundle {
  const abs = path.resolve(dir);
  const file = path.join(abs, 'config.json');
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new Error(`bundle config ${file} cannot be read: ${(err as Error).message}`);
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new Error(`bundle config ${file} is not valid JSON: ${(err as Error).message}`);
  }
  const config = checkUserConfig(value, file);
  const rootfs = path.resolve(abs, config.root.path);
  try {
    if (!statSync(rootfs).isDirectory()) throw new Error('not a directory');
  } catch (err) {
    throw new Error(`bundle config ${file}: root.path ${JSON.stringify(config.root.path)} (${rootfs}) is not a directory: ${(err as Error).message}`);
  }
  assertShell(rootfs, `bundle config ${file}: root.path ${rootfs}`);
  return { dir: abs, configFile: file, config, rootfs };
}

/** The checks of readUserBundle on a parsed config.json (pure). */
export function checkUserConfig(value: unknown, file: string): UserConfig {
  const bad = (why: string): never => {
    throw new Error(`bundle config ${file}: ${why}`);
  };
  const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);
  const strings = (v: unknown): v is string[] => Array.isArray(v) && v.every((x) => typeof x === 'string');
  if (!isObject(value)) bad('not a JSON object');
  const c = value as Record<string, unknown>;
  if (typeof c.ociVersion !== 'string') bad('ociVersion is missing (not an OCI runtime config?)');
  if (!isObject(c.process)) bad('process is missing or not an object');
  const proc = c.process as Record<string, unknown>;
  if (!strings(proc.args) || proc.args.length === 0) bad('process.args must be a non-empty array of strings');
  if (proc.env !== undefined && !strings(proc.env)) bad('process.env must be an array of "KEY=value" strings');
  if (typeof proc.cwd !== 'string' || !path.isAbsolute(proc.cwd)) bad('process.cwd must be an absolute path');
  if (proc.rlimits !== undefined && !(Array.isArray(proc.rlimits) && proc.rlimits.every(isObject))) bad('process.rlimits must be an array of objects');
  if (!isObject(c.root) || typeof c.root.path !== 'string' || c.root.path === '') bad('root.path is missing');
  if (c.mounts !== undefined) {
    if (!Array.isArray(c.mounts)) bad('mounts must be an array');
    (c.mounts as unknown[]).forEach((m, i) => {
      if (!isObject(m) || typeof m.destination !== 'string' || !path.isAbsolute(m.destination)) bad(`mounts[${i}].destination must be an absolute path`);
    });
  }
  if (c.linux !== undefined) {
    if (!isObject(c.linux)) bad('linux must be an object');
    const linux = c.linux as Record<string, unknown>;
    if (linux.namespaces !== undefined && !(Array.isArray(linux.namespaces) && linux.namespaces.every((n) => isObject(n) && typeof n.type === 'string'))) {
      bad('linux.namespaces must be an array of { type }');
    }
    if (linux.resources !== undefined && !isObject(linux.resources)) bad('linux.resources must be an object');
  }
  return value as UserConfig;
}

/** The runtime's config.json for a user's bundle: see the list at the top (pure). */
export function adaptUserBundle(user: UserBundle, o: UserBundleOverrides, host: HostFacts): Record<string, unknown> {
  const c = structuredClone(user.config);
  const bad = (why: string): never => {
    throw new Error(`bundle config ${user.configFile}: ${why}`);
  };

  // process
  const env = new Map<string, string>();
  for (const kv of c.process.env ?? []) {
    const i = kv.indexOf('=');
    env.set(i < 0 ? kv : kv.slice(0, i), i < 0 ? '' : kv.slice(i + 1));
  }
  for (const [k, v] of Object.entries(o.env)) env.set(k, v);
  const rlimits = (c.process.rlimits ?? []).map((r) =>
    r.type === 'RLIMIT_NOFILE' ? { ...r, hard: Math.min(r.hard, host.nofileHard), soft: Math.min(r.soft, r.hard, host.nofileHard) } : r,
  );
  delete c.process.consoleSize;
  c.process = {
    ...c.process,
    terminal: false,
    args: stdioWrapper(c.process.args),
    env: [...env].map(([k, v]) => `${k}=${v}`),
    ...(rlimits.length > 0 ? { rlimits } : {}),
  };

  // root and mounts
  c.root = { ...c.root, path: user.rootfs };
  const mounts = (c.mounts ?? []).filter((m) => path.posix.normalize(m.destination) !== LOG_MOUNT);
  for (const m of mounts) {
    const isBind = m.type === 'bind' || (m.options ?? []).some((x) => x === 'bind' || x === 'rbind');
    if (isBind && typeof m.source === 'string' && !path.isAbsolute(m.source)) m.source = path.resolve(user.dir, m.source);
  }
  const run = mounts.find((m) => path.posix.normalize(m.destination) === '/run');
  if (run && run.type !== 'tmpfs') bad(`mounts: /run is a ${run.type} mount; Picocenter needs /run to be a tmpfs (the app's log is mounted at ${LOG_MOUNT})`);
  if (!run) mounts.push({ ...RUN_TMPFS });
  mounts.push({ destination: LOG_MOUNT, type: 'bind', source: o.logDir, options: ['bind', 'rw', 'nosuid', 'nodev'] });
  c.mounts = mounts;

  // linux
  const linux: Record<string, unknown> = { ...(c.linux ?? {}) };
  const namespaces = ((linux.namespaces as Array<{ type: string; path?: string }> | undefined) ?? []).filter((n) => n.type !== 'network');
  for (const t of ['pid', 'mount']) if (!namespaces.some((n) => n.type === t)) namespaces.push({ type: t });
  namespaces.push({ type: 'network', path: o.netnsPath });
  linux.namespaces = namespaces;
  linux.cgroupsPath = cgroupsPathFor(o.id);
  if (o.memoryLimit !== undefined) {
    const resources = { ...((linux.resources as Record<string, unknown> | undefined) ?? {}) };
    resources.memory = { ...((resources.memory as Record<string, unknown> | undefined) ?? {}), limit: o.memoryLimit };
    linux.resources = resources;
  }
  if (linux.seccomp === undefined) linux.seccomp = defaultSeccomp();
  c.linux = linux;
  delete c.hooks;
  if (o.annotations && Object.keys(o.annotations).length > 0) {
    c.annotations = { ...((c.annotations as Record<string, string> | undefined) ?? {}), ...o.annotations };
  }
  return c;
}

/** Reads the user's bundle and writes the runtime's adapted config.json into `dir`. */
export function writeUserBundle(dir: string, userDir: string, o: UserBundleOverrides, host: HostFacts): { dir: string; config: Record<string, unknown>; logFile: string } {
  const user = readUserBundle(userDir);
  return writeConfig(dir, adaptUserBundle(user, o, host), o.logDir);
}
