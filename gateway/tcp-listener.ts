import net, { type AddressInfo, type Socket } from 'node:net';
import type { Logger } from '../shared/log.js';
import type { Metrics } from '../shared/metrics.js';
import type { Endpoint } from '../shared/protocol.js';
import type { Hold } from './hold.js';
import type { AppLifecycle } from './lifecycle.js';
import type { AppRoute, RouteTable } from './routes.js';

export interface TcpListenerOptions {
  routes: RouteTable;
  hold: Hold;
  lifecycle: AppLifecycle;
  /** unused for now: connection and hold metrics are kept by the lifecycle and the hold */
  metrics: Metrics;
  log: Logger;
  /** in ms; default 10 s: connecting to a running app's endpoint */
  connectTimeoutMs?: number;
}

/** Most bytes kept from a held client; then it is paused and the kernel keeps the rest. */
const MAX_HELD_BYTES = 64 * 1024;

/**
 * Raw TCP for apps with `tcp` ports: one listener per (app address, port), routed by the
 * connection's destination (socket.localAddress/localPort). The chain, outermost first:
 *
 *   accept → route by destination → hold until the app has an endpoint (failure: the client
 *   is dropped) → connect → pipe both ways, half-closes included
 *
 * Lifecycle: start() listens on every address; stop() closes listeners and connections and
 * works after a failed or partial start.
 */
export class TcpListener {
  private readonly opts: TcpListenerOptions;
  private readonly log: Logger;
  private readonly servers: net.Server[] = [];
  private readonly connections = new Set<TcpConnection>();
  private nextId = 1;

  constructor(opts: TcpListenerOptions) {
    this.opts = opts;
    this.log = opts.log.child({ listener: 'tcp' });
  }

  async start(): Promise<AddressInfo[]> {
    const addrs: AddressInfo[] = [];
    for (const route of this.opts.routes.apps.values()) {
      if (route.address === undefined) continue;
      for (const port of route.tcpPorts) {
        const server = net.createServer({ allowHalfOpen: true, noDelay: true }, (socket) => this.accept(socket));
        this.servers.push(server);
        server.on('error', (err) => this.log.error({ err: err.message, app: route.name, port }, 'TCP listener error'));
        await new Promise<void>((resolve, reject) => {
          const onError = (err: Error): void => reject(err);
          server.once('error', onError);
          server.listen(port, route.address, () => {
            server.removeListener('error', onError);
            resolve();
          });
        });
        const addr = server.address() as AddressInfo;
        this.log.info({ app: route.name, address: addr.address, port: addr.port }, 'TCP listener started');
        addrs.push(addr);
      }
    }
    return addrs;
  }

  async stop(): Promise<void> {
    const servers = this.servers.splice(0);
    for (const conn of [...this.connections]) conn.destroy();
    await Promise.all(servers.map((s) => (s.listening ? new Promise<void>((resolve) => s.close(() => resolve())) : undefined)));
  }

  /** Client connections open right now. */
  get connectionCount(): number {
    return this.connections.size;
  }

  private accept(client: Socket): void {
    const route = this.opts.routes.byAddress(client.localAddress ?? '', client.localPort ?? 0);
    if (!route) {
      // Only routes' addresses are listened on; a miss means the route table and listeners disagree.
      this.log.warn({ address: client.localAddress, port: client.localPort }, 'TCP connection to no app');
      client.destroy();
      return;
    }
    const conn = new TcpConnection(client, route, client.localPort!, this.opts, this.log.child({ conn: this.nextId++, app: route.name }), () =>
      this.connections.delete(conn),
    );
    this.connections.add(conn);
  }
}

/*
 * One client connection: held (its bytes read and kept, bounded) until the app runs, then piped
 * to one upstream connection. Reading while held is what lets a client that goes away (reset)
 * abort its hold; a half-close (FIN) while held is kept and passed on, since raw TCP clients
 * may send a request, shut down writing and wait for the answer.
 */
class TcpConnection {
  private upstream: Socket | null = null;
  private held: Buffer[] = [];
  private heldBytes = 0;
  private clientEnded = false;
  private readonly abort = new AbortController();
  private closed = false;
  private connectTimer: NodeJS.Timeout | null = null;

  constructor(
    private readonly client: Socket,
    private readonly route: AppRoute,
    private readonly port: number,
    private readonly opts: TcpListenerOptions,
    private readonly log: Logger,
    private readonly onClosed: () => void,
  ) {
    // The lifecycle (placement) keeps the count and the picocenter_open_connections gauge.
    opts.lifecycle.connectionOpened(route.name);
    client.on('data', this.onHeldData);
    client.on('end', this.onHeldEnd);
    client.on('error', (err) => this.log.debug({ err: err.message }, 'client connection error'));
    client.on('close', (hadError) => this.closedSide(client, hadError));
    opts.hold.waitForReady(route, port, 'tcp', this.abort.signal).then(
      (endpoint) => this.connect(endpoint),
      (err: unknown) => {
        if (this.closed) return;
        this.log.debug({ err: (err as Error).message }, 'hold failed; dropping the client');
        this.destroy();
      },
    );
  }

  destroy(): void {
    if (this.closed) return;
    this.closed = true;
    this.abort.abort();
    if (this.connectTimer) clearTimeout(this.connectTimer);
    this.upstream?.destroy();
    this.client.destroy();
    this.opts.lifecycle.connectionClosed(this.route.name);
    this.onClosed();
  }

  private readonly onHeldData = (chunk: Buffer): void => {
    this.held.push(chunk);
    this.heldBytes += chunk.length;
    if (this.heldBytes >= MAX_HELD_BYTES) this.client.pause();
  };

  private readonly onHeldEnd = (): void => {
    this.clientEnded = true;
  };

  private connect(endpoint: Endpoint): void {
    if (this.closed) return;
    const up = net.connect({ host: endpoint.host, port: endpoint.port, noDelay: true, allowHalfOpen: true });
    this.upstream = up;
    this.connectTimer = setTimeout(() => up.destroy(new Error('connect timed out')), this.opts.connectTimeoutMs ?? 10_000);
    up.on('error', (err) => this.log.debug({ err: err.message, endpoint }, 'upstream connection error'));
    up.on('close', (hadError) => this.closedSide(up, hadError));
    up.once('connect', () => {
      if (this.connectTimer) clearTimeout(this.connectTimer);
      this.connectTimer = null;
      const client = this.client;
      client.removeListener('data', this.onHeldData);
      client.removeListener('end', this.onHeldEnd);
      // The held bytes go first, in order; then the sockets are piped (with backpressure).
      for (const chunk of this.held) up.write(chunk);
      this.held = [];
      if (this.clientEnded) up.end();
      else client.pipe(up);
      up.pipe(client);
      client.resume();
    });
  }

  /**
   * One side closed. Cleanly: it has sent its end (passed on by pipe) and received ours, so the
   * other side only has to flush. With an error, or before the pipe was set up: drop both.
   */
  private closedSide(side: Socket, hadError: boolean): void {
    if (this.closed) return;
    const other = side === this.client ? this.upstream : this.client;
    const piped = this.upstream !== null && this.connectTimer === null;
    if (hadError || !piped || other === null) return this.destroy();
    other.destroySoon();
    if (other.destroyed) this.destroy();
    else other.once('close', () => this.destroy());
  }
}
