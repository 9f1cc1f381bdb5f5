import { BADVERS, type AnswerTable, type Prepared } from './answers.js';
import {
  CLASSIC_UDP_SIZE,
  FLAG,
  HEADER_SIZE,
  MAX_UDP_SIZE,
  OPCODE_MASK,
  PARSE,
  Query,
  RCODE,
  TYPE,
  parseQuery,
} from './wire.js';

/** Largest DNS message over TCP: its length must fit the 2-byte prefix (RFC 7766 §8). */
const MAX_TCP_SIZE = 0xffff;
const OPT_SIZE = 11;

/**
 * The DNS handler contract — the only place a message becomes a response:
 *
 *   respond(msg, tcp, table) → Buffer   the complete response to send; over TCP it already
 *                                       carries its 2-byte length prefix (RFC 7766 §8)
 *                            → undefined send nothing: no header to answer to, or the message
 *                                       is a response (DROP)
 *
 * After a call that returned a Buffer, `rcode` is the response's RCODE (extended: BADVERS is
 * 16) and `app` the app whose name was looked up (undefined for any other name), which the
 * caller wakes only *after* sending. Never throws, allocates only the returned Buffer, and is
 * not reentrant: one instance serves one thread, one message at a time.
 */
export class Responder {
  rcode = 0;
  app: string | undefined = undefined;
  private readonly q = new Query();

  respond(msg: Buffer, tcp: boolean, table: AnswerTable): Buffer | undefined {
    const q = this.q;
    this.app = undefined;
    switch (parseQuery(msg, q)) {
      case PARSE.OK:
        break;
      case PARSE.DROP:
        return undefined;
      case PARSE.NOTIMP:
        return this.error(msg, RCODE.NOTIMP, tcp);
      default:
        return this.error(msg, RCODE.FORMERR, tcp);
    }
    if (q.edns && q.ednsVersion !== 0) return this.answer(msg, BADVERS, tcp);
    if (q.qtype === TYPE.OPT) return this.error(msg, RCODE.FORMERR, tcp); // a pseudo-type: nothing to ask for
    const p = table.lookup(q);
    this.app = p.app;
    return this.answer(msg, p, tcp);
  }

  /** Header | question as asked | prepared body | OPT, or TC with the body left out. */
  private answer(msg: Buffer, p: Prepared, tcp: boolean): Buffer {
    const q = this.q;
    const questionEnd = q.questionEnd;
    const opt = q.edns ? OPT_SIZE : 0;
    const limit = tcp ? MAX_TCP_SIZE : q.edns ? Math.min(q.udpSize, MAX_UDP_SIZE) : CLASSIC_UDP_SIZE;
    let body = p.body.length;
    let an = p.an;
    let ns = p.ns;
    let ar = p.ar;
    let tc = 0;
    if (questionEnd + body + opt > limit) {
      // Too big for this transport: the question alone with TC, so the client retries over
      // TCP (RFC 1035 §4.2.1, RFC 7766 §5). Questions are ≤ 271 octets, so this always fits.
      body = an = ns = ar = 0;
      tc = FLAG.TC;
    }
    const size = questionEnd + body + opt;
    const h = tcp ? 2 : 0;
    const out = Buffer.allocUnsafe(h + size);
    if (tcp) {
      out[0] = size >> 8;
      out[1] = size & 0xff;
    }
    const flags = FLAG.QR | (p.aa ? FLAG.AA : 0) | tc | (((msg[2]! << 8) | msg[3]!) & (FLAG.RD | FLAG.CD)) | (p.rcode & 0xf);
    out[h] = msg[0]!; // ID
    out[h + 1] = msg[1]!;
    out[h + 2] = flags >> 8;
    out[h + 3] = flags & 0xff;
    out[h + 4] = 0; // QDCOUNT = 1
    out[h + 5] = 1;
    out[h + 6] = an >> 8;
    out[h + 7] = an & 0xff;
    out[h + 8] = ns >> 8;
    out[h + 9] = ns & 0xff;
    if (opt) ar++;
    out[h + 10] = ar >> 8;
    out[h + 11] = ar & 0xff;
    // The question, 0x20 case intact. (TypedArray.set: Buffer.copy's argument handling costs
    // more than these few octets.)
    out.set(msg.subarray(HEADER_SIZE, questionEnd), h + HEADER_SIZE);
    if (body > 0) out.set(p.body, h + questionEnd);
    if (opt) {
      const o = h + questionEnd + body;
      out[o] = 0; // root owner
      out[o + 1] = TYPE.OPT >> 8;
      out[o + 2] = TYPE.OPT & 0xff;
      out[o + 3] = MAX_UDP_SIZE >> 8; // our payload size
      out[o + 4] = MAX_UDP_SIZE & 0xff;
      out[o + 5] = p.rcode >> 4; // extended RCODE: upper 8 bits
      out[o + 6] = 0; // version
      out[o + 7] = 0; // DO and Z: no DNSSEC
      out[o + 8] = 0;
      out[o + 9] = 0; // RDLENGTH
      out[o + 10] = 0;
    }
    this.rcode = p.rcode;
    return out;
  }

  /** FORMERR or NOTIMP: the header alone, no sections (the question may be what was wrong). */
  private error(msg: Buffer, rcode: number, tcp: boolean): Buffer {
    const h = tcp ? 2 : 0;
    const out = Buffer.alloc(h + HEADER_SIZE);
    if (tcp) out[1] = HEADER_SIZE;
    const flags = FLAG.QR | (((msg[2]! << 8) | msg[3]!) & (OPCODE_MASK | FLAG.RD)) | rcode;
    out[h] = msg[0]!;
    out[h + 1] = msg[1]!;
    out[h + 2] = flags >> 8;
    out[h + 3] = flags & 0xff;
    this.rcode = rcode;
    return out;
  }
}
