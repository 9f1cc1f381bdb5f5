import assert from 'node:assert/strict';
import { chmodSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, readlinkSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { run } from '../worker/oci/exec.js';
import { checkHost } from '../worker/oci/host-check.js';
import { ensureKdatCache, KDAT_LINK } from '../worker/oci/kdat.js';

/*
 * CRIU's kernel probe cache on a host whose /run is not a tmpfs (worker/oci/kdat.ts): made once
 * in a private mount namespace, kept on /dev/shm, reached through a symlink at /run/criu.kdat —
 * and criu really loads it.
 */

const root = process.getuid?.() === 0;
const skip = root ? false : 'needs root: criu and mount namespaces';

describe('oci: CRIU kernel probe cache', { skip, timeout: 60_000 }, () => {
  const work = root ? mkdtempSync(path.join(tmpdir(), 'pico-kdat-')) : '';
  const shm = `/dev/shm/pico-kdat-test-${process.pid}`;
  after(() => {
    if (work) rmSync(work, { recursive: true, force: true });
    rmSync(shm, { recursive: true, force: true });
    rmSync(`${shm}-open`, { recursive: true, force: true });
  });

  it('is made through a symlink to a root-only directory on a tmpfs, then found in place', async () => {
    const host = await checkHost();
    assert.ok(host.criu, host.message);
    const link = path.join(work, 'criu.kdat'); // a disk directory standing in for /run
    const first = await ensureKdatCache(host.criu.path, { link, dir: shm });
    assert.equal(first.state, 'made', first.reason);
    assert.equal(readlinkSync(link), path.join(shm, 'criu.kdat'));
    const st = statSync(path.join(shm, 'criu.kdat'));
    assert.ok(st.size > 0);
    assert.equal(st.mode & 0o777, 0o600);
    assert.equal(lstatSync(shm).mode & 0o777, 0o700);
    assert.deepEqual(await ensureKdatCache(host.criu.path, { link, dir: shm }), { state: 'ready' });
    // A dangling link (what a reboot leaves: /dev/shm is emptied) is made again.
    rmSync(path.join(shm, 'criu.kdat'));
    assert.equal((await ensureKdatCache(host.criu.path, { link, dir: shm })).state, 'made');
    // Where /run is a tmpfs, criu keeps its own cache.
    assert.deepEqual(await ensureKdatCache(host.criu.path, { link, dir: shm, runDir: '/dev/shm' }), { state: 'native' });
  });

  it('is not trusted in a directory others can write to', async () => {
    const dir = `${shm}-open`;
    mkdirSync(dir);
    chmodSync(dir, 0o777);
    const k = await ensureKdatCache('/nonexistent/criu', { link: path.join(work, 'other.kdat'), dir });
    assert.equal(k.state, 'unavailable');
    assert.match(k.reason ?? '', /only root can write/);
  });

  it('criu loads the cache at /run/criu.kdat', async () => {
    const host = await checkHost();
    const k = await ensureKdatCache(host.criu!.path);
    assert.ok(['made', 'ready', 'native'].includes(k.state), `${k.state}: ${k.reason}`);
    const logFile = path.join(work, 'check.log');
    await run(host.criu!.path, ['check', '-v4', '-o', logFile], { timeoutMs: 30_000 });
    assert.match(readFileSync(logFile, 'utf8'), new RegExp(`Loaded kdat cache from ${KDAT_LINK}`));
  });
});
