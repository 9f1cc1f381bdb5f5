/**
 * Errors with stable codes. A test or an operator matches on `code`; each layer that rethrows
 * adds what it was doing through `cause` instead of rewriting the message.
 */
export type ErrorCode =
  | 'PICO_ERR_CONFIG' // config file unreadable or invalid
  | 'PICO_ERR_UNKNOWN_APP' // no app by that name
  | 'PICO_ERR_HOLD_TIMEOUT' // a held client's deadline passed before its app was running
  | 'PICO_ERR_HOLD_QUEUE_FULL' // too many clients already held for the app
  | 'PICO_ERR_WAKE_FAILED' // start or restore of the app failed
  | 'PICO_ERR_CHECKPOINT_FAILED' // swap-out failed; the app keeps running
  | 'PICO_ERR_READY_TIMEOUT' // the app's ports did not accept connections in time
  | 'PICO_ERR_APP_EXITED' // the app's process exited
  | 'PICO_ERR_INVALID_STATE' // the request does not fit the app's lifecycle state
  | 'PICO_ERR_UNAUTHORIZED' // admin API without the right bearer token
  | 'PICO_ERR_IMAGE_CORRUPT' // a stored image failed its checksums
  | 'PICO_ERR_IMAGE_MISSING' // a stored image or one of its chunks is gone
  | 'PICO_ERR_STORE' // the object store failed (unwritable, unreachable)
  | 'PICO_ERR_HOST_UNSUPPORTED' // the host lacks what the configured runtime needs (criu, runc…)
  | 'PICO_ERR_SHUTTING_DOWN' // the system is stopping
  | 'PICO_ERR_WORKER_UNREACHABLE' // a worker did not answer (down, partitioned, or too slow)
  | 'PICO_ERR_BAD_REQUEST'; // a worker protocol message of the wrong shape, or too large

export class PicoError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = 'PicoError';
  }
}

export function isPicoError(err: unknown, code?: ErrorCode): err is PicoError {
  return err instanceof PicoError && (code === undefined || err.code === code);
}

/** A one-line description of any thrown value, with its code when it has one. */
export function describeError(err: unknown): string {
  if (err instanceof PicoError) return `${err.code}: ${err.message}`;
  if (err instanceof Error) return err.message;
  return String(err);
}
