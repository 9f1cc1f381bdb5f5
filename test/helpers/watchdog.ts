import { spawn } from 'node:child_process';
import type { Socket } from 'node:net';

/*
 * A deadline for a whole test file that holds even when this process's event loop is frozen —
 * timers, node:test's timeouts included, then never fire. A child process watches: it kills this
 * process (SIGKILL, so the runner reports the file as failed) once `ms` have passed, and exits
 * by itself as soon as this process is gone (its stdin, a pipe from here, closes).
 */
const WATCHER = `
const [pid, ms, what] = process.argv.slice(1);
process.stdin.on('data', () => {}).on('end', () => process.exit(0)).on('error', () => process.exit(0));
setTimeout(() => {
  process.stderr.write('watchdog: ' + what + ' still running after ' + ms + ' ms (a frozen event loop?): killing it\\n');
  process.kill(Number(pid), 'SIGKILL');
  process.exit(1);
}, Number(ms));
`;

/** Kills this process after `ms` unless it exits first (see above); `what` names it in the message. */
export function watchdog(ms: number, what: string): void {
  const child = spawn(process.execPath, ['-e', WATCHER, String(process.pid), String(ms), what], { stdio: ['pipe', 'ignore', 'inherit'] });
  // Neither the watcher nor its pipe keeps this process alive.
  child.unref();
  (child.stdin as Socket).unref();
}
