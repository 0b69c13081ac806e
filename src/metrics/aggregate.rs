//! The aggregator, on the admin thread: merges the workers' snapshots into running totals
//! (counters summed, histograms added with `Histogram::add`) and keeps each worker's latest
//! figures for `/status`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::{
    new_histogram, AuthOutcome, CacheOutcome, Gauges, GenDelta, RequestCounts, RouteDelta,
    Snapshot, UpstreamOutcome,
};
use crate::config::Config;
use crate::error::Reject;

pub struct Aggregate {
    pub started: Instant,
    /// Route names; requests that matched no route are reported as route "none".
    pub route_names: Vec<String>,
    /// `(upstream name, target names)`.
    pub upstream_names: Vec<(String, Vec<String>)>,
    pub workers: Vec<WorkerFigures>,
    /// Indexed like `route_names`, plus one for "none".
    pub routes: Vec<RouteFigures>,
    /// `[upstream][target]`.
    pub targets: Vec<Vec<TargetFigures>>,
    pub rejections: [u64; Reject::ALL.len()],
    pub access_log_dropped: u64,
    /// Client-sent copies of headers the gateway vouches for, removed.
    pub identity_headers_dropped: u64,
    pub limit_names: Vec<String>,
    pub cache: [u64; CacheOutcome::ALL.len()],
    pub cache_enabled: bool,
    /// `(route, limit, refused)` for every limit a route applies.
    pub ratelimited: Vec<(usize, usize, u64)>,
    pub auth_names: Vec<String>,
    /// Authentication decisions by (route, provider, outcome).
    pub auth: std::collections::BTreeMap<(usize, usize, AuthOutcome), u64>,
    /// Compression by route: responses by algorithm (`Coding::ALL` order), bytes in, out.
    pub compression: std::collections::BTreeMap<usize, [u64; 5]>,
    /// Circuit-breaker refusals by upstream and limit.
    pub breaker: Vec<[u64; 3]>,
    /// Retries the budget refused, by upstream.
    pub budget_refused: Vec<u64>,
    /// Where each recent config's ids land in these tables.
    slots: Vec<Slots>,
}

#[derive(Default)]
pub struct WorkerFigures {
    pub requests: u64,
    /// Requests per second over the worker's last interval.
    pub rps: f64,
    pub latency: Option<Histogram<u64>>,
    pub gauges: Gauges,
    pub reported: bool,
}

impl WorkerFigures {
    /// The worker's idle pooled connections to the upstream `name`.
    pub fn idle(&self, name: &str) -> usize {
        let idle = &self.gauges.idle_per_upstream;
        idle.iter().find(|(n, _)| n == name).map_or(0, |(_, n)| *n)
    }
}

#[derive(Default)]
pub struct RouteFigures {
    pub requests: RequestCounts,
    pub latency: Option<Histogram<u64>>,
}

impl RouteFigures {
    fn add(&mut self, r: &RouteDelta) {
        for (m, classes) in r.requests.iter().enumerate() {
            for (c, count) in classes.iter().enumerate() {
                self.requests[m][c] += count;
            }
        }
        if let Some(h) = &r.latency {
            add(&mut self.latency, h);
        }
    }
}

#[derive(Default)]
pub struct TargetFigures {
    pub outcomes: [u64; UpstreamOutcome::ALL.len()],
    pub retried: u64,
    pub latency: Option<Histogram<u64>>,
}

fn add(into: &mut Option<Histogram<u64>>, from: &Histogram<u64>) {
    // Same bounds on both sides, so `add` cannot fail.
    let _ = into.get_or_insert_with(new_histogram).add(from);
}

/// Where one config's ids land in the aggregate's tables.
struct Slots {
    config: Arc<Config>,
    routes: Vec<usize>,
    upstreams: Vec<usize>,
    auth: Vec<usize>,
}

/// How many configs' slot maps are kept (workers send figures of a retired generation for as
/// long as requests run on it; an older one is mapped again when it shows up).
const SLOT_MAPS: usize = 8;

impl Aggregate {
    pub fn new(config: &Arc<Config>) -> Aggregate {
        let mut agg = Aggregate {
            started: Instant::now(),
            route_names: Vec::new(),
            upstream_names: Vec::new(),
            workers: (0..config.runtime.workers)
                .map(|_| WorkerFigures::default())
                .collect(),
            routes: vec![RouteFigures::default()],
            targets: Vec::new(),
            rejections: [0; Reject::ALL.len()],
            access_log_dropped: 0,
            identity_headers_dropped: 0,
            limit_names: config.rate_limits.iter().map(|l| l.name.clone()).collect(),
            cache: [0; CacheOutcome::ALL.len()],
            cache_enabled: config.cache.is_some(),
            auth_names: Vec::new(),
            auth: Default::default(),
            compression: Default::default(),
            breaker: Vec::new(),
            budget_refused: Vec::new(),
            ratelimited: Vec::new(),
            slots: Vec::new(),
        };
        agg.learn(config);
        agg
    }

    /// Adds the names `config` brings (routes, upstreams, targets, providers, rate-limited
    /// pairs) to the tables, and returns where its ids land. Names are never removed: counters
    /// of a route a reload took away stay, as counters must not go back.
    pub fn learn(&mut self, config: &Arc<Config>) -> usize {
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| Arc::ptr_eq(&s.config, config))
        {
            return i;
        }
        let routes: Vec<usize> = config
            .routes
            .iter()
            .map(
                |r| match self.route_names.iter().position(|n| *n == r.name) {
                    Some(i) => i,
                    None => {
                        self.route_names.push(r.name.clone());
                        // Keep "none" last.
                        let at = self.routes.len() - 1;
                        self.routes.insert(at, RouteFigures::default());
                        at
                    }
                },
            )
            .collect();
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for u in &config.upstreams {
            let i = match self.upstream_names.iter().position(|(n, _)| *n == u.name) {
                Some(i) => i,
                None => {
                    self.upstream_names.push((u.name.clone(), Vec::new()));
                    self.targets.push(Vec::new());
                    self.breaker.push([0; 3]);
                    self.budget_refused.push(0);
                    self.upstream_names.len() - 1
                }
            };
            for t in &u.targets {
                if !self.upstream_names[i].1.contains(&t.name) {
                    self.upstream_names[i].1.push(t.name.clone());
                    self.targets[i].push(TargetFigures::default());
                }
            }
            upstreams.push(i);
        }
        let auth = config
            .auth
            .iter()
            .map(
                |a| match self.auth_names.iter().position(|n| *n == a.name) {
                    Some(i) => i,
                    None => {
                        self.auth_names.push(a.name.clone());
                        self.auth_names.len() - 1
                    }
                },
            )
            .collect();
        for (r, route) in config.routes.iter().enumerate() {
            for l in &route.rate_limits {
                let pair = (routes[r], usize::from(l.0));
                if !self.ratelimited.iter().any(|e| (e.0, e.1) == pair) {
                    self.ratelimited.push((pair.0, pair.1, 0));
                }
            }
        }
        if self.slots.len() == SLOT_MAPS {
            self.slots.remove(0);
        }
        self.slots.push(Slots {
            config: Arc::clone(config),
            routes,
            upstreams,
            auth,
        });
        self.slots.len() - 1
    }

    /// The aggregate's index of target `t` of the upstream at `upstream` (an aggregate index)
    /// in `config`.
    fn target_slot(&self, config: &Config, u: usize, upstream: usize, t: usize) -> Option<usize> {
        let name = &config.upstreams.get(u)?.targets.get(t)?.name;
        self.upstream_names[upstream]
            .1
            .iter()
            .position(|n| n == name)
    }

    pub fn merge(&mut self, s: Snapshot) {
        let secs = s.interval.max(Duration::from_millis(1)).as_secs_f64();
        if let Some(w) = self.workers.get_mut(s.worker) {
            w.requests += s.requests;
            w.rps = s.requests as f64 / secs;
            // Each request is recorded on exactly one route, or as unrouted: together, their
            // latencies are the worker's (one histogram less to record per request).
            let routes = s
                .unrouted
                .iter()
                .chain(s.gens.iter().flat_map(|g| &g.routes));
            for h in routes.filter_map(|r| r.latency.as_ref()) {
                add(&mut w.latency, h);
            }
            w.gauges = s.gauges;
            w.reported = true;
        }
        if let Some(r) = &s.unrouted {
            let none = self.routes.len() - 1;
            self.routes[none].add(r);
        }
        for gen in &s.gens {
            self.merge_generation(gen);
        }
        for (i, n) in s.rejections.iter().enumerate() {
            self.rejections[i] += n;
        }
        self.access_log_dropped += s.access_log_dropped;
        self.identity_headers_dropped += s.identity_headers_dropped;
        for (i, n) in s.cache.iter().enumerate() {
            self.cache[i] += n;
        }
    }

    /// One generation's figures, by the names its config gives its ids.
    fn merge_generation(&mut self, gen: &GenDelta) {
        let map = self.learn(&gen.config);
        let slots = &self.slots[map];
        let (routes, upstreams, auth) = (
            slots.routes.clone(),
            slots.upstreams.clone(),
            slots.auth.clone(),
        );
        for r in &gen.routes {
            if let Some(&i) = r.route.and_then(|id| routes.get(usize::from(id.0))) {
                self.routes[i].add(r);
            }
        }
        for t in &gen.targets {
            let u = usize::from(t.upstream.0);
            let Some(&up) = upstreams.get(u) else {
                continue;
            };
            let Some(i) = self.target_slot(&gen.config, u, up, t.target.0) else {
                continue;
            };
            let figures = &mut self.targets[up][i];
            for (i, n) in t.outcomes.iter().enumerate() {
                figures.outcomes[i] += n;
            }
            figures.retried += t.retried;
            if let Some(h) = &t.latency {
                add(&mut figures.latency, h);
            }
        }
        for (u, delta) in &gen.breaker {
            if let Some(&up) = upstreams.get(usize::from(u.0)) {
                for (t, d) in self.breaker[up].iter_mut().zip(delta) {
                    *t += d;
                }
            }
        }
        for (u, n) in &gen.budget_refused {
            if let Some(&up) = upstreams.get(usize::from(u.0)) {
                self.budget_refused[up] += n;
            }
        }
        for (route, c) in &gen.compression {
            if let Some(&r) = routes.get(usize::from(route.0)) {
                let total = self.compression.entry(r).or_default();
                for (t, n) in total.iter_mut().zip(c) {
                    *t += n;
                }
            }
        }
        for ((route, provider, outcome), n) in &gen.auth {
            let r = routes.get(usize::from(route.0));
            let p = auth.get(usize::from(provider.0));
            if let (Some(&r), Some(&p)) = (r, p) {
                *self.auth.entry((r, p, *outcome)).or_default() += n;
            }
        }
        for (route, limit, n) in &gen.ratelimited {
            let Some(&r) = routes.get(usize::from(route.0)) else {
                continue;
            };
            let pair = (r, usize::from(limit.0));
            if let Some(entry) = self.ratelimited.iter_mut().find(|e| (e.0, e.1) == pair) {
                entry.2 += n;
            }
        }
    }

    pub fn total_requests(&self) -> u64 {
        self.workers.iter().map(|w| w.requests).sum()
    }

    /// The merged latency of the route named `name` ("none" for unrouted requests).
    pub fn route_latency(&self, name: &str) -> Option<&Histogram<u64>> {
        let i = if name == "none" {
            self.routes.len() - 1
        } else {
            self.route_names.iter().position(|n| n == name)?
        };
        self.routes[i].latency.as_ref()
    }

    pub fn route_name(&self, i: usize) -> &str {
        self.route_names.get(i).map_or("none", String::as_str)
    }
}
