//! Metrics. Each worker records into its own counters and HDR histograms (microseconds, 3
//! significant digits, 1 µs to 60 s): no atomics, no locks, and no allocation per request (a
//! route's or target's histogram is allocated on its first request and reused after). Every
//! `[metrics] interval_ms` the worker sends what it recorded since the last time — a
//! `Snapshot` — over a crossbeam channel to the aggregator on the admin thread, and starts
//! afresh; the aggregator (`aggregate`) merges snapshots and renders them (`render`).

pub mod aggregate;
pub mod render;
mod resilience;
pub mod status;
mod status_json;

use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::config::TargetId;
use crate::config::{AuthId, Config, RateLimitId, RouteId, UpstreamId};
use crate::error::Reject;
use crate::http::Method;

/// Highest latency recorded, in µs: 60 s. Longer ones are recorded as 60 s.
pub const MAX_LATENCY_US: u64 = 60_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// The `method` label: the common methods by name, everything else as `OTHER`.
pub const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "OTHER",
];

pub fn method_index(m: Method) -> usize {
    match m {
        Method::Get => 0,
        Method::Head => 1,
        Method::Post => 2,
        Method::Put => 3,
        Method::Delete => 4,
        Method::Options => 5,
        Method::Patch => 6,
        Method::Trace => 7,
        Method::Connect => 8,
        Method::Other => 9,
    }
}

/// The `status_class` label.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn status_class(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// How an exchange with an upstream target ended: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// A response head arrived.
    Response,
    ConnectFailed,
    /// Connected, but the TLS handshake failed (verification, no common protocol).
    TlsFailed,
    Timeout,
    /// The response could not be framed, or was not HTTP.
    InvalidResponse,
    /// Reset, closed before answering, or closed inside the body.
    Failed,
}

impl UpstreamOutcome {
    pub const ALL: [UpstreamOutcome; 6] = [
        UpstreamOutcome::Response,
        UpstreamOutcome::ConnectFailed,
        UpstreamOutcome::TlsFailed,
        UpstreamOutcome::Timeout,
        UpstreamOutcome::InvalidResponse,
        UpstreamOutcome::Failed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            UpstreamOutcome::Response => "response",
            UpstreamOutcome::ConnectFailed => "connect_failed",
            UpstreamOutcome::TlsFailed => "tls_failed",
            UpstreamOutcome::Timeout => "timeout",
            UpstreamOutcome::InvalidResponse => "invalid_response",
            UpstreamOutcome::Failed => "failed",
        }
    }
}

/// How an authentication provider decided a request: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuthOutcome {
    /// Valid credentials, and the route lets the consumer pass.
    Ok,
    /// No provider's credentials were present (counted against the route's first provider).
    Missing,
    /// Credentials present but not valid.
    Invalid,
    /// Valid credentials, but the route's groups exclude the consumer (403).
    Forbidden,
}

impl AuthOutcome {
    pub fn label(self) -> &'static str {
        match self {
            AuthOutcome::Ok => "ok",
            AuthOutcome::Missing => "missing",
            AuthOutcome::Invalid => "invalid",
            AuthOutcome::Forbidden => "forbidden",
        }
    }
}

/// How a request on a caching route was answered: the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
    Stale,
    Bypass,
    /// Waited for another request's fetch of the same key, then served from the cache.
    Coalesced,
    /// A stale entry the upstream confirmed with 304, served from the cache.
    Revalidated,
    /// A stale entry served because the upstream failed (`stale-if-error`).
    StaleIfError,
}

impl CacheOutcome {
    pub const ALL: [CacheOutcome; 7] = [
        CacheOutcome::Hit,
        CacheOutcome::Miss,
        CacheOutcome::Stale,
        CacheOutcome::Bypass,
        CacheOutcome::Coalesced,
        CacheOutcome::Revalidated,
        CacheOutcome::StaleIfError,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Stale => "stale",
            CacheOutcome::Bypass => "bypass",
            CacheOutcome::Coalesced => "coalesced",
            CacheOutcome::Revalidated => "revalidated",
            CacheOutcome::StaleIfError => "stale_if_error",
        }
    }
}

type RequestCounts = [[u64; STATUS_CLASSES.len()]; METHODS.len()];

/// One route's figures (or those of requests that matched no route).
#[derive(Default)]
struct RouteStats {
    requests: RequestCounts,
    latency: Option<Histogram<u64>>,
    active: bool,
}

#[derive(Default)]
struct TargetStats {
    outcomes: [u64; UpstreamOutcome::ALL.len()],
    /// Attempts on this target that failed and were tried again elsewhere.
    retried: u64,
    latency: Option<Histogram<u64>>,
    active: bool,
}

/// What one worker has recorded since its last snapshot, apart from what belongs to a
/// generation (`GenMetrics`, `UpstreamStats`).
pub struct WorkerMetrics {
    /// Requests that matched no route.
    unrouted: RouteStats,
    requests: u64,
    rejections: [u64; Reject::ALL.len()],
    access_log_dropped: u64,
    identity_headers_dropped: u64,
    cache: [u64; CacheOutcome::ALL.len()],
}

/// A generation's per-route figures, indexed by its config's ids: a request records into the
/// generation it started on, so a reload never mixes two configs' ids.
pub struct GenMetrics {
    /// Indexed by route id.
    routes: Vec<RouteStats>,
    /// `[route * limits + limit]`: requests a limit refused on a route.
    ratelimited: Vec<u64>,
    limits: usize,
    /// Authentication decisions by route, provider and outcome (at most routes × providers × 4
    /// entries, each allocated once).
    auth: ahash::AHashMap<(RouteId, AuthId, AuthOutcome), u64>,
    /// Per route: responses compressed by algorithm (`Coding::ALL` order), then bytes in and
    /// out of the compressor.
    compression: Vec<[u64; 5]>,
}

/// One upstream's figures in one generation, indexed by target.
pub struct UpstreamStats {
    targets: Vec<TargetStats>,
    /// Circuit-breaker refusals by limit (`Limit::ALL` order).
    breaker: [u64; 3],
    /// Failures a retry would have followed but for the retry budget.
    budget_refused: u64,
}

/// What a finished request contributes.
pub struct RequestRecord {
    pub method: Method,
    pub status: u16,
    pub total_us: u64,
}

impl RouteStats {
    fn record(&mut self, r: &RequestRecord) {
        self.requests[method_index(r.method)][status_class(r.status)] += 1;
        self.active = true;
        self.latency
            .get_or_insert_with(new_histogram)
            .saturating_record(r.total_us.max(1));
    }

    /// What was recorded since the last call, if anything.
    fn delta(&mut self, route: Option<RouteId>) -> Option<RouteDelta> {
        if !std::mem::take(&mut self.active) {
            return None;
        }
        Some(RouteDelta {
            route,
            requests: std::mem::take(&mut self.requests),
            latency: self.latency.as_mut().map(take_reset),
        })
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            unrouted: RouteStats::default(),
            requests: 0,
            rejections: [0; Reject::ALL.len()],
            access_log_dropped: 0,
            identity_headers_dropped: 0,
            cache: [0; CacheOutcome::ALL.len()],
        }
    }
}

impl WorkerMetrics {
    /// Counts a finished request; `route`: its route's figures, `None` when it matched none.
    #[inline]
    pub fn record_request(
        &mut self,
        route: Option<&mut GenMetrics>,
        id: RouteId,
        r: &RequestRecord,
    ) {
        let stats = match route.and_then(|g| g.routes.get_mut(usize::from(id.0))) {
            Some(stats) => stats,
            None => &mut self.unrouted,
        };
        stats.record(r);
        self.requests += 1;
    }

    pub fn record_rejection(&mut self, r: Reject) {
        self.rejections[r as usize] += 1;
    }

    pub fn record_cache(&mut self, outcome: CacheOutcome) {
        self.cache[outcome as usize] += 1;
    }

    pub fn record_identity_headers_dropped(&mut self, n: u32) {
        self.identity_headers_dropped += u64::from(n);
    }

    pub fn record_access_log_dropped(&mut self, lines: u64) {
        self.access_log_dropped += lines;
    }

    /// Everything recorded since the last snapshot; the worker starts afresh (histograms are
    /// reset in place, so this allocates only the copies it sends). `gens`: the generations'
    /// figures, collected by the worker.
    pub fn snapshot(
        &mut self,
        worker: usize,
        interval: Duration,
        gauges: Gauges,
        gens: Vec<GenDelta>,
    ) -> Snapshot {
        Snapshot {
            cache: std::mem::take(&mut self.cache),
            worker,
            interval,
            requests: std::mem::take(&mut self.requests),
            rejections: std::mem::take(&mut self.rejections),
            access_log_dropped: std::mem::take(&mut self.access_log_dropped),
            identity_headers_dropped: std::mem::take(&mut self.identity_headers_dropped),
            unrouted: self.unrouted.delta(None),
            gens,
            gauges,
        }
    }
}

impl GenMetrics {
    pub fn new(routes: usize, limits: usize) -> GenMetrics {
        GenMetrics {
            routes: (0..routes).map(|_| RouteStats::default()).collect(),
            ratelimited: vec![0; routes * limits],
            limits,
            auth: ahash::AHashMap::new(),
            compression: vec![[0; 5]; routes],
        }
    }

    /// One response compressed with `coding` (its index in `Coding::ALL`), and its bytes.
    pub fn record_compression(&mut self, route: RouteId, coding: usize, bytes_in: u64, out: u64) {
        if let Some(c) = self.compression.get_mut(usize::from(route.0)) {
            c[coding.min(2)] += 1;
            c[3] += bytes_in;
            c[4] += out;
        }
    }

    pub fn record_ratelimited(&mut self, route: RouteId, limit: RateLimitId) {
        let i = usize::from(route.0) * self.limits + usize::from(limit.0);
        if let Some(n) = self.ratelimited.get_mut(i) {
            *n += 1;
        }
    }

    pub fn record_auth(&mut self, route: RouteId, provider: AuthId, outcome: AuthOutcome) {
        *self.auth.entry((route, provider, outcome)).or_default() += 1;
    }

    /// The routes' figures since the last call, into `into`.
    fn take(&mut self, into: &mut GenDelta) {
        for (i, stats) in self.routes.iter_mut().enumerate() {
            into.routes.extend(stats.delta(Some(RouteId(i as u16))));
        }
        let limits = self.limits;
        into.ratelimited.extend(
            self.ratelimited
                .iter_mut()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| {
                    let route = RouteId((i / limits) as u16);
                    (route, RateLimitId((i % limits) as u16), std::mem::take(n))
                }),
        );
        into.auth.extend(
            self.auth
                .iter_mut()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| (*k, std::mem::take(n))),
        );
        into.compression.extend(
            self.compression
                .iter_mut()
                .enumerate()
                .filter(|(_, c)| c.iter().any(|&n| n > 0))
                .map(|(i, c)| (RouteId(i as u16), std::mem::take(c))),
        );
    }
}

impl UpstreamStats {
    pub fn new(targets: usize) -> UpstreamStats {
        UpstreamStats {
            targets: (0..targets).map(|_| TargetStats::default()).collect(),
            breaker: [0; 3],
            budget_refused: 0,
        }
    }

    #[inline]
    pub fn record(&mut self, target: TargetId, outcome: UpstreamOutcome, latency_us: Option<u64>) {
        let Some(stats) = self.targets.get_mut(target.0) else {
            return;
        };
        stats.outcomes[outcome as usize] += 1;
        stats.active = true;
        if let Some(us) = latency_us {
            stats
                .latency
                .get_or_insert_with(new_histogram)
                .saturating_record(us.max(1));
        }
    }

    /// An attempt on `target` failed and the request was tried again.
    pub fn record_retry(&mut self, target: TargetId) {
        if let Some(stats) = self.targets.get_mut(target.0) {
            stats.retried += 1;
            stats.active = true;
        }
    }

    /// A request the upstream's `[limits]` refused.
    pub fn record_breaker(&mut self, limit: crate::config::Limit) {
        self.breaker[limit as usize] += 1;
    }

    /// A failure was not retried because the retry budget was spent.
    pub fn record_budget_refusal(&mut self) {
        self.budget_refused += 1;
    }

    /// The upstream's figures since the last call, into `into`.
    pub fn take(&mut self, upstream: UpstreamId, into: &mut GenDelta) {
        for (t, stats) in self.targets.iter_mut().enumerate() {
            if !std::mem::take(&mut stats.active) {
                continue;
            }
            into.targets.push(TargetDelta {
                upstream,
                target: TargetId(t),
                outcomes: std::mem::take(&mut stats.outcomes),
                retried: std::mem::take(&mut stats.retried),
                latency: stats.latency.as_mut().map(take_reset),
            });
        }
        if self.breaker != [0; 3] {
            into.breaker
                .push((upstream, std::mem::take(&mut self.breaker)));
        }
        if self.budget_refused > 0 {
            into.budget_refused
                .push((upstream, std::mem::take(&mut self.budget_refused)));
        }
    }
}

impl GenDelta {
    pub fn new(config: Arc<Config>) -> GenDelta {
        GenDelta {
            config,
            routes: Vec::new(),
            targets: Vec::new(),
            ratelimited: Vec::new(),
            auth: Vec::new(),
            compression: Vec::new(),
            breaker: Vec::new(),
            budget_refused: Vec::new(),
        }
    }

    /// Takes `metrics`' figures since the last call into this delta.
    pub fn take_routes(&mut self, metrics: &mut GenMetrics) {
        metrics.take(self);
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
            && self.targets.is_empty()
            && self.ratelimited.is_empty()
            && self.auth.is_empty()
            && self.compression.is_empty()
            && self.breaker.is_empty()
            && self.budget_refused.is_empty()
    }
}

/// A copy of `h` to send, leaving `h` empty but allocated (no allocation on the next record).
fn take_reset(h: &mut Histogram<u64>) -> Histogram<u64> {
    let copy = h.clone();
    h.reset();
    copy
}

/// Point-in-time figures of a worker, sent with each snapshot.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub connections_active: usize,
    pub connections_total: u64,
    /// Idle pooled connections per upstream, by name.
    pub idle_per_upstream: Vec<(String, usize)>,
    /// Keys held per rate limit.
    pub ratelimit_keys: Vec<usize>,
    pub cache_bytes: usize,
    pub cache_entries: usize,
    pub cache_evictions: u64,
    /// Requests waiting for another request's fetch of the same key.
    pub cache_waiting: usize,
}

/// A worker's figures for one interval.
pub struct Snapshot {
    pub worker: usize,
    pub interval: Duration,
    pub requests: u64,
    pub rejections: [u64; Reject::ALL.len()],
    pub access_log_dropped: u64,
    pub identity_headers_dropped: u64,
    /// Requests that matched no route.
    pub unrouted: Option<RouteDelta>,
    /// Per generation the worker still has requests on: figures by its config's ids.
    pub gens: Vec<GenDelta>,
    pub gauges: Gauges,
    pub cache: [u64; CacheOutcome::ALL.len()],
}

/// One generation's figures, with the config that names its ids.
pub struct GenDelta {
    pub config: Arc<Config>,
    pub routes: Vec<RouteDelta>,
    pub targets: Vec<TargetDelta>,
    /// `(route, limit, refused)` for pairs with refusals.
    pub ratelimited: Vec<(RouteId, RateLimitId, u64)>,
    /// Authentication decisions since the last snapshot.
    pub auth: Vec<((RouteId, AuthId, AuthOutcome), u64)>,
    /// Compression by route: see `GenMetrics::record_compression`.
    pub compression: Vec<(RouteId, [u64; 5])>,
    /// Circuit-breaker refusals by upstream and limit.
    pub breaker: Vec<(UpstreamId, [u64; 3])>,
    /// Retries the budget refused, by upstream.
    pub budget_refused: Vec<(UpstreamId, u64)>,
}

pub struct RouteDelta {
    /// `None`: requests that matched no route.
    pub route: Option<RouteId>,
    pub requests: RequestCounts,
    pub latency: Option<Histogram<u64>>,
}

pub struct TargetDelta {
    pub upstream: UpstreamId,
    pub target: TargetId,
    pub outcomes: [u64; UpstreamOutcome::ALL.len()],
    pub retried: u64,
    pub latency: Option<Histogram<u64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_carry_deltas_and_reset() {
        let mut m = WorkerMetrics::default();
        let mut routes = GenMetrics::new(2, 0);
        let mut up = UpstreamStats::new(1);
        for us in [100, 200, 300] {
            let r = RequestRecord {
                method: Method::Get,
                status: 200,
                total_us: us,
            };
            m.record_request(Some(&mut routes), RouteId(1), &r);
        }
        let r = RequestRecord {
            method: Method::Other,
            status: 404,
            total_us: 5,
        };
        m.record_request(None, RouteId(0), &r);
        up.record(TargetId(0), UpstreamOutcome::Response, Some(50));
        let src = "[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n";
        let config = Arc::new(crate::config::parse(std::path::Path::new("t.toml"), src).unwrap());
        let mut delta = GenDelta::new(Arc::clone(&config));
        delta.take_routes(&mut routes);
        up.take(UpstreamId(0), &mut delta);
        let s = m.snapshot(0, Duration::from_secs(1), Gauges::default(), vec![delta]);
        assert_eq!(s.requests, 4);
        let routes_seen = &s.gens[0].routes;
        assert_eq!(routes_seen.len(), 1);
        assert_eq!(routes_seen[0].route, Some(RouteId(1)));
        assert_eq!(routes_seen[0].requests[0][1], 3);
        assert_eq!(routes_seen[0].latency.as_ref().unwrap().len(), 3);
        assert_eq!(s.unrouted.as_ref().unwrap().requests[9][3], 1);
        assert_eq!(s.gens[0].targets[0].outcomes[0], 1);
        let mut empty = GenDelta::new(config);
        empty.take_routes(&mut routes);
        up.take(UpstreamId(0), &mut empty);
        assert!(empty.is_empty());
        let again = m.snapshot(0, Duration::from_secs(1), Gauges::default(), Vec::new());
        assert_eq!(again.requests, 0);
        assert!(again.unrouted.is_none());
    }
}
