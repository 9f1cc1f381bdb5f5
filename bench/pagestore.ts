/*
 * Page store benchmark: put and get of a CRIU-shaped image directory on the `fs` backend, beside
 * the references for the same bytes in the same run (sha256sum of the directory; cp -r + sync).
 *
 *   npx tsc -p . && node dist/bench/pagestore.js [--mb 200] [--chunking 4,16,64] [--concurrency 8]
 *                                                [--no-durable] [--runs 3] [--tmp DIR]
 *
 * The image directory holds one big pages-1.img of random bytes (--mb MiB, incompressible and
 * without duplicate chunks, the worst case for dedup) and a handful of small *.img files, like a
 * CRIU dump of one process. Measured, each as the median of --runs:
 *   put (cold)      into an empty store: hash + write every chunk + read back + manifest
 *   put (unchanged) the same directory again: hash + head + read back; uploads ~nothing
 *   put (1 MiB changed)
 *   get             latest() + restore into an empty directory, verifying every chunk
 * The source and the store are on the same disk (--tmp, default the OS temp dir); everything it
 * creates is removed at the end.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, openSync, rmSync, writeSync, closeSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ChunkedImageStore } from '../pagestore/chunked-image-store.js';
import { FsObjectStore } from '../pagestore/fs-store.js';
import { chunkingArg, describeChunking } from './chunking-arg.js';
import { makeImage } from './fake-image.js';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}
const MB = Number(arg('mb', '200'));
const CHUNKING = chunkingArg(process.argv);
const CONCURRENCY = Number(arg('concurrency', '8'));
const DURABLE = !process.argv.includes('--no-durable');
const RUNS = Number(arg('runs', '3'));
const TMP = arg('tmp', os.tmpdir());
const MiB = 1 << 20;

const work = mkdtempSync(path.join(TMP, 'pico-bench-pagestore-'));
const cleanup = () => rmSync(work, { recursive: true, force: true });
process.on('exit', cleanup);

async function timed(fn: () => Promise<unknown> | unknown): Promise<number> {
  const t = performance.now();
  await fn();
  return performance.now() - t;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;

async function main(): Promise<void> {
  const src = path.join(work, 'src');
  const total = makeImage(src, MB);
  execFileSync('sync');
  const rows: Array<{ what: string; ms: number[]; uploaded?: number }> = [];
  const row = (what: string) => {
    let r = rows.find((x) => x.what === what);
    if (!r) rows.push((r = { what, ms: [] }));
    return r;
  };

  for (let run = 0; run < RUNS; run++) {
    // References: hashing the bytes, and copying them durably.
    row('ref: sha256sum of the directory').ms.push(await timed(() => execFileSync('sh', ['-c', `sha256sum ${src}/* > /dev/null`])));
    const copy = path.join(work, `copy-${run}`);
    row(`ref: cp -r${DURABLE ? ' + sync' : ''}`).ms.push(await timed(() => execFileSync('sh', ['-c', `cp -r ${src} ${copy}${DURABLE ? ' && sync' : ''}`])));
    rmSync(copy, { recursive: true });

    const root = path.join(work, `store-${run}`);
    const images = new ChunkedImageStore({ store: new FsObjectStore({ root, durable: DURABLE }), chunking: CHUNKING, concurrency: CONCURRENCY });
    let uploaded = 0;
    row('put (cold)').ms.push(await timed(async () => (uploaded = (await images.put('bench', src)).stats.uploadedBytes)));
    row('put (cold)').uploaded = uploaded;
    row('put (unchanged)').ms.push(await timed(async () => (uploaded = (await images.put('bench', src)).stats.uploadedBytes)));
    row('put (unchanged)').uploaded = uploaded;
    // Change 1 MiB in the middle of the pages file.
    const fd = openSync(path.join(src, 'pages-1.img'), 'r+');
    writeSync(fd, randomBytes(MiB), 0, MiB, Math.floor(MB / 2) * MiB);
    closeSync(fd);
    row('put (1 MiB changed)').ms.push(await timed(async () => (uploaded = (await images.put('bench', src)).stats.uploadedBytes)));
    row('put (1 MiB changed)').uploaded = uploaded;
    const out = path.join(work, `restore-${run}`);
    row('get (latest + restore)').ms.push(await timed(async () => images.get((await images.latest('bench'))!, out)));
    rmSync(out, { recursive: true });
    rmSync(root, { recursive: true });
  }

  const mb = total / MiB;
  console.log(`image: ${mb.toFixed(1)} MiB in 7 files; ${describeChunking(CHUNKING)}; concurrency ${CONCURRENCY}; durable ${DURABLE}; ${RUNS} run(s), median; store on ${TMP}; ${os.cpus().length} CPUs`);
  console.log(`${'operation'.padEnd(36)} ${'ms'.padStart(8)} ${'MiB/s'.padStart(8)} ${'uploaded MiB'.padStart(13)}`);
  for (const r of rows) {
    const ms = median(r.ms);
    const up = r.uploaded === undefined ? '' : (r.uploaded / MiB).toFixed(2);
    console.log(`${r.what.padEnd(36)} ${ms.toFixed(0).padStart(8)} ${((mb / ms) * 1000).toFixed(0).padStart(8)} ${up.padStart(13)}`);
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
