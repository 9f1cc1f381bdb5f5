import { Counter, Gauge, Histogram, Registry } from 'prom-client';

/**
 * Every metric the system exports, on one registry per running system (tests run several
 * systems in one process, so nothing is registered globally). Names use DESIGN.md's words.
 */
export class Metrics {
  readonly registry = new Registry();

  readonly wakes = new Counter({
    name: 'picocenter_wakes_total',
    help: 'Wakes started, by app, trigger and result (ok, failed)',
    labelNames: ['app', 'trigger', 'result'] as const,
    registers: [this.registry],
  });

  readonly wakeSeconds = new Histogram({
    name: 'picocenter_wake_duration_seconds',
    help: 'Time from the start of a wake until the app accepts connections, by app, kind (start, restore) and mode (cold, full, lazy, activeset)',
    labelNames: ['app', 'kind', 'mode'] as const,
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [this.registry],
  });

  readonly held = new Gauge({
    name: 'picocenter_held_connections',
    help: 'Client connections and requests held right now while their app wakes',
    labelNames: ['app'] as const,
    registers: [this.registry],
  });

  readonly holdOutcomes = new Counter({
    name: 'picocenter_holds_total',
    help: 'Holds ended, by app and outcome (ready, timeout, failed, queue_full, aborted)',
    labelNames: ['app', 'outcome'] as const,
    registers: [this.registry],
  });

  readonly appsByState = new Gauge({
    name: 'picocenter_apps',
    help: 'Apps in each lifecycle state',
    labelNames: ['state'] as const,
    registers: [this.registry],
  });

  readonly checkpoints = new Counter({
    name: 'picocenter_checkpoints_total',
    help: 'Swap-outs, by app and result (ok, failed, cancelled)',
    labelNames: ['app', 'result'] as const,
    registers: [this.registry],
  });

  readonly connections = new Gauge({
    name: 'picocenter_open_connections',
    help: 'Client connections open through the gateway, by app',
    labelNames: ['app'] as const,
    registers: [this.registry],
  });

  // ── worker side: images and restores ──

  readonly checkpointBytes = new Counter({
    name: 'picocenter_checkpoint_bytes_total',
    help: 'Bytes of checkpointed images, by app and part (image: all of it; uploaded: what the store lacked; the rest was deduplicated)',
    labelNames: ['app', 'part'] as const,
    registers: [this.registry],
  });

  readonly checkpointDedup = new Gauge({
    name: 'picocenter_checkpoint_dedup_ratio',
    help: 'Share of the last checkpoint\'s image bytes the store already had (not uploaded), by app',
    labelNames: ['app'] as const,
    registers: [this.registry],
  });

  readonly restoreChunks = new Counter({
    name: 'picocenter_restore_chunks_total',
    help: 'Image chunks a lazy restore brought in, by app, mode and how (metadata, prefetched: before the process resumed; demand: a page fault waited for it; nearby: fetched beside a chunk a fault missed; swept: background)',
    labelNames: ['app', 'mode', 'how'] as const,
    registers: [this.registry],
  });

  readonly activeSetChunks = new Counter({
    name: 'picocenter_activeset_chunks_total',
    help: 'Chunks the restored app faulted on while serving its first traffic, by app and result (hit: prefetched; miss: not)',
    labelNames: ['app', 'result'] as const,
    registers: [this.registry],
  });

  readonly dnsQueries = new Counter({
    name: 'picocenter_dns_queries_total',
    help: 'DNS queries answered, by transport and rcode',
    labelNames: ['transport', 'rcode'] as const,
    registers: [this.registry],
  });

  /** A checkpoint stored `imageBytes`, of which `uploadedBytes` were new to the store. */
  checkpointed(app: string, imageBytes: number, uploadedBytes: number): void {
    this.checkpointBytes.inc({ app, part: 'image' }, imageBytes);
    this.checkpointBytes.inc({ app, part: 'uploaded' }, uploadedBytes);
    if (imageBytes > 0) this.checkpointDedup.set({ app }, 1 - uploadedBytes / imageBytes);
  }

  /** A lazy restore finished paging the app in. */
  lazyRestored(app: string, mode: string, o: { image: { metadata: number; prefetched: number; demand: number; nearby: number; swept: number }; hits: number; misses: number }): void {
    for (const how of ['metadata', 'prefetched', 'demand', 'nearby', 'swept'] as const) this.restoreChunks.inc({ app, mode, how }, o.image[how]);
    this.activeSetChunks.inc({ app, result: 'hit' }, o.hits);
    this.activeSetChunks.inc({ app, result: 'miss' }, o.misses);
  }
}
