import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseConfig } from '../shared/config.js';

const BASE = `
gateway:
  dns: { zones: [apps.test] }
  admin: { token: secret-token }
`;

function issuesOf(text: string): string {
  try {
    parseConfig(text, 'bad.yaml', '/tmp');
  } catch (err) {
    return (err as Error).message;
  }
  assert.fail('config was accepted');
}

describe('config: workers', () => {
  it('defaults: the embedded worker only; the agent on 127.0.0.1:7401 without a token', () => {
    const cfg = parseConfig(BASE, 'min.yaml', '/srv');
    assert.equal(cfg.gateway.embeddedWorker, true);
    assert.deepEqual(cfg.workers, []);
    assert.deepEqual(cfg.worker.listen, { host: '127.0.0.1', port: 7401 });
    assert.equal(cfg.worker.token, undefined);
  });

  it('remote workers with their timeouts', () => {
    const cfg = parseConfig(
      `${BASE}worker: { listen: 0.0.0.0:7500, token: agent-token }
workers:
  - { id: w2, url: "http://10.0.0.7:7401", token: agent-token }
  - { id: w3, url: "https://w3.example:7401", token: agent-token, operationTimeout: 30m, queryTimeout: 2s }
`,
      'w.yaml',
    );
    assert.deepEqual(cfg.worker.listen, { host: '0.0.0.0', port: 7500 });
    assert.equal(cfg.workers[0]!.operationTimeout, 10 * 60_000);
    assert.equal(cfg.workers[0]!.queryTimeout, 10_000);
    assert.equal(cfg.workers[1]!.operationTimeout, 30 * 60_000);
    assert.equal(cfg.workers[1]!.queryTimeout, 2000);
  });

  it('rejects no worker at all, duplicate ids, bad urls and short tokens', () => {
    assert.match(issuesOf(`${BASE}  embeddedWorker: false\n`), /bad\.yaml:\d+: gateway\.embeddedWorker: no worker/);
    const msg = issuesOf(`${BASE}workers:
  - { id: local, url: "http://a:1", token: agent-token }
  - { id: w2, url: "http://b:1", token: agent-token }
  - { id: w2, url: "ftp://c:1", token: short }
`);
    assert.match(msg, /workers\[0\]\.id: duplicate worker id "local" \(the embedded worker is "local"\)/);
    assert.match(msg, /workers\[2\]\.id: duplicate worker id "w2" \(also workers\[1\]\)/);
    assert.match(msg, /workers\[2\]\.url: /);
    assert.match(msg, /workers\[2\]\.token: .*at least 8/);
  });
});
