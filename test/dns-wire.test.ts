import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Packet } from 'dns2';
import { AnswerTable, wireKey } from '../dns/answers.js';
import { Responder } from '../dns/responder.js';
import { TcpFramer } from '../dns/tcp-framer.js';
import { PARSE, Query, RCODE, TYPE, parseQuery } from '../dns/wire.js';
import { buildZone, type ZoneProblem } from '../dns/zone.js';
import { isPicoError } from '../shared/errors.js';

/** A query in wire form, built by hand so that tests can break any part of it. */
function query(name: string, type: number, o: { id?: number; flags?: number; edns?: { size?: number; version?: number; rdata?: Buffer } } = {}): Buffer {
  const labels = name === '' ? [] : name.split('.');
  const qname = Buffer.concat([...labels.map((l) => Buffer.concat([Buffer.from([l.length]), Buffer.from(l, 'latin1')])), Buffer.from([0])]);
  const header = Buffer.alloc(12);
  header.writeUInt16BE(o.id ?? 0x1234, 0);
  header.writeUInt16BE(o.flags ?? 0x0100, 2);
  header.writeUInt16BE(1, 4);
  header.writeUInt16BE(o.edns ? 1 : 0, 10);
  const tail = Buffer.alloc(4);
  tail.writeUInt16BE(type, 0);
  tail.writeUInt16BE(1, 2);
  const parts: Buffer[] = [header, qname, tail];
  if (o.edns) {
    const rdata = o.edns.rdata ?? Buffer.alloc(0);
    const opt = Buffer.alloc(11);
    opt.writeUInt16BE(TYPE.OPT, 1);
    opt.writeUInt16BE(o.edns.size ?? 1232, 3);
    opt[6] = o.edns.version ?? 0;
    opt.writeUInt16BE(rdata.length, 9);
    parts.push(opt, rdata);
  }
  return Buffer.concat(parts);
}

/** The message with the RDLENGTH of its last record (the OPT) overwritten. */
function withRdlength(msg: Buffer, rdlength: number): Buffer {
  const out = Buffer.from(msg);
  out.writeUInt16BE(rdlength, out.length - 2);
  return out;
}

const ZONE = buildZone({
  zones: ['apps.test', 'Other.Example.'],
  ttlMs: 1500,
  nameserverAddress: ['192.0.2.53', '2001:db8::53'],
  serial: 7,
  apps: [
    { app: 'hello', names: ['hello.apps.test', 'deep.er.apps.test'], a: ['127.0.1.1'], aaaa: ['fd00::1'] },
    { app: 'apex', names: ['other.example'], a: ['127.0.1.2'], aaaa: [] },
    { app: 'v6', names: ['v6.other.example'], a: [], aaaa: ['::ffff:10.1.2.3', '2001:db8:0:0:1::1', '1::'] },
  ],
});

function answerOf(msg: Buffer, tcp = false): { packet: ReturnType<typeof Packet.parse>; responder: Responder } {
  const responder = new Responder();
  const out = responder.respond(msg, tcp, new AnswerTable(ZONE));
  assert.ok(out, 'expected a response');
  const body = tcp ? out.subarray(2) : out;
  if (tcp) assert.equal(out.readUInt16BE(0), body.length);
  return { packet: Packet.parse(body), responder };
}

describe('dns wire: parseQuery', () => {
  const q = new Query();

  it('accepts a plain query and keys it by its lower-cased wire name', () => {
    assert.equal(parseQuery(query('HeLLo.Apps.TEST', TYPE.AAAA), q), PARSE.OK);
    assert.equal(q.key, wireKey('hello.apps.test'));
    assert.equal(q.qtype, TYPE.AAAA);
    assert.equal(q.qclass, 1);
    assert.equal(q.edns, false);
    assert.equal(q.udpSize, 512);
  });

  it('reads EDNS: payload size (at least 512), version, options that tile the RDATA', () => {
    const cookie = Buffer.from([0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert.equal(parseQuery(query('a.apps.test', TYPE.A, { edns: { size: 4096, rdata: cookie } }), q), PARSE.OK);
    assert.deepEqual([q.edns, q.udpSize, q.ednsVersion], [true, 4096, 0]);
    assert.equal(parseQuery(query('a.apps.test', TYPE.A, { edns: { size: 100, version: 1 } }), q), PARSE.OK);
    assert.deepEqual([q.udpSize, q.ednsVersion], [512, 1]);
  });

  it('drops what has no header or is a response', () => {
    assert.equal(parseQuery(Buffer.alloc(0), q), PARSE.DROP);
    assert.equal(parseQuery(Buffer.alloc(11), q), PARSE.DROP);
    assert.equal(parseQuery(query('a.apps.test', TYPE.A, { flags: 0x8400 }), q), PARSE.DROP);
  });

  it('answers NOTIMP to opcodes other than QUERY', () => {
    for (const opcode of [1, 2, 4, 5, 15]) {
      assert.equal(parseQuery(query('a.apps.test', TYPE.A, { flags: opcode << 11 }), q), PARSE.NOTIMP, `opcode ${opcode}`);
    }
  });

  it('answers FORMERR to each malformation', () => {
    const good = query('a.apps.test', TYPE.A);
    const cases: Array<[string, Buffer]> = [
      ['header only', good.subarray(0, 12)],
      ['QDCOUNT 0', Buffer.concat([good.subarray(0, 4), Buffer.from([0, 0]), good.subarray(6)])],
      ['QDCOUNT 2', Buffer.concat([good.subarray(0, 4), Buffer.from([0, 2]), good.subarray(6)])],
      ['ANCOUNT 1', Buffer.concat([good.subarray(0, 6), Buffer.from([0, 1]), good.subarray(8)])],
      ['truncated name', good.subarray(0, 16)],
      ['truncated type', good.subarray(0, good.length - 3)],
      ['trailing bytes', Buffer.concat([good, Buffer.from([0])])],
      ['pointer loop', Buffer.concat([good.subarray(0, 12), Buffer.from([0xc0, 12, 0, 1, 0, 1])])],
      ['pointer to a label', Buffer.concat([good.subarray(0, 12), Buffer.from([1, 0x61, 0xc0, 12, 0, 1, 0, 1])])],
      ['label of 64', query(`${'x'.repeat(64)}.apps.test`, TYPE.A)],
      ['reserved label type', Buffer.concat([good.subarray(0, 12), Buffer.from([0x41]), Buffer.alloc(70)])],
      ['name of 256', query(Array.from({ length: 4 }, () => 'y'.repeat(63)).join('.'), TYPE.A)],
      ['ARCOUNT 2', Buffer.concat([good.subarray(0, 10), Buffer.from([0, 2]), good.subarray(12)])],
      ['additional not OPT', Buffer.concat([good.subarray(0, 10), Buffer.from([0, 1]), good.subarray(12), Buffer.from([0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0])])],
      ['OPT rdata overruns', withRdlength(query('a.apps.test', TYPE.A, { edns: {} }), 1)],
      ['OPT option overruns', query('a.apps.test', TYPE.A, { edns: { rdata: Buffer.from([0, 10, 0, 9, 1, 2, 3, 4]) } })],
    ];
    for (const [what, msg] of cases) assert.equal(parseQuery(msg, q), PARSE.FORMERR, what);
    // The limits themselves are fine: 63-octet labels, 255-octet names.
    assert.equal(parseQuery(query(`${'x'.repeat(63)}.apps.test`, TYPE.A), q), PARSE.OK);
    const name255 = [...Array.from({ length: 3 }, () => 'y'.repeat(63)), 'z'.repeat(61)].join('.');
    assert.equal(parseQuery(query(name255, TYPE.A), q), PARSE.OK);
  });
});

describe('dns wire: TcpFramer', () => {
  const frame = (body: string) => Buffer.concat([Buffer.from([0, body.length]), Buffer.from(body)]);

  it('splits pipelined messages and reassembles split ones, at every split point', () => {
    const stream = Buffer.concat([frame('first'), frame(''), frame('second message'), frame('x')]);
    for (let cut = 0; cut <= stream.length; cut++) {
      for (const step of [1, 3, stream.length]) {
        const got: string[] = [];
        const framer = new TcpFramer((m) => (got.push(m.toString()), true));
        const chunks = [stream.subarray(0, cut), ...Array.from({ length: Math.ceil((stream.length - cut) / step) }, (_, i) => stream.subarray(cut + i * step, cut + (i + 1) * step))];
        for (const c of chunks) assert.equal(framer.push(c), true);
        assert.deepEqual(got, ['first', '', 'second message', 'x'], `cut ${cut} step ${step}`);
      }
    }
  });

  it('stops when the handler says so', () => {
    const got: string[] = [];
    const framer = new TcpFramer((m) => (got.push(m.toString()), m.length > 0));
    assert.equal(framer.push(Buffer.concat([frame('a'), frame(''), frame('b')])), false);
    assert.deepEqual(got, ['a', '']);
  });
});

describe('dns wire: buildZone', () => {
  it('normalizes names and splits nothing it was not given', () => {
    assert.deepEqual(ZONE.zones, ['apps.test', 'other.example']);
    assert.deepEqual(ZONE.nameserver, { a: ['192.0.2.53'], aaaa: ['2001:db8::53'] });
    assert.deepEqual(ZONE.records.get('hello.apps.test'), { app: 'hello', a: ['127.0.1.1'], aaaa: ['fd00::1'] });
    assert.equal(ZONE.records.get('deep.er.apps.test')?.app, 'hello');
  });

  it('leaves out names it cannot serve, reports each, keeps the rest', () => {
    const problems: ZoneProblem[] = [];
    const zone = buildZone({
      zones: ['apps.test'],
      ttlMs: 5000,
      nameserverAddress: '127.0.0.1',
      onProblem: (p) => problems.push(p),
      apps: [
        { app: 'ok', names: ['ok.apps.test'], a: ['127.0.1.1'], aaaa: [] },
        { app: 'outside', names: ['x.example.com'], a: ['127.0.1.2'], aaaa: [] },
        { app: 'nsname', names: ['ns.apps.test'], a: ['127.0.1.3'], aaaa: [] },
        { app: 'dup', names: ['ok.apps.test', 'dup.apps.test'], a: ['127.0.1.4', 'fd00::9'], aaaa: [] },
        { app: 'noaddr', names: ['noaddr.apps.test'], a: [], aaaa: [] },
        { app: 'badname', names: ['bad_name-.apps.test'], a: ['127.0.1.5'], aaaa: [] },
        { app: 'scoped', names: ['scoped.apps.test'], a: [], aaaa: ['fe80::1%eth0'] },
      ],
    });
    assert.deepEqual([...zone.records.keys()].sort(), ['dup.apps.test', 'ok.apps.test']);
    assert.equal(zone.records.get('ok.apps.test')?.app, 'ok');
    assert.deepEqual(zone.records.get('dup.apps.test')?.a, ['127.0.1.4']);
    assert.deepEqual(problems.map((p) => `${p.app} ${p.name}`).sort(), [
      'badname bad_name-.apps.test', 'dup ', 'dup ok.apps.test', 'noaddr noaddr.apps.test', 'nsname ns.apps.test', 'outside x.example.com',
      'scoped ', 'scoped scoped.apps.test',
    ]);
  });

  it('throws PICO_ERR_CONFIG for a problem nobody listens for, and for unusable zones', () => {
    const base = { zones: ['apps.test'], ttlMs: 5000, nameserverAddress: '127.0.0.1', apps: [] };
    const bad = [
      { ...base, apps: [{ app: 'x', names: ['ns.apps.test'], a: ['127.0.1.1'], aaaa: [] }] },
      { ...base, zones: ['not a zone'] },
      { ...base, zones: [] },
      { ...base, nameserverAddress: 'localhost' },
      { ...base, nameserverAddress: [] },
    ];
    for (const input of bad) assert.throws(() => buildZone(input), (e) => isPicoError(e, 'PICO_ERR_CONFIG'));
  });
});

describe('dns wire: answers', () => {
  it('answers A with TTL in whole seconds rounded up, AA, the question as asked', () => {
    const msg = query('HELLO.apps.Test', TYPE.A, { id: 4242, flags: 0x0110 });
    const { packet, responder } = answerOf(msg);
    assert.equal(packet.header.id, 4242);
    assert.deepEqual([packet.header.qr, packet.header.aa, packet.header.rd, packet.header.ra, packet.header.rcode], [1, 1, 1, 0, 0]);
    assert.equal((new Responder().respond(msg, false, new AnswerTable(ZONE))![3]! & 0x10), 0x10, 'CD copied');
    assert.equal(packet.questions[0]!.name, 'HELLO.apps.Test');
    assert.deepEqual(packet.answers.map((a) => [a.name, a.ttl, a.address]), [['HELLO.apps.Test', 2, '127.0.1.1']]);
    assert.equal(responder.app, 'hello');
    assert.equal(responder.rcode, RCODE.NOERROR);
  });

  it('encodes IPv6, including an IPv4-mapped address', () => {
    assert.deepEqual(answerOf(query('hello.apps.test', TYPE.AAAA)).packet.answers.map((a) => a.address), ['fd00::1']);
    // dns2 prints what we encoded in its own canonical form
    const v6 = answerOf(query('v6.other.example', TYPE.AAAA)).packet.answers.map((a) => a.address);
    assert.deepEqual(v6, ['::ffff:a01:203', '2001:db8::1:0:0:1', '1::']);
  });

  it('serves the apex: SOA, NS with glue, and an app that owns the apex', () => {
    const soa = answerOf(query('other.example', TYPE.SOA)).packet;
    assert.deepEqual(
      soa.answers.map((a) => [a.name, a.primary, a.admin, a.serial, a.refresh, a.retry, a.expiration, a.minimum]),
      [['other.example', 'ns.other.example', 'hostmaster.other.example', 7, 3600, 900, 1209600, 2]],
    );
    const ns = answerOf(query('other.example', TYPE.NS)).packet;
    assert.deepEqual(ns.answers.map((a) => a.ns), ['ns.other.example']);
    assert.deepEqual(ns.additionals.map((a) => [a.name, a.address]), [['ns.other.example', '192.0.2.53'], ['ns.other.example', '2001:db8::53']]);
    const { packet, responder } = answerOf(query('other.example', TYPE.A));
    assert.deepEqual(packet.answers.map((a) => a.address), ['127.0.1.2']);
    assert.equal(responder.app, 'apex');
    const any = answerOf(query('other.example', TYPE.ANY)).packet;
    assert.deepEqual(any.answers.map((a) => a.type), [TYPE.SOA, TYPE.NS, TYPE.A]);
    assert.deepEqual(answerOf(query('ns.apps.test', TYPE.AAAA)).packet.answers.map((a) => a.address), ['2001:db8::53']);
  });

  it('answers NODATA for a served name without that type, and for an empty non-terminal', () => {
    for (const [name, zone, app] of [['v6.other.example', 'other.example', 'v6'], ['er.apps.test', 'apps.test', undefined]] as const) {
      const { packet, responder } = answerOf(query(name, TYPE.A));
      assert.equal(packet.header.rcode, RCODE.NOERROR, name);
      assert.equal(packet.header.aa, 1);
      assert.equal(packet.answers.length, 0);
      assert.deepEqual(packet.authorities.map((a) => [a.type, a.name, a.minimum]), [[TYPE.SOA, zone, 2]]);
      assert.equal(responder.app, app);
    }
  });

  it('answers NXDOMAIN with the SOA of the longest zone, at any depth, without waking', () => {
    for (const name of ['nope.apps.test', 'a.b.c.d.nope.APPS.test', 'x.hello.apps.test', 'x.ns.other.example']) {
      const { packet, responder } = answerOf(query(name, TYPE.A));
      assert.equal(packet.header.rcode, RCODE.NXDOMAIN, name);
      assert.equal(packet.header.aa, 1);
      assert.equal(packet.questions[0]!.name, name);
      const zone = name.toLowerCase().endsWith('apps.test') ? 'apps.test' : 'other.example';
      // Names compressed against the question carry its case: equal as DNS names.
      assert.deepEqual(packet.authorities.map((a) => [a.name, a.primary, a.admin].map((n) => n?.toLowerCase())), [[zone, `ns.${zone}`, `hostmaster.${zone}`]]);
      assert.equal(responder.app, undefined);
    }
  });

  it('refuses names outside the zones, other classes and zone transfers', () => {
    const chaos = query('hello.apps.test', TYPE.A);
    chaos.writeUInt16BE(3, chaos.length - 2);
    for (const msg of [query('example.com', TYPE.A), query('xapps.test', TYPE.A), query('test', TYPE.SOA), query('', TYPE.NS), chaos, query('apps.test', TYPE.AXFR)]) {
      const { packet, responder } = answerOf(msg);
      assert.equal(packet.header.rcode, RCODE.REFUSED);
      assert.equal(packet.header.aa, 0);
      assert.equal(packet.answers.length + packet.authorities.length, 0);
      assert.equal(responder.app, undefined);
    }
  });

  it('answers EDNS with OPT, BADVERS to version 1, and no OPT without EDNS', () => {
    const withOpt = answerOf(query('hello.apps.test', TYPE.A, { edns: { size: 4096 } })).packet;
    assert.deepEqual(withOpt.additionals.map((a) => [a.type, a.class, a.version]), [[TYPE.OPT, 1232, 0]]);
    assert.equal(answerOf(query('hello.apps.test', TYPE.A)).packet.additionals.length, 0);
    const { packet, responder } = answerOf(query('hello.apps.test', TYPE.A, { edns: { version: 1 } }));
    assert.equal(responder.rcode, RCODE.BADVERS);
    assert.equal(packet.answers.length, 0);
    assert.equal(packet.additionals[0]!.extendedRcode, 1); // BADVERS = 16: upper bits in the OPT
  });

  it('answers FORMERR and NOTIMP with the header only, and drops responses', () => {
    const r = new Responder();
    const table = new AnswerTable(ZONE);
    const formerr = r.respond(query('a'.repeat(64), TYPE.A, { id: 99 }), false, table)!;
    assert.deepEqual([formerr.length, formerr.readUInt16BE(0), formerr[3]! & 0xf, r.rcode], [12, 99, RCODE.FORMERR, RCODE.FORMERR]);
    const notimp = r.respond(query('hello.apps.test', TYPE.SOA, { flags: 4 << 11 }), true, table)!;
    assert.deepEqual([notimp.readUInt16BE(0), notimp[2 + 2]! >> 3 & 0xf, notimp[2 + 3]! & 0xf], [12, 4, RCODE.NOTIMP]);
    assert.equal(r.respond(query('hello.apps.test', TYPE.A, { flags: 0x8000 }), false, table), undefined);
  });

  it('never throws and never answers with another id, whatever the input', () => {
    let seed = 12345;
    const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 16) / 65536;
    const r = new Responder();
    const table = new AnswerTable(ZONE);
    const valid = query('hello.apps.test', TYPE.A, { edns: {} });
    let answered = 0;
    for (let i = 0; i < 20_000; i++) {
      let msg: Buffer;
      if (i % 2) {
        msg = Buffer.from(Array.from({ length: Math.floor(rand() * 64) }, () => Math.floor(rand() * 256)));
      } else {
        // a valid query with a few bytes flipped: exercises the deep branches
        msg = Buffer.from(valid);
        for (let k = 0; k < 1 + rand() * 3; k++) msg[Math.floor(rand() * msg.length)] = Math.floor(rand() * 256);
        if (rand() < 0.2) msg = msg.subarray(0, Math.floor(rand() * msg.length));
      }
      const out = r.respond(msg, false, table);
      if (out === undefined) continue;
      answered++;
      assert.equal(out.readUInt16BE(0), msg.readUInt16BE(0));
      assert.equal(out[2]! & 0x80, 0x80);
      assert.deepEqual(Packet.parse(out).errors, []);
    }
    assert.ok(answered > 1000, `only ${answered} fuzzed queries were answered`);
  });
});
