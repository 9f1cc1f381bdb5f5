import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import dgram from 'node:dgram';
import net from 'node:net';
import { after, before, describe, it } from 'node:test';
import { Packet } from 'dns2';
import { DnsServer } from '../dns/server.js';
import { buildZone, type ZoneData } from '../dns/zone.js';
import { isPicoError } from '../shared/errors.js';
import { silentLogger } from '../shared/log.js';
import { Metrics } from '../shared/metrics.js';
import { until } from './helpers/poll.js';

/*
 * The DNS server over real sockets on port 0: dig (a real client, UDP and TCP) and a raw
 * client whose answers dns2 decodes (an independent decoder, so our encoder is not checked
 * against itself). Tests never sleep: "no answer" is shown by the next answer on the same
 * socket being for a later query, since the server answers one socket's datagrams in order.
 */

const T = { A: 1, NS: 2, SOA: 6, MX: 15, AAAA: 28, OPT: 41 } as const;

function query(name: string, type: number, o: { id?: number; flags?: number; edns?: { size?: number } } = {}): Buffer {
  const labels = name === '' ? [] : name.split('.');
  const qname = Buffer.concat([...labels.map((l) => Buffer.concat([Buffer.from([l.length]), Buffer.from(l, 'latin1')])), Buffer.from([0])]);
  const header = Buffer.alloc(12);
  header.writeUInt16BE(o.id ?? 1, 0);
  header.writeUInt16BE(o.flags ?? 0x0100, 2);
  header.writeUInt16BE(1, 4);
  header.writeUInt16BE(o.edns ? 1 : 0, 10);
  const tail = Buffer.from([type >> 8, type & 0xff, 0, 1]);
  const parts: Buffer[] = [header, qname, tail];
  if (o.edns) {
    const opt = Buffer.alloc(11);
    opt.writeUInt16BE(T.OPT, 1);
    opt.writeUInt16BE(o.edns.size ?? 1232, 3);
    parts.push(opt);
  }
  return Buffer.concat(parts);
}

const parse = (msg: Buffer) => Packet.parse(msg);
const rcodeOf = (msg: Buffer) => msg[3]! & 0xf;
const idOf = (msg: Buffer) => msg.readUInt16BE(0);

/** One UDP socket; answers are read in arrival order. */
class UdpClient {
  private readonly sock = dgram.createSocket('udp4');
  private readonly inbox: Buffer[] = [];
  private waiter: (() => void) | undefined;

  constructor(private readonly port: number) {
    this.sock.on('message', (m) => {
      this.inbox.push(m);
      this.waiter?.();
    });
  }

  send(msg: Buffer): void {
    this.sock.send(msg, this.port, '127.0.0.1');
  }

  /** The next datagram; fails (not a timing assertion: a lost answer) after 5 s. */
  async next(): Promise<Buffer> {
    while (this.inbox.length === 0) {
      await new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error('no UDP answer within 5s')), 5000);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
    return this.inbox.shift()!;
  }

  async ask(msg: Buffer): Promise<Buffer> {
    this.send(msg);
    return this.next();
  }

  close(): void {
    this.sock.close();
  }
}

/** One TCP connection speaking RFC 7766 framing. */
class TcpClient {
  readonly closed: Promise<void>;
  private readonly inbox: Buffer[] = [];
  private pending = Buffer.alloc(0);
  private waiter: (() => void) | undefined;
  private isClosed = false;

  private constructor(private readonly sock: net.Socket) {
    sock.on('data', (chunk: Buffer) => {
      this.pending = Buffer.concat([this.pending, chunk]);
      while (this.pending.length >= 2 && this.pending.length >= 2 + this.pending.readUInt16BE(0)) {
        const len = this.pending.readUInt16BE(0);
        this.inbox.push(this.pending.subarray(2, 2 + len));
        this.pending = this.pending.subarray(2 + len);
      }
      this.waiter?.();
    });
    sock.on('error', () => {});
    this.closed = new Promise((resolve) => sock.once('close', () => {
      this.isClosed = true;
      this.waiter?.();
      resolve();
    }));
  }

  static connect(port: number): Promise<TcpClient> {
    return new Promise((resolve, reject) => {
      const sock = net.connect(port, '127.0.0.1', () => resolve(new TcpClient(sock)));
      sock.once('error', reject);
    });
  }

  static frame(msg: Buffer): Buffer {
    return Buffer.concat([Buffer.from([msg.length >> 8, msg.length & 0xff]), msg]);
  }

  write(bytes: Buffer): Promise<void> {
    return new Promise((resolve, reject) => this.sock.write(bytes, (err) => (err ? reject(err) : resolve())));
  }

  async next(): Promise<Buffer> {
    while (this.inbox.length === 0) {
      if (this.isClosed) throw new Error('connection closed before an answer');
      await new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error('no TCP answer within 5s')), 5000);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
    return this.inbox.shift()!;
  }

  async ask(msg: Buffer): Promise<Buffer> {
    await this.write(TcpClient.frame(msg));
    return this.next();
  }

  destroy(): void {
    this.sock.destroy();
  }
}

function dig(port: number, ...args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('dig', ['@127.0.0.1', '-p', String(port), ...args, '+tries=1', '+time=2'], (err, stdout) => (err ? reject(err) : resolve(stdout)));
  });
}

/** dig's output, picked apart. */
function digResult(out: string) {
  const section = (title: string) => {
    const m = new RegExp(`;; ${title} SECTION:\\n([\\s\\S]*?)(?:\\n\\n|$)`).exec(out);
    return m ? m[1]!.split('\n').map((l) => l.split(/\s+/).join(' ')) : [];
  };
  return {
    status: /status: (\w+)/.exec(out)?.[1],
    flags: (/;; flags: ([\w ]+);/.exec(out)?.[1] ?? '').split(' '),
    edns: /; EDNS: version: 0, flags:[\w ]*; udp: (\d+)/.exec(out)?.[1],
    question: section('QUESTION'),
    answer: section('ANSWER'),
    authority: section('AUTHORITY'),
    additional: section('ADDITIONAL'),
  };
}

const manyA = (n: number, third: number) => Array.from({ length: n }, (_, i) => `10.0.${third}.${i + 1}`);

function zoneOf(apps: Parameters<typeof buildZone>[0]['apps'], serial = 1): ZoneData {
  return buildZone({ zones: ['apps.test'], ttlMs: 5000, nameserverAddress: '127.0.0.1', serial, apps });
}

const ZONE = zoneOf([
  { app: 'hello', names: ['hello.apps.test'], a: ['127.0.1.1'], aaaa: ['fd00::1'] },
  { app: 'web', names: ['web.apps.test', 'www.sub.apps.test'], a: ['127.0.1.2'], aaaa: [] },
  // 40 A records: ~700 octets, more than 512, less than 1232
  { app: 'medium', names: ['medium.apps.test'], a: manyA(40, 1), aaaa: [] },
  // 100 A records: ~1650 octets, more than any UDP answer we send
  { app: 'big', names: ['big.apps.test'], a: manyA(100, 2), aaaa: [] },
]);

interface Harness {
  server: DnsServer;
  port: number;
  lookups: string[];
  metrics: Metrics;
}

async function startServer(zone: ZoneData, extra: Partial<ConstructorParameters<typeof DnsServer>[0]> = {}): Promise<Harness> {
  const lookups: string[] = [];
  const metrics = new Metrics();
  const server = new DnsServer({
    listen: { host: '127.0.0.1', port: 0 },
    zone,
    waker: { onLookup: (app) => lookups.push(app) },
    metrics,
    log: silentLogger(),
    ...extra,
  });
  const { udp, tcp } = await server.start();
  assert.equal(udp.port, tcp.port, 'UDP and TCP share the port');
  return { server, port: udp.port, lookups, metrics };
}

describe('dns server', () => {
  let h: Harness;
  let udp: UdpClient;
  const cleanup: Array<() => unknown> = [];

  before(async () => {
    h = await startServer(ZONE);
    udp = new UdpClient(h.port);
  });
  after(async () => {
    udp.close();
    for (const c of cleanup) await c();
    await h.server.stop();
  });

  it('answers A and AAAA with the configured TTL, authoritatively (dig)', async () => {
    const a = digResult(await dig(h.port, 'hello.apps.test', 'A'));
    assert.equal(a.status, 'NOERROR');
    assert.ok(a.flags.includes('aa') && !a.flags.includes('ra'), a.flags.join(' '));
    assert.deepEqual(a.answer, ['hello.apps.test. 5 IN A 127.0.1.1']);
    const aaaa = digResult(await dig(h.port, 'hello.apps.test', 'AAAA'));
    assert.deepEqual(aaaa.answer, ['hello.apps.test. 5 IN AAAA fd00::1']);
  });

  it('serves SOA and NS at the apex, with glue for the nameserver (dig)', async () => {
    const soa = digResult(await dig(h.port, 'apps.test', 'SOA'));
    assert.deepEqual(soa.answer, ['apps.test. 5 IN SOA ns.apps.test. hostmaster.apps.test. 1 3600 900 1209600 5']);
    const ns = digResult(await dig(h.port, 'apps.test', 'NS'));
    assert.deepEqual(ns.answer, ['apps.test. 5 IN NS ns.apps.test.']);
    assert.ok(ns.additional.includes('ns.apps.test. 5 IN A 127.0.0.1'), ns.additional.join('\n'));
    assert.ok(soa.flags.includes('aa') && ns.flags.includes('aa'));
  });

  it('answers NXDOMAIN with the SOA for unknown names in the zone (dig)', async () => {
    const r = digResult(await dig(h.port, 'nope.apps.test', 'A'));
    assert.equal(r.status, 'NXDOMAIN');
    assert.ok(r.flags.includes('aa'));
    assert.deepEqual(r.answer, []);
    assert.deepEqual(r.authority, ['apps.test. 5 IN SOA ns.apps.test. hostmaster.apps.test. 1 3600 900 1209600 5']);
  });

  it('answers NODATA for names without the asked type, and for empty non-terminals (dig)', async () => {
    for (const [name, type] of [['web.apps.test', 'AAAA'], ['sub.apps.test', 'A'], ['hello.apps.test', 'MX']]) {
      const r = digResult(await dig(h.port, name!, type!));
      assert.equal(r.status, 'NOERROR', `${name} ${type}`);
      assert.deepEqual(r.answer, []);
      assert.equal(r.authority.length, 1);
      assert.match(r.authority[0]!, /^apps\.test\. 5 IN SOA /);
    }
  });

  it('refuses names outside its zones: never an open resolver (dig)', async () => {
    for (const name of ['example.com', 'xapps.test', 'test']) {
      const r = digResult(await dig(h.port, name, 'A'));
      assert.equal(r.status, 'REFUSED', name);
      assert.ok(!r.flags.includes('aa'));
      assert.deepEqual([r.answer, r.authority], [[], []]);
    }
  });

  it('matches names case-insensitively and echoes the question as asked', async () => {
    const r = digResult(await dig(h.port, 'HeLLo.APPS.tEsT', 'A'));
    assert.deepEqual(r.question, [';HeLLo.APPS.tEsT. IN A']);
    assert.deepEqual(r.answer, ['HeLLo.APPS.tEsT. 5 IN A 127.0.1.1']);
    const msg = query('hElLo.ApPs.TeSt', T.A, { id: 777 });
    const out = await udp.ask(msg);
    assert.equal(idOf(out), 777);
    assert.deepEqual(out.subarray(12, msg.length), msg.subarray(12), 'question bytes identical');
  });

  it('answers over TCP, several queries per connection, however they are split', async () => {
    const viaDig = digResult(await dig(h.port, 'web.apps.test', 'A', '+tcp'));
    assert.deepEqual(viaDig.answer, ['web.apps.test. 5 IN A 127.0.1.2']);

    const c = await TcpClient.connect(h.port);
    cleanup.push(() => c.destroy());
    const one = await c.ask(query('hello.apps.test', T.A, { id: 1 }));
    assert.deepEqual(parse(one).answers.map((a) => a.address), ['127.0.1.1']);
    // two pipelined in one write
    await c.write(Buffer.concat([TcpClient.frame(query('web.apps.test', T.A, { id: 2 })), TcpClient.frame(query('nope.apps.test', T.A, { id: 3 }))]));
    const [two, three] = [await c.next(), await c.next()];
    assert.deepEqual([idOf(two), rcodeOf(two), idOf(three), rcodeOf(three)], [2, 0, 3, 3]);
    // one dribbled a byte at a time
    for (const b of TcpClient.frame(query('apps.test', T.SOA, { id: 4 }))) await c.write(Buffer.from([b]));
    const four = await c.next();
    assert.equal(idOf(four), 4);
    assert.equal(parse(four).answers[0]!.type, T.SOA);
  });

  it('answers EDNS with OPT and honors the payload size; TC when it does not fit UDP, whole over TCP', async () => {
    // 40 records fit the default EDNS size (dig advertises 1232) …
    const fits = digResult(await dig(h.port, 'medium.apps.test', 'A'));
    assert.equal(fits.answer.length, 40);
    assert.equal(fits.edns, '1232');
    assert.ok(!fits.flags.includes('tc'));
    // … but not 512 octets, advertised or implied by a query without EDNS
    const small = digResult(await dig(h.port, 'medium.apps.test', 'A', '+bufsize=512', '+ignore'));
    assert.ok(small.flags.includes('tc'), small.flags.join(' '));
    assert.deepEqual(small.answer, []);
    const noEdns = await udp.ask(query('medium.apps.test', T.A, { id: 5 }));
    assert.deepEqual([noEdns[2]! & 0x02, parse(noEdns).answers.length, parse(noEdns).additionals.length], [0x02, 0, 0]);
    // 100 records fit no UDP answer, whatever the client offers …
    const big = await udp.ask(query('big.apps.test', T.A, { id: 6, edns: { size: 4096 } }));
    assert.ok(big.length <= 1232);
    assert.deepEqual([big[2]! & 0x02, parse(big).answers.length, parse(big).additionals[0]?.type], [0x02, 0, T.OPT]);
    // … so dig retries over TCP and gets all of them, untruncated
    const retried = digResult(await dig(h.port, 'big.apps.test', 'A'));
    assert.equal(retried.answer.length, 100);
    assert.ok(!retried.flags.includes('tc'));
    const c = await TcpClient.connect(h.port);
    cleanup.push(() => c.destroy());
    const whole = await c.ask(query('big.apps.test', T.A, { id: 7 }));
    assert.deepEqual(parse(whole).answers.map((a) => a.address), manyA(100, 2));
  });

  it('wakes the app on a lookup of its name, of any type, over either transport, and nothing else', async () => {
    h.lookups.length = 0;
    await udp.ask(query('hello.apps.test', T.A));
    assert.deepEqual(h.lookups, ['hello']); // already: the wake runs before the next event
    await udp.ask(query('WEB.apps.test', T.AAAA)); // NODATA still looks the app up
    await udp.ask(query('www.sub.apps.test', T.MX));
    await udp.ask(query('big.apps.test', T.A)); // truncated still looks the app up
    const c = await TcpClient.connect(h.port);
    cleanup.push(() => c.destroy());
    await c.ask(query('medium.apps.test', T.SOA));
    for (const [name, type] of [['nope.apps.test', T.A], ['sub.apps.test', T.A], ['apps.test', T.NS], ['ns.apps.test', T.A], ['example.com', T.A], ['x.hello.apps.test', T.A]] as const) {
      await udp.ask(query(name, type));
    }
    await c.ask(query('nope.apps.test', T.A));
    assert.deepEqual(h.lookups, ['hello', 'web', 'web', 'big', 'medium']);
  });

  it('survives each kind of malformed packet over UDP and answers the next query', async () => {
    const good = query('hello.apps.test', T.A, { id: 0xbeef });
    const dropped: Array<[string, Buffer]> = [
      ['empty', Buffer.alloc(0)],
      ['garbage shorter than a header', Buffer.from('hello')],
      ['a response', query('hello.apps.test', T.A, { id: 9, flags: 0x8400 })],
    ];
    const answered: Array<[string, Buffer, number]> = [
      ['garbage after a QUERY header', Buffer.concat([Buffer.from([0, 10, 0, 0]), Buffer.from('x'.repeat(40))]), 1],
      ['garbage header: opcode 15', Buffer.concat([Buffer.from([0, 10]), Buffer.from('x'.repeat(40))]), 4],
      ['truncated question', good.subarray(0, 20), 1],
      ['compression pointer loop', Buffer.concat([good.subarray(0, 12), Buffer.from([0xc0, 12, 0, 1, 0, 1])]), 1],
      ['pointer chain', Buffer.concat([good.subarray(0, 12), Buffer.from([0xc0, 14, 0xc0, 12, 0, 1, 0, 1])]), 1],
      ['oversized label', query(`${'a'.repeat(64)}.apps.test`, T.A), 1],
      ['name over 255 octets', query(Array.from({ length: 5 }, () => 'b'.repeat(60)).join('.'), T.A), 1],
      ['QDCOUNT 0', Buffer.concat([good.subarray(0, 4), Buffer.from([0, 0]), good.subarray(6)]), 1],
      ['QDCOUNT 2', Buffer.concat([good.subarray(0, 4), Buffer.from([0, 2]), good.subarray(6), good.subarray(12)]), 1],
      ['opcode NOTIFY', query('apps.test', T.SOA, { flags: 4 << 11 }), 4],
      ['opcode UPDATE', query('apps.test', T.SOA, { flags: 5 << 11 }), 4],
    ];
    for (const [what, msg] of dropped) {
      udp.send(msg);
      const next = await udp.ask(good);
      assert.equal(idOf(next), 0xbeef, `${what}: the next answer is the valid query's`);
      assert.deepEqual(parse(next).answers.map((a) => a.address), ['127.0.1.1']);
    }
    for (const [what, msg, rcode] of answered) {
      const out = await udp.ask(msg);
      assert.deepEqual([idOf(out), out[2]! >> 7, rcodeOf(out), out.readUInt16BE(4)], [idOf(msg), 1, rcode, 0], what);
      assert.equal(rcodeOf(await udp.ask(good)), 0, `${what}: still answering`);
    }
  });

  it('answers FORMERR over TCP and keeps the connection; closes it on a message without a header', { timeout: 10_000 }, async () => {
    const c = await TcpClient.connect(h.port);
    cleanup.push(() => c.destroy());
    const bad = await c.ask(Buffer.concat([query('hello.apps.test', T.A, { id: 11 }), Buffer.from([1, 2, 3])]));
    assert.deepEqual([idOf(bad), rcodeOf(bad)], [11, 1]);
    assert.equal(rcodeOf(await c.ask(query('hello.apps.test', T.A, { id: 12 }))), 0);
    await c.write(TcpClient.frame(Buffer.from('short')));
    await c.closed;
    // the server itself carries on
    const c2 = await TcpClient.connect(h.port);
    cleanup.push(() => c2.destroy());
    assert.equal(idOf(await c2.ask(query('hello.apps.test', T.A, { id: 13 }))), 13);
  });

  it('ignores a datagram from source port 0 (cannot be answered; must not crash the process)', async (t) => {
    // Only a raw socket can send one: python3 as root. The datagram reaches the server's
    // socket before python exits, so before the query that follows.
    const payload = query('hello.apps.test', T.A, { id: 0x0bad }).toString('hex');
    const script = [
      'import socket, struct, sys',
      `p = bytes.fromhex("${payload}")`,
      's = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)',
      `s.sendto(struct.pack("!HHHH", 0, ${h.port}, 8 + len(p), 0) + p, ("127.0.0.1", 0))`,
    ].join('\n');
    const sent = await new Promise<boolean>((resolve) => execFile('python3', ['-c', script], (err) => resolve(!err)));
    if (!sent) return t.skip('needs python3 and a raw socket (root)');
    const out = await udp.ask(query('hello.apps.test', T.A, { id: 0x0600d }));
    assert.equal(idOf(out), 0x0600d);
    assert.equal(rcodeOf(out), 0);
  });

  it('keeps answering through bursts of random garbage', async () => {
    let seed = 99;
    const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 16) / 65536;
    // Bursts of 50: this process sends them all before the server reads any, and a default
    // socket receive buffer holds about that many (a lost marker would be the test's fault).
    for (let burst = 0; burst < 10; burst++) {
      for (let i = 0; i < 50; i++) udp.send(Buffer.from(Array.from({ length: 1 + Math.floor(rand() * 100) }, () => Math.floor(rand() * 256))));
      const marker = query('hello.apps.test', T.A, { id: 0x7700 + burst });
      udp.send(marker);
      // Whatever the garbage earned (FORMERR, NOTIMP, REFUSED…) arrives first, in order.
      for (;;) {
        const out = await udp.next();
        if (idOf(out) === 0x7700 + burst && out[2]! & 0x80 && parse(out).answers.length === 1) break;
      }
    }
  });
});

describe('dns server: metrics', () => {
  it('counts answered queries by transport and rcode, not dropped ones', async () => {
    const h = await startServer(ZONE);
    const udp = new UdpClient(h.port);
    const c = await TcpClient.connect(h.port);
    try {
      await udp.ask(query('hello.apps.test', T.A));
      await udp.ask(query('web.apps.test', T.A));
      await udp.ask(query('nope.apps.test', T.A));
      await udp.ask(Buffer.concat([query('hello.apps.test', T.A), Buffer.from([0])]));
      udp.send(Buffer.from('drop'));
      await c.ask(query('example.com', T.A));
      await c.ask(query('hello.apps.test', T.A));
      const values = async () => {
        const m = await h.metrics.dnsQueries.get();
        return Object.fromEntries(m.values.map((v) => [`${v.labels.transport} ${v.labels.rcode}`, v.value]));
      };
      const total = async () => Object.values(await values()).reduce((a, b) => a + b, 0);
      await until(async () => (await total()) >= 6, 'the counts to be flushed');
      assert.deepEqual(await values(), { 'udp NOERROR': 2, 'udp NXDOMAIN': 1, 'udp FORMERR': 1, 'tcp REFUSED': 1, 'tcp NOERROR': 1 });
    } finally {
      udp.close();
      c.destroy();
      await h.server.stop();
    }
  });
});

describe('dns server: zone updates', () => {
  it('swaps the whole zone, and keeps the old one when the new one is invalid', async () => {
    const h = await startServer(ZONE);
    const udp = new UdpClient(h.port);
    try {
      h.server.updateZone(zoneOf([{ app: 'fresh', names: ['fresh.apps.test'], a: ['127.0.1.9'], aaaa: [] }], 2));
      assert.deepEqual(parse(await udp.ask(query('fresh.apps.test', T.A))).answers.map((a) => a.address), ['127.0.1.9']);
      assert.equal(rcodeOf(await udp.ask(query('hello.apps.test', T.A))), 3);
      assert.equal(parse(await udp.ask(query('apps.test', T.SOA))).answers[0]!.serial, 2);
      assert.deepEqual(h.lookups, ['fresh']);

      const invalid: ZoneData = { ...ZONE, records: new Map([['elsewhere.example', { app: 'x', a: ['127.0.0.9'], aaaa: [] }]]) };
      assert.throws(() => h.server.updateZone(invalid), (e) => isPicoError(e, 'PICO_ERR_CONFIG'));
      assert.deepEqual(parse(await udp.ask(query('fresh.apps.test', T.A))).answers.map((a) => a.address), ['127.0.1.9']);
    } finally {
      udp.close();
      await h.server.stop();
    }
  });
});

describe('dns server: lifecycle', () => {
  it('stop closes the sockets and every open TCP connection', { timeout: 10_000 }, async () => {
    // no idle timeout that could close the connection instead
    const h = await startServer(ZONE, { tcpIdleTimeoutMs: 3_600_000 });
    const c = await TcpClient.connect(h.port);
    try {
      assert.equal(idOf(await c.ask(query('hello.apps.test', T.A, { id: 21 }))), 21);
      const stopped = h.server.stop();
      await c.closed; // bounded by the test's timeout
      await stopped;
    } finally {
      c.destroy();
      await h.server.stop(); // twice is fine
    }
    // both ports are free again
    const s = dgram.createSocket('udp4');
    await new Promise<void>((resolve, reject) => {
      s.once('error', reject);
      s.bind(h.port, '127.0.0.1', () => resolve());
    });
    s.close();
    const t = net.createServer();
    await new Promise<void>((resolve, reject) => {
      t.once('error', reject);
      t.listen(h.port, '127.0.0.1', () => resolve());
    });
    await new Promise((resolve) => t.close(resolve));
  });

  it('a failed start (TCP port taken) rejects, releases the UDP port, and stop still works', async () => {
    const blocker = net.createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', () => resolve()));
    const port = (blocker.address() as net.AddressInfo).port;
    try {
      const server = new DnsServer({ listen: { host: '127.0.0.1', port }, zone: ZONE, waker: { onLookup() {} }, metrics: new Metrics(), log: silentLogger() });
      await assert.rejects(server.start(), (e: NodeJS.ErrnoException) => e.code === 'EADDRINUSE');
      await server.stop();
      const s = dgram.createSocket('udp4');
      await new Promise<void>((resolve, reject) => {
        s.once('error', reject);
        s.bind(port, '127.0.0.1', () => resolve());
      });
      s.close();
      await assert.rejects(server.start(), (e) => isPicoError(e, 'PICO_ERR_INVALID_STATE'));
    } finally {
      await new Promise((resolve) => blocker.close(resolve));
    }
  });

  it('stop during start wins: start rejects and nothing stays open', { timeout: 10_000 }, async () => {
    const server = new DnsServer({ listen: { host: '127.0.0.1', port: 0 }, zone: ZONE, waker: { onLookup() {} }, metrics: new Metrics(), log: silentLogger() });
    const starting = server.start();
    await server.stop();
    await assert.rejects(starting, (e) => isPicoError(e, 'PICO_ERR_SHUTTING_DOWN'));
  });

  it('closes idle TCP connections', { timeout: 10_000 }, async () => {
    const h = await startServer(ZONE, { tcpIdleTimeoutMs: 50 });
    const c = await TcpClient.connect(h.port);
    try {
      assert.equal(idOf(await c.ask(query('hello.apps.test', T.A, { id: 31 }))), 31);
      await c.closed; // bounded by the test's timeout
    } finally {
      c.destroy();
      await h.server.stop();
    }
  });

  it('answers even when the waker throws or rejects', async () => {
    for (const onLookup of [
      () => { throw new Error('placement is broken'); },
      async () => { throw new Error('placement is broken, asynchronously'); },
    ]) {
      const h = await startServer(ZONE, { waker: { onLookup } });
      const udp = new UdpClient(h.port);
      try {
        assert.equal(rcodeOf(await udp.ask(query('hello.apps.test', T.A))), 0);
        assert.equal(rcodeOf(await udp.ask(query('hello.apps.test', T.A))), 0);
      } finally {
        udp.close();
        await h.server.stop();
      }
    }
  });

  it('rejects invalid zone data up front', () => {
    const bad: ZoneData = { ...ZONE, nameserver: { a: ['not-an-ip'], aaaa: [] } };
    assert.throws(
      () => new DnsServer({ listen: { host: '127.0.0.1', port: 0 }, zone: bad, waker: { onLookup() {} }, metrics: new Metrics(), log: silentLogger() }),
      (e) => isPicoError(e, 'PICO_ERR_CONFIG'),
    );
  });
});
