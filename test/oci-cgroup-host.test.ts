import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { describe, it } from 'node:test';
import { cgroup2Root, criuCgroupYard, criuYardNames, favorDynmods, parseCgroupMounts, readCgroupMounts } from '../worker/oci/cgroup-host.js';
import { run } from '../worker/oci/exec.js';

/*
 * The host's cgroup mounts as the restore path meets them (worker/oci/cgroup-host.ts): which
 * directory CRIU can take as its cgroup yard, and the favordynmods remount.
 */

/** Debian 12's hybrid layout, as this project's CI host has it (one hierarchy per controller). */
const HYBRID_MOUNTINFO = `22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate`;
const HYBRID_CGROUP = `5:name=systemd:/
4:memory:/process_api/af75
3:cpuset:/
2:cpu,cpuacct:/
0::/`;

/** systemd's pure cgroup2 layout. */
const V2_MOUNTINFO = `22 1 0:21 / / rw,relatime - ext4 /dev/vda rw
30 23 0:27 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot`;
const V2_CGROUP = '0::/user.slice/user-0.slice/session-1.scope\n';

describe('oci: the host\'s cgroup mounts (no root needed)', () => {
  it('names each hierarchy as CRIU names its yard directories', () => {
    assert.deepEqual(criuYardNames(HYBRID_CGROUP), ['systemd', 'memory', 'cpuset', 'cpu,cpuacct', 'unified']);
    assert.deepEqual(criuYardNames(V2_CGROUP), ['unified']);
    assert.deepEqual(criuYardNames(''), []);
  });

  it('parses the cgroup mounts of a mountinfo, with their superblock options and escaped paths', () => {
    const m = parseCgroupMounts(HYBRID_MOUNTINFO);
    assert.deepEqual(m.map((x) => x.mountpoint), ['/sys/fs/cgroup/cpu,cpuacct', '/sys/fs/cgroup/cpuset', '/sys/fs/cgroup/memory', '/sys/fs/cgroup/systemd', '/sys/fs/cgroup/unified']);
    assert.deepEqual(m.at(-1), { root: '/', mountpoint: '/sys/fs/cgroup/unified', fstype: 'cgroup2', superOptions: ['rw', 'nsdelegate'] });
    assert.deepEqual(parseCgroupMounts(V2_MOUNTINFO)[0]!.superOptions, ['rw', 'nsdelegate', 'memory_recursiveprot']);
    const escaped = parseCgroupMounts('50 1 0:40 / /srv/cg\\040yard/unified rw - cgroup2 cgroup2 rw');
    assert.equal(escaped[0]!.mountpoint, '/srv/cg yard/unified');
  });

  it('takes /sys/fs/cgroup as the yard only when every hierarchy is mounted whole where CRIU looks', () => {
    assert.equal(criuCgroupYard(parseCgroupMounts(HYBRID_MOUNTINFO), HYBRID_CGROUP), '/sys/fs/cgroup');
    // Pure cgroup2: the hierarchy is /sys/fs/cgroup itself, CRIU would look in /sys/fs/cgroup/unified.
    assert.equal(criuCgroupYard(parseCgroupMounts(V2_MOUNTINFO), V2_CGROUP), undefined);
    // A hierarchy the process is in but that is not mounted there.
    const noUnified = HYBRID_MOUNTINFO.split('\n').filter((l) => !l.includes('unified')).join('\n');
    assert.equal(criuCgroupYard(parseCgroupMounts(noUnified), HYBRID_CGROUP), undefined);
    // Mounted, but only a part of the hierarchy (a bind of a subdirectory).
    const partial = HYBRID_MOUNTINFO.replace('0:32 / /sys/fs/cgroup/memory', '0:32 /picocenter /sys/fs/cgroup/memory');
    assert.equal(criuCgroupYard(parseCgroupMounts(partial), HYBRID_CGROUP), undefined);
    // Nothing known: no yard.
    assert.equal(criuCgroupYard([], ''), undefined);
  });

  it('favorDynmods leaves a cgroup2 that has it alone, and does nothing without cgroup2', async () => {
    const on = parseCgroupMounts(HYBRID_MOUNTINFO.replace('rw,nsdelegate', 'rw,nsdelegate,favordynmods'));
    assert.deepEqual(await favorDynmods(on), { state: 'on', mountpoint: '/sys/fs/cgroup/unified' });
    assert.deepEqual(await favorDynmods(parseCgroupMounts(HYBRID_MOUNTINFO).filter((m) => m.fstype === 'cgroup')), { state: 'none' });
  });
});

const v2 = existsSync('/proc/self/mountinfo') ? cgroup2Root(readCgroupMounts()) : undefined;
const skip = process.getuid?.() !== 0 ? 'needs root: remounts the host\'s cgroup2' : !v2 ? 'this host has no cgroup2 mount' : false;

describe('oci: favordynmods on the host\'s cgroup2', { skip }, () => {
  it('is set by a remount that keeps every other option of the superblock', async () => {
    const before = v2!.superOptions.filter((o) => o !== 'favordynmods');
    // Clear it first with mount(2) itself: mount(8) would carry the option over from mountinfo.
    // The kernel clears every cgroup2 flag a remount does not name, so `before` is named.
    const clear = await run('python3', ['-c', CLEAR, v2!.mountpoint, before.filter((o) => o !== 'rw' && o !== 'ro').join(',')]);
    assert.equal(clear.code, 0, clear.stderr);
    const cleared = readCgroupMounts().find((m) => m.mountpoint === v2!.mountpoint)!;
    assert.ok(!cleared.superOptions.includes('favordynmods'), cleared.superOptions.join(','));
    assert.deepEqual(await favorDynmods(), { state: 'set', mountpoint: v2!.mountpoint });
    const after = readCgroupMounts().find((m) => m.mountpoint === v2!.mountpoint)!;
    assert.deepEqual(after.superOptions, [...before, 'favordynmods']);
    assert.deepEqual(await favorDynmods(), { state: 'on', mountpoint: v2!.mountpoint });
  });
});

/** python3 -c CLEAR MOUNTPOINT OPTIONS: remount(2) a cgroup2 with exactly OPTIONS. */
const CLEAR = `import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.mount(b"none", sys.argv[1].encode(), b"cgroup2", 32, sys.argv[2].encode()) != 0:
    sys.exit("remount: " + os.strerror(ctypes.get_errno()))`;
