import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { compareVersions, criuCandidates } from '../worker/oci/criu.js';
import { checkHost } from '../worker/oci/host-check.js';

const root = process.getuid?.() === 0;
const skip = root ? false : 'needs root: runc and `criu check` only run as root (CI runs as root)';

const dir = mkdtempSync(path.join(tmpdir(), 'pico-oci-host-'));
after(() => rmSync(dir, { recursive: true, force: true }));

/**
 * A stand-in criu that answers `--version` and `check` like a real one would. `failCheck` is
 * printed as CRIU prints errors, after the noise line every run prints here.
 */
function fakeCriu(name: string, version: string, opts: { failCheck?: string; missing?: string[] } = {}): string {
  const file = path.join(dir, name);
  const missing = (opts.missing ?? ['mem_dirty_track']).join('|');
  writeFileSync(
    file,
    `#!/bin/sh
echo 'Error (criu/util.c:1534): rlimit: Can'"'"'t setup RLIMIT_NOFILE for self: Operation not permitted' >&2
case "$1" in
  --version) echo "Version: ${version}" ;;
  check)
    if [ "$2" = --feature ]; then
      case "$3" in ${missing}) echo "Warn  (criu/cr-check.c:1): $3 is not supported" >&2; exit 1 ;; esac
      echo "$3 is supported"; exit 0
    fi
    ${opts.failCheck ? `echo 'Error (criu/vdso.c:42): ${opts.failCheck}' >&2; exit 1` : 'echo "Looks good."'} ;;
esac
`,
  );
  chmodSync(file, 0o755);
  return file;
}

describe('oci host check', { skip }, () => {
  it('finds runc, iptables and a criu that passes `criu check` on this host', async () => {
    const report = await checkHost();
    assert.deepEqual(report.problems, [], report.message);
    assert.equal(report.ok, true);
    assert.match(report.message, /^oci runtime ready: runc \S+, criu \S+ \(/);
    assert.ok(report.criu && report.criu.checkOk);
    assert.equal(report.criu.features.ns_pid, true);
    assert.equal(report.criu.features.external_net_ns, true);
    // DESIGN.md: on these hosts the kernel is >= 6.16, so only criu >= 4.2 dumps TCP sockets.
    if (compareVersions(report.kernel, '6.16') >= 0) assert.ok(compareVersions(report.criu.version!, '4.2') >= 0, report.criu.version!);
    assert.equal(report.lazyPages, true, 'userfaultfd (uffd, uffd-noncoop) works on the project machines');
    assert.ok(report.tools.iptablesRestore && report.tools.ip);
  });

  it('names the criu that fails `criu check`, with CRIU\'s own reason and the fix', async () => {
    const old = fakeCriu('criu-3.17', '3.17.1', { failCheck: 'Unexpected rt vDSO area bounds' });
    const report = await checkHost({ criu: [{ path: old, source: 'PATH' }] });
    assert.equal(report.ok, false);
    assert.equal(report.criu?.checkOk, false);
    assert.match(report.message, /criu 3\.17\.1 at \S+criu-3\.17 fails `criu check`: Unexpected rt vDSO area bounds/);
    assert.match(report.message, /run scripts\/install-oci\.sh/);
    assert.doesNotMatch(report.message, /RLIMIT_NOFILE/);
  });

  it('refuses a criu older than 4.2 on Linux >= 6.16 even though `criu check` passes', async () => {
    const c = fakeCriu('criu-4.1', '4.1.1');
    const report = await checkHost({ criu: [{ path: c, source: 'PATH' }], kernel: '6.18.44-fc' });
    assert.equal(report.ok, false);
    assert.match(report.message, /criu 4\.1\.1 .* passes `criu check` but cannot dump TCP sockets on Linux 6\.18\.44-fc/);
    const older = await checkHost({ criu: [{ path: c, source: 'PATH' }], kernel: '6.1.0-28-amd64' });
    assert.deepEqual(older.problems, [], older.message);
    assert.equal(older.lazyPages, true);
    assert.equal(older.dirtyTracking, false);
  });

  it('reports a missing required feature by name', async () => {
    const c = fakeCriu('criu-nopid', '4.2.1', { missing: ['ns_pid', 'uffd-noncoop'] });
    const report = await checkHost({ criu: [{ path: c, source: 'PATH' }] });
    assert.equal(report.ok, false);
    assert.match(report.message, /lacks `ns_pid`/);
    assert.doesNotMatch(report.message, /uffd/, 'lazy pages are optional: no problem, only lazyPages=false');
  });

  it('takes the first criu that passes, and says nothing of the ones before it', async () => {
    const old = fakeCriu('criu-old', '3.17.1', { failCheck: 'Unexpected rt vDSO area bounds' });
    const good = fakeCriu('criu-good', '4.2.1');
    const report = await checkHost({ criu: [{ path: old, source: 'PATH' }, { path: good, source: 'install-oci' }], kernel: '6.18.0' });
    assert.deepEqual(report.problems, [], report.message);
    assert.equal(report.criu?.path, good);
  });

  it('PICO_CRIU is the only candidate when set, and a wrong one is reported, not replaced', async () => {
    const env = { ...process.env, PICO_CRIU: path.join(dir, 'no-such-criu') };
    assert.deepEqual(criuCandidates(env), [{ path: env.PICO_CRIU, source: 'PICO_CRIU' }]);
    const report = await checkHost({ env });
    assert.equal(report.ok, false);
    assert.match(report.message, /criu at \S+no-such-criu \(PICO_CRIU\) does not run/);
  });
});
