import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { constants } from 'node:os';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { holdLoop } from '../../shared/child-ref.js';
import { python3 } from './lazy-relay.js';

/** spawner.py, beside this module's source (dist/worker/oci → worker/oci). */
const SCRIPT = fileURLToPath(new URL('../../../worker/oci/spawner.py', import.meta.url));
/** in ms: how often a child is looked for once the spawner that reaps it is gone */
const ORPHAN_POLL_MS = 100;

/** How a detached child ended; both null when that cannot be known. */
export interface DetachedExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A process started in its own session with stdio on /dev/null (spawnDetached). */
export interface DetachedChild {
  pid: number;
  /** settles once, when the child is gone */
  exit: Promise<DetachedExit>;
  /** how long the start held this process's event loop (ms) */
  spawnMs: number;
}

const SIGNALS = new Map<number, NodeJS.Signals>(Object.entries(constants.signals).map(([name, n]) => [n, name as NodeJS.Signals]));

/**
 * Starts `file` with `args` in a new session, stdio on /dev/null, detached from this process's
 * event loop (it neither holds it nor dies with it): through the spawner (spawner.py says why)
 * where python3 is there, else with this process's own fork. Rejects when it cannot be started.
 */
export async function spawnDetached(file: string, args: readonly string[]): Promise<DetachedChild> {
  const spawner = Spawner.get();
  if (spawner) return spawner.spawn(file, args);
  const started = performance.now();
  const child = spawn(file, args, { stdio: 'ignore', detached: true });
  const spawnMs = Math.round(performance.now() - started);
  child.unref();
  const exit = new Promise<DetachedExit>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  await new Promise<void>((resolve, reject) => {
    child.once('spawn', resolve);
    child.once('error', reject);
  });
  return { pid: child.pid!, exit, spawnMs };
}

/** Starts the spawner now, if there is none, so that a wake does not wait for python. */
export function warmSpawner(): void {
  Spawner.get();
}

/** The spawner's PID while one runs (for tests and diagnostics). */
export function spawnerPid(): number | undefined {
  return Spawner.livePid();
}

/**
 * One spawner.py per worker process, started on first use and again after it exited. It holds
 * no reference on the event loop and exits when this process goes (its stdin closes).
 */
class Spawner {
  private static current: Spawner | undefined;
  private nextId = 1;
  private readonly starting = new Map<number, { resolve(c: DetachedChild): void; reject(e: Error): void; file: string; spawnMs: number }>();
  private readonly running = new Map<number, { pid: number; resolve(e: DetachedExit): void }>();
  private gone = false;

  private constructor(private readonly child: ChildProcess) {
    holdLoop(child, false);
    createInterface({ input: child.stdout! }).on('line', (l) => this.event(l));
    child.stderr!.setEncoding('utf8').on('data', () => undefined);
    child.stdin!.on('error', () => undefined); // gone: its exit says so
    child.once('exit', () => this.lost());
    child.once('error', () => this.lost());
  }

  static livePid(): number | undefined {
    const s = Spawner.current;
    return s && !s.gone ? s.child.pid : undefined;
  }

  static get(): Spawner | undefined {
    if (Spawner.current && !Spawner.current.gone) return Spawner.current;
    const py = python3();
    if (!py || !existsSync(SCRIPT)) return undefined;
    Spawner.current = new Spawner(spawn(py, [SCRIPT], { cwd: process.cwd(), stdio: ['pipe', 'pipe', 'pipe'] }));
    return Spawner.current;
  }

  spawn(file: string, args: readonly string[]): Promise<DetachedChild> {
    return new Promise((resolve, reject) => {
      const started = performance.now();
      const id = this.nextId++;
      this.child.stdin!.write(`${JSON.stringify({ id, file, args })}\n`);
      this.starting.set(id, { resolve, reject, file, spawnMs: Math.round(performance.now() - started) });
      // A start under way holds the event loop; a child running does not (as a detached child of
      // this process would not).
      holdLoop(this.child, true);
    });
  }

  private event(line: string): void {
    let e: { id?: number; pid?: number; error?: string; code?: number | null; signal?: number | null };
    try {
      e = JSON.parse(line) as typeof e;
    } catch {
      return;
    }
    const id = e.id ?? 0;
    const start = this.starting.get(id);
    if (start) {
      this.starting.delete(id);
      if (this.starting.size === 0) holdLoop(this.child, false);
      if (e.error !== undefined || !(typeof e.pid === 'number' && e.pid > 0)) {
        start.reject(new Error(e.error ?? `the spawner could not start ${start.file}`));
        return;
      }
      const pid = e.pid;
      const exit = new Promise<DetachedExit>((resolve) => this.running.set(id, { pid, resolve }));
      start.resolve({ pid, exit, spawnMs: start.spawnMs });
      return;
    }
    const run = this.running.get(id);
    if (run && e.code !== undefined) {
      this.running.delete(id);
      run.resolve({ code: e.code, signal: typeof e.signal === 'number' ? (SIGNALS.get(e.signal) ?? null) : null });
    }
  }

  /**
   * The spawner exited (killed, or python failed): starts still pending fail; children it
   * started run on, unreaped by us, so each is watched until it is gone (its exit status is
   * then unknown). The next spawn starts a new spawner.
   */
  private lost(): void {
    if (this.gone) return;
    this.gone = true;
    for (const s of this.starting.values()) s.reject(new Error(`the spawner exited before it started ${s.file}`));
    this.starting.clear();
    for (const run of this.running.values()) watchOrphan(run.pid, run.resolve);
    this.running.clear();
  }
}

function watchOrphan(pid: number, resolve: (e: DetachedExit) => void): void {
  const timer = setInterval(() => {
    if (!gone(pid)) return;
    clearInterval(timer);
    resolve({ code: null, signal: null });
  }, ORPHAN_POLL_MS);
  timer.unref();
}

/** Whether `pid` is gone or a zombie (an orphan whose new parent does not reap it). */
function gone(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat[stat.lastIndexOf(')') + 2] === 'Z';
  } catch {
    return true;
  }
}
