import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import { FileWait } from './file-wait.js';
import { isNoise } from './criu.js';
import { killQuietly } from './exec.js';
import { spawnDetached, type DetachedExit } from './spawner.js';

/** The name CRIU gives the daemon's socket in its work directory (criu/uffd.c). */
export const LAZY_PAGES_SOCKET = 'lazy-pages.socket';
const LOG = 'lazy-pages.log';

/** How the daemon ended (both null: it could not be started, or its status is unknown). */
export type LazyPagesExit = DetachedExit;

/**
 * One `criu lazy-pages` daemon: it serves the restored process's page faults through
 * userfaultfd from `imagesDir`, then (after a quiet second) copies the remaining pages in the
 * background and exits 0 once every page is in. A non-zero exit while the container runs means
 * pages are missing: the kernel then maps zeros where the app's memory was, so the caller must
 * kill the container (never let it run on).
 *
 * Ordering: start() resolves once the daemon listens, which must happen before
 * `runc restore --lazy-pages` (same work directory) connects to it — unless the restore connects
 * to the relay (lazy-relay.ts) instead, which waits for the daemon itself.
 */
export class LazyPagesDaemon {
  readonly exit: Promise<LazyPagesExit>;
  /** performance.now() when the daemon was spawned: the zero of its log's timestamps */
  readonly startedAt: number;
  /** how long its start held this process (spawner.ts), once it started */
  spawnMs: number | undefined;
  private exited: LazyPagesExit | null = null;
  private pid: number | undefined;
  private killed = false;

  private constructor(
    private readonly criu: string,
    readonly imagesDir: string,
    readonly workDir: string,
  ) {
    mkdirSync(workDir, { recursive: true });
    rmSync(path.join(workDir, LAZY_PAGES_SOCKET), { force: true });
    this.startedAt = performance.now();
    // -v4: the log names each fault and when the background copy starts (ActiveSet cut-off).
    const spawned = spawnDetached(this.criu, ['lazy-pages', '--images-dir', imagesDir, '--work-dir', workDir, '--log-file', LOG, '-v4']);
    this.exit = spawned
      .then(
        (child) => {
          this.pid = child.pid;
          this.spawnMs = child.spawnMs;
          if (this.killed) killQuietly(child.pid, 'SIGKILL');
          return child.exit;
        },
        (): LazyPagesExit => ({ code: null, signal: null }),
      )
      .then((e) => (this.exited = e));
  }

  /** Spawns the daemon; `listening()` says when it accepts connections. */
  static spawn(criu: string, imagesDir: string, workDir: string): LazyPagesDaemon {
    return new LazyPagesDaemon(criu, imagesDir, workDir);
  }

  /** Spawns the daemon and resolves once it listens. */
  static async start(criu: string, imagesDir: string, workDir: string, timeoutMs = 10_000): Promise<LazyPagesDaemon> {
    const d = LazyPagesDaemon.spawn(criu, imagesDir, workDir);
    await d.listening(timeoutMs);
    return d;
  }

  /** Resolves once the daemon listens; rejects (and kills it) when it exits first or does not listen within `timeoutMs`. */
  async listening(timeoutMs = 10_000): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    const socket = path.join(this.workDir, LAZY_PAGES_SOCKET);
    const appears = new FileWait(socket, 20);
    try {
      while (!existsSync(socket)) {
        if (this.exited) throw new Error(`criu lazy-pages exited ${describe(this.exited)} before it listened: ${this.errors().join(' | ') || 'no error logged'}`);
        if (performance.now() > deadline) {
          this.kill();
          throw new Error(`criu lazy-pages did not listen within ${timeoutMs} ms`);
        }
        await Promise.race([appears.next(), this.exit]);
      }
    } finally {
      appears.close();
    }
  }

  get running(): boolean {
    return this.exited === null;
  }

  kill(): void {
    if (this.exited) return;
    this.killed = true; // not started yet: killed as soon as it is
    if (this.pid) killQuietly(this.pid, 'SIGKILL');
  }

  /** The daemon's error lines (less the noise every run prints). */
  errors(): string[] {
    return this.logLines()
      .filter((l) => /Error/.test(l) && !isNoise(l))
      .map((l) => l.replace(/^\([\d.\s]+\)\s*/, '').replace(/^Error\s*\([^)]*\):\s*/, ''));
  }

  /**
   * When the daemon began copying the pages nobody faulted on (performance.now() scale), or
   * null when it has not (yet). Reads of the image before this are the app's own page faults.
   */
  backgroundStartedAt(): number | null {
    const line = this.logLines().find((l) => /Start handling remaining pages/.test(l));
    const secs = line ? /^\(\s*([\d.]+)\)/.exec(line)?.[1] : undefined;
    return secs === undefined ? null : this.startedAt + Number(secs) * 1000;
  }

  /**
   * The pages the restored processes faulted on, from the daemon's log: for each fault, the
   * pages file and the byte offset in it that answered it, and when (performance.now() scale).
   * Pages the background copy brought in before anything touched them are not faults.
   */
  faults(): PageFault[] {
    return parseFaults(this.logLines(), this.startedAt);
  }

  private logLines(): string[] {
    try {
      return readFileSync(path.join(this.workDir, LOG), 'utf8').split('\n');
    } catch {
      return [];
    }
  }
}

function describe(e: LazyPagesExit): string {
  return e.signal ? `on ${e.signal}` : `with code ${e.code}`;
}

export interface PageFault {
  /** the faulting task (its pid in the restored tree, as in pagemap-<pid>.img) */
  pid: number;
  /** the page's virtual address */
  vaddr: number;
  /** the image file, e.g. pages-1.img */
  file: string;
  /** in bytes, in that file */
  offset: number;
  /** performance.now() scale */
  at: number;
}

/*
 * The daemon logs a fault as "uffd: PID-FD: #PF at 0xADDR", then either "zero page at …" or
 * the read that answers it: "pr<IMG>-<PID> Read page from self <vaddr>/<offset in pages-IMG.img>"
 * (both hex). Fault reads are synchronous, so the first read after a #PF line is its own; reads
 * with no #PF before them are the background copy.
 */
const FAULT = /^\(\s*([\d.]+)\)\s+uffd: (\d+)-\d+: #PF at /;
const ZERO = /uffd: \d+-\d+: zero page at /;
const READ = /^\(\s*[\d.]+\)\s+pr(\d+)-\d+ Read page from self ([0-9a-f]+)\/([0-9a-f]+)/;

export function parseFaults(lines: readonly string[], startedAt: number): PageFault[] {
  const out: PageFault[] = [];
  let pending: { at: number; pid: number } | null = null;
  for (const line of lines) {
    const f = FAULT.exec(line);
    if (f) {
      pending = { at: startedAt + Number(f[1]) * 1000, pid: Number(f[2]) };
      continue;
    }
    if (pending === null) continue;
    if (ZERO.test(line)) {
      pending = null;
      continue;
    }
    const r = READ.exec(line);
    if (r) {
      out.push({ pid: pending.pid, vaddr: Number.parseInt(r[2]!, 16), file: `pages-${r[1]}.img`, offset: Number.parseInt(r[3]!, 16), at: pending.at });
      pending = null;
    }
  }
  return out;
}
