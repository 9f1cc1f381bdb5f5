/*
 * CRIU's pagemap image (`pagemap-<pid>.img`): which virtual pages of a task the dump holds, and
 * where their bytes are in `pages-<pages_id>.img`. A lazy restore reads it to turn a page the app
 * touched (a virtual address, stable across dumps of a process that keeps its layout) into the
 * bytes of this image that hold it (an offset, which shifts whenever an earlier page appears or
 * goes), and to find the pages `criu restore` reads itself before the process runs (the ones not
 * marked lazy).
 *
 * Layout (CRIU 4.2, criu/image.c, images/pagemap.proto): u32 IMG_COMMON_MAGIC, u32 PAGEMAP_MAGIC,
 * then records of u32 length + protobuf: one pagemap_head { pages_id = 1 }, then pagemap_entry
 * { vaddr = 1, compat_nr_pages = 2, in_parent = 3, flags = 4, nr_pages = 5 }. Only PE_PRESENT
 * entries have bytes in the pages file, back to back in entry order.
 */

export const PAGE_SIZE = 4096;
const IMG_COMMON_MAGIC = 0x54564319;
const PAGEMAP_MAGIC = 0x56084025;

/** pagemap_entry.flags */
export const PE_PARENT = 1 << 0;
export const PE_LAZY = 1 << 1;
export const PE_PRESENT = 1 << 2;

export interface PagemapEntry {
  vaddr: number;
  pages: number;
  flags: number;
  /** in bytes, where this entry's pages start in the pages file; null when it has none there */
  offset: number | null;
}

export interface Pagemap {
  pagesId: number;
  /** in vaddr order, as dumped */
  entries: PagemapEntry[];
}

/** Parses a pagemap image; throws on anything that is not one. */
export function parsePagemap(buf: Buffer): Pagemap {
  if (buf.length < 8 || buf.readUInt32LE(0) !== IMG_COMMON_MAGIC || buf.readUInt32LE(4) !== PAGEMAP_MAGIC) {
    throw new Error('not a CRIU pagemap image (bad magic)');
  }
  let pos = 8;
  let pagesId: number | null = null;
  const entries: PagemapEntry[] = [];
  let fileOffset = 0;
  while (pos < buf.length) {
    if (pos + 4 > buf.length) throw new Error(`pagemap: truncated record length at byte ${pos}`);
    const len = buf.readUInt32LE(pos);
    pos += 4;
    if (pos + len > buf.length) throw new Error(`pagemap: record at byte ${pos} runs past the end`);
    const fields = decodeFields(buf.subarray(pos, pos + len));
    pos += len;
    if (pagesId === null) {
      pagesId = fields.get(1) ?? 0;
      continue;
    }
    const vaddr = fields.get(1);
    const pages = fields.get(5) ?? fields.get(2);
    if (vaddr === undefined || pages === undefined) throw new Error('pagemap: an entry lacks vaddr or nr_pages');
    const flags = fields.get(4) ?? (fields.get(3) ? PE_PARENT : PE_PRESENT);
    const present = (flags & PE_PRESENT) !== 0;
    entries.push({ vaddr, pages, flags, offset: present ? fileOffset : null });
    if (present) fileOffset += pages * PAGE_SIZE;
  }
  if (pagesId === null) throw new Error('pagemap: no header');
  return { pagesId, entries };
}

/** In bytes, where the page holding `vaddr` is in the pages file; null when it has no bytes there. */
export function pageOffset(map: Pagemap, vaddr: number): number | null {
  const page = vaddr - (vaddr % PAGE_SIZE);
  const e = entryAt(map, page);
  return e && e.offset !== null ? e.offset + (page - e.vaddr) : null;
}

/** The entry whose pages include `vaddr`, if any. */
export function entryAt(map: Pagemap, vaddr: number): PagemapEntry | undefined {
  const list = map.entries;
  let lo = 0;
  let hi = list.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const e = list[mid]!;
    if (vaddr < e.vaddr) hi = mid - 1;
    else if (vaddr >= e.vaddr + e.pages * PAGE_SIZE) lo = mid + 1;
    else return e;
  }
  return undefined;
}

/**
 * The byte ranges of the pages file that `criu restore` reads itself, before the process runs:
 * present pages not marked lazy (stacks, file-backed private mappings).
 */
export function eagerRanges(map: Pagemap): Array<{ offset: number; length: number }> {
  return map.entries
    .filter((e) => e.offset !== null && (e.flags & PE_LAZY) === 0)
    .map((e) => ({ offset: e.offset!, length: e.pages * PAGE_SIZE }));
}

/** The varint fields of one protobuf message (field number → value); other wire types are skipped. */
function decodeFields(msg: Buffer): Map<number, number> {
  const out = new Map<number, number>();
  let pos = 0;
  const varint = (): number => {
    let value = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (pos >= msg.length) throw new Error('pagemap: truncated varint');
      const b = msg[pos++]!;
      value += (b & 0x7f) * scale;
      if ((b & 0x80) === 0) return value;
      scale *= 128;
    }
    throw new Error('pagemap: varint too long');
  };
  while (pos < msg.length) {
    const key = varint();
    const field = Math.floor(key / 8);
    switch (key % 8) {
      case 0:
        out.set(field, varint());
        break;
      case 1:
        pos += 8;
        break;
      case 2:
        pos += varint();
        break;
      case 5:
        pos += 4;
        break;
      default:
        throw new Error(`pagemap: unsupported wire type ${key % 8}`);
    }
    if (pos > msg.length) throw new Error('pagemap: field runs past its record');
  }
  return out;
}
