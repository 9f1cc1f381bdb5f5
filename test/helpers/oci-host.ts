import { checkHost, type HostReport } from '../../worker/oci/host-check.js';

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
