import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Logger } from '../../shared/log.js';
import { isExecutable, run } from './exec.js';

/** criu-runc.pl, beside this module's source (dist/worker/oci → worker/oci). */
const SCRIPT = fileURLToPath(new URL('../../../worker/oci/criu-runc.pl', import.meta.url));
const PERL = '/usr/bin/perl';

/**
 * The criu to give runc (`--criu`): a shim in `dir` in front of `criu` that answers runc's
 * version request itself, with `criu`'s own recorded reply (criu-runc.pl says why), or `criu`
 * itself when the shim cannot be had (no perl, or `criu` did not answer its version): slower by
 * one CRIU start per checkpoint and restore, never wrong. The reply is recorded afresh here, so
 * a worker started after CRIU changed never gives runc an old version.
 */
export async function criuForRunc(criu: string, dir: string, log: Logger): Promise<string> {
  if (!isExecutable(PERL)) {
    log.warn(`no ${PERL}: runc starts CRIU once more per checkpoint and restore to ask its version`);
    return criu;
  }
  const shim = path.join(dir, 'criu-runc');
  const answer = path.join(dir, 'criu-runc.version');
  const tmp = `${shim}.tmp${process.pid}`;
  const head = `#!${PERL}\n# Written by the picocenter worker (worker/oci/criu-runc.ts).\nour ($CRIU, $ANSWER) = (${perlString(criu)}, ${perlString(answer)});\n`;
  writeFileSync(tmp, head + readFileSync(SCRIPT, 'utf8'), { mode: 0o755 });
  renameSync(tmp, shim); // a runc running now sees the old shim or this one, never half
  const r = await run(shim, ['--pico-record'], { timeoutMs: 10_000 });
  if (r.code !== 0) {
    log.warn({ criu, err: r.stderr.trim() || r.error?.message || `exit ${r.code ?? r.signal}` }, 'cannot record CRIU\'s version for runc: runc asks CRIU itself');
    return criu;
  }
  return shim;
}

/** `s` as a Perl single-quoted string. */
function perlString(s: string): string {
  return `'${s.replace(/[\\']/g, (c) => `\\${c}`)}'`;
}
