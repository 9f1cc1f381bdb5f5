import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { silentLogger } from '../shared/log.js';
import { expediteRcu, RCU_EXPEDITED, RCU_NORMAL, rcuExpeditedNote, tuneRcu } from '../worker/oci/rcu-host.js';

/*
 * The kernel's rcu_expedited as the restore path meets it (worker/oci/rcu-host.ts): set when it
 * is not, left alone when it is, and reported when rcu_normal overrides it or it cannot be set.
 */

const work = mkdtempSync(path.join(tmpdir(), 'pico-rcu-'));
after(() => rmSync(work, { recursive: true, force: true }));

/** A stand-in for /sys/kernel's two files; undefined: the file is missing. */
function sysfs(name: string, expedited: string | undefined, normal: string | undefined): { expedited: string; normal: string } {
  const dir = path.join(work, name);
  mkdirSync(dir);
  const files = { expedited: path.join(dir, 'rcu_expedited'), normal: path.join(dir, 'rcu_normal') };
  if (expedited !== undefined) writeFileSync(files.expedited, expedited);
  if (normal !== undefined) writeFileSync(files.normal, normal);
  return files;
}

describe('oci: rcu_expedited', () => {
  it('is set when it is 0, and left alone when it is set', () => {
    const off = sysfs('off', '0\n', '0\n');
    assert.deepEqual(expediteRcu(off), { state: 'set' });
    assert.equal(readFileSync(off.expedited, 'utf8'), '1\n');
    assert.equal(rcuExpeditedNote(off.expedited), 'on');
    assert.deepEqual(expediteRcu(off), { state: 'on' });
    assert.deepEqual(expediteRcu(sysfs('counted', '2\n', undefined)), { state: 'on' }, 'any non-zero value is on; rcu_normal may be missing');
  });

  it('says when it cannot be had: no such file, rcu_normal set, a file it cannot read', () => {
    const none = sysfs('none', undefined, undefined);
    assert.deepEqual(expediteRcu(none), { state: 'none' });
    assert.equal(rcuExpeditedNote(none.expedited), 'n/a');
    const normal = sysfs('normal', '0\n', '1\n');
    assert.deepEqual(expediteRcu(normal), { state: 'overridden' });
    assert.equal(readFileSync(normal.expedited, 'utf8'), '0\n', 'not written: it would change nothing');
    const dir = sysfs('dir', undefined, '0\n');
    mkdirSync(dir.expedited);
    const r = expediteRcu(dir);
    assert.equal(r.state, 'failed');
    assert.match((r as { reason: string }).reason, /EISDIR/);
  });

  it('tuneRcu does nothing when told not to', () => {
    assert.equal(tuneRcu({ rcuExpedited: false, log: silentLogger() }), 'off');
  });
});

const skip =
  process.getuid?.() !== 0 ? "needs root: writes the host's /sys/kernel/rcu_expedited"
  : !existsSync(RCU_EXPEDITED) ? `this kernel has no ${RCU_EXPEDITED}`
  : existsSync(RCU_NORMAL) && readFileSync(RCU_NORMAL, 'utf8').trim() !== '0' ? `${RCU_NORMAL} is set on this host: rcu_expedited would change nothing`
  : false;

describe("oci: rcu_expedited on this host", { skip }, () => {
  it('tuneRcu sets it, and the kernel reads it back', () => {
    // Cleared first, so that the write is what is tested; it is left set, as a worker leaves it.
    writeFileSync(RCU_EXPEDITED, '0\n');
    assert.equal(rcuExpeditedNote(), 'off');
    const state = tuneRcu({ log: silentLogger() });
    assert.equal(state, 'set');
    assert.equal(rcuExpeditedNote(), 'on');
    assert.equal(tuneRcu({ log: silentLogger() }), 'on');
  });
});
