import { spawn, type StdioOptions } from 'node:child_process';
import { accessSync, constants, statSync } from 'node:fs';
import path from 'node:path';

/** How one external command ended. `error` is set when it could not be started or timed out. */
export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** wall-clock duration in milliseconds */
  ms: number;
  error?: Error;
}

export interface RunOptions {
  /** SIGKILL after this long; the result then carries an error. Default 60 s. */
  timeoutMs?: number;
  cwd?: string;
  /**
   * 'pipe' captures stdout/stderr. 'ignore' gives the command /dev/null: required for
   * `runc run -d` and `runc restore -d`, whose container inherits runc's stdio — with pipes the
   * container would hold them open and the command would never seem to finish.
   */
  stdio?: 'pipe' | 'ignore';
  /** written to the command's stdin, which is then closed (with stdio 'pipe'); default: no stdin */
  input?: string;
}

const MAX_CAPTURE = 256 * 1024; // per stream, in characters: keeps the tail

/** Runs a command to completion. Never throws: failures are in the result. */
export function run(cmd: string, args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const started = performance.now();
  const stdio: StdioOptions = options.stdio === 'ignore' ? 'ignore' : [options.input !== undefined ? 'pipe' : 'ignore', 'pipe', 'pipe'];
  return new Promise((resolve) => {
    let stdout = '';
    let stderr = '';
    let error: Error | undefined;
    const child = spawn(cmd, args, { cwd: options.cwd, stdio });
    const timer = setTimeout(() => {
      error = new Error(`${path.basename(cmd)} ${args[0] ?? ''} timed out after ${options.timeoutMs ?? 60_000} ms`);
      child.kill('SIGKILL');
    }, options.timeoutMs ?? 60_000);
    if (options.input !== undefined && child.stdin) {
      child.stdin.on('error', () => {}); // a command that exits without reading: its result says why
      child.stdin.end(options.input);
    }
    child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout = (stdout + d).slice(-MAX_CAPTURE)));
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-MAX_CAPTURE)));
    child.once('error', (err) => {
      clearTimeout(timer);
      resolve({ code: null, signal: null, stdout, stderr, ms: performance.now() - started, error: err });
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, ms: performance.now() - started, ...(error ? { error } : {}) });
    });
  });
}

export function succeeded(r: RunResult): boolean {
  return r.code === 0 && !r.error;
}

/** A one-line reason for a failed RunResult: the error, else the last non-empty stderr line. */
export function failureReason(r: RunResult): string {
  if (r.error) return r.error.message;
  const last = r.stderr.trim().split('\n').filter(Boolean).at(-1);
  return `exit ${r.code ?? r.signal}${last ? `: ${last}` : ''}`;
}

/** Directories searched for system tools, beyond PATH: a non-root PATH often lacks the sbin ones. */
const SYSTEM_DIRS = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'];

/** The absolute path of an executable named `name` on PATH or in the system directories, or null. */
export function which(name: string): string | null {
  const dirs = [...(process.env.PATH ?? '').split(':').filter(Boolean), ...SYSTEM_DIRS];
  for (const dir of dirs) {
    const candidate = path.join(dir, name);
    if (isExecutable(candidate)) return candidate;
  }
  return null;
}

export function isExecutable(file: string): boolean {
  try {
    accessSync(file, constants.X_OK);
    return statSync(file).isFile();
  } catch {
    return false;
  }
}

/** Sends `signal` to `pid`; a process already gone is no error. */
export function killQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // gone already
  }
}
