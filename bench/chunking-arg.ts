import { pageChunking, type PageChunking } from '../pagestore/chunker.js';

/**
 * The page store benchmarks' `--chunking MIN,AVG,MAX` (pages): how images are cut. Default: the
 * store's default content-defined chunking (4,16,64); `256,256,256` gives fixed 1 MiB chunks,
 * the format-1 layout, for comparison.
 */
export function chunkingArg(argv: string[]): PageChunking {
  const i = argv.indexOf('--chunking');
  if (i < 0 || !argv[i + 1]) return pageChunking();
  const [minPages, avgPages, maxPages] = argv[i + 1]!.split(',').map(Number);
  return pageChunking({ minPages, avgPages, maxPages });
}

/** `min/avg/max pages (max N KiB)`, for a benchmark's header line. */
export function describeChunking(c: PageChunking): string {
  return `chunking ${c.minPages}/${c.avgPages}/${c.maxPages} pages (max ${(c.maxPages * 4096) / 1024} KiB)`;
}
