import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import type { ActiveSetRecord, ActiveSetStore } from '../pagestore/activeset.js';
import { ChunkCache } from '../pagestore/chunk-cache.js';
import { cleanStaleMount, warmFuseServer } from '../pagestore/image-mount.js';
import type { ImageManifest, ImageStore } from '../pagestore/image-store.js';
import { describeError, isPicoError, PicoError, type ErrorCode } from '../shared/errors.js';
import type { Logger } from '../shared/log.js';
import type { AppSpec, Endpoints } from '../shared/protocol.js';
import { AppRecords, DEFAULT_PREFIX, DEFAULT_SLOTS, type AppRecord, type SlotRange } from './oci/app-records.js';
import { hasOlderLayout, hostFacts, LOG_FILE, writeBundle, type HostDirs, type HostFacts } from './oci/bundle.js';
import { tuneCgroups } from './oci/cgroup-host.js';
import { tuneRcu } from './oci/rcu-host.js';
import { prepareHostDirs } from './oci/host-dirs.js';
import { writeUserBundle } from './oci/user-bundle.js';
import { checkHost, type HostReport } from './oci/host-check.js';
import { ensureKdatCache, type KdatState } from './oci/kdat.js';
import { LazyRelay } from './oci/lazy-relay.js';
import { killQuietly } from './oci/exec.js';
import { warmSpawner } from './oci/spawner.js';
import { writeRestorePack } from './oci/restore-plan.js';
import type { RestorePacks } from '../pagestore/restore-pack.js';
import { LazyRestore, type LazyBeginOptions, type LazyOutcome } from './oci/lazy-restore.js';
import { dropLocalImage, keepLocalImage, localImageGeneration, localImageIs, matchLocalImage, warmHashThreads, type LocalImageCheck } from './oci/local-image.js';
import { createNetwork, destroyNetwork, networkExists, type AppNetwork } from './oci/netns.js';
import { criuForRunc } from './oci/criu-runc.js';
import { Runc, type AttachedContainer, type RuncExit, type Timing } from './oci/runc.js';
import { waitForPort } from './readiness.js';
import type { CheckpointResult, Container, ContainerRuntime, ExitStatus, RestoreHint } from './runtime.js';
import { KeyedQueue } from './keyed-queue.js';

/** Per-app settings the AppSpec does not carry (yet): see the proposal in the note. */
export interface OciAppOptions {
  /** memory limit of the container's cgroup, in bytes; absent: none */
  memoryLimit?: number;
  /** more host paths shown read-only at the same path, e.g. a Node installed under /opt */
  readOnlyPaths?: string[];
  /** the app's directory, mounted read-write at the same path; default: the spec's cwd */
  appDir?: string;
  /** size of the container's /tmp tmpfs in bytes (its contents are part of the image); default 64 MiB */
  tmpBytes?: number;
  /**
   * Dump and restore established TCP connections (CRIU --tcp-established). Default true: an idle
   * keep-alive connection then cannot make a swap-out fail. false: a dump with an open connection
   * fails and the app keeps running.
   */
  tcpEstablished?: boolean;
}

export interface OciRuntimeOptions {
  log: Logger;
  /** where checkpoints are stored and restores read from */
  imageStore: ImageStore;
  /** the criu runc runs (`runc --criu`): OciRuntime.create takes it from checkHost() */
  criu: string;
  /** runc binary; default `runc` on PATH */
  runc?: string;
  /** the runtime's own files (see worker/oci/app-records.ts); default /var/lib/picocenter/oci */
  stateDir?: string;
  /** container id and netns name prefix; default 'pico-' */
  prefix?: string;
  /** network slots (a /30 each in 10.200.0.0/16) apps are given; default 0..15999 */
  slots?: SlotRange;
  /** settings for every app, overridden per app by `apps` */
  defaults?: OciAppOptions;
  /** app name → its settings */
  apps?: Record<string, OciAppOptions>;
  /** how long `stop` waits after SIGTERM before SIGKILL, in ms; default 5000 */
  stopGraceMs?: number;
  /**
   * Keep an app's netns while it is stored (default true): the restore then joins it as it is
   * instead of making it afresh (two `ip` runs, 20-150 ms of the wake). CRIU leaves it locked —
   * packets to the app are dropped, so a client's SYN is retried rather than refused — and the
   * restore unlocks it. false: removed at the swap-out, made again at the wake.
   */
  keepNetworkWhileStored?: boolean;
  /** after a checkpoint is stored, delete the app's older generations; default true */
  prune?: boolean;
  /** the host's layout for bundles; default read once from the host */
  hostFacts?: HostFacts;
  /**
   * Keep each app's newest image on the worker once the page store verified it (the dump is
   * renamed, not copied), and restore from it without fetching while the newest verified
   * manifest is that image (worker/oci/local-image.ts). Default true. It costs the disk space of
   * the images of the apps stored on this worker; false: every restore fetches.
   */
  localImages?: boolean;
  /**
   * How a local image is checked against the manifest before a restore uses it: 'size' (every
   * file there with its size, nothing else) or 'sha256' (also every chunk's hash, like a fetch;
   * ~0.7 ms/MiB here). Default 'sha256'.
   */
  localImageCheck?: LocalImageCheck;
  /**
   * How CRIU locks an app's network during a dump and while it is stored: 'nftables' (in CRIU's
   * own process) or 'iptables' (CRIU spawns iptables-restore and ip6tables-restore at each dump and
   * restore: ~100-150 ms more per operation here). Given to CRIU in a config file runc passes it
   * (config.json annotation org.criu.config, STATE/criu.conf); a restore always unlocks the way
   * its image was locked. Default 'iptables' here; create() picks 'nftables' when the host
   * report says CRIU supports it.
   */
  networkLock?: 'iptables' | 'nftables';
  /**
   * A directory where every cgroup hierarchy of the host is mounted the way CRIU names them, for
   * CRIU to use at a restore instead of mounting each afresh (criu --cgroup-yard; the cgroup2
   * mount alone took 10–21 ms of every restore here). Default none; create() picks the host's
   * /sys/fs/cgroup when it is laid out so (worker/oci/cgroup-host.ts).
   */
  cgroupYard?: string;
  /**
   * Keep CRIU's kernel probe cache on /dev/shm when /run is not a tmpfs (worker/oci/kdat.ts):
   * saves the probe (95–360 ms here) in every dump and restore. Default true.
   */
  kdatCache?: boolean;
  /** image chunks for lazy restores (shared by every app of the worker); default 256 MiB in memory */
  chunkCache?: ChunkCache;
  /** where ActiveSets are read and written; absent: `activeset` restores prefetch nothing */
  activeSets?: ActiveSetStore;
  /** in ms: how long the ActiveSet window stays open after the app served its first traffic; default 500 */
  activeSetGraceMs?: number;
  /** in ms: when a lazy restore starts fetching the rest of the image (lazy-restore.ts); default 5000 */
  sweepAfterMs?: number;
  /**
   * A lazy restore starts `runc restore` before the manifest's look-up has answered (its reads of
   * the image wait for it: earlyLazyImage). Default true where the relay can run (python3); false:
   * the look-up first, as without python3.
   */
  restoreEarly?: boolean;
  /** called once a checkpoint is stored and verified: for metrics */
  onCheckpoint?(app: string, result: OciCheckpointResult): void;
  /** called once a lazy restore has paged every page in (or failed): for metrics and tests */
  onLazyRestore?(app: string, mode: 'lazy' | 'activeset', outcome: LazyOutcome): void;
}

export interface OciCreateOptions extends Omit<OciRuntimeOptions, 'criu'> {
  /** default: the criu checkHost() chose */
  criu?: string;
  /** a report already made (the worker may have run checkHost() itself); default: run it */
  hostReport?: HostReport;
  /**
   * Remount the host's cgroup2 hierarchy with `favordynmods` when it lacks it (see
   * worker/oci/cgroup-host.ts): moving a process into a new cgroup, which every restore does,
   * then no longer waits for an RCU grace period (6–16 ms here). A host-wide setting that stays
   * until a reboot. Default true.
   */
  favorDynmods?: boolean;
  /**
   * Set the kernel's rcu_expedited when it is not (see worker/oci/rcu-host.ts): CRIU's waits for
   * RCU grace periods in every restore (~30-40 ms in all here) become expedited ones. A host-wide
   * setting that stays until a reboot; it costs every CPU an interrupt per grace period. Default
   * true.
   */
  rcuExpedited?: boolean;
}

/** What OciRuntime.create found and cleaned up from a previous worker. */
export interface LeftoverReport {
  /** runc containers that were still there (killed and deleted: their memory since the last image is lost) */
  containers: string[];
  /** apps whose finished dump had not been stored yet, stored now as their newest generation */
  recovered: Array<{ app: string; generation: number }>;
  /** apps whose unfinished or unstorable dump was discarded */
  discarded: string[];
}

export interface OciCheckpointResult extends CheckpointResult {
  generation: number;
  /** bytes of the image */
  imageBytes: number;
  /** bytes the store did not have yet */
  uploadedBytes: number;
  /** runc checkpoint (freeze + CRIU dump), in ms */
  dumpMs: number;
  /** page store put (write, read back, verify), in ms */
  storeMs: number;
}

/** What a restore reads beside its look-up of the manifest (activeset mode). */
interface EarlyReads {
  activeSet?: Promise<ActiveSetRecord | undefined> | undefined;
  packs?: RestorePacks | undefined;
}

/** The image a restore reads: a directory, and what to do with it once the restore is over. */
interface RestoreImage {
  path: string;
  /** where its bytes come from first (known once the manifest is: see `manifest`) */
  source: 'local' | 'store' | undefined;
  /** the image's manifest; an early lazy image (earlyLazyImage) is made before it is known */
  manifest: Promise<ImageManifest>;
  /** lazy modes: the FUSE mount, the lazy-pages daemon and the ActiveSet */
  lazy?: LazyRestore;
  /** the restore is over (`ok`: it succeeded): delete or unmount what it read */
  release(ok: boolean): Promise<void>;
}

/** in bytes: the chunk cache when the worker is given none (worker.cache.memory's default) */
const DEFAULT_CACHE_BYTES = 256 * 1024 * 1024;

export const DEFAULT_STATE_DIR = '/var/lib/picocenter/oci';
const DEFAULT_STOP_GRACE_MS = 5000;
/** how long a runc whose init was killed may take to exit before it is killed itself */
const RUNC_EXIT_TIMEOUT_MS = 10_000;
/** Environment variables passed through from the worker (PATH is the container's own). */
const PASSED_ENV = ['LANG', 'LC_ALL', 'TZ'];
const LOG_TAIL_LINES = 20;
const LOG_TAIL_BYTES = 16 * 1024;

/** A restore went ahead on a hinted generation the listing then found was not the newest. */
class StaleHint extends Error {
  constructor(
    readonly hinted: number,
    readonly newest: number,
  ) {
    super(`generation ${hinted} is not the newest (${newest})`);
  }
}

/** runc hands this CRIU config file to CRIU (annotation org.criu.config) */
const CRIU_CONFIG_ANNOTATION = 'org.criu.config';

/**
 * One incarnation of a container: one foreground runc and the init it is the parent of. A
 * container has a new incarnation after a checkpoint that had to be resumed.
 */
interface Incarnation {
  att: AttachedContainer;
  /** set (synchronously readable) once runc exited */
  status: RuncExit | null;
}

/*
 * A container's phases. `exited` settles exactly once, on the way to `gone`:
 *
 *   starting ──ready──► running ──checkpoint()──► checkpointing ──stored──► gone
 *      │                 │  ▲                          │
 *      │ not ready       │  └── dump failed / store failed: resumed ──┘
 *      ▼                 ├──stop()──► stopping ──► gone
 *    gone                └──init exited on its own──► gone
 *
 * Only in `running` does an exit of runc mean "crashed"; in the other phases the operation that
 * is under way expects it and handles it.
 */
type Phase = 'starting' | 'running' | 'checkpointing' | 'stopping' | 'gone';

class OciContainer implements Container {
  readonly startedAt = new Date();
  readonly exited: Promise<ExitStatus>;
  phase: Phase = 'starting';
  /** a lazy restore still paging memory in (absent once every page is in, or for a full restore) */
  lazy: LazyRestore | undefined;
  /** why the runtime ended the container itself, reported with its exit */
  exitError: ExitStatus['error'];
  private settle!: (s: ExitStatus) => void;

  constructor(
    readonly runtime: OciRuntime,
    readonly spec: AppSpec,
    readonly record: AppRecord,
    readonly network: AppNetwork,
    readonly endpoints: Endpoints,
    public incarnation: Incarnation,
  ) {
    this.exited = new Promise((resolve) => (this.settle = resolve));
  }

  get app(): string {
    return this.spec.name;
  }

  /** host PID of the container's init (it changes when a checkpoint is resumed) */
  get pid(): number {
    return this.incarnation.att.pid;
  }

  finish(status: ExitStatus): void {
    if (this.phase === 'gone') return;
    this.phase = 'gone';
    this.settle(this.exitError ? { ...status, error: this.exitError } : status);
  }
}

/**
 * The `oci` runtime: each app runs as a runc container in its own PID, mount and network
 * namespaces, reached over a veth pair at a private address (so apps may share a port); a
 * swap-out dumps it with CRIU into the page store, a wake restores it — memory, listening
 * sockets and child processes — from the newest verified image.
 *
 * runc stays in the foreground as the parent of the container's init (no --detach): its exit is
 * the container's exit, with the init's status, with no polling and no PID reuse to guard
 * against. It runs in its own session, so a worker that dies leaves containers running; the next
 * OciRuntime.create() removes them (see cleanLeftovers).
 *
 * Operations on one app are serialised here too (the worker does as well), so the clean-up after
 * a crash can never overlap the next start of the same app.
 */
export class OciRuntime implements ContainerRuntime {
  readonly name = 'oci';
  readonly keepsMemory = true;
  readonly stateDir: string;
  private readonly log: Logger;
  private readonly store: ImageStore;
  private readonly runc: Runc;
  private readonly records: AppRecords;
  private readonly host: HostFacts;
  private readonly active = new Map<string, OciContainer>();
  private readonly queue = new KeyedQueue();
  /** annotations every container's config.json carries (the CRIU config file, when one is used) */
  private readonly annotations: Record<string, string> = {};
  private kdatState: KdatState | null = null;
  private hostDirs: Promise<HostDirs> | undefined;
  private cache: Promise<ChunkCache> | undefined;
  /** settles once runc has its criu (worker/oci/criu-runc.ts) */
  private runcCriu: Promise<void> | undefined;

  /**
   * Runs no host check and cleans nothing up: use OciRuntime.create() in a worker. The constructor
   * is for tests that already checked the host.
   */
  constructor(private readonly opts: OciRuntimeOptions) {
    this.log = opts.log;
    this.store = opts.imageStore;
    this.stateDir = opts.stateDir ?? DEFAULT_STATE_DIR;
    this.records = new AppRecords(this.stateDir, opts.prefix ?? DEFAULT_PREFIX, opts.slots ?? DEFAULT_SLOTS);
    this.runc = new Runc({
      criu: opts.criu,
      ...(opts.runc ? { runc: opts.runc } : {}),
      root: path.join(this.stateDir, 'runc'),
      logDir: path.join(this.stateDir, 'runc-logs'),
    });
    this.host = opts.hostFacts ?? hostFacts();
    const criuConfig = [
      ...((opts.networkLock ?? 'iptables') === 'nftables' ? ['network-lock nftables'] : []),
      ...(opts.cgroupYard ? [`cgroup-yard ${opts.cgroupYard}`] : []),
    ];
    if (criuConfig.length > 0) {
      // Without the annotation runc would use /etc/criu/runc.conf if it exists; with it, only ours.
      const conf = path.join(this.stateDir, 'criu.conf');
      mkdirSync(this.stateDir, { recursive: true });
      writeFileSync(conf, `# Written by Picocenter's oci runtime; runc hands it to CRIU (org.criu.config).\n${criuConfig.join('\n')}\n`);
      this.annotations[CRIU_CONFIG_ANNOTATION] = conf;
    }
  }

  /**
   * The runtime a worker uses: checks the host (PICO_ERR_HOST_UNSUPPORTED with the report's
   * plain-English message when it cannot run containers and checkpoint them, or when device nodes
   * do not work in its state directory — never a silent fallback), then cleans up what a previous
   * worker on the same state directory left behind.
   */
  static async create(opts: OciCreateOptions): Promise<{ runtime: OciRuntime; host: HostReport; leftovers: LeftoverReport }> {
    const host = opts.hostReport ?? (await checkHost());
    if (!host.ok || !host.criu) throw new PicoError('PICO_ERR_HOST_UNSUPPORTED', host.message);
    const cgroups = await tuneCgroups(opts);
    const rcuExpedited = tuneRcu(opts);
    const runtime = new OciRuntime({
      ...opts,
      criu: opts.criu ?? host.criu.path,
      runc: opts.runc ?? host.runc?.path,
      networkLock: opts.networkLock ?? (host.nftablesLock ? 'nftables' : 'iptables'),
      cgroupYard: opts.cgroupYard ?? cgroups.yard,
    });
    await runtime.dirs();
    opts.log.info({ stateDir: runtime.stateDir, networkLock: runtime.networkLock, cgroupYard: runtime.cgroupYard ?? null, favorDynmods: cgroups.favorDynmods, rcuExpedited }, host.message);
    await runtime.prepareCriu();
    // Lazy restores need the relay (python3) and an image mount server (node), and every
    // restore the spawner (python3): they start slowly, so the first ones are started now.
    LazyRelay.warm();
    warmFuseServer(opts.log);
    warmSpawner();
    const leftovers = await runtime.cleanLeftovers();
    return { runtime, host, leftovers };
  }

  /** Where CRIU finds the host's cgroup mounts at a restore (OciRuntimeOptions.cgroupYard). */
  get cgroupYard(): string | undefined {
    return this.opts.cgroupYard;
  }

  /** How CRIU locks an app's network (OciRuntimeOptions.networkLock). */
  get networkLock(): 'iptables' | 'nftables' {
    return this.opts.networkLock ?? 'iptables';
  }

  /**
   * Gives runc its criu (once: worker/oci/criu-runc.ts), and makes sure CRIU finds its kernel
   * probe cache (worker/oci/kdat.ts); logs when it is made or cannot be had. Cheap when it is in
   * place: it runs before every dump and restore.
   */
  async prepareCriu(): Promise<void> {
    this.runcCriu ??= criuForRunc(this.opts.criu, this.stateDir, this.log).then((criu) => this.runc.useCriu(criu));
    await this.runcCriu;
    if (this.opts.kdatCache === false) return;
    const k = await ensureKdatCache(this.opts.criu);
    if (k.state === this.kdatState || (k.state === 'ready' && this.kdatState === 'made')) return;
    if (k.state === 'made') this.log.info('made CRIU\'s kernel probe cache on /dev/shm (/run is not a tmpfs)');
    else if (k.state === 'unavailable') this.log.warn({ reason: k.reason }, 'no CRIU kernel probe cache: every dump and restore probes the kernel');
    this.kdatState = k.state;
  }

  /**
   * The host directories every container binds read-only (worker/oci/host-dirs.ts): made or
   * repaired once per runtime, by create() or else the first start or restore.
   * PICO_ERR_HOST_UNSUPPORTED when they cannot work there (a state directory mounted nodev).
   */
  private dirs(): Promise<HostDirs> {
    this.hostDirs ??= prepareHostDirs(this.stateDir).catch((err: unknown) => {
      this.hostDirs = undefined;
      throw new PicoError('PICO_ERR_HOST_UNSUPPORTED', `the oci runtime's state directory ${this.stateDir}: ${describeError(err)}`, { cause: err });
    });
    return this.hostDirs;
  }

  /** The app's stdout and stderr, on the host (`picocenter logs APP`). */
  logFile(app: string): string {
    return path.join(this.records.paths(app).logDir, LOG_FILE);
  }

  async storedImages(): Promise<Array<{ app: string; generation: number }>> {
    return this.store.apps();
  }

  /** The containers this runtime runs now. */
  containers(): Container[] {
    return [...this.active.values()];
  }

  /**
   * Starts the app from nothing. `signal` aborting before the container is ready removes whatever
   * was made and rejects with PICO_ERR_SHUTTING_DOWN.
   */
  async start(spec: AppSpec, signal?: AbortSignal): Promise<Container> {
    return this.queue.run(spec.name, async () => {
      throwIfCancelled(spec, 'start', signal);
      this.assertNoContainer(spec.name);
      const log = this.log.child({ app: spec.name });
      const record = this.record(spec.name);
      const net = this.records.network(record);
      const p = this.records.paths(spec.name);
      const started = performance.now();
      await this.prepare(spec, record, net, 'start', async () => {
        await this.removeStale(record);
        await this.writeBundle(spec, record, net);
        await createNetwork(net);
      });
      const logFrom = fileSize(this.logFile(spec.name));
      let att: AttachedContainer;
      try {
        throwIfCancelled(spec, 'start', signal);
        att = await this.runc.runAttached(record.id, p.bundle);
      } catch (err) {
        await this.cleanupNetwork(net, log);
        if (isPicoError(err)) throw err;
        throw new PicoError('PICO_ERR_WAKE_FAILED', `app ${spec.name}: runc could not start the container: ${describeError(err)}`, { cause: err });
      }
      const c = this.adopt(spec, record, net, att);
      await this.becomeReady(c, logFrom, 'start', signal);
      log.info({ container: record.id, address: net.containerAddress, pid: c.pid, ms: Math.round(performance.now() - started) }, 'container running');
      return c;
    });
  }

  /**
   * Swap-out. In order, and why:
   *   1. dump into STATE/apps/APP/staging (runc checkpoint: freeze, CRIU dump, tree killed). A
   *      failed dump leaves the tree running (CRIU unfreezes it): the app keeps serving.
   *   2. put the dump into the page store, which writes, reads back and verifies it.
   *   3. only then: the container is gone for good; delete the staging dump (and the netns unless
   *      it is kept while the app is stored).
   * If 2 fails, the dump is the only copy of the app: it is restored from the staging directory
   * into its (still existing, CRIU-locked) netns, so the app keeps serving, and the checkpoint
   * fails with PICO_ERR_CHECKPOINT_FAILED.
   */
  async checkpoint(container: Container): Promise<OciCheckpointResult> {
    const c = this.own(container);
    return this.queue.run(c.app, async () => {
      if (c.phase !== 'running' || this.active.get(c.app) !== c) {
        throw new PicoError('PICO_ERR_INVALID_STATE', `app ${c.app}: no running container to checkpoint (it is ${c.phase})`);
      }
      const log = this.log.child({ app: c.app });
      const p = this.records.paths(c.app);
      const tcpEstablished = this.appOptions(c.app).tcpEstablished ?? true;
      const inc = c.incarnation;
      if (c.spec.bundle === undefined && olderLayout(c.pid)) {
        log.warn('not checkpointed: the container has the mounts of an older layout (tmpfs /dev)');
        throw new PicoError(
          'PICO_ERR_CHECKPOINT_FAILED',
          `app ${c.app}: the container keeps running: it was restored from an image of an older container layout (a tmpfs /dev), ` +
            'and an image of it would not restore with this version. To move the app to the current layout, stop it, delete its ' +
            'images from the page store and start it afresh (its memory state is lost)',
        );
      }
      // CRIU cannot dump memory that is still being paged in: wait until every page is in.
      if (c.lazy) {
        const o = await c.lazy.finished;
        if (!o.ok) throw new PicoError('PICO_ERR_CHECKPOINT_FAILED', `app ${c.app}: its lazy restore failed, nothing to checkpoint: ${describeError(o.error)}`);
      }
      c.phase = 'checkpointing';
      rmSync(p.staging, { recursive: true, force: true });
      rmSync(p.dumpWork, { recursive: true, force: true });

      // 1. dump
      await this.prepareCriu();
      let dump: Timing;
      try {
        dump = await this.runc.checkpoint(c.record.id, { imagePath: p.staging, workPath: p.dumpWork, tcpEstablished });
      } catch (err) {
        rmSync(p.staging, { recursive: true, force: true });
        const state = await this.runc.state(c.record.id).catch(() => null);
        if (state?.status === 'running' && inc.status === null) {
          c.phase = 'running';
          log.warn({ err: describeError(err) }, 'checkpoint failed; the container keeps running');
          throw new PicoError('PICO_ERR_CHECKPOINT_FAILED', `app ${c.app}: the dump failed, the container keeps running: ${describeError(err)}`, { cause: err });
        }
        await this.lose(c, inc, log, 'the dump failed and the container is gone');
        throw new PicoError('PICO_ERR_CHECKPOINT_FAILED', `app ${c.app}: the dump failed and the container is gone: ${describeError(err)}`, { cause: err });
      }
      // The dump killed the tree; its runc exits with it.
      const status = await this.runcExit(inc);

      // 2. store and verify
      const storeStarted = performance.now();
      let stored: Awaited<ReturnType<ImageStore['put']>>;
      try {
        stored = await this.store.put(c.app, p.staging);
      } catch (storeErr) {
        log.error({ err: describeError(storeErr) }, 'storing the image failed; resuming the container from its dump');
        await this.resume(c, storeErr);
        // resume() throws when it cannot resume; here the app serves again.
        rmSync(p.staging, { recursive: true, force: true });
        throw new PicoError(
          'PICO_ERR_CHECKPOINT_FAILED',
          `app ${c.app}: storing the image failed, the container was resumed and keeps running: ${describeError(storeErr)}`,
          { cause: storeErr },
        );
      }
      const storeMs = performance.now() - storeStarted;
      if ((c.spec.restore ?? 'activeset') === 'activeset' && this.opts.activeSets) {
        // Advice for the next restore, never a reason to fail this checkpoint.
        await writeRestorePack(stored.manifest, p.staging, this.opts.activeSets).then(
          (r) => log.debug(r, 'restore packs stored'),
          (err: unknown) => log.warn({ err: describeError(err) }, 'cannot store the restore packs; the next restore fetches chunk by chunk'),
        );
      }

      // 3. the image is verified in the store: the container may go. Its dump stays on the worker
      //    as the app's local image, for the next restore.
      this.active.delete(c.app);
      c.finish(status);
      this.keepLocal(c.app, stored.manifest, log);
      if (!(this.opts.keepNetworkWhileStored ?? true)) await this.cleanupNetwork(c.network, log);
      if (this.opts.prune ?? true) {
        await this.store.prune(c.app).catch((err: unknown) => log.warn({ err: describeError(err) }, 'pruning older generations failed'));
      }
      const result: OciCheckpointResult = {
        generation: stored.manifest.generation,
        imageBytes: stored.stats.totalBytes,
        uploadedBytes: stored.stats.uploadedBytes,
        dumpMs: Math.round(dump.ms),
        storeMs: Math.round(storeMs),
      };
      log.info({ ...result, criuMs: dump.criuMs }, 'checkpoint stored');
      this.opts.onCheckpoint?.(c.app, result);
      return result;
    });
  }

  /**
   * Swap-in from the newest verified generation, as `spec.restore` says: `full` reads the whole
   * image first (fullImage), `lazy` and `activeset` restore on a FUSE image directory and page
   * memory in (lazyImage, worker/oci/lazy-restore.ts) — where the relay can run, on a mount made
   * before the manifest is in, so that `runc restore` starts at once and only its reads of the
   * image wait for the look-up (earlyLazyImage); make the netns afresh unless it was kept,
   * `runc restore`, wait until every port accepts. `hint.generation` (the gateway's record of the
   * newest generation) lets the look-up read that manifest beside its listing, and an early
   * restore start on it before the listing is in (ImageStore.lookup); should the listing name a
   * newer one, the container is removed before it is ready and the newest restored instead.
   * Nothing is left running or half-made when it throws: a missing image is
   * PICO_ERR_IMAGE_MISSING, a corrupt one or a page that cannot be had keeps the store's error
   * (PICO_ERR_IMAGE_CORRUPT, PICO_ERR_STORE). `signal` aborting
   * before the container is ready removes the restored container (the image stays stored:
   * nothing is lost) and rejects with PICO_ERR_SHUTTING_DOWN.
   */
  async restore(spec: AppSpec, signal?: AbortSignal, hint: RestoreHint = {}): Promise<Container> {
    return this.queue.run(spec.name, () => this.restoreNow(spec, signal, hint));
  }

  private async restoreNow(spec: AppSpec, signal: AbortSignal | undefined, hint: RestoreHint): Promise<Container> {
    throwIfCancelled(spec, 'restore', signal);
    this.assertNoContainer(spec.name);
    const log = this.log.child({ app: spec.name });
    const t0 = performance.now();
    const mode = spec.restore ?? 'activeset';
    const early = mode !== 'full' && (this.opts.restoreEarly ?? true) && LazyRestore.canBegin();
    // Read beside the manifest's look-up; a failure is the lazy restore's to report.
    const activeSet = mode === 'activeset' ? this.opts.activeSets?.read(spec.name) : undefined;
    // An early restore goes ahead on the hinted generation's manifest as soon as it verifies,
    // before the listing (the slowest of the look-up's reads) is in; `confirmed` then checks
    // it was the newest before the app is made ready (a stale hint: restored again, unhinted).
    const look = early && hint.generation !== undefined && this.store.lookup ? this.store.lookup(spec.name, hint.generation) : undefined;
    const latest = look ? look.newest : this.store.latest(spec.name, hint.generation);
    const packs = mode === 'activeset' ? this.opts.activeSets?.readPacks(spec.name) : undefined;
    activeSet?.catch(() => undefined);
    // When each of the wake's reads of the store was in (ms after t0), for the debug log only.
    const arrivals: Record<string, number> | undefined = log.isLevelEnabled('debug') ? {} : undefined;
    if (arrivals) {
      const arrival = (name: string, p: Promise<unknown> | undefined): void =>
        void p?.then(
          () => (arrivals[name] = Math.round(performance.now() - t0)),
          () => undefined,
        );
      arrival('activeSet', activeSet);
      arrival('newest', latest);
      arrival('expected', look?.expected);
      for (const [part, p] of Object.entries(packs ?? {})) arrival(`${part}Pack`, p);
    }
    let manifestMs = 0;
    const found = (from: Promise<ImageManifest | undefined>): Promise<ImageManifest> =>
      from.then(
        (m) => {
          if (!m) throw new PicoError('PICO_ERR_IMAGE_MISSING', `app ${spec.name} has no stored image to restore`);
          return m;
        },
        (err: unknown) => {
          throw rethrow(err, 'PICO_ERR_STORE', `app ${spec.name}: cannot look up its newest image`);
        },
      );
    const lookedUp = found(latest);
    // An early restore may look at it only once runc is done; its failure is then the restore's.
    let lookupFailure: unknown;
    lookedUp.catch((err: unknown) => (lookupFailure = err));
    const served = (look ? found(look.expected.catch(() => undefined).then((m) => m ?? latest)) : lookedUp).then((m) => {
      manifestMs = performance.now() - t0;
      return m;
    });
    // The newest generation when it is not the one the image was served with, else null.
    const confirmed = look
      ? served.then(async (m) => {
          const newest = await lookedUp;
          return newest.generation === m.generation && newest.checksum === m.checksum ? null : newest;
        })
      : Promise.resolve(null);
    // Awaited only by an early restore (through its image) or `confirmed`: no unhandled rejection.
    served.catch(() => undefined);
    confirmed.catch(() => undefined);
    const record = this.record(spec.name);
    const net = this.records.network(record);
    const p = this.records.paths(spec.name);
    rmSync(p.restore, { recursive: true, force: true });
    rmSync(p.restoreWork, { recursive: true, force: true });
    let img: RestoreImage;
    if (early) {
      // `runc restore` starts before the manifest is in: its reads of the image wait for it.
      img = await this.earlyLazyImage(spec, mode as 'lazy' | 'activeset', record, log, { activeSet, packs }, served);
    } else {
      const manifest = await lookedUp;
      img = mode === 'full' ? await this.fullImage(spec, manifest, log) : await this.lazyImage(spec, manifest, mode, record, log, { activeSet, packs });
    }
    const fetchedMs = performance.now() - t0;
    if (signal?.aborted) {
      await img.release(false);
      throwIfCancelled(spec, 'restore', signal);
    }
    // The netns kept while the app was stored (CRIU-locked; the restore unlocks it), or afresh.
    const keptNetwork = networkExists(net);
    await this.prepare(spec, record, net, 'restore', async () => {
      await this.removeStale(record);
      await this.writeBundle(spec, record, net);
      // The app's stdout and stderr are this file: CRIU reopens it by path. A worker that did
      // not run the app before has none yet.
      closeSync(openSync(this.logFile(spec.name), 'a'));
      if (!keptNetwork) await createNetwork(net);
    }).catch(async (err: unknown) => {
      await img.release(false);
      throw err;
    });
    await this.prepareCriu();
    const preparedMs = performance.now() - t0;
    const logFrom = fileSize(this.logFile(spec.name));
    let att: AttachedContainer;
    let manifest: ImageManifest;
    try {
      // An early image whose manifest could not be had already: no runc for it.
      if (img.lazy?.failure) throw img.lazy.failure;
      const attaching = this.runc.restoreAttached(record.id, {
        bundle: p.bundle,
        imagePath: img.path,
        workPath: p.restoreWork,
        tcpEstablished: this.appOptions(spec.name).tcpEstablished ?? true,
        lazyPages: img.lazy !== undefined,
      });
      // runc is asked for by now (restoreAttached, before its first await): the daemon comes
      // second. CRIU waits for it at the relay.
      img.lazy?.spawnDaemon();
      att = await attaching;
      // runc read the image, so the manifest is in; an early image's attach() may still be settling.
      manifest = await img.manifest;
      const newer = await confirmed;
      if (newer) throw new StaleHint(manifest.generation, newer.generation);
    } catch (err) {
      await this.runc.delete(record.id, { force: true }).catch(() => undefined);
      await img.release(false);
      await this.cleanupNetwork(net, log);
      if (err instanceof StaleHint) {
        // Killed before it was ready: nothing reached it, and nothing of it is kept.
        log.warn({ hinted: err.hinted, newest: err.newest }, 'the hinted generation is not the newest: restoring the newest');
        return this.restoreNow(spec, signal, {});
      }
      // A page that could not be had is the cause, not CRIU's failure that followed from it.
      if (img.lazy?.failure) throw img.lazy.failure;
      // The listing failed after the restore went ahead on the hinted manifest: the store's error.
      if (err === lookupFailure) throw err;
      const generation = await img.manifest.then((m) => m.generation).catch(() => '?');
      throw new PicoError('PICO_ERR_WAKE_FAILED', `app ${spec.name}: restore of generation ${generation} failed: ${describeError(err)}`, { cause: err });
    }
    const restoredMs = performance.now() - t0;
    const c = this.adopt(spec, record, net, att);
    if (img.lazy) {
      c.lazy = img.lazy;
      img.lazy.restored();
      // A daemon that dies before every page is in leaves the process without memory.
      void img.lazy.finished.then((o) => {
        if (c.lazy === img.lazy) c.lazy = undefined;
        this.opts.onLazyRestore?.(spec.name, mode as 'lazy' | 'activeset', o);
        if (!o.ok && c.phase !== 'gone' && c.phase !== 'stopping') void this.killForPages(c, o.error);
        void img.release(o.ok);
      });
    } else {
      await img.release(true);
    }
    try {
      await this.becomeReady(c, logFrom, 'restore', signal);
    } catch (err) {
      if (img.lazy) {
        await img.lazy.abort();
        await img.release(false);
        if (img.lazy.failure) throw img.lazy.failure;
      }
      throw err;
    }
    log.info(
      {
        generation: manifest.generation,
        pid: c.pid,
        mode,
        image: img.source,
        manifestMs: Math.round(manifestMs),
        fetchMs: Math.round(fetchedMs),
        prepareMs: Math.round(preparedMs - fetchedMs),
        keptNetwork,
        restoreMs: Math.round(restoredMs - preparedMs),
        criuMs: att.timing.criuMs,
        runcSpawnMs: att.timing.spawnMs,
        ...(img.lazy ? { prefetch: img.lazy.prefetchStats() } : {}),
        readyMs: Math.round(performance.now() - t0 - restoredMs),
        ...(arrivals ? { reads: arrivals } : {}),
      },
      'container restored',
    );
    return c;
  }

  /**
   * A full restore's image: the local copy when it is this generation and passes its check,
   * else fetched into STATE/apps/APP/restore (the store verifies every chunk).
   */
  private async fullImage(spec: AppSpec, manifest: ImageManifest, log: Logger): Promise<RestoreImage> {
    const p = this.records.paths(spec.name);
    const local = await this.useLocal(spec.name, manifest, log);
    // A local image is consumed by the attempt either way (a failed one: the next wake fetches).
    const release = async (): Promise<void> => {
      if (local) dropLocalImage(p.local);
      else rmSync(p.restore, { recursive: true, force: true });
    };
    if (!local) {
      mkdirSync(p.restore, { recursive: true });
      try {
        await this.store.get(manifest, p.restore);
      } catch (err) {
        rmSync(p.restore, { recursive: true, force: true });
        throw rethrow(err, 'PICO_ERR_STORE', `app ${spec.name}: generation ${manifest.generation} cannot be restored`);
      }
    }
    return { path: local ? p.local.dir : p.restore, source: local ? 'local' : 'store', manifest: Promise.resolve(manifest), release };
  }

  /**
   * A lazy restore's image: the stored image as a FUSE directory (lazy-restore.ts), its chunks
   * from the cache, the local copy of this generation (each chunk checked as it is read) or the
   * store. The local copy is dropped once every page is in: the next checkpoint makes a new one.
   */
  private async lazyImage(
    spec: AppSpec,
    manifest: ImageManifest,
    mode: 'lazy' | 'activeset',
    record: AppRecord,
    log: Logger,
    early: EarlyReads,
  ): Promise<RestoreImage> {
    const p = this.records.paths(spec.name);
    const local = this.hasLocal(spec.name, manifest);
    await cleanStaleMount(p.mount);
    const lazy = await LazyRestore.prepare({ ...(await this.lazyOptions(spec, mode, record, log, early)), manifest, ...(local ? { localDir: p.local.dir } : {}) });
    return { path: lazy.imagePath, source: local ? 'local' : 'store', manifest: Promise.resolve(manifest), lazy, release: this.lazyRelease(spec.name, lazy, () => local) };
  }

  /**
   * As lazyImage, but made before the manifest is in (LazyRestore.begin: the mount and the
   * relay): the image is served as soon as `manifest` resolves, while `runc restore` may be
   * starting already. A manifest that cannot be had (or served) becomes the lazy restore's
   * failure, and the mount goes: readers waiting on it fail.
   */
  private async earlyLazyImage(
    spec: AppSpec,
    mode: 'lazy' | 'activeset',
    record: AppRecord,
    log: Logger,
    early: EarlyReads,
    manifest: Promise<ImageManifest>,
  ): Promise<RestoreImage> {
    const p = this.records.paths(spec.name);
    await cleanStaleMount(p.mount);
    const lazy = await LazyRestore.begin(await this.lazyOptions(spec, mode, record, log, early));
    let local = false;
    const img: RestoreImage = {
      path: lazy.imagePath,
      source: undefined,
      manifest: manifest.then(async (m) => {
        local = this.hasLocal(spec.name, m);
        img.source = local ? 'local' : 'store';
        await lazy.attach(m, local ? p.local.dir : undefined);
        return m;
      }),
      lazy,
      release: this.lazyRelease(spec.name, lazy, () => local),
    };
    img.manifest.catch((err: unknown) => lazy.fail(err as Error));
    return img;
  }

  private hasLocal(app: string, manifest: ImageManifest): boolean {
    return (this.opts.localImages ?? true) && localImageIs(this.records.paths(app).local, manifest);
  }

  /** What a lazy restore of `spec` needs whatever its manifest. */
  private async lazyOptions(spec: AppSpec, mode: 'lazy' | 'activeset', record: AppRecord, log: Logger, early: EarlyReads): Promise<LazyBeginOptions> {
    const p = this.records.paths(spec.name);
    return {
      app: spec.name,
      mode,
      mountpoint: p.mount,
      workDir: p.restoreWork,
      criu: this.opts.criu,
      store: this.store,
      cache: await this.chunkCache(),
      ...(this.opts.activeSets ? { activeSets: this.opts.activeSets } : {}),
      ...(early.activeSet ? { activeSet: early.activeSet } : {}),
      ...(early.packs ? { packs: early.packs } : {}),
      ...(this.opts.activeSetGraceMs !== undefined ? { graceMs: this.opts.activeSetGraceMs } : {}),
      ...(this.opts.sweepAfterMs !== undefined ? { sweepAfterMs: this.opts.sweepAfterMs } : {}),
      onPageFailure: async (err) => {
        log.error({ err: describeError(err) }, 'a page of the image cannot be fetched; killing the container');
        await this.runc.kill(record.id, 'SIGKILL', { all: true }).catch(() => undefined);
      },
      log,
    };
  }

  /** A lazy image's release: a failed restore stops the lazy restore; the local copy it read goes either way. */
  private lazyRelease(app: string, lazy: LazyRestore, usedLocal: () => boolean): (ok: boolean) => Promise<void> {
    let released = false;
    return async (ok) => {
      if (released) return;
      released = true;
      if (!ok) await lazy.abort();
      if (usedLocal()) dropLocalImage(this.records.paths(app).local);
    };
  }

  /** SIGTERM, SIGKILL after the grace period, delete the container, remove its netns. */
  async stop(container: Container): Promise<void> {
    const c = this.own(container);
    await this.queue.run(c.app, async () => {
      if (c.phase === 'gone') return;
      const log = this.log.child({ app: c.app });
      c.phase = 'stopping';
      const status = await this.kill(c.record, c.incarnation, this.opts.stopGraceMs ?? DEFAULT_STOP_GRACE_MS, log);
      await c.lazy?.abort();
      if (this.active.get(c.app) === c) this.active.delete(c.app);
      await this.cleanupNetwork(c.network, log);
      dropLocalImage(this.records.paths(c.app).local);
      c.finish(status);
      log.info({ code: status.code, signal: status.signal }, 'container stopped');
    });
  }

  /** Waits for operations under way. Containers keep running: stop or checkpoint them first. */
  async close(): Promise<void> {
    await this.queue.idle();
  }

  /**
   * What a previous worker on this state directory left behind, made safe:
   * - every runc container (our runc root holds only ours) is killed and deleted. Its memory
   *   since its last stored image is lost; the app restores from that image.
   * - a finished dump in a staging directory whose container is gone (the worker died between
   *   dump and store) is stored now: it is the newest state of that app.
   * - every app's netns is removed (a wake makes it afresh), and fetched restore images deleted.
   * - local images (the newest image of a stored app, kept on the worker) stay; half-made ones
   *   are deleted. The stored dump of the second point becomes the app's local image.
   */
  async cleanLeftovers(): Promise<LeftoverReport> {
    const report: LeftoverReport = { containers: [], recovered: [], discarded: [] };
    const present = new Set<string>();
    for (const state of await this.runc.list()) {
      present.add(state.id);
      this.log.warn({ container: state.id, status: state.status, pid: state.pid }, 'removing a container left by a previous worker');
      await this.runc.kill(state.id, 'SIGKILL', { all: true }).catch(() => undefined);
      await this.runc.delete(state.id, { force: true }).catch((err: unknown) => this.log.error({ container: state.id, err: describeError(err) }, 'cannot delete a leftover container'));
      report.containers.push(state.id);
    }
    for (const record of this.records.all()) {
      const log = this.log.child({ app: record.app });
      const p = this.records.paths(record.app);
      await this.cleanupNetwork(this.records.network(record), log);
      // A lazy restore's image directory, served by the worker that died: a dead FUSE mount.
      await cleanStaleMount(p.mount).catch((err: unknown) => log.error({ err: describeError(err), mount: p.mount }, 'cannot remove a stale image mount'));
      rmSync(p.restore, { recursive: true, force: true });
      localImageGeneration(p.local);
      if (!existsSync(p.staging)) continue;
      if (!present.has(record.id) && dumpFinished(p.staging, p.dumpWork)) {
        try {
          const { manifest } = await this.store.put(record.app, p.staging);
          report.recovered.push({ app: record.app, generation: manifest.generation });
          log.warn({ generation: manifest.generation }, 'stored a dump a previous worker made but did not store');
          this.keepLocal(record.app, manifest, log);
          continue;
        } catch (err) {
          log.error({ err: describeError(err), staging: p.staging }, 'a dump a previous worker left cannot be stored; it is kept');
          report.discarded.push(record.app);
          continue;
        }
      } else {
        report.discarded.push(record.app);
      }
      rmSync(p.staging, { recursive: true, force: true });
    }
    return report;
  }

  /**
   * The app served its first traffic since its restore: its ActiveSet window closes after the
   * grace period. A no-op unless a lazy restore is still paging the app in.
   */
  served(app: string): void {
    this.active.get(app)?.lazy?.served();
  }

  /** Bytes of the app's newest image the chunk cache holds (placement prefers a warm worker). */
  async cachedBytes(app: string): Promise<number> {
    if (!this.cache) return 0;
    const manifest = await this.store.latest(app).catch(() => undefined);
    if (!manifest) return 0;
    return (await this.cache).cachedBytes(manifest.files.flatMap((f) => f.chunks));
  }

  // ---- internals ----

  private chunkCache(): Promise<ChunkCache> {
    return (this.cache ??= this.opts.chunkCache ? Promise.resolve(this.opts.chunkCache) : ChunkCache.open({ memoryBytes: DEFAULT_CACHE_BYTES, log: this.log }));
  }

  /** A lazy restore cannot page the app in: the container must not run on with missing memory. */
  private async killForPages(c: OciContainer, err: unknown): Promise<void> {
    const log = this.log.child({ app: c.app });
    log.error({ err: describeError(err) }, 'the app\'s memory cannot be paged in; killing its container');
    c.exitError = toExitError(err);
    await this.runc.kill(c.record.id, 'SIGKILL', { all: true }).catch(() => undefined);
  }

  /** After a verified put: the staging dump becomes the app's local image (or is deleted). */
  private keepLocal(app: string, manifest: ImageManifest, log: Logger): void {
    const p = this.records.paths(app);
    if (this.opts.localImages ?? true) {
      try {
        keepLocalImage(p.staging, p.local, manifest);
        if ((this.opts.localImageCheck ?? 'sha256') === 'sha256') warmHashThreads();
        return;
      } catch (err) {
        log.warn({ err: describeError(err) }, 'cannot keep the image on the worker; the next restore fetches it');
        dropLocalImage(p.local);
      }
    }
    rmSync(p.staging, { recursive: true, force: true });
  }

  /** True when the app's local image is `manifest`'s and passes its check; a mismatch deletes it. */
  private async useLocal(app: string, manifest: ImageManifest, log: Logger): Promise<boolean> {
    const p = this.records.paths(app);
    if (!(this.opts.localImages ?? true)) {
      dropLocalImage(p.local);
      return false;
    }
    if (localImageGeneration(p.local) === null) return false;
    const check = this.opts.localImageCheck ?? 'sha256';
    const m = await matchLocalImage(p.local, manifest, check).catch((err: unknown) => ({ ok: false as const, why: describeError(err) }));
    if (m.ok) return true;
    // Another generation is normal (another worker stored a newer one); anything else is damage.
    const level = /^the local image is generation/.test(m.why) ? 'info' : 'warn';
    log[level]({ generation: manifest.generation, why: m.why, check }, 'the local image cannot be used; fetching from the page store');
    dropLocalImage(p.local);
    return false;
  }

  private adopt(spec: AppSpec, record: AppRecord, net: AppNetwork, att: AttachedContainer): OciContainer {
    const endpoints: Endpoints = {};
    for (const port of spec.ports) endpoints[port] = { host: net.containerAddress, port };
    const c = new OciContainer(this, spec, record, net, endpoints, this.incarnation(att));
    this.active.set(spec.name, c);
    return c;
  }

  private incarnation(att: AttachedContainer): Incarnation {
    const inc: Incarnation = { att, status: null };
    void att.exit.then((s) => (inc.status = s));
    return inc;
  }

  /**
   * Waits until every port accepts on the container's address; then the container is `running`
   * and a later exit of its runc is a crash. On failure the container is removed and the error
   * says why, with the tail of the app's log.
   */
  private async becomeReady(c: OciContainer, logFrom: number, what: 'start' | 'restore', signal?: AbortSignal): Promise<void> {
    const inc = c.incarnation;
    const ready = new AbortController();
    const timer = setTimeout(() => ready.abort(), c.spec.readyTimeoutMs);
    const onAbort = () => ready.abort();
    if (signal?.aborted) ready.abort();
    signal?.addEventListener('abort', onAbort, { once: true });
    let failure: PicoError | null = null;
    try {
      const outcome = await Promise.race([
        Promise.all(c.spec.ports.map((port) => waitForPort(c.network.containerAddress, port, ready.signal))).then((ok) => ({ ok: ok.every(Boolean) })),
        inc.att.exit.then((exited) => ({ exited })),
      ]);
      if ('exited' in outcome) {
        const { code, signal } = outcome.exited;
        failure = new PicoError('PICO_ERR_APP_EXITED', `app ${c.app} exited before it was ready after its ${what} (code ${code}, signal ${signal})${logTail(this.logFile(c.app), logFrom)}`);
      } else if (!outcome.ok && signal?.aborted) {
        failure = new PicoError('PICO_ERR_SHUTTING_DOWN', `${what} of ${c.app} was cancelled`);
      } else if (!outcome.ok) {
        failure = new PicoError(
          'PICO_ERR_READY_TIMEOUT',
          `app ${c.app}: ports ${c.spec.ports.join(', ')} did not accept connections at ${c.network.containerAddress} within ${c.spec.readyTimeoutMs} ms after its ${what}${logTail(this.logFile(c.app), logFrom)}`,
        );
      }
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      ready.abort();
    }
    if (failure) {
      const log = this.log.child({ app: c.app });
      const status = await this.kill(c.record, inc, 0, log);
      if (this.active.get(c.app) === c) this.active.delete(c.app);
      await this.cleanupNetwork(c.network, log);
      c.finish(status);
      throw failure;
    }
    c.phase = 'running';
    this.watch(c, inc);
  }

  /** A runc exit while `running` is a crash: the container is gone; its netns is cleaned up. */
  private watch(c: OciContainer, inc: Incarnation): void {
    void inc.att.exit.then((status) => {
      if (c.incarnation !== inc || c.phase !== 'running') return; // an operation under way expects it
      const log = this.log.child({ app: c.app });
      log.warn({ code: status.code, signal: status.signal }, 'container exited on its own');
      void this.queue.run(c.app, () => this.lose(c, inc, log, 'exited on its own')).catch(() => undefined);
    });
  }

  /** The container is gone without a checkpoint: forget it and clean up after it. */
  private async lose(c: OciContainer, inc: Incarnation, log: Logger, why: string): Promise<void> {
    if (c.phase === 'gone') return;
    const status = inc.status ?? (await this.kill(c.record, inc, 0, log));
    await c.lazy?.abort();
    if (this.active.get(c.app) === c) this.active.delete(c.app);
    await this.runc.delete(c.record.id, { force: true }).catch(() => undefined);
    // A new container of the app may already exist only after this (serialised), so the
    // netns is this container's.
    await this.cleanupNetwork(c.network, log);
    c.finish(status);
    log.info({ why }, 'container removed');
  }

  /**
   * The store failed after a successful dump: restore the container from its staging dump into its
   * netns (which CRIU left locked; the restore unlocks it). Throws PICO_ERR_CHECKPOINT_FAILED when
   * even that fails; the dump is then kept in the staging directory.
   */
  private async resume(c: OciContainer, storeErr: unknown): Promise<void> {
    const log = this.log.child({ app: c.app });
    const p = this.records.paths(c.app);
    rmSync(p.restoreWork, { recursive: true, force: true });
    try {
      await this.prepareCriu();
      const att = await this.runc.restoreAttached(c.record.id, {
        bundle: p.bundle,
        imagePath: p.staging,
        workPath: p.restoreWork,
        tcpEstablished: this.appOptions(c.app).tcpEstablished ?? true,
      });
      c.incarnation = this.incarnation(att);
      await this.becomeReady(c, fileSize(this.logFile(c.app)), 'restore');
      log.warn({ pid: c.pid }, 'container resumed from its dump after the store failed');
    } catch (err) {
      log.error({ err: describeError(err), staging: p.staging }, 'resuming the container failed; its dump is kept');
      if (c.phase !== 'gone') {
        await this.runc.delete(c.record.id, { force: true }).catch(() => undefined);
        await this.cleanupNetwork(c.network, log);
        if (this.active.get(c.app) === c) this.active.delete(c.app);
        c.finish(c.incarnation.status ?? { code: null, signal: null });
      }
      throw new PicoError(
        'PICO_ERR_CHECKPOINT_FAILED',
        `app ${c.app}: storing the image failed (${describeError(storeErr)}) and resuming the container from its dump failed too ` +
          `(${describeError(err)}); the dump is kept at ${p.staging}`,
        { cause: err },
      );
    }
  }

  /**
   * Ends one incarnation: SIGTERM and up to `graceMs` for it to exit (0: straight to SIGKILL),
   * then SIGKILL to everything in it; waits for runc to exit and deletes the container.
   */
  private async kill(record: AppRecord, inc: Incarnation, graceMs: number, log: Logger): Promise<ExitStatus> {
    if (inc.status === null && graceMs > 0) {
      await this.runc.kill(record.id, 'SIGTERM').catch(() => undefined);
      await raceTimeout(inc.att.exit, graceMs);
    }
    if (inc.status === null) await this.runc.kill(record.id, 'SIGKILL', { all: true }).catch(() => undefined);
    const status = await this.runcExit(inc);
    await this.runc.delete(record.id, { force: true }).catch((err: unknown) => log.warn({ err: describeError(err) }, 'runc delete failed'));
    return status;
  }

  /** runc's exit once its init is gone; a runc that hangs on is killed. */
  private async runcExit(inc: Incarnation): Promise<RuncExit> {
    const status = await raceTimeout(inc.att.exit, RUNC_EXIT_TIMEOUT_MS);
    if (status) return status;
    killQuietly(inc.att.runcPid, 'SIGKILL');
    return inc.att.exit;
  }

  /** A container of this id that runc still has but no one runs (a crash of ours mid-operation). */
  private async removeStale(record: AppRecord): Promise<void> {
    if (!this.runc.has(record.id) || (await this.runc.state(record.id)) === null) return;
    this.log.warn({ app: record.app, container: record.id }, 'removing a stale container');
    await this.runc.kill(record.id, 'SIGKILL', { all: true }).catch(() => undefined);
    await this.runc.delete(record.id, { force: true });
  }

  /** The steps before runc: a failure is PICO_ERR_WAKE_FAILED naming the app and leaves no netns. */
  private async prepare(spec: AppSpec, record: AppRecord, net: AppNetwork, what: 'start' | 'restore', steps: () => Promise<void>): Promise<void> {
    try {
      await steps();
    } catch (err) {
      await this.cleanupNetwork(net, this.log.child({ app: spec.name }));
      throw new PicoError('PICO_ERR_WAKE_FAILED', `app ${spec.name}: cannot prepare container ${record.id} for its ${what}: ${describeError(err)}`, { cause: err });
    }
  }

  private async cleanupNetwork(net: AppNetwork, log: Logger): Promise<void> {
    await destroyNetwork(net).catch((err: unknown) => log.warn({ err: describeError(err), netns: net.name }, 'removing the netns failed'));
  }

  /**
   * The runtime's bundle of the app, in one of three layouts: the app's own OCI bundle
   * (spec.bundle: its config.json adapted, user-bundle.ts), a given root filesystem (spec.rootfs),
   * or the host's system read-only plus the app's directory (bundle.ts). Rewritten on every start
   * and restore; a restore needs the same mounts as the dump, so a bundle's config.json or a
   * rootfs should not change its mounts while the app is stored.
   */
  private async writeBundle(spec: AppSpec, record: AppRecord, net: AppNetwork): Promise<void> {
    const o = this.appOptions(spec.name);
    const env: Record<string, string> = {};
    if (spec.bundle === undefined) for (const k of PASSED_ENV) if (process.env[k] !== undefined) env[k] = process.env[k]!;
    // HOST: the gateway reaches the container at its veth address, so the app listens on all of them.
    Object.assign(env, spec.env, { APP_NAME: spec.name, PORTS: spec.ports.join(','), HOST: '0.0.0.0' });
    if (spec.ports.length > 0) env.PORT = String(spec.ports[0]);
    const p = this.records.paths(spec.name);
    const memoryLimit = spec.memoryLimit ?? o.memoryLimit;
    if (spec.bundle !== undefined) {
      writeUserBundle(
        p.bundle,
        spec.bundle,
        { id: record.id, env, logDir: p.logDir, netnsPath: net.path, annotations: this.annotations, ...(memoryLimit !== undefined ? { memoryLimit } : {}) },
        this.host,
      );
      return;
    }
    writeBundle(
      p.bundle,
      {
        id: record.id,
        args: spec.command,
        env,
        appDir: o.appDir ?? spec.cwd,
        cwd: spec.cwd,
        logDir: p.logDir,
        netnsPath: net.path,
        ...(memoryLimit !== undefined ? { memoryLimit } : {}),
        ...(spec.rootfs !== undefined ? { rootfs: spec.rootfs } : {}),
        annotations: this.annotations,
        ...(o.readOnlyPaths ? { readOnlyPaths: o.readOnlyPaths } : {}),
        ...(o.tmpBytes !== undefined ? { tmpBytes: o.tmpBytes } : {}),
        dirs: await this.dirs(),
      },
      this.host,
    );
  }

  private appOptions(app: string): OciAppOptions {
    const d = this.opts.defaults ?? {};
    const a = this.opts.apps?.[app] ?? {};
    return { ...d, ...a, readOnlyPaths: [...(d.readOnlyPaths ?? []), ...(a.readOnlyPaths ?? [])] };
  }

  /** The app's id and network slot (made on first use); a failure is PICO_ERR_WAKE_FAILED. */
  private record(app: string): AppRecord {
    try {
      return this.records.ensure(app);
    } catch (err) {
      throw new PicoError('PICO_ERR_WAKE_FAILED', `app ${app}: ${describeError(err)}`, { cause: err });
    }
  }

  private assertNoContainer(app: string): void {
    if (this.active.has(app)) throw new PicoError('PICO_ERR_INVALID_STATE', `app ${app} already has a container on this worker`);
  }

  private own(container: Container): OciContainer {
    if (!(container instanceof OciContainer) || container.runtime !== this) {
      throw new PicoError('PICO_ERR_INVALID_STATE', `app ${container.app}: the container is not one of this oci runtime's`);
    }
    return container;
  }
}

/**
 * `p`, or null after `ms`. The timer is cancelled once `p` settles: a timer left pending would
 * keep the process alive (`picocenter up` lingered ~10 s after "stopped" before it was).
 */
async function raceTimeout<T>(p: Promise<T>, ms: number): Promise<T | null> {
  const ac = new AbortController();
  try {
    return await Promise.race([p, delay(ms, null, { signal: ac.signal })]);
  } finally {
    ac.abort();
  }
}

function toExitError(err: unknown): NonNullable<ExitStatus['error']> {
  return { code: isPicoError(err) ? err.code : 'PICO_ERR_WAKE_FAILED', message: describeError(err) };
}

function throwIfCancelled(spec: AppSpec, what: 'start' | 'restore', signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new PicoError('PICO_ERR_SHUTTING_DOWN', `${what} of ${spec.name} was cancelled`);
}

/** Keeps a PicoError's code (IMAGE_CORRUPT, IMAGE_MISSING…) and adds what we were doing. */
function rethrow(err: unknown, fallback: ErrorCode, doing: string): PicoError {
  const code = isPicoError(err) ? err.code : fallback;
  return new PicoError(code, `${doing}: ${describeError(err)}`, { cause: err });
}

/** A finished dump: an inventory and CRIU's own last word that it finished. */
function dumpFinished(imageDir: string, workDir: string): boolean {
  if (!existsSync(path.join(imageDir, 'inventory.img'))) return false;
  try {
    return /Dumping finished successfully/.test(readFileSync(path.join(workDir, 'dump.log'), 'utf8'));
  } catch {
    return false;
  }
}

/** Whether the init `pid` has an older layout's mounts (bundle.ts); false when it cannot be read (gone). */
function olderLayout(pid: number): boolean {
  try {
    return hasOlderLayout(readFileSync(`/proc/${pid}/mountinfo`, 'utf8'));
  } catch {
    return false;
  }
}

function fileSize(file: string): number {
  try {
    return statSync(file).size;
  } catch {
    return 0;
  }
}

/** The app's last log lines written since byte `from`, for an error message. */
function logTail(file: string, from: number): string {
  let text = '';
  try {
    const size = fileSize(file);
    const start = Math.max(from, size - LOG_TAIL_BYTES);
    if (size <= start) return '';
    const fd = openSync(file, 'r');
    try {
      const buf = Buffer.alloc(size - start);
      readSync(fd, buf, 0, buf.length, start);
      text = buf.toString('utf8');
    } finally {
      closeSync(fd);
    }
  } catch {
    return '';
  }
  const lines = text.trimEnd().split('\n').slice(-LOG_TAIL_LINES);
  return lines.length > 0 && lines[0] !== '' ? `; last log lines:\n    ${lines.join('\n    ')}` : '';
}
