import { pino, type Logger } from 'pino';

export type { Logger };

/**
 * The root logger. Child loggers carry `app`, `worker` and `conn` ids; secrets (the admin token,
 * authorization headers) are redacted wherever they appear.
 */
export function createLogger(options: { level?: string; destination?: NodeJS.WritableStream } = {}): Logger {
  const level = options.level ?? process.env.PICO_LOG_LEVEL ?? 'info';
  return pino(
    {
      level,
      base: { pid: process.pid },
      redact: {
        paths: ['token', '*.token', 'headers.authorization', '*.headers.authorization', 'admin.token'],
        censor: '[redacted]',
      },
    },
    options.destination ?? pino.destination({ dest: 2, sync: false }),
  );
}

/** A logger that drops everything, for unit tests. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
