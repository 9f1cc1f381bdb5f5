import type { Metrics } from '../shared/metrics.js';
import { rcodeName } from './wire.js';

const RCODES = 32; // 5 bits: every RCODE this server sends (BADVERS = 16 included)

/**
 * Counts answered queries by transport and rcode into picocenter_dns_queries_total, batched:
 * the hot path bumps a plain array slot, and the sums go to prom-client once per event-loop
 * turn (setImmediate), which under load covers many queries. So the metric lags the answers
 * by at most one turn; stop() flushes what is left.
 */
export class QueryCounter {
  private readonly counts = new Float64Array(2 * RCODES);
  private scheduled = false;
  private readonly flushSoon = (): void => this.flush();

  constructor(private readonly metric: Metrics['dnsQueries']) {}

  count(tcp: boolean, rcode: number): void {
    this.counts[(tcp ? RCODES : 0) + (rcode & (RCODES - 1))]!++;
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(this.flushSoon);
    }
  }

  flush(): void {
    this.scheduled = false;
    const c = this.counts;
    for (let i = 0; i < c.length; i++) {
      if (c[i] === 0) continue;
      this.metric.inc({ transport: i >= RCODES ? 'tcp' : 'udp', rcode: rcodeName(i % RCODES) }, c[i]);
      c[i] = 0;
    }
  }
}
