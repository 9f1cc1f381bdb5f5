/*
 * Wake benchmark: how long until the first response byte of a request that arrives while an app
 * is stored, for an app whose start-up is heavy (test/fixtures/oci/heavy.mjs: ~300 MB of state
 * built over ~2 s before it listens) — a cold start (the `process` runtime runs the command
 * again) against a CRIU full restore (the `oci` runtime, image in the real chunked `fs` page
 * store), in one run.
 *
 *   npx tsc -p . && node dist/bench/wake.js [--mb 300] [--boot-ms 2000] [--runs 3] [--tmp DIR] [--no-durable]
 *                                           [--local-check sha256|size] [--no-local] [--network-lock iptables|nftables]
 *
 * Needs root and a host where the oci runtime works (scripts/install-oci.sh). Each run measures
 * from the moment the wake begins (runtime.start / runtime.restore is called) to the first byte
 * of the answer to `GET /`, sent as soon as the runtime reports the app ready; cold starts and
 * restores alternate, and the table shows median, min and max. Besides it: the oci runtime's
 * own cold start, each checkpoint (dump + store + verify), the image size, and the restore's
 * parts as the runtime logs them (the image: fetched from the page store, or the worker's local copy
 * of it checked against the manifest; runc restore; ready). By default the runtime is set up as a
 * worker's (OciRuntime.create): local images checked by sha256, the network lock CRIU supports best,
 * CRIU's kernel probe cache; the flags turn each off to measure what it is worth.
 * Everything it starts is stopped and its temp dir removed.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ChunkedImageStore } from '../pagestore/chunked-image-store.js';
import { FsObjectStore } from '../pagestore/fs-store.js';
import { checkHost } from '../worker/oci/host-check.js';
import { OciRuntime, type OciCheckpointResult } from '../worker/oci-runtime.js';
import { ProcessRuntime } from '../worker/process-runtime.js';
import type { Container } from '../worker/runtime.js';
import { arg, assertSameApp, checkArgs, capturedLogger, firstByte, flag, fmtMs, freePort, header, heavyApp, kdatNote, median, nodeReadOnlyPaths, row, type Answer } from './wake-common.js';

const MB = Number(arg('mb', '300'));
const BOOT_MS = Number(arg('boot-ms', '2000'));
const RUNS = Number(arg('runs', '3'));
const TMP = arg('tmp', os.tmpdir());
const DURABLE = !flag('no-durable');
const LOCAL = !flag('no-local');
const LOCAL_CHECK = arg('local-check', 'sha256') as 'sha256' | 'size';
const NETWORK_LOCK = arg('network-lock', '') as 'iptables' | 'nftables' | '';
const PORT = 8080;
checkArgs('node dist/bench/wake.js [--mb 300] [--boot-ms 2000] [--runs 3] [--tmp DIR] [--no-durable] [--local-check sha256|size] [--no-local] [--network-lock iptables|nftables]');

/** The runtime's own log lines ('container restored', 'checkpoint stored'), for the breakdown. */
const { log, logged } = capturedLogger();

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('needs root (runc, CRIU, network namespaces)');
  const host = await checkHost();
  if (!host.ok) throw new Error(host.message);
  const work = mkdtempSync(path.join(TMP, 'pico-bench-wake-'));
  const runtimes: { oci?: OciRuntime; containers: Container[] } = { containers: [] };
  try {
    const spec = heavyApp(work, MB, BOOT_MS);

    const processRuntime = new ProcessRuntime(log);
    const store = new ChunkedImageStore({ store: new FsObjectStore({ root: path.join(work, 'store'), durable: DURABLE }), log });
    const { runtime: oci } = await OciRuntime.create({
      log,
      imageStore: store,
      hostReport: host,
      stateDir: path.join(work, 'state'),
      prefix: 'pbench-',
      slots: { first: 15_900, count: 50 },
      defaults: { readOnlyPaths: nodeReadOnlyPaths() },
      localImages: LOCAL,
      localImageCheck: LOCAL_CHECK,
      ...(NETWORK_LOCK ? { networkLock: NETWORK_LOCK } : {}),
    });
    runtimes.oci = oci;

    console.log(`wake benchmark: heavy app, ${MB} MB of state, ${RUNS} runs; ${host.message}`);
    console.log(
      `oci runtime: image ${LOCAL ? `kept on the worker, checked by ${LOCAL_CHECK}` : 'fetched from the page store'} at each restore; ` +
        `network lock ${oci.networkLock}; /run/criu.kdat ${kdatNote()}`,
    );
    // The oci runtime's own cold start, then the first swap-out.
    let t0 = performance.now();
    let c = await oci.start(spec(PORT));
    const first = await firstByte(c.endpoints[PORT]!);
    const ociCold = first.at - t0;
    const original = first.answer;
    const checkpoints: OciCheckpointResult[] = [];
    const cold: number[] = [];
    const restore: number[] = [];
    const coldAnswers: Answer[] = [];

    for (let run = 1; run <= RUNS; run++) {
      checkpoints.push(await oci.checkpoint(c));

      // Cold start: the process runtime runs the command again.
      const port = await freePort();
      t0 = performance.now();
      const pc = await processRuntime.start(spec(port));
      runtimes.containers.push(pc);
      const pr = await firstByte({ host: '127.0.0.1', port });
      cold.push(pr.at - t0);
      coldAnswers.push(pr.answer);
      await processRuntime.stop(pc);

      // Full restore from the page store.
      t0 = performance.now();
      c = await oci.restore(spec(PORT));
      const or = await firstByte(c.endpoints[PORT]!);
      restore.push(or.at - t0);
      assertSameApp(or.answer, original);
      console.log(`  run ${run}: cold start ${cold.at(-1)!.toFixed(0)} ms, restore ${restore.at(-1)!.toFixed(0)} ms`);
    }
    await oci.stop(c);

    const restored = logged.filter((l) => l.msg === 'container restored');
    const image = checkpoints.at(-1)!;
    console.log('');
    console.log(`app: ${MB} MB of state, start-up ${median(coldAnswers.map((a) => a.bootMs))} ms (median), RSS ${original.rssMB} MB`);
    console.log(header('wake latency to the first response byte'));
    console.log(row('cold start (process runtime)', cold));
    console.log(row('CRIU full restore (oci runtime)', restore));
    const sources = [...new Set(restored.map((l) => String(l.image)))].join(' / ');
    console.log(row(`  image (${sources}: ${sources === 'local' ? 'check' : 'fetch'})`, restored.map((l) => Number(l.fetchMs))));
    console.log(row('  runc restore (CRIU)', restored.map((l) => Number(l.restoreMs))));
    console.log(row('    of which CRIU itself', restored.map((l) => Number(l.criuMs))));
    console.log(row('swap-out: checkpoint (dump + store + verify)', checkpoints.map((x) => x.dumpMs + x.storeMs)));
    console.log(row('  dump (runc checkpoint)', checkpoints.map((x) => x.dumpMs)));
    console.log(row('  store + verify', checkpoints.map((x) => x.storeMs)));
    console.log(`${'oci cold start (not a wake; for reference)'.padEnd(44)}${fmtMs(ociCold)}`);
    console.log(`image: ${(image.imageBytes / 1e6).toFixed(0)} MB; last checkpoint uploaded ${(image.uploadedBytes / 1e6).toFixed(0)} MB (page store ${DURABLE ? 'durable' : 'not durable'})`);
    console.log(`ratio cold start / full restore (medians): ${(median(cold) / median(restore)).toFixed(2)}x`);
  } finally {
    for (const pc of runtimes.containers) await new ProcessRuntime(log).stop(pc).catch(() => undefined);
    if (runtimes.oci) {
      for (const c of runtimes.oci.containers()) await runtimes.oci.stop(c).catch(() => undefined);
      await runtimes.oci.cleanLeftovers().catch(() => undefined);
    }
    rmSync(work, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(`wake benchmark failed: ${err instanceof Error ? err.message : String(err)}`);
  process.exitCode = 1;
});
