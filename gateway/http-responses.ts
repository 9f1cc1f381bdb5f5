/*
 * Responses the gateway writes itself. Each is a complete HTTP/1.1 message that ends the
 * connection (`Connection: close`): the gateway only answers where no response of the app can
 * follow on the same connection.
 */

const REASONS: Record<number, string> = {
  400: 'Bad Request',
  404: 'Not Found',
  408: 'Request Timeout',
  431: 'Request Header Fields Too Large',
  501: 'Not Implemented',
  502: 'Bad Gateway',
  503: 'Service Unavailable',
  504: 'Gateway Timeout',
  505: 'HTTP Version Not Supported',
};

const BODIES: Record<number, string> = {
  400: 'bad request\n',
  404: 'no app answers to this host\n',
  408: 'request head not received in time\n',
  431: 'request head too large\n',
  501: 'method not supported\n',
  502: 'the app could not be reached\n',
  503: 'the app is not available right now\n',
  504: 'the app did not start in time\n',
  505: 'only HTTP/1.x is served\n',
};

/**
 * The bytes of a gateway response. `retryAfter` (seconds) is set on 503. A response to a HEAD
 * request carries no body but the Content-Length the body would have had.
 */
export function gatewayResponse(status: number, opts: { retryAfter?: number; head?: boolean } = {}): Buffer {
  const body = BODIES[status] ?? `${status}\n`;
  let head =
    `HTTP/1.1 ${status} ${REASONS[status] ?? 'Error'}\r\n` +
    `Date: ${new Date().toUTCString()}\r\n` +
    'Content-Type: text/plain; charset=utf-8\r\n' +
    `Content-Length: ${Buffer.byteLength(body)}\r\n` +
    'Connection: close\r\n';
  if (opts.retryAfter !== undefined) head += `Retry-After: ${opts.retryAfter}\r\n`;
  head += '\r\n';
  return Buffer.from(opts.head ? head : head + body, 'latin1');
}
