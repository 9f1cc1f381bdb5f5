import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { constants as osConstants } from 'node:os';
import path from 'node:path';
import { isNoise } from './criu.js';
import { FileWait } from './file-wait.js';
import { killQuietly, run, which, type RunResult } from './exec.js';
import { spawnDetached } from './spawner.js';

/**
 * runc, driven through its command line, with CRIU for checkpoint and restore.
 *
 * Every call names its own state root (`--root`), so Picocenter's containers never mix with
 * anyone else's runc containers and a test can use a throwaway root. Operations on one container
 * must not overlap (the worker serialises them per app); different containers are independent.
 *
 * Container lifecycle as runc sees it:
 *
 *   run / create+start ──► running ──checkpoint──► (gone; image in imagePath)
 *                            │   ▲                       │
 *                            │   └──────restore──────────┘
 *                            └─kill──► stopped ──delete──► (gone)
 *
 * A successful checkpoint leaves no container behind (unless leaveRunning): the image is the
 * only copy of the app. A failed checkpoint leaves it running (CRIU unfreezes it).
 */
export interface RuncOptions {
  /** runc binary; default: `runc` on PATH */
  runc?: string;
  /** the criu runc runs (`--criu`): scripts/install-oci.sh's wrapper, or a distribution criu */
  criu: string;
  /** runc's state directory (`--root`) */
  root: string;
  /** where runc's own logs go, one file per container and operation */
  logDir: string;
}

export interface ContainerState {
  id: string;
  /** host PID of the container's init; 0 once stopped */
  pid: number;
  status: 'creating' | 'created' | 'running' | 'paused' | 'stopped';
  bundle: string;
  created: string;
}

export interface CriuPaths {
  /** where CRIU writes (checkpoint) or reads (restore) the image */
  imagePath: string;
  /** CRIU's logs (dump.log, restore.log) and scratch files; not part of the image */
  workPath: string;
}

export interface CheckpointOptions extends CriuPaths {
  /** keep the container running after the dump (a copy, not a swap-out) */
  leaveRunning?: boolean;
  /** allow established TCP connections; the restore must then pass it too */
  tcpEstablished?: boolean;
  fileLocks?: boolean;
}

export interface RestoreOptions extends CriuPaths {
  bundle: string;
  tcpEstablished?: boolean;
  fileLocks?: boolean;
  /** memory comes from a `criu lazy-pages` daemon already listening in workPath (lazy-pages.ts) */
  lazyPages?: boolean;
}

/** How long one operation took: `ms` end to end (runc + CRIU), `criuMs` as CRIU's log counts it. */
export interface Timing {
  ms: number;
  criuMs: number | null;
  /**
   * attached restores and runs: how long starting runc held this process (spawner.ts: about
   * nothing through the spawner; a fork of this process without it, slow in a big process)
   */
  spawnMs?: number;
}

const TIMEOUT_MS = 120_000;

/** How an attached runc (and so the container's init) ended. */
export interface RuncExit {
  /** the init's exit code; null when it was killed by a signal */
  code: number | null;
  /** the signal that killed the init (runc reports it as 128 + n), or runc itself */
  signal: NodeJS.Signals | null;
}

/**
 * A container whose runc stays in the foreground as the parent of its init (`runc run` /
 * `runc restore` without --detach). runc waits for the init, deletes the container when it is
 * gone, and exits with its status; a checkpoint ends it too (the init is killed by CRIU: SIGKILL).
 * runc runs in its own session, so a worker that dies leaves it and its container running.
 */
export interface AttachedContainer {
  /** host PID of the container's init */
  pid: number;
  /** host PID of the foreground runc */
  runcPid: number;
  /** settles once, when runc exits (the init is gone) */
  exit: Promise<RuncExit>;
  timing: Timing;
}

export class RuncError extends Error {
  constructor(
    readonly op: string,
    readonly id: string,
    /** runc's own error message */
    readonly runcMessage: string,
    /** CRIU's error lines (checkpoint, restore), without the noise every run prints */
    readonly criuErrors: string[] = [],
  ) {
    super(`runc ${op} ${id} failed: ${runcMessage}${criuErrors.length ? `; criu: ${criuErrors.join(' | ')}` : ''}`);
    this.name = 'RuncError';
  }
}

export class Runc {
  private readonly bin: string;
  /** the criu runc runs: opts.criu until useCriu() */
  private criu: string;

  constructor(private readonly opts: RuncOptions) {
    this.bin = opts.runc ?? which('runc') ?? 'runc';
    this.criu = opts.criu;
    mkdirSync(opts.root, { recursive: true, mode: 0o700 });
    mkdirSync(opts.logDir, { recursive: true });
  }

  /** From now on runc runs `criu` (one that behaves as opts.criu does: worker/oci/criu-runc.ts). */
  useCriu(criu: string): void {
    this.criu = criu;
  }

  /** Creates and starts the container, detached; resolves once its process has been exec'd. */
  async run(id: string, bundle: string): Promise<{ pid: number; timing: Timing }> {
    const pidFile = this.file(id, 'pid');
    const r = await this.exec('run', id, ['run', '--detach', '--bundle', bundle, '--pid-file', pidFile, id], { detached: true });
    return { pid: readPid(pidFile), timing: { ms: r.ms, criuMs: null } };
  }

  /** Creates the container with its process waiting to exec: `start` lets it go. */
  async create(id: string, bundle: string): Promise<{ pid: number }> {
    const pidFile = this.file(id, 'pid');
    await this.exec('create', id, ['create', '--bundle', bundle, '--pid-file', pidFile, id], { detached: true });
    return { pid: readPid(pidFile) };
  }

  async start(id: string): Promise<void> {
    await this.exec('start', id, ['start', id]);
  }

  /**
   * Whether runc has state for `id` under its root, without running runc (a directory check): the
   * cheap test before `state` on the wake path.
   */
  has(id: string): boolean {
    return existsSync(path.join(this.opts.root, id));
  }

  /** The container's state, or null when runc knows no container by that id. */
  async state(id: string): Promise<ContainerState | null> {
    const r = await this.raw(['state', id]);
    if (r.code !== 0) {
      if (/does not exist/.test(r.stderr)) return null;
      throw new RuncError('state', id, runcMessage(r, ''));
    }
    return JSON.parse(r.stdout) as ContainerState;
  }

  async list(): Promise<ContainerState[]> {
    const r = await this.raw(['list', '--format', 'json']);
    if (r.code !== 0) throw new RuncError('list', '-', runcMessage(r, ''));
    return (JSON.parse(r.stdout || 'null') as ContainerState[] | null) ?? [];
  }

  /**
   * Signals the container's init (or, with `all`, every process in it). An init that is PID 1 of
   * its namespace ignores SIGTERM unless it handles it: follow up with SIGKILL.
   */
  async kill(id: string, signal: NodeJS.Signals = 'SIGTERM', options: { all?: boolean } = {}): Promise<void> {
    await this.exec('kill', id, ['kill', ...(options.all ? ['--all'] : []), id, signal]);
  }

  /** Removes the container; `force` kills it first. Idempotent: an unknown id is not an error. */
  async delete(id: string, options: { force?: boolean } = {}): Promise<void> {
    if ((await this.state(id)) === null) return;
    await this.exec('delete', id, ['delete', ...(options.force ? ['--force'] : []), id]);
    rmSync(this.file(id, 'pid'), { force: true });
  }

  /** Dumps the container with CRIU into `imagePath`; unless leaveRunning, the container is then gone. */
  async checkpoint(id: string, o: CheckpointOptions): Promise<Timing> {
    mkdirSync(o.imagePath, { recursive: true });
    mkdirSync(o.workPath, { recursive: true });
    const args = ['checkpoint', '--image-path', o.imagePath, '--work-path', o.workPath, ...criuFlags(o)];
    if (o.leaveRunning) args.push('--leave-running');
    const r = await this.exec('checkpoint', id, [...args, id], { criuLog: path.join(o.workPath, 'dump.log') });
    return { ms: r.ms, criuMs: criuDuration(path.join(o.workPath, 'dump.log')) };
  }

  /**
   * Restores the container from `imagePath`, detached, with the bundle's config: its mounts'
   * sources and its network namespace must exist as they did at the checkpoint.
   */
  async restore(id: string, o: RestoreOptions): Promise<{ pid: number; timing: Timing }> {
    mkdirSync(o.workPath, { recursive: true });
    const pidFile = this.file(id, 'pid');
    const args = ['restore', '--detach', '--bundle', o.bundle, '--image-path', o.imagePath, '--work-path', o.workPath, '--pid-file', pidFile, ...criuFlags(o)];
    const r = await this.exec('restore', id, [...args, id], { detached: true, criuLog: path.join(o.workPath, 'restore.log') });
    return { pid: readPid(pidFile), timing: { ms: r.ms, criuMs: criuDuration(path.join(o.workPath, 'restore.log')) } };
  }

  /**
   * `run` with runc in the foreground (see AttachedContainer): resolves once runc has written the
   * init's PID, rejects with runc's error when runc exits first.
   */
  runAttached(id: string, bundle: string): Promise<AttachedContainer> {
    return this.attached('run', id, ['run', '--bundle', bundle, '--pid-file', this.file(id, 'pid'), id], null);
  }

  /**
   * `restore` with runc in the foreground (see AttachedContainer): resolves once CRIU restored the
   * tree and runc wrote the init's PID; rejects with runc's and CRIU's errors when runc exits first.
   * runc is asked for before this returns (the lazy restore starts its daemon right after).
   */
  restoreAttached(id: string, o: RestoreOptions): Promise<AttachedContainer> {
    mkdirSync(o.workPath, { recursive: true });
    const args = ['restore', '--bundle', o.bundle, '--image-path', o.imagePath, '--work-path', o.workPath, '--pid-file', this.file(id, 'pid'), ...criuFlags(o)];
    if (o.lazyPages) args.push('--lazy-pages');
    args.push(id);
    return this.attached('restore', id, args, path.join(o.workPath, 'restore.log'));
  }

  private async attached(op: string, id: string, args: string[], criuLog: string | null): Promise<AttachedContainer> {
    const log = this.file(id, `${op}.log`);
    const pidFile = this.file(id, 'pid');
    rmSync(log, { force: true });
    rmSync(pidFile, { force: true });
    const started = performance.now();
    // stdio 'ignore': the container inherits runc's stdio until its /bin/sh reopens it inside
    // (bundle.ts); its own session (detached): signals to the worker's process group do not
    // reach it, and it outlives a worker that dies.
    let exited: RuncExit | null = null;
    let spawnError: Error | null = null;
    const spawned = spawnDetached(this.bin, this.global(log).concat(args));
    const exit = spawned
      .then(
        async (child) => {
          const e = await child.exit;
          return decodeExit(e.code, e.signal);
        },
        (err: Error): RuncExit => {
          spawnError = err;
          return { code: null, signal: null };
        },
      )
      .then((e) => (exited = e));
    // runc writes the PID file (write + rename) once the init exists: after create for `run`,
    // after CRIU's restore for `restore`.
    const deadline = started + TIMEOUT_MS;
    const appears = new FileWait(pidFile, 20);
    try {
      while (!existsSync(pidFile)) {
        if (exited) {
          const err = spawnError as Error | null;
          const why = err ? err.message : this.logTail(id, op) || `runc exited ${describeExit(exited)}`;
          throw new RuncError(op, id, why, criuLog ? criuErrors(criuLog) : []);
        }
        if (performance.now() > deadline) {
          void spawned.then((child) => killQuietly(child.pid, 'SIGKILL'), () => undefined);
          throw new RuncError(op, id, `no container process after ${TIMEOUT_MS} ms`, criuLog ? criuErrors(criuLog) : []);
        }
        await Promise.race([appears.next(), exit]);
      }
    } finally {
      appears.close();
    }
    const ms = performance.now() - started;
    // The PID file is there, so runc was started.
    const child = await spawned;
    return { pid: readPid(pidFile), runcPid: child.pid, exit, timing: { ms, criuMs: criuLog ? criuDuration(criuLog) : null, spawnMs: child.spawnMs } };
  }

  private async exec(op: string, id: string, args: string[], how: { detached?: boolean; criuLog?: string } = {}): Promise<RunResult> {
    const log = this.file(id, `${op}.log`);
    rmSync(log, { force: true });
    // Detached: the container inherits runc's stdio until its /bin/sh reopens it inside (see
    // bundle.ts), so runc gets /dev/null, never a pipe we would wait on; its errors go to --log.
    const r = await run(this.bin, this.global(log).concat(args), { timeoutMs: TIMEOUT_MS, stdio: how.detached ? 'ignore' : 'pipe' });
    if (r.code !== 0 || r.error) {
      throw new RuncError(op, id, runcMessage(r, this.logTail(id, op)), how.criuLog ? criuErrors(how.criuLog) : []);
    }
    return r;
  }

  private raw(args: string[]): Promise<RunResult> {
    return run(this.bin, this.global(null).concat(args), { timeoutMs: TIMEOUT_MS });
  }

  private global(log: string | null): string[] {
    return ['--root', this.opts.root, '--criu', this.criu, ...(log ? ['--log', log, '--log-format', 'json'] : [])];
  }

  private file(id: string, suffix: string): string {
    return path.join(this.opts.logDir, `${id}.${suffix}`);
  }

  /** The error messages runc logged (JSON lines) for the last `op` on `id`. */
  private logTail(id: string, op: string): string {
    let text: string;
    try {
      text = readFileSync(this.file(id, `${op}.log`), 'utf8');
    } catch {
      return '';
    }
    const msgs: string[] = [];
    for (const line of text.split('\n')) {
      try {
        const e = JSON.parse(line) as { level?: string; msg?: string };
        if ((e.level === 'error' || e.level === 'fatal') && e.msg) msgs.push(e.msg);
      } catch {
        if (line.trim()) msgs.push(line.trim());
      }
    }
    return msgs.slice(-3).join(' | ');
  }
}

/** runc exits 128 + n when its container's init was killed by signal n. */
function decodeExit(code: number | null, signal: NodeJS.Signals | null): RuncExit {
  if (code !== null && code > 128) {
    const name = (Object.keys(osConstants.signals) as NodeJS.Signals[]).find((k) => osConstants.signals[k] === code - 128);
    if (name) return { code: null, signal: name };
  }
  return { code, signal };
}

function describeExit(e: RuncExit): string {
  return e.signal ? `on ${e.signal}` : `with code ${e.code}`;
}

function criuFlags(o: { tcpEstablished?: boolean; fileLocks?: boolean }): string[] {
  return [...(o.tcpEstablished ? ['--tcp-established'] : []), ...(o.fileLocks ? ['--file-locks'] : [])];
}

function runcMessage(r: RunResult, logged: string): string {
  if (r.error) return r.error.message;
  const stderr = r.stderr.trim().split('\n').filter(Boolean).at(-1);
  return logged || stderr || `exit ${r.code ?? r.signal}`;
}

function readPid(file: string): number {
  const pid = Number.parseInt(readFileSync(file, 'utf8'), 10);
  if (!(pid > 0)) throw new Error(`runc wrote no PID to ${file}`);
  return pid;
}

/** CRIU's "Error (file:line): …" lines from a dump.log or restore.log, noise left out. */
export function criuErrors(logFile: string): string[] {
  let text: string;
  try {
    text = readFileSync(logFile, 'utf8');
  } catch {
    return [];
  }
  return text
    .split('\n')
    .filter((l) => /\bError \(/.test(l) && !isNoise(l))
    .map((l) => l.replace(/^\(\s*[\d.]+\)\s*/, '').replace(/^\s*\d+:\s*/, '').replace(/Error \([^)]*\):\s*/, ''))
    .slice(-5);
}

/** CRIU's own duration: the timestamp of the last line of its log, in ms. */
function criuDuration(logFile: string): number | null {
  try {
    const stamps = readFileSync(logFile, 'utf8').match(/^\((\d+\.\d+)\)/gm);
    const last = stamps?.at(-1);
    return last ? Math.round(Number.parseFloat(last.slice(1)) * 1000) : null;
  } catch {
    return null;
  }
}
