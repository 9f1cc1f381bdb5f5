import net, { type Socket } from 'node:net';
import { isPicoError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import type { Endpoint } from '../shared/protocol.js';
import type { Hold } from './hold.js';
import { BODY_CHUNKED, BODY_LENGTH, BODY_NONE, ChunkedScanner, HEAD_END, RequestHead, ResponseHead } from './http-head.js';
import { gatewayResponse } from './http-responses.js';
import type { AppLifecycle } from './lifecycle.js';
import type { AppRoute, RouteTable } from './routes.js';

/** What every connection of one HttpListener shares. */
export interface HttpContext {
  readonly routes: RouteTable;
  readonly hold: Hold;
  readonly lifecycle: AppLifecycle;
  readonly log: Logger;
  /** largest request head, in bytes; larger gets 431 */
  readonly maxHeaderSize: number;
  /** in ms: how long a client may take to send a complete head once the connection is idle */
  readonly headerTimeoutMs: number;
  /** in ms: how long connecting to an endpoint of a running app may take before 502 */
  readonly connectTimeoutMs: number;
  /** coarse clock in ms, advanced by the listener's sweep (no clock read per request) */
  now: number;
  readonly connections: Set<HttpConnection>;
}

/** Largest response head accepted from an app, in bytes. */
const MAX_RESPONSE_HEAD = 64 * 1024;
/** Bytes of one read from an upstream, into the connection's own reusable buffer. */
const UPSTREAM_READ_BUFFER = 16 * 1024;
/** How long a closed-by-us connection keeps draining the client's bytes, in ms. */
const LINGER_MS = 2000;
/** Most requests of one connection passed on and not yet answered; more wait in `pending`. */
const MAX_PIPELINED = 64;
/** Seconds a client is told to wait after a 503. */
const RETRY_AFTER_S = 1;

// Request side: what the next client bytes are.
const REQ_HEAD = 0;
const REQ_BODY_LENGTH = 1;
const REQ_BODY_CHUNKED = 2;
/** an upgrade request was sent; its answer decides whether HTTP or a tunnel follows */
const REQ_AWAIT_UPGRADE = 3;
const REQ_TUNNEL = 4;
/** no further requests are read (after Connection: close, or once we close) */
const REQ_DONE = 5;

// Response side: what the next upstream bytes are.
const RES_HEAD = 0;
const RES_BODY_LENGTH = 1;
const RES_BODY_CHUNKED = 2;
const RES_BODY_CLOSE = 3;
const RES_TUNNEL = 4;

// What a parked connection waits for.
/** every request in flight answered (a host switch, a gateway response, an upgrade's answer) */
const UNTIL_IDLE = 0;
/** fewer than MAX_PIPELINED requests in flight */
const UNTIL_ROOM = 1;
/** the hold and the upstream connect, which unpark explicitly */
const UNTIL_CONNECTED = 2;

// Flags of a request whose response has not completed (the `inflight` queue).
const F_HEAD = 1;
const F_CLOSE = 2;
const F_UPGRADE = 4;

const CR = 0x0d;
const LF = 0x0a;
const LFLF = Buffer.from('\n\n', 'latin1');

// One scan result object each for the whole process: a scan's result is used before the next.
const reqHead = new RequestHead();
const resHead = new ResponseHead();

function noop(): void {}

/*
 * One client connection, forwarded to at most one upstream connection at a time (1:1, opened
 * for the app of the first request and kept while requests go to that app).
 *
 *   client ──bytes──► request side: scan head, route by Host, rewrite head, pass body bytes ──► upstream
 *   client ◄──bytes── response side: scan head, find where the response ends ◄───────────────── upstream
 *
 * Both directions pass the socket's own buffers on; only request heads are copied (rewritten).
 *
 * Invariants:
 * - `inflight` lists, oldest first, the requests written to the upstream whose response has
 *   not completed. Responses come back in the order of requests, so inflight[0] is always the
 *   request the response being read answers.
 * - Gateway responses (404, 503, …) and a switch to another app's upstream only happen when
 *   inflight is empty: then every earlier response has been passed on completely, so a
 *   response never lands in the middle of, or ahead of, another.
 * - While `parked`, the client's bytes are kept in `pending` and the client socket is paused
 *   (`parkedUntil` says what ends it); `pending` always starts at the first byte of a request
 *   head (or of tunnel data).
 * - A request is written to an upstream at most once, and never retried.
 */
export class HttpConnection {
  private readonly ctx: HttpContext;
  private readonly client: Socket;
  private readonly clientIp: string;
  private readonly id: number;
  private logger: Logger | null = null;

  /** the app this connection is attached to, for connection accounting */
  private route: AppRoute | null = null;
  private upstream: Socket | null = null;
  private upstreamConnected = false;
  private connectTimer: NodeJS.Timeout | null = null;
  private holding: AbortController | null = null;

  private reqState = REQ_HEAD;
  /** flags of the request whose head was passed on last */
  private reqFlags = 0;
  private reqRemaining = 0;
  private readonly reqChunks: ChunkedScanner;
  /** an incomplete request head, kept until the rest arrives */
  private headPartial: Buffer | null = null;
  private headScanFrom = 0;
  private parked = false;
  private parkedUntil = UNTIL_IDLE;
  /** the request waiting for the hold is a HEAD (its 503/504 then carries no body) */
  private heldIsHead = false;
  private pending: Buffer | null = null;
  private readonly inflight: number[] = [];

  private resState = RES_HEAD;
  private resRemaining = 0;
  private resKeepAlive = true;
  private readonly resChunks: ChunkedScanner;
  private resPartial: Buffer | null = null;
  private resScanFrom = 0;
  /** where the upstream socket reads into (see nextReadBuffer) */
  private readBuf: Buffer | null = null;

  /** client socket paused because the upstream's write buffer is full */
  private upstreamFull = false;
  private clientReading = true;
  private clientEnded = false;
  /** the client's bytes are only drained and dropped from here on */
  private closing = false;
  private closed = false;
  /** ms (ctx.now) since when the client owes us a request head, or -1 */
  waitSince: number;
  private closingSince = 0;
  private closingUnsent = 0;

  // The X-Forwarded-* lines for the last Host seen (usually the only one of the connection).
  private cachedHost: Buffer | null = null;
  private cachedRoute: AppRoute | undefined;
  private cachedSuffix: Buffer | null = null;

  constructor(client: Socket, ctx: HttpContext, id: number) {
    this.ctx = ctx;
    this.client = client;
    const ip = client.remoteAddress ?? '';
    this.clientIp = ip.startsWith('::ffff:') ? ip.slice(7) : ip;
    this.id = id;
    this.reqChunks = new ChunkedScanner(ctx.maxHeaderSize);
    this.resChunks = new ChunkedScanner(MAX_RESPONSE_HEAD);
    this.waitSince = ctx.now;
    client.on('data', this.onClientData);
    client.on('end', this.onClientEnd);
    client.on('drain', this.onClientDrain);
    client.on('error', this.onClientError);
    client.on('close', this.onClientClose);
  }

  /** The connection's child logger, made on first use (most connections never log). */
  private get log(): Logger {
    return (this.logger ??= this.ctx.log.child({ conn: this.id }));
  }

  /** Called by the listener's sweep: enforces the head timeout and ends lingering closes. */
  tick(now: number): void {
    if (this.closing) {
      // Linger once everything is handed to the kernel; before that, allow a slow reader time
      // as long as it makes progress.
      const unsent = this.client.writableLength;
      if (unsent !== this.closingUnsent) {
        this.closingUnsent = unsent;
        this.closingSince = now;
      } else if (now - this.closingSince > (unsent === 0 ? LINGER_MS : this.ctx.headerTimeoutMs)) {
        this.destroy();
      }
    } else if (this.waitSince >= 0 && now - this.waitSince > this.ctx.headerTimeoutMs) {
      // Idle keep-alive connections close silently; a started head gets its 408.
      if (this.headPartial) this.respond(408);
      else this.closeClient();
    }
  }

  /**
   * Ends the connection at once (the listener stops, or the client is gone). `letUpstreamFinish`:
   * a tunnel's upstream that was already ended is left to flush and close by itself.
   */
  destroy(letUpstreamFinish = false): void {
    if (this.closed) return;
    this.closed = true;
    this.closing = true;
    this.reqState = REQ_DONE;
    this.pending = this.headPartial = this.resPartial = null;
    this.abortHold();
    this.dropUpstream(letUpstreamFinish);
    this.client.destroy();
    this.attach(null);
    this.ctx.connections.delete(this);
  }

  // ─── request side ─────────────────────────────────────────────────────────

  private readonly onClientData = (chunk: Buffer): void => {
    if (this.closing) return; // draining before close
    if (this.parked) {
      this.pending = this.pending ? Buffer.concat([this.pending, chunk]) : chunk;
      return;
    }
    if (this.headPartial) {
      chunk = Buffer.concat([this.headPartial, chunk]);
      this.headPartial = null;
    }
    this.feedRequests(chunk, 0);
  };

  private feedRequests(buf: Buffer, pos: number): void {
    const len = buf.length;
    while (pos < len) {
      switch (this.reqState) {
        case REQ_HEAD:
          pos = this.onRequestHead(buf, pos);
          if (pos < 0) return;
          break;
        case REQ_BODY_LENGTH: {
          const n = Math.min(this.reqRemaining, len - pos);
          this.toUpstream(pos === 0 && n === len ? buf : buf.subarray(pos, pos + n));
          pos += n;
          this.reqRemaining -= n;
          if (this.reqRemaining === 0) this.requestDone();
          break;
        }
        case REQ_BODY_CHUNKED: {
          const end = this.reqChunks.scan(buf, pos, len);
          if (end > pos) this.toUpstream(pos === 0 && end === len ? buf : buf.subarray(pos, end));
          if (this.reqChunks.failed) return this.requestBodyInvalid();
          pos = end;
          if (this.reqChunks.done) this.requestDone();
          break;
        }
        case REQ_AWAIT_UPGRADE:
          this.park(buf, pos, UNTIL_IDLE);
          return;
        case REQ_TUNNEL:
          this.toUpstream(pos === 0 ? buf : buf.subarray(pos));
          return;
        default:
          return; // REQ_DONE: dropped
      }
    }
  }

  /** Handles the request head starting at `pos`. Returns where its body starts, or -1 to stop. */
  private onRequestHead(buf: Buffer, pos: number): number {
    const len = buf.length;
    // RFC 9112 2.2: ignore empty lines before a request-line (some clients add one after a body).
    while (buf[pos] === CR && pos + 1 < len && buf[pos + 1] === LF) pos += 2;
    const at = buf.indexOf(HEAD_END, pos + this.headScanFrom);
    this.headScanFrom = 0;
    if (at < 0) {
      const have = len - pos;
      if (have > this.ctx.maxHeaderSize) return this.reject(431, buf, pos, 'request head too large');
      if (buf.indexOf(LFLF, pos) >= 0) return this.reject(400, buf, pos, 'bare LF line endings');
      if (have > 0) {
        this.headPartial = pos === 0 ? buf : buf.subarray(pos);
        this.headScanFrom = Math.max(0, have - 3);
      }
      return len;
    }
    const headEnd = at + 4;
    if (headEnd - pos > this.ctx.maxHeaderSize) return this.reject(431, buf, pos, 'request head too large');
    const head = reqHead;
    if (head.scan(buf, pos, headEnd) !== 0) return this.reject(head.error, buf, pos, head.reason);

    // Route by Host; the cache makes a connection's repeated Host one byte compare.
    const hostLen = head.hostEnd - head.hostStart;
    let route: AppRoute | undefined;
    const cached = this.cachedHost;
    if (cached !== null && cached.length === hostLen && buf.compare(cached, 0, hostLen, head.hostStart, head.hostEnd) === 0) {
      route = this.cachedRoute;
    } else {
      const host = buf.toString('latin1', head.hostStart, head.hostEnd);
      route = this.ctx.routes.byHost(host);
      this.cachedHost = Buffer.from(host, 'latin1');
      this.cachedRoute = route;
      this.cachedSuffix = Buffer.from(
        `X-Forwarded-For: ${this.clientIp}\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: ${host}\r\n\r\n`,
        'latin1',
      );
    }
    if (route === undefined || route.httpPort === undefined) return this.reject(404, buf, pos, 'unknown host', head.isHead);

    if (route !== this.route || !this.upstreamConnected) {
      // A new upstream is needed: wait until the current one has answered everything.
      if (this.inflight.length > 0) {
        this.park(buf, pos, UNTIL_IDLE);
      } else {
        this.park(buf, pos, UNTIL_CONNECTED);
        this.heldIsHead = head.isHead;
        this.connectTo(route);
      }
      return -1;
    }
    if (this.inflight.length >= MAX_PIPELINED) {
      this.park(buf, pos, UNTIL_ROOM);
      return -1;
    }

    this.forwardHead(buf, pos, headEnd, head);
    const flags = (head.isHead ? F_HEAD : 0) | (head.keepAlive ? 0 : F_CLOSE) | (head.upgrade ? F_UPGRADE : 0);
    this.reqFlags = flags;
    this.inflight.push(flags);
    this.waitSince = -1;
    if (head.body === BODY_LENGTH) {
      this.reqState = REQ_BODY_LENGTH;
      this.reqRemaining = head.contentLength;
    } else if (head.body === BODY_CHUNKED) {
      this.reqState = REQ_BODY_CHUNKED;
      this.reqChunks.reset();
    } else {
      this.requestDone();
    }
    return headEnd;
  }

  /** The current request has been passed on completely. */
  private requestDone(): void {
    const flags = this.reqFlags;
    if (flags & F_UPGRADE) this.reqState = REQ_AWAIT_UPGRADE;
    else if (flags & F_CLOSE) this.reqState = REQ_DONE;
    else {
      this.reqState = REQ_HEAD;
      if (this.inflight.length === 0) this.waitSince = this.ctx.now;
    }
  }

  /**
   * A request the gateway answers itself. Earlier responses go first: with requests in flight
   * the head is parked and scanned again once they are done (it fails the same way then).
   */
  private reject(status: number, buf: Buffer, pos: number, reason: string, isHead = false): number {
    if (this.inflight.length > 0) {
      this.park(buf, pos, UNTIL_IDLE);
      return -1;
    }
    this.log.debug({ status, reason }, 'request rejected');
    this.respond(status, isHead);
    return -1;
  }

  /** Chunked framing of a request body broke after its head was passed on. */
  private requestBodyInvalid(): void {
    this.log.debug('invalid chunked request body');
    // Only if nothing of this request's response has been passed on can the client get a 400.
    if (this.inflight.length === 1 && this.resState === RES_HEAD && this.resPartial === null) {
      this.inflight.length = 0;
      this.dropUpstream();
      this.respond(400);
    } else {
      this.destroy();
    }
  }

  /**
   * Writes the head with X-Forwarded-For appended to (or added), X-Forwarded-Proto and
   * X-Forwarded-Host set; nothing else changes.
   */
  private forwardHead(buf: Buffer, pos: number, headEnd: number, head: RequestHead): void {
    const suffix = this.cachedSuffix!;
    const keep = headEnd - 2 - pos; // up to and including the last header line's CRLF
    if (head.xffValueEnd < 0 && head.dropLines === null) {
      const out = Buffer.allocUnsafe(keep + suffix.length);
      buf.copy(out, 0, pos, headEnd - 2);
      suffix.copy(out, keep);
      this.toUpstream(out);
      return;
    }
    // Rare: the client sent X-Forwarded-* itself.
    const cuts: Array<[number, number, Buffer | null]> = [];
    if (head.xffValueEnd >= 0) {
      cuts.push([head.xffValueEnd, head.xffValueEnd, Buffer.from(head.xffEmpty ? this.clientIp : `, ${this.clientIp}`, 'latin1')]);
    }
    const drops = head.dropLines ?? [];
    for (let k = 0; k < drops.length; k += 2) cuts.push([drops[k]!, drops[k + 1]!, null]);
    cuts.sort((a, b) => a[0] - b[0]);
    const parts: Buffer[] = [];
    let at = pos;
    for (const [from, to, insert] of cuts) {
      parts.push(buf.subarray(at, from));
      if (insert) parts.push(insert);
      at = to;
    }
    parts.push(buf.subarray(at, headEnd - 2));
    // The cached suffix starts with the X-Forwarded-For line; skip it when the client had one.
    parts.push(head.xffValueEnd >= 0 ? suffix.subarray(suffix.indexOf(LF) + 1) : suffix);
    this.toUpstream(Buffer.concat(parts));
  }

  private park(buf: Buffer, pos: number, until: number): void {
    const rest = pos === 0 ? buf : buf.subarray(pos);
    this.pending = this.pending ? Buffer.concat([rest, this.pending]) : rest;
    this.parked = true;
    this.parkedUntil = until;
    this.waitSince = -1;
    this.updateClientReading();
  }

  private unpark(): void {
    if (!this.parked || this.closing) return;
    this.parked = false;
    const p = this.pending;
    this.pending = null;
    this.updateClientReading();
    if (p !== null) this.feedRequests(p, 0);
    if (this.clientEnded && !this.parked && this.inflight.length === 0 && this.reqState !== REQ_TUNNEL) this.closeClient();
  }

  private toUpstream(b: Buffer): void {
    const up = this.upstream;
    if (up === null) return; // gone; the connection is closing
    if (!up.write(b)) {
      this.upstreamFull = true;
      this.updateClientReading();
    }
  }

  private updateClientReading(): void {
    // While closing, keep reading: the bytes are dropped (see closeClient).
    const want = this.closing || (!this.parked && !this.upstreamFull);
    if (want === this.clientReading) return;
    this.clientReading = want;
    if (want) this.client.resume();
    else this.client.pause();
  }

  private readonly onClientEnd = (): void => {
    if (this.closing) return this.destroy();
    if (this.reqState === REQ_TUNNEL) {
      this.upstream?.end();
      return;
    }
    this.clientEnded = true;
    // A client that goes away while held aborts its hold; one that stops mid-request aborts it.
    if (this.holding !== null || this.reqState === REQ_BODY_LENGTH || this.reqState === REQ_BODY_CHUNKED) return this.destroy();
    // Requests already received are still answered, then the connection closes.
    if (this.inflight.length === 0 && !this.parked) this.closeClient();
  };

  private readonly onClientDrain = (): void => {
    this.upstream?.resume();
  };

  private readonly onClientError = (err: Error): void => {
    this.log.debug({ err: err.message }, 'client connection error');
  };

  private readonly onClientClose = (hadError: boolean): void => {
    // A tunnel that closed cleanly has already passed its end to the upstream.
    this.destroy(this.reqState === REQ_TUNNEL && !hadError);
  };

  // ─── upstream ─────────────────────────────────────────────────────────────

  /** Attaches the connection to `route` and starts the hold for its endpoint. inflight is empty. */
  private connectTo(route: AppRoute): void {
    this.dropUpstream();
    this.attach(route);
    const abort = new AbortController();
    this.holding = abort;
    this.ctx.hold.waitForReady(route, route.httpPort!, 'http', abort.signal).then(
      (endpoint) => {
        if (this.holding !== abort) return;
        this.holding = null;
        this.openUpstream(endpoint);
      },
      (err: unknown) => {
        if (this.holding !== abort) return; // aborted by us
        this.holding = null;
        this.log.debug({ app: route.name, err: (err as Error).message }, 'hold failed');
        if (isPicoError(err, 'PICO_ERR_HOLD_TIMEOUT')) this.respond(504, this.heldIsHead);
        else this.respond(503, this.heldIsHead, RETRY_AFTER_S); // queue full or wake failed
      },
    );
  }

  private abortHold(): void {
    const h = this.holding;
    if (h === null) return;
    this.holding = null;
    h.abort();
  }

  private openUpstream(endpoint: Endpoint): void {
    const up = net.connect({
      host: endpoint.host,
      port: endpoint.port,
      noDelay: true,
      allowHalfOpen: true,
      onread: { buffer: this.nextReadBuffer, callback: this.onUpstreamRead },
    });
    this.upstream = up;
    this.upstreamConnected = false;
    up.on('connect', this.onUpstreamConnect);
    up.on('end', this.onUpstreamEnd);
    up.on('drain', this.onUpstreamDrain);
    up.on('error', this.onUpstreamError);
    up.on('close', this.onUpstreamClose);
    this.connectTimer = setTimeout(() => {
      this.connectTimer = null;
      if (this.upstream === up && !this.upstreamConnected) up.destroy(new Error('connect timed out'));
    }, this.ctx.connectTimeoutMs);
  }

  /** Forgets the upstream socket and closes it (unless `letFinish` and ended); its events are ignored. */
  private dropUpstream(letFinish = false): void {
    if (this.connectTimer) clearTimeout(this.connectTimer);
    this.connectTimer = null;
    const up = this.upstream;
    this.upstream = null;
    this.upstreamConnected = false;
    this.upstreamFull = false;
    this.resState = RES_HEAD;
    this.resPartial = null;
    this.resScanFrom = 0;
    if (up === null) return;
    up.removeListener('connect', this.onUpstreamConnect);
    up.removeListener('end', this.onUpstreamEnd);
    up.removeListener('drain', this.onUpstreamDrain);
    up.removeListener('error', this.onUpstreamError);
    up.removeListener('close', this.onUpstreamClose);
    up.on('error', noop);
    if (!(letFinish && up.writableEnded)) up.destroy();
  }

  private readonly onUpstreamConnect = (): void => {
    if (this.connectTimer) clearTimeout(this.connectTimer);
    this.connectTimer = null;
    this.upstreamConnected = true;
    this.unpark();
  };

  private readonly onUpstreamDrain = (): void => {
    this.upstreamFull = false;
    this.updateClientReading();
  };

  private readonly onUpstreamError = (err: Error): void => {
    if (!this.upstreamConnected) {
      // Nothing was sent yet (requests wait for 'connect'), so the client gets a clean 502.
      this.log.debug({ app: this.route?.name, err: err.message }, 'cannot connect to the app');
      this.dropUpstream();
      this.respond(502, this.heldIsHead);
      return;
    }
    this.log.debug({ app: this.route?.name, err: err.message }, 'upstream connection error');
    // 'close' follows and decides.
  };

  private readonly onUpstreamEnd = (): void => this.upstreamGone(true);
  private readonly onUpstreamClose = (): void => this.upstreamGone(false);

  private upstreamGone(graceful: boolean): void {
    if (this.resState === RES_TUNNEL) {
      if (graceful) this.client.end(); // half-close travels on; the other direction stays open
      else if (this.client.readableEnded) this.dropUpstream(true); // both directions done; the client finishes by itself
      else this.destroy();
      return;
    }
    if (this.resState === RES_BODY_CLOSE) {
      // The close ends that response; the connection cannot carry another.
      if (graceful) {
        this.inflight.shift();
        this.closeClient();
      } else {
        this.destroy();
      }
      return;
    }
    if (this.inflight.length === 0 && this.resState === RES_HEAD && this.resPartial === null && this.reqState === REQ_HEAD) {
      // The app closed an idle connection (its keep-alive timeout, or a swap-out). The client
      // keeps its connection; its next request opens a new upstream, through the hold.
      this.dropUpstream();
      if (this.clientEnded && !this.parked) this.closeClient();
      return;
    }
    // A response is cut short or will never come: the client's connection cannot continue.
    this.log.debug({ app: this.route?.name, inflight: this.inflight.length }, 'app closed the connection with requests outstanding');
    this.closeClient();
  }

  // ─── response side ────────────────────────────────────────────────────────

  /*
   * Upstream reads land in a buffer of this connection that is reused for the next read, which
   * saves an allocation and the stream machinery per response. Safe because whatever keeps
   * bytes of it past the read callback either copies them (resPartial) or is a client write
   * that did not complete at once, and then the next read gets a fresh buffer.
   */
  private readonly nextReadBuffer = (): Buffer => {
    if (this.readBuf === null || this.client.writableLength > 0) this.readBuf = Buffer.allocUnsafe(UPSTREAM_READ_BUFFER);
    return this.readBuf;
  };

  private readonly onUpstreamRead = (n: number, buf: Uint8Array): boolean => {
    if (this.upstream === null) return false; // dropped; its last read is ignored
    let chunk = (buf as Buffer).subarray(0, n);
    if (this.resPartial !== null) {
      chunk = Buffer.concat([this.resPartial, chunk]);
      this.resPartial = null;
    }
    this.feedResponses(chunk);
    return true;
  };

  private feedResponses(buf: Buffer): void {
    const len = buf.length;
    let pos = 0;
    let closeAfter = false;
    let upgraded = false;
    while (pos < len && !closeAfter) {
      switch (this.resState) {
        case RES_HEAD: {
          if (this.inflight.length === 0) {
            this.toClientRange(buf, 0, pos);
            this.log.debug({ app: this.route?.name }, 'app sent bytes no request asked for');
            this.closeClient();
            return;
          }
          const at = buf.indexOf(HEAD_END, pos + this.resScanFrom);
          this.resScanFrom = 0;
          if (at < 0) {
            if (len - pos > MAX_RESPONSE_HEAD) return this.badResponse(buf, pos, 'response head too large');
            this.toClientRange(buf, 0, pos);
            this.resPartial = Buffer.from(buf.subarray(pos)); // a copy: the read buffer is reused
            this.resScanFrom = Math.max(0, len - pos - 3);
            return;
          }
          const headEnd = at + 4;
          if (!resHead.scan(buf, pos, headEnd)) return this.badResponse(buf, pos, 'invalid response head');
          const status = resHead.status;
          const flags = this.inflight[0]!;
          if (status < 200) {
            if (status === 101) {
              if (!(flags & F_UPGRADE)) return this.badResponse(buf, pos, '101 to a request without Upgrade');
              this.inflight.shift();
              this.resState = RES_TUNNEL;
              upgraded = true;
            }
            pos = headEnd; // other 1xx: interim, the final response to the same request follows
            break;
          }
          pos = headEnd;
          this.resKeepAlive = resHead.keepAlive;
          const body = flags & F_HEAD || status === 204 || status === 304 ? BODY_NONE : resHead.body;
          if (body === BODY_NONE) closeAfter = this.responseDone();
          else if (body === BODY_LENGTH) {
            this.resState = RES_BODY_LENGTH;
            this.resRemaining = resHead.contentLength;
          } else if (body === BODY_CHUNKED) {
            this.resState = RES_BODY_CHUNKED;
            this.resChunks.reset();
          } else {
            this.resState = RES_BODY_CLOSE;
          }
          break;
        }
        case RES_BODY_LENGTH: {
          const n = Math.min(this.resRemaining, len - pos);
          pos += n;
          this.resRemaining -= n;
          if (this.resRemaining === 0) closeAfter = this.responseDone();
          break;
        }
        case RES_BODY_CHUNKED: {
          pos = this.resChunks.scan(buf, pos, len);
          if (this.resChunks.failed) {
            // Mid-response: the client cannot be told cleanly; cut the connection.
            this.toClientRange(buf, 0, pos);
            this.log.debug({ app: this.route?.name }, 'invalid chunked response body');
            this.destroy();
            return;
          }
          if (this.resChunks.done) closeAfter = this.responseDone();
          break;
        }
        default: // RES_BODY_CLOSE, RES_TUNNEL: everything until the upstream closes
          pos = len;
      }
    }
    this.toClientRange(buf, 0, pos);
    if (closeAfter) return this.closeClient();
    if (upgraded) {
      this.reqState = REQ_TUNNEL;
      this.waitSince = -1;
      this.unpark();
    } else if (this.parked) {
      const n = this.inflight.length;
      if (this.parkedUntil === UNTIL_IDLE ? n === 0 : this.parkedUntil === UNTIL_ROOM && n < MAX_PIPELINED) this.unpark();
    } else if (this.inflight.length === 0 && this.reqState === REQ_HEAD) {
      // Every request sent has its answer: the idle clock starts.
      this.waitSince = this.ctx.now;
      if (this.clientEnded) this.closeClient();
    }
  }

  /** The response to inflight[0] is complete. Returns true when the connection must close. */
  private responseDone(): boolean {
    const flags = this.inflight.shift()!;
    this.resState = RES_HEAD;
    if (!this.resKeepAlive || flags & F_CLOSE) return true;
    if (flags & F_UPGRADE) this.reqState = REQ_HEAD; // upgrade declined: HTTP goes on
    return false;
  }

  /** The app's response head is unusable; nothing of it has been passed on. */
  private badResponse(buf: Buffer, pos: number, reason: string): void {
    this.toClientRange(buf, 0, pos);
    this.log.warn({ app: this.route?.name, reason }, 'bad response from the app');
    this.inflight.length = 0;
    this.dropUpstream();
    this.respond(502);
  }

  private toClientRange(buf: Buffer, from: number, to: number): void {
    if (to <= from) return;
    if (!this.client.write(from === 0 && to === buf.length ? buf : buf.subarray(from, to))) this.upstream?.pause();
  }

  // ─── ending ───────────────────────────────────────────────────────────────

  /** Writes a gateway response and closes. Only called with no response in progress. */
  private respond(status: number, isHead = false, retryAfter?: number): void {
    if (this.closing) return;
    this.client.write(gatewayResponse(status, { head: isHead, retryAfter }));
    this.closeClient();
  }

  /**
   * Ends the client connection after what was written. The client's further bytes are read and
   * dropped for a while: closing with unread bytes would make the kernel answer with a reset,
   * which can destroy the last response before the client has read it.
   */
  private closeClient(): void {
    if (this.closing) return;
    this.closing = true;
    this.closingSince = this.ctx.now;
    this.reqState = REQ_DONE;
    this.pending = this.headPartial = null;
    this.parked = false;
    this.abortHold();
    this.dropUpstream();
    this.client.end();
    this.updateClientReading();
    if (this.clientEnded) this.client.destroySoon();
  }

  /**
   * Connection accounting: the app whose upstream this connection uses (or waits for). The
   * lifecycle (placement) keeps the count and the picocenter_open_connections gauge.
   */
  private attach(route: AppRoute | null): void {
    if (route === this.route) return;
    const { lifecycle } = this.ctx;
    if (this.route !== null) lifecycle.connectionClosed(this.route.name);
    this.route = route;
    if (route !== null) lifecycle.connectionOpened(route.name);
  }
}
