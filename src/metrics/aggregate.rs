//! The aggregator, on the admin thread: merges the workers' snapshots into running totals
//! (counters summed, histograms added with `Histogram::add`) and keeps each worker's latest
//! figures for `/status`.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::{
    new_histogram, AuthOutcome, CacheOutcome, Gauges, RequestCounts, Snapshot, UpstreamOutcome,
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
    pub limit_names: Vec<String>,
    pub cache: [u64; CacheOutcome::ALL.len()],
    pub cache_enabled: bool,
    /// `(route, limit, refused)` for every limit a route applies.
    pub ratelimited: Vec<(usize, usize, u64)>,
    pub auth_names: Vec<String>,
    /// Authentication decisions by (route, provider, outcome).
    pub auth: std::collections::BTreeMap<(usize, usize, AuthOutcome), u64>,
    /// Circuit-breaker refusals by upstream and limit.
    pub breaker: Vec<[u64; 3]>,
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

#[derive(Default)]
pub struct RouteFigures {
    pub requests: RequestCounts,
    pub latency: Option<Histogram<u64>>,
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

impl Aggregate {
    pub fn new(config: &Config) -> Aggregate {
        Aggregate {
            started: Instant::now(),
            route_names: config.routes.iter().map(|r| r.name.clone()).collect(),
            upstream_names: config
                .upstreams
                .iter()
                .map(|u| {
                    (
                        u.name.clone(),
                        u.targets.iter().map(|t| t.name.clone()).collect(),
                    )
                })
                .collect(),
            workers: (0..config.runtime.workers)
                .map(|_| WorkerFigures::default())
                .collect(),
            routes: (0..=config.routes.len())
                .map(|_| RouteFigures::default())
                .collect(),
            targets: config
                .upstreams
                .iter()
                .map(|u| u.targets.iter().map(|_| TargetFigures::default()).collect())
                .collect(),
            rejections: [0; Reject::ALL.len()],
            access_log_dropped: 0,
            limit_names: config.rate_limits.iter().map(|l| l.name.clone()).collect(),
            cache: [0; CacheOutcome::ALL.len()],
            cache_enabled: config.cache.is_some(),
            auth_names: config.auth.iter().map(|a| a.name.clone()).collect(),
            auth: Default::default(),
            breaker: vec![[0; 3]; config.upstreams.len()],
            ratelimited: config
                .routes
                .iter()
                .enumerate()
                .flat_map(|(r, route)| {
                    route
                        .rate_limits
                        .iter()
                        .map(move |l| (r, usize::from(l.0), 0))
                })
                .collect(),
        }
    }

    pub fn merge(&mut self, s: Snapshot) {
        let secs = s.interval.max(Duration::from_millis(1)).as_secs_f64();
        if let Some(w) = self.workers.get_mut(s.worker) {
            w.requests += s.requests;
            w.rps = s.requests as f64 / secs;
            add(&mut w.latency, &s.latency);
            w.gauges = s.gauges;
            w.reported = true;
        }
        let none = self.routes.len() - 1;
        for r in &s.routes {
            let figures = &mut self.routes[r.route.map_or(none, |id| usize::from(id.0))];
            for (m, classes) in r.requests.iter().enumerate() {
                for (c, count) in classes.iter().enumerate() {
                    figures.requests[m][c] += count;
                }
            }
            if let Some(h) = &r.latency {
                add(&mut figures.latency, h);
            }
        }
        for t in &s.targets {
            let figures = &mut self.targets[usize::from(t.upstream.0)][t.target.0];
            for (i, n) in t.outcomes.iter().enumerate() {
                figures.outcomes[i] += n;
            }
            figures.retried += t.retried;
            if let Some(h) = &t.latency {
                add(&mut figures.latency, h);
            }
        }
        for (i, n) in s.rejections.iter().enumerate() {
            self.rejections[i] += n;
        }
        self.access_log_dropped += s.access_log_dropped;
        for (i, n) in s.cache.iter().enumerate() {
            self.cache[i] += n;
        }
        for (total, delta) in self.breaker.iter_mut().zip(&s.breaker) {
            for (t, d) in total.iter_mut().zip(delta) {
                *t += d;
            }
        }
        for ((route, provider, outcome), n) in &s.auth {
            let key = (usize::from(route.0), usize::from(provider.0), *outcome);
            *self.auth.entry(key).or_default() += n;
        }
        for (route, limit, n) in &s.ratelimited {
            let pair = (usize::from(route.0), usize::from(limit.0));
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
