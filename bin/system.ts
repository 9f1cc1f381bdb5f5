import { isIP, type AddressInfo } from 'node:net';
import path from 'node:path';
import type { Config, ListenAddress } from '../shared/config.js';
import type { Logger } from '../shared/log.js';
import { Metrics } from '../shared/metrics.js';
import { DnsServer } from '../dns/server.js';
import { buildZone } from '../dns/zone.js';
import { AdminServer } from '../gateway/admin.js';
import { Hold } from '../gateway/hold.js';
import { HttpListener } from '../gateway/http-listener.js';
import { Placement } from '../gateway/placement.js';
import { RouteTable } from '../gateway/routes.js';
import { TcpListener } from '../gateway/tcp-listener.js';
import { RemoteWorkerConnection } from '../gateway/remote-worker.js';
import type { WorkerConnection } from '../shared/protocol.js';
import { AgentServer } from '../worker/agent-server.js';
import { LocalWorkerConnection } from '../worker/local-connection.js';
import { OciRuntime } from '../worker/oci-runtime.js';
import { ProcessRuntime } from '../worker/process-runtime.js';
import type { ContainerRuntime } from '../worker/runtime.js';
import { ActiveSetStore, ChunkCache, openImageStore } from '../pagestore/index.js';
import { Worker } from '../worker/worker.js';

/** A whole Picocenter in one process: what `picocenter up` runs, and what e2e tests start. */
export interface System {
  readonly placement: Placement;
  readonly routes: RouteTable;
  readonly metrics: Metrics;
  readonly addresses: { dns: AddressInfo; http: AddressInfo; admin: AddressInfo };
  stop(): Promise<void>;
}

/**
 * The composition root. Start order: worker → placement → listeners (HTTP, TCP) → DNS → admin,
 * so nothing is announced before what it points at can hold clients. Stop runs in reverse and
 * works after a partial start.
 */
export async function startSystem(cfg: Readonly<Config>, log: Logger): Promise<System> {
  const metrics = new Metrics();
  const routes = new RouteTable(cfg);
  // The embedded worker first: ties in placement go to it.
  const workers: WorkerConnection[] = [];
  if (cfg.gateway.embeddedWorker) {
    const workerLog = log.child({ worker: 'local' });
    workers.push(new LocalWorkerConnection(new Worker('local', await createRuntime(cfg, workerLog, metrics), workerLog)));
  }
  for (const w of cfg.workers) {
    workers.push(
      new RemoteWorkerConnection({ id: w.id, url: w.url, token: w.token, log, operationTimeoutMs: w.operationTimeout, queryTimeoutMs: w.queryTimeout }),
    );
  }
  const placement = new Placement({ config: cfg, workers, metrics, log });
  const hold = new Hold(placement, metrics, log);

  const stops: Array<() => Promise<void>> = [];
  const stop = async () => {
    for (const s of stops.reverse()) {
      try {
        await s();
      } catch (err) {
        log.error({ err: (err as Error).message }, 'stop step failed');
      }
    }
  };
  // Closing the embedded worker's connection stops it; a remote one is only disconnected.
  for (const w of workers) stops.push(() => w.close());
  stops.push(() => placement.stop());
  try {
    await placement.init();
    const startHttp = async (listen: ListenAddress) => {
      const listener = new HttpListener({
        listen,
        maxHeaderSize: cfg.gateway.http.maxHeaderSize,
        headerTimeoutMs: cfg.gateway.http.headerTimeout,
        connectTimeoutMs: cfg.gateway.connectTimeout,
        routes,
        hold,
        lifecycle: placement,
        metrics,
        log,
      });
      stops.push(() => listener.stop());
      return listener.start();
    };
    const http = await startHttp(cfg.gateway.http.listen);
    // An app with its own address is looked up to that address, so its HTTP port is served
    // there too (same port as the shared listener, routed by Host as usual).
    const ownHttp = new Set([...routes.apps.values()].filter((r) => r.address && r.httpPort !== undefined).map((r) => r.address!));
    for (const host of ownHttp) await startHttp({ host, port: http.port });

    const tcpListener = new TcpListener({ routes, hold, lifecycle: placement, metrics, log, connectTimeoutMs: cfg.gateway.connectTimeout });
    stops.push(() => tcpListener.stop());
    await tcpListener.start();

    const httpAddress = cfg.gateway.http.address ?? advertisable(cfg.gateway.http.listen.host);
    const dnsHost = cfg.gateway.dns.listen.host;
    const zone = buildZone({
      zones: cfg.gateway.dns.zones,
      ttlMs: cfg.gateway.dns.ttl,
      nameserverAddress: isWildcard(dnsHost) ? httpAddress : dnsHost,
      // A name DNS cannot serve (e.g. an app named ns.<zone>) is reported; the others are served.
      onProblem: (p) => log.warn({ app: p.app, name: p.name }, `dns name not served: ${p.message}`),
      apps: [...routes.apps.values()].map((r) => {
        const address = r.address ?? httpAddress;
        return { app: r.name, names: r.domains, a: isIP(address) === 4 ? [address] : [], aaaa: isIP(address) === 6 ? [address] : [] };
      }),
    });
    const dns = new DnsServer({ listen: cfg.gateway.dns.listen, zone, waker: { onLookup: (app) => placement.wake(app, 'dns') }, metrics, log });
    stops.push(() => dns.stop());
    const dnsAddrs = await dns.start();

    const admin = new AdminServer({ listen: cfg.gateway.admin.listen, token: cfg.gateway.admin.token, placement, routes, hold, metrics, log });
    stops.push(() => admin.stop());
    const adminAddr = await admin.start();

    log.info({ dns: dnsAddrs.udp, http, admin: adminAddr, apps: routes.apps.size }, 'picocenter up');
    return { placement, routes, metrics, addresses: { dns: dnsAddrs.udp, http, admin: adminAddr }, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

function isWildcard(host: string): boolean {
  return host === '0.0.0.0' || host === '::';
}

/** A wildcard listen address cannot be given out in DNS answers. */
function advertisable(host: string): string {
  if (isWildcard(host)) {
    throw new Error(`gateway listens on ${host}: set gateway.http.address to the address clients should reach`);
  }
  return host;
}

/** A worker alone, serving the worker protocol: what `picocenter worker` runs. */
export interface WorkerAgent {
  readonly id: string;
  /** where the agent listens, as a URL for the gateway's `workers[].url` */
  readonly url: string;
  /** Stops serving, then stops or checkpoints (`worker.shutdown`) every container. */
  stop(): Promise<void>;
}

/**
 * Starts a worker and its agent. Order: runtime → worker → agent (listening last, so nothing
 * is served before it can be answered). Stop: the agent stops accepting calls first, then the
 * worker shuts down (its `checkpointed` events still reach connected gateways), then the
 * agent's connections close.
 */
export async function startWorkerAgent(cfg: Readonly<Config>, log: Logger, opts: { id: string; listen?: ListenAddress }): Promise<WorkerAgent> {
  if (!cfg.worker.token) throw new Error('picocenter worker needs worker.token in the config (the bearer token gateways present)');
  const workerLog = log.child({ worker: opts.id });
  const metrics = new Metrics();
  const worker = new Worker(opts.id, await createRuntime(cfg, workerLog, metrics), workerLog);
  const agent = new AgentServer({ worker, listen: opts.listen ?? cfg.worker.listen, token: cfg.worker.token, log, metrics: metrics.registry });
  let addr: AddressInfo;
  try {
    addr = await agent.start();
  } catch (err) {
    await worker.shutdown('stop');
    throw err;
  }
  const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
  const url = `http://${host}:${addr.port}`;
  return {
    id: opts.id,
    url,
    async stop() {
      agent.drain();
      await worker.shutdown(cfg.worker.shutdown);
      await agent.stop();
    },
  };
}

/**
 * The runtime the config asks for. `oci` on a host that cannot checkpoint fails with the host
 * check's plain-English report; it never falls back to the cold-start runtime.
 */
async function createRuntime(cfg: Readonly<Config>, log: Logger, metrics: Metrics): Promise<ContainerRuntime> {
  switch (cfg.worker.runtime) {
    case 'process':
      return new ProcessRuntime(log, path.join(cfg.worker.dataDir, 'logs'));
    case 'oci': {
      const imageStore = openImageStore(cfg.store, { log });
      const { cache } = cfg.worker;
      const chunkCache = await ChunkCache.open({
        memoryBytes: cache.memory,
        ...(cache.disk > 0 ? { diskBytes: cache.disk, diskPath: cache.path } : {}),
        log: log.child({ part: 'chunk-cache' }),
      });
      const { runtime } = await OciRuntime.create({
        log,
        imageStore,
        stateDir: path.join(cfg.worker.dataDir, 'oci'),
        chunkCache,
        activeSets: new ActiveSetStore(imageStore.store),
        favorDynmods: cfg.worker.favorDynmods,
        rcuExpedited: cfg.worker.rcuExpedited,
        onCheckpoint: (app, r) => metrics.checkpointed(app, r.imageBytes, r.uploadedBytes),
        onLazyRestore: (app, mode, o) => metrics.lazyRestored(app, mode, o),
      });
      return runtime;
    }
  }
}
