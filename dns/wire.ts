/*
 * DNS wire format (RFC 1035 §4, RFC 6891): a strict parser for the one kind of message this
 * server accepts — a standard query with one question and at most an OPT record — and the
 * constants the rest of dns/ shares. Queries are tiny and hostile input is expected, so the
 * parser is a single bounded forward pass: it never follows a compression pointer (a query's
 * question has nothing earlier to point at, so a pointer there is malformed by construction,
 * which also makes pointer loops impossible), checks every length against the buffer before
 * reading, and never throws.
 */

export const TYPE = { A: 1, NS: 2, SOA: 6, AAAA: 28, OPT: 41, IXFR: 251, AXFR: 252, ANY: 255 } as const;
export const CLASS_IN = 1;

export const RCODE = { NOERROR: 0, FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, NOTIMP: 4, REFUSED: 5, BADVERS: 16 } as const;

/** rcode → its mnemonic, the `rcode` label of picocenter_dns_queries_total */
export function rcodeName(rcode: number): string {
  switch (rcode) {
    case RCODE.NOERROR: return 'NOERROR';
    case RCODE.FORMERR: return 'FORMERR';
    case RCODE.SERVFAIL: return 'SERVFAIL';
    case RCODE.NXDOMAIN: return 'NXDOMAIN';
    case RCODE.NOTIMP: return 'NOTIMP';
    case RCODE.REFUSED: return 'REFUSED';
    case RCODE.BADVERS: return 'BADVERS';
    default: return `RCODE${rcode}`;
  }
}

/** Header flag bits (the 16-bit word at offset 2). */
export const FLAG = { QR: 0x8000, AA: 0x0400, TC: 0x0200, RD: 0x0100, RA: 0x0080, AD: 0x0020, CD: 0x0010 } as const;
export const OPCODE_MASK = 0x7800;

export const HEADER_SIZE = 12;
/** RFC 1035 §4.2.1: the UDP limit without EDNS, and the least EDNS payload size honored */
export const CLASSIC_UDP_SIZE = 512;
/**
 * The largest UDP response sent whatever the client advertises, and the size advertised in
 * our OPT: DNS Flag Day 2020's 1232 bytes fits any path MTU of 1280 without IP fragmentation
 * (fragments are how off-path attackers poison caches).
 */
export const MAX_UDP_SIZE = 1232;
export const MAX_NAME_WIRE = 255;
export const MAX_LABEL = 63;

/** parseQuery results: what the caller must do with the message. */
export const PARSE = {
  /** a query to answer; the Query holds its question */
  OK: 0,
  /** not answerable at all (no complete header, or a response): send nothing */
  DROP: 1,
  /** header readable, rest malformed: answer FORMERR */
  FORMERR: 2,
  /** an opcode other than QUERY: answer NOTIMP */
  NOTIMP: 3,
} as const;
export type ParseResult = (typeof PARSE)[keyof typeof PARSE];

/**
 * One parsed query. The hot path reuses a single instance, so its fields are only meaningful
 * until the next parseQuery call.
 */
export class Query {
  /** offset just past QCLASS: bytes [0, questionEnd) are the header and the question as asked */
  questionEnd = 0;
  /** wire length of QNAME, terminating zero included */
  qnameLength = 0;
  qtype = 0;
  qclass = 0;
  /** QNAME in wire form, ASCII lower-cased, as a latin1 string (one char per octet) */
  key = '';
  /** the query carried an OPT record */
  edns = false;
  /** the requestor's UDP payload size from its OPT, raised to 512 when smaller */
  udpSize = CLASSIC_UDP_SIZE;
  ednsVersion = 0;
}

/**
 * Parses `msg` as a standard query: QR=0, opcode QUERY, QDCOUNT=1, ANCOUNT=NSCOUNT=0, ARCOUNT 0
 * or 1 holding a well-formed OPT, no compression in QNAME, nothing after the last record.
 * Anything else is FORMERR (or NOTIMP for another opcode), or DROP when there is no header to
 * answer to or the message is itself a response (answering responses enables reflection loops).
 */
export function parseQuery(msg: Buffer, q: Query): ParseResult {
  const len = msg.length;
  if (len < HEADER_SIZE) return PARSE.DROP;
  const flags = (msg[2]! << 8) | msg[3]!;
  if (flags & FLAG.QR) return PARSE.DROP;
  if (flags & OPCODE_MASK) return PARSE.NOTIMP;
  // QDCOUNT must be 1 (RFC 9619); ANCOUNT and NSCOUNT 0; ARCOUNT at most one OPT.
  if (msg[4] !== 0 || msg[5] !== 1 || msg[6] !== 0 || msg[7] !== 0 || msg[8] !== 0 || msg[9] !== 0) return PARSE.FORMERR;
  if (msg[10] !== 0 || msg[11]! > 1) return PARSE.FORMERR;
  const arcount = msg[11]!;

  // QNAME: plain labels only, each ≤ 63 octets, ≤ 255 octets in all, inside the buffer.
  let p = HEADER_SIZE;
  for (;;) {
    if (p >= len) return PARSE.FORMERR;
    const l = msg[p]!;
    if (l === 0) break;
    if (l > MAX_LABEL) return PARSE.FORMERR; // 0xC0 pointer, 0x40/0x80 reserved label types
    p += l + 1;
    if (p - HEADER_SIZE >= MAX_NAME_WIRE) return PARSE.FORMERR;
  }
  p++; // the root label
  const qnameEnd = p;
  if (p + 4 > len) return PARSE.FORMERR;
  q.qtype = (msg[p]! << 8) | msg[p + 1]!;
  q.qclass = (msg[p + 2]! << 8) | msg[p + 3]!;
  p += 4;
  q.questionEnd = p;
  q.qnameLength = qnameEnd - HEADER_SIZE;
  // latin1 maps octets 1:1; toLowerCase on it changes only A-Z among octets that can
  // match a served name (others stay outside ASCII), which is DNS's case-insensitivity.
  q.key = msg.toString('latin1', HEADER_SIZE, qnameEnd).toLowerCase();
  q.edns = false;
  q.udpSize = CLASSIC_UDP_SIZE;
  q.ednsVersion = 0;

  if (arcount === 1) {
    // OPT: root owner name, TYPE 41, CLASS = payload size, TTL = ext-rcode|version|flags.
    if (p + 11 > len || msg[p] !== 0) return PARSE.FORMERR;
    if (((msg[p + 1]! << 8) | msg[p + 2]!) !== TYPE.OPT) return PARSE.FORMERR;
    const size = (msg[p + 3]! << 8) | msg[p + 4]!;
    q.ednsVersion = msg[p + 6]!;
    const rdlength = (msg[p + 9]! << 8) | msg[p + 10]!;
    p += 11;
    const end = p + rdlength;
    if (end > len) return PARSE.FORMERR;
    // Options are ignored (cookies, ECS, padding…) but must tile the RDATA exactly.
    while (p < end) {
      if (p + 4 > end) return PARSE.FORMERR;
      p += 4 + ((msg[p + 2]! << 8) | msg[p + 3]!);
    }
    if (p !== end) return PARSE.FORMERR;
    q.edns = true;
    q.udpSize = size < CLASSIC_UDP_SIZE ? CLASSIC_UDP_SIZE : size;
  }
  return p === len ? PARSE.OK : PARSE.FORMERR;
}
