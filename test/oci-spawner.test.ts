import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { python3 } from '../worker/oci/lazy-relay.js';
import { spawnDetached, spawnerPid, warmSpawner } from '../worker/oci/spawner.js';
import { until } from './helpers/poll.js';

/*
 * The spawner (worker/oci/spawner.py on the real python3) starts detached children for the
 * worker and reports their PIDs and exits; when it is gone, the children it started are watched
 * until they are gone, and the next start brings a new spawner.
 */

const work = mkdtempSync(path.join(tmpdir(), 'pico-spawner-'));
// The children's exits do not hold the event loop (as detached children's would not): this does.
const hold = setInterval(() => undefined, 1000);
after(() => {
  clearInterval(hold);
  rmSync(work, { recursive: true, force: true });
});

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

describe('spawner', { skip: python3() ? undefined : 'needs python3 (install-oci.sh installs it)' }, () => {
  it('starts a child in its own session on /dev/null, and reports its exit code or signal', async () => {
    warmSpawner();
    const out = path.join(work, 'seen');
    const child = await spawnDetached('/bin/sh', ['-c', `echo "$$ $(ps -o sid= -p $$) $(readlink /proc/self/fd/0) $(readlink /proc/$$/fd/1)" > ${out}; exit 3`]);
    assert.notEqual(child.pid, spawnerPid(), 'not the spawner itself');
    assert.deepEqual(await child.exit, { code: 3, signal: null });
    const [pid, sid, stdin, stdout] = readFileSync(out, 'utf8').trim().split(/\s+/);
    assert.equal(Number(pid), child.pid);
    assert.equal(Number(sid), child.pid, 'a session of its own');
    assert.deepEqual([stdin, stdout], ['/dev/null', '/dev/null']);
    const killed = await spawnDetached('/bin/sh', ['-c', 'kill -TERM $$; sleep 5']);
    assert.deepEqual(await killed.exit, { code: null, signal: 'SIGTERM' });
  });

  it('a child that exits at once is still reported, and many at once each get their own exit', async () => {
    const children = await Promise.all(Array.from({ length: 20 }, (_, i) => spawnDetached('/bin/sh', ['-c', `exit ${i}`])));
    assert.deepEqual(
      await Promise.all(children.map((c) => c.exit)),
      children.map((_, i) => ({ code: i, signal: null })),
    );
  });

  it('a file that cannot be started rejects, naming it', async () => {
    await assert.rejects(spawnDetached(path.join(work, 'no-such-program'), []), /no-such-program/);
  });

  it('the spawner gone: its running children are watched until they are gone, and the next start brings a new spawner', async () => {
    const child = await spawnDetached('/bin/sleep', ['30']);
    const first = spawnerPid()!;
    process.kill(first, 'SIGKILL');
    await until(() => spawnerPid() === undefined, 'the spawner noticed gone');
    assert.equal(alive(child.pid), true, 'the child runs on');
    process.kill(child.pid, 'SIGKILL');
    assert.deepEqual(await child.exit, { code: null, signal: null }, 'gone, its status unknown');
    const next = await spawnDetached('/bin/true', []);
    assert.notEqual(spawnerPid(), first);
    assert.deepEqual(await next.exit, { code: 0, signal: null });
  });
});
