import { setTimeout as delay } from 'node:timers/promises';

/** Polls `check` until it returns a truthy value; fails after `timeoutMs` with `what`. */
export async function until<T>(check: () => T | Promise<T>, what: string, timeoutMs = 10_000): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let wait = 2;
  for (;;) {
    const v = await check();
    if (v) return v as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await delay(wait);
    wait = Math.min(wait * 2, 50);
  }
}
