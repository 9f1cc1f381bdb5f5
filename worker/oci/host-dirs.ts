import { chmodSync, closeSync, lstatSync, mkdirSync, openSync, readdirSync, readlinkSync, rmSync, symlinkSync, type Stats } from 'node:fs';
import path from 'node:path';
import { LOG_MOUNT, type HostDirs } from './bundle.js';
import { failureReason, run, succeeded, which } from './exec.js';

/*
 * The host directories that every host- and rootfs-layout container mounts read-only instead of
 * a tmpfs (bundle.ts says why: CRIU dumps and restores every tmpfs with a `tar`). One set per
 * state directory, shared by all its containers:
 *
 *   STATE/dev/     the containers' /dev: the nodes runc makes in its own /dev (null, zero, full,
 *                  random, urandom, tty: Linux's fixed numbers, mode 0666), its symlinks (fd,
 *                  stdin, stdout, stderr, ptmx -> pts/ptmx), shm -> /tmp (POSIX shared memory
 *                  then lives in /tmp, so it is in the image), and the mount points pts, mqueue
 *   STATE/empty/   an empty directory: /sys/firmware's mask
 *   STATE/run/     the rootfs layout's /run: only the mount point of LOG_MOUNT
 *
 * Each directory holds exactly that, or a container would see it: prepareHostDirs() puts back
 * what differs and removes what does not belong, and is cheap when all is in place. Running
 * containers see a repair at once (they bind the directory, not a copy). A restore binds the
 * directories of the worker that restores (runc hands CRIU each bind's source by its
 * destination), so images move between workers whose state directories differ.
 *
 * Device nodes work only on a filesystem mounted without `nodev`: prepareHostDirs() opens
 * STATE/dev/null to find out and refuses the state directory otherwise. (runc 1.1 drops the
 * source's nodev when it remounts a bind read-only, but a runc that keeps the source's flags
 * would not: the runtime does not count on it.)
 */

interface Node {
  name: string;
  major: number;
  minor: number;
}

/** The character devices of runc's own /dev (Documentation/admin-guide/devices.txt numbers). */
const DEVICES: readonly Node[] = [
  { name: 'null', major: 1, minor: 3 },
  { name: 'zero', major: 1, minor: 5 },
  { name: 'full', major: 1, minor: 7 },
  { name: 'random', major: 1, minor: 8 },
  { name: 'urandom', major: 1, minor: 9 },
  { name: 'tty', major: 5, minor: 0 },
];
const DEVICE_MODE = 0o666;
const DIR_MODE = 0o755;

/** name -> target */
const DEV_LINKS: Readonly<Record<string, string>> = {
  fd: '/proc/self/fd',
  stdin: '/proc/self/fd/0',
  stdout: '/proc/self/fd/1',
  stderr: '/proc/self/fd/2',
  ptmx: 'pts/ptmx',
  // glibc's shm_open and sem_open use /dev/shm/NAME (O_NOFOLLOW guards only NAME itself).
  shm: '/tmp',
};
/** mount points of the devpts and mqueue mounts */
const DEV_DIRS = ['pts', 'mqueue'];

/** The host directories of `stateDir`, made or repaired; throws when device nodes cannot work there. */
export async function prepareHostDirs(stateDir: string): Promise<HostDirs> {
  const dirs: HostDirs = { dev: path.join(stateDir, 'dev'), empty: path.join(stateDir, 'empty'), run: path.join(stateDir, 'run') };
  ensureDir(dirs.dev);
  const wanted = new Set([...DEVICES.map((d) => d.name), ...Object.keys(DEV_LINKS), ...DEV_DIRS]);
  removeOthers(dirs.dev, wanted);
  for (const d of DEVICES) await ensureDevice(path.join(dirs.dev, d.name), d);
  for (const [name, target] of Object.entries(DEV_LINKS)) ensureLink(path.join(dirs.dev, name), target);
  for (const name of DEV_DIRS) ensureDir(path.join(dirs.dev, name));

  ensureDir(dirs.empty);
  removeOthers(dirs.empty, new Set());

  // LOG_MOUNT is /run/picocenter: STATE/run holds that one empty directory.
  const logPoint = path.posix.relative('/run', LOG_MOUNT);
  ensureDir(dirs.run);
  removeOthers(dirs.run, new Set([logPoint]));
  ensureDir(path.join(dirs.run, logPoint));

  assertDevicesWork(dirs.dev, stateDir);
  return dirs;
}

async function ensureDevice(file: string, d: Node): Promise<void> {
  const st = lstatOrNull(file);
  if (st && st.isCharacterDevice() && st.rdev === encodeDev(d.major, d.minor) && (st.mode & 0o7777) === DEVICE_MODE && st.uid === 0) return;
  if (st) rmSync(file, { recursive: true, force: true });
  await mknod(file, d);
}

async function mknod(file: string, d: Node): Promise<void> {
  // Node has no mknod(2): coreutils' mknod, found once.
  const bin = (mknodBin ??= which('mknod') ?? 'mknod');
  const r = await run(bin, ['-m', DEVICE_MODE.toString(8), file, 'c', String(d.major), String(d.minor)]);
  if (!succeeded(r)) throw new Error(`cannot make the device node ${file} (${d.major}:${d.minor}): mknod ${failureReason(r)}`);
}
let mknodBin: string | undefined;

function ensureLink(file: string, target: string): void {
  const st = lstatOrNull(file);
  if (st?.isSymbolicLink() && readlinkSync(file) === target) return;
  if (st) rmSync(file, { recursive: true, force: true });
  symlinkSync(target, file);
}

function ensureDir(dir: string): void {
  const st = lstatOrNull(dir);
  if (st && !st.isDirectory()) rmSync(dir, { force: true });
  mkdirSync(dir, { recursive: true, mode: DIR_MODE });
  if (((st?.mode ?? DIR_MODE) & 0o7777) !== DIR_MODE) chmodSync(dir, DIR_MODE);
}

function removeOthers(dir: string, keep: ReadonlySet<string>): void {
  for (const name of readdirSync(dir)) if (!keep.has(name)) rmSync(path.join(dir, name), { recursive: true, force: true });
}

/** An open of a device node fails with EACCES on a filesystem mounted nodev. */
function assertDevicesWork(dev: string, stateDir: string): void {
  const file = path.join(dev, 'null');
  try {
    closeSync(openSync(file, 'r+'));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === 'EACCES' ? `the filesystem of ${stateDir} is mounted nodev` : (err as Error).message;
    throw new Error(`device nodes do not work in ${dev} (${why}); containers bind it as their /dev: put the oci state directory on a filesystem mounted without nodev`, { cause: err });
  }
}

/** The kernel's dev_t as stat(2) reports it (new_encode_dev). */
function encodeDev(major: number, minor: number): number {
  return (minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12);
}

function lstatOrNull(p: string): Stats | null {
  try {
    return lstatSync(p);
  } catch {
    return null;
  }
}
