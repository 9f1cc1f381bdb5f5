/*
 * HTTP benchmark: wrk through Picocenter's HttpListener against wrk through nginx (a keep-alive
 * reverse proxy) and wrk straight at the app, same app, same run.
 *
 *   npx tsc -p . && node dist/bench/http.js [--seconds 10] [--connections 50] [--warmup 2]
 *                                           [--runs 1] [--profile DIR]
 *
 * Three processes besides wrk: the app (a node:http hello server with a small fixed body), our
 * gateway (an HttpListener whose app is always running) and nginx (worker_processes 1,
 * keepalive upstream, the same X-Forwarded-* headers we set). Each target gets a --warmup run,
 * then `wrk -t1 -c<connections> -d<seconds>s --latency`. With --runs N the targets alternate N
 * times (in rotating order) and the median run of each is reported. Besides req/s and latency
 * it reports CPU time per request of the proxy process(es) (of the app for direct), read from
 * /proc: on a shared machine that is steadier than req/s. Loopback only; everything it starts is stopped
 * and its temp dir removed. Needs wrk and nginx (scripts/install.sh --bench).
 *
 * Roles (internal): `--upstream` runs the app, `--gateway PORT` runs our listener in front of
 * 127.0.0.1:PORT; both print {"port":N} on stdout once they listen.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseConfig } from '../shared/config.js';
import { silentLogger } from '../shared/log.js';
import { Metrics } from '../shared/metrics.js';
import type { Endpoint } from '../shared/protocol.js';
import { Hold } from '../gateway/hold.js';
import { HttpListener } from '../gateway/http-listener.js';
import type { AppLifecycle } from '../gateway/lifecycle.js';
import { RouteTable } from '../gateway/routes.js';

const HOST = 'hello.bench.test';
const NGINX = '/usr/sbin/nginx';
const BODY = 'hello from the bench app\n';

// ─── roles ───────────────────────────────────────────────────────────────────

async function runUpstream(): Promise<void> {
  const server = http.createServer((_req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': BODY.length });
    res.end(BODY);
  });
  server.keepAliveTimeout = 120_000;
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  process.stdout.write(`${JSON.stringify({ port: (server.address() as AddressInfo).port })}\n`);
}

/** The app is always running at the bench upstream: the listener's forwarding cost alone. */
class AlwaysRunning implements AppLifecycle {
  constructor(private readonly ep: Endpoint) {}
  endpoint(): Endpoint {
    return this.ep;
  }
  wake(): void {}
  subscribe(): () => void {
    return () => {};
  }
  connectionOpened(): void {}
  connectionClosed(): void {}
}

async function runGateway(upstreamPort: number): Promise<void> {
  const cfg = parseConfig(
    `gateway:
  dns: { zones: [bench.test] }
  admin: { token: bench-token-123 }
  http: { listen: 127.0.0.1:0 }
apps:
  - { name: hello, domains: [${HOST}], command: [node, hello.js], http: { port: 9001 } }
`,
    'bench.yaml',
  );
  const log = silentLogger();
  const metrics = new Metrics();
  const lifecycle = new AlwaysRunning({ host: '127.0.0.1', port: upstreamPort });
  const listener = new HttpListener({
    listen: cfg.gateway.http.listen,
    maxHeaderSize: cfg.gateway.http.maxHeaderSize,
    routes: new RouteTable(cfg),
    hold: new Hold(lifecycle, metrics, log),
    lifecycle,
    metrics,
    log,
  });
  const addr = await listener.start();
  // SIGTERM must end the process normally so that --cpu-prof writes its profile.
  process.on('SIGTERM', () => void listener.stop().then(() => process.exit(0)));
  process.stdout.write(`${JSON.stringify({ port: addr.port })}\n`);
}

// ─── orchestration ───────────────────────────────────────────────────────────

interface Options {
  seconds: number;
  connections: number;
  warmup: number;
  runs: number;
  profile?: string;
}

function parseArgs(argv: string[]): Options {
  const o: Options = { seconds: 10, connections: 50, warmup: 2, runs: 1 };
  for (let i = 0; i < argv.length; i += 2) {
    const [k, v] = [argv[i], argv[i + 1]];
    if (v === undefined) throw new Error(`missing value for ${k}`);
    if (k === '--seconds') o.seconds = Number(v);
    else if (k === '--connections') o.connections = Number(v);
    else if (k === '--warmup') o.warmup = Number(v);
    else if (k === '--runs') o.runs = Number(v);
    else if (k === '--profile') o.profile = path.resolve(v);
    else throw new Error(`unknown option ${k}`);
  }
  return o;
}

/** Starts `node <this file> args` and resolves with the child and the port it printed. */
function spawnRole(args: string[], nodeArgs: string[] = []): Promise<{ child: ChildProcess; port: number }> {
  const self = fileURLToPath(import.meta.url);
  const child = spawn(process.execPath, [...nodeArgs, self, ...args], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const nl = out.indexOf('\n');
      if (nl >= 0) resolve({ child, port: (JSON.parse(out.slice(0, nl)) as { port: number }).port });
    });
    child.once('exit', (code) => reject(new Error(`${args.join(' ')} exited with ${code} before listening`)));
    setTimeout(() => reject(new Error(`${args.join(' ')} did not start in 10 s`)), 10_000).unref();
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer().once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

async function waitForPort(port: number, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => (s.destroy(), resolve(true)));
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on port ${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function nginxConf(dir: string, port: number, upstreamPort: number, connections: number): string {
  return `worker_processes 1;
daemon off;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections ${Math.max(1024, connections * 4)}; }
http {
  access_log off;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  upstream app {
    server 127.0.0.1:${upstreamPort};
    keepalive ${connections * 2};
  }
  server {
    listen 127.0.0.1:${port};
    keepalive_requests 1000000;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
    }
  }
}
`;
}

interface WrkResult {
  rps: number;
  p50Ms: number;
  p99Ms: number;
  errors: string;
  /** CPU time of the proxy's processes (the app's for direct) per request, in µs */
  cpuUsPerReq: number;
}

const CLOCK_TICKS_PER_S = 100; // USER_HZ on Linux

/** CPU seconds (user + system) a process and its children-as-threads have used so far. */
function cpuSeconds(pids: number[]): number {
  let ticks = 0;
  for (const pid of pids) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      ticks += Number(f[11]) + Number(f[12]); // utime, stime (fields 14 and 15)
    } catch {
      // gone
    }
  }
  return ticks / CLOCK_TICKS_PER_S;
}

/** A process and its direct children (nginx's master and worker). */
function processTree(pid: number): number[] {
  try {
    const kids = readFileSync(`/proc/${pid}/task/${pid}/children`, 'latin1').trim();
    return [pid, ...(kids ? kids.split(' ').map(Number) : [])];
  } catch {
    return [pid];
  }
}

function toMs(text: string): number {
  const m = /^([\d.]+)(us|ms|s|m)$/.exec(text);
  if (!m) return NaN;
  const n = Number(m[1]);
  return m[2] === 'us' ? n / 1000 : m[2] === 'ms' ? n : m[2] === 's' ? n * 1000 : n * 60_000;
}

async function measure(port: number, pids: number[], seconds: number, connections: number): Promise<WrkResult> {
  const before = cpuSeconds(pids);
  const r = await wrk(port, seconds, connections);
  const cpu = cpuSeconds(pids) - before;
  return { ...r, cpuUsPerReq: (cpu * 1e6) / (r.rps * seconds) };
}

function wrk(port: number, seconds: number, connections: number): Promise<Omit<WrkResult, 'cpuUsPerReq'>> {
  const args = ['-t1', `-c${connections}`, `-d${seconds}s`, '--latency', '-H', `Host: ${HOST}`, `http://127.0.0.1:${port}/`];
  return new Promise((resolve, reject) => {
    execFile('wrk', args, { timeout: (seconds + 30) * 1000 }, (err, stdout) => {
      if (err) return reject(err);
      const rps = /Requests\/sec:\s+([\d.]+)/.exec(stdout);
      const p50 = /^\s+50%\s+(\S+)/m.exec(stdout);
      const p99 = /^\s+99%\s+(\S+)/m.exec(stdout);
      if (!rps || !p50 || !p99) return reject(new Error(`cannot parse wrk output:\n${stdout}`));
      const errors = [/Socket errors:.*/.exec(stdout)?.[0], /Non-2xx or 3xx responses:.*/.exec(stdout)?.[0]].filter(Boolean).join('; ');
      resolve({ rps: Number(rps[1]), p50Ms: toMs(p50[1]!), p99Ms: toMs(p99[1]!), errors });
    });
  });
}

function median(rs: WrkResult[]): WrkResult {
  const sorted = [...rs].sort((a, b) => a.rps - b.rps);
  return sorted[Math.floor((sorted.length - 1) / 2)]!;
}

async function main(): Promise<void> {
  const opts = parseArgs(process.argv.slice(2));
  const children: ChildProcess[] = [];
  const dir = mkdtempSync(path.join(os.tmpdir(), 'pico-bench-http-'));
  const cleanup = (): void => {
    for (const c of children) if (c.exitCode === null) c.kill('SIGTERM');
  };
  process.on('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  try {
    const upstream = await spawnRole(['--upstream']);
    children.push(upstream.child);
    const nodeArgs = opts.profile ? ['--cpu-prof', '--cpu-prof-dir', opts.profile] : [];
    const gateway = await spawnRole(['--gateway', String(upstream.port)], nodeArgs);
    children.push(gateway.child);

    const nginxPort = await freePort();
    for (const d of ['body', 'proxy', 'fastcgi', 'uwsgi', 'scgi']) mkdirSync(path.join(dir, d));
    writeFileSync(path.join(dir, 'nginx.conf'), nginxConf(dir, nginxPort, upstream.port, opts.connections));
    const nginx = spawn(NGINX, ['-p', dir, '-c', path.join(dir, 'nginx.conf'), '-e', path.join(dir, 'error.log')], { stdio: 'inherit' });
    children.push(nginx);
    await waitForPort(nginxPort);

    const targets = [
      { name: 'direct', port: upstream.port, pids: [upstream.child.pid!] },
      { name: 'nginx', port: nginxPort, pids: processTree(nginx.pid!) },
      { name: 'gateway', port: gateway.port, pids: [gateway.child.pid!] },
    ];
    const results = new Map<string, WrkResult[]>(targets.map((t) => [t.name, []]));
    console.log(`wrk -t1 -c${opts.connections} -d${opts.seconds}s --latency, ${opts.runs} run(s), ${os.cpus().length} CPUs, node ${process.version}`);
    for (let run = 1; run <= opts.runs; run++) {
      // Rotate the order, so that load drifting during the run does not favour one target.
      const order = targets.map((_, i) => targets[(i + run - 1) % targets.length]!);
      for (const t of order) {
        if (opts.warmup > 0) await wrk(t.port, opts.warmup, opts.connections);
        const r = await measure(t.port, t.pids, opts.seconds, opts.connections);
        results.get(t.name)!.push(r);
        console.log(
          `  run ${run} ${t.name.padEnd(8)} ${r.rps.toFixed(0).padStart(8)} req/s  p50 ${r.p50Ms.toFixed(2)} ms  p99 ${r.p99Ms.toFixed(2)} ms` +
            `  ${r.cpuUsPerReq.toFixed(1)} µs CPU/req${r.errors ? `  (${r.errors})` : ''}`,
        );
      }
    }

    const m = Object.fromEntries(targets.map((t) => [t.name, median(results.get(t.name)!)])) as Record<string, WrkResult>;
    console.log('\ntarget      req/s   p50 ms   p99 ms   CPU µs/req (proxy; the app for direct)');
    for (const t of targets) {
      const r = m[t.name]!;
      console.log(
        `${t.name.padEnd(8)} ${r.rps.toFixed(0).padStart(8)} ${r.p50Ms.toFixed(2).padStart(8)} ${r.p99Ms.toFixed(2).padStart(8)} ${r.cpuUsPerReq.toFixed(1).padStart(8)}`,
      );
    }
    const g = m.gateway!;
    console.log(`\ngateway/nginx  throughput ${(g.rps / m.nginx!.rps).toFixed(2)}x  p99 ${(g.p99Ms / m.nginx!.p99Ms).toFixed(2)}x`);
    console.log(`gateway/direct throughput ${(g.rps / m.direct!.rps).toFixed(2)}x  p99 ${(g.p99Ms / m.direct!.p99Ms).toFixed(2)}x`);
    console.log(`nginx/direct   throughput ${(m.nginx!.rps / m.direct!.rps).toFixed(2)}x`);
  } finally {
    cleanup();
    await Promise.all(children.map((c) => (c.exitCode === null && c.signalCode === null ? new Promise((r) => c.once('exit', r)) : undefined)));
    rmSync(dir, { recursive: true, force: true });
  }
}

const role = process.argv[2];
if (role === '--upstream') await runUpstream();
else if (role === '--gateway') await runGateway(Number(process.argv[3]));
else await main();
