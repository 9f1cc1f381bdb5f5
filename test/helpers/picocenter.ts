import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { request } from 'undici';
import { repoFile } from './paths.js';
import { until } from './poll.js';

export interface LogLine {
  level: number;
  msg: string;
  [key: string]: unknown;
}

/** A whole `picocenter up` process started from a config string (CoreDNS test/server.go style). */
export interface RunningPicocenter {
  readonly dir: string;
  readonly configFile: string;
  readonly proc: ChildProcess;
  readonly dnsPort: number;
  readonly httpPort: number;
  readonly adminPort: number;
  readonly token: string;
  readonly logs: LogLine[];
  /** GET/POST on the admin API with the token; returns status and parsed JSON (or text). */
  admin(method: 'GET' | 'POST', p: string, token?: string | null): Promise<{ status: number; body: any }>;
  appState(app: string): Promise<string>;
  /** SIGTERM and wait for the exit, then remove `dir`; returns the exit code. */
  stop(): Promise<number | null>;
}

export const CLI = repoFile('dist/bin/picocenter.js');

export interface StartOptions {
  /** how long `picocenter up` may take to log "picocenter up", in ms; default 15 s */
  upTimeoutMs?: number;
}

/**
 * Runs `picocenter ARGS…` in `dir` and resolves with its first log line named `upMsg`; a process
 * that exits or does not log it in `timeoutMs` is killed, and the start rejects with its output.
 * `env` is added to this process's environment (a variable set to undefined is removed).
 */
export async function startCli(
  args: string[],
  dir: string,
  upMsg: string,
  timeoutMs = 15_000,
  env: NodeJS.ProcessEnv = {},
): Promise<{ proc: ChildProcess; logs: LogLine[]; up: LogLine; exit: Promise<number | null> }> {
  const proc = spawn(process.execPath, [CLI, ...args], {
    cwd: dir,
    env: { ...process.env, ...env, PICO_LOG_LEVEL: 'debug' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const logs: LogLine[] = [];
  const raw: string[] = [];
  createInterface({ input: proc.stderr! }).on('line', (line) => {
    raw.push(line);
    try {
      logs.push(JSON.parse(line) as LogLine);
    } catch {
      // not a log line (a crash trace): kept in `raw` for the failure message
    }
  });
  let exited = false;
  const exit = new Promise<number | null>((resolve) => proc.once('exit', (code) => ((exited = true), resolve(code))));
  try {
    const up = await until(
      () => {
        if (exited) throw new Error(`picocenter ${args[0]} exited before it was up:\n${raw.join('\n')}`);
        return logs.find((l) => l.msg === upMsg);
      },
      upMsg,
      timeoutMs,
    );
    return { proc, logs, up, exit };
  } catch (err) {
    // Not up: no test holds it, so nothing else would ever stop it (its stderr pipe would keep
    // the test process alive).
    if (!exited) {
      proc.kill('SIGKILL');
      await exit;
      throw new Error(`${(err as Error).message}; its output:\n${raw.join('\n')}`);
    }
    throw err;
  }
}

/** Starts `picocenter up`; a process that does not come up is killed, and the start rejects. */
export async function startPicocenter(configYaml: string, options: StartOptions = {}): Promise<RunningPicocenter> {
  const dir = mkdtempSync(path.join(tmpdir(), 'pico-e2e-'));
  const configFile = path.join(dir, 'picocenter.yaml');
  writeFileSync(configFile, configYaml);
  const { proc, logs, up: upLine, exit } = await startCli(['up', '--config', configFile], dir, 'picocenter up', options.upTimeoutMs);
  const addr = upLine as unknown as { dns: { port: number }; http: { port: number }; admin: { port: number } };
  const token = /token:\s*(\S+)/.exec(configYaml)?.[1] ?? '';
  const adminPort = addr.admin.port;
  const admin: RunningPicocenter['admin'] = async (method, p, tok = token) => {
    const res = await request(`http://127.0.0.1:${adminPort}${p}`, {
      method,
      headers: tok === null ? {} : { authorization: `Bearer ${tok}` },
    });
    const text = await res.body.text();
    let body: unknown = text;
    try {
      body = JSON.parse(text);
    } catch {
      // metrics are text
    }
    return { status: res.statusCode, body };
  };
  return {
    dir,
    configFile,
    proc,
    dnsPort: addr.dns.port,
    httpPort: addr.http.port,
    adminPort,
    token,
    logs,
    admin,
    async appState(app) {
      const { body } = await admin('GET', `/v1/apps/${app}`);
      return (body as { state: string }).state;
    },
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      const code = await exit;
      rmSync(dir, { recursive: true, force: true });
      return code;
    },
  };
}
