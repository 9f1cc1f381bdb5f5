import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, it } from 'node:test';
import { configJsonSchema, loadConfig, parseConfig, ConfigError } from '../shared/config.js';
import { isPicoError } from '../shared/errors.js';
import { parseDuration, parseSize } from '../shared/units.js';
import { repoFile } from './helpers/paths.js';

const MINIMAL = `
gateway:
  dns: { zones: [apps.test] }
  admin: { token: secret-token }
apps:
  - name: web
    domains: [web.apps.test]
    command: [node, server.js]
    http: { port: 9001 }
`;

function issuesOf(text: string): string {
  try {
    parseConfig(text, 'bad.yaml', '/tmp');
  } catch (err) {
    assert.ok(isPicoError(err, 'PICO_ERR_CONFIG'), `expected a config error, got ${String(err)}`);
    return (err as Error).message;
  }
  assert.fail('config was accepted');
}

describe('config', () => {
  it('loads the quick-start config with the documented meaning', () => {
    const cfg = loadConfig(repoFile('picocenter.yaml'));
    assert.deepEqual(cfg.gateway.dns.listen, { host: '127.0.0.1', port: 5353 });
    assert.deepEqual(cfg.gateway.dns.zones, ['apps.test']);
    assert.equal(cfg.gateway.dns.ttl, 5000);
    assert.deepEqual(cfg.gateway.addresses, ['127.0.1.0/24']);
    assert.equal(cfg.store.kind, 'fs');
    assert.equal(cfg.store.kind === 'fs' && cfg.store.path, repoFile('data/store'));
    assert.equal(cfg.worker.runtime, 'process');
    const [hello, echo] = cfg.apps;
    assert.equal(hello?.http?.port, 9001);
    assert.equal(hello?.idle, 30_000);
    assert.deepEqual(echo?.tcp, [7000]);
    assert.equal(echo?.idle, 60_000);
    assert.equal(hello?.cwd, repoFile('.'));
  });

  it('fills defaults and freezes the result', () => {
    const cfg = parseConfig(MINIMAL, 'min.yaml', '/srv');
    assert.deepEqual(cfg.gateway.http.listen, { host: '127.0.0.1', port: 8080 });
    assert.equal(cfg.gateway.http.maxHeaderSize, 16 * 1024);
    assert.equal(cfg.gateway.hold.timeout, 30_000);
    assert.equal(cfg.gateway.hold.queue, 1000);
    assert.equal(cfg.apps[0]?.idle, 5 * 60_000);
    assert.equal(cfg.store.kind === 'fs' && cfg.store.path, '/srv/data/store');
    assert.ok(Object.isFrozen(cfg) && Object.isFrozen(cfg.apps[0]) && Object.isFrozen(cfg.gateway.dns.zones));
  });

  it('names file, line and key path of an unknown key', () => {
    const msg = issuesOf(MINIMAL.replace('    http: { port: 9001 }', '    http: { port: 9001 }\n    memroy: 256Mi'));
    assert.match(msg, /bad\.yaml:10: apps\[0\]\.memroy: unknown key/);
  });

  it('reports every problem at once, with lines', () => {
    const msg = issuesOf(`
gateway:
  dns: { zones: [apps.test], ttl: soon }
  admin: { token: short }
apps:
  - name: Web
    domains: [web.apps.test]
    command: []
    http: { port: 70000 }
`);
    assert.match(msg, /bad\.yaml:3: gateway\.dns\.ttl: invalid duration "soon"/);
    assert.match(msg, /bad\.yaml:4: gateway\.admin\.token: .*at least 8/);
    assert.match(msg, /bad\.yaml:6: apps\[0\]\.name: /);
    assert.match(msg, /bad\.yaml:8: apps\[0\]\.command: /);
    assert.match(msg, /bad\.yaml:9: apps\[0\]\.http\.port: /);
  });

  it('rejects cross-field mistakes', () => {
    const msg = issuesOf(`
gateway:
  dns: { zones: [apps.test] }
  admin: { token: secret-token }
apps:
  - { name: a, domains: [a.apps.test], command: [x], http: { port: 9001 } }
  - { name: a, domains: [a.apps.test, b.elsewhere.org], command: [x], http: { port: 9001 } }
  - { name: c, domains: [c.apps.test], command: [x] }
  - { name: d, domains: [d.apps.test], command: [x], tcp: [22] }
`);
    assert.match(msg, /apps\[1\]\.name: duplicate app name "a"/);
    assert.match(msg, /apps\[1\]\.domains\[0\]: domain "a\.apps\.test" already belongs to apps\[0\]/);
    assert.match(msg, /apps\[1\]\.domains\[1\]: domain "b\.elsewhere\.org" is not inside any of gateway\.dns\.zones/);
    assert.match(msg, /apps\[1\]: port 9001 is also used by apps\[0\]/);
    assert.match(msg, /apps\[2\]: an app needs `http` or `tcp` ports/);
    assert.match(msg, /apps\[3\]\.tcp: apps with tcp ports need gateway\.addresses/);
  });

  it('reports YAML syntax errors with a line and duplicate keys', () => {
    assert.match(issuesOf('gateway:\n  dns: { zones: [apps.test]\n'), /bad\.yaml:\d+: /);
    assert.match(issuesOf('gateway:\n  dns: {}\n  dns: {}\n'), /bad\.yaml:3: .*[Mm]ap keys must be unique/);
  });

  it('rejects a file that is not a mapping, and a missing file', () => {
    assert.match(issuesOf('- just\n- a list\n'), /\(root\)/);
    assert.throws(() => loadConfig('/nonexistent/picocenter.yaml'), /cannot read config file \/nonexistent\/picocenter\.yaml/);
  });

  it('keeps the structured issues on the error', () => {
    try {
      parseConfig(MINIMAL.replace('apps.test] }', 'apps.test], extra: 1 }'), 'x.yaml');
      assert.fail('accepted');
    } catch (err) {
      assert.ok(err instanceof ConfigError);
      assert.deepEqual(err.issues, [{ path: 'gateway.dns.extra', line: 3, message: 'unknown key' }]);
    }
  });

  it('parses durations and sizes', () => {
    assert.equal(parseDuration('500ms'), 500);
    assert.equal(parseDuration('1h30m'), 5_400_000);
    assert.equal(parseDuration('0'), 0);
    assert.equal(parseDuration('5'), undefined);
    assert.equal(parseDuration('s'), undefined);
    assert.equal(parseSize('256Mi'), 256 * 1024 * 1024);
    assert.equal(parseSize('2G'), 2e9);
    assert.equal(parseSize('64k'), 64_000);
    assert.equal(parseSize('12 parsecs'), undefined);
  });

  it('the committed JSON Schema is the one the schema generates', () => {
    const committed = JSON.parse(readFileSync(repoFile('picocenter.schema.json'), 'utf8'));
    assert.deepEqual(committed, JSON.parse(JSON.stringify(configJsonSchema())), 'run `node dist/scripts/gen-schema.js` and commit the result');
  });

  it('every yaml example in the README loads', () => {
    const readme = readFileSync(repoFile('README.md'), 'utf8');
    const blocks = [...readme.matchAll(/```yaml\n([\s\S]*?)```/g)].map((m) => m[1]!);
    assert.ok(blocks.length > 0, 'README has no yaml examples');
    for (const [i, block] of blocks.entries()) {
      assert.doesNotThrow(() => parseConfig(block, `README.md yaml block ${i + 1}`), `README yaml block ${i + 1}`);
    }
  });
});
