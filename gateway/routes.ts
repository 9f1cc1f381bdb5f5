import type { Config } from '../shared/config.js';
import { AddressPool, normalizeIp } from './address-pool.js';

/** How the gateway reaches one app: built once from the config, then read-only. */
export interface AppRoute {
  readonly name: string;
  readonly domains: readonly string[];
  /** the port the app serves HTTP on, inside its container */
  readonly httpPort?: number;
  /** raw TCP ports, served at `address` */
  readonly tcpPorts: readonly number[];
  /** the app's own address (apps with tcp ports); HTTP-only apps share the HTTP listener's */
  readonly address?: string;
  /** in milliseconds */
  readonly holdTimeoutMs: number;
  readonly holdQueue: number;
}

/**
 * The routing table. Lookups are by lower-case host name without port, or by local address
 * and port of an accepted TCP connection.
 */
export class RouteTable {
  readonly apps: ReadonlyMap<string, AppRoute>;
  private readonly hosts = new Map<string, AppRoute>();
  private readonly addrPorts = new Map<string, AppRoute>();

  constructor(cfg: Readonly<Config>) {
    const pool = new AddressPool(cfg.gateway.addresses);
    for (const app of cfg.apps) if (app.address) pool.reserve(app.address);
    const apps = new Map<string, AppRoute>();
    for (const app of cfg.apps) {
      const address = app.tcp ? (app.address ? normalizeIp(app.address) : pool.allocate(app.name)) : undefined;
      const route: AppRoute = Object.freeze({
        name: app.name,
        domains: app.domains,
        httpPort: app.http?.port,
        tcpPorts: app.tcp ?? [],
        address,
        holdTimeoutMs: app.hold?.timeout ?? cfg.gateway.hold.timeout,
        holdQueue: app.hold?.queue ?? cfg.gateway.hold.queue,
      });
      apps.set(app.name, route);
      for (const d of app.domains) this.hosts.set(d, route);
      if (address) for (const p of route.tcpPorts) this.addrPorts.set(`${address}|${p}`, route);
    }
    this.apps = apps;
  }

  /** `Host` header value → app; case-insensitive, port and trailing dot ignored. */
  byHost(host: string): AppRoute | undefined {
    let h = host.toLowerCase();
    if (h.startsWith('[')) h = h.slice(0, h.indexOf(']') + 1);
    else {
      const colon = h.indexOf(':');
      if (colon >= 0) h = h.slice(0, colon);
    }
    if (h.endsWith('.')) h = h.slice(0, -1);
    return this.hosts.get(h);
  }

  byAddress(address: string, port: number): AppRoute | undefined {
    const a = address.startsWith('::ffff:') ? address.slice(7) : address;
    return this.addrPorts.get(`${a}|${port}`);
  }
}
