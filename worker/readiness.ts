import net from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';

/** Resolves true once `host:port` accepts a TCP connection, false if `signal` aborts first. */
export async function waitForPort(host: string, port: number, signal: AbortSignal): Promise<boolean> {
  let backoff = 5;
  while (!signal.aborted) {
    if (await tryConnect(host, port)) return true;
    try {
      await delay(backoff, undefined, { signal });
    } catch {
      return false;
    }
    backoff = Math.min(backoff * 2, 50);
  }
  return false;
}

function tryConnect(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => {
      s.destroy();
      resolve(false);
    });
  });
}
