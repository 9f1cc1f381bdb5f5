import type { createHash } from 'node:crypto';
import { existsSync, readFileSync, renameSync, rmSync, writeFileSync, type closeSync, type openSync, type readSync } from 'node:fs';
import { open, readdir, stat } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { fileChunks, type ChunkRef, type ImageFile, type ImageManifest } from '../../pagestore/image-store.js';
import { sha256 } from '../../pagestore/chunked-image-store.js';

/*
 * The worker's local copy of an app's newest image: after the page store verified a checkpoint,
 * its staging dump is kept (renamed, not copied) instead of deleted, and the next restore of the
 * app reads it straight from disk instead of fetching the image back from the store — when the
 * newest verified manifest is still that image.
 *
 *   STATE/apps/APP/local/        the image files, exactly as the put read them
 *   STATE/apps/APP/local.json    { format, app, generation, checksum }: the manifest they are
 *                                (written after the rename: without it the directory is junk)
 *
 * Bounded: one image per app, and only while the app is stored — a restore attempt consumes it
 * (a failed one too: the next wake then fetches from the store), a stop deletes it, a newer
 * checkpoint replaces it. It survives a worker restart (it is under the state directory).
 *
 * Integrity: these are the very bytes the put hashed, uploaded and read back; what can happen to
 * them since is the local disk's doing (or root's). `size` checks that every file of the manifest
 * is there with its size and nothing else is (catches truncation and partial writes);
 * `sha256` also hashes every chunk against the manifest, as a fetch would (catches bit flips too,
 * at ~0.7 ms/MiB on these machines). A mismatch is never an error: the copy is deleted and the
 * image fetched.
 */

export type LocalImageCheck = 'size' | 'sha256';

interface LocalImageRecord {
  format: 1;
  app: string;
  generation: number;
  /** the manifest's checksum: the record names exactly one manifest */
  checksum: string;
}

export interface LocalImagePaths {
  dir: string;
  record: string;
}

/**
 * Makes `staging` (a stored, verified image of `manifest`) the app's local image, replacing the
 * previous one. On failure nothing half-made is left as a valid local image.
 */
export function keepLocalImage(staging: string, p: LocalImagePaths, manifest: ImageManifest): void {
  dropLocalImage(p);
  renameSync(staging, p.dir);
  const record: LocalImageRecord = { format: 1, app: manifest.app, generation: manifest.generation, checksum: manifest.checksum };
  const tmp = `${p.record}.tmp`;
  writeFileSync(tmp, `${JSON.stringify(record)}\n`);
  renameSync(tmp, p.record);
}

/** Deletes the local image (record first: a crash in between leaves junk, never a wrong image). */
export function dropLocalImage(p: LocalImagePaths): void {
  rmSync(p.record, { force: true });
  rmSync(`${p.record}.tmp`, { force: true });
  rmSync(p.dir, { recursive: true, force: true });
}

/** The generation of the local image, or null when there is none (junk is deleted). */
export function localImageGeneration(p: LocalImagePaths): number | null {
  const r = readRecord(p);
  if (!r) {
    if (existsSync(p.dir)) dropLocalImage(p);
    return null;
  }
  return r.generation;
}

export type LocalImageMatch = { ok: true; bytes: number } | { ok: false; why: string };

/**
 * Whether the local image is the image of `manifest`: the record names it, and the files pass
 * `check`. Rejects only on an unexpected I/O error; a mismatch is `{ ok: false, why }`.
 */
export async function matchLocalImage(p: LocalImagePaths, manifest: ImageManifest, check: LocalImageCheck): Promise<LocalImageMatch> {
  const r = readRecord(p);
  if (!r) return { ok: false, why: 'no local image' };
  if (r.app !== manifest.app || r.generation !== manifest.generation || r.checksum !== manifest.checksum) {
    return { ok: false, why: `the local image is generation ${r.generation}, the newest stored one is ${manifest.generation}` };
  }
  const present = new Map<string, number>();
  try {
    for (const rel of await walk(p.dir)) present.set(rel, (await stat(path.join(p.dir, rel))).size);
  } catch (err) {
    return { ok: false, why: `cannot list ${p.dir}: ${(err as Error).message}` };
  }
  let bytes = 0;
  for (const f of manifest.files) {
    const size = present.get(f.path);
    if (size === undefined) return { ok: false, why: `${f.path} is missing` };
    if (size !== f.size) return { ok: false, why: `${f.path} has ${size} bytes, the manifest says ${f.size}` };
    present.delete(f.path);
    bytes += size;
  }
  if (present.size > 0) return { ok: false, why: `files the manifest does not list: ${[...present.keys()].slice(0, 3).join(', ')}` };
  if (check === 'sha256') {
    const bad = await firstBadChunk(p.dir, manifest);
    if (bad) return { ok: false, why: bad };
  }
  return { ok: true, bytes };
}

/** One chunk to hash: a byte range of a file and the sha256 it must have. */
interface ChunkJob {
  file: string;
  rel: string;
  index: number;
  start: number;
  end: number;
  sha256: string;
}

/** Each hashing thread gets at least this many bytes (a small image: one thread). */
const PARALLEL_FROM_BYTES = 48 * 1024 * 1024;
const MAX_HASH_THREADS = 4;

/**
 * Hashes every chunk of every file against the manifest: the first mismatch, or null. Always in
 * hashing threads, never on the calling thread: reading and hashing costs ~1 ms/MiB on one core
 * here, and the worker's event loop (in `picocenter up`, the gateway's too) must not stall for
 * it. Big images are cut into contiguous runs of chunks hashed in parallel.
 */
async function firstBadChunk(dir: string, m: ImageManifest): Promise<string | null> {
  const jobs: ChunkJob[] = [];
  let total = 0;
  for (const f of m.files) {
    // The manifest's own chunks, of any format (fixed or content-defined sizes).
    let chunks: ChunkRef[];
    try {
      chunks = fileChunks(m, f);
    } catch (err) {
      return (err as Error).message; // a manifest whose chunks do not fit its file matches nothing
    }
    chunks.forEach((c, index) => {
      jobs.push({ file: path.join(dir, f.path), rel: f.path, index, start: c.offset, end: c.offset + c.size, sha256: c.hash });
      total += c.size;
    });
  }
  const threads = Math.max(1, Math.min(MAX_HASH_THREADS, availableParallelism(), Math.ceil(total / PARALLEL_FROM_BYTES)));
  // Contiguous runs of about equal bytes, so each thread reads its files sequentially.
  const runs: ChunkJob[][] = [];
  let run: ChunkJob[] = [];
  let bytes = 0;
  for (const j of jobs) {
    run.push(j);
    bytes += j.end - j.start;
    if (bytes >= (total / threads) * (runs.length + 1) && runs.length < threads - 1) {
      runs.push(run);
      run = [];
    }
  }
  runs.push(run);
  const results = await Promise.all(runs.map(hashInWorker));
  return results.find((r) => r !== null) ?? null;
}

/** The source of hashChunksSource, as a hashing thread runs it (it cannot import this module). */
const HASH_CHUNKS = `(${hashChunksSource.toString()})`;

/** Uses nothing of module scope: a hashing thread runs it from its source text, with `lib`. */
function hashChunksSource(
  jobs: ChunkJob[],
  lib: { createHash: typeof createHash; openSync: typeof openSync; readSync: typeof readSync; closeSync: typeof closeSync },
): string | null {
  const buf = Buffer.allocUnsafe(1 << 20);
  let fd = -1;
  let open = '';
  try {
    for (const j of jobs) {
      if (j.file !== open) {
        if (fd >= 0) lib.closeSync(fd);
        fd = lib.openSync(j.file, 'r');
        open = j.file;
      }
      const h = lib.createHash('sha256');
      for (let pos = j.start; pos < j.end; ) {
        const n = lib.readSync(fd, buf, 0, Math.min(buf.length, j.end - pos), pos);
        if (n === 0) return `${j.rel} ends at ${pos} bytes`;
        h.update(buf.subarray(0, n));
        pos += n;
      }
      if (h.digest('hex') !== j.sha256) return `${j.rel}: chunk ${j.index} fails its sha256`;
    }
    return null;
  } finally {
    if (fd >= 0) lib.closeSync(fd);
  }
}

/*
 * Hashing threads, started once and kept (unref'd: they never hold the process open). Starting
 * one costs ~60 ms here, as much as hashing 80 MiB; kept, only the first check pays it, or none
 * when warmHashThreads() ran at the checkpoint that kept the image.
 */
interface HashThread {
  worker: Worker;
  pending: { resolve: (r: string | null) => void; reject: (e: Error) => void } | null;
}
const idle: HashThread[] = [];

/** Starts the hashing threads a big image's check will use, ahead of the restore. */
export function warmHashThreads(): void {
  const want = Math.min(MAX_HASH_THREADS, availableParallelism());
  while (idle.length < want) idle.push(startHashThread());
}

function startHashThread(): HashThread {
  const worker = new Worker(
    `const { parentPort } = require('node:worker_threads');
     const lib = { ...require('node:crypto'), ...require('node:fs') };
     const hash = ${HASH_CHUNKS};
     parentPort.on('message', (jobs) => {
       let r;
       try { r = { ok: hash(jobs, lib) }; } catch (err) { r = { error: String(err && err.message || err) }; }
       parentPort.postMessage(r);
     });`,
    { eval: true },
  );
  const t: HashThread = { worker, pending: null };
  worker.on('message', (r: { ok?: string | null; error?: string }) => {
    const p = t.pending;
    t.pending = null;
    worker.unref();
    if ('error' in r) p?.reject(new Error(r.error));
    else p?.resolve(r.ok ?? null);
    if (p) idle.push(t);
  });
  const die = (err: Error): void => {
    const i = idle.indexOf(t);
    if (i >= 0) idle.splice(i, 1);
    t.pending?.reject(err);
    t.pending = null;
  };
  worker.on('error', die);
  worker.on('exit', (code) => die(new Error(`a hashing thread exited with code ${code}`)));
  worker.unref(); // after the listeners: adding a 'message' listener refs the worker again
  return t;
}

function hashInWorker(jobs: ChunkJob[]): Promise<string | null> {
  const t = idle.pop() ?? startHashThread();
  return new Promise((resolve, reject) => {
    t.pending = { resolve, reject };
    t.worker.ref(); // while it works for us, the process waits for it
    t.worker.postMessage(jobs);
  });
}

function readRecord(p: LocalImagePaths): LocalImageRecord | null {
  try {
    const r = JSON.parse(readFileSync(p.record, 'utf8')) as LocalImageRecord;
    if (r.format !== 1 || typeof r.app !== 'string' || !Number.isSafeInteger(r.generation) || typeof r.checksum !== 'string') return null;
    return existsSync(p.dir) ? r : null;
  } catch {
    return null;
  }
}

async function walk(dir: string, rel = ''): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(path.join(dir, rel), { withFileTypes: true })) {
    const r = rel === '' ? e.name : `${rel}/${e.name}`;
    if (e.isDirectory()) out.push(...(await walk(dir, r)));
    else out.push(r);
  }
  return out;
}

/** Whether the local image is exactly `manifest`'s (by its record; the files are not read). */
export function localImageIs(p: LocalImagePaths, manifest: ImageManifest): boolean {
  try {
    const r = JSON.parse(readFileSync(p.record, 'utf8')) as Partial<LocalImageRecord>;
    return r.app === manifest.app && r.generation === manifest.generation && r.checksum === manifest.checksum && existsSync(p.dir);
  } catch {
    return false;
  }
}

/** One chunk of an image directory (a local copy, a dump), or null when it is not there intact. */
export async function readLocalChunk(dir: string, file: ImageFile, ref: ChunkRef): Promise<Buffer | null> {
  const fh = await open(path.join(dir, ...file.path.split('/')), 'r');
  try {
    const buf = Buffer.allocUnsafe(ref.size);
    const { bytesRead } = await fh.read(buf, 0, ref.size, ref.offset);
    return bytesRead === ref.size && sha256(buf) === ref.hash ? buf : null;
  } finally {
    await fh.close();
  }
}
