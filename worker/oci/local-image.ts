import { createHash } from 'node:crypto';
import { existsSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { open, readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import type { ImageManifest } from '../../pagestore/image-store.js';

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

/** Hashes every chunk of every file against the manifest; the first mismatch, or null. */
async function firstBadChunk(dir: string, m: ImageManifest): Promise<string | null> {
  // A manifest's chunkSize cuts each file; 0 (a store that keeps whole files) means one chunk.
  const buf = Buffer.allocUnsafe(m.chunkSize > 0 ? m.chunkSize : 1 << 20);
  for (const f of m.files) {
    const fh = await open(path.join(dir, f.path), 'r');
    try {
      for (let i = 0; i < f.chunks.length; i++) {
        const start = m.chunkSize > 0 ? i * m.chunkSize : 0;
        const end = m.chunkSize > 0 ? Math.min(f.size, start + m.chunkSize) : f.size;
        const h = createHash('sha256');
        for (let pos = start; pos < end; ) {
          const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, end - pos), pos);
          if (bytesRead === 0) return `${f.path} ends at ${pos} bytes`;
          h.update(buf.subarray(0, bytesRead));
          pos += bytesRead;
        }
        if (h.digest('hex') !== f.chunks[i]) return `${f.path}: chunk ${i} fails its sha256`;
      }
    } finally {
      await fh.close();
    }
  }
  return null;
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
