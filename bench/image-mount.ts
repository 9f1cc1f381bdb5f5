/*
 * Image mount benchmark: reads through the FUSE image directory (pagestore/image-mount.ts), with
 * every chunk in memory, so what is measured is the mount's own path (kernel → server → chunk
 * slices → kernel), not a store.
 *
 *   npx tsc -p . && node dist/bench/image-mount.js [--mb 200] [--runs 3] [--preads 4000]
 *                                                  [--resident] [--busy-ms N]
 *                                                  [--module PATH/image-mount.js] [--tmp DIR]
 *
 * The image: one pages-1.img of --mb MiB of pseudo-random bytes in chunks of varying whole
 * pages (4–64, about 17 on average, like the store's content-defined chunks). Each run mounts
 * it afresh (a cold kernel page cache) and measures, from a reader in a child process:
 *   mount        mountImage() until it resolves
 *   sequential   `dd bs=128k` of the whole file to /dev/null (dd's own figure)
 *   4 KiB preads --preads reads of one page each at random page offsets (seeded; like page
 *                faults), by a node child doing readSync; reads per second and the mean
 * Reported as the median of --runs, with min and max. --module measures another build of
 * image-mount.js (e.g. an older one) with the same image and readers. --resident makes the whole
 * file resident (ImageMount.hold) right after the mount: the server answers every read itself.
 * --busy-ms N keeps this process's event loop busy N ms of every 2N (a worker in the middle of a
 * restore: the store's answers, the packs' decoding), which every read not resident waits for.
 */
import { spawn } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import type { ImageFile, ImageManifest } from '../pagestore/image-store.js';
import type { ImageMountOptions, ImageMount } from '../pagestore/image-mount.js';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}
const MiB = 1 << 20;
const PAGE = 4096;
const MB = Number(arg('mb', '200'));
const RUNS = Number(arg('runs', '3'));
const PREADS = Number(arg('preads', '4000'));
const MODULE = path.resolve(arg('module', path.join(import.meta.dirname, '../pagestore/image-mount.js')));
const TMP = arg('tmp', os.tmpdir());
const RESIDENT = process.argv.includes('--resident');
const BUSY_MS = Number(arg('busy-ms', '0'));

const { mountImage } = (await import(pathToFileURL(MODULE).href)) as { mountImage(o: ImageMountOptions): Promise<ImageMount> };

// ---- the image ----
const size = MB * MiB;
const key = createHash('sha256').update('bench-image-mount').digest();
const cipher = createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
const data = Buffer.concat([cipher.update(Buffer.alloc(size)), cipher.final()]);
const chunks = new Map<string, Buffer>();
const hashes: string[] = [];
const sizes: number[] = [];
const pagesPerChunk = [16, 7, 40, 4, 23, 12, 64, 9];
for (let off = 0, i = 0; off < size; i++) {
  const n = Math.min(size - off, pagesPerChunk[i % pagesPerChunk.length]! * PAGE);
  const body = data.subarray(off, off + n);
  const h = createHash('sha256').update(body).digest('hex'); // random bytes: no two chunks alike
  chunks.set(h, body);
  hashes.push(h);
  sizes.push(n);
  off += n;
}
const file: ImageFile = { path: 'pages-1.img', size, mode: 0o600, chunks: hashes, sizes };
const manifest: ImageManifest = {
  format: 2,
  app: 'bench',
  generation: 1,
  createdAt: new Date(0).toISOString(),
  chunkSize: 64 * PAGE,
  files: [file],
  checksum: 'not-checked',
};

// ---- readers (child processes: the mounting process must never read its own mount) ----
function run(cmd: string, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

const PREAD_READER = `
const fs = require('node:fs');
const [file, n, pages] = process.argv.slice(1);
const fd = fs.openSync(file, 'r');
const buf = Buffer.alloc(${PAGE});
let x = 12345;
const t = process.hrtime.bigint();
for (let i = 0; i < Number(n); i++) {
  x = (Math.imul(x, 1103515245) + 12345) >>> 0;
  if (fs.readSync(fd, buf, 0, ${PAGE}, (x % Number(pages)) * ${PAGE}) !== ${PAGE}) throw new Error('short read');
}
console.log(Number(process.hrtime.bigint() - t) / 1e6);
`;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;
const range = (xs: number[], digits = 0) => `${median(xs).toFixed(digits)} (${Math.min(...xs).toFixed(digits)}–${Math.max(...xs).toFixed(digits)})`;

const work = mkdtempSync(path.join(TMP, 'pico-bench-mount-'));
const busy = BUSY_MS > 0 ? setInterval(() => {
  for (const end = performance.now() + BUSY_MS; performance.now() < end; );
}, 2 * BUSY_MS) : undefined;
const mountMs: number[] = [];
const seqMiBs: number[] = [];
const preadPerS: number[] = [];
const preadUs: number[] = [];
try {
  for (let i = 0; i < RUNS * 2; i++) {
    const t0 = performance.now();
    const m = await mountImage({ mountpoint: path.join(work, `mnt-${i}`), manifest, chunk: async (ref) => chunks.get(ref.hash)! });
    mountMs.push(performance.now() - t0);
    if (RESIDENT) await m.hold([{ file: file.path, offset: 0, bytes: data }]);
    const p = path.join(m.path, file.path);
    try {
      if (i % 2 === 0) {
        const r = await run('dd', [`if=${p}`, 'of=/dev/null', 'bs=128k']);
        const s = /copied, ([\d.]+) s/.exec(r.stderr);
        if (r.code !== 0 || !s) throw new Error(`dd: ${r.stderr}`);
        seqMiBs.push(size / MiB / Number(s[1]));
      } else {
        const r = await run(process.execPath, ['-e', PREAD_READER, p, String(PREADS), String(size / PAGE)]);
        if (r.code !== 0) throw new Error(`reader: ${r.stderr}`);
        const ms = Number(r.stdout.trim());
        preadPerS.push(PREADS / (ms / 1000));
        preadUs.push((ms * 1000) / PREADS);
      }
    } finally {
      await m.close();
    }
  }
} finally {
  clearInterval(busy);
  rmSync(work, { recursive: true, force: true });
}
const how = [RESIDENT ? 'all of it resident' : '', BUSY_MS ? `event loop busy ${BUSY_MS} ms of every ${2 * BUSY_MS}` : ''].filter(Boolean).join(', ');
console.log(`image mount (${path.relative(process.cwd(), MODULE)}), ${MB} MiB in ${hashes.length} chunks from memory${how ? ` (${how})` : ''}; median (min–max) of ${RUNS}`);
console.log(`  mount                 ${range(mountMs, 1)} ms`);
console.log(`  sequential dd bs=128k ${range(seqMiBs)} MiB/s`);
console.log(`  random 4 KiB preads   ${range(preadPerS)} reads/s, ${range(preadUs)} µs each (${PREADS} per run)`);
