import { createHash } from 'node:crypto';
import { isIP } from 'node:net';

/*
 * Gives each app that needs raw TCP its own address from the configured blocks. The address is
 * derived from the app's name (hash, then linear probing), so it stays the same across restarts
 * and when other apps are added or removed; only a collision moves an app.
 */

interface Block {
  family: 4 | 6;
  base: bigint;
  size: bigint; // usable addresses, starting at base
}

function toBigInt(ip: string): bigint {
  if (isIP(ip) === 4) return ip.split('.').reduce((acc, o) => (acc << 8n) | BigInt(Number(o)), 0n);
  const [head, tail] = ip.includes('::') ? ip.split('::') : [ip, undefined];
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
  return groups.reduce((acc, g) => (acc << 16n) | BigInt(parseInt(g || '0', 16)), 0n);
}

function fromBigInt(n: bigint, family: 4 | 6): string {
  if (family === 4) return [24n, 16n, 8n, 0n].map((s) => String((n >> s) & 255n)).join('.');
  const groups: string[] = [];
  for (let s = 112n; s >= 0n; s -= 16n) groups.push(((n >> s) & 0xffffn).toString(16));
  return groups.join(':').replace(/(^|:)0(:0)+(:|$)/, '::');
}

function parseBlock(cidr: string): Block {
  const [ip, bitsText] = cidr.split('/') as [string, string];
  const family = isIP(ip) as 4 | 6;
  const width = family === 4 ? 32n : 128n;
  const bits = BigInt(Number(bitsText));
  const hostBits = width - bits;
  const mask = ((1n << width) - 1n) ^ ((1n << hostBits) - 1n);
  const network = toBigInt(ip) & mask;
  const total = 1n << hostBits;
  // Skip the network and (for IPv4) broadcast address in blocks big enough to have them.
  if (total >= 4n) return { family, base: network + 1n, size: total - (family === 4 ? 2n : 1n) };
  return { family, base: network, size: total };
}

export function normalizeIp(ip: string): string {
  const family = isIP(ip);
  if (family === 0) throw new Error(`not an IP address: ${ip}`);
  return fromBigInt(toBigInt(ip), family as 4 | 6);
}

export function blockContains(cidr: string, ip: string): boolean {
  const b = parseBlock(cidr);
  if (isIP(ip) !== b.family) return false;
  const [netIp, bitsText] = cidr.split('/') as [string, string];
  const width = b.family === 4 ? 32n : 128n;
  const hostBits = width - BigInt(Number(bitsText));
  return toBigInt(ip) >> hostBits === toBigInt(netIp) >> hostBits;
}

export class AddressPool {
  private readonly blocks: Block[];
  private readonly taken = new Set<string>();

  constructor(cidrs: readonly string[]) {
    this.blocks = cidrs.map(parseBlock);
  }

  /** Marks an address as used (an app's explicit `address`). */
  reserve(ip: string): void {
    this.taken.add(normalizeIp(ip));
  }

  /** One address of the first block of `family` (default: the first block's) for `name`. */
  allocate(name: string, family?: 4 | 6): string {
    const block = this.blocks.find((b) => family === undefined || b.family === family);
    if (!block) throw new Error(`no IPv${family ?? ''} block in gateway.addresses`);
    const digest = createHash('sha256').update(name).digest();
    let offset = digest.readBigUInt64BE(0) % block.size;
    for (let tries = 0n; tries < block.size; tries++) {
      const ip = fromBigInt(block.base + offset, block.family);
      if (!this.taken.has(ip)) {
        this.taken.add(ip);
        return ip;
      }
      offset = (offset + 1n) % block.size;
    }
    throw new Error(`address pool ${fromBigInt(block.base, block.family)} is exhausted`);
  }
}
