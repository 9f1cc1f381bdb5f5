import { readFileSync, writeFileSync } from 'node:fs';
import type { Logger } from '../../shared/log.js';

/*
 * The host's RCU grace periods, as the wake path meets them. Several steps of every restore wait
 * for one (synchronize_rcu: 5–20 ms each on these VMs, whatever the work): CRIU's pivot into the
 * restored mount namespace and the unmount of the old root (9–14 ms between "Move the root" and
 * the post-setup-namespaces scripts), its nftables unlock (~12 ms after "Unlock network"), and
 * its release of the restored threads from seccomp and ptrace (8–18 ms before "was trapped").
 * With the kernel's `rcu_expedited` set, each such wait is an expedited grace period instead
 * (IPIs to every CPU, microseconds): measured on the S3 benchmark, the gaps left CRIU's
 * restore.log.
 *
 * The cost is the host's: an expedited grace period interrupts every CPU, which a host running
 * latency-critical work beside the worker may not want (worker.rcuExpedited: false). The
 * setting is host-wide; it stays after the worker exits, and a reboot clears it.
 * /sys/kernel/rcu_normal, when set, overrides it (every grace period normal): then this changes
 * nothing, and says so.
 */

export const RCU_EXPEDITED = '/sys/kernel/rcu_expedited';
export const RCU_NORMAL = '/sys/kernel/rcu_normal';

/** What expediteRcu() found or did. */
export type ExpediteRcu =
  | { state: 'on' | 'set' }
  | { state: 'none' }
  | { state: 'overridden' }
  | { state: 'failed'; reason: string };

/** Sets the kernel's rcu_expedited unless it is set (see above). Never throws. */
export function expediteRcu(files: { expedited: string; normal: string } = { expedited: RCU_EXPEDITED, normal: RCU_NORMAL }): ExpediteRcu {
  let now: string;
  try {
    now = readFileSync(files.expedited, 'utf8').trim();
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ENOENT' ? { state: 'none' } : { state: 'failed', reason: (err as Error).message };
  }
  const normal = readNumber(files.normal);
  if (normal !== undefined && normal !== 0) return { state: 'overridden' };
  if (now !== '0') return { state: 'on' };
  try {
    setRcuExpedited(true, files.expedited);
  } catch (err) {
    return { state: 'failed', reason: (err as Error).message };
  }
  return { state: 'set' };
}

/** Writes the kernel's rcu_expedited (root only); throws as the write does. */
export function setRcuExpedited(on: boolean, file = RCU_EXPEDITED): void {
  writeFileSync(file, on ? '1\n' : '0\n');
}

/** Whether the kernel's rcu_expedited is set now: 'on', 'off' or 'n/a'. */
export function rcuExpeditedNote(file = RCU_EXPEDITED): 'on' | 'off' | 'n/a' {
  const n = readNumber(file);
  return n === undefined ? 'n/a' : n !== 0 ? 'on' : 'off';
}

function readNumber(file: string): number | undefined {
  try {
    const n = Number(readFileSync(file, 'utf8').trim());
    return Number.isFinite(n) ? n : undefined;
  } catch {
    return undefined;
  }
}

/** What a worker's runtime does about RCU at start: expediteRcu() unless told not to (a failure is logged, never fatal). */
export function tuneRcu(o: { rcuExpedited?: boolean; log: Logger }): ExpediteRcu['state'] | 'off' {
  if (!(o.rcuExpedited ?? true)) return 'off';
  const r = expediteRcu();
  if (r.state === 'failed') o.log.warn({ reason: r.reason }, `cannot set ${RCU_EXPEDITED}: each restore waits for RCU grace periods (~30-40 ms in all)`);
  else if (r.state === 'overridden') o.log.warn(`${RCU_NORMAL} is set: RCU grace periods stay normal, and each restore waits for them (~30-40 ms in all)`);
  else if (r.state === 'set') o.log.info(`set ${RCU_EXPEDITED} (until the host reboots): CRIU's waits for RCU grace periods are expedited`);
  return r.state;
}
