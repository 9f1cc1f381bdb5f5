import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import { deflateRawSync, inflateRawSync } from 'node:zlib';
import { ActiveSetStore } from '../pagestore/activeset.js';
import { sha256 } from '../pagestore/chunked-image-store.js';
import { MemoryObjectStore } from '../pagestore/memory-store.js';
import { decodeRestorePack, encodeRestorePack, packFor, restorePackKey } from '../pagestore/restore-pack.js';

/*
 * Restore packs: what a restore prefetches, in one object. Advice only: the reader takes a chunk
 * only when the image names it and its bytes hash right.
 */

const chunk = (text: string) => ({ hash: sha256(Buffer.from(text)), bytes: Buffer.from(text) });
const a = chunk('first chunk');
const b = chunk('second, longer chunk of bytes');
const empty = chunk('');
const image = { checksum: 'c'.repeat(64) };
const other = { checksum: 'd'.repeat(64) };
const run1 = { file: 'pages-1.img', offset: 8192, bytes: Buffer.alloc(4096, 1) };
const run2 = { file: 'pages-1.img', offset: 40960, bytes: Buffer.alloc(8192, 2) };
/** The same pack in format 2: its body uncompressed. */
function plain(buf: Buffer): Buffer {
  const indexEnd = 16 + buf.readUInt32LE(12);
  const head = Buffer.from(buf.subarray(0, indexEnd));
  head.writeUInt32LE(2, 4);
  return Buffer.concat([head, inflateRawSync(buf.subarray(indexEnd))]);
}
const pack = (chunks: Array<{ hash: string; bytes: Buffer }>, runs = [run1, run2]) => ({ manifest: image.checksum, chunks, runs });

describe('restore pack', () => {
  it('round-trips the chunks the reader may use, in order, and nothing else, and the runs', async () => {
    const buf = await encodeRestorePack(7, pack([a, b, empty]));
    const all = await decodeRestorePack(buf, image, new Set([a.hash, b.hash, empty.hash]));
    assert.equal(all.generation, 7);
    assert.equal(all.current, true);
    assert.deepEqual(all.chunks.map((c) => c.bytes.toString()), ['first chunk', 'second, longer chunk of bytes', '']);
    assert.deepEqual(all.runs.map((r) => [r.file, r.offset, r.bytes.length, r.bytes[0]]), [['pages-1.img', 8192, 4096, 1], ['pages-1.img', 40960, 8192, 2]]);
    assert.equal(all.bad, 0);
    assert.deepEqual((await decodeRestorePack(buf, image, new Set([b.hash]))).chunks.map((c) => c.hash), [b.hash], 'chunks this image does not name are left');
  });

  it('runs are for the image they were cut from only; its chunks still serve any image naming them', async () => {
    const r = await decodeRestorePack(await encodeRestorePack(7, pack([a])), other, new Set([a.hash]));
    assert.equal(r.current, false);
    assert.deepEqual(r.runs, []);
    assert.deepEqual(r.chunks.map((c) => c.hash), [a.hash]);
  });

  it('a damaged chunk or run is dropped and counted; the others stay usable (format 2: the body as it is)', async () => {
    const buf = plain(await encodeRestorePack(1, pack([a, b], [run1])));
    buf[buf.length - 4097]! ^= 0xff; // the last byte of b
    buf[buf.length - 1]! ^= 0xff; // run1
    const r = await decodeRestorePack(buf, image, new Set([a.hash, b.hash]));
    assert.deepEqual(r.chunks.map((c) => c.hash), [a.hash]);
    assert.deepEqual(r.runs, []);
    assert.equal(r.bad, 2);
  });

  it('a frame that is not a pack is refused with a reason', async () => {
    const buf = await encodeRestorePack(1, pack([a, b]));
    const wanted = new Set([a.hash]);
    await assert.rejects(() => decodeRestorePack(Buffer.from('garbage'), image, wanted), /bad magic/);
    await assert.rejects(() => decodeRestorePack(buf.subarray(0, buf.length - 1), image, wanted), /does not inflate/);
    await assert.rejects(() => decodeRestorePack(plain(buf).subarray(0, plain(buf).length - 1), image, wanted), /holds/);
    const damaged = Buffer.from(buf);
    damaged[damaged.length - 3]! ^= 0xff;
    await assert.rejects(() => decodeRestorePack(damaged, image, wanted), /restore pack: the (body|index names)/);
    // A body that inflates to more than its index names (a pack written to exhaust memory).
    const bomb = Buffer.from(buf.subarray(0, 16 + buf.readUInt32LE(12)));
    await assert.rejects(() => decodeRestorePack(Buffer.concat([bomb, deflateRawSync(Buffer.alloc(64 * 1024 * 1024))]), image, wanted), /inflates to more than/);
    const future = Buffer.from(buf);
    future.writeUInt32LE(99, 4);
    await assert.rejects(() => decodeRestorePack(future, image, wanted), /format 99/);
    const longIndex = Buffer.from(buf);
    longIndex.writeUInt32LE(buf.length, 12);
    await assert.rejects(() => decodeRestorePack(longIndex, image, wanted), /runs past the end/);
    const index = (json: string) => {
      const body = Buffer.from(json);
      const head = Buffer.from(buf.subarray(0, 16));
      head.writeUInt32LE(body.length, 12);
      return Buffer.concat([head, body]);
    };
    await assert.rejects(() => decodeRestorePack(index('{"manifest":"x","chunks":[],"runs":[["pages-1.img",-1,0,"' + 'a'.repeat(64) + '"]]}'), image, wanted), /malformed/);
    await assert.rejects(() => decodeRestorePack(index('[]'), image, wanted), /malformed/, 'a format-1 index');
    await assert.rejects(() => decodeRestorePack(index('{'), image, wanted), /not JSON/);
    await assert.rejects(() => decodeRestorePack(index(`{"manifest":"x","chunks":[["${a.hash}",${2 ** 31}]],"runs":[]}`), image, wanted), /more than a pack may hold/);
  });

  it('decodes from its bytes as they arrive, piece by piece, as from the whole; a stream that breaks or ends short is refused', async () => {
    const heap = randomBytes(40 * 1024);
    const buf = await encodeRestorePack(7, pack([a, b], [run1, { file: 'pages-1.img', offset: 65536, bytes: heap }]));
    async function* pieces(bytes: Buffer, size: number, fail?: Error): AsyncIterable<Buffer> {
      for (let at = 0; at < bytes.length; at += size) {
        await new Promise((resolve) => setImmediate(resolve));
        yield bytes.subarray(at, at + size);
      }
      if (fail) throw fail;
    }
    const wanted = new Set([a.hash, b.hash]);
    const whole = await decodeRestorePack(buf, image, wanted);
    for (const [name, bytes] of [['format 3', buf], ['format 2', plain(buf)]] as const) {
      for (const size of [7, 1000, 64 * 1024]) {
        const got = await decodeRestorePack(pieces(bytes, size), image, wanted);
        assert.deepEqual(got.chunks.map((c) => c.hash), whole.chunks.map((c) => c.hash), `${name}, pieces of ${size}`);
        assert.deepEqual(got.runs.map((r) => [r.offset, sha256(r.bytes)]), whole.runs.map((r) => [r.offset, sha256(r.bytes)]), `${name}, pieces of ${size}`);
        assert.equal(got.bad, 0);
      }
    }
    assert.ok(whole.runs[1]?.bytes.equals(heap));
    await assert.rejects(() => decodeRestorePack(pieces(buf, 1000, new Error('socket hang up')), image, wanted), /socket hang up/);
    await assert.rejects(() => decodeRestorePack(pieces(buf.subarray(0, buf.length - 100), 1000), image, wanted), /does not inflate/);
    await assert.rejects(() => decodeRestorePack(pieces(buf.subarray(0, 10), 3), image, wanted), /truncated in its header/);
    await assert.rejects(() => decodeRestorePack(pieces(Buffer.concat([plain(buf), Buffer.from('x')]), 999), image, wanted), /holds more/);
  });

  it('compresses its body: pages of a heap take a fraction of their size', async () => {
    const heapish = Buffer.alloc(64 * 4096);
    for (let i = 0; i < heapish.length; i += 16) heapish.writeUInt32LE(0x2a000000 + ((i * 2654435761) % 4096), i); // pointers into one region, zeros between
    const buf = await encodeRestorePack(1, pack([], [{ file: 'pages-1.img', offset: 0, bytes: heapish }]));
    assert.ok(buf.length < heapish.length / 4, `${buf.length} bytes for ${heapish.length}`);
    const r = await decodeRestorePack(buf, image, new Set());
    assert.ok(r.runs[0]?.bytes.equals(heapish));
  });

  it('is kept per app, replaced by the next one, and absent until written', async () => {
    const objects = new MemoryObjectStore();
    const sets = new ActiveSetStore(objects);
    assert.equal(await sets.readPack('kv'), undefined);
    await sets.putPack('kv', 'restore', 1, pack([a]));
    await sets.putPack('kv', 'restore', 2, pack([b]));
    const got = packFor((await sets.readPack('kv'))!, image, new Set([a.hash, b.hash]));
    assert.equal(got.generation, 2);
    assert.deepEqual(got.chunks.map((c) => c.hash), [b.hash]);
    assert.ok(await objects.get(restorePackKey('kv')));
    assert.equal(await sets.readPack('kv', 'activeset'), undefined, 'the other part is an object of its own');
    await sets.putPack('kv', 'activeset', 2, pack([], [run2]));
    const packs = sets.readPacks('kv');
    assert.equal(packFor((await packs.activeset)!, image, new Set()).runs[0]?.offset, run2.offset);
    assert.equal(packFor((await packs.restore)!, image, new Set()).runs.length, 2);
    await objects.put(restorePackKey('kv', 'heads'), Buffer.from('not a pack'));
    await assert.rejects(sets.readPack('kv', 'heads'), /bad magic/, 'a pack that is not one rejects: its part goes chunk by chunk');
    assert.notEqual(restorePackKey('kv', 'activeset'), restorePackKey('kv', 'restore'));
  });
});
