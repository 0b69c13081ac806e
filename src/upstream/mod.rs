//! Upstreams as one worker sees them: its own balancer, its own view of which targets are
//! down, its own in-flight counts and its own idle keep-alive connections per target. Nothing
//! here is shared with another worker, so nothing here locks.
//!
//! A target that refuses or times out a connect is skipped by this worker for `fail_timeout`
//! (passive health checking); when every target is skipped the upstream is unavailable (503).

mod balancer;
pub mod breaker;
pub mod client;
pub mod health;
mod stream;

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use std::sync::Arc;

use monoio::io::Splitable;
use monoio::net::TcpStream;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection};
use tracing::error;

use balancer::{Balancer, Targets};
use breaker::Breaker;

use crate::buffer::ReadBuf;
use crate::config::{HashKey, Retries, Upstream, UpstreamId};
use crate::deadline::Deadline;
use crate::error::ProxyError;
use crate::metrics::{UpstreamOutcome, UpstreamStats};
use crate::rng::Rng;
use crate::tls::HandshakeError;
pub use stream::{UpRead, UpWrite};

pub use crate::config::TargetId;

/// What upstream code needs of the worker it runs on, lent by the worker for a call: upstream
/// code never sees the worker itself.
pub struct UpstreamCtx<'a> {
    /// The worker's id, for logs.
    pub worker: usize,
    pub rng: &'a crate::rng::Rng,
    /// The worker's deadline slots and coarse clock.
    pub deadlines: &'a crate::deadline::Deadlines,
    pub parse_limits: &'a crate::http::ParseLimits,
}

impl UpstreamCtx<'_> {
    /// The worker's coarse clock.
    #[inline]
    pub fn now(&self) -> std::time::Instant {
        self.deadlines.now()
    }
}

/// A connection to a target, split so that a request body can stream up while the response
/// streams down; cleartext or TLS.
pub struct UpstreamConn {
    pub r: UpRead,
    pub w: UpWrite,
    pub rbuf: ReadBuf,
    /// Taken from the idle pool rather than freshly connected: the peer may have closed it.
    pub reused: bool,
    /// Counts the connection against `max_connections` while it is open.
    _slot: Option<breaker::ConnSlot>,
}

// Moved about seven times per proxied request: kept small enough to be copied inline.
const _: () = assert!(std::mem::size_of::<UpstreamConn>() <= 80);

pub struct UpstreamState {
    pub id: UpstreamId,
    pub name: String,
    /// The primary targets, then the backups. Shared with the generations before and after
    /// this one while the target is unchanged, so idle connections and health carry over.
    pub targets: Vec<Rc<TargetState>>,
    primaries: usize,
    panic_routing: bool,
    /// `[outlier]` is configured: failure runs are counted and reported.
    outlier: bool,
    pub retries: Option<Retries>,
    /// Circuit breaking, against this worker's share of `[limits]` (kept across reloads that
    /// leave the limits alone, with the requests and connections it counts).
    pub breaker: Option<Rc<Breaker>>,
    /// What this generation's requests recorded for the metrics.
    pub stats: RefCell<UpstreamStats>,
    /// The retry budget, in hundredths of a retry: each request earns `budget_percent`, a
    /// retry costs 100, at most `RETRY_BUDGET_CAP` are kept.
    retry_budget: Cell<u32>,
    balancer: Balancer,
    pub hash_key: HashKey,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    fail_timeout: Duration,
    /// Failed exchanges since the last summary line.
    failures: Cell<u64>,
    last_summary: Cell<Option<Instant>>,
    /// This worker's TLS client config, when the upstream speaks TLS.
    tls: Option<Arc<ClientConfig>>,
}

/// The most retry budget kept (in hundredths of a retry): 10 retries after a quiet spell.
const RETRY_BUDGET_CAP: u32 = 1000;

/// How often, at most, a worker logs a summary of an upstream's failures.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);

pub struct TargetState {
    pub name: String,
    pub addr: SocketAddr,
    /// What the target's certificate is verified against (and the SNI), with TLS.
    server_name: Option<ServerName<'static>>,
    inflight: Cell<u32>,
    down_until: Cell<Option<Instant>>,
    /// What active health checks last said (set from the prober's updates; true until then).
    healthy: Cell<bool>,
    /// Ejected process-wide for failures in real traffic (set from worker 0's updates).
    ejected: Cell<bool>,
    /// This worker's failures in a row on this target, and the count last reported.
    streak: Cell<u32>,
    reported: Cell<u32>,
    /// Most recently used last: reuse takes the warmest connection.
    /// Each with the moment it expires (its `idle_timeout` after it was returned).
    idle: RefCell<Vec<(UpstreamConn, Instant)>>,
}

#[derive(Debug)]
pub enum ConnectError {
    Refused(io::Error),
    TimedOut,
    /// The TLS handshake failed; why, in an operator's words.
    Tls(String),
}

impl ConnectError {
    /// The answer a client gets when no connection could be made.
    pub fn proxy_error(&self) -> ProxyError {
        match self {
            ConnectError::Refused(_) => ProxyError::UpstreamUnreachable("connect failed"),
            ConnectError::TimedOut => ProxyError::UpstreamTimeout,
            ConnectError::Tls(_) => {
                ProxyError::UpstreamUnreachable("TLS handshake with the upstream failed")
            }
        }
    }

    pub fn outcome(&self) -> UpstreamOutcome {
        match self {
            ConnectError::Tls(_) => UpstreamOutcome::TlsFailed,
            _ => UpstreamOutcome::ConnectFailed,
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused(e) => write!(f, "connect failed: {e}"),
            ConnectError::TimedOut => f.write_str("connect timed out"),
            ConnectError::Tls(why) => write!(f, "TLS handshake failed: {why}"),
        }
    }
}

impl Targets for [Rc<TargetState>] {
    fn len(&self) -> usize {
        <[Rc<TargetState>]>::len(self)
    }
    fn is_up(&self, i: usize) -> bool {
        let t = &self[i];
        t.healthy.get()
            && !t.ejected.get()
            && t.down_until
                .get()
                .is_none_or(|until| Instant::now() >= until)
    }
    fn inflight(&self, i: usize) -> u32 {
        self[i].inflight.get()
    }
}

impl UpstreamState {
    /// `workers`: how many share the upstream's `[limits]`. `previous`: the same upstream in
    /// the generation before, whose unchanged targets, breaker and retry budget carry over.
    pub fn new(
        id: UpstreamId,
        cfg: &Upstream,
        workers: usize,
        previous: Option<&UpstreamState>,
    ) -> UpstreamState {
        let targets: Vec<Rc<TargetState>> = cfg
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let server_name = cfg.tls.as_ref().map(|tls| tls.names[i].clone());
                let kept = previous.and_then(|p| {
                    p.targets.iter().find(|old| {
                        old.name == t.name && old.addr == t.addr && old.server_name == server_name
                    })
                });
                kept.cloned().unwrap_or_else(|| {
                    Rc::new(TargetState {
                        name: t.name.clone(),
                        addr: t.addr,
                        server_name,
                        inflight: Cell::new(0),
                        down_until: Cell::new(None),
                        healthy: Cell::new(true),
                        ejected: Cell::new(false),
                        streak: Cell::new(0),
                        reported: Cell::new(0),
                        idle: RefCell::new(Vec::new()),
                    })
                })
            })
            .collect();
        let breaker = cfg.limits.map(|l| {
            let share = l.per_worker(workers);
            previous
                .and_then(|p| p.breaker.as_ref())
                .filter(|b| b.limits() == share)
                .cloned()
                .unwrap_or_else(|| Rc::new(Breaker::new(share)))
        });
        UpstreamState {
            id,
            name: cfg.name.clone(),
            stats: RefCell::new(UpstreamStats::new(targets.len())),
            targets,
            primaries: cfg.primaries,
            panic_routing: cfg.panic_routing,
            outlier: cfg.outlier.is_some(),
            retries: cfg.retries.clone(),
            breaker,
            retry_budget: Cell::new(previous.map_or(0, |p| p.retry_budget.get())),
            balancer: Balancer::new(cfg),
            hash_key: cfg.hash_key.clone(),
            connect_timeout: cfg.connect_timeout,
            request_timeout: cfg.request_timeout,
            idle_timeout: cfg.idle_timeout,
            max_idle: cfg.max_idle_per_target,
            fail_timeout: cfg.fail_timeout,
            failures: Cell::new(0),
            last_summary: Cell::new(None),
            // Checked when the config was loaded; a failure here leaves the upstream unusable.
            tls: cfg.tls.as_ref().and_then(|t| {
                crate::tls::client::client_config(t)
                    .map_err(|e| error!(upstream = %cfg.name, error = %e, "TLS unusable"))
                    .ok()
            }),
        }
    }

    /// Chooses a primary target that is up (`key`: the request's hash, for consistent
    /// hashing); with none, a backup that is up; with none, any primary under `panic_routing`.
    pub fn pick(&self, rng: &Rng, key: u64) -> Option<TargetId> {
        let (primaries, backups) = self.targets.split_at(self.primaries);
        if let Some(i) = self.balancer.pick(primaries, rng, key) {
            return Some(TargetId(i));
        }
        if !backups.is_empty() {
            if let Some(i) = balancer::first_up(backups, rng.below(backups.len())) {
                return Some(TargetId(self.primaries + i));
            }
        }
        self.panic_routing
            .then(|| TargetId(rng.below(self.primaries)))
    }

    /// Admits a request past the upstream's breaker (`max_requests`), if it has one: it counts
    /// as in flight until the guard is dropped. A refusal is counted by its limit.
    pub fn admit(&self) -> Result<Option<breaker::InFlight<'_>>, crate::config::Limit> {
        let Some(b) = &self.breaker else {
            return Ok(None);
        };
        b.admit().map(Some).inspect_err(|&limit| {
            self.stats.borrow_mut().record_breaker(limit);
        })
    }

    /// A request starts: it earns the retry budget its share.
    #[inline]
    pub fn earn_retry_budget(&self) {
        if let Some(r) = &self.retries {
            let b = self.retry_budget.get() + r.budget_percent;
            self.retry_budget.set(b.min(RETRY_BUDGET_CAP));
        }
    }

    /// Whether the budget holds a retry.
    pub fn retry_affordable(&self) -> bool {
        self.retry_budget.get() >= 100
    }

    pub fn spend_retry(&self) {
        self.retry_budget
            .set(self.retry_budget.get().saturating_sub(100));
    }

    /// Like `pick`, but avoiding the targets `tried` says were tried already while another
    /// target is up.
    pub fn pick_untried(
        &self,
        rng: &Rng,
        key: u64,
        tried: impl Fn(TargetId) -> bool,
    ) -> Option<TargetId> {
        let first = self.pick(rng, key)?;
        if !tried(first) {
            return Some(first);
        }
        let n = self.targets.len();
        let start = rng.below(n);
        let other = (0..n).map(|k| (start + k) % n).find(|&i| {
            let t = TargetId(i);
            !tried(t)
                && self.targets.as_slice().is_up(i)
                && (i < self.primaries || self.is_backup_in_use())
        });
        Some(other.map_or(first, TargetId))
    }

    /// Whether backups take traffic now (no primary is up).
    fn is_backup_in_use(&self) -> bool {
        let primaries = &self.targets[..self.primaries];
        !(0..primaries.len()).any(|i| primaries.is_up(i))
    }

    /// What the active health checks last said of `t`.
    pub fn is_healthy(&self, t: TargetId) -> bool {
        self.targets
            .get(t.0)
            .is_none_or(|target| target.healthy.get())
    }

    /// Records what the active health checks say of `t`; returns whether that changed it.
    pub fn set_healthy(&self, t: TargetId, healthy: bool) -> bool {
        self.targets
            .get(t.0)
            .is_some_and(|target| target.healthy.replace(healthy) != healthy)
    }

    /// Ejects `t` (or brings it back); an ejection starts its run of failures afresh.
    pub fn set_ejected(&self, t: TargetId, ejected: bool) {
        if let Some(target) = self.targets.get(t.0) {
            target.ejected.set(ejected);
            if ejected {
                target.streak.set(0);
            }
        }
    }

    pub fn has_outlier(&self) -> bool {
        self.outlier
    }

    /// Counts an exchange with `t` in its run of failures (a success ends the run).
    #[inline]
    pub fn observe(&self, t: TargetId, failed: bool) {
        if !self.outlier {
            return;
        }
        if let Some(target) = self.targets.get(t.0) {
            target
                .streak
                .set(if failed { target.streak.get() + 1 } else { 0 });
        }
    }

    /// The targets whose run of failures changed since it was last reported.
    pub fn streaks_to_report(&self) -> impl Iterator<Item = (TargetId, u32)> + '_ {
        self.targets
            .iter()
            .enumerate()
            .filter(|(_, t)| t.streak.get() != t.reported.get())
            .map(|(i, t)| (TargetId(i), t.streak.get()))
    }

    pub fn streak_reported(&self, t: TargetId, streak: u32) {
        if let Some(target) = self.targets.get(t.0) {
            target.reported.set(streak);
        }
    }

    /// Whether `pick` uses its key (consistent hashing only), so that others skip hashing.
    pub fn needs_key(&self) -> bool {
        matches!(self.balancer, Balancer::ConsistentHash { .. })
    }

    pub fn target(&self, t: TargetId) -> &TargetState {
        &self.targets[t.0]
    }

    /// An idle connection to `t` that has not outlived `idle_timeout`. `now` may be the
    /// worker's coarse clock: idle timeouts do not need better than its tick.
    pub fn checkout(&self, t: TargetId, now: Instant) -> Option<UpstreamConn> {
        let mut idle = self.targets[t.0].idle.borrow_mut();
        while let Some((mut conn, expires)) = idle.pop() {
            if now < expires {
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection whose last exchange completed cleanly to the idle pool.
    pub fn checkin(&self, t: TargetId, conn: UpstreamConn, now: Instant) {
        if !conn.rbuf.is_empty() {
            // The upstream sent bytes after its response: not a connection to reuse.
            return;
        }
        let mut idle = self.targets[t.0].idle.borrow_mut();
        if idle.len() < self.max_idle {
            idle.push((conn, now.checked_add(self.idle_timeout).unwrap_or(now)));
            if let Some(b) = &self.breaker {
                b.released();
            }
        }
    }

    /// An idle connection to any target (at the connection limit, a free connection is worth
    /// more than the balancer's choice).
    pub fn checkout_any(&self, now: Instant) -> Option<(TargetId, UpstreamConn)> {
        (0..self.targets.len()).find_map(|i| Some((TargetId(i), self.checkout(TargetId(i), now)?)))
    }

    pub async fn connect(
        &self,
        t: TargetId,
        deadline: &Deadline<'_>,
    ) -> Result<UpstreamConn, ConnectError> {
        let target = &self.targets[t.0];
        let connecting = async {
            let stream = TcpStream::connect_addr(target.addr)
                .await
                .map_err(ConnectError::Refused)?;
            // Latency matters more than packet count: heads and bodies go out in one write.
            let _ = stream.set_nodelay(true);
            self.handshake(target, stream).await
        };
        // One timeout covers the TCP connect and the TLS handshake.
        let (r, w) = match deadline.within(self.connect_timeout, connecting).await {
            Ok(halves) => halves?,
            Err(_) => return Err(ConnectError::TimedOut),
        };
        Ok(UpstreamConn {
            r,
            w,
            rbuf: ReadBuf::new(),
            reused: false,
            _slot: self.breaker.as_deref().map(Breaker::slot),
        })
    }

    /// The halves of `stream`, after a TLS handshake when the upstream speaks TLS.
    async fn handshake(
        &self,
        target: &TargetState,
        stream: TcpStream,
    ) -> Result<(UpRead, UpWrite), ConnectError> {
        let (Some(config), Some(name)) = (&self.tls, &target.server_name) else {
            let (r, w) = stream.into_split();
            return Ok((UpRead::Plain(r), UpWrite::Plain(w)));
        };
        let conn = ClientConnection::new(Arc::clone(config), name.clone())
            .map_err(|e| ConnectError::Tls(e.to_string()))?;
        match crate::tls::handshake(stream, Connection::Client(conn), Vec::new()).await {
            Ok(tls) => {
                let (r, w) = tls.into_halves();
                Ok((UpRead::Tls(Box::new(r)), UpWrite::Tls(Box::new(w))))
            }
            Err(HandshakeError::Tls(e)) => Err(ConnectError::Tls(crate::tls::client::describe(&e))),
            Err(HandshakeError::Closed) => {
                Err(ConnectError::Tls("closed during the handshake".into()))
            }
            Err(HandshakeError::Io(e)) => Err(ConnectError::Refused(e)),
        }
    }

    /// Skips `t` for `fail_timeout`; returns whether it was up until now (a state change,
    /// worth a warning).
    pub fn mark_down(&self, t: TargetId) -> bool {
        let target = &self.targets[t.0];
        let now = Instant::now();
        let was_up = target.down_until.get().is_none_or(|until| now >= until);
        target.down_until.set(Some(now + self.fail_timeout));
        target.idle.borrow_mut().clear();
        was_up
    }

    /// Returns whether `t` had been marked down (a state change).
    pub fn mark_up(&self, t: TargetId) -> bool {
        self.targets[t.0].down_until.take().is_some()
    }

    /// Counts a failed exchange (connect, reset, timeout, invalid response) for the summary.
    pub fn count_failure(&self) {
        self.failures.set(self.failures.get() + 1);
    }

    /// Failures counted since the last summary, if one is due: at most one per
    /// `SUMMARY_EVERY`, so that a 502 storm shows in the log without flooding it.
    pub fn failures_to_report(&self, now: Instant) -> Option<u64> {
        let n = self.failures.get();
        let due = self
            .last_summary
            .get()
            .is_none_or(|at| now.saturating_duration_since(at) >= SUMMARY_EVERY);
        if n == 0 || !due {
            return None;
        }
        self.failures.set(0);
        self.last_summary.set(Some(now));
        Some(n)
    }

    pub fn begin_request(&self, t: TargetId) {
        let c = &self.targets[t.0].inflight;
        c.set(c.get() + 1);
    }

    pub fn end_request(&self, t: TargetId) {
        let c = &self.targets[t.0].inflight;
        c.set(c.get().saturating_sub(1));
    }

    /// Closes idle connections that have outlived `idle_timeout`.
    pub fn sweep_idle(&self, now: Instant) {
        for target in &self.targets {
            target
                .idle
                .borrow_mut()
                .retain(|(_, expires)| now < *expires);
        }
    }

    pub fn idle_connections(&self) -> usize {
        self.targets.iter().map(|t| t.idle.borrow().len()).sum()
    }
}
