import { it } from 'node:test';

/**
 * Cases of a suite that runs in order on one system: `step` is `it` that remembers a failure,
 * so the suite's after() can print the system's logs only when something failed.
 */
export function trackedSteps(): { step(name: string, fn: () => Promise<void>): void; readonly failed: boolean } {
  let failed = false;
  return {
    step(name, fn) {
      it(name, async () => {
        try {
          await fn();
        } catch (err) {
          failed = true;
          throw err;
        }
      });
    },
    get failed() {
      return failed;
    },
  };
}
