import { existsSync } from 'node:fs';
import { failureReason, run, succeeded, which } from './exec.js';

/**
 * One network namespace per app, joined to the host by a veth pair with a private /30:
 *
 *   host netns                         app netns (NAME)
 *   HOST_IF  10.200.S.1/30  <──veth──>  eth0  10.200.S.2/30   (+ lo)
 *
 * The gateway reaches a container port at containerAddress:port, straight over the veth: apps
 * may all listen on the same port. The app netns has no default route and the host does not
 * forward, so an app reaches nothing but its own veth peer.
 *
 * The namespace is ours, not runc's: runc joins it by path and declares it external to CRIU, so
 * a checkpoint neither dumps nor removes it. It may be kept while the app is stored (CRIU leaves
 * it "network-locked": packets to the app are dropped, so a client's SYN is retried rather than
 * refused) or destroyed and created afresh before the restore — both restore cleanly.
 */
export interface AppNetwork {
  /** netns name, as `ip netns` knows it */
  name: string;
  /** what the container's config.json names as its network namespace */
  path: string;
  hostInterface: string;
  hostAddress: string;
  containerAddress: string;
  prefixLength: 30;
}

export const NETNS_DIR = '/var/run/netns';
/** 10.200.0.0/16 in /30 blocks: slots 0..16383. */
const BASE = (10 << 24) | (200 << 16);
export const MAX_SLOT = (1 << 14) - 1;

/** The network of slot `slot`. Pure: the same slot always gives the same addresses and names. */
export function networkFor(name: string, slot: number): AppNetwork {
  if (!Number.isInteger(slot) || slot < 0 || slot > MAX_SLOT) throw new Error(`network slot ${slot} is not in 0..${MAX_SLOT}`);
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(name)) throw new Error(`netns name ${JSON.stringify(name)} is not a plain name`);
  const net = BASE + slot * 4;
  return {
    name,
    path: `${NETNS_DIR}/${name}`,
    // IFNAMSIZ is 16: "pico16383" fits; the name is per slot, so two apps never share one.
    hostInterface: `pico${slot}`,
    hostAddress: ipv4(net + 1),
    containerAddress: ipv4(net + 2),
    prefixLength: 30,
  };
}

/**
 * Creates the namespace and its veth pair. A leftover of the same name (a crashed worker) is
 * removed first, so this must not be called while a container is in the namespace. On failure
 * nothing is left behind.
 */
export async function createNetwork(net: AppNetwork): Promise<void> {
  await destroyNetwork(net);
  // Two `ip -batch` runs instead of one `ip` per step: each spawn costs 5-15 ms on a busy host,
  // and this is on the wake path.
  const batches: { args: string[]; lines: string[] }[] = [
    {
      args: [],
      lines: [
        `netns add ${net.name}`,
        `link add ${net.hostInterface} type veth peer name eth0 netns ${net.name}`,
        `addr add ${net.hostAddress}/${net.prefixLength} dev ${net.hostInterface}`,
        `link set ${net.hostInterface} up`,
      ],
    },
    {
      args: ['-n', net.name],
      lines: [`addr add ${net.containerAddress}/${net.prefixLength} dev eth0`, 'link set eth0 up', 'link set lo up'],
    },
  ];
  for (const b of batches) {
    const r = await ip([...b.args, '-batch', '-'], { timeoutMs: 10_000, input: `${b.lines.join('\n')}\n` });
    if (!succeeded(r)) {
      await destroyNetwork(net);
      throw new Error(`network ${net.name}: \`ip ${b.args.join(' ')} -batch\` (${b.lines.join('; ')}) failed: ${failureReason(r)}`);
    }
  }
}

/** True when the namespace and the host end of its veth pair exist (no process is spawned). */
export function networkExists(net: AppNetwork): boolean {
  return existsSync(net.path) && existsSync(`/sys/class/net/${net.hostInterface}`);
}

/** Removes the namespace and the veth pair. Idempotent. */
export async function destroyNetwork(net: AppNetwork): Promise<void> {
  if (existsSync(net.path)) {
    const r = await ip(['netns', 'delete', net.name], { timeoutMs: 10_000 });
    if (!succeeded(r) && existsSync(net.path)) throw new Error(`network ${net.name}: \`ip netns delete\` failed: ${failureReason(r)}`);
  }
  // Deleting the namespace deletes eth0 and with it the host end; this catches a host end
  // whose namespace was lost some other way.
  if (existsSync(`/sys/class/net/${net.hostInterface}`)) await ip(['link', 'delete', net.hostInterface], { timeoutMs: 10_000 });
}

/**
 * True when the host routes containerAddress over this network's veth. Check it before sending:
 * without the namespace the address would follow the default route off the machine.
 */
export async function routesToContainer(net: AppNetwork): Promise<boolean> {
  const r = await ip(['-json', 'route', 'get', net.containerAddress], { timeoutMs: 10_000 });
  if (!succeeded(r)) return false;
  try {
    const routes = JSON.parse(r.stdout) as { dev?: string }[];
    return routes.length > 0 && routes.every((x) => x.dev === net.hostInterface);
  } catch {
    return false;
  }
}

function ip(args: string[], options: { timeoutMs: number; input?: string }) {
  return run(which('ip') ?? 'ip', args, options);
}

function ipv4(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}
