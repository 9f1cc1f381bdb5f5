import assert from 'node:assert/strict';
import { lstatSync, mkdirSync, mkdtempSync, readdirSync, readlinkSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { run } from '../worker/oci/exec.js';
import { prepareHostDirs } from '../worker/oci/host-dirs.js';

// The host directories bundles bind instead of tmpfs mounts. mknod and mount need root; the
// containers that use them are test/oci-runtime.test.ts, oci-rootfs.test.ts and e2e-oci.test.ts.

const skip = process.getuid?.() === 0 ? false : 'needs root: mknod';

describe('oci host directories', { skip }, () => {
  const work = mkdtempSync(path.join(tmpdir(), 'pico-host-dirs-'));
  const nodev = path.join(work, 'nodev');
  after(async () => {
    await run('umount', [nodev]);
    rmSync(work, { recursive: true, force: true });
  });

  function devices(dev: string): Record<string, string> {
    const out: Record<string, string> = {};
    for (const name of readdirSync(dev).sort()) {
      const st = lstatSync(path.join(dev, name));
      if (st.isCharacterDevice()) out[name] = `c ${st.rdev >> 8}:${st.rdev & 0xff} ${(st.mode & 0o7777).toString(8)}`;
      else if (st.isSymbolicLink()) out[name] = `-> ${readlinkSync(path.join(dev, name))}`;
      else if (st.isDirectory()) out[name] = 'dir';
      else out[name] = 'other';
    }
    return out;
  }

  const expected = {
    fd: '-> /proc/self/fd',
    full: 'c 1:7 666',
    mqueue: 'dir',
    null: 'c 1:3 666',
    ptmx: '-> pts/ptmx',
    pts: 'dir',
    random: 'c 1:8 666',
    shm: '-> /tmp',
    stderr: '-> /proc/self/fd/2',
    stdin: '-> /proc/self/fd/0',
    stdout: '-> /proc/self/fd/1',
    tty: 'c 5:0 666',
    urandom: 'c 1:9 666',
    zero: 'c 1:5 666',
  };

  it('makes /dev with the host\'s device numbers, an empty directory and /run with only the log\'s mount point', async () => {
    const dirs = await prepareHostDirs(path.join(work, 'state'));
    assert.deepEqual(dirs, { dev: path.join(work, 'state', 'dev'), empty: path.join(work, 'state', 'empty'), run: path.join(work, 'state', 'run') });
    assert.deepEqual(devices(dirs.dev), expected);
    for (const name of ['null', 'zero', 'full', 'random', 'urandom', 'tty']) {
      assert.equal(statSync(path.join(dirs.dev, name)).rdev, statSync(path.join('/dev', name)).rdev, `/dev/${name}`);
    }
    assert.deepEqual(readdirSync(dirs.empty), []);
    assert.deepEqual(readdirSync(dirs.run), ['picocenter']);
    assert.deepEqual(readdirSync(path.join(dirs.run, 'picocenter')), []);
  });

  it('puts back what differs and removes what does not belong; leaves what is right alone', async () => {
    const dirs = await prepareHostDirs(path.join(work, 'state'));
    const zero = lstatSync(path.join(dirs.dev, 'zero'));
    rmSync(path.join(dirs.dev, 'null'));
    rmSync(path.join(dirs.dev, 'tty'));
    writeFileSync(path.join(dirs.dev, 'tty'), 'not a device');
    rmSync(path.join(dirs.dev, 'shm'));
    mkdirSync(path.join(dirs.dev, 'shm'));
    rmSync(path.join(dirs.dev, 'fd'));
    symlinkSync('/elsewhere', path.join(dirs.dev, 'fd'));
    writeFileSync(path.join(dirs.dev, 'stray'), '');
    writeFileSync(path.join(dirs.empty, 'stray'), '');
    mkdirSync(path.join(dirs.run, 'other'));
    await prepareHostDirs(path.join(work, 'state'));
    assert.deepEqual(devices(dirs.dev), expected);
    assert.equal(lstatSync(path.join(dirs.dev, 'zero')).ino, zero.ino, 'a right node is kept');
    assert.deepEqual(readdirSync(dirs.empty), []);
    assert.deepEqual(readdirSync(dirs.run), ['picocenter']);
  });

  it('refuses a state directory on a filesystem mounted nodev', async () => {
    mkdirSync(nodev);
    const r = await run('mount', ['-t', 'tmpfs', '-o', 'nodev,size=1m', 'tmpfs', nodev]);
    assert.equal(r.code, 0, r.stderr);
    await assert.rejects(prepareHostDirs(path.join(nodev, 'state')), /device nodes do not work in .*nodev\/state\/dev \(the filesystem of .*nodev\/state is mounted nodev\)/);
  });
});
