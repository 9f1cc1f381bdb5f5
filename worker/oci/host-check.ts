import { existsSync } from 'node:fs';
import os from 'node:os';
import { compareVersions, criuCandidates, criuCheck, criuVersion, type CriuCandidate, type CriuSource } from './criu.js';
import { run, which } from './exec.js';

/**
 * Can this host run the `oci` runtime? The worker runs this once at start; a config that asks for
 * `oci` on a host whose report is not `ok` must fail with `message`, never fall back.
 */
export interface HostReport {
  /** runc and CRIU can run, checkpoint and restore containers here (full restore) */
  ok: boolean;
  /** `criu lazy-pages` would work: userfaultfd, including non-cooperative events */
  lazyPages: boolean;
  /** soft-dirty tracking, for incremental dumps; off in VMs like these — dedupe by content */
  dirtyTracking: boolean;
  /**
   * CRIU can lock a container's network with nftables, in-process, instead of spawning
   * iptables-restore and ip6tables-restore at every dump and restore (~100 ms each here)
   */
  nftablesLock: boolean;
  /** /dev/fuse and fusermount3, for the FUSE image directory */
  fuse: boolean;
  root: boolean;
  /** `uname -r` */
  kernel: string;
  runc: { path: string; version: string } | null;
  /** the criu to use; when none passes, the first one found (so its failure can be shown) */
  criu: CriuReport | null;
  tools: { iptablesRestore: string | null; ip: string | null; fusermount3: string | null };
  /** each thing that is missing, in plain English, with what to do about it */
  problems: string[];
  /** one paragraph for a log line or a refused config */
  message: string;
}

export interface CriuReport {
  path: string;
  source: CriuSource;
  version: string | null;
  /** `criu check` passed */
  checkOk: boolean;
  /** what `criu check` printed, less the lines every run prints here */
  checkOutput: string;
  /** feature name → supported, for every feature in FEATURES */
  features: Record<string, boolean>;
  /** why this criu cannot be used; empty when it can */
  problems: string[];
}

/** `criu check --feature` names the runtime asks about, and what each is for. */
export const FEATURES = {
  /** required: restore a tree into the container's own PID namespace */
  ns_pid: 'required',
  /** required: runc keeps the app's network namespace outside the image (it is ours, by path) */
  external_net_ns: 'required',
  /** lazy restore: page faults served over userfaultfd ... */
  uffd: 'lazy',
  /** ... including fork/mremap/unmap events of the restored tree */
  'uffd-noncoop': 'lazy',
  /** informational: incremental dumps by soft-dirty bits */
  mem_dirty_track: 'info',
  /** optional: the network lock by nftables (faster than iptables; see OciRuntimeOptions.networkLock) */
  network_lock_nftables: 'info',
} as const satisfies Record<string, 'required' | 'lazy' | 'info'>;

const MIN_CRIU = '3.17';
const MIN_RUNC = '1.0';
/**
 * criu < 4.2 passes `criu check` on Linux >= 6.16 but cannot dump a TCP socket there
 * (`getsockopt SO_PASSCRED: Operation not supported`), so `criu check` alone is not enough.
 */
const TCP_DUMP_KERNEL = '6.16';
const TCP_DUMP_CRIU = '4.2';
const INSTALL_HINT = 'run scripts/install-oci.sh (as root)';

export interface CheckHostOptions {
  env?: NodeJS.ProcessEnv;
  /** override the candidates (tests); default criuCandidates(env) */
  criu?: CriuCandidate[];
  /** override the kernel release (tests); default os.release() */
  kernel?: string;
}

export async function checkHost(options: CheckHostOptions = {}): Promise<HostReport> {
  const env = options.env ?? process.env;
  const kernel = options.kernel ?? os.release();
  const root = process.getuid?.() === 0;
  const problems: string[] = [];
  if (!root) problems.push(`the worker runs as uid ${process.getuid?.()}; runc and CRIU need root`);

  const tools = { iptablesRestore: which('iptables-restore'), ip: which('ip'), fusermount3: which('fusermount3') };
  if (!tools.iptablesRestore) {
    problems.push(`iptables-restore is missing (CRIU locks a container's network with it while dumping); ${INSTALL_HINT}`);
  }
  if (!tools.ip) problems.push('ip (iproute2) is missing: it makes each app\'s network namespace; apt-get install iproute2');

  const runc = await findRunc();
  if (!runc.report) problems.push(runc.problem);

  const candidates = options.criu ?? criuCandidates(env);
  let criu: CriuReport | null = null;
  if (candidates.length === 0) {
    problems.push(`no criu found (looked at ${describeLookup(env)}); ${INSTALL_HINT}`);
  } else if (!root) {
    problems.push('criu was not checked: `criu check` needs root');
  } else {
    // The first candidate that passes wins; when none does, every candidate's reasons are shown.
    const reports: CriuReport[] = [];
    for (const c of candidates) {
      const r = await examineCriu(c, kernel);
      reports.push(r);
      if (r.problems.length === 0) break;
    }
    criu = reports.find((r) => r.problems.length === 0) ?? reports[0]!;
    if (criu.problems.length > 0) {
      for (const r of reports) problems.push(...r.problems);
      problems.push(`no usable criu; ${INSTALL_HINT}`);
    }
  }

  const features = criu?.problems.length === 0 ? criu.features : {};
  const fuse = existsSync('/dev/fuse') && tools.fusermount3 !== null;
  const report: HostReport = {
    ok: problems.length === 0,
    lazyPages: features.uffd === true && features['uffd-noncoop'] === true,
    dirtyTracking: features.mem_dirty_track === true,
    nftablesLock: features.network_lock_nftables === true,
    fuse,
    root,
    kernel,
    runc: runc.report,
    criu,
    tools,
    problems,
    message: '',
  };
  report.message = report.ok
    ? `oci runtime ready: runc ${report.runc!.version}, criu ${criu!.version} (${criu!.path}); ` +
      `lazy pages ${report.lazyPages ? 'yes' : 'no'}, FUSE ${fuse ? 'yes' : 'no'}, dirty tracking ${report.dirtyTracking ? 'yes' : 'no'}`
    : `the oci runtime cannot run on this host: ${problems.join('; ')}`;
  return report;
}

async function examineCriu(c: CriuCandidate, kernel: string): Promise<CriuReport> {
  const where = `${c.path}${c.source === 'PATH' ? '' : ` (${c.source})`}`;
  const version = await criuVersion(c.path);
  const report: CriuReport = { path: c.path, source: c.source, version, checkOk: false, checkOutput: '', features: {}, problems: [] };
  if (!version) {
    report.problems.push(`criu at ${where} does not run (\`criu --version\` failed)`);
    return report;
  }
  if (compareVersions(version, MIN_CRIU) < 0) {
    report.problems.push(`criu ${version} at ${where} is older than ${MIN_CRIU}`);
    return report;
  }
  const check = await criuCheck(c.path);
  report.checkOk = check.ok;
  report.checkOutput = check.output;
  if (!check.ok) {
    report.problems.push(`criu ${version} at ${where} fails \`criu check\`: ${check.error ?? 'no reason given'}`);
    return report;
  }
  if (compareVersions(kernel, TCP_DUMP_KERNEL) >= 0 && compareVersions(version, TCP_DUMP_CRIU) < 0) {
    report.problems.push(
      `criu ${version} at ${where} passes \`criu check\` but cannot dump TCP sockets on Linux ${kernel} ` +
        `(>= ${TCP_DUMP_KERNEL} needs criu >= ${TCP_DUMP_CRIU})`,
    );
  }
  const names = Object.keys(FEATURES) as (keyof typeof FEATURES)[];
  const results = await Promise.all(names.map((f) => criuCheck(c.path, f)));
  names.forEach((f, i) => {
    const r = results[i]!;
    report.features[f] = r.ok;
    if (!r.ok && FEATURES[f] === 'required') {
      report.problems.push(`criu ${version} at ${where} lacks \`${f}\`: ${r.error ?? 'not supported'}`);
    }
  });
  return report;
}

async function findRunc(): Promise<{ report: HostReport['runc']; problem: string }> {
  const p = which('runc');
  if (!p) return { report: null, problem: `runc is missing; ${INSTALL_HINT}` };
  const r = await run(p, ['--version'], { timeoutMs: 10_000 });
  const version = /^runc version\s+(\S+)/m.exec(r.stdout)?.[1];
  if (!version) return { report: null, problem: `runc at ${p} does not run (\`runc --version\` failed)` };
  if (compareVersions(version, MIN_RUNC) < 0) {
    return { report: null, problem: `runc ${version} at ${p} is older than ${MIN_RUNC} (checkpoint of a container with its own network namespace)` };
  }
  return { report: { path: p, version }, problem: '' };
}

function describeLookup(env: NodeJS.ProcessEnv): string {
  if (env.PICO_CRIU) return `PICO_CRIU=${env.PICO_CRIU}`;
  return `${env.PICO_OCI_ROOT || '/opt/picocenter'}/bin/criu and PATH`;
}
