import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { timingSafeEqual } from 'node:crypto';
import { describeError } from './errors.js';
import type { Logger } from './log.js';

/*
 * The JSON-over-HTTP servers of the system (the gateway's admin API, a worker's agent) share
 * their framing: errors are `{"error":{"code","message"}}`, a route that throws answers 500 (or
 * cuts a response already under way), and every route but the open ones needs the bearer token.
 */

export function sendJson(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

export function sendError(res: http.ServerResponse, status: number, code: string, message: string): void {
  sendJson(res, status, { error: { code, message } });
}

/**
 * An HTTP server whose requests go to `route`; a route that rejects is logged and answered 500.
 * Request heads must arrive within 10 s; requests themselves are not bounded here (a wake or a
 * checkpoint may take minutes: the caller bounds them).
 */
export function jsonServer(log: Logger, what: string, route: (req: http.IncomingMessage, res: http.ServerResponse) => Promise<void>): http.Server {
  const server = http.createServer((req, res) => {
    route(req, res).catch((err: unknown) => {
      log.error({ err: describeError(err) }, `${what} request failed`);
      if (!res.headersSent) sendError(res, 500, 'PICO_ERR_INTERNAL', describeError(err));
      else res.destroy();
    });
  });
  server.headersTimeout = 10_000;
  server.requestTimeout = 0;
  return server;
}

/** Listens on `at`; rejects with the listen error (address in use…). */
export async function listenOn(server: http.Server, at: { host: string; port: number }): Promise<AddressInfo> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(at.port, at.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return server.address() as AddressInfo;
}

/** A constant-time check of `Authorization: Bearer TOKEN`. */
export function bearerCheck(token: string): (req: http.IncomingMessage) => boolean {
  const want = Buffer.from(`Bearer ${token}`);
  return (req) => {
    const given = Buffer.from(req.headers.authorization ?? '');
    return given.length === want.length && timingSafeEqual(given, want);
  };
}
