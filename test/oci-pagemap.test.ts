import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { eagerRanges, entryAt, pageOffset, parsePagemap, PE_LAZY, PE_PRESENT } from '../worker/oci/pagemap.js';
import { pageRanges } from '../worker/oci/lazy-restore.js';
import { pagemapEntry } from './helpers/pagemap.js';

/*
 * CRIU's pagemap image, as criu 4.2.1 writes it: the first bytes below are the start of a real
 * pagemap-1.img (the heavy test app): magics, the head (pages_id 1), three entries.
 */
const REAL = Buffer.from(
  '19435654' + '25400856' + '02000000' + '0801' +
    '0b000000' + '0880e0db05' + '1000' + '2004' + '2801' +
    '0b000000' + '0880808f2b' + '1000' + '2004' + '2809' +
    '0b000000' + '088080922b' + '1000' + '2004' + '2805',
  'hex',
);

describe('CRIU pagemap', () => {
  it('reads a real image: each entry with its place in the pages file', () => {
    const map = parsePagemap(REAL);
    assert.equal(map.pagesId, 1);
    assert.deepEqual(map.entries, [
      { vaddr: 0xb6f000, pages: 1, flags: PE_PRESENT, offset: 0 },
      { vaddr: 0x563c000, pages: 9, flags: PE_PRESENT, offset: 4096 },
      { vaddr: 0x5648000, pages: 5, flags: PE_PRESENT, offset: 10 * 4096 },
    ]);
    assert.equal(pageOffset(map, 0x563c000 + 2 * 4096 + 17), 3 * 4096, 'any address in a page');
    assert.equal(pageOffset(map, 0x5000000), null, 'not dumped');
    assert.equal(entryAt(map, 0x5648000 + 5 * 4096), undefined, 'one past the end');
  });

  it('zero pages have no bytes; lazy pages are not read by the restore itself', () => {
    const map = parsePagemap(Buffer.concat([REAL.subarray(0, 14), pagemapEntry(0x10000, 2, PE_PRESENT | PE_LAZY), pagemapEntry(0x20000, 3, 0), pagemapEntry(0x30000, 1, PE_PRESENT)]));
    assert.deepEqual(map.entries.map((e) => e.offset), [0, null, 2 * 4096]);
    assert.equal(pageOffset(map, 0x20000), null);
    assert.deepEqual(eagerRanges(map), [{ offset: 2 * 4096, length: 4096 }]);
  });

  it('anything else is refused with a reason', () => {
    assert.throws(() => parsePagemap(Buffer.from('not an image')), /magic/);
    assert.throws(() => parsePagemap(REAL.subarray(0, REAL.length - 3)), /runs past the end/);
    assert.throws(() => parsePagemap(REAL.subarray(0, 8)), /no header/);
  });

  it('faulted pages become runs of consecutive pages per task', () => {
    const f = (pid: number, vaddr: number) => ({ pid, vaddr, file: 'pages-1.img', offset: 0, at: 0 });
    assert.deepEqual(pageRanges([f(1, 0x3000), f(1, 0x1000), f(1, 0x2000), f(1, 0x2000), f(2, 0x1000), f(1, 0x9000)]), [
      [1, 0x1000, 3],
      [1, 0x9000, 1],
      [2, 0x1000, 1],
    ]);
  });
});
