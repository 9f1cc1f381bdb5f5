import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { LAZY_PAGES_SOCKET } from '../worker/oci/lazy-pages.js';
import { LazyRelay } from '../worker/oci/lazy-relay.js';
import { until } from './helpers/poll.js';

/*
 * The lazy-pages relay (worker/oci/lazy-relay.py, real python3) between a stand-in for
 * `criu restore` and one for `criu lazy-pages`, over real Unix sockets: it waits for a daemon
 * that is still starting, forwards what the restore sends, and holds "restore finished" back
 * until released.
 */

const FIN = Buffer.alloc(4);
FIN.writeUInt32LE(0x52535446);
const work = mkdtempSync(path.join(tmpdir(), 'pico-relay-'));
after(() => rmSync(work, { recursive: true, force: true }));

describe('lazy-pages relay', { skip: LazyRelay.available() ? undefined : 'needs python3 (install-oci.sh installs it)' }, () => {
  it('lets the restore connect before the daemon listens, forwards its bytes, and holds the marker until released', async () => {
    const restoreWork = path.join(work, 'restore');
    const daemonWork = path.join(restoreWork, 'daemon');
    mkdirSync(daemonWork, { recursive: true });
    const relay = await LazyRelay.start(restoreWork, daemonWork);
    // The restore connects and sends a pid, then the marker, and closes: no daemon yet.
    const restore = net.connect(path.join(restoreWork, LAZY_PAGES_SOCKET));
    await new Promise<void>((resolve, reject) => restore.once('connect', resolve).once('error', reject));
    const pid = Buffer.alloc(4);
    pid.writeUInt32LE(4242);
    restore.end(Buffer.concat([pid, FIN]));
    await new Promise((r) => setTimeout(r, 150));
    // The daemon comes up late; the relay connects to it then.
    let got = Buffer.alloc(0);
    let ended = false;
    const daemon = net.createServer((c) => {
      c.on('data', (d: Buffer) => (got = Buffer.concat([got, d])));
      c.on('end', () => (ended = true));
    });
    await new Promise<void>((resolve) => daemon.listen(path.join(daemonWork, LAZY_PAGES_SOCKET), resolve));
    try {
      await until(() => got.length >= 4, 'the pid to reach the daemon', 10_000);
      await new Promise((r) => setTimeout(r, 100));
      assert.deepEqual(got, pid, 'the marker is held back');
      assert.equal(ended, false);
      relay.release();
      await until(() => ended, 'the relay to pass the marker and close', 10_000);
      assert.deepEqual(got, Buffer.concat([pid, FIN]));
      assert.equal(await relay.failure(), null);
    } finally {
      relay.kill();
      daemon.close();
    }
  });
});
