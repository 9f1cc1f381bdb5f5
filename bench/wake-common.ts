/*
 * What the wake benchmarks share (bench/wake.ts: cold start vs full restore from the fs page store;
 * bench/restore.ts: cold start vs full, lazy and activeset restores from S3): the heavy app
 * (test/fixtures/oci/heavy.mjs), the first-byte probe, the runtime's log lines captured for the
 * breakdowns, and the table's rows.
 */
import { copyFileSync, existsSync, mkdirSync, readlinkSync } from 'node:fs';
import net, { type AddressInfo } from 'node:net';
import path from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { createLogger, type Logger } from '../shared/log.js';
import type { AppSpec, Endpoint, RestoreMode } from '../shared/protocol.js';
import { cgroup2Root, readCgroupMounts } from '../worker/oci/cgroup-host.js';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/** The options arg() and flag() were asked about: known to checkArgs(). */
const known = { values: new Set<string>(), flags: new Set<string>() };

/** `--name VALUE` on the command line, else `dflt`. */
export function arg(name: string, dflt: string): string {
  known.values.add(name);
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}

/** `--name` is on the command line. */
export function flag(name: string): boolean {
  known.flags.add(name);
  return process.argv.includes(`--${name}`);
}

/**
 * Call after every arg() and flag(): a benchmark takes many minutes and root's containers, so an
 * option it does not know (a typo, `--help`) prints the usage and exits 2 instead of running with
 * the defaults.
 */
export function checkArgs(usage: string): void {
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i]!.startsWith('--') ? argv[i]!.slice(2) : undefined;
    if (name !== undefined && known.flags.has(name)) continue;
    if (name !== undefined && known.values.has(name) && argv[i + 1] !== undefined) { i++; continue; }
    process.stderr.write(`${argv[i] === '--help' ? '' : `unknown or incomplete option: ${argv[i]}\n`}usage: ${usage}\n`);
    process.exit(argv[i] === '--help' ? 0 : 2);
  }
}

/** Whether the host's cgroup2 has favordynmods now (OciRuntime.create sets it by default). */
export function favordynmodsNote(): string {
  const v2 = cgroup2Root(readCgroupMounts());
  return v2 ? (v2.superOptions.includes('favordynmods') ? 'on' : 'off') : 'n/a (no cgroup2)';
}

/** What heavy.mjs answers to `GET /`. */
export interface Answer {
  bootMs: number;
  digest: number;
  objects: number;
  blobs: number;
  last: string;
  sample: number;
  rssMB: number;
}

/**
 * The heavy app in WORK/app: MB of state built over BOOT_MS before it listens. The returned
 * function gives its spec listening on `port` (the oci runtime gives each container its own
 * address, so 8080 there; the process runtime needs a free host port).
 */
export function heavyApp(work: string, mb: number, bootMs: number): (port: number, restore?: RestoreMode) => AppSpec {
  const appDir = path.join(work, 'app');
  mkdirSync(appDir, { recursive: true });
  copyFileSync(path.join(REPO, 'test/fixtures/oci/heavy.mjs'), path.join(appDir, 'heavy.mjs'));
  return (port, restore) => ({
    name: 'heavy',
    command: [process.execPath, 'heavy.mjs'],
    cwd: appDir,
    env: { STATE_MB: String(mb), BOOT_MS: String(bootMs) },
    ports: [port],
    readyTimeoutMs: 120_000,
    ...(restore ? { restore } : {}),
  });
}

/** The oci runtime needs the Node binary visible in the container when it is not under /usr. */
export function nodeReadOnlyPaths(): string[] {
  return process.execPath.startsWith('/usr/') ? [] : [path.dirname(process.execPath)];
}

/** A logger whose lines ('container restored', 'checkpoint stored'…) land in `logged`, parsed. */
export function capturedLogger(level = 'info'): { log: Logger; logged: Array<Record<string, unknown>> } {
  const logged: Array<Record<string, unknown>> = [];
  const log = createLogger({
    level,
    destination: new Writable({
      write(chunk: Buffer, _enc, done) {
        for (const line of chunk.toString('utf8').split('\n')) {
          if (line) logged.push(JSON.parse(line) as Record<string, unknown>);
        }
        done();
      },
    }),
  });
  return { log, logged };
}

/** GET / on a fresh connection: when its first byte arrived (performance.now()) and the answer. */
export function firstByte(ep: Endpoint, timeoutMs = 30_000): Promise<{ at: number; answer: Answer }> {
  return new Promise((resolve, reject) => {
    let at = 0;
    let text = '';
    const s = net.connect({ host: ep.host, port: ep.port }, () => s.write('GET / HTTP/1.1\r\nHost: heavy\r\nConnection: close\r\n\r\n'));
    s.setTimeout(timeoutMs, () => s.destroy(new Error(`no answer from ${ep.host}:${ep.port} in ${timeoutMs / 1000} s`)));
    s.on('data', (d: Buffer) => {
      if (!at) at = performance.now();
      text += d.toString('utf8');
    });
    s.on('error', reject);
    s.on('end', () => {
      try {
        resolve({ at, answer: JSON.parse(text.slice(text.indexOf('\r\n\r\n') + 4)) as Answer });
      } catch (err) {
        reject(err);
      }
    });
  });
}

/** Throws unless `got` is the app that was checkpointed (start-up and state as `original`'s). */
export function assertSameApp(got: Answer, original: Answer): void {
  if (got.bootMs !== original.bootMs || got.sample !== original.sample || got.digest !== original.digest) {
    throw new Error(`the restored app is not the one checkpointed: ${JSON.stringify(got)} vs ${JSON.stringify(original)}`);
  }
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/** The median (the upper one of an even count). */
export function median(xs: number[]): number {
  return [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
}

export function fmtMs(ms: number): string {
  return `${ms.toFixed(0).padStart(8)} ms`;
}

/** Width of a table row's name column. */
export const NAME_WIDTH = 44;

/** A table header: title, then median, min and max columns. */
export function header(title: string, width = NAME_WIDTH): string {
  return `${title.padEnd(width)}${'median'.padStart(11)}${'min'.padStart(11)}${'max'.padStart(11)}`;
}

/** A table row of times in ms: median, min and max. */
export function row(name: string, xs: number[], width = NAME_WIDTH): string {
  if (xs.length === 0) return `${name.padEnd(width)}${'-'.padStart(11)}`;
  return `${name.padEnd(width)}${fmtMs(median(xs))}${fmtMs(Math.min(...xs))}${fmtMs(Math.max(...xs))}`;
}

/** Where CRIU's kernel probe cache is, for the benchmark's heading. */
export function kdatNote(): string {
  try {
    return `-> ${readlinkSync('/run/criu.kdat')}`;
  } catch {
    return existsSync('/run/criu.kdat') ? 'a file' : 'absent';
  }
}
