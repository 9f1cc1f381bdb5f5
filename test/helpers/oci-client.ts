import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import type { Endpoint } from '../../shared/protocol.js';
import { run } from '../../worker/oci/exec.js';

/*
 * Talking to test apps inside oci containers. Every request first checks that the address is
 * routed over one of our container veths, so a test never sends traffic anywhere else.
 */

export async function assertRouted(ep: Endpoint): Promise<void> {
  const r = await run('ip', ['-json', 'route', 'get', ep.host], { timeoutMs: 5000 });
  const routes = JSON.parse(r.stdout || '[]') as { dev?: string }[];
  assert.ok(routes.length > 0 && routes.every((x) => x.dev?.startsWith('pico')), `${ep.host} is not routed over a container veth: refusing to send`);
}

export async function request(ep: Endpoint, method: string, pathname: string): Promise<{ status: number; body: string }> {
  await assertRouted(ep);
  return new Promise((resolve, reject) => {
    const req = http.request({ host: ep.host, port: ep.port, method, path: pathname, agent: false, headers: { connection: 'close' }, timeout: 10_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${pathname}: no answer in 10 s`)));
    req.on('error', reject);
    req.end();
  });
}

/** The counter fixture's answer to GET /state (test/fixtures/oci/counter.mjs). */
export interface CounterState {
  count: number;
  bootId: string;
  pid: number;
  ticks: number;
  app: string;
}

/** The counter fixture's own view of its state. */
export async function state(ep: Endpoint): Promise<CounterState> {
  const r = await request(ep, 'GET', '/state');
  assert.equal(r.status, 200, r.body);
  return JSON.parse(r.body);
}

export async function inc(ep: Endpoint): Promise<{ count: number }> {
  const r = await request(ep, 'POST', '/inc');
  assert.equal(r.status, 200, r.body);
  return JSON.parse(r.body);
}

/** The fixture checks its own memory; `200 ok` when it is intact. */
export async function verify(ep: Endpoint): Promise<string> {
  const r = await request(ep, 'GET', '/verify');
  return `${r.status} ${r.body}`;
}

/** The memory limit (bytes) of the cgroup `pid` is in, v1 or v2. */
export function memoryLimit(pid: number): number {
  const lines = readFileSync(`/proc/${pid}/cgroup`, 'utf8').trim().split('\n');
  const v1 = lines.map((l) => l.split(':')).find(([, ctrl]) => ctrl!.split(',').includes('memory'));
  const file = v1 ? `/sys/fs/cgroup/memory${v1[2]}/memory.limit_in_bytes` : `/sys/fs/cgroup${lines.find((l) => l.startsWith('0::'))!.slice(3)}/memory.max`;
  return Number(readFileSync(file, 'utf8').trim());
}
