import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, mkdirSync } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { PicoError } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import type { AppSpec, Endpoints } from '../shared/protocol.js';
import { waitForPort } from './readiness.js';
import type { CheckpointResult, Container, ContainerRuntime, ExitStatus } from './runtime.js';

/** Environment variables passed through from the worker; everything else comes from the app's config. */
const PASSED_ENV = ['PATH', 'HOME', 'LANG', 'LC_ALL', 'TZ', 'TMPDIR'];
const STOP_GRACE_MS = 5000;
const STDERR_TAIL_LINES = 20;

interface ProcessContainer extends Container {
  readonly child: ChildProcess;
}

/**
 * The `process` runtime: runs the app's command directly on the host, in its own process group.
 * This is a COLD START runtime: a swap-out stops the process and its memory is lost; a wake
 * starts the command again. Apps share the host's network, so their ports must not collide.
 */
export class ProcessRuntime implements ContainerRuntime {
  readonly name = 'process';
  readonly keepsMemory = false;

  /** `logDir`: where each app's stdout and stderr are appended (APP.log); absent: into the worker's log. */
  constructor(
    private readonly log: Logger,
    private readonly logDir?: string,
  ) {
    if (logDir) mkdirSync(logDir, { recursive: true });
  }

  logFile(app: string): string {
    return path.join(this.logDir ?? '/dev/null', `${app}.log`);
  }

  async storedImages(): Promise<Array<{ app: string; generation: number }>> {
    return [];
  }

  async close(): Promise<void> {}

  async start(spec: AppSpec, signal?: AbortSignal): Promise<Container> {
    const log = this.log.child({ app: spec.name });
    const env: Record<string, string> = {};
    for (const k of PASSED_ENV) if (process.env[k] !== undefined) env[k] = process.env[k]!;
    // HOST: apps share the host's network here; loopback keeps them off the gateway's addresses.
    Object.assign(env, spec.env, { APP_NAME: spec.name, PORTS: spec.ports.join(','), HOST: '127.0.0.1' });
    if (spec.ports.length > 0) env.PORT = String(spec.ports[0]);

    const [cmd, ...args] = spec.command as [string, ...string[]];
    const child = spawn(cmd, args, { cwd: spec.cwd, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    const stderrTail: string[] = [];
    const exited = new Promise<ExitStatus>((resolve) => {
      child.once('exit', (code, signal) => resolve({ code, signal }));
      // A spawn failure (ENOENT) emits 'error' and no 'exit'.
      child.once('error', (err) => {
        stderrTail.push(err.message);
        resolve({ code: null, signal: null });
      });
    });
    const logStream = this.logDir ? createWriteStream(this.logFile(spec.name), { flags: 'a' }) : undefined;
    if (logStream) {
      logStream.on('error', (err) => log.warn({ err: err.message }, 'app log not writable'));
      child.stdout!.pipe(logStream, { end: false });
      child.stderr!.pipe(logStream, { end: false });
      void exited.then(() => setImmediate(() => logStream.end()));
    } else {
      createInterface({ input: child.stdout! }).on('line', (line) => log.info({ stream: 'stdout' }, line));
    }
    createInterface({ input: child.stderr! }).on('line', (line) => {
      stderrTail.push(line);
      if (stderrTail.length > STDERR_TAIL_LINES) stderrTail.shift();
      if (!logStream) log.warn({ stream: 'stderr' }, line);
    });

    const endpoints: Endpoints = {};
    for (const p of spec.ports) endpoints[p] = { host: '127.0.0.1', port: p };
    const container: ProcessContainer = { app: spec.name, pid: child.pid, startedAt: new Date(), endpoints, exited, child };

    // Ready when every port accepts connections; fail fast if the process exits first.
    const ready = new AbortController();
    const timer = setTimeout(() => ready.abort(), spec.readyTimeoutMs);
    const onAbort = () => ready.abort();
    signal?.addEventListener('abort', onAbort, { once: true });
    const exitedEarly = exited.then((status) => ({ exited: status }));
    try {
      const outcome = await Promise.race([
        Promise.all(spec.ports.map((p) => waitForPort('127.0.0.1', p, ready.signal))).then((ok) => ({ ok: ok.every(Boolean) })),
        exitedEarly,
      ]);
      if ('exited' in outcome) {
        const { code, signal } = outcome.exited;
        throw new PicoError(
          'PICO_ERR_APP_EXITED',
          `app ${spec.name} exited before it was ready (code ${code}, signal ${signal})${formatTail(stderrTail)}`,
        );
      }
      if (!outcome.ok && signal?.aborted) {
        throw new PicoError('PICO_ERR_SHUTTING_DOWN', `start of ${spec.name} was cancelled`);
      }
      if (!outcome.ok) {
        throw new PicoError(
          'PICO_ERR_READY_TIMEOUT',
          `app ${spec.name}: ports ${spec.ports.join(', ')} did not accept connections within ${spec.readyTimeoutMs} ms${formatTail(stderrTail)}`,
        );
      }
    } catch (err) {
      await this.stop(container);
      throw err;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      ready.abort();
    }
    log.info({ pid: child.pid }, 'container running');
    return container;
  }

  async checkpoint(container: Container): Promise<CheckpointResult> {
    await this.stop(container);
    return { generation: null };
  }

  restore(spec: AppSpec, signal?: AbortSignal): Promise<Container> {
    return this.start(spec, signal);
  }

  /** SIGTERM to the whole process group, SIGKILL after a grace period. */
  async stop(container: Container): Promise<void> {
    const { child } = container as ProcessContainer;
    if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) {
      await container.exited;
      return;
    }
    signalGroup(child.pid, 'SIGTERM');
    const killTimer = setTimeout(() => signalGroup(child.pid!, 'SIGKILL'), STOP_GRACE_MS);
    await container.exited;
    clearTimeout(killTimer);
    // Children the app left behind in its group go too.
    signalGroup(child.pid, 'SIGKILL');
  }
}

function signalGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch {
    // The group is already gone.
  }
}

function formatTail(lines: string[]): string {
  return lines.length > 0 ? `; last stderr:\n    ${lines.join('\n    ')}` : '';
}
