import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseFaults } from '../worker/oci/lazy-pages.js';

/*
 * The ActiveSet is read off `criu lazy-pages -v4`'s log: each #PF line, then the read that
 * answered it (page file and offset), or a zero page. Reads with no #PF before them are the
 * daemon's background copy and are not faults. The lines below are real ones (criu 4.2.1).
 */
const LOG = `(00.003283) uffd: Waiting for incoming connections on lazy-pages.socket
(00.334657) uffd: 1-8: Found 78519 pages to be handled by UFFD
(00.345891) uffd: 1-8: #PF at 0x7fac05cba000
(00.345927) pr1-1 Read 7fac05cba000 1 pages
(00.345930) 	pr1-1 Read page from self 7fac05cba000/132d1000
(00.346022) uffd: 1-8: uffd_copy: 0x7fac05cba000/4096
(00.401454) pr1-1 Read 23fb4f5b0000 16 pages
(00.401476) 	pr1-1 Read page from self 23fb4f5b0000/3b1a000
(00.401497) uffd: 1-8: uffd_copy: 0x23fb4f5b0000/65536
(00.401566) uffd: 1-8: #PF at 0x3e187c454000
(00.401569) uffd: 1-8: zero page at 0x3e187c454000
(00.401610) pr1-1 Read 240525cc0000 32 pages
(00.401612) 	pr1-1 Read page from self 240525cc0000/3b2a000
(00.401628) uffd: 1-8: uffd_copy: 0x240525cc0000/131072
(00.512000) uffd: 2-9: #PF at 0x7f0000001000
(00.512010) pr2-2 Read 7f0000001000 1 pages
(00.512012) 	pr2-2 Read page from self 7f0000001000/2000
(00.544749) uffd: 1-8: UFFD transferred pages: (78519/78519)`.split('\n');

describe('lazy-pages log: page faults', () => {
  it('finds each fault\'s page (task, address, file, offset, time) and skips background copies and zero pages', () => {
    const faults = parseFaults(LOG, 1000).map((f) => ({ ...f, at: Math.round(f.at * 1000) / 1000 }));
    assert.deepEqual(faults, [
      { pid: 1, vaddr: 0x7fac05cba000, file: 'pages-1.img', offset: 0x132d1000, at: 1345.891 },
      { pid: 2, vaddr: 0x7f0000001000, file: 'pages-2.img', offset: 0x2000, at: 1512 },
    ]);
  });

  it('an empty or foreign log has no faults', () => {
    assert.deepEqual(parseFaults([], 0), []);
    assert.deepEqual(parseFaults(['garbage', '(00.1) uffd: 1-8: #PF at 0x1'], 0), []);
  });
});
