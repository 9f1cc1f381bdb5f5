import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import path from 'node:path';
import { LineCounter, parseDocument, isNode, type Document } from 'yaml';
import { z } from 'zod';
import { PicoError } from './errors.js';
import { RESTORE_MODES } from './protocol.js';
import { parseDuration, parseSize } from './units.js';

/*
 * The operator's config file: one zod schema is the single source of truth for validation, the
 * defaults (each sits beside its field) and the generated JSON Schema (picocenter.schema.json).
 * Unknown keys are errors everywhere (`strictObject`). The loaded config is deep-frozen.
 */

function toMs(s: string, ctx: z.RefinementCtx): number {
  const ms = parseDuration(s);
  if (ms !== undefined) return ms;
  ctx.addIssue({ code: 'custom', message: `invalid duration "${s}" (expected e.g. 500ms, 30s, 5m, 1h)` });
  return z.NEVER;
}

function toBytes(s: string, ctx: z.RefinementCtx): number {
  const bytes = parseSize(s);
  if (bytes !== undefined) return bytes;
  ctx.addIssue({ code: 'custom', message: `invalid size "${s}" (expected e.g. 64Ki, 256Mi, 1Gi)` });
  return z.NEVER;
}

const DURATION_DOC = 'a duration such as 500ms, 30s, 5m, 1h ("0" disables)';
const SIZE_DOC = 'a size such as 64Ki, 256Mi, 1Gi, 2G';
/** A duration in milliseconds; `dflt` is parsed like any value the operator writes. */
const durationText = () => z.union([z.string(), z.literal(0)]).describe(DURATION_DOC);
const duration = () => durationText().transform((v, ctx) => toMs(String(v), ctx));
const durationOr = (dflt: string) => durationText().default(dflt).transform((v, ctx) => toMs(String(v), ctx));
/** A size in bytes. */
export const size = () => z.string().describe(SIZE_DOC).transform(toBytes);
const sizeOr = (dflt: string) =>
  z.union([z.string(), z.literal(0)]).describe(SIZE_DOC).default(dflt).transform((v, ctx) => toBytes(String(v), ctx));

export interface ListenAddress {
  host: string;
  port: number;
}

/** `127.0.0.1:5353`, `[::1]:53`, `0.0.0.0:80`. Port 0 asks the OS for a free port (tests). */
export function parseListen(text: string): ListenAddress | undefined {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([0-9.]+)):(\d{1,5})$/.exec(text.trim());
  if (!m) return undefined;
  const host = m[1] ?? m[2]!;
  const port = Number(m[3]);
  if (isIP(host) === 0 || port > 65535) return undefined;
  return { host, port };
}

const listen = (dflt: string) =>
  z
    .string()
    .describe('host:port ([v6]:port for IPv6)')
    .default(dflt)
    .transform((s, ctx) => {
      const addr = parseListen(s);
      if (!addr) {
        ctx.addIssue({ code: 'custom', message: `invalid listen address "${s}" (expected IP:port, e.g. 127.0.0.1:8080)` });
        return z.NEVER;
      }
      return addr;
    });

const port = z.number().int().min(1).max(65535);

const hostname = z
  .string()
  .max(253)
  .regex(/^(?!-)[a-zA-Z0-9-]{1,63}(?<!-)(\.(?!-)[a-zA-Z0-9-]{1,63}(?<!-))*\.?$/, 'not a valid DNS name')
  .transform((s) => s.toLowerCase().replace(/\.$/, ''));

const cidr = z
  .string()
  .describe('an IPv4 block (127.0.1.0/24) or IPv6 prefix (fd00::/64)')
  .refine((s) => {
    const m = /^([^/]+)\/(\d{1,3})$/.exec(s);
    if (!m) return false;
    const v = isIP(m[1]!);
    const bits = Number(m[2]);
    return (v === 4 && bits <= 32) || (v === 6 && bits <= 128);
  }, 'not an address block (expected e.g. 127.0.1.0/24 or fd00::/64)');

const holdSchema = z.strictObject({
  timeout: duration().optional().describe('how long a client is held while its app wakes'),
  queue: z.number().int().min(1).optional().describe('most clients held at once per app; more get 503'),
});

const appSchema = z.strictObject({
  name: z.string().regex(/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/, 'app names are lowercase letters, digits and dashes'),
  domains: z.array(hostname).min(1).describe('names the app answers to in DNS and in HTTP Host'),
  command: z.array(z.string().min(1)).min(1).describe('argv of the app; PORT is set in its environment'),
  cwd: z.string().optional().describe('working directory, relative to the config file; default: the config file\'s directory'),
  env: z.record(z.string(), z.string()).default({}).describe('extra environment variables'),
  http: z.strictObject({ port }).optional().describe('the app serves HTTP on this port; routed by Host'),
  tcp: z.array(port).min(1).optional().describe('raw TCP ports, reached at the app\'s own address from gateway.addresses'),
  address: z.string().refine((s) => isIP(s) !== 0, 'not an IP address').optional()
    .describe('the app\'s own address (must lie in gateway.addresses); default: assigned from the pool'),
  idle: durationOr('5m').describe('swap the app out after this long without connections or traffic; 0 = never'),
  hold: holdSchema.optional().describe('overrides gateway.hold for this app'),
  readyTimeout: duration().optional().describe('overrides worker.readyTimeout for this app'),
  memory: size().optional().describe('memory limit of the app\'s container (oci runtime), e.g. 256Mi'),
  rootfs: z.string().min(1).optional()
    .describe('oci: the container\'s root filesystem directory, relative to the config file; default: the host\'s system read-only plus the app\'s directory'),
  bundle: z.string().min(1).optional()
    .describe('oci: an OCI bundle directory (config.json + rootfs) to run instead of building one; command and cwd come from its config.json'),
  restore: z.enum(RESTORE_MODES).default('activeset')
    .describe('oci: how memory comes back at a wake: full (fetch the whole image, then restore), lazy (restore at once, page in on demand), activeset (prefetch what recent restores used, then lazy)'),
});

const storeSchema = z.discriminatedUnion('kind', [
  z.strictObject({
    kind: z.literal('fs'),
    path: z.string().min(1).default('./data/store').describe('directory for images, relative to the config file'),
  }),
  z.strictObject({
    kind: z.literal('s3'),
    endpoint: z.url().optional().describe('S3 API endpoint, e.g. http://127.0.0.1:9000; default: AWS for the region'),
    region: z.string().min(1).default('us-east-1'),
    bucket: z.string().min(3).max(63).describe('the bucket images live in; it must exist'),
    prefix: z.string().default('').describe('key prefix inside the bucket, e.g. images/'),
    pathStyle: z.boolean().default(false).describe('path-style addressing (most S3-compatible servers need it)'),
  }).describe('credentials come from the AWS SDK\'s standard chain (environment, profile, instance role)'),
]);

const remoteWorkerSchema = z.strictObject({
  id: z.string().regex(/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/, 'worker ids are lowercase letters, digits and dashes')
    .describe('the worker\'s name in status and logs'),
  url: z.url({ protocol: /^https?$/ }).describe('the worker agent\'s base URL, e.g. http://10.0.0.7:7401'),
  token: z.string().min(8, 'the worker token must be at least 8 characters').describe('its worker.token'),
  operationTimeout: durationOr('10m')
    .describe('how long start, restore, checkpoint and stop may take there before the wake (or swap-out) fails'),
  queryTimeout: durationOr('10s').describe('the same for list, logs and cache queries'),
});

/** Where the gateway's workers come from: its embedded one and the remote list. */
function checkWorkers(cfg: { gateway: { embeddedWorker: boolean }; workers: Array<{ id: string }> }, ctx: z.RefinementCtx): void {
  if (!cfg.gateway.embeddedWorker && cfg.workers.length === 0) {
    ctx.addIssue({ code: 'custom', path: ['gateway', 'embeddedWorker'], message: 'no worker: keep the embedded worker or list remote `workers`' });
  }
  const ids = new Map<string, number>(cfg.gateway.embeddedWorker ? [['local', -1]] : []);
  cfg.workers.forEach((w, i) => {
    if (ids.has(w.id)) {
      const other = ids.get(w.id)!;
      ctx.addIssue({ code: 'custom', path: ['workers', i, 'id'], message: `duplicate worker id "${w.id}" (${other < 0 ? 'the embedded worker is "local"' : `also workers[${other}]`})` });
    }
    ids.set(w.id, i);
  });
}

export const configSchema = z
  .strictObject({
    gateway: z.strictObject({
      embeddedWorker: z.boolean().default(true)
        .describe('run a worker (the `worker` section) inside the gateway\'s process; false: only the remote `workers`'),
      dns: z.strictObject({
        listen: listen('127.0.0.1:5353').describe('UDP and TCP address of the authoritative DNS server'),
        zones: z.array(hostname).min(1).describe('zones the server is authoritative for; all else is REFUSED'),
        ttl: durationOr('5s').describe('TTL of answers (and the SOA negative-caching TTL)'),
      }),
      http: z
        .strictObject({
          listen: listen('127.0.0.1:8080').describe('HTTP listener; apps are routed by Host'),
          address: z.string().refine((s) => isIP(s) !== 0, 'not an IP address').optional()
            .describe('address DNS answers for HTTP apps; default: the listen host (required when it is a wildcard)'),
          maxHeaderSize: sizeOr('16Ki').describe('largest request head accepted; larger gets 431'),
          headerTimeout: durationOr('30s').describe('a connection must deliver a complete request head within this (else 408), and an idle keep-alive connection is closed after it'),
        })
        .prefault({}),
      admin: z.strictObject({
        listen: listen('127.0.0.1:7070').describe('admin API and /metrics'),
        token: z.string().min(8, 'the admin token must be at least 8 characters').describe('bearer token for the admin API'),
      }),
      addresses: z.union([cidr, z.array(cidr).min(1)]).optional()
        .transform((v) => (v === undefined ? [] : Array.isArray(v) ? v : [v]))
        .describe('pool of addresses for apps with raw TCP ports'),
      connectTimeout: durationOr('10s').describe('connecting to a running app\'s endpoint; HTTP clients get 502 after it'),
      hold: z
        .strictObject({
          timeout: durationOr('30s').describe('how long a client is held while its app wakes'),
          queue: z.number().int().min(1).default(1000).describe('most clients held at once per app; more get 503'),
        })
        .prefault({}),
    }),
    store: storeSchema.prefault({ kind: 'fs' }),
    worker: z
      .strictObject({
        runtime: z.enum(['process', 'oci']).default('process')
          .describe('process: starts the app\'s command (a cold start: memory is lost on swap-out); oci: runc containers checkpointed and restored with CRIU'),
        listen: listen('127.0.0.1:7401')
          .describe('`picocenter worker`: the address its agent serves the worker protocol on (--listen overrides)'),
        token: z.string().min(8, 'the worker token must be at least 8 characters').optional()
          .describe('`picocenter worker`: bearer token the gateway must present; required to run `picocenter worker`'),
        dataDir: z.string().min(1).default('./data/worker')
          .describe('the worker\'s own files (app logs, oci container state), relative to the config file'),
        readyTimeout: durationOr('30s').describe('how long an app may take until its ports accept connections'),
        shutdown: z.enum(['stop', 'checkpoint']).default('stop')
          .describe('what SIGTERM does to running apps: stop them, or checkpoint them (oci) so they wake with their memory'),
        cache: z
          .strictObject({
            memory: sizeOr('256Mi').describe('image chunks kept in memory for lazy restores (least recently used go first); 0 = none'),
            disk: sizeOr('0').describe('more chunks on disk below `path`; 0 = no disk tier'),
            path: z.string().min(1).default('./data/cache').describe('directory of the disk tier, relative to the config file'),
          })
          .prefault({})
          .describe('oci: the worker\'s cache of image chunks; a wake prefers the worker that caches most of the app'),
        favorDynmods: z.boolean().default(true)
          .describe('oci: remount the host\'s cgroup2 with favordynmods at start (a host-wide setting until reboot): every restore moves a process into new cgroups, which otherwise waits for an RCU grace period (6-16 ms measured)'),
        rcuExpedited: z.boolean().default(true)
          .describe('oci: set the kernel\'s rcu_expedited at start (a host-wide setting until reboot; each RCU grace period then interrupts every CPU): CRIU waits for grace periods in every restore (30-40 ms measured in all)'),
      })
      .prefault({}),
    apps: z.array(appSchema).default([]),
    workers: z.array(remoteWorkerSchema).default([])
      .describe('remote workers (`picocenter worker` processes) the gateway places apps on, besides or instead of its embedded one'),
  })
  .superRefine((cfg, ctx) => {
    const names = new Map<string, number>();
    const domains = new Map<string, number>();
    const ports = new Map<number, number>();
    cfg.apps.forEach((app, i) => {
      if (names.has(app.name)) {
        ctx.addIssue({ code: 'custom', path: ['apps', i, 'name'], message: `duplicate app name "${app.name}" (also apps[${names.get(app.name)}])` });
      }
      names.set(app.name, i);
      app.domains.forEach((d, j) => {
        if (domains.has(d)) {
          ctx.addIssue({ code: 'custom', path: ['apps', i, 'domains', j], message: `domain "${d}" already belongs to apps[${domains.get(d)}]` });
        }
        domains.set(d, i);
        if (!cfg.gateway.dns.zones.some((z) => d === z || d.endsWith(`.${z}`))) {
          ctx.addIssue({ code: 'custom', path: ['apps', i, 'domains', j], message: `domain "${d}" is not inside any of gateway.dns.zones` });
        }
      });
      if (app.memory !== undefined && cfg.worker.runtime !== 'oci') {
        ctx.addIssue({ code: 'custom', path: ['apps', i, 'memory'], message: 'memory limits need worker.runtime: oci' });
      }
      for (const key of ['rootfs', 'bundle'] as const) {
        if (app[key] !== undefined && cfg.worker.runtime !== 'oci') {
          ctx.addIssue({ code: 'custom', path: ['apps', i, key], message: `${key} needs worker.runtime: oci` });
        }
      }
      if (app.rootfs !== undefined && app.bundle !== undefined) {
        ctx.addIssue({ code: 'custom', path: ['apps', i, 'bundle'], message: 'give either rootfs or bundle, not both' });
      }
      if (!app.http && !app.tcp) {
        ctx.addIssue({ code: 'custom', path: ['apps', i], message: 'an app needs `http` or `tcp` ports, or no traffic can reach it' });
      }
      if (app.tcp && cfg.gateway.addresses.length === 0 && app.address === undefined) {
        ctx.addIssue({ code: 'custom', path: ['apps', i, 'tcp'], message: 'apps with tcp ports need gateway.addresses (a pool) or their own address' });
      }
      // The process runtime runs every app in the host's network namespace.
      if (cfg.worker.runtime === 'process') {
        for (const p of [...(app.http ? [app.http.port] : []), ...(app.tcp ?? [])]) {
          if (ports.has(p) && ports.get(p) !== i) {
            ctx.addIssue({ code: 'custom', path: ['apps', i], message: `port ${p} is also used by apps[${ports.get(p)}]; the process runtime shares the host's ports` });
          }
          ports.set(p, i);
        }
      }
    });
  })
  .superRefine(checkWorkers);

export type Config = z.output<typeof configSchema>;
export type AppConfig = Config['apps'][number];

export interface ConfigIssue {
  path: string;
  line?: number;
  message: string;
}

function formatPath(p: ReadonlyArray<PropertyKey>): string {
  let out = '';
  for (const k of p) out += typeof k === 'number' ? `[${k}]` : out ? `.${String(k)}` : String(k);
  return out || '(root)';
}

/** Line (1-based) of the deepest node of `doc` on `p` that exists. */
function lineOf(doc: Document, lines: LineCounter, p: ReadonlyArray<PropertyKey>): number | undefined {
  for (let n = p.length; n >= 0; n--) {
    const node = doc.getIn(p.slice(0, n) as unknown[], true);
    if (isNode(node) && node.range) return lines.linePos(node.range[0]).line;
    // For an unknown key, point at the key itself rather than its parent.
  }
  return undefined;
}

function keyLine(doc: Document, lines: LineCounter, parent: ReadonlyArray<PropertyKey>, key: string): number | undefined {
  const node = doc.getIn(parent as unknown[], true);
  if (node && typeof node === 'object' && 'items' in node && Array.isArray((node as { items: unknown[] }).items)) {
    for (const item of (node as { items: Array<{ key?: unknown }> }).items) {
      const k = item.key;
      if (isNode(k) && 'value' in k && (k as { value: unknown }).value === key && k.range) {
        return lines.linePos(k.range[0]).line;
      }
    }
  }
  return lineOf(doc, lines, parent);
}

/** Throws PICO_ERR_CONFIG listing every problem as `file:line: key.path: message`. */
export function parseConfig(text: string, file: string, baseDir = path.dirname(path.resolve(file))): Readonly<Config> {
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, uniqueKeys: true, prettyErrors: false });
  if (doc.errors.length > 0) {
    const msgs = doc.errors.map((e) => {
      const line = e.linePos?.[0]?.line ?? lines.linePos(e.pos[0]).line;
      return `${file}:${line}: ${e.message.split('\n')[0]}`;
    });
    throw new PicoError('PICO_ERR_CONFIG', `invalid config:\n  ${msgs.join('\n  ')}`);
  }
  const raw = doc.toJS() ?? {};
  const result = configSchema.safeParse(raw);
  if (!result.success) {
    const issues: ConfigIssue[] = [];
    for (const issue of result.error.issues) {
      if (issue.code === 'unrecognized_keys') {
        for (const key of issue.keys) {
          issues.push({ path: formatPath([...issue.path, key]), line: keyLine(doc, lines, issue.path, key), message: 'unknown key' });
        }
      } else {
        issues.push({ path: formatPath(issue.path), line: lineOf(doc, lines, issue.path), message: issue.message });
      }
    }
    throw new ConfigError(file, issues);
  }
  return deepFreeze(resolvePaths(result.data, baseDir));
}

export class ConfigError extends PicoError {
  readonly issues: ConfigIssue[];
  constructor(file: string, issues: ConfigIssue[]) {
    const lines = issues.map((i) => `${file}${i.line ? `:${i.line}` : ''}: ${i.path}: ${i.message}`);
    super('PICO_ERR_CONFIG', `invalid config:\n  ${lines.join('\n  ')}`);
    this.issues = issues;
  }
}

export function loadConfig(file: string): Readonly<Config> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new PicoError('PICO_ERR_CONFIG', `cannot read config file ${file}: ${(err as Error).message}`, { cause: err });
  }
  return parseConfig(text, file);
}

function resolvePaths(cfg: Config, baseDir: string): Config {
  return {
    ...cfg,
    store: cfg.store.kind === 'fs' ? { ...cfg.store, path: path.resolve(baseDir, cfg.store.path) } : cfg.store,
    worker: {
      ...cfg.worker,
      dataDir: path.resolve(baseDir, cfg.worker.dataDir),
      cache: { ...cfg.worker.cache, path: path.resolve(baseDir, cfg.worker.cache.path) },
    },
    apps: cfg.apps.map((a) => ({
      ...a,
      cwd: path.resolve(baseDir, a.cwd ?? '.'),
      ...(a.rootfs !== undefined ? { rootfs: path.resolve(baseDir, a.rootfs) } : {}),
      ...(a.bundle !== undefined ? { bundle: path.resolve(baseDir, a.bundle) } : {}),
    })),
  };
}

function deepFreeze<T>(value: T): T {
  if (value && typeof value === 'object' && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const v of Object.values(value)) deepFreeze(v);
  }
  return value;
}

/** The JSON Schema of the config file, generated from the same zod schema. */
export function configJsonSchema(): unknown {
  return z.toJSONSchema(configSchema, { io: 'input', unrepresentable: 'any' });
}
