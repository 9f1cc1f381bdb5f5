import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { ActiveSetStore } from '../pagestore/activeset.js';
import { sha256 } from '../pagestore/chunked-image-store.js';
import { MemoryObjectStore } from '../pagestore/memory-store.js';
import { decodeRestorePack, encodeRestorePack, restorePackKey } from '../pagestore/restore-pack.js';

/*
 * Restore packs: what a restore prefetches, in one object. Advice only: the reader takes a chunk
 * only when the image names it and its bytes hash right.
 */

const chunk = (text: string) => ({ hash: sha256(Buffer.from(text)), bytes: Buffer.from(text) });
const a = chunk('first chunk');
const b = chunk('second, longer chunk of bytes');
const empty = chunk('');

describe('restore pack', () => {
  it('round-trips the chunks the reader may use, in order, and nothing else', () => {
    const pack = encodeRestorePack(7, [a, b, empty]);
    const all = decodeRestorePack(pack, new Set([a.hash, b.hash, empty.hash]));
    assert.equal(all.generation, 7);
    assert.deepEqual(all.chunks.map((c) => c.bytes.toString()), ['first chunk', 'second, longer chunk of bytes', '']);
    assert.equal(all.bad, 0);
    assert.deepEqual(decodeRestorePack(pack, new Set([b.hash])).chunks.map((c) => c.hash), [b.hash], 'chunks this image does not name are left');
  });

  it('a damaged chunk is dropped and counted; the others stay usable', () => {
    const pack = encodeRestorePack(1, [a, b]);
    pack[pack.length - 1]! ^= 0xff;
    const r = decodeRestorePack(pack, new Set([a.hash, b.hash]));
    assert.deepEqual(r.chunks.map((c) => c.hash), [a.hash]);
    assert.equal(r.bad, 1);
  });

  it('a frame that is not a pack is refused with a reason', () => {
    const pack = encodeRestorePack(1, [a, b]);
    const wanted = new Set([a.hash]);
    assert.throws(() => decodeRestorePack(Buffer.from('garbage'), wanted), /bad magic/);
    assert.throws(() => decodeRestorePack(pack.subarray(0, pack.length - 1), wanted), /holds/);
    const future = Buffer.from(pack);
    future.writeUInt32LE(99, 4);
    assert.throws(() => decodeRestorePack(future, wanted), /format 99/);
    const longIndex = Buffer.from(pack);
    longIndex.writeUInt32LE(pack.length, 12);
    assert.throws(() => decodeRestorePack(longIndex, wanted), /runs past the end/);
  });

  it('is kept per app, replaced by the next one, and absent until written', async () => {
    const objects = new MemoryObjectStore();
    const sets = new ActiveSetStore(objects);
    assert.equal(await sets.readPack('kv'), undefined);
    await sets.putPack('kv', 1, [a]);
    await sets.putPack('kv', 2, [b]);
    const got = decodeRestorePack((await sets.readPack('kv'))!, new Set([a.hash, b.hash]));
    assert.equal(got.generation, 2);
    assert.deepEqual(got.chunks.map((c) => c.hash), [b.hash]);
    assert.ok(await objects.get(restorePackKey('kv')));
  });
});
