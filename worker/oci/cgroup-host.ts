import { readFileSync } from 'node:fs';
import path from 'node:path';
import type { Logger } from '../../shared/log.js';
import { failureReason, run, succeeded } from './exec.js';
import { parseMountinfo, type MountEntry } from './mountinfo.js';

/*
 * The host's cgroup mounts, as the wake path meets them. Two costs were measured on every restore
 * here (kernel tracepoints, 2-core VM), both waits for an RCU grace period rather than work:
 *
 * - Moving the first process into a new cgroup (runc does it for CRIU at every restore: the
 *   container's cgroups are made afresh) takes cgroup_threadgroup_rwsem for writing, which waits
 *   a grace period: 6–16 ms, then ~0.05 ms. The cgroup2 mount option `favordynmods` keeps that
 *   lock in its writer-friendly mode (forks and exits pay a little instead; kernel >= 6.0). It is
 *   per host, not per mount namespace: favorDynmods() remounts the host's cgroup2 with it.
 * - CRIU mounts every cgroup hierarchy afresh in a "yard" of its own before restoring a tree:
 *   the cgroup2 mount alone took 10–21 ms. Given `cgroup-yard DIR` it uses the mounts in DIR
 *   instead; criuCgroupYard() says whether the host's own /sys/fs/cgroup is laid out the way
 *   CRIU names them.
 */

/** A cgroup or cgroup2 mount. */
export type CgroupMount = MountEntry & { fstype: 'cgroup' | 'cgroup2' };

/** The cgroup and cgroup2 mounts in a mountinfo text. */
export function parseCgroupMounts(mountinfo: string): CgroupMount[] {
  return parseMountinfo(mountinfo).filter((m): m is CgroupMount => m.fstype === 'cgroup' || m.fstype === 'cgroup2');
}

/**
 * The directory CRIU names each hierarchy of /proc/self/cgroup by in its yard (criu/cgroup.c):
 * the controllers as the kernel lists them (`cpu,cpuacct`), a named hierarchy by its name
 * (`name=systemd` → `systemd`), the cgroup2 hierarchy `unified`.
 */
export function criuYardNames(procCgroup: string): string[] {
  const names: string[] = [];
  for (const line of procCgroup.split('\n')) {
    const m = /^\d+:([^:]*):/.exec(line);
    if (!m) continue;
    names.push(m[1] === '' ? 'unified' : m[1]!.split(',').map((c) => c.replace(/^name=/, '')).join(','));
  }
  return names;
}

/**
 * `dir` when every hierarchy a process here is in is mounted whole at dir/NAME (NAME as CRIU
 * names it), so that CRIU can use dir as its cgroup yard; else undefined (CRIU mounts its own).
 * Debian's hybrid layout qualifies (/sys/fs/cgroup/{cpu,memory,…,systemd,unified}); a pure
 * cgroup2 host does not (its hierarchy is /sys/fs/cgroup itself, not …/unified).
 */
export function criuCgroupYard(mounts: readonly CgroupMount[], procCgroup: string, dir = '/sys/fs/cgroup'): string | undefined {
  const names = criuYardNames(procCgroup);
  if (names.length === 0) return undefined;
  const whole = new Set(mounts.filter((m) => m.root === '/').map((m) => m.mountpoint));
  return names.every((n) => whole.has(path.join(dir, n))) ? dir : undefined;
}

/** What favorDynmods() found or did. */
export type FavorDynmods =
  | { state: 'on' | 'set'; mountpoint: string }
  | { state: 'none' }
  | { state: 'failed'; mountpoint: string; reason: string };

/**
 * Remounts the host's cgroup2 hierarchy with `favordynmods` unless it has it (see above). The
 * remount names the superblock's options it has now, so that none is dropped (a cgroup2 remount
 * clears the flags it is not given, nsdelegate among them). The option is the host's: it stays
 * after the worker exits, and a reboot clears it.
 */
export async function favorDynmods(mounts: readonly CgroupMount[] = readCgroupMounts()): Promise<FavorDynmods> {
  const v2 = cgroup2Root(mounts);
  if (!v2) return { state: 'none' };
  if (v2.superOptions.includes('favordynmods')) return { state: 'on', mountpoint: v2.mountpoint };
  const r = await run('mount', ['-o', ['remount', ...v2.superOptions, 'favordynmods'].join(','), v2.mountpoint], { timeoutMs: 10_000 });
  if (!succeeded(r)) return { state: 'failed', mountpoint: v2.mountpoint, reason: failureReason(r) };
  return { state: 'set', mountpoint: v2.mountpoint };
}

/** The mount of the whole cgroup2 hierarchy, if the host has one. */
export function cgroup2Root(mounts: readonly CgroupMount[]): CgroupMount | undefined {
  return mounts.find((m) => m.fstype === 'cgroup2' && m.root === '/');
}

export function readCgroupMounts(): CgroupMount[] {
  return parseCgroupMounts(readFileSync('/proc/self/mountinfo', 'utf8'));
}

/** criuCgroupYard() of this host; undefined when its cgroups cannot be read. */
export function hostCgroupYard(): string | undefined {
  try {
    return criuCgroupYard(readCgroupMounts(), readFileSync('/proc/self/cgroup', 'utf8'));
  } catch {
    return undefined;
  }
}

/**
 * What a worker's runtime does about the host's cgroups at start: favorDynmods() unless told
 * not to (a failure is logged, never fatal: restores are only slower), and the yard CRIU can use.
 */
export async function tuneCgroups(o: { favorDynmods?: boolean; log: Logger }): Promise<{ yard: string | undefined; favorDynmods: FavorDynmods['state'] | 'off' }> {
  let favor: FavorDynmods['state'] | 'off' = 'off';
  if (o.favorDynmods ?? true) {
    const f = await favorDynmods().catch((err: unknown): FavorDynmods => ({ state: 'failed', mountpoint: '?', reason: (err as Error).message }));
    if (f.state === 'failed') o.log.warn({ mountpoint: f.mountpoint, reason: f.reason }, 'cannot remount cgroup2 with favordynmods: each restore waits ~10 ms more to move CRIU into its cgroups');
    else if (f.state === 'set') o.log.info({ mountpoint: f.mountpoint }, 'remounted cgroup2 with favordynmods (until the host reboots): moving a process into a new cgroup no longer waits for an RCU grace period');
    favor = f.state;
  }
  return { yard: hostCgroupYard(), favorDynmods: favor };
}
