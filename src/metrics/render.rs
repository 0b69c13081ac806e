//! Rendering the aggregate: Prometheus text exposition format 0.0.4 for `/metrics`, and
//! HdrHistogram's percentile-distribution text for `/metrics/hdr` (`/status` is in
//! `status_json`).

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::aggregate::{Aggregate, WorkerFigures};
use super::resilience;
use super::status::CertExpiry;
pub use super::status_json::status;
use super::{CacheOutcome, UpstreamOutcome, METHODS, STATUS_CLASSES};
use crate::error::Reject;

/// Prometheus histogram bucket bounds, in seconds; counts come from the HDR data.
const BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// A label value, escaped per the exposition format.
pub(super) fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(super) fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One series per worker, `name{worker="i"} value`.
fn per_worker<T: std::fmt::Display>(
    out: &mut String,
    agg: &Aggregate,
    (name, kind, help): (&str, &str, &str),
    value: impl Fn(&WorkerFigures) -> T,
) {
    header(out, name, kind, help);
    for (i, w) in agg.workers.iter().enumerate() {
        let _ = writeln!(out, "{name}{{worker=\"{i}\"}} {}", value(w));
    }
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram<u64>) {
    for le in BUCKETS {
        let n = h.count_between(0, (le * 1e6) as u64);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.len());
    let _ = writeln!(
        out,
        "{name}_sum{{{labels}}} {}",
        h.mean() * h.len() as f64 / 1e6
    );
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.len());
}

/// Process figures read from /proc at scrape time.
pub struct Process {
    pub resident_bytes: u64,
    pub open_fds: u64,
    pub uptime_seconds: f64,
    /// Every served TLS certificate's expiry.
    pub tls_certs: Vec<CertExpiry>,
    /// Every remote JWKS's fetches and keys.
    pub jwks: Vec<super::status::JwksStat>,
    /// Every actively probed target's health.
    pub health: Vec<super::status::TargetHealth>,
    /// The config in use, and reload outcomes by result (`reload::RESULTS` order).
    pub config: Option<super::status::Loaded>,
    pub reloads: [u64; 4],
}

impl Process {
    pub fn read(agg: &Aggregate) -> Process {
        let page = 4096;
        let resident_bytes = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |pages| pages * page);
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        Process {
            resident_bytes,
            open_fds,
            uptime_seconds: agg.started.elapsed().as_secs_f64(),
            tls_certs: Vec::new(),
            jwks: Vec::new(),
            health: Vec::new(),
            config: None,
            reloads: [0; 4],
        }
    }
}

pub fn prometheus(agg: &Aggregate, process: &Process) -> String {
    let mut out = String::with_capacity(16 * 1024);

    header(
        &mut out,
        "ringway_requests_total",
        "counter",
        "Requests answered, by route, method and status class.",
    );
    for (i, r) in agg.routes.iter().enumerate() {
        for (m, classes) in r.requests.iter().enumerate() {
            for (c, n) in classes.iter().enumerate() {
                if *n > 0 {
                    let _ = writeln!(
                        out,
                        "ringway_requests_total{{route=\"{}\",method=\"{}\",status_class=\"{}\"}} {n}",
                        esc(agg.route_name(i)),
                        METHODS[m],
                        STATUS_CLASSES[c]
                    );
                }
            }
        }
    }

    header(
        &mut out,
        "ringway_request_duration_seconds",
        "histogram",
        "Time from a complete request head to the end of the response, by route.",
    );
    for (i, r) in agg.routes.iter().enumerate() {
        if let Some(h) = &r.latency {
            histogram(
                &mut out,
                "ringway_request_duration_seconds",
                &format!("route=\"{}\"", esc(agg.route_name(i))),
                h,
            );
        }
    }

    header(
        &mut out,
        "ringway_upstream_duration_seconds",
        "histogram",
        "Time from sending a request upstream to its response head, by upstream and target.",
    );
    for (u, targets) in agg.targets.iter().enumerate() {
        let (uname, tnames) = &agg.upstream_names[u];
        for (t, figures) in targets.iter().enumerate() {
            if let Some(h) = &figures.latency {
                let labels = format!("upstream=\"{}\",target=\"{}\"", esc(uname), esc(&tnames[t]));
                histogram(&mut out, "ringway_upstream_duration_seconds", &labels, h);
            }
        }
    }

    header(
        &mut out,
        "ringway_upstream_requests_total",
        "counter",
        "Exchanges with upstream targets, by outcome.",
    );
    for (u, targets) in agg.targets.iter().enumerate() {
        let (uname, tnames) = &agg.upstream_names[u];
        for (t, figures) in targets.iter().enumerate() {
            for o in UpstreamOutcome::ALL {
                let _ = writeln!(
                    out,
                    "ringway_upstream_requests_total{{upstream=\"{}\",target=\"{}\",outcome=\"{}\"}} {}",
                    esc(uname),
                    esc(&tnames[t]),
                    o.label(),
                    figures.outcomes[o as usize]
                );
            }
        }
    }

    resilience::upstreams(&mut out, agg);
    per_worker(
        &mut out,
        agg,
        (
            "ringway_connections_active",
            "gauge",
            "Open client connections, by worker.",
        ),
        |w| w.gauges.connections_active,
    );
    per_worker(
        &mut out,
        agg,
        (
            "ringway_connections_total",
            "counter",
            "Client connections accepted, by worker.",
        ),
        |w| w.gauges.connections_total,
    );
    per_worker(
        &mut out,
        agg,
        (
            "ringway_worker_requests_total",
            "counter",
            "Requests answered, by worker.",
        ),
        |w| w.requests,
    );
    header(
        &mut out,
        "ringway_upstream_idle_connections",
        "gauge",
        "Idle pooled upstream connections, by upstream.",
    );
    for (uname, _) in agg.upstream_names.iter() {
        let idle: usize = agg.workers.iter().map(|w| w.idle(uname)).sum();
        let _ = writeln!(
            out,
            "ringway_upstream_idle_connections{{upstream=\"{}\"}} {idle}",
            esc(uname)
        );
    }
    if !process.tls_certs.is_empty() {
        header(
            &mut out,
            "ringway_tls_cert_expiry_seconds",
            "gauge",
            "Seconds until each served TLS certificate expires (negative once it has).",
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for c in &process.tls_certs {
            let _ = writeln!(
                out,
                "ringway_tls_cert_expiry_seconds{{listener=\"{}\",name=\"{}\"}} {}",
                esc(&c.listener),
                esc(&c.name),
                c.not_after - now
            );
        }
    }
    resilience::jwks(&mut out, &process.jwks);
    resilience::health(&mut out, &process.health);
    resilience::config(&mut out, process);
    header(
        &mut out,
        "ringway_rejected_requests_total",
        "counter",
        "Requests and connections refused for hostile or malformed input, by reason.",
    );
    for r in Reject::ALL {
        let _ = writeln!(
            out,
            "ringway_rejected_requests_total{{reason=\"{}\"}} {}",
            r.label(),
            agg.rejections[r as usize]
        );
    }
    if !agg.auth_names.is_empty() {
        header(
            &mut out,
            "ringway_auth_total",
            "counter",
            "Authentication decisions, by route, provider and outcome (ok, missing, invalid, forbidden).",
        );
        for ((route, provider, outcome), n) in &agg.auth {
            let _ = writeln!(
                out,
                "ringway_auth_total{{route=\"{}\",provider=\"{}\",outcome=\"{}\"}} {n}",
                esc(agg.route_name(*route)),
                esc(&agg.auth_names[*provider]),
                outcome.label()
            );
        }
    }
    header(
        &mut out,
        "ringway_ratelimited_total",
        "counter",
        "Requests refused by a rate limit, by route and limit.",
    );
    for (route, limit, n) in &agg.ratelimited {
        let _ = writeln!(
            out,
            "ringway_ratelimited_total{{route=\"{}\",limit=\"{}\"}} {n}",
            esc(agg.route_name(*route)),
            esc(&agg.limit_names[*limit])
        );
    }
    header(
        &mut out,
        "ringway_compressed_responses_total",
        "counter",
        "Responses compressed by the gateway, by route and algorithm.",
    );
    for (route, c) in &agg.compression {
        for (coding, n) in crate::config::Coding::ALL.iter().zip(c) {
            let _ = writeln!(
                out,
                "ringway_compressed_responses_total{{route=\"{}\",algorithm=\"{}\"}} {n}",
                esc(agg.route_name(*route)),
                coding.token()
            );
        }
    }
    header(
        &mut out,
        "ringway_compression_bytes_total",
        "counter",
        "Bytes into and out of the gateway's compressors, by route.",
    );
    for (route, c) in &agg.compression {
        for (direction, n) in [("in", c[3]), ("out", c[4])] {
            let _ = writeln!(
                out,
                "ringway_compression_bytes_total{{route=\"{}\",direction=\"{direction}\"}} {n}",
                esc(agg.route_name(*route)),
            );
        }
    }
    header(
        &mut out,
        "ringway_ratelimit_keys",
        "gauge",
        "Keys held in a worker's table for a rate limit (at most max_keys).",
    );
    for (i, w) in agg.workers.iter().enumerate() {
        for (l, n) in w.gauges.ratelimit_keys.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringway_ratelimit_keys{{limit=\"{}\",worker=\"{i}\"}} {n}",
                esc(&agg.limit_names[l])
            );
        }
    }
    if agg.cache_enabled {
        header(
            &mut out,
            "ringway_cache_requests_total",
            "counter",
            "Requests on caching routes, by result.",
        );
        for o in CacheOutcome::ALL {
            let _ = writeln!(
                out,
                "ringway_cache_requests_total{{result=\"{}\"}} {}",
                o.label(),
                agg.cache[o as usize]
            );
        }
        // Bodies are shared between workers: the process holds about one worker's worth.
        per_worker(
            &mut out,
            agg,
            (
                "ringway_cache_bytes",
                "gauge",
                "Bytes of cached responses indexed, by worker.",
            ),
            |w| w.gauges.cache_bytes,
        );
        per_worker(
            &mut out,
            agg,
            (
                "ringway_cache_entries",
                "gauge",
                "Cached responses indexed, by worker.",
            ),
            |w| w.gauges.cache_entries,
        );
        per_worker(
            &mut out,
            agg,
            (
                "ringway_cache_waiting",
                "gauge",
                "Requests waiting for another request's fetch of the same key, by worker.",
            ),
            |w| w.gauges.cache_waiting,
        );
        per_worker(
            &mut out,
            agg,
            (
                "ringway_cache_evictions_total",
                "counter",
                "Entries evicted to stay within max_bytes, by worker.",
            ),
            |w| w.gauges.cache_evictions,
        );
    }
    header(
        &mut out,
        "ringway_access_log_dropped_total",
        "counter",
        "Access log lines dropped because the writer fell behind.",
    );
    let _ = writeln!(
        out,
        "ringway_access_log_dropped_total {}",
        agg.access_log_dropped
    );
    header(
        &mut out,
        "ringway_identity_headers_dropped_total",
        "counter",
        "Client-sent copies of headers the gateway vouches for (X-Consumer, claim headers), removed.",
    );
    let _ = writeln!(
        out,
        "ringway_identity_headers_dropped_total {}",
        agg.identity_headers_dropped
    );
    header(
        &mut out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
    );
    let _ = writeln!(
        out,
        "process_resident_memory_bytes {}",
        process.resident_bytes
    );
    header(
        &mut out,
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
    );
    let _ = writeln!(out, "process_open_fds {}", process.open_fds);
    header(
        &mut out,
        "ringway_uptime_seconds",
        "gauge",
        "Seconds since start.",
    );
    let _ = writeln!(out, "ringway_uptime_seconds {:.3}", process.uptime_seconds);
    out
}

/// HdrHistogram's percentile distribution (as `outputPercentileDistribution` writes it, and
/// as wrk2 and the HdrHistogram plotter read it), values in milliseconds.
pub fn hdr_distribution(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let value = v.value_iterated_to() as f64 / 1000.0;
        if q < 1.0 {
            let _ = writeln!(
                out,
                "{value:12.3} {q:2.12} {total:10} {:14.2}",
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(out, "{value:12.3} {q:2.12} {total:10}");
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    let sub_buckets = (2 * 10u64.pow(u32::from(h.sigfig()))).next_power_of_two();
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hdr_distribution_ends_at_the_maximum_with_the_total() {
        let mut h = super::super::new_histogram();
        for us in 1..=1000 {
            h.record(us * 10).unwrap();
        }
        let text = hdr_distribution(&h);
        let last = text
            .lines()
            .rfind(|l| !l.starts_with('#') && !l.trim().is_empty())
            .unwrap();
        let cols: Vec<&str> = last.split_whitespace().collect();
        assert_eq!(cols[1], "1.000000000000");
        assert_eq!(cols[2], "1000");
        assert!(text.contains("Total count    =         1000]"), "{text}");
        assert!(text.contains("SubBuckets     =         2048]"), "{text}");
    }
}
