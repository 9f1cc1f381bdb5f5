/*
 * DNS benchmark: Picocenter's DnsServer against Knot DNS, same names, same queries, same run.
 *
 *   npx tsc -p . && node dist/bench/dns.js [--seconds 10] [--clients 4] [--max-qps 500000]
 *                                          [--runs 1] [--mode udp|tcp] [--apps 200]
 *
 * Each server runs in its own process on 127.0.0.1 and a free port; `dnsperf` loads it for
 * --seconds and the script prints queries/s, the ratio ours/Knot and dnsperf's latency. With
 * --runs N the two servers alternate N times (each from a fresh process) and the median run of
 * each is reported. Needs knotd and dnsperf (scripts/install.sh --bench).
 *
 * `node dist/bench/dns.js --serve APPS` is the entry of our server's process: it builds the
 * bench zone, starts a DnsServer and prints {"port":N} on stdout.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import dgram from 'node:dgram';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { DnsServer } from '../dns/server.js';
import { buildZone, type ZoneApp } from '../dns/zone.js';
import { silentLogger } from '../shared/log.js';
import { Metrics } from '../shared/metrics.js';

const ZONE = 'bench.test';
const TTL_S = 5;

/** The bench zone: app i answers at app<i>.bench.test with 127.0.<1+i/250>.<1+i%250>; every
 *  fourth app also has an IPv6 address. */
function benchApps(n: number): ZoneApp[] {
  return Array.from({ length: n }, (_, i) => ({
    app: `app${i}`,
    names: [`app${i}.${ZONE}`],
    a: [`127.0.${1 + Math.floor(i / 250)}.${1 + (i % 250)}`],
    aaaa: i % 4 === 0 ? [`fd00::${(i + 1).toString(16)}`] : [],
  }));
}

/** The query mix: mostly A for app names (the wake path), some AAAA (answers and NODATA),
 *  some apex SOA/NS, some NXDOMAIN. Case varied as resolvers do (0x20). */
function queryFile(apps: ZoneApp[]): string {
  const lines: string[] = [];
  apps.forEach((a, i) => {
    const name = a.names[0]!;
    lines.push(`${name} A`, `${i % 2 ? name.toUpperCase() : name} A`, `${name} A`, `${name} AAAA`);
    if (i % 10 === 0) lines.push(`nope${i}.${ZONE} A`, `${ZONE} SOA`, `${ZONE} NS`);
  });
  return `${lines.join('\n')}\n`;
}

function knotZoneFile(apps: ZoneApp[]): string {
  const out = [
    `$ORIGIN ${ZONE}.`,
    `$TTL ${TTL_S}`,
    `@ SOA ns.${ZONE}. hostmaster.${ZONE}. 1 3600 900 1209600 ${TTL_S}`,
    `@ NS ns.${ZONE}.`,
    'ns A 127.0.0.1',
  ];
  for (const a of apps) {
    const label = a.names[0]!.slice(0, -(ZONE.length + 1));
    for (const x of a.a) out.push(`${label} A ${x}`);
    for (const x of a.aaaa) out.push(`${label} AAAA ${x}`);
  }
  return `${out.join('\n')}\n`;
}

function knotConf(dir: string, port: number): string {
  return `server:
    rundir: "${dir}/run"
    listen: 127.0.0.1@${port}
database:
    storage: "${dir}/db"
template:
  - id: default
    storage: "${dir}"
    zonefile-load: whole
    journal-content: none
zone:
  - domain: ${ZONE}
    file: "${dir}/${ZONE}.zone"
log:
  - target: stderr
    any: warning
`;
}

async function freePort(): Promise<number> {
  const s = dgram.createSocket('udp4');
  await new Promise<void>((resolve) => s.bind(0, '127.0.0.1', resolve));
  const { port } = s.address();
  await new Promise<void>((resolve) => s.close(resolve));
  return port;
}

/** Resolves once the server answers an SOA query, polling; rejects after `ms`. */
async function waitForDns(port: number, ms: number): Promise<void> {
  const q = Buffer.from([0x12, 0x34, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 5, ...Buffer.from('bench'), 4, ...Buffer.from('test'), 0, 0, 6, 0, 1]);
  const deadline = Date.now() + ms;
  const sock = dgram.createSocket('udp4');
  try {
    while (Date.now() < deadline) {
      const answered = await new Promise<boolean>((resolve) => {
        const t = setTimeout(() => resolve(false), 100);
        sock.once('message', () => {
          clearTimeout(t);
          resolve(true);
        });
        sock.send(q, port, '127.0.0.1');
      });
      if (answered) return;
    }
    throw new Error(`no DNS answer on port ${port} within ${ms}ms`);
  } finally {
    sock.close();
  }
}

interface PerfResult {
  qps: number;
  /** the server's CPU time (all threads, user + system) per answered query */
  cpuUsPerQuery: number;
  completed: string;
  lost: string;
  latencyMs: number;
  latencyMinMs: number;
  latencyMaxMs: number;
  stddevMs: number;
}

/** utime + stime of a process, all threads, in milliseconds (Linux /proc; USER_HZ = 100). */
function cpuMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

async function measure(pid: number, port: number, file: string, o: Options): Promise<PerfResult> {
  const before = cpuMs(pid);
  const r = await runDnsperf(port, file, o);
  const queries = Number(/^\d+/.exec(r.completed)?.[0] ?? 0);
  return { ...r, cpuUsPerQuery: queries > 0 ? ((cpuMs(pid) - before) * 1000) / queries : NaN };
}

function runDnsperf(port: number, file: string, o: Options): Promise<Omit<PerfResult, 'cpuUsPerQuery'>> {
  const args = ['-s', '127.0.0.1', '-p', String(port), '-d', file, '-l', String(o.seconds), '-c', String(o.clients), '-Q', String(o.maxQps), '-m', o.mode];
  return new Promise((resolve, reject) => {
    execFile('dnsperf', args, { timeout: (o.seconds + 30) * 1000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`dnsperf failed: ${err.message}\n${stderr}`));
      const num = (re: RegExp) => {
        const m = re.exec(stdout);
        if (!m) throw new Error(`unexpected dnsperf output:\n${stdout}`);
        return m;
      };
      try {
        const lat = num(/Average Latency \(s\):\s+([\d.]+) \(min ([\d.]+), max ([\d.]+)\)/);
        resolve({
          qps: Number(num(/Queries per second:\s+([\d.]+)/)[1]),
          completed: num(/Queries completed:\s+(.+)/)[1]!.trim(),
          lost: num(/Queries lost:\s+(.+)/)[1]!.trim(),
          latencyMs: Number(lat[1]) * 1000,
          latencyMinMs: Number(lat[2]) * 1000,
          latencyMaxMs: Number(lat[3]) * 1000,
          stddevMs: Number(num(/Latency StdDev \(s\):\s+([\d.]+)/)[1]) * 1000,
        });
      } catch (e) {
        reject(e);
      }
    });
  });
}

function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    child.once('exit', () => resolve());
    child.kill('SIGTERM');
  });
}

async function startOurs(apps: number, extraNodeArgs: string[]): Promise<{ port: number; child: ChildProcess }> {
  const self = fileURLToPath(import.meta.url);
  const child = spawn(process.execPath, [...extraNodeArgs, self, '--serve', String(apps)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<number>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const m = /\{"port":(\d+)\}/.exec(out);
      if (m) resolve(Number(m[1]));
    });
    child.once('exit', (code) => reject(new Error(`our dns server exited (${code}) before listening`)));
  });
  await waitForDns(port, 5000);
  return { port, child };
}

async function startKnot(dir: string, apps: ZoneApp[]): Promise<{ port: number; child: ChildProcess }> {
  const port = await freePort();
  mkdirSync(path.join(dir, 'run'), { recursive: true });
  mkdirSync(path.join(dir, 'db'), { recursive: true });
  writeFileSync(path.join(dir, `${ZONE}.zone`), knotZoneFile(apps));
  writeFileSync(path.join(dir, 'knot.conf'), knotConf(dir, port));
  const child = spawn('knotd', ['-c', path.join(dir, 'knot.conf')], { stdio: ['ignore', 'inherit', 'inherit'] });
  await waitForDns(port, 10_000);
  return { port, child };
}

interface Options {
  seconds: number;
  clients: number;
  maxQps: number;
  runs: number;
  mode: 'udp' | 'tcp';
  apps: number;
  profile: boolean;
}

function parseArgs(argv: string[]): Options {
  const o: Options = { seconds: 10, clients: 4, maxQps: 500_000, runs: 1, mode: 'udp', apps: 200, profile: false };
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i + 1];
    switch (argv[i]) {
      case '--seconds': o.seconds = Number(v); i++; break;
      case '--clients': o.clients = Number(v); i++; break;
      case '--max-qps': o.maxQps = Number(v); i++; break;
      case '--runs': o.runs = Number(v); i++; break;
      case '--apps': o.apps = Number(v); i++; break;
      case '--mode': o.mode = v === 'tcp' ? 'tcp' : 'udp'; i++; break;
      case '--profile': o.profile = true; break; // our server writes a .cpuprofile into the cwd
      default: throw new Error(`unknown argument ${argv[i]}`);
    }
  }
  return o;
}

const median = (xs: PerfResult[]) => [...xs].sort((a, b) => a.qps - b.qps)[Math.floor(xs.length / 2)]!;
const fmt = (r: PerfResult) =>
  `${Math.round(r.qps).toString().padStart(7)} q/s   cpu ${r.cpuUsPerQuery.toFixed(1)} us/query   latency avg ${r.latencyMs.toFixed(3)} ms ` +
  `(min ${r.latencyMinMs.toFixed(3)}, max ${r.latencyMaxMs.toFixed(3)}, sd ${r.stddevMs.toFixed(3)})   completed ${r.completed}, lost ${r.lost}`;

async function bench(o: Options): Promise<void> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'pico-dnsbench-'));
  const apps = benchApps(o.apps);
  const file = path.join(dir, 'queries.txt');
  writeFileSync(file, queryFile(apps));
  const ours: PerfResult[] = [];
  const knot: PerfResult[] = [];
  const children = new Set<ChildProcess>();
  try {
    for (let run = 1; run <= o.runs; run++) {
      for (const which of ['knot', 'ours'] as const) {
        const s = which === 'ours'
          ? await startOurs(o.apps, o.profile ? ['--cpu-prof'] : [])
          : await startKnot(path.join(dir, `knot${run}`), apps);
        children.add(s.child);
        try {
          const r = await measure(s.child.pid!, s.port, file, o);
          (which === 'ours' ? ours : knot).push(r);
          console.log(`run ${run} ${which.padEnd(4)} ${fmt(r)}`);
        } finally {
          await stopChild(s.child);
          children.delete(s.child);
        }
      }
    }
  } finally {
    for (const c of children) await stopChild(c);
    rmSync(dir, { recursive: true, force: true });
  }
  const m = median(ours);
  const k = median(knot);
  console.log(`\ndnsperf -m ${o.mode} -l ${o.seconds} -c ${o.clients} -Q ${o.maxQps}, ${o.apps} apps, ${os.cpus().length} CPUs, node ${process.version}` +
    (o.runs > 1 ? `, median of ${o.runs} runs` : ''));
  console.log(`picocenter ${fmt(m)}`);
  console.log(`knot       ${fmt(k)}`);
  console.log(`ratio ours/knot: ${(m.qps / k.qps).toFixed(2)}x queries/s, ${(m.cpuUsPerQuery / k.cpuUsPerQuery).toFixed(2)}x cpu per query`);
}

/** The entry of our server's own process. */
async function serve(apps: number): Promise<void> {
  const zone = buildZone({ zones: [ZONE], ttlMs: TTL_S * 1000, nameserverAddress: '127.0.0.1', apps: benchApps(apps) });
  let lookups = 0;
  const server = new DnsServer({
    listen: { host: '127.0.0.1', port: 0 },
    zone,
    waker: { onLookup: () => void lookups++ }, // what a deduplicating placement costs: next to nothing
    metrics: new Metrics(),
    log: silentLogger(),
  });
  const { udp } = await server.start();
  process.stdout.write(`${JSON.stringify({ port: udp.port })}\n`);
  // Exit through process.exit so that --cpu-prof writes its profile.
  process.once('SIGTERM', () => void server.stop().then(() => process.exit(0)));
}

const argv = process.argv.slice(2);
if (argv[0] === '--serve') await serve(Number(argv[1] ?? 200));
else await bench(parseArgs(argv));
