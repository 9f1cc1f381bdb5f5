/*
 * HTTP/1.1 message heads, scanned in place in the bytes a socket delivered (RFC 9112). The
 * gateway forwards messages as raw bytes, so all it needs from a head is where the message ends
 * and which app it is for. The request scanner is strict on purpose: anything two parsers could
 * read two ways (the stuff of request smuggling) is rejected, not repaired.
 *
 * Both scanners are handed exactly one head: `start` is its first byte and `end` the index just
 * past the CRLFCRLF that ends it, so every inner loop stops at a CR inside the head and needs
 * no bounds check. They fill a caller-owned result object (no allocation per message).
 */

const CR = 0x0d;
const LF = 0x0a;
const SP = 0x20;
const HT = 0x09;
const COLON = 0x3a;
const COMMA = 0x2c;

/** The empty line that ends every head. */
export const HEAD_END = Buffer.from('\r\n\r\n', 'latin1');

function table(accept: (c: number) => boolean): Uint8Array {
  const t = new Uint8Array(256);
  for (let c = 0; c < 256; c++) t[c] = accept(c) ? 1 : 0;
  return t;
}
const isAlnum = (c: number): boolean => (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a);
/** tchar: the characters of methods and field names */
const TOKEN = table((c) => isAlnum(c) || "!#$%&'*+-.^_`|~".includes(String.fromCharCode(c)));
/** field-value characters: VCHAR, obs-text, SP, HTAB (no CR, LF or other controls) */
const VALUE = table((c) => c === HT || (c >= 0x20 && c !== 0x7f));
/** request-target characters: VCHAR and obs-text */
const TARGET = table((c) => c > 0x20 && c !== 0x7f);
const HEX = new Int8Array(256).fill(-1);
for (let c = 0; c < 16; c++) {
  HEX[c.toString(16).charCodeAt(0)] = c;
  HEX[c.toString(16).toUpperCase().charCodeAt(0)] = c;
}

const M_CONNECT = Buffer.from('CONNECT', 'latin1');
const lower = (s: string): Uint8Array => Uint8Array.from(Buffer.from(s, 'latin1'));
const N_HOST = lower('host');
const N_CONTENT_LENGTH = lower('content-length');
const N_TRANSFER_ENCODING = lower('transfer-encoding');
const N_CONNECTION = lower('connection');
const N_UPGRADE = lower('upgrade');
const N_XFF = lower('x-forwarded-for');
const N_XF_PROTO = lower('x-forwarded-proto');
const N_XF_HOST = lower('x-forwarded-host');
const T_CHUNKED = lower('chunked');
const T_CLOSE = lower('close');
const T_KEEP_ALIVE = lower('keep-alive');
const T_UPGRADE = lower('upgrade');

/**
 * Case-insensitive compare of buf[at, at+lit.length) with a lower-case literal of letters and
 * '-'. `| 0x20` folds A-Z to a-z; no other byte folds onto a letter or '-' except controls,
 * which token scanning has excluded.
 */
function eqLower(buf: Buffer, at: number, len: number, lit: Uint8Array): boolean {
  if (len !== lit.length) return false;
  for (let k = 0; k < len; k++) if ((buf[at + k]! | 0x20) !== lit[k]) return false;
  return true;
}

/** How a message's body is delimited. */
export const BODY_NONE = 0;
export const BODY_LENGTH = 1;
export const BODY_CHUNKED = 2;
/** until the sender closes (responses only) */
export const BODY_CLOSE = 3;
export type BodyKind = typeof BODY_NONE | typeof BODY_LENGTH | typeof BODY_CHUNKED | typeof BODY_CLOSE;

/*
 * Token lists (`Connection: keep-alive, Upgrade`): one step of the scan leaves the element in
 * tokStart..tokEnd (OWS trimmed) and returns where the next element starts.
 */
let tokStart = 0;
let tokEnd = 0;
function nextListElement(buf: Buffer, i: number, end: number): number {
  while (i < end && (buf[i] === SP || buf[i] === HT)) i++;
  tokStart = i;
  while (i < end && buf[i] !== COMMA) i++;
  let e = i;
  while (e > tokStart && (buf[e - 1] === SP || buf[e - 1] === HT)) e--;
  tokEnd = e;
  return i + 1;
}

/** What the gateway needs from one request head. Offsets index the scanned buffer. */
export class RequestHead {
  /** 0 when the head is acceptable, else the status to answer with (400, 501, 505) */
  error = 0;
  /** a short reason for logs when error != 0 */
  reason = '';
  isHead = false;
  http10 = false;
  /** the connection may carry another request after this one */
  keepAlive = true;
  /** asks to switch protocols (Upgrade + Connection: upgrade, HTTP/1.1) */
  upgrade = false;
  hostStart = -1;
  hostEnd = -1;
  body: BodyKind = BODY_NONE;
  /** bytes, when body is BODY_LENGTH */
  contentLength = 0;
  /** end of the last X-Forwarded-For value, or -1: the client address is appended there */
  xffValueEnd = -1;
  /** that X-Forwarded-For value is empty (the address goes in without a comma) */
  xffEmpty = false;
  /** [lineStart, lineEnd) pairs of X-Forwarded-Proto/-Host lines, which the gateway replaces */
  dropLines: number[] | null = null;

  private fail(status: number, reason: string): number {
    this.error = status;
    this.reason = reason;
    return status;
  }

  /**
   * Scans the head in buf[start, end), where `end` is just past its CRLFCRLF. Returns `error`.
   */
  scan(buf: Buffer, start: number, end: number): number {
    this.error = 0;
    this.isHead = false;
    this.upgrade = false;
    this.hostStart = this.hostEnd = -1;
    this.body = BODY_NONE;
    this.contentLength = 0;
    this.xffValueEnd = -1;
    this.dropLines = null;

    // request-line = method SP request-target SP HTTP-version CRLF, exactly one SP each.
    let i = start;
    while (TOKEN[buf[i]!]) i++;
    const methodLen = i - start;
    if (methodLen === 0 || buf[i] !== SP) return this.fail(400, 'bad method');
    if (methodLen === 4 && buf[start] === 0x48 && buf[start + 1] === 0x45 && buf[start + 2] === 0x41 && buf[start + 3] === 0x44) {
      this.isHead = true; // HEAD
    } else if (methodLen === 7 && buf.compare(M_CONNECT, 0, 7, start, i) === 0) {
      return this.fail(501, 'CONNECT is not supported');
    }
    const targetStart = ++i;
    while (TARGET[buf[i]!]) i++;
    if (i === targetStart || buf[i] !== SP) return this.fail(400, 'bad request-target');
    i++;
    if (end - i < 10 || buf[i] !== 0x48 || buf[i + 1] !== 0x54 || buf[i + 2] !== 0x54 || buf[i + 3] !== 0x50 || buf[i + 4] !== 0x2f) {
      return this.fail(400, 'bad HTTP version');
    }
    const major = buf[i + 5]! - 0x30;
    const minor = buf[i + 7]! - 0x30;
    if (major < 0 || major > 9 || buf[i + 6] !== 0x2e || minor < 0 || minor > 9 || buf[i + 8] !== CR || buf[i + 9] !== LF) {
      return this.fail(400, 'bad HTTP version');
    }
    if (major !== 1) return this.fail(505, 'only HTTP/1.x is served');
    const http10 = minor === 0;
    this.http10 = http10;
    i += 10;

    let hosts = 0;
    let contentLength = -1;
    let transferEncoding = false;
    let chunkedCount = 0;
    let chunkedLast = false;
    let connClose = false;
    let connKeepAlive = false;
    let connUpgrade = false;
    let upgradeHeader = false;

    // field-line = field-name ":" OWS field-value OWS CRLF
    for (;;) {
      const lineStart = i;
      if (buf[i] === CR) {
        if (buf[i + 1] !== LF || i + 2 !== end) return this.fail(400, 'bad line ending');
        break;
      }
      while (TOKEN[buf[i]!]) i++;
      const nameLen = i - lineStart;
      // Also rejects obs-fold (a line starting with SP/HT) and whitespace before the colon.
      if (nameLen === 0 || buf[i] !== COLON) return this.fail(400, 'bad header line');
      i++;
      while (buf[i] === SP || buf[i] === HT) i++;
      const vStart = i;
      while (VALUE[buf[i]!]) i++;
      if (buf[i] !== CR || buf[i + 1] !== LF) return this.fail(400, 'bad character or line ending in a header');
      let vEnd = i;
      while (vEnd > vStart && (buf[vEnd - 1] === SP || buf[vEnd - 1] === HT)) vEnd--;
      i += 2;

      switch (nameLen) {
        case 4:
          if (eqLower(buf, lineStart, 4, N_HOST)) {
            hosts++;
            this.hostStart = vStart;
            this.hostEnd = vEnd;
          }
          break;
        case 14:
          if (eqLower(buf, lineStart, 14, N_CONTENT_LENGTH)) {
            // 1*DIGIT only: no sign, no list; a repeated field must repeat the same value.
            if (vEnd === vStart || vEnd - vStart > 15) return this.fail(400, 'bad Content-Length');
            let n = 0;
            for (let k = vStart; k < vEnd; k++) {
              const d = buf[k]! - 0x30;
              if (d < 0 || d > 9) return this.fail(400, 'bad Content-Length');
              n = n * 10 + d;
            }
            if (contentLength >= 0 && n !== contentLength) return this.fail(400, 'conflicting Content-Length');
            contentLength = n;
          }
          break;
        case 17:
          if (eqLower(buf, lineStart, 17, N_TRANSFER_ENCODING)) {
            transferEncoding = true;
            for (let k = vStart; k < vEnd; ) {
              k = nextListElement(buf, k, vEnd);
              if (tokEnd === tokStart) continue;
              chunkedLast = eqLower(buf, tokStart, tokEnd - tokStart, T_CHUNKED);
              if (chunkedLast) chunkedCount++;
            }
          } else if (eqLower(buf, lineStart, 17, N_XF_PROTO)) {
            (this.dropLines ??= []).push(lineStart, i);
          }
          break;
        case 10:
          if (eqLower(buf, lineStart, 10, N_CONNECTION)) {
            for (let k = vStart; k < vEnd; ) {
              k = nextListElement(buf, k, vEnd);
              const len = tokEnd - tokStart;
              if (eqLower(buf, tokStart, len, T_CLOSE)) connClose = true;
              else if (eqLower(buf, tokStart, len, T_KEEP_ALIVE)) connKeepAlive = true;
              else if (eqLower(buf, tokStart, len, T_UPGRADE)) connUpgrade = true;
            }
          }
          break;
        case 7:
          if (eqLower(buf, lineStart, 7, N_UPGRADE)) upgradeHeader = true;
          break;
        case 15:
          if (eqLower(buf, lineStart, 15, N_XFF)) {
            this.xffValueEnd = vEnd;
            this.xffEmpty = vEnd === vStart;
          }
          break;
        case 16:
          if (eqLower(buf, lineStart, 16, N_XF_HOST)) (this.dropLines ??= []).push(lineStart, i);
          break;
      }
    }

    if (hosts !== 1 || this.hostEnd === this.hostStart) {
      return this.fail(400, hosts > 1 ? 'more than one Host' : 'missing Host');
    }
    if (transferEncoding) {
      // RFC 9112 6.1 and 6.3: TE with CL, TE in HTTP/1.0, or a final coding other than chunked
      // (applied once) cannot be framed unambiguously.
      if (contentLength >= 0) return this.fail(400, 'Content-Length with Transfer-Encoding');
      if (http10) return this.fail(400, 'Transfer-Encoding in HTTP/1.0');
      if (!chunkedLast || chunkedCount !== 1) return this.fail(400, 'Transfer-Encoding does not end in chunked');
      this.body = BODY_CHUNKED;
    } else if (contentLength > 0) {
      this.body = BODY_LENGTH;
      this.contentLength = contentLength;
    }
    this.keepAlive = http10 ? connKeepAlive && !connClose : !connClose;
    this.upgrade = !http10 && upgradeHeader && connUpgrade;
    return 0;
  }
}

/** What the gateway needs from one response head. */
export class ResponseHead {
  /** false when the head cannot be parsed (the gateway answers 502 or drops the connection) */
  ok = true;
  status = 0;
  /** the upstream keeps the connection open after this response */
  keepAlive = true;
  /** framing as the head declares it; HEAD requests, 1xx, 204 and 304 override it to none */
  body: BodyKind = BODY_CLOSE;
  contentLength = 0;

  /** Scans the head in buf[start, end), where `end` is just past its CRLFCRLF. Returns `ok`. */
  scan(buf: Buffer, start: number, end: number): boolean {
    this.ok = false;
    // status-line = HTTP-version SP 3DIGIT SP [ reason-phrase ] CRLF (the SP is often omitted)
    let i = start;
    if (end - i < 14 || buf[i] !== 0x48 || buf[i + 1] !== 0x54 || buf[i + 2] !== 0x54 || buf[i + 3] !== 0x50 || buf[i + 4] !== 0x2f
      || buf[i + 5] !== 0x31 || buf[i + 6] !== 0x2e || buf[i + 8] !== SP) return false;
    const minor = buf[i + 7]! - 0x30;
    const s0 = buf[i + 9]! - 0x30;
    const s1 = buf[i + 10]! - 0x30;
    const s2 = buf[i + 11]! - 0x30;
    if (minor < 0 || minor > 9 || s0 < 1 || s0 > 5 || s1 < 0 || s1 > 9 || s2 < 0 || s2 > 9) return false;
    this.status = s0 * 100 + s1 * 10 + s2;
    i += 12;
    if (buf[i] === SP) while (VALUE[buf[i]!]) i++;
    if (buf[i] !== CR || buf[i + 1] !== LF) return false;
    i += 2;

    let contentLength = -1;
    let transferEncoding = false;
    let chunkedLast = false;
    let connClose = false;
    let connKeepAlive = false;
    for (;;) {
      const lineStart = i;
      if (buf[i] === CR) {
        if (buf[i + 1] !== LF || i + 2 !== end) return false;
        break;
      }
      while (TOKEN[buf[i]!]) i++;
      const nameLen = i - lineStart;
      if (nameLen === 0 || buf[i] !== COLON) return false;
      i++;
      while (buf[i] === SP || buf[i] === HT) i++;
      const vStart = i;
      while (VALUE[buf[i]!]) i++;
      if (buf[i] !== CR || buf[i + 1] !== LF) return false;
      let vEnd = i;
      while (vEnd > vStart && (buf[vEnd - 1] === SP || buf[vEnd - 1] === HT)) vEnd--;
      i += 2;
      if (nameLen === 14 && eqLower(buf, lineStart, 14, N_CONTENT_LENGTH)) {
        if (vEnd === vStart || vEnd - vStart > 15) return false;
        let n = 0;
        for (let k = vStart; k < vEnd; k++) {
          const d = buf[k]! - 0x30;
          if (d < 0 || d > 9) return false;
          n = n * 10 + d;
        }
        if (contentLength >= 0 && n !== contentLength) return false;
        contentLength = n;
      } else if (nameLen === 17 && eqLower(buf, lineStart, 17, N_TRANSFER_ENCODING)) {
        transferEncoding = true;
        for (let k = vStart; k < vEnd; ) {
          k = nextListElement(buf, k, vEnd);
          if (tokEnd !== tokStart) chunkedLast = eqLower(buf, tokStart, tokEnd - tokStart, T_CHUNKED);
        }
      } else if (nameLen === 10 && eqLower(buf, lineStart, 10, N_CONNECTION)) {
        for (let k = vStart; k < vEnd; ) {
          k = nextListElement(buf, k, vEnd);
          const len = tokEnd - tokStart;
          if (eqLower(buf, tokStart, len, T_CLOSE)) connClose = true;
          else if (eqLower(buf, tokStart, len, T_KEEP_ALIVE)) connKeepAlive = true;
        }
      }
    }

    let keepAlive = minor === 0 ? connKeepAlive && !connClose : !connClose;
    if (transferEncoding) {
      // RFC 9112 6.3: Transfer-Encoding overrides Content-Length; a message with both may be an
      // attack on someone, so the connection is not reused after it.
      if (contentLength >= 0) keepAlive = false;
      this.body = chunkedLast ? BODY_CHUNKED : BODY_CLOSE;
    } else if (contentLength >= 0) {
      this.body = contentLength > 0 ? BODY_LENGTH : BODY_NONE;
      this.contentLength = contentLength;
    } else {
      this.body = BODY_CLOSE;
    }
    // A close-delimited body ends the connection too; the caller sees that from `body` (which
    // it overrides for HEAD, 204 and 304, whose connection may well go on).
    this.keepAlive = keepAlive;
    this.ok = true;
    return true;
  }
}

/*
 * Chunked framing (RFC 9112 7.1), scanned incrementally so that chunk data is never copied:
 *
 *   chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
 *   last-chunk   = 1*"0" [ chunk-ext ] CRLF
 *   chunked-body = *chunk last-chunk trailer-section CRLF
 */
const C_SIZE_START = 0;
const C_SIZE = 1;
const C_EXT = 2;
const C_SIZE_LF = 3;
const C_DATA = 4;
const C_DATA_CR = 5;
const C_DATA_LF = 6;
const C_TRAILER_START = 7;
const C_TRAILER = 8;
const C_TRAILER_LF = 9;
const C_FINAL_LF = 10;
const C_DONE = 11;
/** BWS after the size: only more of it, ";" or the CRLF may follow */
const C_SIZE_WS = 12;

/** Largest chunk size accepted (2^48 - 1 bytes); longer hex numbers are an error, not a wrap. */
const MAX_CHUNK_SIZE_DIGITS = 12;

export class ChunkedScanner {
  private state = C_SIZE_START;
  private remaining = 0;
  private digits = 0;
  /** bytes of chunk extensions and trailers seen; bounded so a sender cannot stream them forever */
  private metaBytes = 0;
  /** true once the whole chunked body has been seen */
  done = false;
  /** true once the framing was invalid; the scan stops there */
  failed = false;

  constructor(private readonly maxMetaBytes: number) {}

  reset(): void {
    this.state = C_SIZE_START;
    this.remaining = 0;
    this.digits = 0;
    this.metaBytes = 0;
    this.done = false;
    this.failed = false;
  }

  /**
   * Consumes buf[pos, end) up to the end of the body. Returns the index after the last byte
   * belonging to the body; check `done` and `failed` afterwards.
   */
  scan(buf: Buffer, pos: number, end: number): number {
    let i = pos;
    while (i < end) {
      switch (this.state) {
        case C_DATA: {
          const n = Math.min(this.remaining, end - i);
          i += n;
          this.remaining -= n;
          if (this.remaining === 0) this.state = C_DATA_CR;
          break;
        }
        case C_SIZE_START:
        case C_SIZE: {
          const c = buf[i]!;
          const h = HEX[c]!;
          if (h >= 0) {
            if (++this.digits > MAX_CHUNK_SIZE_DIGITS) return this.fail(i);
            this.remaining = this.remaining * 16 + h;
            this.state = C_SIZE;
          } else if (this.state === C_SIZE_START) {
            return this.fail(i);
          } else if (c === CR) {
            this.state = C_SIZE_LF;
          } else if (c === 0x3b) {
            this.state = C_EXT;
          } else if (c === SP || c === HT) {
            this.state = C_SIZE_WS;
          } else {
            return this.fail(i);
          }
          i++;
          break;
        }
        case C_SIZE_WS: {
          const c = buf[i]!;
          if (c === 0x3b) this.state = C_EXT;
          else if (c === CR) this.state = C_SIZE_LF;
          else if ((c !== SP && c !== HT) || ++this.metaBytes > this.maxMetaBytes) return this.fail(i);
          i++;
          break;
        }
        case C_EXT: {
          const c = buf[i]!;
          if (c === CR) this.state = C_SIZE_LF;
          else if (!VALUE[c] || ++this.metaBytes > this.maxMetaBytes) return this.fail(i);
          i++;
          break;
        }
        case C_SIZE_LF:
          if (buf[i] !== LF) return this.fail(i);
          i++;
          this.digits = 0;
          this.state = this.remaining === 0 ? C_TRAILER_START : C_DATA;
          break;
        case C_DATA_CR:
          if (buf[i] !== CR) return this.fail(i);
          i++;
          this.state = C_DATA_LF;
          break;
        case C_DATA_LF:
          if (buf[i] !== LF) return this.fail(i);
          i++;
          this.state = C_SIZE_START;
          break;
        case C_TRAILER_START:
          if (buf[i] === CR) {
            this.state = C_FINAL_LF;
            i++;
            break;
          }
          this.state = C_TRAILER;
          break;
        case C_TRAILER: {
          const c = buf[i]!;
          if (c === CR) this.state = C_TRAILER_LF;
          else if (!VALUE[c] || ++this.metaBytes > this.maxMetaBytes) return this.fail(i);
          i++;
          break;
        }
        case C_TRAILER_LF:
          if (buf[i] !== LF) return this.fail(i);
          i++;
          this.state = C_TRAILER_START;
          break;
        case C_FINAL_LF:
          if (buf[i] !== LF) return this.fail(i);
          this.state = C_DONE;
          this.done = true;
          return i + 1;
        default:
          return i;
      }
    }
    return i;
  }

  private fail(i: number): number {
    this.failed = true;
    return i;
  }
}
