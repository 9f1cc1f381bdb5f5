import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { silentLogger } from '../shared/log.js';
import { criuVersion } from '../worker/oci/criu.js';
import { criuForRunc } from '../worker/oci/criu-runc.js';
import { ociTestHost } from './helpers/oci-host.js';

/*
 * The criu runc runs (worker/oci/criu-runc.ts): it answers runc's version request with the real
 * CRIU's recorded reply, and hands every other request and command to CRIU untouched. The real
 * CRIU behind a wrapper that counts its runs; requests sent over a SOCK_SEQPACKET socketpair as
 * runc sends them (by a perl client: Node has no socketpair).
 */
const { host, skip } = await ociTestHost();
const noPerl = existsSync('/usr/bin/perl') ? false : 'needs /usr/bin/perl (Debian: perl-base, always installed)';

const work = mkdtempSync(path.join(tmpdir(), 'pico-criu-runc-'));
after(() => rmSync(work, { recursive: true, force: true }));
const runs = path.join(work, 'runs.log');

/** criu_req as runc sends them (rpc.proto: type = 1; features = 5 { lazy_pages = 2 }). */
const VERSION = '080a';
const FEATURE_CHECK_LAZY_PAGES = '08092a021001';

/** Sends one request (hex) to `criu swrk FD` as runc does, on descriptor `fd`; the reply, in hex. */
function ask(criu: string, request: string, fd = 9): string {
  const client = `
    use Socket; use POSIX qw(dup2);
    my ($criu, $request, $fd) = @ARGV;
    socketpair(my $a, my $b, AF_UNIX, SOCK_SEQPACKET, 0) or die "socketpair: $!";
    my $pid = fork() // die "fork: $!";
    if (!$pid) { close $a; dup2(fileno($b), $fd); open(my $f, '+<&=', $fd); fcntl($f, 2, 0); exec($criu, 'swrk', $fd) or POSIX::_exit(127) }
    close $b;
    send($a, pack('H*', $request), 0) // die "send: $!";
    defined recv($a, my $reply, 65536, 0) or die "recv: $!";
    waitpid($pid, 0);
    print unpack('H*', $reply);`;
  const r = spawnSync('/usr/bin/perl', ['-e', client, criu, request, String(fd)], { encoding: 'utf8', timeout: 20_000 });
  assert.equal(r.status, 0, r.stderr);
  return r.stdout;
}

/** The swrk runs the counting wrapper saw. */
function swrkRuns(): number {
  return existsSync(runs) ? readFileSync(runs, 'utf8').split('\n').filter((l) => l.startsWith('swrk')).length : 0;
}

/** Protobuf varint fields of `msg` by number (the small messages here only). */
function fields(msg: Buffer): Map<number, number | Buffer> {
  const out = new Map<number, number | Buffer>();
  let at = 0;
  const varint = (): number => {
    let v = 0;
    for (let shift = 0; ; shift += 7) {
      const b = msg[at++]!;
      v += (b & 0x7f) * 2 ** shift;
      if (b < 0x80) return v;
    }
  };
  while (at < msg.length) {
    const key = varint();
    if ((key & 7) === 0) out.set(key >> 3, varint());
    else if ((key & 7) === 2) {
      const len = varint();
      out.set(key >> 3, msg.subarray(at, at + len));
      at += len;
    } else throw new Error(`unexpected wire type ${key & 7}`);
  }
  return out;
}

describe('the criu runc runs', { skip: skip || noPerl }, () => {
  let counting: string;
  let shim: string;
  before(async () => {
    counting = path.join(work, 'criu');
    writeFileSync(counting, `#!/bin/sh\necho "$*" >> ${runs}\nexec ${host!.criu!.path} "$@"\n`, { mode: 0o755 });
    shim = await criuForRunc(counting, work, silentLogger());
  });

  it('records CRIU\'s own version reply', async () => {
    assert.equal(shim, path.join(work, 'criu-runc'));
    assert.equal(swrkRuns(), 1, 'CRIU was asked once');
    const reply = fields(readFileSync(path.join(work, 'criu-runc.version')));
    assert.equal(reply.get(1), 10, 'a VERSION reply');
    assert.equal(reply.get(2), 1, 'success');
    const v = fields(reply.get(10) as Buffer);
    assert.equal(`${v.get(1)}.${v.get(2)}${v.has(4) ? `.${v.get(4)}` : ''}`, await criuVersion(host!.criu!.path));
  });

  it('answers a version request itself, as CRIU does (runc asks it on a descriptor other than 3)', () => {
    const before = swrkRuns();
    const ours = ask(shim, VERSION);
    assert.equal(swrkRuns(), before, 'CRIU did not run');
    assert.equal(ours, ask(counting, VERSION), 'the same bytes as CRIU\'s reply');
  });

  it('hands any other request to CRIU, on the same socket', () => {
    const before = swrkRuns();
    const reply = ask(shim, FEATURE_CHECK_LAZY_PAGES);
    assert.equal(swrkRuns(), before + 1, 'CRIU ran');
    assert.equal(reply, ask(counting, FEATURE_CHECK_LAZY_PAGES));
    const r = fields(Buffer.from(reply, 'hex'));
    assert.equal(r.get(1), 9, 'a FEATURE_CHECK reply');
    assert.equal(r.get(2), 1);
  });

  it('hands runc\'s own requests (descriptor 3) straight to CRIU', () => {
    const before = swrkRuns();
    assert.equal(ask(shim, VERSION, 3), ask(counting, VERSION, 3));
    assert.equal(swrkRuns(), before + 2, 'CRIU answered both');
  });

  it('hands other commands to CRIU', () => {
    const r = spawnSync(shim, ['--version'], { encoding: 'utf8' });
    assert.equal(r.status, 0);
    assert.match(r.stdout, /^Version: /m);
    assert.match(readFileSync(runs, 'utf8'), /^--version$/m);
  });

  it('is CRIU itself when CRIU does not answer its version', async () => {
    const mute = path.join(work, 'mute-criu');
    writeFileSync(mute, '#!/bin/sh\nexit 1\n', { mode: 0o755 });
    const dir = mkdtempSync(path.join(work, 'mute-'));
    assert.equal(await criuForRunc(mute, dir, silentLogger()), mute);
  });
});
