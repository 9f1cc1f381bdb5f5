import { isIP } from 'node:net';
import { PicoError } from '../shared/errors.js';
import { CLASS_IN, HEADER_SIZE, MAX_LABEL, RCODE, TYPE, type Query } from './wire.js';
import { isPlainIPv6, nameserverOf, normalizeName, zoneOf, type ZoneData } from './zone.js';

/*
 * The zone compiled into ready-made answers. Every response this server sends is
 *
 *     header (12) | the query's own question, copied as asked | body | OPT (11, if EDNS)
 *
 * and the body depends only on the (lower-cased) question name and type, so it is encoded
 * once, here, when a zone is loaded. Compression pointers in a body point into the question:
 * its name starts at offset 12 and, whatever the case of its letters, has the same label
 * lengths as the served name, so the pointers hold for every query for that name. (So names
 * in the answer carry the letter case the client asked with, as the question does; DNS names
 * compare case-insensitively, and 0x20-randomizing resolvers expect exactly this.)
 *
 * Names not served are answered from a per-zone cache of NXDOMAIN bodies keyed by where the
 * zone's name starts inside the question name (≤ 255 entries per zone, so a random-name flood
 * cannot grow it).
 */

/** One prepared answer: everything of the response after the question. */
export interface Prepared {
  readonly rcode: number;
  /** authoritative answer: every answer about a name inside our zones */
  readonly aa: boolean;
  /** record counts of the answer, authority and additional sections in `body` */
  readonly an: number;
  readonly ns: number;
  readonly ar: number;
  readonly body: Buffer;
  /** the app that owns the question name: looking it up wakes the app */
  readonly app: string | undefined;
}

const EMPTY = Buffer.alloc(0);
const bare = (rcode: number, aa: boolean): Prepared => Object.freeze({ rcode, aa, an: 0, ns: 0, ar: 0, body: EMPTY, app: undefined });
/** Outside our zones, a class other than IN, or a zone transfer: never an open resolver. */
export const REFUSED: Prepared = bare(RCODE.REFUSED, false);
/** EDNS version > 0 (RFC 6891 §6.1.3). */
export const BADVERS: Prepared = bare(RCODE.BADVERS, false);

/** SOA timers (seconds). No secondaries transfer from us, but resolvers and tools read them. */
const SOA_REFRESH = 3600;
const SOA_RETRY = 900;
const SOA_EXPIRE = 1_209_600;

/** Wire form of a normalized name as a latin1 string: the key queries are looked up by. */
export function wireKey(name: string): string {
  let key = '';
  for (const label of name.split('.')) key += String.fromCharCode(label.length) + label;
  return `${key}\0`;
}

function ipv4Bytes(addr: string): number[] {
  return addr.split('.').map(Number);
}

function ipv6Bytes(addr: string): number[] {
  let text = addr;
  const tail: number[] = [];
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (v4) {
    // ::ffff:1.2.3.4 — the last 32 bits written as IPv4
    tail.push(...ipv4Bytes(v4[1]!));
    text = text.slice(0, -v4[1]!.length) + '0:0';
  }
  const [head, rest] = text.includes('::') ? text.split('::') : [text, undefined];
  const groups = (s: string | undefined) => (s ? s.split(':').map((g) => parseInt(g, 16)) : []);
  const h = groups(head);
  const r = groups(rest);
  const all = rest === undefined ? h : [...h, ...new Array<number>(8 - h.length - r.length).fill(0), ...r];
  const bytes = all.flatMap((g) => [g >> 8, g & 0xff]);
  if (tail.length) bytes.splice(12, 4, ...tail);
  if (bytes.length !== 16 || bytes.some((b) => !(b >= 0 && b <= 255))) fail(`cannot encode IPv6 address "${addr}"`);
  return bytes;
}

/**
 * Encodes sections at a known offset in the message, compressing names against what the
 * message already holds (RFC 1035 §4.1.4). `known` maps a name to the offset of its first
 * label; with `remember` false, names written here are not added, so the body stays valid for
 * any question that contains only the names given in `known` at those offsets.
 */
class SectionWriter {
  private readonly bytes: number[] = [];
  constructor(
    private readonly base: number,
    private readonly known: Map<string, number>,
    private readonly remember: boolean,
  ) {}

  get length(): number {
    return this.bytes.length;
  }

  u8(v: number): void {
    this.bytes.push(v & 0xff);
  }
  u16(v: number): void {
    this.bytes.push((v >> 8) & 0xff, v & 0xff);
  }
  u32(v: number): void {
    this.u16(Math.floor(v / 0x10000));
    this.u16(v % 0x10000);
  }

  name(name: string): void {
    const labels = name === '' ? [] : name.split('.');
    for (let i = 0; i < labels.length; i++) {
      const suffix = labels.slice(i).join('.');
      const at = this.known.get(suffix);
      if (at !== undefined) {
        this.u16(0xc000 | at);
        return;
      }
      const offset = this.base + this.bytes.length;
      if (this.remember && offset < 0x4000) this.known.set(suffix, offset);
      this.u8(labels[i]!.length);
      for (const ch of labels[i]!) this.u8(ch.charCodeAt(0));
    }
    this.u8(0);
  }

  rr(name: string, type: number, ttl: number, rdata: () => void): void {
    this.name(name);
    this.u16(type);
    this.u16(CLASS_IN);
    this.u32(ttl);
    const at = this.bytes.length;
    this.u16(0);
    rdata();
    const rdlength = this.bytes.length - at - 2;
    this.bytes[at] = rdlength >> 8;
    this.bytes[at + 1] = rdlength & 0xff;
  }

  toBuffer(): Buffer {
    return Buffer.from(this.bytes);
  }
}

/** The RRsets at one name. */
interface NameData {
  readonly name: string;
  readonly zone: string;
  readonly app: string | undefined;
  readonly a: readonly string[];
  readonly aaaa: readonly string[];
  /** apex only: SOA and NS */
  readonly apex: boolean;
}

/** Prepared answers for one served name (an empty non-terminal has none but NODATA). */
interface NameNode {
  readonly byType: ReadonlyMap<number, Prepared>;
  readonly nodata: Prepared;
}

interface ZoneNode {
  readonly name: string;
  /** NXDOMAIN answers by offset of the zone's name inside the question name */
  readonly nxdomain: Array<Prepared | undefined>;
}

function fail(message: string): never {
  throw new PicoError('PICO_ERR_CONFIG', `invalid zone data: ${message}`);
}

function validate(zone: ZoneData): void {
  if (zone.zones.length === 0) fail('no zones');
  for (const z of zone.zones) {
    if (normalizeName(z) !== z) fail(`zone "${z}" is not a normalized DNS name`);
    // the SOA's rname hostmaster.<zone> must itself be a valid name
    if (z.length > 253 - 'hostmaster.'.length) fail(`zone "${z}" is too long`);
  }
  if (!Number.isFinite(zone.ttlMs) || zone.ttlMs < 0) fail(`ttl ${zone.ttlMs}ms`);
  if (!Number.isInteger(zone.serial) || zone.serial < 0 || zone.serial > 0xffffffff) fail(`serial ${zone.serial}`);
  const nsNames = new Set(zone.zones.map(nameserverOf));
  const addrs = (what: string, a: readonly string[], aaaa: readonly string[]) => {
    for (const x of a) if (isIP(x) !== 4) fail(`${what}: "${x}" is not an IPv4 address`);
    for (const x of aaaa) if (!isPlainIPv6(x)) fail(`${what}: "${x}" is not an IPv6 address (without a scope)`);
  };
  addrs('nameserver', zone.nameserver.a, zone.nameserver.aaaa);
  if (zone.nameserver.a.length + zone.nameserver.aaaa.length === 0) fail('the nameserver has no address');
  for (const [name, rec] of zone.records) {
    if (normalizeName(name) !== name) fail(`"${name}" is not a normalized DNS name`);
    if (zoneOf(name, zone.zones) === undefined) fail(`"${name}" is outside the zones`);
    if (nsNames.has(name)) fail(`"${name}" is a zone's nameserver name`);
    addrs(name, rec.a, rec.aaaa);
  }
}

function parentOf(name: string): string | undefined {
  const dot = name.indexOf('.');
  return dot < 0 ? undefined : name.slice(dot + 1);
}

/** The compiled, immutable zone. Build a new one to change anything. */
export class AnswerTable {
  private readonly names = new Map<string, NameNode>();
  private readonly zones = new Map<string, ZoneNode>();
  private readonly ttl: number;
  private readonly serial: number;
  private readonly nameserver: ZoneData['nameserver'];

  /** Throws PICO_ERR_CONFIG for zone data that breaks ZoneData's rules. */
  constructor(zone: ZoneData) {
    validate(zone);
    // Seconds, rounded up: a 500ms TTL is 1s, not 0 (which would forbid caching).
    this.ttl = Math.min(Math.ceil(zone.ttlMs / 1000), 0x7fffffff);
    this.serial = zone.serial;
    this.nameserver = zone.nameserver;

    const data = new Map<string, NameData>();
    const put = (d: NameData) => data.set(d.name, d);
    for (const z of zone.zones) {
      this.zones.set(wireKey(z), { name: z, nxdomain: [] });
      const rec = zone.records.get(z);
      put({ name: z, zone: z, app: rec?.app, a: rec?.a ?? [], aaaa: rec?.aaaa ?? [], apex: true });
      put({ name: nameserverOf(z), zone: z, app: undefined, a: zone.nameserver.a, aaaa: zone.nameserver.aaaa, apex: false });
    }
    for (const [name, rec] of zone.records) {
      if (!data.has(name)) put({ name, zone: zoneOf(name, zone.zones)!, app: rec.app, a: rec.a, aaaa: rec.aaaa, apex: false });
    }
    // Empty non-terminals: b.zone exists (NODATA, not NXDOMAIN; RFC 8020) when a.b.zone does.
    for (const name of [...data.keys()]) {
      for (let p = parentOf(name); p !== undefined; p = parentOf(p)) {
        const z = zoneOf(p, zone.zones);
        if (z === undefined) break;
        if (!data.has(p)) put({ name: p, zone: z, app: undefined, a: [], aaaa: [], apex: false });
        if (p === z) break;
      }
    }
    for (const d of data.values()) {
      if (d.name.length > 253 || d.name.split('.').some((l) => l.length > MAX_LABEL)) fail(`"${d.name}" is too long`);
      this.names.set(wireKey(d.name), this.compileName(d));
    }
  }

  /**
   * The answer to a parsed query (its BADVERS and FORMERR cases are the caller's). Pure: the
   * same query always gets the same Prepared.
   */
  lookup(q: Query): Prepared {
    if (q.qclass !== CLASS_IN || q.qtype === TYPE.AXFR || q.qtype === TYPE.IXFR) return REFUSED;
    const key = q.key;
    const node = this.names.get(key);
    if (node !== undefined) return node.byType.get(q.qtype) ?? node.nodata;
    // Not a served name: NXDOMAIN inside the longest zone that is a suffix, else REFUSED.
    // Apexes are served names, so the scan starts at the parent.
    for (let i = key.charCodeAt(0) + 1; i < key.length - 1; i += key.charCodeAt(i) + 1) {
      const zone = this.zones.get(key.slice(i));
      if (zone !== undefined) return zone.nxdomain[i] ?? (zone.nxdomain[i] = this.compileNxdomain(zone.name, i));
    }
    return REFUSED;
  }

  /** The question name's suffixes at their offsets in the message. */
  private static questionNames(name: string): Map<string, number> {
    const known = new Map<string, number>();
    let offset = HEADER_SIZE;
    const labels = name.split('.');
    for (let i = 0; i < labels.length; i++) {
      known.set(labels.slice(i).join('.'), offset);
      offset += labels[i]!.length + 1;
    }
    return known;
  }

  private soa(w: SectionWriter, zone: string): void {
    w.rr(zone, TYPE.SOA, this.ttl, () => {
      w.name(nameserverOf(zone));
      w.name(`hostmaster.${zone}`);
      w.u32(this.serial);
      w.u32(SOA_REFRESH);
      w.u32(SOA_RETRY);
      w.u32(SOA_EXPIRE);
      w.u32(this.ttl); // minimum: the negative-caching TTL (RFC 2308)
    });
  }

  private compileName(d: NameData): NameNode {
    const qnameLength = wireKey(d.name).length;
    const bodyBase = HEADER_SIZE + qnameLength + 4;
    type Section = (w: SectionWriter) => number; // writes records, returns how many
    const a: Section = (w) => {
      for (const x of d.a) w.rr(d.name, TYPE.A, this.ttl, () => ipv4Bytes(x).forEach((b) => w.u8(b)));
      return d.a.length;
    };
    const aaaa: Section = (w) => {
      for (const x of d.aaaa) w.rr(d.name, TYPE.AAAA, this.ttl, () => ipv6Bytes(x).forEach((b) => w.u8(b)));
      return d.aaaa.length;
    };
    const soa: Section = (w) => (this.soa(w, d.zone), 1);
    const ns: Section = (w) => (w.rr(d.name, TYPE.NS, this.ttl, () => w.name(nameserverOf(d.zone))), 1);
    const glue: Section = (w) => {
      const nsName = nameserverOf(d.zone);
      const { a: glueA, aaaa: glueAAAA } = this.nameserver;
      for (const x of glueA) w.rr(nsName, TYPE.A, this.ttl, () => ipv4Bytes(x).forEach((b) => w.u8(b)));
      for (const x of glueAAAA) w.rr(nsName, TYPE.AAAA, this.ttl, () => ipv6Bytes(x).forEach((b) => w.u8(b)));
      return glueA.length + glueAAAA.length;
    };
    const none: Section = () => 0;

    const prepare = (rcode: number, answer: Section, authority: Section, additional: Section): Prepared => {
      const w = new SectionWriter(bodyBase, AnswerTable.questionNames(d.name), true);
      const an = answer(w);
      const nsCount = authority(w);
      const ar = additional(w);
      return Object.freeze({ rcode, aa: true, an, ns: nsCount, ar, body: w.toBuffer(), app: d.app });
    };

    const byType = new Map<number, Prepared>();
    const any: Section[] = [];
    if (d.apex) {
      byType.set(TYPE.SOA, prepare(RCODE.NOERROR, soa, none, none));
      byType.set(TYPE.NS, prepare(RCODE.NOERROR, ns, none, glue));
      any.push(soa, ns);
    }
    if (d.a.length > 0) {
      byType.set(TYPE.A, prepare(RCODE.NOERROR, a, none, none));
      any.push(a);
    }
    if (d.aaaa.length > 0) {
      byType.set(TYPE.AAAA, prepare(RCODE.NOERROR, aaaa, none, none));
      any.push(aaaa);
    }
    // ANY (RFC 8482 allows less, but the full set here is small): every RRset at the name.
    if (any.length > 0) byType.set(TYPE.ANY, prepare(RCODE.NOERROR, (w) => any.reduce((n, s) => n + s(w), 0), none, none));
    return { byType, nodata: prepare(RCODE.NOERROR, none, soa, none) };
  }

  private compileNxdomain(zone: string, zoneOffset: number): Prepared {
    // Only the zone's name, at its place in the question, is referenced: valid for any
    // question name with the zone at that offset.
    const known = new Map([[zone, HEADER_SIZE + zoneOffset]]);
    const w = new SectionWriter(0, known, false);
    this.soa(w, zone);
    return Object.freeze({ rcode: RCODE.NXDOMAIN, aa: true, an: 0, ns: 1, ar: 0, body: w.toBuffer(), app: undefined });
  }
}
