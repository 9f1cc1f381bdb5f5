import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import { pathToFileURL } from 'node:url';
import { isPicoError } from '../shared/errors.js';
import type { ImageFile, ImageManifest } from '../pagestore/image-store.js';
import { cleanStaleMount, mountImage, mountPending, type ImageMount, type ImageMountOptions, type PendingMount } from '../pagestore/image-mount.js';
import { PageRuns } from '../pagestore/page-runs.js';
import { fileChunks, type ChunkRef } from '../pagestore/image-store.js';
import { until } from './helpers/poll.js';
import { watchdog } from './helpers/watchdog.js';

// The FUSE image directory, read the way criu reads it: by other processes (this process answers
// the mount's reads on its event loop and must never read it itself). Each test mounts its own
// image at a fresh mountpoint: the kernel keeps pages cached per mount, so a fresh one sees every
// read.
//
// A frozen event loop (what libfuse's threads once did to this process) fires no timer, so
// node:test's timeouts cannot fail this file: a watchdog process does.
watchdog(240_000, 'test/pagestore-mount.test.js');

const KiB = 1024;
const MiB = 1024 * KiB;

const skipReason =
  process.getuid?.() !== 0 ? 'FUSE mount tests need root (mount(2) of a fuse filesystem)'
  : !existsSync('/dev/fuse') ? 'FUSE mount tests need /dev/fuse'
  : undefined;

const work = mkdtempSync(path.join(tmpdir(), 'pico-mount-'));
let seq = 0;
const freshDir = (what: string) => path.join(work, `${what}-${++seq}`);

/** Seeded pseudo-random bytes: the AES-256-CTR keystream of a key derived from `seed`. */
function seededBytes(seed: string, n: number): Buffer {
  const key = createHash('sha256').update(seed).digest();
  const cipher = createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
  return Buffer.concat([cipher.update(Buffer.alloc(n)), cipher.final()]);
}
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

// ---- the image: four files, one split into chunks of varying sizes, one in a subdirectory ----

const CHUNK_SIZE = 1 * MiB;
const chunks = new Map<string, Buffer>();
const contents = new Map<string, Buffer>(); // by file path

function addFile(p: string, mode: number, data: Buffer, sizes?: number[]): ImageFile {
  const hashes: string[] = [];
  const used: number[] = [];
  let off = 0;
  for (let i = 0; off < data.length; i++) {
    const n = Math.min(data.length - off, sizes ? sizes[i % sizes.length]! : CHUNK_SIZE);
    const body = data.subarray(off, off + n);
    const h = sha256(body);
    chunks.set(h, Buffer.from(body));
    hashes.push(h);
    used.push(n);
    off += n;
  }
  contents.set(p, data);
  return { path: p, size: data.length, mode, chunks: hashes, sizes: used };
}

const files: ImageFile[] = [
  // ~20 MB, chunks of varying (odd) sizes
  addFile('pages-1.img', 0o600, seededBytes('pages', 20_000_003), [MiB, 300 * KiB + 7, 2 * MiB - 13, 64 * KiB, 777_777, 1]),
  // small, one chunk
  addFile('inventory.img', 0o644, seededBytes('inventory', 5000)),
  addFile('empty.img', 0o600, Buffer.alloc(0)),
  // in a subdirectory, three 1 MiB chunks
  addFile('sub/dir/core-1.img', 0o640, seededBytes('core', 2 * MiB + MiB / 2 + 3)),
];
const manifest: ImageManifest = {
  format: 2,
  app: 'kv',
  generation: 7,
  createdAt: '2025-01-02T03:04:05.000Z',
  chunkSize: 2 * MiB, // the largest chunk
  files,
  checksum: 'not-checked-here',
};
const pages = files[0]!;
const pagesRefs = fileChunks(manifest, pages);
const pagesData = contents.get('pages-1.img')!;

// The expected files on disk, for cmp.
const expectedDir = path.join(work, 'expected');
for (const [p, data] of contents) {
  mkdirSync(path.dirname(path.join(expectedDir, p)), { recursive: true });
  writeFileSync(path.join(expectedDir, p), data);
}

// ---- helpers ----

const open = new Set<ImageMount>();
after(async () => {
  for (const m of open) await m.close();
  // A mount a failed test leaked must not be walked by rm: a synchronous stat of a mount this
  // process serves deadlocks it. Detach whatever is still mounted under `work` first.
  for (const p of mountsUnder(work)) await run('fusermount', ['-uz', p]);
  rmSync(work, { recursive: true, force: true });
});

function mountsUnder(dir: string): string[] {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((p) => p.startsWith(dir + '/'));
}

/** Asserts that mountImage rejects; a mount it made anyway is closed (never leaked). */
async function assertMountRejects(opts: ImageMountOptions, check: RegExp | ((err: unknown) => boolean)): Promise<void> {
  let made: ImageMount | undefined;
  await assert.rejects(
    mountImage(opts).then((m) => {
      made = m;
    }),
    check as RegExp,
  );
  await made?.close();
  assert.ok(!isMounted(opts.mountpoint), `${opts.mountpoint} left mounted`);
}

async function mount(extra: Partial<ImageMountOptions> = {}): Promise<ImageMount> {
  const m = await mountImage({
    mountpoint: freshDir('mnt'),
    manifest,
    chunk: async (ref) => chunks.get(ref.hash)!,
    ...extra,
  });
  open.add(m);
  return m;
}

async function closeMount(m: ImageMount): Promise<void> {
  await m.close();
  open.delete(m);
}

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: Buffer;
  stderr: string;
}

/** Runs a command in a child process (never this one: it serves the mount); never rejects. */
function run(cmd: string, args: string[], timeoutMs = 30_000): Promise<Run> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let stderr = '';
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: Buffer.concat(out), stderr });
    });
  });
}

async function ok(cmd: string, args: string[]): Promise<Buffer> {
  const r = await run(cmd, args);
  assert.equal(r.code, 0, `${cmd} ${args.join(' ')} failed (${r.code ?? r.signal}): ${r.stderr}`);
  return r.stdout;
}

/** `count` bytes at byte offset `skip` of `file`, read by dd in a child. */
function ddRange(file: string, skip: number, count: number): Promise<Run> {
  return run('dd', [`if=${file}`, 'bs=65536', 'iflag=skip_bytes,count_bytes', `skip=${skip}`, `count=${count}`, 'status=none']);
}

/** Where the file descriptors of process `pid` point. */
function fdTargets(pid: number): string[] {
  return readdirSync(`/proc/${pid}/fd`).map((fd) => {
    try {
      return readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      return ''; // closed meanwhile
    }
  });
}

/** Starts `cmd` in a child; `done` settles with how it ended and what it printed. */
function started(cmd: string, args: string[]): { pid: number; done: Promise<Run> } {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const out: Buffer[] = [];
  let stderr = '';
  child.stdout.on('data', (b: Buffer) => out.push(b));
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  const done = new Promise<Run>((resolve) =>
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: Buffer.concat(out), stderr });
    }),
  );
  return { pid: child.pid!, done };
}

/** Whether process `pid` sleeps waiting for a FUSE request's answer (its kernel stack says so). */
function waitsOnFuse(pid: number): boolean {
  try {
    return /fuse|request_wait_answer/.test(readFileSync(`/proc/${pid}/stack`, 'utf8'));
  } catch {
    return false;
  }
}

function isMounted(p: string): boolean {
  return readFileSync('/proc/self/mountinfo', 'utf8').split('\n').some((l) => l.split(' ')[4] === p);
}

/** The mountpoint after close: removed, or an empty plain directory. */
function assertGoneOrEmpty(p: string) {
  assert.ok(!isMounted(p), `${p} is still mounted`);
  if (existsSync(p)) assert.deepEqual(readdirSync(p), []);
}

// ---- tests ----

describe('image mount (FUSE)', { skip: skipReason, timeout: 180_000 }, () => {
  it('serves every file whole: sha256sum and cmp in children match', async () => {
    const m = await mount();
    const sums = (await ok('sha256sum', files.map((f) => path.join(m.path, f.path)))).toString();
    for (const f of files) {
      assert.match(sums, new RegExp(`^${sha256(contents.get(f.path)!)}  ${path.join(m.path, f.path)}$`, 'm'), f.path);
    }
    for (const f of files) await ok('cmp', [path.join(expectedDir, f.path), path.join(m.path, f.path)]);
    const s = m.stats();
    assert.equal(s.failures, 0);
    assert.ok(s.bytes >= contents.get('pages-1.img')!.length, `bytes served ${s.bytes}`);
    assert.ok(s.chunks >= pagesRefs.length, `chunk fetches ${s.chunks}`);
    await closeMount(m);
    assertGoneOrEmpty(m.path);
  });

  it('lists directories with sizes, modes, owner and the image time (ls -lR, stat)', async () => {
    const m = await mount();
    const ls = (await ok('ls', ['-lnR', m.path])).toString();
    assert.match(ls, /^-rw------- 1 0 0 +20000003 .* pages-1\.img$/m);
    assert.match(ls, /^-rw-r--r-- 1 0 0 +5000 .* inventory\.img$/m);
    assert.match(ls, /^-rw------- 1 0 0 +0 .* empty\.img$/m);
    assert.match(ls, /^drwxr-xr-x \d+ 0 0 +4096 .* sub$/m);
    assert.match(ls, new RegExp(`^${m.path}/sub/dir:\\n(?:total \\d+\\n)?-rw-r----- 1 0 0 +${2 * MiB + MiB / 2 + 3} .* core-1\\.img$`, 'm'));
    const st = (await ok('stat', ['-c', '%n|%s|%a|%F|%Y', ...files.map((f) => path.join(m.path, f.path)), path.join(m.path, 'sub')]))
      .toString()
      .trim()
      .split('\n');
    const mtime = String(Date.parse(manifest.createdAt) / 1000);
    for (const f of files) {
      const type = f.size ? 'regular file' : 'regular empty file';
      assert.ok(st.includes(`${path.join(m.path, f.path)}|${f.size}|${f.mode.toString(8)}|${type}|${mtime}`), `${f.path}: ${st.join('; ')}`);
    }
    assert.ok(st.includes(`${path.join(m.path, 'sub')}|4096|755|directory|${mtime}`), st.join('; '));
    const missing = await run('stat', [path.join(m.path, 'nope.img')]);
    assert.notEqual(missing.code, 0);
    assert.match(missing.stderr, /No such file/);
    await closeMount(m);
  });

  it('answers ranged reads at odd offsets spanning chunk boundaries (dd skip/count)', async () => {
    const m = await mount();
    const file = path.join(m.path, 'pages-1.img');
    const b = (i: number) => pagesRefs[i]!.offset; // start of chunk i
    const ranges: Array<[number, number]> = [
      [0, 1],
      [b(1) - 5, 10], // across the 1 MiB → 300 KiB+7 boundary
      [b(2) - 3, 300 * KiB + 11], // spans chunk 2 into 3 (2 MiB-13 long)
      [b(3) - 1, 64 * KiB + 2], // chunk 2's last byte, all of 3 (64 KiB), first byte of 4
      [b(5) - 7, 15], // through the 1-byte chunk 5
      [b(9) + 12_345, 3 * MiB + 17], // many chunks
      [pages.size - 10, 100], // short read only at EOF
      [pages.size, 10], // at EOF: nothing
    ];
    for (const [skip, count] of ranges) {
      const r = await ddRange(file, skip, count);
      assert.equal(r.code, 0, r.stderr);
      const want = pagesData.subarray(skip, Math.min(pages.size, skip + count));
      assert.equal(r.stdout.length, want.length, `length at ${skip}+${count}`);
      assert.ok(r.stdout.equals(want), `bytes at ${skip}+${count}`);
    }
    const sub = await ddRange(path.join(m.path, 'sub/dir/core-1.img'), MiB - 2, MiB + 4);
    assert.ok(sub.stdout.equals(contents.get('sub/dir/core-1.img')!.subarray(MiB - 2, 2 * MiB + 2)));
    await closeMount(m);
  });

  it('reports the chunks a small ranged read touches to onRead, before fetching them', async () => {
    const order: string[] = [];
    const seen: Array<{ file: string; ref: ChunkRef }> = [];
    const m = await mount({
      onRead: (file, ref) => {
        seen.push({ file: file.path, ref });
        order.push(`read ${ref.hash}`);
      },
      chunk: async (ref) => {
        order.push(`fetch ${ref.hash}`);
        return chunks.get(ref.hash)!;
      },
    });
    const at = pagesRefs[7]!.offset + 5000; // well inside chunk 7
    const r = await ddRange(path.join(m.path, 'pages-1.img'), at, 100);
    assert.equal(r.code, 0, r.stderr);
    assert.ok(r.stdout.equals(pagesData.subarray(at, at + 100)));
    assert.ok(seen.length > 0);
    assert.ok(seen.every((s) => s.file === 'pages-1.img'));
    const hit = seen.find((s) => s.ref.offset <= at && at < s.ref.offset + s.ref.size);
    assert.ok(hit, `no onRead for the chunk at ${at}: ${JSON.stringify(seen.map((s) => s.ref.offset))}`);
    assert.equal(hit.ref.hash, pagesRefs[7]!.hash);
    for (const h of new Set(order.filter((o) => o.startsWith('fetch ')).map((o) => o.slice(6)))) {
      assert.ok(order.indexOf(`read ${h}`) < order.indexOf(`fetch ${h}`), `chunk ${h} fetched before onRead`);
    }
    await closeMount(m);
  });

  it('answers reads that page runs hold whole from them, without a chunk; reads ahead one page only', async () => {
    const runs = new PageRuns();
    let fetched = 0;
    const m = await mount({
      held: (file, pos, end) => runs.read(file.path, pos, end),
      chunk: async (ref) => {
        fetched++;
        return chunks.get(ref.hash)!;
      },
    });
    // Filled after the mount, as a restore does; bytes unlike the chunks', to tell them apart.
    const at = pagesRefs[7]!.offset - (pagesRefs[7]!.offset % 4096) + 8 * 4096;
    runs.add([{ file: 'pages-1.img', offset: at, bytes: Buffer.alloc(3 * 4096, 0xab) }]);
    const file = path.join(m.path, 'pages-1.img');
    const held = await ddRange(file, at + 4096, 4096);
    assert.equal(held.code, 0, held.stderr);
    assert.ok(held.stdout.equals(Buffer.alloc(4096, 0xab)), 'the run answered');
    assert.equal(fetched, 0, 'no chunk for a read the run holds');
    assert.ok(m.stats().fromPages >= 1);
    const beyond = at + 16 * 4096;
    const other = await ddRange(file, beyond, 4096);
    assert.ok(other.stdout.equals(pagesData.subarray(beyond, beyond + 4096)), 'outside the run: the chunk');
    assert.equal(fetched, 1);
    const dev = readFileSync('/proc/self/mountinfo', 'utf8')
      .split('\n')
      .map((l) => l.split(' '))
      .find((f) => f[4] === m.path)?.[2];
    assert.equal(readFileSync(`/sys/class/bdi/${dev}/read_ahead_kb`, 'utf8').trim(), '4');
    await closeMount(m);
  });

  it('answers reads that resident bytes cover wholly in the server, without a READ; others as before', async () => {
    let fetched = 0;
    const m = await mount({
      chunk: async (ref) => {
        fetched++;
        return chunks.get(ref.hash)!;
      },
    });
    // Bytes unlike the chunks', to tell who answered: the server (resident) or this process.
    const at = pagesRefs[3]!.offset - (pagesRefs[3]!.offset % 4096) + 4 * 4096;
    await m.hold([
      { file: 'pages-1.img', offset: at, bytes: Buffer.alloc(2 * 4096, 0xcd) },
      { file: 'pages-1.img', offset: at + 2 * 4096, bytes: Buffer.alloc(4096, 0xce) }, // touching: one read may span both
      { file: 'inventory.img', offset: 0, bytes: Buffer.alloc(5000, 0x11) },
      { file: 'inventory.img', offset: 4096, bytes: Buffer.alloc(5000, 0x22) }, // past the file's end: not taken
      { file: 'no-such.img', offset: 0, bytes: Buffer.alloc(10, 0x33) },
    ]);
    // The server reads them into the page cache at once; the other two runs it was not given.
    assert.deepEqual(await m.warmed(), { bytes: 3 * 4096 + 5000, failed: 0 });
    const file = path.join(m.path, 'pages-1.img');
    const spanning = await ddRange(file, at + 4096, 2 * 4096);
    assert.equal(spanning.code, 0, spanning.stderr);
    assert.ok(spanning.stdout.equals(Buffer.concat([Buffer.alloc(4096, 0xcd), Buffer.alloc(4096, 0xce)])), 'both resident runs answered');
    const small = await ok('cat', [path.join(m.path, 'inventory.img')]);
    assert.ok(small.equals(Buffer.alloc(5000, 0x11)), 'a whole small file answered from the resident store, to its end');
    assert.equal(m.stats().reads, 0, 'no read reached this process');
    assert.equal(fetched, 0);
    // Not resident: this process answers, from the chunks.
    const other = await ddRange(file, at + 3 * 4096, 4096);
    assert.equal(other.code, 0, other.stderr);
    assert.ok(other.stdout.equals(pagesData.subarray(at + 3 * 4096, at + 4 * 4096)), 'past the runs: the chunk');
    assert.equal(m.stats().reads, 1);
    assert.ok(fetched >= 1);
    assert.deepEqual(await m.warmed(), { bytes: 3 * 4096 + 5000, failed: 0 }, 'nothing more to warm');
    await closeMount(m);
  });

  it('refuses writes, creates, truncates, removals and mkdir (EROFS)', async () => {
    const m = await mount();
    const p = (f: string) => path.join(m.path, f);
    const attempts: Array<[string, string[]]> = [
      ['sh', ['-c', `echo x > ${p('pages-1.img')}`]],
      ['sh', ['-c', `echo x >> ${p('inventory.img')}`]],
      ['sh', ['-c', `echo x > ${p('new.img')}`]],
      ['truncate', ['-s', '0', p('inventory.img')]],
      ['rm', ['-f', p('empty.img')]],
      ['mkdir', [p('newdir')]],
      ['mv', [p('inventory.img'), p('moved.img')]],
      ['touch', [p('inventory.img')]],
      ['chmod', ['777', p('inventory.img')]],
    ];
    for (const [cmd, args] of attempts) {
      const r = await run(cmd, args);
      assert.notEqual(r.code, 0, `${cmd} ${args.join(' ')} succeeded`);
      assert.match(r.stderr, /Read-only file system/, `${cmd} ${args.join(' ')}: ${r.stderr}`);
    }
    // nothing changed
    await ok('cmp', [path.join(expectedDir, 'inventory.img'), p('inventory.img')]);
    assert.equal((await ok('ls', [m.path])).toString(), 'empty.img\ninventory.img\npages-1.img\nsub\n');
    await closeMount(m);
  });

  it('fails a read whose chunk cannot be had with EIO, after onFailure settled; other reads go on', async () => {
    const bad = pagesRefs[3]!; // rejects
    const short = pagesRefs[10]!; // a buffer one byte short
    const events: string[] = [];
    const failures: Array<{ err: unknown; file: string; ref: ChunkRef }> = [];
    const m = await mount({
      chunk: async (ref) => {
        if (ref.hash === bad.hash) throw new Error('store down');
        const body = chunks.get(ref.hash)!;
        return ref.hash === short.hash ? body.subarray(1) : body;
      },
      onFailure: async (err, file, ref) => {
        assert.ok(file && ref, `onFailure without a chunk: ${String(err)}`); // only a dead server has none
        failures.push({ err, file: file.path, ref });
        events.push(`onFailure start ${ref.offset}`);
        await delay(150); // the restore killing its container
        events.push(`onFailure end ${ref.offset}`);
      },
      failedChunkTtlMs: 1000,
    });
    const file = path.join(m.path, 'pages-1.img');

    const r = await ddRange(file, bad.offset + 10, 20);
    events.push('child exited');
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /Input\/output error/);
    assert.deepEqual(events, [`onFailure start ${bad.offset}`, `onFailure end ${bad.offset}`, 'child exited']);
    assert.equal(failures[0]!.file, 'pages-1.img');
    assert.equal(failures[0]!.ref.hash, bad.hash);
    assert.match(String(failures[0]!.err), /store down/);

    const r2 = await ddRange(file, short.offset, 10);
    assert.notEqual(r2.code, 0);
    assert.match(r2.stderr, /Input\/output error/);
    const wrongSize = failures.find((f) => f.ref.hash === short.hash);
    assert.ok(wrongSize, 'onFailure for the short chunk');
    assert.ok(isPicoError(wrongSize.err, 'PICO_ERR_IMAGE_CORRUPT'), String(wrongSize.err));

    // the mount stays up: other chunks and files still read
    const r3 = await ddRange(file, pagesRefs[1]!.offset, 1000);
    assert.equal(r3.code, 0, r3.stderr);
    assert.ok(r3.stdout.equals(pagesData.subarray(pagesRefs[1]!.offset, pagesRefs[1]!.offset + 1000)));
    await ok('cmp', [path.join(expectedDir, 'sub/dir/core-1.img'), path.join(m.path, 'sub/dir/core-1.img')]);
    // a failed chunk stays failed for failedChunkTtlMs (the kernel's retry of a failed readahead
    // and other readers get EIO at once), then a read tries it again
    assert.equal(failures.filter((f) => f.ref.hash === bad.hash).length, 1);
    assert.equal(m.stats().failures, 2);
    await until(async () => {
      const r4 = await ddRange(file, bad.offset, 10);
      assert.notEqual(r4.code, 0);
      return failures.filter((f) => f.ref.hash === bad.hash).length === 2;
    }, 'a read to fetch the failed chunk again');
    assert.equal(m.stats().failures, 3);
    await closeMount(m);
  });

  it('answers EIO after failureTimeoutMs when onFailure never settles, and bounds a hanging chunk()', async () => {
    const hang = pagesRefs[4]!;
    const m = await mount({
      chunk: (ref) => (ref.hash === hang.hash ? new Promise<Buffer>(() => {}) : Promise.resolve(chunks.get(ref.hash)!)),
      chunkTimeoutMs: 200,
      onFailure: () => new Promise<void>(() => {}),
      failureTimeoutMs: 200,
    });
    const started = Date.now();
    const r = await ddRange(path.join(m.path, 'pages-1.img'), hang.offset, 10);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /Input\/output error/);
    assert.ok(Date.now() - started >= 400, 'answered before chunkTimeoutMs + failureTimeoutMs');
    assert.equal(m.stats().failures, 1);
    await closeMount(m);
  });

  it('close() while a reader holds a file open does not hang; the mountpoint is left gone or empty', async (t) => {
    const m = await mount();
    const file = path.join(m.path, 'pages-1.img');
    const child = spawn('sh', ['-c', `exec 3< ${file}; echo open; exec sleep 30`], { stdio: ['ignore', 'pipe', 'ignore'] });
    t.after(() => {
      child.kill('SIGKILL');
    });
    let out = '';
    child.stdout.on('data', (b: Buffer) => (out += b.toString()));
    await until(() => out.includes('open'), 'the reader to open the file');
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      closeMount(m),
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error('close() hung on a busy mount')), 10_000);
      }),
    ]).finally(() => clearTimeout(timer));
    assertGoneOrEmpty(m.path);
    await m.close(); // idempotent
  });

  it('a mount made before its image: the root stats at once, other requests wait for serve() and are then answered', async () => {
    const pending = await mountPending(freshDir('mnt'), { what: 'a test image' });
    let served: ImageMount | undefined;
    try {
      assert.equal((await ok('stat', ['-c', '%F', pending.path])).toString().trim(), 'directory');
      const reader = started('cat', [path.join(pending.path, 'sub/dir/core-1.img')]);
      const lister = started('ls', ['-n', pending.path]);
      await until(() => waitsOnFuse(reader.pid) && waitsOnFuse(lister.pid), 'the reader and the lister to wait on the mount');
      served = pending.serve({ manifest, chunk: async (ref) => chunks.get(ref.hash)! });
      open.add(served);
      const read = await reader.done;
      assert.equal(read.code, 0, read.stderr);
      assert.ok(read.stdout.equals(contents.get('sub/dir/core-1.img')!), 'the bytes read after serve()');
      const listed = await lister.done;
      assert.equal(listed.code, 0, listed.stderr);
      assert.match(listed.stdout.toString(), /pages-1\.img/);
      assert.throws(() => pending.serve({ manifest, chunk: async (ref) => chunks.get(ref.hash)! }), /serves an image already/);
      await ok('cmp', [path.join(expectedDir, 'pages-1.img'), path.join(served.path, 'pages-1.img')]);
    } finally {
      await pending.close();
      if (served) open.delete(served);
    }
    assertGoneOrEmpty(pending.path);
  });

  it('a mount that never gets its image: close() fails the waiting reader (no hang) and leaves nothing mounted', async () => {
    const pending: PendingMount = await mountPending(freshDir('mnt'), { what: 'a test image' });
    const reader = started('cat', [path.join(pending.path, 'inventory.img')]);
    await until(() => waitsOnFuse(reader.pid), 'the reader to wait on the mount');
    await pending.close();
    const r = await reader.done;
    assert.notEqual(r.code, 0, 'the reader got bytes of no image');
    assertGoneOrEmpty(pending.path);
  });

  it('close() is fine when the mount is already gone, and twice', async () => {
    const m = await mount();
    await ok('fusermount', ['-u', m.path]);
    await closeMount(m);
    await m.close();
    assertGoneOrEmpty(m.path);
  });

  it('refuses a non-empty mountpoint and an unsafe manifest, leaving nothing mounted', async () => {
    const dir = freshDir('full');
    mkdirSync(dir);
    writeFileSync(path.join(dir, 'x'), 'x');
    await assertMountRejects({ mountpoint: dir, manifest, chunk: async () => Buffer.alloc(0) }, /not empty/);
    const bad = (f: ImageFile[]) => ({ mountpoint: freshDir('bad'), manifest: { ...manifest, files: f }, chunk: async () => Buffer.alloc(0) });
    const corrupt = (err: unknown) => isPicoError(err, 'PICO_ERR_IMAGE_CORRUPT');
    await assertMountRejects(bad([{ path: '../etc/passwd', size: 0, mode: 0o600, chunks: [] }]), corrupt);
    await assertMountRejects(bad([{ path: 'a//b', size: 0, mode: 0o600, chunks: [] }]), corrupt);
    await assertMountRejects(bad([{ ...files[1]!, size: 3 * MiB }]), corrupt); // too few chunks
    await assertMountRejects(bad([{ ...files[1]!, chunks: [...files[1]!.chunks, files[1]!.chunks[0]!] }]), corrupt); // one too many
    await assertMountRejects(bad([{ ...files[1]!, sizes: [4000] } as ImageFile]), corrupt); // sizes do not cover the size
    await assertMountRejects(bad([files[1]!, { ...files[2]!, path: 'inventory.img/x' }]), corrupt); // file and directory
  });

  it('cleanStaleMount removes the dead mount a crashed process left behind', async (t) => {
    const mnt = freshDir('stale');
    const script = path.join(work, `crash-${seq}.mjs`);
    const moduleUrl = pathToFileURL(path.resolve(import.meta.dirname, '../pagestore/image-mount.js')).href;
    writeFileSync(
      script,
      `import { mountImage } from ${JSON.stringify(moduleUrl)};
       const manifest = ${JSON.stringify({ ...manifest, files: [files[2]] })};
       await mountImage({ mountpoint: ${JSON.stringify(mnt)}, manifest, chunk: async () => Buffer.alloc(0) });
       console.log('mounted');
       setInterval(() => {}, 1000);`,
    );
    const child = spawn(process.execPath, [script], { stdio: ['ignore', 'pipe', 'inherit'] });
    t.after(() => {
      child.kill('SIGKILL');
    });
    let out = '';
    child.stdout.on('data', (b: Buffer) => (out += b.toString()));
    await until(() => out.includes('mounted'), 'the child to mount');
    child.kill('SIGKILL');
    await until(() => child.exitCode !== null || child.signalCode !== null, 'the child to die');
    // Its FUSE server sees its channel close and exits: the mount goes dead (a stat still
    // pending then gets ECONNABORTED, later ones ENOTCONN).
    const dead = (err: NodeJS.ErrnoException) => err.code === 'ENOTCONN' || err.code === 'ECONNABORTED';
    await until(() => stat(mnt).then(() => false, dead), 'the mount to go dead');
    await assert.rejects(stat(mnt), dead);

    await cleanStaleMount(mnt);
    assert.ok(!isMounted(mnt));
    assert.ok(statSync(mnt).isDirectory());
    await cleanStaleMount(mnt); // a plain directory: left alone
    await cleanStaleMount(path.join(work, 'no-such-dir'));

    // the path mounts again (mountImage cleans a stale mount by itself too)
    const m = await mount({ mountpoint: mnt });
    await ok('cmp', [path.join(expectedDir, 'inventory.img'), path.join(m.path, 'inventory.img')]);
    await closeMount(m);
  });

  it('is served by a process of its own that holds /dev/fuse and catches no SIGCHLD; reads work', async () => {
    const m = await mount();
    assert.notEqual(m.serverPid, process.pid);
    assert.ok(fdTargets(m.serverPid).includes('/dev/fuse'), `the server (pid ${m.serverPid}) holds no /dev/fuse`);
    assert.ok(!fdTargets(process.pid).includes('/dev/fuse'), 'this process holds /dev/fuse');
    // libuv installs no signal handler there: a libfuse thread can never run one (fuse-server.ts)
    const caught = BigInt(`0x${/^SigCgt:\s*([0-9a-f]+)$/m.exec(readFileSync(`/proc/${m.serverPid}/status`, 'utf8'))![1]}`);
    assert.equal((caught >> 16n) & 1n, 0n, 'the server catches SIGCHLD (signal 17)');
    await ok('cmp', [path.join(expectedDir, 'pages-1.img'), path.join(m.path, 'pages-1.img')]);
    assert.ok(m.stats().reads > 0);
    await closeMount(m);
    assert.ok(!existsSync(`/proc/${m.serverPid}`), `the server (pid ${m.serverPid}) outlived close()`);
  });

  it('when the server dies mid-use: the waiting read and later ones fail, onFailure is called, close() cleans up', async () => {
    const slow = pagesRefs[8]!;
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    let asked = false;
    const failures: Array<{ err: unknown; file: ImageFile | undefined; ref: ChunkRef | undefined }> = [];
    const m = await mount({
      chunk: async (ref) => {
        if (ref.hash === slow.hash) {
          asked = true;
          await held; // still fetching when the server dies
        }
        return chunks.get(ref.hash)!;
      },
      onFailure: async (err, file, ref) => {
        failures.push({ err, file, ref });
      },
    });
    const file = path.join(m.path, 'pages-1.img');
    const waiting = ddRange(file, slow.offset + 100, 10);
    await until(() => asked, 'the read to wait for its chunk here');
    process.kill(m.serverPid, 'SIGKILL');

    const dead = /Transport endpoint is not connected|Software caused connection abort/;
    const r = await waiting;
    assert.equal(r.signal, null, 'the reader hung (killed by run())');
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, dead);
    await until(() => failures.length > 0, 'onFailure');
    assert.equal(failures[0]!.file, undefined);
    assert.equal(failures[0]!.ref, undefined);
    assert.match(String(failures[0]!.err), new RegExp(`FUSE server .*\\(pid ${m.serverPid}\\)`));
    const later = await ddRange(file, pagesRefs[2]!.offset, 10);
    assert.notEqual(later.code, 0);
    assert.match(later.stderr, dead);

    release(); // its answer has nowhere to go
    await closeMount(m);
    assertGoneOrEmpty(m.path);
    assert.equal(failures.length, 1);
  });

  it('survives 30 mount/unmount cycles while reads run and this process spawns children all along', async () => {
    // The freeze this guards against: a SIGCHLD handled on a libfuse thread cancelled at unmount.
    let spawning = true;
    let spawned = 0;
    const spawner = (async () => {
      while (spawning) {
        // several at once: exits pile up, and a signal pending on the main thread goes to another
        await Promise.all(Array.from({ length: 5 }, () => run('true', [])));
        spawned += 5;
      }
    })();
    try {
      for (let i = 0; i < 30; i++) {
        const m = await mount();
        const file = path.join(m.path, 'pages-1.img');
        const at = pagesRefs[(i * 7) % pagesRefs.length]!.offset;
        const r = await ddRange(file, at, 256 * KiB);
        assert.equal(r.code, 0, r.stderr);
        assert.ok(r.stdout.equals(pagesData.subarray(at, at + 256 * KiB)), `bytes at ${at}, cycle ${i}`);
        // still reading (or about to) when close() begins: it may finish or fail, never hang
        const racing = run('dd', [`if=${file}`, 'of=/dev/null', 'bs=128k']);
        await closeMount(m);
        assertGoneOrEmpty(m.path);
        const rr = await racing;
        assert.equal(rr.signal, null, `cycle ${i}: the racing reader hung`);
      }
    } finally {
      spawning = false;
      await spawner;
    }
    assert.ok(spawned >= 30, `only ${spawned} children spawned`);
  });

  it('measures sequential read throughput of the 20 MB file (dd bs=1M): reported, not asserted', async () => {
    const results: string[] = [];
    for (let i = 0; i < 3; i++) {
      const m = await mount();
      const started = process.hrtime.bigint();
      const r = await run('dd', [`if=${path.join(m.path, 'pages-1.img')}`, 'of=/dev/null', 'bs=1M']);
      const ms = Number(process.hrtime.bigint() - started) / 1e6;
      assert.equal(r.code, 0, r.stderr);
      const s = m.stats();
      const dd = /copied, ([\d.]+) s/.exec(r.stderr);
      const ddRate = dd ? `${(pages.size / MiB / Number(dd[1])).toFixed(0)} MiB/s by dd` : r.stderr.trim();
      results.push(`${ddRate}, ${((pages.size / MiB) / (ms / 1000)).toFixed(0)} MiB/s wall (incl. dd start; ${s.reads} reads, ${s.chunks} chunk fetches)`);
      await closeMount(m);
    }
    console.log(`image mount: cold sequential read of ${(pages.size / MiB).toFixed(1)} MiB via dd bs=1M: ${results.join('; ')}`);
  });
});
