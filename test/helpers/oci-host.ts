import path from 'node:path';
import { hostCgroupYard } from '../../worker/oci/cgroup-host.js';
import { checkHost, type HostReport } from '../../worker/oci/host-check.js';
import type { OciRuntimeOptions } from '../../worker/oci-runtime.js';

/**
 * Whether this process can run the oci tests. They need root (runc, CRIU, network namespaces)
 * and a host that can checkpoint. In CI (root, criu installed by scripts/install.sh) they must
 * run: there a host that cannot checkpoint does not skip, it fails the suite with the reason.
 */
export async function ociTestHost(): Promise<{ host: HostReport | undefined; skip: string | false }> {
  if (process.getuid?.() !== 0) {
    return { host: undefined, skip: 'needs root: runc, CRIU and network namespaces only work as root (CI runs as root)' };
  }
  const host = await checkHost();
  if (!host.ok && !process.env.CI) return { host, skip: `this host cannot run the oci runtime: ${host.message}` };
  return { host, skip: false };
}

/** Node's own directory, shown read-only in containers when it is not under /usr. */
export const nodeReadOnlyPaths = process.execPath.startsWith('/usr/') ? [] : [path.dirname(process.execPath)];

/**
 * The OciRuntime options the oci suites share: this host's criu, the network lock and cgroup yard
 * create() would choose, Node's directory visible, 2 s stop grace. `given` names the rest and overrides.
 */
export function ociTestOptions(
  host: HostReport,
  given: Pick<OciRuntimeOptions, 'log' | 'imageStore' | 'stateDir' | 'prefix' | 'slots'> & Partial<OciRuntimeOptions>,
): OciRuntimeOptions {
  return {
    criu: host.criu!.path,
    defaults: { readOnlyPaths: nodeReadOnlyPaths },
    stopGraceMs: 2000,
    networkLock: host.nftablesLock ? 'nftables' : 'iptables',
    cgroupYard: hostCgroupYard(),
    ...given,
  };
}
