/*
 * The fault proxy's network model (s3-fault-proxy.ts: a delay per request, a bandwidth cap) in
 * a child process of its own, for benchmarks: moving and pacing the bytes then takes none of
 * the measured process's event loop, as a real link to S3 would not. (In-process, the proxy
 * piped every byte of a restore's ~10 MB ActiveSet pack through the worker's event loop just
 * when the restore's FUSE reads needed it.) Tests that inject faults use the proxy itself.
 *
 *   const link = await startLinkProcess({ target: s3.endpoint });
 *   await link.shape(20, 100e6);              // every request from now on; shape(0) lifts it
 *   const n = await link.seenCount();
 *   const since = await link.seen(n);         // requests after the n-th, each with `at`
 *   await link.close();
 *
 * The child exits when its parent goes away (its stdin closes).
 */
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { startFaultProxy, type ProxiedRequest } from './s3-fault-proxy.js';

export interface LinkProcess {
  /** http://127.0.0.1:PORT */
  endpoint: string;
  /** `delayMs` per request and `bytesPerSecond` per direction (undefined: no cap) from now on */
  shape(delayMs: number, bytesPerSecond?: number): Promise<void>;
  /** how many requests the link has seen */
  seenCount(): Promise<number>;
  /** the requests after the first `from`, in order */
  seen(from: number): Promise<ProxiedRequest[]>;
  close(): Promise<void>;
}

type Command = { cmd: 'shape'; delayMs: number; bytesPerSecond?: number } | { cmd: 'count' } | { cmd: 'seen'; from: number };

const self = fileURLToPath(import.meta.url);

export async function startLinkProcess(options: { target: string }): Promise<LinkProcess> {
  const child = spawn(process.execPath, [self, '--serve', options.target], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines = createInterface({ input: child.stdout! });
  const waiting: Array<{ resolve(v: unknown): void; reject(e: Error): void }> = [];
  let gone: Error | undefined;
  const fail = (err: Error): void => {
    gone ??= err;
    for (const w of waiting.splice(0)) w.reject(err);
  };
  lines.on('line', (l) => waiting.shift()?.resolve(JSON.parse(l)));
  child.once('exit', (code, signal) => fail(new Error(`the link process exited (${code ?? signal})`)));
  child.once('error', (err) => fail(err));
  child.stdin!.on('error', () => {}); // a child gone: its exit fails what waits (EPIPE says nothing more)
  // Answers come in the order of the commands: one line each (the first: the endpoint).
  const next = <T>(): Promise<T> =>
    new Promise<T>((resolve, reject) => {
      if (gone) reject(gone);
      else waiting.push({ resolve: resolve as (v: unknown) => void, reject });
    });
  const ask = <T>(c: Command): Promise<T> => {
    const answer = next<T>();
    child.stdin!.write(`${JSON.stringify(c)}\n`);
    return answer;
  };
  const { endpoint } = await next<{ endpoint: string }>().catch((err: Error) => {
    child.kill('SIGKILL');
    throw err;
  });
  return {
    endpoint,
    shape: async (delayMs, bytesPerSecond) => {
      await ask({ cmd: 'shape', delayMs, ...(bytesPerSecond ? { bytesPerSecond } : {}) });
    },
    seenCount: async () => (await ask<{ count: number }>({ cmd: 'count' })).count,
    seen: async (from) => (await ask<{ seen: ProxiedRequest[] }>({ cmd: 'seen', from })).seen,
    close: () =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve();
        child.once('exit', () => resolve());
        child.stdin!.end();
        setTimeout(() => child.kill('SIGKILL'), 5000).unref();
      }),
  };
}

// ---- the child ---------------------------------------------------------------------------

async function serve(target: string): Promise<void> {
  const proxy = await startFaultProxy({ target });
  const say = (v: unknown): void => void process.stdout.write(`${JSON.stringify(v)}\n`);
  say({ endpoint: proxy.endpoint });
  const input = createInterface({ input: process.stdin });
  input.on('line', (l) => {
    const c = JSON.parse(l) as Command;
    if (c.cmd === 'shape') {
      proxy.delayMs = c.delayMs;
      proxy.bytesPerSecond = c.bytesPerSecond;
      say({ ok: true });
    } else if (c.cmd === 'count') say({ count: proxy.seen.length });
    else say({ seen: proxy.seen.slice(c.from) });
  });
  input.once('close', () => void proxy.close().finally(() => process.exit(0)));
}

if (process.argv[2] === '--serve' && process.argv[1] === self) await serve(process.argv[3]!);
