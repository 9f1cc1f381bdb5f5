import { z } from 'zod';
import { RESTORE_MODES, type WorkerEvent, type WorkerRequest, type WorkerResponse } from './protocol.js';

/*
 * The HTTP transport of the worker protocol (version 1), spoken between a remote worker's agent
 * (worker/agent-server.ts) and the gateway's client (gateway/remote-worker.ts). Both sides
 * import this file, so the routes, limits and the shape of every message have one definition.
 *
 *   POST /v1/call     body: one WorkerRequest (JSON)       200: one WorkerResponse (JSON)
 *                     400 PICO_ERR_BAD_REQUEST: not JSON, wrong shape, or over MAX_BODY_BYTES
 *   GET  /v1/events?instance=I&after=N                     200: a never-ending stream of lines:
 *                       {"hello":{"worker":ID,"instance":I,"seq":N}}   first line, once
 *                       {"seq":N,"event":WorkerEvent}                  each event, N increasing
 *                       (empty line)                                   heartbeat, every HEARTBEAT_MS
 *   GET  /healthz     liveness, no token
 *
 * Every route but /healthz needs `Authorization: Bearer TOKEN` (else 401). Errors are
 * `{"error":{"code":"PICO_ERR_…","message":"…"}}`.
 *
 * Events survive a reconnect: the agent keeps its last EVENT_BUFFER events, numbered within its
 * `instance` (one per agent process). A client reconnecting with the instance and the last seq
 * it saw gets what it missed; a client that saw another instance (the worker restarted) gets
 * everything buffered. An event may thus arrive twice; placement handles each idempotently.
 */

export const CALL_PATH = '/v1/call';
export const EVENTS_PATH = '/v1/events';
/** in bytes: the largest request or response body either side accepts (an AppSpec is ~1 KiB) */
export const MAX_BODY_BYTES = 1024 * 1024;
/** in bytes: a `logs` answer may carry up to 16 MiB of text (the admin API's cap) plus framing */
export const MAX_RESPONSE_BYTES = 20 * 1024 * 1024;
/** in ms: the agent writes an empty line this often; a client that hears nothing for 3× reconnects */
export const HEARTBEAT_MS = 5000;
/** events the agent keeps for replay to a reconnecting client */
export const EVENT_BUFFER = 1000;

const name = z.string().min(1).max(253);
const endpoint = z.object({ host: z.string().min(1), port: z.number().int().min(1).max(65535) });
const endpoints = z.record(z.string().regex(/^\d+$/), endpoint);

const appSpec = z.object({
  name,
  command: z.array(z.string()).min(1),
  cwd: z.string(),
  env: z.record(z.string(), z.string()),
  ports: z.array(z.number().int().min(1).max(65535)),
  readyTimeoutMs: z.number().int().min(0),
  memoryLimit: z.number().int().min(0).optional(),
  rootfs: z.string().optional(),
  bundle: z.string().optional(),
  restore: z.enum(RESTORE_MODES).optional(),
});

// z.object (not strict): a newer peer's extra optional fields are dropped, not refused.
const requestSchema = z.discriminatedUnion('type', [
  z.object({ v: z.literal(1), type: z.literal('start'), app: appSpec }),
  z.object({ v: z.literal(1), type: z.literal('restore'), app: appSpec, generation: z.number().int().min(0).optional() }),
  z.object({ v: z.literal(1), type: z.literal('checkpoint'), app: name }),
  z.object({ v: z.literal(1), type: z.literal('stop'), app: name }),
  z.object({ v: z.literal(1), type: z.literal('list') }),
  z.object({ v: z.literal(1), type: z.literal('logs'), app: name, bytes: z.number().int().min(0) }),
  z.object({ v: z.literal(1), type: z.literal('cached'), apps: z.array(name).max(10_000) }),
  z.object({ v: z.literal(1), type: z.literal('served'), app: name }),
]);

const responseSchema = z.discriminatedUnion('type', [
  z.object({ v: z.literal(1), type: z.literal('running'), app: name, endpoints, restored: z.boolean() }),
  z.object({ v: z.literal(1), type: z.literal('checkpointed'), app: name, generation: z.number().int().nullable() }),
  z.object({ v: z.literal(1), type: z.literal('stopped'), app: name }),
  z.object({
    v: z.literal(1),
    type: z.literal('list'),
    containers: z.array(z.object({ app: name, endpoints, pid: z.number().int().optional(), startedAt: z.string() })),
    images: z.array(z.object({ app: name, generation: z.number().int() })),
  }),
  z.object({ v: z.literal(1), type: z.literal('logs'), app: name, text: z.string() }),
  z.object({ v: z.literal(1), type: z.literal('cached'), bytes: z.record(z.string(), z.number().min(0)) }),
  z.object({ v: z.literal(1), type: z.literal('noted'), app: name }),
  z.object({ v: z.literal(1), type: z.literal('error'), code: z.string(), message: z.string() }),
]);

const eventSchema = z.discriminatedUnion('type', [
  z.object({
    v: z.literal(1),
    type: z.literal('exited'),
    app: name,
    code: z.number().int().nullable(),
    signal: z.string().nullable(),
    error: z.object({ code: z.string(), message: z.string() }).optional(),
  }),
  z.object({ v: z.literal(1), type: z.literal('checkpointed'), app: name, generation: z.number().int().nullable() }),
]);

const frameSchema = z.union([
  z.object({ hello: z.object({ worker: z.string(), instance: z.string().min(1), seq: z.number().int().min(0) }) }),
  z.object({ seq: z.number().int().min(1), event: eventSchema }),
]);

export type EventFrame = { hello: { worker: string; instance: string; seq: number } } | { seq: number; event: WorkerEvent };

// The schemas and the protocol's types must describe the same messages (checked at compile time).
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
const sameShapes: [
  Same<z.output<typeof requestSchema>, WorkerRequest>,
  Same<z.output<typeof responseSchema>, WorkerResponse>,
  Same<z.output<typeof eventSchema>, WorkerEvent>,
] = [true, true, true];
void sameShapes;

/** The parsed message, or a one-line reason it is not one. */
export type Checked<T> = { ok: true; value: T } | { ok: false; reason: string };

function check<T>(schema: z.ZodType<T>, value: unknown): Checked<T> {
  const r = schema.safeParse(value);
  if (r.success) return { ok: true, value: r.data };
  const first = r.error.issues[0];
  const where = first && first.path.length > 0 ? `${first.path.join('.')}: ` : '';
  return { ok: false, reason: `${where}${first?.message ?? 'invalid'}` };
}

export const checkRequest = (v: unknown): Checked<WorkerRequest> => check(requestSchema, v);
export const checkResponse = (v: unknown): Checked<WorkerResponse> => check(responseSchema, v);
export const checkFrame = (v: unknown): Checked<EventFrame> => check(frameSchema, v) as Checked<EventFrame>;
