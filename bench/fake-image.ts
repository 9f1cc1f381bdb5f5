import { randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, openSync, writeFileSync, writeSync } from 'node:fs';
import path from 'node:path';

const MiB = 1 << 20;

/** A directory shaped like a CRIU dump: `mib` MiB of random pages plus the small image files. Returns its size in bytes. */
export function makeImage(dir: string, mib: number): number {
  mkdirSync(dir, { recursive: true });
  const fd = openSync(path.join(dir, 'pages-1.img'), 'w');
  for (let i = 0; i < mib; i++) writeSync(fd, randomBytes(MiB));
  closeSync(fd);
  let total = mib * MiB;
  for (const [name, size] of [['core-1.img', 5000], ['mm-1.img', 12000], ['pagemap-1.img', 40000], ['inventory.img', 40], ['fdinfo-2.img', 300], ['files.img', 2000]] as const) {
    writeFileSync(path.join(dir, name), randomBytes(size));
    total += size;
  }
  return total;
}
