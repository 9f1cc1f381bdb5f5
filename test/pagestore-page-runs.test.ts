import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { PageRuns, spanOf } from '../pagestore/page-runs.js';

/* Page runs: a read is answered only when runs hold all of it. */

const run = (file: string, offset: number, length: number, fill: number) => ({ file, offset, bytes: Buffer.alloc(length, fill) });

describe('page runs', () => {
  const runs = new PageRuns();
  runs.add([run('pages-1.img', 8192, 8192, 1), run('pages-1.img', 0, 4096, 2), run('pages-2.img', 4096, 4096, 3)]);

  it('answers reads wholly inside one run, from its bytes', () => {
    assert.deepEqual(runs.read('pages-1.img', 8192, 16384), Buffer.alloc(8192, 1));
    assert.deepEqual(runs.read('pages-1.img', 12288, 12290), Buffer.alloc(2, 1));
    assert.deepEqual(runs.read('pages-1.img', 0, 4096), Buffer.alloc(4096, 2));
    assert.deepEqual(runs.read('pages-2.img', 4096, 8192), Buffer.alloc(4096, 3));
  });

  it('leaves every other read to the chunks', () => {
    assert.equal(runs.read('pages-1.img', 4096, 8192), undefined, 'a gap');
    assert.equal(runs.read('pages-1.img', 0, 8192), undefined, 'a run and a gap');
    assert.equal(runs.read('pages-1.img', 12288, 20480), undefined, 'past the end of a run');
    assert.equal(runs.read('pages-1.img', 4000, 4200), undefined, 'straddling a run start');
    assert.equal(runs.read('pages-3.img', 0, 4096), undefined, 'another file');
    assert.equal(runs.read('pages-1.img', 8192, 8192), undefined, 'nothing asked');
  });

  it('answers reads across touching runs (two packs\' runs may touch), as one copy', () => {
    const two = new PageRuns();
    two.add([run('pages-1.img', 0, 4096, 1)]);
    two.add([run('pages-1.img', 4096, 8192, 2), run('pages-1.img', 12288, 4096, 3), run('pages-1.img', 20480, 4096, 4)]);
    assert.deepEqual(two.read('pages-1.img', 2048, 14336), Buffer.concat([Buffer.alloc(2048, 1), Buffer.alloc(8192, 2), Buffer.alloc(2048, 3)]));
    assert.deepEqual(two.read('pages-1.img', 0, 16384), Buffer.concat([Buffer.alloc(4096, 1), Buffer.alloc(8192, 2), Buffer.alloc(4096, 3)]));
    assert.equal(two.read('pages-1.img', 12288, 24576), undefined, 'touching runs, then a gap');
    assert.equal(two.read('pages-1.img', 0, 20000), undefined, 'past the last touching run');
  });

  it('knows which bytes it holds and their total; overlapping runs are not added twice; add() says which it added', () => {
    assert.equal(runs.has('pages-1.img', 16383), true);
    assert.equal(runs.has('pages-1.img', 16384), false);
    const fresh = run('pages-1.img', 16384, 4096, 8);
    const added = runs.add([run('pages-1.img', 12288, 8192, 9), run('pages-1.img', 4096, 8192, 9), run('pages-1.img', 24576, 0, 9), fresh]);
    assert.deepEqual(added, [fresh]);
    assert.equal(runs.bytes, 20480);
    assert.deepEqual(runs.read('pages-1.img', 12288, 20480), Buffer.concat([Buffer.alloc(4096, 1), Buffer.alloc(4096, 8)]));
  });

  it('spanOf: the touching runs that hold a range, by index (as the mount\'s server looks up resident bytes)', () => {
    const list = [
      { offset: 0, length: 10 },
      { offset: 10, length: 5 },
      { offset: 20, length: 10 },
    ];
    const len = (r: { length: number }) => r.length;
    assert.deepEqual(spanOf(list, 0, 10, len), { first: 0, last: 0 });
    assert.deepEqual(spanOf(list, 3, 14, len), { first: 0, last: 1 }, 'across touching runs');
    assert.deepEqual(spanOf(list, 22, 30, len), { first: 2, last: 2 });
    assert.equal(spanOf(list, 12, 21, len), undefined, 'a gap between runs');
    assert.equal(spanOf(list, 15, 16, len), undefined, 'in the gap');
    assert.equal(spanOf(list, 25, 31, len), undefined, 'past the last run');
    assert.equal(spanOf(list, 5, 5, len), undefined, 'nothing asked');
    assert.equal(spanOf([], 0, 1, len), undefined);
  });
});
