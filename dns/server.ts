import dgram from 'node:dgram';
import net, { isIP, type AddressInfo } from 'node:net';
import type { ListenAddress } from '../shared/config.js';
import { PicoError, describeError, isPicoError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import type { Metrics } from '../shared/metrics.js';
import { AnswerTable } from './answers.js';
import { QueryCounter } from './counter.js';
import { Responder } from './responder.js';
import { TcpFramer } from './tcp-framer.js';
import type { AppWaker, ZoneData } from './zone.js';

export interface DnsServerOptions {
  /** UDP and TCP bind the same address and port; port 0: any free port both can have */
  listen: ListenAddress;
  zone: ZoneData;
  waker: AppWaker;
  metrics: Metrics;
  log: Logger;
  /** a TCP connection with no query for this long is closed (RFC 7766 §6.2.3); default 10 s */
  tcpIdleTimeoutMs?: number;
  /** TCP connections beyond this are refused; default 1000 */
  maxTcpConnections?: number;
}

/** Attempts at finding a port free for both UDP and TCP when asked for port 0. */
const PORT_ATTEMPTS = 8;

const UDP_ERROR_LOG_INTERVAL_MS = 10_000;

type State = 'new' | 'starting' | 'running' | 'stopped';

/**
 * The authoritative DNS server: one UDP socket and one TCP listener on the same port, both
 * answering through one Responder from the current AnswerTable.
 *
 * Per query, in this order: respond → send → count → wake. The wake comes last so that
 * nothing the waker does delays the answer; it still runs in the same tick, so a test (or
 * placement) sees onLookup right after the answer leaves.
 */
export class DnsServer {
  private readonly opts: DnsServerOptions;
  private readonly log: Logger;
  private table: AnswerTable;
  private readonly responder = new Responder();
  private readonly counter: QueryCounter;
  private state: State = 'new';
  private udp: dgram.Socket | undefined;
  private tcp: net.Server | undefined;
  private readonly conns = new Set<net.Socket>();
  private readonly udpErrors = { loggedAt: -Infinity, suppressed: 0 };
  /** settles when the current start attempt has finished, either way */
  private starting: Promise<void> | undefined;

  /** Throws PICO_ERR_CONFIG for invalid zone data. */
  constructor(opts: DnsServerOptions) {
    this.opts = opts;
    this.log = opts.log;
    this.table = new AnswerTable(opts.zone);
    this.counter = new QueryCounter(opts.metrics.dnsQueries);
  }

  /**
   * Replaces the whole zone. The new table is compiled completely first; the switch is one
   * assignment, and each query reads the table once, so every answer comes wholly from the old
   * zone or wholly from the new. Throws PICO_ERR_CONFIG (keeping the old zone) when invalid.
   */
  updateZone(zone: ZoneData): void {
    this.table = new AnswerTable(zone);
    this.log.info({ zones: zone.zones, names: zone.records.size }, 'dns zone updated');
  }

  /**
   * Binds UDP, then TCP on the port UDP got. Rejects (having closed what it opened) on failure,
   * and with PICO_ERR_SHUTTING_DOWN when stop() is called meanwhile.
   */
  async start(): Promise<{ udp: AddressInfo; tcp: AddressInfo }> {
    if (this.state !== 'new') throw new PicoError('PICO_ERR_INVALID_STATE', `dns server cannot start: it is ${this.state}`);
    this.state = 'starting';
    const attempt = this.bind();
    this.starting = attempt.then(() => undefined, () => undefined);
    return attempt;
  }

  /**
   * Closes the sockets and every TCP connection. Safe at any point — before, during (start
   * then rejects) and after start, after a failed start — and more than once.
   */
  async stop(): Promise<void> {
    const wasRunning = this.state === 'running';
    this.state = 'stopped';
    // A socket is never closed in the middle of its bind: an in-flight start sees the new
    // state after its current step, closes what it opened and rejects; wait for that.
    await this.starting;
    await this.closeSockets();
    this.counter.flush();
    if (wasRunning) this.log.info('dns server stopped');
  }

  private get stopped(): boolean {
    return this.state === 'stopped';
  }

  private async bind(): Promise<{ udp: AddressInfo; tcp: AddressInfo }> {
    const { host, port } = this.opts.listen;
    const shuttingDown = () => new PicoError('PICO_ERR_SHUTTING_DOWN', 'dns server stopped while starting');
    for (let attempt = 1; ; attempt++) {
      try {
        const udp = await this.bindUdp(host, port);
        if (this.stopped) throw shuttingDown();
        const tcp = await this.listenTcp(host, udp.port);
        if (this.stopped) throw shuttingDown();
        this.state = 'running';
        this.log.info({ udp: `${udp.address}:${udp.port}`, tcp: `${tcp.address}:${tcp.port}` }, 'dns server listening');
        return { udp, tcp };
      } catch (err) {
        await this.closeSockets();
        if (this.stopped) throw isPicoError(err, 'PICO_ERR_SHUTTING_DOWN') ? err : shuttingDown();
        // Port 0: the port the OS gave UDP may be taken for TCP; try another pair.
        const retry = port === 0 && (err as NodeJS.ErrnoException).code === 'EADDRINUSE' && attempt < PORT_ATTEMPTS;
        if (!retry) {
          this.state = 'stopped';
          throw err;
        }
      }
    }
  }

  private closeSockets(): Promise<void> {
    const waits: Array<Promise<void>> = [];
    const udp = this.udp;
    this.udp = undefined;
    if (udp) {
      waits.push(new Promise((resolve) => {
        try {
          udp.close(() => resolve());
        } catch {
          resolve(); // never bound: nothing to close
        }
      }));
    }
    const tcp = this.tcp;
    this.tcp = undefined;
    if (tcp) waits.push(new Promise((resolve) => tcp.close(() => resolve())));
    for (const c of this.conns) c.destroy();
    this.conns.clear();
    return Promise.all(waits).then(() => undefined);
  }

  private bindUdp(host: string, port: number): Promise<AddressInfo> {
    const family = isIP(host) === 6 ? 6 : 4;
    const sock = dgram.createSocket({
      type: family === 6 ? 'udp6' : 'udp4',
      // dgram resolves every send's address through dns.lookup, which for an IP literal
      // defers to the next tick; replies only ever go to the IP a query came from.
      lookup: (address, _options, callback) => (callback as (e: null, a: string, f: number) => void)(null, address, family),
    });
    this.udp = sock;
    return new Promise((resolve, reject) => {
      sock.once('error', reject);
      sock.bind({ address: host, port, exclusive: true }, () => {
        sock.off('error', reject);
        sock.on('error', (err) => this.udpError(err));
        sock.on('message', (msg, rinfo) => this.onUdp(sock, msg, rinfo));
        try {
          sock.setRecvBufferSize(4 << 20); // absorb bursts; capped by net.core.rmem_max
        } catch {
          /* keep the default */
        }
        resolve(sock.address());
      });
    });
  }

  private listenTcp(host: string, port: number): Promise<AddressInfo> {
    const server = net.createServer({ noDelay: true }, (sock) => this.onTcpConnection(sock));
    server.maxConnections = this.opts.maxTcpConnections ?? 1000;
    this.tcp = server;
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port, exclusive: true }, () => {
        server.off('error', reject);
        server.on('error', (err) => this.log.warn({ err: describeError(err) }, 'dns tcp listener error'));
        resolve(server.address() as AddressInfo);
      });
    });
  }

  /**
   * Asynchronous send errors (ENOBUFS under a flood, EPERM from a firewall) arrive here, one
   * per datagram: log the first, then at most one line per interval with how many were
   * left out, so a flood cannot turn into a log flood.
   */
  private udpError(err: Error): void {
    const now = Date.now();
    if (now - this.udpErrors.loggedAt < UDP_ERROR_LOG_INTERVAL_MS) {
      this.udpErrors.suppressed++;
      return;
    }
    this.log.warn({ err: describeError(err), suppressed: this.udpErrors.suppressed }, 'dns udp socket error');
    this.udpErrors.loggedAt = now;
    this.udpErrors.suppressed = 0;
  }

  private onUdp(sock: dgram.Socket, msg: Buffer, rinfo: dgram.RemoteInfo): void {
    // Source port 0 cannot be replied to, and dgram.send throws synchronously for it: one
    // spoofed datagram would otherwise be an uncaught exception in the gateway.
    if (rinfo.port === 0) return;
    const r = this.responder;
    const out = r.respond(msg, false, this.table);
    if (out === undefined) return;
    try {
      sock.send(out, rinfo.port, rinfo.address);
    } catch (err) {
      this.log.debug({ err: describeError(err), peer: rinfo.address }, 'dns udp send failed');
      return;
    }
    this.counter.count(false, r.rcode);
    if (r.app !== undefined) this.wake(r.app);
  }

  private onTcpConnection(sock: net.Socket): void {
    if (this.state !== 'running') {
      sock.destroy();
      return;
    }
    this.conns.add(sock);
    sock.on('close', () => this.conns.delete(sock));
    sock.on('error', () => {}); // resets are routine; 'close' follows
    // Any read or write restarts the idle clock, so a connection that is still receiving a
    // slow burst of answers is not cut.
    sock.setTimeout(this.opts.tcpIdleTimeoutMs ?? 10_000, () => sock.destroy());
    sock.on('drain', () => sock.resume());
    const framer = new TcpFramer((msg) => this.onTcpMessage(sock, msg));
    sock.on('data', (chunk: Buffer) => {
      // Several queries may arrive in one chunk (pipelining, RFC 7766 §6.2.1.1): answer them
      // in order with one write.
      sock.cork();
      const ok = framer.push(chunk);
      sock.uncork();
      if (!ok) sock.destroy();
    });
  }

  /** false: the connection must close (the peer does not speak DNS). */
  private onTcpMessage(sock: net.Socket, msg: Buffer): boolean {
    if (sock.destroyed) return false;
    const r = this.responder;
    const out = r.respond(msg, true, this.table);
    if (out === undefined) return false;
    // Backpressure: a client that does not read its answers stops being read.
    if (!sock.write(out)) sock.pause();
    this.counter.count(true, r.rcode);
    if (r.app !== undefined) this.wake(r.app);
    return true;
  }

  private wake(app: string): void {
    try {
      // TypeScript lets an async function stand in for a void one: catch its rejection too,
      // or it would be an unhandled rejection, which ends the process.
      const ret: unknown = this.opts.waker.onLookup(app);
      if (ret instanceof Promise) ret.catch((err: unknown) => this.log.warn({ app, err: describeError(err) }, 'dns waker failed'));
    } catch (err) {
      this.log.warn({ app, err: describeError(err) }, 'dns waker failed');
    }
  }
}
