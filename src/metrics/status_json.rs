//! `/status`: the aggregate as JSON, per worker, route, upstream and target, with what the side
//! services report.

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use super::aggregate::Aggregate;
use super::render::Process;
use super::{CacheOutcome, UpstreamOutcome};
use crate::error::Reject;

fn percentiles(h: Option<&Histogram<u64>>) -> Value {
    match h {
        Some(h) if !h.is_empty() => json!({
            "p50": h.value_at_quantile(0.5),
            "p90": h.value_at_quantile(0.9),
            "p99": h.value_at_quantile(0.99),
            "p99.9": h.value_at_quantile(0.999),
            "max": h.max(),
        }),
        _ => Value::Null,
    }
}

pub fn status(agg: &Aggregate, process: &Process) -> Value {
    let workers: Vec<Value> = agg
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let idle: Map<String, Value> = agg
                .upstream_names
                .iter()
                .map(|(name, _)| (name.clone(), json!(w.idle(name))))
                .collect();
            json!({
                "worker": i,
                "requests": w.requests,
                "rps": w.rps,
                "latency_us": percentiles(w.latency.as_ref()),
                "connections_active": w.gauges.connections_active,
                "connections_total": w.gauges.connections_total,
                "upstream_idle_connections": idle,
            })
        })
        .collect();
    let mut merged = None;
    for w in &agg.workers {
        if let Some(h) = &w.latency {
            let _ = merged.get_or_insert_with(super::new_histogram).add(h);
        }
    }
    let routes: Map<String, Value> = agg
        .routes
        .iter()
        .enumerate()
        .filter(|(_, r)| r.latency.is_some())
        .map(|(i, r)| {
            let requests: u64 = r.requests.iter().flatten().sum();
            (
                agg.route_name(i).to_owned(),
                json!({ "requests": requests, "latency_us": percentiles(r.latency.as_ref()) }),
            )
        })
        .collect();
    let upstreams: Map<String, Value> = agg
        .upstream_names
        .iter()
        .enumerate()
        .map(|(u, (name, targets))| {
            let t: Map<String, Value> = targets
                .iter()
                .enumerate()
                .map(|(i, tname)| {
                    let f = &agg.targets[u][i];
                    let outcomes: Map<String, Value> = UpstreamOutcome::ALL
                        .iter()
                        .map(|o| (o.label().to_owned(), json!(f.outcomes[*o as usize])))
                        .collect();
                    // Active health, for probed targets: the state and the last probe's finding.
                    let health = process
                        .health
                        .iter()
                        .find(|h| h.upstream == *name && h.target == *tname)
                        .map_or(Value::Null, |h| {
                            json!({ "healthy": h.healthy, "backup": h.backup, "last_probe": h.last,
                                "ejected": h.ejected, "ejections": h.ejections })
                        });
                    (tname.clone(), json!({ "requests": outcomes, "latency_us": percentiles(f.latency.as_ref()), "health": health }))
                })
                .collect();
            let idle: usize = agg.workers.iter().map(|w| w.idle(name)).sum();
            (name.clone(), json!({ "targets": t, "idle_connections": idle }))
        })
        .collect();
    let rejected: Map<String, Value> = Reject::ALL
        .iter()
        .map(|r| (r.label().to_owned(), json!(agg.rejections[*r as usize])))
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": process.uptime_seconds,
        "total": {
            "requests": agg.total_requests(),
            "rps": agg.workers.iter().map(|w| w.rps).sum::<f64>(),
            "latency_us": percentiles(merged.as_ref()),
            "connections_active": agg.workers.iter().map(|w| w.gauges.connections_active).sum::<usize>(),
        },
        "workers": workers,
        "routes": routes,
        "upstreams": upstreams,
        "rejected": rejected,
        "cache": if agg.cache_enabled {
            json!({
                "hits": agg.cache[CacheOutcome::Hit as usize],
                "misses": agg.cache[CacheOutcome::Miss as usize],
                "stale": agg.cache[CacheOutcome::Stale as usize],
                "bypass": agg.cache[CacheOutcome::Bypass as usize],
                "coalesced": agg.cache[CacheOutcome::Coalesced as usize],
                "revalidated": agg.cache[CacheOutcome::Revalidated as usize],
                "stale_if_error": agg.cache[CacheOutcome::StaleIfError as usize],
                "waiting": agg.workers.iter().map(|w| w.gauges.cache_waiting).sum::<usize>(),
                "bytes": agg.workers.iter().map(|w| w.gauges.cache_bytes).max().unwrap_or(0),
                "entries": agg.workers.iter().map(|w| w.gauges.cache_entries).max().unwrap_or(0),
                "evictions": agg.workers.iter().map(|w| w.gauges.cache_evictions).sum::<u64>(),
            })
        } else {
            Value::Null
        },
        "config": process.config.as_ref().map(|c| json!({
            "generation": c.generation,
            "digest": c.digest,
            "path": c.path,
            "loaded_at": c.loaded_at,
            "reloads": super::status::RELOAD_RESULTS.iter().zip(process.reloads)
                .map(|(r, n)| ((*r).to_owned(), json!(n))).collect::<Map<String, Value>>(),
        })),
        "resident_memory_bytes": process.resident_bytes,
        "open_fds": process.open_fds,
    })
}
