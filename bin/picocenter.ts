#!/usr/bin/env node
import { hostname } from 'node:os';
import { parseArgs } from 'node:util';
import { loadConfig, parseListen } from '../shared/config.js';
import { describeError } from '../shared/errors.js';
import { createLogger } from '../shared/log.js';
import type { Logger } from '../shared/log.js';
import type { AppStatus, WorkerStatus } from '../gateway/placement.js';
import { AdminClient } from './admin-client.js';
import { startSystem, startWorkerAgent } from './system.js';

const USAGE = `usage: picocenter <command> [--config FILE]

commands:
  up                   run the gateway, DNS and a worker in this process
  worker [--listen HOST:PORT] [--id ID]
                       run only a worker (the config's worker: and store: sections), serving
                       the worker protocol for gateways that list it in workers:
  status [--json]      apps with name, state, worker and last wake time
  wake APP             wake APP and wait until it runs
  checkpoint APP       swap APP out now and wait until it is stored
  logs APP [--bytes N] the last N bytes (default 64 KiB) of APP's stdout and stderr

options:
  --config FILE        the config file (default: picocenter.yaml)`;

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      config: { type: 'string', short: 'c', default: 'picocenter.yaml' },
      json: { type: 'boolean', default: false },
      bytes: { type: 'string', default: '65536' },
      help: { type: 'boolean', short: 'h', default: false },
      listen: { type: 'string' },
      id: { type: 'string' },
    },
  });
  const [command, ...rest] = positionals;
  if (values.help || !command) {
    console.log(USAGE);
    return command || values.help ? 0 : 2;
  }
  const cfg = loadConfig(values.config!);
  switch (command) {
    case 'up':
      return up(cfg);
    case 'worker': {
      let listen;
      if (values.listen !== undefined) {
        listen = parseListen(values.listen);
        if (!listen) throw new Error(`invalid --listen "${values.listen}" (expected IP:port, e.g. 127.0.0.1:7401)`);
      }
      const id = values.id ?? hostname().split('.')[0]!.toLowerCase(); // default: the host's short name
      if (!/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/.test(id)) throw new Error(`invalid worker id "${id}" (lowercase letters, digits and dashes; give --id)`);
      return worker(cfg, { id, ...(listen ? { listen } : {}) });
    }
    case 'status': {
      const client = new AdminClient(cfg);
      const { apps } = await client.call<{ apps: AppStatus[] }>('GET', '/v1/apps');
      if (values.json) console.log(JSON.stringify(apps, null, 2));
      else {
        printTable(apps);
        const { workers } = await client.call<{ workers: WorkerStatus[] }>('GET', '/v1/workers');
        console.log('');
        printRows([['WORKER', 'REACHABLE', 'APPS'], ...workers.map((w) => [w.id, w.reachable ? 'yes' : 'NO', String(w.apps)])]);
      }
      return 0;
    }
    case 'wake':
    case 'checkpoint': {
      const app = rest[0];
      if (!app) throw new Error(`usage: picocenter ${command} APP`);
      const st = await new AdminClient(cfg).call<AppStatus>('POST', `/v1/apps/${encodeURIComponent(app)}/${command}`);
      console.log(`${st.name}: ${st.state}`);
      return 0;
    }
    case 'logs': {
      const app = rest[0];
      if (!app) throw new Error('usage: picocenter logs APP [--bytes N]');
      process.stdout.write(await new AdminClient(cfg).text('GET', `/v1/apps/${encodeURIComponent(app)}/logs?bytes=${Number(values.bytes) || 65536}`));
      return 0;
    }
    default:
      console.error(`unknown command: ${command}\n\n${USAGE}`);
      return 2;
  }
}

/** in ms: long enough to checkpoint every running app (`worker.shutdown: checkpoint`) */
const SHUTDOWN_DEADLINE_MS = 5 * 60_000;

async function up(cfg: ReturnType<typeof loadConfig>): Promise<number> {
  const log = createLogger();
  const system = await startSystem(cfg, log);
  return runUntilSignal(log, () => system.stop());
}

async function worker(cfg: ReturnType<typeof loadConfig>, opts: Parameters<typeof startWorkerAgent>[2]): Promise<number> {
  const log = createLogger();
  const agent = await startWorkerAgent(cfg, log, opts);
  log.info({ worker: agent.id, url: agent.url, runtime: cfg.worker.runtime }, 'picocenter worker up');
  console.log(`picocenter worker ${agent.id} listening on ${agent.url}`);
  return runUntilSignal(log, () => agent.stop());
}

/** Waits for SIGINT/SIGTERM, then stops cleanly (bounded); a second signal exits at once. */
async function runUntilSignal(log: Logger, stop: () => Promise<void>): Promise<number> {
  let stopping = false;
  await new Promise<void>((resolve) => {
    const onSignal = (signal: NodeJS.Signals) => {
      if (stopping) {
        // A second signal: the operator does not want to wait for a clean stop.
        log.error({ signal }, 'second signal: exiting without a clean stop');
        log.flush();
        process.exit(1);
      }
      stopping = true;
      log.info({ signal }, 'shutting down');
      // A clean stop that cannot finish (a worker that never answers) must not keep the process forever.
      setTimeout(() => {
        log.error({ deadlineMs: SHUTDOWN_DEADLINE_MS }, 'clean stop did not finish in time: exiting');
        log.flush();
        process.exit(1);
      }, SHUTDOWN_DEADLINE_MS).unref();
      void stop().then(resolve, (err: unknown) => {
        log.error({ err: describeError(err) }, 'shutdown failed');
        resolve();
      });
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
  log.info('stopped');
  log.flush();
  return 0;
}

function printTable(apps: AppStatus[]): void {
  const rows = [['APP', 'STATE', 'WORKER', 'LAST WAKE', 'ERROR']];
  for (const a of apps) {
    rows.push([a.name, a.operation ? `${a.state} (${a.operation})` : a.state, a.worker ?? '-', a.lastWake ?? '-', a.lastError?.message.split('\n')[0] ?? '']);
  }
  printRows(rows);
}

function printRows(rows: string[][]): void {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  for (const r of rows) console.log(r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd());
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    console.error(`picocenter: ${describeError(err)}`);
    process.exitCode = 1;
  },
);
