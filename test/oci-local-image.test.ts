import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import type { ImageManifest } from '../pagestore/image-store.js';
import { dropLocalImage, keepLocalImage, localImageGeneration, matchLocalImage, type LocalImagePaths } from '../worker/oci/local-image.js';

// The worker's local copy of an app's newest image (worker/oci/local-image.ts), without CRIU:
// made from a staging directory, matched against manifests, refused when damaged or stale.

const work = mkdtempSync(path.join(tmpdir(), 'pico-local-image-'));
after(() => rmSync(work, { recursive: true, force: true }));

const CHUNK = 1 << 20;

/** A staging directory of `files` (name → bytes) and the manifest a chunked store would write. */
function image(name: string, files: Record<string, Buffer>, generation = 1, chunkSize = CHUNK): { staging: string; manifest: ImageManifest } {
  const staging = path.join(work, name);
  mkdirSync(path.join(staging, 'sub'), { recursive: true });
  const list: ImageManifest['files'] = [];
  for (const [rel, data] of Object.entries(files)) {
    writeFileSync(path.join(staging, rel), data);
    const chunks: string[] = [];
    const step = chunkSize > 0 ? chunkSize : Math.max(data.length, 1);
    for (let o = 0; o < data.length; o += step) chunks.push(createHash('sha256').update(data.subarray(o, o + step)).digest('hex'));
    if (chunkSize === 0 && data.length === 0) chunks.push(createHash('sha256').update(data).digest('hex'));
    list.push({ path: rel, size: data.length, mode: 0o600, chunks });
  }
  return { staging, manifest: { format: 1, app: 'app', generation, createdAt: 'now', chunkSize, files: list, checksum: `sum-${name}-${generation}` } };
}

function paths(name: string): LocalImagePaths {
  return { dir: path.join(work, `${name}-local`), record: path.join(work, `${name}-local.json`) };
}

function flip(file: string, offset: number): void {
  const fd = openSync(file, 'r+');
  writeSync(fd, Buffer.from([0xa5]), 0, 1, offset);
  closeSync(fd);
}

describe('oci local images', () => {
  it('a kept image matches its manifest by size and by sha256, and no other manifest', async () => {
    const files = { 'pages-1.img': Buffer.alloc(3 * CHUNK + 5, 7), 'core-1.img': Buffer.from('core'), 'sub/empty.img': Buffer.alloc(0) };
    const { staging, manifest } = image('a', files);
    const p = paths('a');
    keepLocalImage(staging, p, manifest);
    assert.equal(existsSync(staging), false, 'renamed, not copied');
    assert.equal(localImageGeneration(p), 1);
    for (const check of ['size', 'sha256'] as const) assert.deepEqual(await matchLocalImage(p, manifest, check), { ok: true, bytes: 3 * CHUNK + 9 });
    const newer = { ...manifest, generation: 2, checksum: 'other' };
    assert.deepEqual(await matchLocalImage(p, newer, 'size'), { ok: false, why: 'the local image is generation 1, the newest stored one is 2' });
    assert.equal((await matchLocalImage(p, { ...manifest, checksum: 'same generation, another manifest' }, 'size')).ok, false);
    dropLocalImage(p);
    assert.equal(localImageGeneration(p), null);
    assert.equal(existsSync(p.dir), false);
  });

  it('refuses a file that is missing, truncated, flipped, or one the manifest does not list', async () => {
    const { staging, manifest } = image('b', { 'pages-1.img': Buffer.alloc(2 * CHUNK, 1), 'core-1.img': Buffer.from('core') });
    const p = paths('b');
    keepLocalImage(staging, p, manifest);
    flip(path.join(p.dir, 'pages-1.img'), CHUNK + 10);
    assert.equal((await matchLocalImage(p, manifest, 'size')).ok, true, 'a flipped byte keeps the size');
    assert.deepEqual(await matchLocalImage(p, manifest, 'sha256'), { ok: false, why: 'pages-1.img: chunk 1 fails its sha256' });
    truncateSync(path.join(p.dir, 'pages-1.img'), CHUNK);
    assert.deepEqual(await matchLocalImage(p, manifest, 'size'), { ok: false, why: `pages-1.img has ${CHUNK} bytes, the manifest says ${2 * CHUNK}` });
    rmSync(path.join(p.dir, 'pages-1.img'));
    assert.deepEqual(await matchLocalImage(p, manifest, 'size'), { ok: false, why: 'pages-1.img is missing' });
    writeFileSync(path.join(p.dir, 'pages-1.img'), Buffer.alloc(2 * CHUNK, 1));
    writeFileSync(path.join(p.dir, 'stray.img'), 'x');
    assert.deepEqual(await matchLocalImage(p, manifest, 'size'), { ok: false, why: 'files the manifest does not list: stray.img' });
  });

  it('hashes a big image in worker threads and still finds a flipped byte', async () => {
    const { staging, manifest } = image('big', { 'pages-1.img': Buffer.alloc(40 * CHUNK), 'pages-2.img': Buffer.alloc(40 * CHUNK, 3) });
    const p = paths('big');
    keepLocalImage(staging, p, manifest);
    assert.equal((await matchLocalImage(p, manifest, 'sha256')).ok, true);
    flip(path.join(p.dir, 'pages-2.img'), 37 * CHUNK + 1);
    assert.deepEqual(await matchLocalImage(p, manifest, 'sha256'), { ok: false, why: 'pages-2.img: chunk 37 fails its sha256' });
  });

  it('a store that keeps whole files (chunkSize 0) is one chunk per file', async () => {
    const { staging, manifest } = image('whole', { 'pages-1.img': Buffer.alloc(CHUNK + 1, 9) }, 1, 0);
    const p = paths('whole');
    keepLocalImage(staging, p, manifest);
    assert.equal((await matchLocalImage(p, manifest, 'sha256')).ok, true);
    flip(path.join(p.dir, 'pages-1.img'), CHUNK);
    assert.deepEqual(await matchLocalImage(p, manifest, 'sha256'), { ok: false, why: 'pages-1.img: chunk 0 fails its sha256' });
  });

  it('a format-2 image (content-defined chunk sizes) is checked chunk by chunk at its own offsets', async () => {
    const data = Buffer.alloc(3 * CHUNK + 5);
    for (let i = 0; i < data.length; i++) data[i] = (i * 2654435761) >>> 24;
    const sizes = [20 * 4096, 64 * 4096, 4 * 4096, data.length - 88 * 4096];
    const chunks: string[] = [];
    let at = 0;
    for (const n of sizes) chunks.push(createHash('sha256').update(data.subarray(at, (at += n))).digest('hex'));
    const staging = path.join(work, 'cdc');
    mkdirSync(staging);
    writeFileSync(path.join(staging, 'pages-1.img'), data);
    const manifest: ImageManifest = {
      format: 2,
      app: 'app',
      generation: 1,
      createdAt: 'now',
      chunking: { kind: 'pages', minPages: 4, avgPages: 16, maxPages: 64 },
      chunkSize: 64 * 4096,
      files: [{ path: 'pages-1.img', size: data.length, mode: 0o600, chunks, sizes }],
      checksum: 'sum-cdc',
    };
    const p = paths('cdc');
    keepLocalImage(staging, p, manifest);
    assert.deepEqual(await matchLocalImage(p, manifest, 'sha256'), { ok: true, bytes: data.length });
    flip(path.join(p.dir, 'pages-1.img'), 84 * 4096 + 3); // inside the third chunk (pages 84..87)
    assert.deepEqual(await matchLocalImage(p, manifest, 'sha256'), { ok: false, why: 'pages-1.img: chunk 2 fails its sha256' });
    // Sizes that do not add up to the file match nothing (and do not throw).
    const bad = { ...manifest, files: [{ ...manifest.files[0]!, sizes: [...sizes.slice(0, 3), 1] }] };
    assert.equal((await matchLocalImage(p, bad, 'sha256')).ok, false);
  });

  it('a directory without its record (a crash between rename and record) is junk, deleted', () => {
    const { staging, manifest } = image('junk', { 'core-1.img': Buffer.from('x') });
    const p = paths('junk');
    keepLocalImage(staging, p, manifest);
    rmSync(p.record);
    assert.equal(localImageGeneration(p), null);
    assert.equal(existsSync(p.dir), false);
  });
});
