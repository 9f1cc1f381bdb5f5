/*
 * Page store benchmark, s3 beside fs: put and get of one CRIU-shaped image directory through
 * ChunkedImageStore on the fs backend and on the s3 backend against a local S3 API server
 * (s3rver in a child process, test/helpers/s3-server.ts), optionally behind the fault proxy's
 * per-request delay and bandwidth cap.
 *
 *   npx tsc -p . && node dist/bench/pagestore-s3.js [--mb 200] [--runs 3] [--concurrency 8,32]
 *        [--chunking 4,16,64] [--delay-ms 20 --mbps 100] [--tmp DIR]
 *
 * Rows, each the median of --runs, per store and concurrency:
 *   put (cold)       into an empty store/bucket: hash + upload every chunk + read back + manifest
 *   put (unchanged)  the same directory again: hash + head + read back; uploads nothing
 *   get              latest() + restore into an empty directory, verifying every chunk
 * `raw put` / `raw get` move the same number of 1 MiB objects through the ObjectStore alone
 * (no hashing, no files), `concurrency` at a time: the transport's own ceiling.
 * --delay-ms / --mbps add a third store: s3 through the proxy (delay per request; the cap per
 * direction, in MB/s = 10^6 bytes/s).
 */
import { randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ChunkedImageStore } from '../pagestore/chunked-image-store.js';
import { FsObjectStore } from '../pagestore/fs-store.js';
import type { ObjectStore } from '../pagestore/object-store.js';
import { S3ObjectStore } from '../pagestore/s3-store.js';
import { startFaultProxy, type FaultProxy } from '../test/helpers/s3-fault-proxy.js';
import { startS3Server } from '../test/helpers/s3-server.js';
import { chunkingArg, describeChunking } from './chunking-arg.js';
import { makeImage } from './fake-image.js';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}
const MB = Number(arg('mb', '200'));
const RUNS = Number(arg('runs', '3'));
const CONCURRENCIES = arg('concurrency', '8,32').split(',').map(Number);
const CHUNKING = chunkingArg(process.argv);
const DELAY_MS = Number(arg('delay-ms', '0'));
const MBPS = Number(arg('mbps', '0'));
const TMP = arg('tmp', os.tmpdir());
const MiB = 1 << 20;

const work = mkdtempSync(path.join(TMP, 'pico-bench-s3-'));
process.on('exit', () => rmSync(work, { recursive: true, force: true }));

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t = performance.now();
  await fn();
  return performance.now() - t;
}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;

async function bounded(n: number, limit: number, fn: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(limit, n) }, async () => {
    while (next < n) await fn(next++);
  }));
}

async function main(): Promise<void> {
  const src = path.join(work, 'src');
  const total = makeImage(src, MB);
  const s3 = await startS3Server({ directory: path.join(work, 's3rver') });
  let proxy: FaultProxy | undefined;
  if (DELAY_MS > 0 || MBPS > 0) proxy = await startFaultProxy({ target: s3.endpoint, delayMs: DELAY_MS, ...(MBPS > 0 ? { bytesPerSecond: MBPS * 1e6 } : {}) });
  const s3Stores: S3ObjectStore[] = [];
  let seq = 0;

  /** Empties an s3 store (s3rver keeps everything on the same disk). */
  const emptyS3 = async () => {
    const s = s3Stores[s3Stores.length - 1]!;
    const keys: string[] = [];
    for await (const k of s.list('')) keys.push(k);
    await bounded(keys.length, 16, (i) => s.delete(keys[i]!));
  };
  const stores: Array<{ name: string; make: () => ObjectStore; dispose: () => void | Promise<void> }> = [
    {
      name: 'fs (not durable)',
      make: () => new FsObjectStore({ root: path.join(work, `fs-${++seq}`), durable: false }),
      dispose: () => rmSync(path.join(work, `fs-${seq}`), { recursive: true, force: true }),
    },
    {
      name: 'fs (durable)',
      make: () => new FsObjectStore({ root: path.join(work, `fs-${++seq}`) }),
      dispose: () => rmSync(path.join(work, `fs-${seq}`), { recursive: true, force: true }),
    },
    {
      name: 's3 (s3rver, loopback)',
      make: () => {
        const s = new S3ObjectStore({ endpoint: s3.endpoint, region: s3.region, bucket: s3.bucket, prefix: `run-${++seq}/`, pathStyle: true, credentials: s3.credentials });
        s3Stores.push(s);
        return s;
      },
      dispose: emptyS3,
    },
  ];
  if (proxy) {
    const p = proxy;
    stores.push({
      name: `s3 + ${DELAY_MS} ms/request${MBPS ? `, ${MBPS} MB/s` : ''}`,
      make: () => {
        const s = new S3ObjectStore({ endpoint: p.endpoint, region: s3.region, bucket: s3.bucket, prefix: `run-${++seq}/`, pathStyle: true, credentials: s3.credentials });
        s3Stores.push(s);
        return s;
      },
      dispose: emptyS3,
    });
  }

  const results: Array<{ store: string; conc: number; what: string; ms: number; bytes: number }> = [];
  for (const st of stores) {
    for (const conc of CONCURRENCIES) {
      const rows = new Map<string, { ms: number[]; bytes: number }>();
      const add = (what: string, ms: number, bytes: number) => {
        const r = rows.get(what) ?? { ms: [], bytes };
        r.ms.push(ms);
        rows.set(what, r);
      };
      for (let run = 0; run < RUNS; run++) {
        const objects = st.make();
        const images = new ChunkedImageStore({ store: objects, chunking: CHUNKING, concurrency: conc });
        add('put (cold)', await timed(() => images.put('bench', src)), total);
        add('put (unchanged)', await timed(() => images.put('bench', src)), total);
        const out = path.join(work, `restore-${run}`);
        add('get (latest + restore)', await timed(async () => images.get((await images.latest('bench'))!, out)), total);
        rmSync(out, { recursive: true });
        // The transport alone: the same bytes as 1 MiB objects, `conc` in flight.
        const n = Math.round(total / MiB);
        const body = randomBytes(MiB);
        add('raw put, 1 MiB objects', await timed(() => bounded(n, conc, (i) => objects.put(`raw/${i}`, body))), n * MiB);
        const bufs = Array.from({ length: conc }, () => Buffer.allocUnsafe(MiB));
        let slot = 0;
        add('raw get, 1 MiB objects', await timed(() => bounded(n, conc, async (i) => void (await objects.get(`raw/${i}`, bufs[slot++ % conc])))), n * MiB);
        await st.dispose();
      }
      for (const [what, r] of rows) results.push({ store: st.name, conc, what, ms: median(r.ms), bytes: r.bytes });
    }
  }
  for (const s of s3Stores) s.close();
  await proxy?.close();
  await s3.stop();

  console.log(`image: ${(total / MiB).toFixed(1)} MiB in 7 files (random bytes); ${describeChunking(CHUNKING)}; ${RUNS} run(s), median; ${os.cpus().length} CPUs; tmp ${TMP}`);
  console.log(`${'store'.padEnd(34)} ${'conc'.padStart(4)}  ${'operation'.padEnd(26)} ${'ms'.padStart(8)} ${'MiB/s'.padStart(7)}`);
  for (const r of results) {
    console.log(`${r.store.padEnd(34)} ${String(r.conc).padStart(4)}  ${r.what.padEnd(26)} ${r.ms.toFixed(0).padStart(8)} ${((r.bytes / MiB / r.ms) * 1000).toFixed(0).padStart(7)}`);
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
