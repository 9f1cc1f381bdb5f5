/** CRIU pagemap images for tests (the layout worker/oci/pagemap.ts reads). */

/** One pagemap_entry record: vaddr, pages (field 5), flags. */
export function pagemapEntry(vaddr: number, pages: number, flags: number): Buffer {
  const varint = (n: number): number[] => {
    const out: number[] = [];
    while (n >= 0x80) {
      out.push((n % 0x80) | 0x80);
      n = Math.floor(n / 0x80);
    }
    return [...out, n];
  };
  const msg = Buffer.from([0x08, ...varint(vaddr), 0x10, 0, 0x20, ...varint(flags), 0x28, ...varint(pages)]);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(msg.length);
  return Buffer.concat([len, msg]);
}

/** A whole pagemap image of pages file 1: the magics, the head, then `entries`. */
export function pagemapImage(entries: ReadonlyArray<{ vaddr: number; pages: number; flags: number }>): Buffer {
  const head = Buffer.from('19435654' + '25400856' + '02000000' + '0801', 'hex');
  return Buffer.concat([head, ...entries.map((e) => pagemapEntry(e.vaddr, e.pages, e.flags))]);
}
