import path from 'node:path';
import { isExecutable, run, which } from './exec.js';

/** Where scripts/install-oci.sh puts its files unless PICO_OCI_ROOT says otherwise. */
export const DEFAULT_OCI_ROOT = '/opt/picocenter';

/** Where a criu binary was found: PICO_CRIU, scripts/install-oci.sh's wrapper, or PATH. */
export type CriuSource = 'PICO_CRIU' | 'install-oci' | 'PATH';

export interface CriuCandidate {
  path: string;
  source: CriuSource;
}

/** The wrapper scripts/install-oci.sh writes: the one path runc is told with `--criu`. */
export function installedCriuPath(env: NodeJS.ProcessEnv = process.env): string {
  return path.join(env.PICO_OCI_ROOT || DEFAULT_OCI_ROOT, 'bin', 'criu');
}

/**
 * The criu binaries to try, best first. PICO_CRIU, when set, is the only candidate: an operator
 * who names a criu must get that one or a clear error, never a silent substitute.
 */
export function criuCandidates(env: NodeJS.ProcessEnv = process.env): CriuCandidate[] {
  if (env.PICO_CRIU) return [{ path: env.PICO_CRIU, source: 'PICO_CRIU' }];
  const out: CriuCandidate[] = [];
  const wrapper = installedCriuPath(env);
  if (isExecutable(wrapper)) out.push({ path: wrapper, source: 'install-oci' });
  const onPath = which('criu');
  if (onPath && onPath !== wrapper) out.push({ path: onPath, source: 'PATH' });
  return out;
}

/** "4.2.1" from `criu --version`, or null when it does not run. */
export async function criuVersion(criu: string): Promise<string | null> {
  const r = await run(criu, ['--version'], { timeoutMs: 10_000 });
  return /^Version:\s*(\S+)/m.exec(r.stdout)?.[1] ?? null;
}

export interface CriuCheck {
  ok: boolean;
  /** what criu printed, less the noise lines (see isNoise) */
  output: string;
  /** the first real error criu reported, without its source location; null when none */
  error: string | null;
}

/**
 * `criu check`, or `criu check --feature NAME`. A feature check exits 0 only when the feature is
 * supported (an unknown feature name is an error, so a typo cannot pass).
 */
export async function criuCheck(criu: string, feature?: string): Promise<CriuCheck> {
  const r = await run(criu, feature ? ['check', '--feature', feature] : ['check'], { timeoutMs: 30_000 });
  const lines = `${r.stdout}\n${r.stderr}`.split('\n').filter((l) => l.trim() && !isNoise(l));
  const errorLine = lines.find((l) => /^Error\b/.test(l));
  const error = errorLine
    ? errorLine.replace(/^Error\s*\([^)]*\):\s*/, '')
    : r.error?.message ?? (r.code !== 0 ? lines.at(-1) ?? `exit ${r.code ?? r.signal}` : null);
  return { ok: r.code === 0 && !r.error, output: lines.join('\n'), error: r.code === 0 ? null : error };
}

/**
 * Lines every criu run prints on these hosts that say nothing about the outcome: the RLIMIT_NOFILE
 * error (criu cannot raise its own limit without CAP_SYS_RESOURCE; harmless), the kerndat cache
 * warning (/run is not a tmpfs) and the hardware-breakpoint probe of a VM.
 */
export function isNoise(line: string): boolean {
  return /RLIMIT_NOFILE|keep kdat cache|Hardware breakpoints/.test(line);
}

/** Numeric comparison of dotted versions ("4.2.1" vs "4.10"); non-numeric parts count as 0. */
export function compareVersions(a: string, b: string): number {
  const pa = a.split(/[.+~-]/).map((x) => Number.parseInt(x, 10) || 0);
  const pb = b.split(/[.+~-]/).map((x) => Number.parseInt(x, 10) || 0);
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0);
    if (d !== 0) return Math.sign(d);
  }
  return 0;
}
