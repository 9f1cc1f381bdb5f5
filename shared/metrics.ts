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
    help: 'Time from the start of a wake until the app accepts connections, by app and kind (start, restore)',
    labelNames: ['app', 'kind'] as const,
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

  readonly dnsQueries = new Counter({
    name: 'picocenter_dns_queries_total',
    help: 'DNS queries answered, by transport and rcode',
    labelNames: ['transport', 'rcode'] as const,
    registers: [this.registry],
  });
}
