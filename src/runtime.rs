//! Threads, cores, drivers, listeners and shutdown. The main thread binds every listener once
//! per worker (SO_REUSEPORT, so the kernel spreads connections across workers), starts one
//! thread per worker, each pinned to its core and running its own monoio runtime, waits for
//! them to report in, then waits for SIGTERM/SIGINT. Each worker has a descriptor table of its
//! own and receives its listening sockets over a Unix socket (`handover`); otherwise workers
//! hear from the main thread only through a crossbeam channel that they poll on a timer.

use std::net::TcpListener as StdListener;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use tracing::{error, info, warn};

use crate::accept::Listening;
use crate::access_log::{self, AccessLog, LogControl};
use crate::admin::{self, AdminState};
use crate::auth::basic;
use crate::bind;
use crate::cache::{self, Batch};
use crate::config::{Config, DriverChoice, ListenerId};
use crate::control::{Control, Event};
use crate::handover::{self, Inbox, Parcel};
use crate::metrics::Snapshot;
use crate::ratelimit::{self, Grants, Report};
use crate::reload::{ReloadStatus, Reloader};
use crate::services;
use crate::startup::signal_channel;
pub use crate::startup::StartError;
use crate::tls::{self, watch::TlsUpdate};
use crate::upgrade;
use crate::upstream;
use crate::worker::Worker;

/// How often a worker looks at its channels and does upkeep (at most: a shorter rate-limit
/// sync interval shortens it). Timeouts are enforced to this granularity.
const CONTROL_TICK: Duration = Duration::from_millis(25);
/// Idle upstream connections past their timeout are closed this often.
const SWEEP_EVERY: u32 = 40;

/// Runs the gateway until a signal (or a successor, see `upgrade`) has drained it. Returns
/// once every worker has stopped. `predecessor`: what `ringway --upgrade` took over, and the
/// connection to confirm on once this process serves.
pub fn run(
    config: Config,
    mut predecessor: Option<(upgrade::Handed, UnixStream)>,
) -> Result<(), StartError> {
    let workers = config.runtime.workers;
    let mut sockets: bind::PerWorker = (0..workers).map(|_| Vec::new()).collect();
    let mut offered = upgrade::Offered::default();
    for (i, l) in config.listeners.iter().enumerate() {
        let handed = predecessor.as_mut().map(|(h, _)| h);
        let dups = bind::listen(ListenerId(i as u16), l, workers, handed, &mut sockets).map_err(
            |error| StartError::Bind {
                listener: l.name.clone(),
                addr: l.addr,
                error,
            },
        )?;
        offered.listeners.push((l.clone(), dups));
    }
    for c in config.consumers.iter().filter(|c| c.plain_keys) {
        warn!(consumer = %c.name, "an API key is in the config in plain text; give its digest instead (\"sha256:\" and `printf %s KEY | sha256sum`)");
    }
    for u in &config.upstreams {
        if u.tls.as_ref().is_some_and(|t| !t.verify) {
            warn!(upstream = %u.name, "TLS verification is off for this upstream (verify = false): any server can pose as it");
        }
    }
    let admin_socket = match config.admin {
        Some(addr) => {
            let inherited = predecessor.as_mut().and_then(|(h, _)| h.take_admin(addr));
            let s = match inherited {
                Some(s) => s,
                None => StdListener::bind(addr).map_err(|error| StartError::Bind {
                    listener: "admin".into(),
                    addr,
                    error,
                })?,
            };
            info!(address = %s.local_addr().unwrap_or(addr), "admin listening");
            offered.admin = s.try_clone().ok().map(|d| (addr, d.into()));
            Some(s)
        }
        None => None,
    };

    let signals = signal_channel()?;
    let access_log = match &config.access_log {
        Some(cfg) => Some(
            access_log::spawn_writer(cfg)
                .map_err(|e| StartError::AccessLog(cfg.path.clone(), e))?,
        ),
        None => None,
    };
    let config = Arc::new(config);
    let (events_tx, events) = crossbeam_channel::unbounded();
    // Snapshots go to the aggregator on the admin thread; without an admin listener there is
    // nobody to read them. Bounded: a stalled aggregator loses snapshots, not memory.
    let (metrics_tx, metrics_rx) = crossbeam_channel::bounded(workers * 64);
    let metrics_tx = admin_socket.as_ref().map(|_| metrics_tx);
    // Rate-limit reports go to the sync thread, which answers each worker on its own channel.
    let (reports_tx, reports_rx) = crossbeam_channel::bounded(workers * 64);
    let grant_channels: Vec<(Sender<Grants>, Receiver<Grants>)> = (0..workers)
        .map(|_| crossbeam_channel::bounded(64))
        .collect();
    if !config.rate_limits.is_empty() {
        ratelimit::sync::spawn(
            &config.rate_limits,
            workers,
            reports_rx,
            grant_channels.iter().map(|(tx, _)| tx.clone()).collect(),
        )
        .map_err(|e| StartError::Worker(e.to_string()))?;
    }
    // Cache changes go from every worker to every other; the admin can send purges to all.
    type CacheLinks = Option<cache::Links>;
    let (cache_links, cache_purge): (Vec<CacheLinks>, Vec<Sender<Batch>>) = match config.cache {
        Some(_) => {
            let (per_worker, all) = cache::links(workers);
            (per_worker.into_iter().map(Some).collect(), all)
        }
        None => ((0..workers).map(|_| None).collect(), Vec::new()),
    };
    // Rotated certificates go from the watcher to every worker.
    let (tls_tx, tls_rx): (Vec<Sender<TlsUpdate>>, Vec<Receiver<TlsUpdate>>) =
        (0..workers).map(|_| crossbeam_channel::bounded(8)).unzip();
    let (reload_asks_tx, reload_asks) = crossbeam_channel::bounded(1);
    let reload_status = Arc::new(ReloadStatus::new(&config, reload_asks_tx));
    let admin_state = Arc::new(AdminState::new(Arc::clone(&reload_status)));
    let (tls_watch, tls_reloads) = crossbeam_channel::bounded(4);
    tls::watch::spawn(&config, tls_tx, Arc::clone(&admin_state.certs), tls_reloads)
        .map_err(|e| StartError::Worker(e.to_string()))?;
    // Basic-auth password hashes are checked on a thread of their own (started even when no
    // consumer has a password yet: a reload may add one).
    let (jobs, answers) =
        basic::spawn_verifier(workers).map_err(|e| StartError::Worker(e.to_string()))?;
    let mut basic_links: Vec<Option<(basic::Jobs, basic::Answers)>> = answers
        .into_iter()
        .map(|a| Some((jobs.clone(), a)))
        .collect();
    // Worker 0's services (JWKS, upstream health) and their channels to every worker.
    let service_links = services::links(workers, &admin_state);
    let mut controls = Vec::with_capacity(workers);
    let mut outboxes = Vec::with_capacity(workers);
    // Each worker's end of its socket link, kept open here until the worker has taken it.
    let mut ends = Vec::with_capacity(workers);
    let links = sockets
        .into_iter()
        .zip(grant_channels)
        .zip(cache_links)
        .zip(tls_rx)
        .zip(service_links);
    for (id, ((((listeners, (_, grants)), cache_links), tls), services)) in links.enumerate() {
        let (tx, rx) = crossbeam_channel::bounded(4);
        controls.push(tx);
        let handover_error =
            |e: std::io::Error| StartError::Worker(format!("socket hand-over: {e}"));
        let (mut outbox, end) = handover::link().map_err(handover_error)?;
        let parcel = outbox.send(listeners).map_err(handover_error)?;
        let end_fd = end.raw();
        outboxes.push(outbox);
        ends.push(end);
        let config = Arc::clone(&config);
        let channels = Channels {
            control: rx,
            events: events_tx.clone(),
            metrics: metrics_tx.clone(),
            access_log: access_log.as_ref().map(|log| log.lines.clone()),
            reports: (!config.rate_limits.is_empty()).then(|| reports_tx.clone()),
            grants,
            cache: cache_links,
            tls,
            basic: basic_links[id].take(),
            services: Some(services),
        };
        thread::Builder::new()
            .name(format!("ringway-w{id}"))
            .spawn(move || worker_thread(id, &config, (end_fd, parcel), channels))
            .map_err(|e| StartError::Worker(e.to_string()))?;
    }
    drop(events_tx);
    drop(metrics_tx);
    drop(reports_tx);
    let log_writer = access_log.map(|log| (log.control, log.handle));

    for _ in 0..workers {
        match events.recv() {
            Ok(Event::Started | Event::Reloaded) => {}
            Ok(Event::Failed(e)) => return Err(StartError::Worker(e)),
            Ok(Event::Stopped { worker, .. }) => {
                return Err(StartError::Worker(format!(
                    "worker {worker} stopped at start-up"
                )))
            }
            Err(_) => return Err(StartError::Worker("a worker thread died".into())),
        }
    }
    // Every worker has its own copy of its end (or a duplicate): these close only this table's.
    drop(ends);
    if let Some(s) = admin_socket {
        admin::spawn(
            s,
            Arc::clone(&admin_state),
            Arc::clone(&config),
            metrics_rx,
            cache_purge,
        )
        .map_err(|e| StartError::Worker(e.to_string()))?;
    }
    admin_state.set_ready();
    info!(workers, "ready");
    if let Some((_, stream)) = predecessor.take() {
        match upgrade::confirm(stream) {
            Ok(()) => info!("took over from the previous process, which now drains"),
            Err(e) => warn!(error = %e, "the previous process did not confirm the upgrade"),
        }
    }
    let offered = Arc::new(Mutex::new(offered));
    let (handed_over_tx, handed_over) = crossbeam_channel::bounded(1);
    // The main thread keeps a sender, so that without an upgrade socket the channel stays open
    // (and silent) rather than disconnected.
    upgrade::listen(&config, Arc::clone(&offered), handed_over_tx.clone())
        .map_err(|e| StartError::Worker(format!("upgrade socket: {e}")))?;

    let mut reloader = Reloader::new(
        Arc::clone(&config),
        controls,
        outboxes,
        tls_watch,
        reload_status,
        offered,
    );
    let mut handing_over = false;
    // Events a reload met while waiting for the workers (a worker that stopped).
    let mut missed = Vec::new();
    loop {
        if let Some(Event::Stopped { worker, .. }) = missed.pop() {
            error!(worker, "worker stopped unexpectedly; shutting down");
            break;
        }
        crossbeam_channel::select! {
            recv(handed_over) -> _ => {
                handing_over = true;
                break;
            }
            recv(reload_asks) -> ask => {
                if let Ok(reply) = ask {
                    let _ = reply.send(reloader.reload(&events, &mut missed));
                }
            }
            recv(signals) -> sig => match sig.unwrap_or_default() {
                SIGHUP => {
                    info!("SIGHUP: reloading the configuration");
                    let _ = reloader.reload(&events, &mut missed);
                }
                SIGUSR1 => match &log_writer {
                    Some((control, _)) => {
                        info!("SIGUSR1: reopening the access log");
                        let _ = control.try_send(LogControl::Reopen);
                    }
                    None => info!("SIGUSR1: no access log to reopen"),
                },
                sig => {
                    info!(signal = sig, "draining");
                    break;
                }
            },
            recv(events) -> ev => match ev {
                // A late answer to a reload that timed out.
                Ok(Event::Reloaded) => {}
                Ok(Event::Stopped { worker, .. }) => {
                    error!(worker, "worker stopped unexpectedly; shutting down");
                    break;
                }
                _ => break,
            }
        }
    }
    // Handing over, the admin socket is shared with the successor: it stays "ready".
    if !handing_over {
        admin_state.set_draining();
    }
    let config = Arc::clone(&reloader.config);
    for c in &reloader.controls {
        let _ = c.send(Control::Drain {
            close_listeners: !handing_over,
        });
    }
    let deadline = Instant::now() + config.runtime.drain_timeout + Duration::from_secs(1);
    let mut stopped = 0;
    while stopped < workers {
        crossbeam_channel::select! {
            recv(events) -> ev => match ev {
                Ok(Event::Stopped { worker, unfinished }) => {
                    stopped += 1;
                    if unfinished > 0 {
                        warn!(worker, unfinished, "drain timeout: abandoning requests in flight");
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            },
            recv(signals) -> sig => {
                if matches!(sig, Ok(SIGTERM | SIGINT)) {
                    warn!("second signal: exiting without waiting");
                    break;
                }
            },
            default(deadline.saturating_duration_since(Instant::now())) => {
                warn!("workers did not stop in time");
                break;
            }
        }
    }
    // Every worker handed over its last lines before it stopped: the writer writes what is
    // queued and ends (bounded, in case the disk hangs).
    if let Some((control, handle)) = log_writer {
        let _ = control.send(LogControl::Finish);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !handle.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
    }
    info!("stopped");
    Ok(())
}

/// A worker's links to the rest of the process, all crossbeam channels read or written on
/// the worker's tick.
struct Channels {
    control: Receiver<Control>,
    events: Sender<Event>,
    metrics: Option<Sender<Snapshot>>,
    access_log: Option<Sender<Vec<u8>>>,
    reports: Option<Sender<Report>>,
    grants: Receiver<Grants>,
    cache: Option<cache::Links>,
    tls: Receiver<TlsUpdate>,
    /// The basic-auth verifier's job channel and this worker's answers.
    basic: Option<(basic::Jobs, basic::Answers)>,
    /// Worker 0's services' channels (and, on worker 0, the services).
    services: Option<services::WorkerLinks>,
}

/// `end`: the number of this worker's `handover::WorkerEnd` in the main thread's table, and the
/// parcel of its first listening sockets, already sent on it.
fn worker_thread(id: usize, config: &Arc<Config>, end: (RawFd, Parcel), channels: Channels) {
    let events = channels.events.clone();
    // First, before this thread opens anything (its ring, its epoll): its own descriptor table.
    let inbox = match handover::own_table(id, end.0) {
        Ok(inbox) => inbox,
        Err(e) => {
            let _ = events.send(Event::Failed(format!("descriptor table: {e}")));
            return;
        }
    };
    let core = config.runtime.cores[id];
    let pinned = match core {
        Some(c) => core_affinity::set_for_current(core_affinity::CoreId { id: c }),
        None => false,
    };
    if core.is_some() && !pinned {
        warn!(worker = id, core = ?core, "could not pin worker to its core");
    }
    let entries = config.runtime.ring_entries;
    let ctx = WorkerStart {
        id,
        core: core.filter(|_| pinned),
        config,
        inbox,
        first: Some(end.1),
        channels,
    };
    // The ring has one submitter, this thread, and completions are posted when the worker asks
    // for them (SINGLE_ISSUER, DEFER_TASKRUN: Linux 6.1+), rather than by interrupting it: 9 of
    // 10 alternating reps cheaper in CPU per proxied request (README). Older kernels refuse the
    // flags, and get the plain ring.
    let ring = |deferred: bool| {
        let mut urb = io_uring::IoUring::builder();
        if deferred {
            urb.setup_single_issuer().setup_defer_taskrun();
        }
        RuntimeBuilder::<IoUringDriver>::new()
            .uring_builder(urb)
            .with_entries(entries)
            .enable_timer()
            .build()
    };
    let uring = || {
        ring(true).or_else(|e| {
            info!(worker = id, error = %e, "io_uring without deferred task running (kernel before 6.1?)");
            ring(false)
        })
    };
    let result = match config.runtime.driver {
        DriverChoice::Legacy => legacy(ctx),
        DriverChoice::IoUring => match uring() {
            Ok(mut rt) => {
                rt.block_on(worker_main(ctx, "io_uring"));
                Ok(())
            }
            Err(e) => Err(format!("io_uring unavailable (driver = \"io_uring\"): {e}")),
        },
        DriverChoice::Auto => match uring() {
            Ok(mut rt) => {
                rt.block_on(worker_main(ctx, "io_uring"));
                Ok(())
            }
            Err(e) => {
                warn!(worker = id, error = %e, "io_uring unavailable; falling back to the epoll (legacy) driver");
                legacy(ctx)
            }
        },
    };
    if let Err(e) = result {
        error!(worker = id, "{e}");
        let _ = events.send(Event::Failed(e));
    }
}

fn legacy(ctx: WorkerStart<'_>) -> Result<(), String> {
    let mut rt = RuntimeBuilder::<LegacyDriver>::new()
        .enable_timer()
        .build()
        .map_err(|e| format!("cannot start the epoll driver: {e}"))?;
    rt.block_on(worker_main(ctx, "legacy"));
    Ok(())
}

struct WorkerStart<'a> {
    id: usize,
    core: Option<usize>,
    config: &'a Arc<Config>,
    /// Where this worker's listening sockets arrive, and the first ones.
    inbox: Inbox,
    first: Option<Parcel>,
    channels: Channels,
}

async fn worker_main(mut ctx: WorkerStart<'_>, driver: &'static str) {
    let access_log = ctx
        .config
        .access_log
        .as_ref()
        .zip(ctx.channels.access_log.clone())
        .map(|(cfg, tx)| AccessLog::new(cfg.format, tx));
    let cache_links = ctx.channels.cache.take();
    let worker = Rc::new(Worker::new(ctx.id, ctx.config, access_log, cache_links));
    if let Some((jobs, answers)) = ctx.channels.basic.take() {
        worker.basic.link(ctx.id, jobs, answers);
    }
    let mut listening = Listening::default();
    let first = ctx.first.take().map(|p| ctx.inbox.receive(p));
    let added = first
        .unwrap_or_else(|| Ok(Vec::new()))
        .and_then(|sockets| listening.add(&worker, ctx.config, sockets));
    if let Err(e) = added {
        let _ = ctx
            .channels
            .events
            .send(Event::Failed(format!("listener: {e}")));
        return;
    }
    let mut services = ctx
        .channels
        .services
        .take()
        .map(|links| services::Running::start(&worker, ctx.config, links));
    info!(worker = ctx.id, core = ?ctx.core, driver, "worker started");
    let _ = ctx.channels.events.send(Event::Started);

    let mut ticks = 0u32;
    let mut drain_deadline: Option<Instant> = None;
    let mut last_snapshot = Instant::now();
    // The tick is also when rate-limit reports go out, so it is no longer than their interval.
    let tick = ctx
        .config
        .rate_limits
        .iter()
        .map(|l| l.sync_interval)
        .chain(ctx.config.cache.as_ref().map(|c| c.sync_interval))
        .fold(CONTROL_TICK, Duration::min);
    loop {
        monoio::time::sleep(tick).await;
        ticks = ticks.wrapping_add(1);
        worker.deadlines.tick();
        if ticks.is_multiple_of(SWEEP_EVERY) {
            let gen = worker.generation();
            for up in gen.upstreams.iter() {
                up.sweep_idle(worker.now());
            }
            upstream::client::summarize_failures(&worker.upstream_ctx(), &gen.upstreams);
            if ctx.channels.metrics.is_none() {
                worker.prune_retired();
            }
        }
        worker.flush_access_log();
        if let Some(tx) = &ctx.channels.reports {
            worker.sync_rate_limits(tx, &ctx.channels.grants);
        }
        if let Some(cache) = &worker.cache {
            cache.sync(worker.now());
        }
        for update in ctx.channels.tls.try_iter() {
            worker.install_tls(update);
        }
        worker.basic.poll_answers();
        if let Some(services) = &mut services {
            services.tick(&worker);
        }
        if let Some(tx) = &ctx.channels.metrics {
            let now = worker.now();
            let interval = now.saturating_duration_since(last_snapshot);
            if interval >= ctx.config.metrics_interval {
                last_snapshot = now;
                let _ = tx.try_send(worker.snapshot(interval));
            }
        }
        if drain_deadline.is_none() {
            let drain = loop {
                match ctx.channels.control.try_recv() {
                    Ok(Control::Reload { config, sockets }) => {
                        let sockets = ctx.inbox.receive(sockets);
                        apply_reload(&worker, &mut listening, &mut services, &config, sockets)
                            .await;
                        let _ = ctx.channels.events.send(Event::Reloaded);
                    }
                    Ok(Control::Drain { close_listeners }) => break Some(close_listeners),
                    Err(crossbeam_channel::TryRecvError::Disconnected) => break Some(true),
                    Err(crossbeam_channel::TryRecvError::Empty) => break None,
                }
            };
            if let Some(close) = drain {
                worker.draining.set(true);
                // Every listener stops listening before this worker does anything else, busy or
                // idle: an idle worker would otherwise leave at once with its accept in flight.
                listening.stop_all(close).await;
                drain_deadline = Some(Instant::now() + ctx.config.runtime.drain_timeout);
            }
        }
        if let Some(deadline) = drain_deadline {
            let idle = worker.inflight() == 0 && worker.first_pending() == 0;
            if idle || Instant::now() >= deadline {
                break;
            }
        }
    }
    worker.flush_access_log();
    let _ = ctx.channels.events.send(Event::Stopped {
        worker: ctx.id,
        unfinished: worker.inflight(),
    });
}

/// Applies a reloaded config on this worker: the next requests' generation, the listeners,
/// and (worker 0) the services.
async fn apply_reload(
    worker: &Rc<Worker>,
    listening: &mut Listening,
    services: &mut Option<services::Running>,
    config: &Arc<Config>,
    sockets: std::io::Result<Vec<(ListenerId, StdListener)>>,
) {
    worker.reload(config);
    let added = match sockets {
        Ok(sockets) => listening.reload(worker, config, sockets).await,
        Err(e) => Err(e),
    };
    if let Err(e) = added {
        error!(worker = worker.id, error = %e, "a new listener could not start here");
    }
    if let Some(services) = services {
        services.reconfigure(worker, config);
    }
}
