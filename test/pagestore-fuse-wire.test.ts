import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import {
  errorReply,
  Frame,
  frame,
  FrameReader,
  header,
  MAX_PAYLOAD_BYTES,
  NO_SLOT,
  parseReadRequest,
  parseResident,
  placedReply,
  readRequest,
  residentFrame,
  WireError,
} from '../pagestore/fuse-wire.js';

// The frames between an image mount and its FUSE server (pagestore/fuse-wire.ts), cut from a
// byte stream however the socket happens to split it.

interface Got {
  type: number;
  id: number;
  payload: Buffer;
}

/** A stream of every kind of frame, and what a reader must make of it. */
function sample(): { bytes: Buffer; want: Got[] } {
  const big = Buffer.alloc(200_000);
  for (let i = 0; i < big.length; i++) big[i] = (i * 7) & 0xff;
  const hello = Buffer.from(JSON.stringify({ mountpoint: '/m', listing: null, window: null, resident: false }));
  const listing = Buffer.from(JSON.stringify({ mtimeMs: 0, files: [{ path: '/a.img', size: 1, mode: 0o600 }], dirs: [['/', ['a.img']]] }));
  const want: Got[] = [
    { type: Frame.HELLO, id: 1, payload: hello },
    { type: Frame.LISTING, id: 0, payload: listing },
    { type: Frame.READ, id: 7, payload: readRequest(7, 3, 2 ** 40 + 4096, 131_072, NO_SLOT).subarray(9) },
    { type: Frame.READY, id: 0, payload: Buffer.alloc(0) },
    { type: Frame.DATA, id: 7, payload: big },
    { type: Frame.PLACED, id: 0xffff_ffff, payload: placedReply(0xffff_ffff, 4096).subarray(9) },
    { type: Frame.ERROR, id: 8, payload: errorReply(8, -5).subarray(9) },
    { type: Frame.DATA, id: 9, payload: Buffer.alloc(0) },
  ];
  const bytes = Buffer.concat([
    frame(Frame.HELLO, 1, hello),
    frame(Frame.LISTING, 0, listing),
    readRequest(7, 3, 2 ** 40 + 4096, 131_072, NO_SLOT),
    frame(Frame.READY, 0),
    header(Frame.DATA, 7, big.length),
    big,
    placedReply(0xffff_ffff, 4096),
    errorReply(8, -5),
    header(Frame.DATA, 9, 0),
  ]);
  return { bytes, want };
}

/** The frames in `bytes`, pushed to a reader in pieces ending at `cuts`. */
function readAll(bytes: Buffer, cuts: number[]): Got[] {
  const got: Got[] = [];
  const reader = new FrameReader({ frame: (type, id, payload) => got.push({ type, id, payload: Buffer.from(payload) }) });
  let at = 0;
  for (const cut of [...cuts, bytes.length]) {
    reader.push(bytes.subarray(at, cut));
    at = cut;
  }
  assert.ok(reader.idle, 'the reader stopped inside a frame');
  return got;
}

describe('image mount wire (fuse-wire.ts)', () => {
  it('reads frames whole and split at every place: headers, small payloads, a 200 kB payload', () => {
    const { bytes, want } = sample();
    assert.deepEqual(readAll(bytes, []), want);
    // every cut through the small frames, and a spread of cuts through the big payload
    for (let cut = 1; cut < bytes.length; cut += cut < 400 || cut > bytes.length - 100 ? 1 : 997) {
      assert.deepEqual(readAll(bytes, [cut]), want, `cut at ${cut}`);
    }
    // one byte at a time
    assert.deepEqual(readAll(bytes, Array.from({ length: bytes.length - 1 }, (_, i) => i + 1)), want);
  });

  it('copies a payload into the buffer the sink names (as the server does with libfuse\'s)', () => {
    const { bytes, want } = sample();
    const into = Buffer.alloc(256 * 1024);
    let seen: Buffer | undefined;
    const got: Got[] = [];
    const reader = new FrameReader({
      target: (type, id) => (type === Frame.DATA && id === 7 ? into : undefined),
      frame: (type, id, payload) => {
        if (type === Frame.DATA && id === 7) seen = payload;
        got.push({ type, id, payload: Buffer.from(payload) });
      },
    });
    for (let at = 0; at < bytes.length; at += 65_536) reader.push(bytes.subarray(at, at + 65_536));
    assert.deepEqual(got, want);
    assert.equal(seen!.buffer, into.buffer, 'the payload was not put into the target');
    assert.ok(into.subarray(0, 200_000).equals(want[4]!.payload));
  });

  it('round-trips a READ', () => {
    assert.deepEqual(parseReadRequest(readRequest(5, 2, 2 ** 52, 4096, 15).subarray(9)), { file: 2, offset: 2 ** 52, length: 4096, slot: 15 });
    assert.throws(() => parseReadRequest(Buffer.alloc(3)), WireError);
  });

  it('round-trips a RESIDENT; refuses one of the wrong length or with offsets that are not whole', () => {
    const runs = [
      { file: 0, offset: 0, length: 4096, at: 0 },
      { file: 3, offset: 2 ** 40 + 4096, length: 0xffff_ffff, at: 2 ** 52 },
    ];
    const b = residentFrame(runs);
    assert.equal(b.readUInt32LE(0), b.length - 4);
    assert.equal(b.readUInt8(4), Frame.RESIDENT);
    assert.deepEqual(parseResident(b.subarray(9)), runs);
    assert.deepEqual(parseResident(residentFrame([]).subarray(9)), []);
    assert.throws(() => parseResident(b.subarray(9, b.length - 1)), WireError);
    assert.throws(() => parseResident(Buffer.alloc(2)), WireError);
    const fractional = residentFrame([{ file: 0, offset: 0.5, length: 1, at: 0 }]).subarray(9);
    assert.throws(() => parseResident(fractional), /resident run/);
    const negative = residentFrame([{ file: 0, offset: 0, length: 1, at: -4096 }]).subarray(9);
    assert.throws(() => parseResident(negative), /resident run/);
  });

  it('refuses a frame shorter than its header, longer than the limit, or larger than its target', () => {
    const short = Buffer.alloc(9);
    short.writeUInt32LE(4, 0);
    assert.throws(() => new FrameReader({ frame: () => {} }).push(short), WireError);
    assert.throws(() => new FrameReader({ frame: () => {} }).push(header(Frame.DATA, 1, MAX_PAYLOAD_BYTES + 1)), WireError);
    const reader = new FrameReader({ target: () => Buffer.alloc(10), frame: () => {} });
    assert.throws(() => reader.push(header(Frame.DATA, 1, 11)), WireError);
  });
});
