import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { copyFile, mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { PicoError } from '../../shared/errors.js';
import { IMAGE_FORMAT_VERSION, type ImageManifest, type ImageStore, type PutStats } from '../../pagestore/image-store.js';

/**
 * A tiny ImageStore for runtime tests: each generation is a plain copy of the image directory,
 * one "chunk" per non-empty file (the whole file, named by its sha256; an empty file has none),
 * in a format-2 manifest without `chunking` whose chunkSize is the largest file. Verified on put
 * and on get like the real store; getChunk(hash) serves a stored file by its sha256. Failures can
 * be injected: `failPut` / `failGet` reject the next calls, `hangPut` never settles (a worker
 * killed mid-upload).
 *
 *   ROOT/APP/GENERATION/files/…      the image's files
 *   ROOT/APP/GENERATION/manifest.json written last: a generation without it does not exist
 */
export class DirImageStore implements ImageStore {
  failPut: Error | null = null;
  failGet: Error | null = null;
  hangPut = false;
  /** called when put starts (before hangPut/failPut apply) */
  onPut: ((app: string) => void) | null = null;
  readonly calls = { put: 0, get: 0, prune: 0 };

  constructor(readonly root: string) {}

  async put(app: string, dir: string): Promise<{ manifest: ImageManifest; stats: PutStats }> {
    this.calls.put++;
    this.onPut?.(app);
    if (this.hangPut) await new Promise<never>(() => {});
    if (this.failPut) throw this.failPut;
    const generation = ((await this.latest(app))?.generation ?? 0) + 1;
    const genDir = path.join(this.root, app, String(generation));
    await rm(genDir, { recursive: true, force: true });
    const files: ImageManifest['files'] = [];
    let totalBytes = 0;
    for (const rel of await walk(dir)) {
      const src = path.join(dir, rel);
      const dst = path.join(genDir, 'files', rel);
      await mkdir(path.dirname(dst), { recursive: true });
      await copyFile(src, dst);
      const st = await stat(src);
      const [a, b] = await Promise.all([sha256File(src), sha256File(dst)]);
      if (a !== b) throw new PicoError('PICO_ERR_STORE', `${app}: ${rel} read back differently`);
      files.push({ path: rel, size: st.size, mode: st.mode & 0o7777, chunks: st.size > 0 ? [a] : [], sizes: st.size > 0 ? [st.size] : [] });
      totalBytes += st.size;
    }
    const chunkSize = Math.max(1, ...files.map((f) => f.size));
    const body = { format: IMAGE_FORMAT_VERSION, app, generation, createdAt: new Date().toISOString(), chunkSize, files };
    const manifest: ImageManifest = { ...body, checksum: sha256(JSON.stringify(body)) };
    await writeFile(path.join(genDir, 'manifest.json.tmp'), JSON.stringify(manifest));
    await rename(path.join(genDir, 'manifest.json.tmp'), path.join(genDir, 'manifest.json'));
    return { manifest, stats: { totalBytes, uploadedBytes: totalBytes } };
  }

  async latest(app: string): Promise<ImageManifest | undefined> {
    for (const g of (await this.generations(app)).reverse()) {
      const m = await this.manifest(app, g);
      if (m) return m;
    }
    return undefined;
  }

  async get(manifest: ImageManifest, dir: string): Promise<void> {
    this.calls.get++;
    if (this.failGet) throw this.failGet;
    const genDir = path.join(this.root, manifest.app, String(manifest.generation), 'files');
    // Verify everything before writing anything at `dir`.
    for (const f of manifest.files) {
      let sum: string;
      try {
        sum = await sha256File(path.join(genDir, f.path));
      } catch {
        throw new PicoError('PICO_ERR_IMAGE_MISSING', `${manifest.app} generation ${manifest.generation}: ${f.path} is missing`);
      }
      const want = f.chunks[0] ?? EMPTY_SHA256;
      if (sum !== want) {
        throw new PicoError('PICO_ERR_IMAGE_CORRUPT', `${manifest.app} generation ${manifest.generation}: ${f.path} fails its sha256 (${sum.slice(0, 12)}… != ${want.slice(0, 12)}…)`);
      }
    }
    for (const f of manifest.files) {
      const dst = path.join(dir, f.path);
      await mkdir(path.dirname(dst), { recursive: true });
      await copyFile(path.join(genDir, f.path), dst);
    }
  }

  /** The stored file whose sha256 is `hash` (a chunk here is a whole file), verified. */
  async getChunk(hash: string, length?: number): Promise<Buffer> {
    for (const app of await readdir(this.root).catch(() => [] as string[])) {
      for (const g of await this.generations(app)) {
        const f = (await this.manifest(app, g))?.files.find((x) => x.chunks[0] === hash);
        if (!f) continue;
        const data = await readFile(this.filePath(app, g, f.path)).catch(() => undefined);
        if (!data) continue; // deleted meanwhile, or damaged by a test: another copy may serve
        if (createHash('sha256').update(data).digest('hex') !== hash || (length !== undefined && data.length !== length)) {
          throw new PicoError('PICO_ERR_IMAGE_CORRUPT', `chunk ${hash} failed its checksum (${app} generation ${g}: ${f.path})`);
        }
        return data;
      }
    }
    throw new PicoError('PICO_ERR_IMAGE_MISSING', `no chunk ${hash} in ${this.root}`);
  }

  async prune(app: string): Promise<void> {
    this.calls.prune++;
    const newest = await this.latest(app);
    if (!newest) return;
    for (const g of await this.generations(app)) {
      if (g < newest.generation) await rm(path.join(this.root, app, String(g)), { recursive: true, force: true });
    }
  }

  async apps(): Promise<Array<{ app: string; generation: number }>> {
    const out: Array<{ app: string; generation: number }> = [];
    for (const app of await readdir(this.root).catch(() => [] as string[])) {
      const m = await this.latest(app);
      if (m) out.push({ app, generation: m.generation });
    }
    return out;
  }

  /** Where a stored file of a generation lives (for tests that corrupt it). */
  filePath(app: string, generation: number, rel: string): string {
    return path.join(this.root, app, String(generation), 'files', rel);
  }

  private async generations(app: string): Promise<number[]> {
    const names = await readdir(path.join(this.root, app)).catch(() => [] as string[]);
    return names.filter((n) => /^\d+$/.test(n)).map(Number).sort((a, b) => a - b);
  }

  private async manifest(app: string, generation: number): Promise<ImageManifest | undefined> {
    try {
      const m = JSON.parse(await readFile(path.join(this.root, app, String(generation), 'manifest.json'), 'utf8')) as ImageManifest;
      const { checksum, ...body } = m;
      return sha256(JSON.stringify(body)) === checksum ? m : undefined;
    } catch {
      return undefined;
    }
  }
}

async function walk(dir: string, prefix = ''): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(path.join(dir, prefix), { withFileTypes: true })) {
    const rel = prefix ? `${prefix}/${e.name}` : e.name;
    if (e.isDirectory()) out.push(...(await walk(dir, rel)));
    else if (e.isFile()) out.push(rel);
  }
  return out.sort();
}

const EMPTY_SHA256 = createHash('sha256').digest('hex');

function sha256(s: string): string {
  return createHash('sha256').update(s).digest('hex');
}

function sha256File(file: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    createReadStream(file)
      .on('data', (d) => h.update(d))
      .on('error', reject)
      .on('end', () => resolve(h.digest('hex')));
  });
}
