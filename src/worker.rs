//! Everything one worker thread owns: its current `Generation` (router, route chains and
//! terminals, upstream pools and balancers), its rate limiters and cache, its random numbers,
//! metrics and drain state. Built from the config on the worker's own thread and reached
//! through an `Rc`, so the request path never synchronises.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use tracing::error;

use crate::access_log::AccessLog;
use crate::auth::basic::BasicChecks;
use crate::cache::{Links, WorkerCache};
use crate::config::{Config, Limits, ListenerId, ListenerTls, RateLimitId};
use crate::deadline::{Deadline, Deadlines};
use crate::error::Reject;
use crate::filter::Ctx;
use crate::generation::Generation;
use crate::http::ParseLimits;
use crate::metrics::{Gauges, Snapshot, WorkerMetrics};
use crate::ratelimit::{Grants, Limiter, Report};
use crate::rng::Rng;
use crate::tls::{self, watch::TlsUpdate};
use crate::upstream::UpstreamCtx;

pub struct Worker {
    pub id: usize,
    pub limits: Limits,
    /// `limits`' part that the codec enforces.
    pub parse_limits: ParseLimits,
    /// The request path built from the current config; a request keeps the one it started on.
    generation: RefCell<Rc<Generation>>,
    /// Generations replaced while requests were still on them: their metrics are collected
    /// until the last such request ends (each is dropped once only this list holds it).
    retired: RefCell<Vec<Rc<Generation>>>,
    pub rng: Rng,
    /// Set when shutdown begins: finish what is in flight, take nothing new.
    pub draining: Cell<bool>,
    inflight: Cell<usize>,
    /// Connections accepted whose first request has not ended: a drain waits for them too, so
    /// that a connection accepted as the listeners stop is answered, not dropped.
    first_pending: Cell<usize>,
    /// Deadlines of every connection's pending operation, and the worker's coarse clock.
    pub deadlines: Deadlines,
    /// What this worker has recorded since its last metrics snapshot.
    pub metrics: RefCell<WorkerMetrics>,
    pub access_log: Option<AccessLog>,
    /// One per configured rate limit, indexed by `RateLimitId`.
    pub limiters: RefCell<Vec<Limiter>>,
    /// The response cache, if `[cache]` is configured.
    pub cache: Option<WorkerCache>,
    /// Basic-auth password checks in flight (on the verifier thread) and their answers.
    pub basic: BasicChecks,
    connections_active: Cell<usize>,
    connections_total: Cell<u64>,
    /// Per listener (by `ListenerId`): its TLS settings and this worker's current rustls
    /// config, which rotation replaces; `None` for cleartext listeners.
    tls: RefCell<Vec<Option<TlsListener>>>,
}

struct TlsListener {
    name: String,
    settings: ListenerTls,
    config: Arc<ServerConfig>,
}

impl Worker {
    pub fn new(
        id: usize,
        config: &Arc<Config>,
        access_log: Option<AccessLog>,
        cache_links: Option<Links>,
    ) -> Worker {
        Worker {
            id,
            limits: config.limits.clone(),
            parse_limits: config.limits.codec(),
            generation: RefCell::new(Rc::new(Generation::build(config, None))),
            retired: RefCell::new(Vec::new()),
            rng: Rng::from_os(),
            draining: Cell::new(false),
            inflight: Cell::new(0),
            first_pending: Cell::new(0),
            deadlines: Deadlines::default(),
            metrics: RefCell::new(WorkerMetrics::default()),
            access_log,
            cache: config
                .cache
                .clone()
                .zip(cache_links)
                .map(|(settings, (peers, inbox))| WorkerCache::new(settings, peers, inbox)),
            limiters: RefCell::new(
                config
                    .rate_limits
                    .iter()
                    .enumerate()
                    .map(|(i, l)| Limiter::new(RateLimitId(i as u16), l))
                    .collect(),
            ),
            connections_active: Cell::new(0),
            connections_total: Cell::new(0),
            basic: BasicChecks::default(),
            tls: RefCell::new(tls_listeners(config, &[])),
        }
    }

    /// Takes a reloaded config: new requests start on a generation built from it (state
    /// carried over by name), and each TLS listener keeps its current certificates while its
    /// settings are unchanged.
    pub fn reload(&self, config: &Arc<Config>) {
        let next = Generation::build(config, Some(&self.generation()));
        self.install(next);
        let mut tls = self.tls.borrow_mut();
        let kept = std::mem::take(&mut *tls);
        *tls = tls_listeners(config, &kept);
    }

    /// A TLS listener's current rustls config and handshake timeout.
    pub fn tls_config(&self, listener: ListenerId) -> Option<(Arc<ServerConfig>, Duration)> {
        let all = self.tls.borrow();
        let l = all.get(usize::from(listener.0))?.as_ref()?;
        Some((Arc::clone(&l.config), l.settings.handshake_timeout))
    }

    /// Whether `listener` is a TLS listener.
    pub fn is_tls(&self, listener: ListenerId) -> bool {
        matches!(
            self.tls.borrow().get(usize::from(listener.0)),
            Some(Some(_))
        )
    }

    /// Builds the next rustls config of a TLS listener from rotated files; new handshakes
    /// use it, connections already open keep theirs.
    pub fn install_tls(&self, update: TlsUpdate) {
        let mut all = self.tls.borrow_mut();
        let Some(l) = all.iter_mut().flatten().find(|l| l.name == update.listener) else {
            return;
        };
        match tls::server_config(&l.settings, &update.files) {
            Ok(config) => l.config = config,
            Err(e) => error!(worker = self.id, error = %e, "rotated TLS files unusable here"),
        }
    }

    /// The current generation, for a request to hold until it ends.
    pub fn generation(&self) -> Rc<Generation> {
        Rc::clone(&self.generation.borrow())
    }

    /// Whether `gen` is the current generation (no reference counted: the per-request check).
    #[inline]
    pub fn is_current(&self, gen: &Rc<Generation>) -> bool {
        Rc::ptr_eq(&self.generation.borrow(), gen)
    }

    /// Makes `next` the generation new requests start on; requests in flight finish on theirs.
    pub fn install(&self, next: Generation) {
        let old = self.generation.replace(Rc::new(next));
        self.retired.borrow_mut().push(old);
    }

    /// The services filters may use, with the connection's `deadline`, on the request's
    /// generation `gen`.
    pub fn filter_ctx<'a>(
        self: &'a Rc<Self>,
        gen: &'a Generation,
        deadline: &'a Deadline<'a>,
    ) -> Ctx<'a> {
        Ctx {
            limiters: &self.limiters,
            metrics: &self.metrics,
            cache: self.cache.as_ref(),
            deadline,
            basic: &self.basic,
            jwt: &gen.jwt,
            now: self.now(),
            unix_now: self.deadlines.unix_now(),
            background: self,
        }
    }

    /// What upstream code may use of this worker.
    #[inline]
    pub fn upstream_ctx(&self) -> UpstreamCtx<'_> {
        UpstreamCtx {
            worker: self.id,
            rng: &self.rng,
            deadlines: &self.deadlines,
            parse_limits: &self.parse_limits,
        }
    }

    /// The coarse clock, good to a control tick: for bookkeeping such as idle pool ages.
    pub fn now(&self) -> Instant {
        self.deadlines.now()
    }

    /// Lets go of the retired generations no request is on any more (with no metrics to send,
    /// nothing else would): a removed upstream's pooled connections close with them.
    pub fn prune_retired(&self) {
        self.retired
            .borrow_mut()
            .retain(|g| Rc::strong_count(g) > 1);
    }

    /// What this worker recorded since the last call, with its gauges.
    pub fn snapshot(&self, interval: std::time::Duration) -> Snapshot {
        let gauges = Gauges {
            connections_active: self.connections_active.get(),
            connections_total: self.connections_total.get(),
            idle_per_upstream: self
                .generation
                .borrow()
                .upstreams
                .iter()
                .map(|u| (u.name.clone(), u.idle_connections()))
                .collect(),
            ratelimit_keys: self.limiters.borrow().iter().map(Limiter::len).collect(),
            cache_bytes: self.cache.as_ref().map_or(0, |c| c.store.borrow().bytes()),
            cache_entries: self.cache.as_ref().map_or(0, |c| c.store.borrow().len()),
            cache_evictions: self
                .cache
                .as_ref()
                .map_or(0, |c| c.store.borrow().evictions),
            cache_waiting: self.cache.as_ref().map_or(0, WorkerCache::waiting),
        };
        let mut gens: Vec<_> = self
            .generation
            .borrow()
            .take_metrics()
            .into_iter()
            .collect();
        self.retired.borrow_mut().retain(|g| {
            gens.extend(g.take_metrics());
            // Only this list holds it: no request is left on it.
            Rc::strong_count(g) > 1
        });
        self.metrics
            .borrow_mut()
            .snapshot(self.id, interval, gauges, gens)
    }

    /// Applies the sync thread's grants, and reports each limit whose interval has passed.
    pub fn sync_rate_limits(
        &self,
        reports: &crossbeam_channel::Sender<Report>,
        grants: &crossbeam_channel::Receiver<Grants>,
    ) {
        let mut limiters = self.limiters.borrow_mut();
        for g in grants.try_iter() {
            if let Some(l) = limiters.get_mut(usize::from(g.limit.0)) {
                l.apply(&g);
            }
        }
        let now = self.now();
        for l in limiters.iter_mut() {
            if now.saturating_duration_since(l.last_report) >= l.interval() {
                l.last_report = now;
                if let Some(report) = l.report(self.id) {
                    // Full: the sync thread is behind; this worker reports again next time.
                    let _ = reports.try_send(report);
                }
            }
        }
    }

    /// Hands buffered access log lines to the writer, counting any it had to drop.
    pub fn flush_access_log(&self) {
        if let Some(log) = &self.access_log {
            let dropped = log.flush();
            if dropped > 0 {
                self.metrics.borrow_mut().record_access_log_dropped(dropped);
            }
        }
    }

    pub fn count_rejection(&self, r: Reject) {
        self.metrics.borrow_mut().record_rejection(r);
    }

    /// Takes a connection accepted from `peer` unless the worker is at `max_connections`
    /// (counted and logged); the guard counts it as active until dropped. The one admission
    /// of every listener, cleartext or TLS (before its handshake).
    pub fn admit_connection(&self, peer: std::net::SocketAddr) -> Option<ConnectionGuard<'_>> {
        if self.connections_active.get() >= self.limits.max_connections {
            self.count_rejection(Reject::ConnectionLimit);
            tracing::debug!(worker = self.id, reason = "connection_limit", %peer, "connection rejected at accept");
            return None;
        }
        self.connections_active
            .set(self.connections_active.get() + 1);
        self.connections_total.set(self.connections_total.get() + 1);
        Some(ConnectionGuard(&self.connections_active))
    }

    pub fn connections_active(&self) -> usize {
        self.connections_active.get()
    }

    pub fn connections_total(&self) -> u64 {
        self.connections_total.get()
    }

    /// Requests between a complete head and the end of their response.
    pub fn inflight(&self) -> usize {
        self.inflight.get()
    }

    /// Connections whose first request has not ended (`FirstRequest`).
    pub fn first_pending(&self) -> usize {
        self.first_pending.get()
    }

    pub fn begin_request(&self) -> InflightGuard<'_> {
        self.inflight.set(self.inflight.get() + 1);
        InflightGuard(&self.inflight)
    }
}

/// Each listener's TLS state by `ListenerId` (`None` for cleartext); one in `before` with the
/// same name and settings keeps its rustls config (and so any rotated certificates).
fn tls_listeners(config: &Config, before: &[Option<TlsListener>]) -> Vec<Option<TlsListener>> {
    config
        .listeners
        .iter()
        .map(|l| {
            let settings = l.tls.clone()?;
            let same = format!("{settings:?}");
            if let Some(old) = before
                .iter()
                .flatten()
                .find(|o| o.name == l.name && format!("{:?}", o.settings) == same)
            {
                return Some(TlsListener {
                    name: old.name.clone(),
                    settings,
                    config: Arc::clone(&old.config),
                });
            }
            // Checked when the config was loaded; a failure here is logged and the listener
            // refuses TLS connections.
            let config = tls::server_config(&settings, &settings.files)
                .map_err(|e| error!(listener = %l.name, error = %e, "TLS unusable"))
                .ok()?;
            Some(TlsListener {
                name: l.name.clone(),
                settings,
                config,
            })
        })
        .collect()
}

/// Counts a connection as active until dropped.
pub struct ConnectionGuard<'a>(&'a Cell<usize>);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Counts an accepted connection until its first request ends (or the connection does), from
/// the moment of the accept, before its task runs.
pub struct FirstRequest(Rc<Worker>);

impl FirstRequest {
    pub fn new(w: &Rc<Worker>) -> FirstRequest {
        w.first_pending.set(w.first_pending.get() + 1);
        FirstRequest(Rc::clone(w))
    }
}

impl Drop for FirstRequest {
    fn drop(&mut self) {
        let n = &self.0.first_pending;
        n.set(n.get() - 1);
    }
}

/// Counts a request as in flight until dropped, however its future ends.
pub struct InflightGuard<'a>(&'a Cell<usize>);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}
