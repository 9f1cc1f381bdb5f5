import { isIP } from 'node:net';
import { PicoError } from '../shared/errors.js';

/*
 * What the DNS server needs from the rest of the system, declared here so that dns/ imports
 * nothing from gateway/: the zone data it serves and the waker it pokes on lookups. The
 * composition root builds the zone data (see buildZoneData) from its RouteTable and config.
 */

/** The addresses one DNS name answers with, and the app that owns the name. */
export interface NameRecords {
  readonly app: string;
  /** IPv4 addresses, dotted quad */
  readonly a: readonly string[];
  /** IPv6 addresses, any textual form */
  readonly aaaa: readonly string[];
}

/**
 * Everything the DNS server serves. Names are lower case, without a trailing dot. Every
 * record name lies inside (or is) one of `zones`; the nameserver of zone Z is `ns.Z` and
 * answers with `nameserver`'s addresses (its glue), so no record may be named `ns.Z`.
 * `DnsServer` validates this and throws PICO_ERR_CONFIG otherwise; buildZoneData never
 * produces such data.
 */
export interface ZoneData {
  readonly zones: readonly string[];
  /** TTL of every record and the SOA minimum (negative-caching TTL); in milliseconds, as in
   *  the config; sent rounded up to whole seconds */
  readonly ttlMs: number;
  /** owner name → records */
  readonly records: ReadonlyMap<string, NameRecords>;
  /** addresses of this DNS server: the A/AAAA records (glue) of each zone's `ns.<zone>` */
  readonly nameserver: { readonly a: readonly string[]; readonly aaaa: readonly string[] };
  /** SOA serial (a 32-bit unsigned number) */
  readonly serial: number;
}

/**
 * Told about every lookup of an app's name, of any type, before the app is reached.
 *
 * Contract: the DNS server calls onLookup synchronously, right after it has handed the answer
 * to the socket, once per lookup (a resolver that retries calls it again). It must return
 * quickly — deduplicate and start the wake asynchronously — because every query behind it
 * waits while it runs. A throw (or a returned promise's rejection) is logged and otherwise
 * ignored.
 */
export interface AppWaker {
  onLookup(app: string): void;
}

/** One app as the composition root knows it: its names and the addresses they answer with. */
export interface ZoneApp {
  readonly app: string;
  readonly names: readonly string[];
  /** IPv4 addresses */
  readonly a: readonly string[];
  /** IPv6 addresses */
  readonly aaaa: readonly string[];
}

export interface ZoneInput {
  readonly zones: readonly string[];
  /** in milliseconds (config `gateway.dns.ttl`) */
  readonly ttlMs: number;
  readonly apps: readonly ZoneApp[];
  /** address(es) of this DNS server, IPv4 and/or IPv6: the glue of each `ns.<zone>` */
  readonly nameserverAddress: string | readonly string[];
  /** default: the current time in seconds, which increases across config reloads */
  readonly serial?: number;
  /**
   * Told about each name that is left out of the zone (the others are served). Absent: the
   * first such name throws PICO_ERR_CONFIG instead, so no name goes missing silently.
   */
  readonly onProblem?: (problem: ZoneProblem) => void;
}

/** A name of the input that is not served, and why. */
export interface ZoneProblem {
  readonly app: string;
  readonly name: string;
  readonly message: string;
}

const LABEL = /^(?!-)[a-z0-9_-]{1,63}(?<!-)$/;

/** Lower case, no trailing dot; undefined for text that is not a host name. */
export function normalizeName(name: string): string | undefined {
  const n = name.toLowerCase().replace(/\.$/, '');
  if (n.length === 0 || n.length > 253) return undefined;
  return n.split('.').every((l) => LABEL.test(l)) ? n : undefined;
}

/** The longest zone that `name` equals or lies under; zones are normalized. */
export function zoneOf(name: string, zones: readonly string[]): string | undefined {
  let best: string | undefined;
  for (const z of zones) {
    if ((name === z || name.endsWith(`.${z}`)) && (best === undefined || z.length > best.length)) best = z;
  }
  return best;
}

/** The name server host name of a zone. */
export function nameserverOf(zone: string): string {
  return `ns.${zone}`;
}

/** An IPv6 address without a zone index (`fe80::1%eth0` passes isIP but means nothing in DNS). */
export function isPlainIPv6(x: string): boolean {
  return isIP(x) === 6 && !x.includes('%');
}

function byFamily(addresses: readonly string[], family: 4 | 6, what: string, problem: (m: string) => void): string[] {
  const ok = addresses.filter((x) => {
    if (family === 4 ? isIP(x) === 4 : isPlainIPv6(x)) return true;
    problem(`${what}: "${x}" is not an IPv${family} address; ignored`);
    return false;
  });
  return [...new Set(ok)];
}

/**
 * Builds the zone data from plain inputs. A name that cannot be served (outside every zone,
 * claimed by two apps, a zone's nameserver name `ns.<zone>`, not a host name, no address) is
 * left out and reported through onProblem; it never takes the other names down. Throws
 * PICO_ERR_CONFIG when the zones or the nameserver's addresses are unusable, since then
 * nothing can be served.
 */
export function buildZone(input: ZoneInput): ZoneData {
  const zones: string[] = [];
  for (const z of input.zones) {
    const n = normalizeName(z);
    if (n === undefined) throw new PicoError('PICO_ERR_CONFIG', `dns zone "${z}" is not a DNS name`);
    if (!zones.includes(n)) zones.push(n);
  }
  if (zones.length === 0) throw new PicoError('PICO_ERR_CONFIG', 'no dns zones');
  const nsAddresses = typeof input.nameserverAddress === 'string' ? [input.nameserverAddress] : input.nameserverAddress;
  const nsBad = nsAddresses.find((x) => isIP(x) !== 4 && !isPlainIPv6(x));
  if (nsBad !== undefined) throw new PicoError('PICO_ERR_CONFIG', `dns nameserver address "${nsBad}" is not an IP address`);
  const nameserver = Object.freeze({
    a: Object.freeze([...new Set(nsAddresses.filter((x) => isIP(x) === 4))]),
    aaaa: Object.freeze([...new Set(nsAddresses.filter((x) => isIP(x) === 6))]),
  });
  if (nameserver.a.length + nameserver.aaaa.length === 0) throw new PicoError('PICO_ERR_CONFIG', 'the dns nameserver needs an address');
  const nsNames = new Set(zones.map(nameserverOf));

  const report = (p: ZoneProblem) => {
    if (!input.onProblem) throw new PicoError('PICO_ERR_CONFIG', `dns name "${p.name}" of app "${p.app}": ${p.message}`);
    input.onProblem(p);
  };
  const records = new Map<string, NameRecords>();
  for (const app of input.apps) {
    const appProblem = (message: string) => report({ app: app.app, name: '', message });
    const a = Object.freeze(byFamily(app.a, 4, 'a', appProblem));
    const aaaa = Object.freeze(byFamily(app.aaaa, 6, 'aaaa', appProblem));
    for (const raw of app.names) {
      const problem = (message: string) => report({ app: app.app, name: raw, message });
      const name = normalizeName(raw);
      if (name === undefined) problem('not a DNS name');
      else if (zoneOf(name, zones) === undefined) problem('not inside any of the zones');
      else if (nsNames.has(name)) problem("is a zone's nameserver name");
      else if (records.has(name)) problem(`already belongs to app "${records.get(name)!.app}"`);
      else if (a.length + aaaa.length === 0) problem('the app has no address');
      else records.set(name, Object.freeze({ app: app.app, a, aaaa }));
    }
  }
  return Object.freeze({
    zones: Object.freeze(zones),
    ttlMs: input.ttlMs,
    records,
    nameserver,
    serial: (input.serial ?? Math.floor(Date.now() / 1000)) >>> 0,
  });
}
