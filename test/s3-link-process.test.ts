import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { S3ObjectStore } from '../pagestore/s3-store.js';
import { startLinkProcess, type LinkProcess } from './helpers/s3-link-process.js';
import { startS3Server, type S3TestServer } from './helpers/s3-server.js';

/*
 * The benchmarks' link to S3 in a child process (test/helpers/s3-link-process.ts): requests pass
 * through it, shaped or not, and it reports what it saw. Real s3rver, the real AWS SDK.
 */
describe('the link process', () => {
  let s3: S3TestServer;
  let link: LinkProcess;
  let store: S3ObjectStore;
  before(async () => {
    s3 = await startS3Server();
    link = await startLinkProcess({ target: s3.endpoint });
    store = new S3ObjectStore({ endpoint: link.endpoint, region: s3.region, bucket: s3.bucket, pathStyle: true, credentials: s3.credentials });
  });
  after(async () => {
    await link?.close();
    await s3?.stop();
  });

  it('forwards requests and reports each, in order, with when it arrived', async () => {
    const from = await link.seenCount();
    const before = Date.now();
    await store.put('a/b', Buffer.from('hello'));
    assert.deepEqual(await store.get('a/b'), Buffer.from('hello'));
    const seen = await link.seen(from);
    assert.deepEqual(seen.map((r) => r.method), ['PUT', 'GET']);
    assert.ok(seen.every((r) => r.path.includes('/a/b') && r.at !== undefined && r.at >= before));
    assert.equal(await link.seenCount(), from + 2);
  });

  it('still forwards everything, whole, when shaped, and after', async () => {
    const body = Buffer.alloc(256 * 1024, 7);
    await link.shape(5, 10e6);
    await store.put('big', body);
    assert.deepEqual(await store.get('big'), body);
    await link.shape(0);
    assert.deepEqual(await store.get('big'), body);
  });
});
