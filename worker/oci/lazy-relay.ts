import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { which } from './exec.js';
import { LAZY_PAGES_SOCKET } from './lazy-pages.js';

/** lazy-relay.py, beside this module's source (dist/worker/oci → worker/oci). */
const SCRIPT = fileURLToPath(new URL('../../../worker/oci/lazy-relay.py', import.meta.url));

/**
 * The relay between `criu restore --lazy-pages` and `criu lazy-pages` (lazy-relay.py says why):
 * it listens on the restore's socket in `restoreWork`, forwards to the daemon's socket in
 * `daemonWork`, and holds back "restore finished" — the daemon's signal to copy every remaining
 * page — until release(). Needs python3; `available()` says whether this host has it.
 */
export class LazyRelay {
  private readonly exit: Promise<number | null>;
  private stderr = '';

  private constructor(private readonly child: ChildProcess) {
    this.exit = new Promise((resolve) => {
      child.once('exit', (code) => resolve(code));
      child.once('error', () => resolve(null));
    });
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (this.stderr = (this.stderr + d).slice(-2000)));
  }

  static available(): boolean {
    return existsSync(SCRIPT) && which('python3') !== null;
  }

  /** Resolves once the relay listens (before the restore may connect). */
  static async start(restoreWork: string, daemonWork: string, timeoutMs = 10_000): Promise<LazyRelay> {
    const child = spawn(which('python3')!, [SCRIPT, LAZY_PAGES_SOCKET, path.join(path.relative(restoreWork, daemonWork), LAZY_PAGES_SOCKET)], {
      cwd: restoreWork,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const relay = new LazyRelay(child);
    const ready = new Promise<void>((resolve, reject) => {
      let out = '';
      child.stdout!.setEncoding('utf8').on('data', (d: string) => {
        out += d;
        if (out.includes('ready\n')) resolve();
      });
      void relay.exit.then((code) => reject(new Error(`the lazy-pages relay exited (${code}) before it listened: ${relay.stderr.trim() || 'no message'}`)));
    });
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([ready, new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`the lazy-pages relay did not listen within ${timeoutMs} ms`)), timeoutMs)))]);
    } catch (err) {
      relay.kill();
      throw err;
    } finally {
      clearTimeout(timer);
    }
    return relay;
  }

  /** Lets "restore finished" through: the daemon starts copying the rest of memory. */
  release(): void {
    if (this.child.stdin?.writable) this.child.stdin.end('go\n');
  }

  kill(): void {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
  }

  /** The relay's own error, once it exited with one. */
  async failure(): Promise<string | null> {
    const code = await this.exit;
    return code === 0 ? null : this.stderr.trim() || `exit ${code}`;
  }
}
