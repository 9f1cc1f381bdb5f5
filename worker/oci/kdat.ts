import { chmodSync, lstatSync, mkdirSync, readlinkSync, renameSync, rmSync, statfsSync, statSync, symlinkSync } from 'node:fs';
import path from 'node:path';
import { failureReason, run, succeeded, which } from './exec.js';

/*
 * CRIU's kernel probe cache ("kerndat") on hosts whose /run is not a tmpfs.
 *
 * Every criu run probes the kernel first (vDSO layout, uffd, nftables, …): 95–360 ms on these VMs,
 * paid by every dump and restore, twice per runc operation. CRIU caches the result in
 * /run/criu.kdat — the path is compiled in (KDAT_RUNDIR); only `--unprivileged` runs read
 * $XDG_RUNTIME_DIR instead, and runc passes no option for it — but it WRITES the cache only when
 * /run is a tmpfs, so that a cache never outlives the kernel it describes (the vDSO offsets in it
 * are the running kernel's). When /run is on disk, as here, it never writes one.
 *
 * CRIU's READ does not look at the filesystem, and follows a symlink. So, when /run is not a
 * tmpfs, the runtime keeps the cache on a tmpfs after all:
 *
 *   /run/criu.kdat  ──symlink──►  /dev/shm/picocenter-kdat/criu.kdat    (tmpfs, root-only dir)
 *
 * made by running `criu check` once in a private mount namespace with a tmpfs on its /run (the
 * host's /run is never mounted over) and copying the file out. A reboot empties /dev/shm: the
 * symlink then dangles, criu finds no cache and probes, exactly as without one — a stale cache
 * cannot be read. A criu of another build (other magic or size) reads the file as "stale" and
 * unlinks the symlink; the next ensureKdatCache() makes it again. The directory must be root's
 * and not writable by others, or the cache is not used (a forged cache would steer criu).
 */

export const KDAT_LINK = '/run/criu.kdat';
export const KDAT_DIR = '/dev/shm/picocenter-kdat';
const TMPFS_MAGIC = 0x01021994;

export type KdatState =
  /** /run is a tmpfs: criu keeps its own cache there */
  | 'native'
  /** the symlink and the cache on /dev/shm are in place */
  | 'ready'
  /** just made */
  | 'made'
  /** cannot be had here; criu probes on every run (the reason says why) */
  | 'unavailable';

export interface KdatStatus {
  state: KdatState;
  reason?: string;
}

export interface KdatOptions {
  /** default KDAT_LINK */
  link?: string;
  /** default KDAT_DIR: must be on a tmpfs */
  dir?: string;
  /** the directory whose filesystem decides whether criu caches by itself; default /run */
  runDir?: string;
}

/** Concurrent callers of one process share one making of the cache. */
let making: Promise<KdatStatus> | null = null;

/**
 * Makes sure criu finds a kernel probe cache at /run/criu.kdat (see the top of this file). Cheap
 * when it is in place (a few stat calls): call it before each criu operation. Never throws.
 */
export async function ensureKdatCache(criu: string, o: KdatOptions = {}): Promise<KdatStatus> {
  const link = o.link ?? KDAT_LINK;
  const dir = o.dir ?? KDAT_DIR;
  const target = path.join(dir, 'criu.kdat');
  try {
    if (isTmpfs(o.runDir ?? path.dirname(link))) return { state: 'native' };
    if (cacheInPlace(link, target, dir)) return { state: 'ready' };
  } catch (err) {
    return { state: 'unavailable', reason: (err as Error).message };
  }
  making ??= makeCache(criu, link, dir, target).finally(() => (making = null));
  return making;
}

function cacheInPlace(link: string, target: string, dir: string): boolean {
  try {
    if (!lstatSync(link).isSymbolicLink() || readlinkSync(link) !== target) return false;
    checkDir(dir);
    const st = statSync(target);
    return st.isFile() && st.size > 0 && st.uid === 0;
  } catch {
    return false;
  }
}

async function makeCache(criu: string, link: string, dir: string, target: string): Promise<KdatStatus> {
  try {
    const unshare = which('unshare');
    if (!unshare) return { state: 'unavailable', reason: 'unshare (util-linux) is missing' };
    try {
      mkdirSync(dir, { mode: 0o700 });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    checkDir(dir);
    if (!isTmpfs(dir)) return { state: 'unavailable', reason: `${dir} is not on a tmpfs` };
    const tmp = path.join(dir, `.criu.kdat.${process.pid}`);
    rmSync(tmp, { force: true });
    // In a private mount namespace, a tmpfs on /run: criu writes its cache there; cp takes it out
    // to `tmp` (the namespace, and that tmpfs, end with the command).
    const script = 'mount -t tmpfs -o size=1m,mode=0755 picocenter-kdat /run && "$1" check >/dev/null 2>&1; cp /run/criu.kdat "$2"';
    const r = await run(unshare, ['--mount', '--propagation', 'private', '/bin/sh', '-c', script, 'sh', criu, tmp], { timeoutMs: 30_000 });
    if (!succeeded(r)) {
      rmSync(tmp, { force: true });
      return { state: 'unavailable', reason: `making the cache failed: ${failureReason(r)}` };
    }
    chmodSync(tmp, 0o600);
    renameSync(tmp, target);
    // The symlink replaces whatever is at `link` (a dangling link, or a cache file on disk that
    // could outlive its kernel) in one rename.
    const tmpLink = `${link}.picocenter-${process.pid}`;
    rmSync(tmpLink, { force: true });
    symlinkSync(target, tmpLink);
    renameSync(tmpLink, link);
    return { state: 'made' };
  } catch (err) {
    return { state: 'unavailable', reason: (err as Error).message };
  }
}

/** The cache directory must be root's, a real directory, and writable by root alone. */
function checkDir(dir: string): void {
  const st = lstatSync(dir);
  if (!st.isDirectory() || st.uid !== 0 || (st.mode & 0o022) !== 0) {
    throw new Error(`${dir} is not a directory that only root can write to: not trusting a criu cache there`);
  }
}

function isTmpfs(p: string): boolean {
  return statfsSync(p).type === TMPFS_MAGIC;
}
