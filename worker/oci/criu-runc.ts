import { mkdirSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Logger } from '../../shared/log.js';
import { isExecutable, run } from './exec.js';

/** criu-runc.pl, beside this module's source (dist/worker/oci → worker/oci). */
const SCRIPT = fileURLToPath(new URL('../../../worker/oci/criu-runc.pl', import.meta.url));
const PERL = '/usr/bin/perl';

/**
 * The criu to give runc (`--criu`): a shell script in `dir` in front of `criu` that has runc's
 * version request answered with `criu`'s own recorded reply (criu-runc.pl says why), or `criu`
 * itself when that cannot be had (no perl, or `criu` did not answer its version): slower by one
 * CRIU start per checkpoint and restore, never wrong. The reply is recorded afresh here, so a
 * worker started after CRIU changed never gives runc an old version.
 *
 * runc (1.1) sends its own requests on descriptor 3 and asks the version (through go-criu) on
 * another one: the script execs CRIU at once for the former and starts perl (~30 ms on a busy
 * host) only for the latter. Perl answers nothing but a version request, so a runc that asks
 * otherwise is only slower, never wrong.
 */
export async function criuForRunc(criu: string, dir: string, log: Logger): Promise<string> {
  if (!isExecutable(PERL)) {
    log.warn(`no ${PERL}: runc starts CRIU once more per checkpoint and restore to ask its version`);
    return criu;
  }
  try {
    return await writeShim(criu, dir);
  } catch (err) {
    log.warn({ criu, err: (err as Error).message }, 'no criu script for runc: runc asks CRIU its version itself');
    return criu;
  }
}

/** Records `criu`'s version reply in `dir`, then writes the script there; its path. */
async function writeShim(criu: string, dir: string): Promise<string> {
  mkdirSync(dir, { recursive: true });
  const answer = path.join(dir, 'criu-runc.version');
  const r = await run(PERL, [SCRIPT, criu, answer, '--pico-record'], { timeoutMs: 10_000 });
  if (r.code !== 0) throw new Error(`recording its version: ${r.stderr.trim() || r.error?.message || `exit ${r.code ?? r.signal}`}`);
  const shim = path.join(dir, 'criu-runc');
  const tmp = `${shim}.tmp${process.pid}`;
  const [c, p, a] = [criu, SCRIPT, answer].map(shellString);
  writeFileSync(
    tmp,
    `#!/bin/sh\n# Written by the picocenter worker (worker/oci/criu-runc.ts): runc's criu.\ncase "$1 $2" in\n  'swrk 3') ;;\n  swrk\\ *) [ $# -eq 2 ] && exec ${PERL} ${p} ${c} ${a} "$@" ;;\nesac\nexec ${c} "$@"\n`,
    { mode: 0o755 },
  );
  renameSync(tmp, shim); // a runc running now sees the old script or this one, never half
  return shim;
}

/** `s` as one single-quoted shell word. */
function shellString(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}
