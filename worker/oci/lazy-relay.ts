import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { holdLoop } from '../../shared/child-ref.js';
import { which } from './exec.js';
import { LAZY_PAGES_SOCKET } from './lazy-pages.js';

/** lazy-relay.py, beside this module's source (dist/worker/oci → worker/oci). */
const SCRIPT = fileURLToPath(new URL('../../../worker/oci/lazy-relay.py', import.meta.url));

/**
 * The relay between `criu restore --lazy-pages` and `criu lazy-pages` (lazy-relay.py says why):
 * it listens on the restore's socket in `restoreWork`, forwards to the daemon's socket in
 * `daemonWork`, and holds back "restore finished" — the daemon's signal to copy every remaining
 * page — until release(). Needs python3; `available()` says whether this host has it.
 *
 * The relay runs on the system's python3 (/usr/bin/python3, which install-oci.sh installs), else
 * the first on PATH: a python3 on PATH may be a version manager's shim (pyenv's takes ~300 ms and
 * a dozen processes to start one). Even so, starting python3 takes longer than the rest of a
 * restore's set-up: one relay process is kept started ahead, idle on its stdin, and start() hands it its sockets; the
 * next one is started when that relay exits (after its restore). The spare holds no reference
 * on the event loop and exits when this process goes (its stdin closes).
 */
const SYSTEM_PYTHON = '/usr/bin/python3';

/** The python3 the relay and the spawner (spawner.ts) run on, or null without one. */
export function python3(): string | null {
  return existsSync(SYSTEM_PYTHON) ? SYSTEM_PYTHON : which('python3');
}

export class LazyRelay {
  private static spare: ChildProcess | undefined;
  private readonly exit: Promise<number | null>;
  private stderr = '';

  private constructor(private readonly child: ChildProcess) {
    this.exit = new Promise((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) resolve(child.exitCode);
      child.once('exit', (code) => resolve(code));
      child.once('error', () => resolve(null));
    });
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (this.stderr = (this.stderr + d).slice(-2000)));
  }

  static available(): boolean {
    return existsSync(SCRIPT) && python3() !== null;
  }

  /** Starts the spare relay process now, if there is none. */
  static warm(): void {
    if (LazyRelay.spare || !LazyRelay.available()) return;
    const child = spawn(python3()!, [SCRIPT], { cwd: '/', stdio: ['pipe', 'pipe', 'pipe'] });
    const forget = (): void => {
      if (LazyRelay.spare === child) LazyRelay.spare = undefined;
    };
    child.once('exit', forget);
    child.once('error', forget);
    holdLoop(child, false);
    LazyRelay.spare = child;
  }

  /** Resolves once the relay listens (before the restore may connect). */
  static async start(restoreWork: string, daemonWork: string, timeoutMs = 10_000): Promise<LazyRelay> {
    LazyRelay.warm();
    const child = LazyRelay.spare;
    LazyRelay.spare = undefined;
    if (!child) throw new Error('the lazy-pages relay cannot start: no python3');
    holdLoop(child, true);
    const relay = new LazyRelay(child);
    // The next restore's, once this one is over: starting python now would take CPU from it.
    void relay.exit.then(() => LazyRelay.warm());
    const ready = new Promise<void>((resolve, reject) => {
      let out = '';
      child.stdout!.setEncoding('utf8').on('data', (d: string) => {
        out += d;
        if (out.includes('ready\n')) resolve();
      });
      void relay.exit.then((code) => reject(new Error(`the lazy-pages relay exited (${code}) before it listened: ${relay.stderr.trim() || 'no message'}`)));
    });
    child.stdin!.write(`${restoreWork}\t${LAZY_PAGES_SOCKET}\t${path.join(path.relative(restoreWork, daemonWork), LAZY_PAGES_SOCKET)}\n`);
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
