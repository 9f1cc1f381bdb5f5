import type { ChildProcess } from 'node:child_process';

/**
 * Whether `child` and its pipes keep this process's event loop alive. A helper process started
 * ahead of need (and idle until then) must not: `held` false; true once it is put to work.
 */
export function holdLoop(child: ChildProcess, held: boolean): void {
  if (held) child.ref();
  else child.unref();
  for (const s of child.stdio) {
    const stream = s as { ref?(): void; unref?(): void } | null;
    if (held) stream?.ref?.();
    else stream?.unref?.();
  }
}
