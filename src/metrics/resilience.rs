//! Prometheus sections for what keeps upstreams and identity providers usable: retries and
//! circuit-breaker refusals per upstream, active health and outlier ejection per target, and
//! remote JWKS fetches; and the config generation and reloads.

use std::fmt::Write as _;

use super::aggregate::Aggregate;
use super::render::{esc, header};

/// Retries and breaker refusals, from the workers' merged counters.
pub fn upstreams(out: &mut String, agg: &Aggregate) {
    header(
        out,
        "ringway_upstream_breaker_refusals_total",
        "counter",
        "Requests refused by an upstream's [limits] (circuit breaking), by limit.",
    );
    for (u, counts) in agg.breaker.iter().enumerate() {
        let (uname, _) = &agg.upstream_names[u];
        for limit in crate::config::Limit::ALL {
            let _ = writeln!(
                out,
                "ringway_upstream_breaker_refusals_total{{upstream=\"{}\",limit=\"{}\"}} {}",
                esc(uname),
                limit.label(),
                counts[limit as usize]
            );
        }
    }
    header(
        out,
        "ringway_upstream_retry_budget_refusals_total",
        "counter",
        "Failures a retry would have followed, not retried because the upstream's retry budget was spent.",
    );
    for (u, n) in agg.budget_refused.iter().enumerate() {
        let (uname, _) = &agg.upstream_names[u];
        let _ = writeln!(
            out,
            "ringway_upstream_retry_budget_refusals_total{{upstream=\"{}\"}} {n}",
            esc(uname)
        );
    }
    header(
        out,
        "ringway_upstream_retries_total",
        "counter",
        "Attempts on a target that failed and were tried again on another (upstreams with retries).",
    );
    for (u, targets) in agg.targets.iter().enumerate() {
        let (uname, tnames) = &agg.upstream_names[u];
        for (t, figures) in targets.iter().enumerate() {
            let _ = writeln!(
                out,
                "ringway_upstream_retries_total{{upstream=\"{}\",target=\"{}\"}} {}",
                esc(uname),
                esc(&tnames[t]),
                figures.retried
            );
        }
    }
}

/// Remote JWKS: fetches by result, keys held, and the age of the keys in use.
pub fn jwks(out: &mut String, all: &[super::status::JwksStat]) {
    if all.is_empty() {
        return;
    }
    header(
        out,
        "ringway_jwks_fetches_total",
        "counter",
        "JWKS fetches by provider and result (ok, failed; refused: a kid-triggered refetch asked for within 30 s of the last).",
    );
    for s in all {
        let p = esc(&s.provider);
        for (result, n) in [("ok", s.ok), ("failed", s.failed), ("refused", s.refused)] {
            let _ = writeln!(
                out,
                "ringway_jwks_fetches_total{{provider=\"{p}\",result=\"{result}\"}} {n}"
            );
        }
    }
    header(
        out,
        "ringway_jwks_keys",
        "gauge",
        "Usable keys in each provider's current JWKS.",
    );
    for s in all {
        let _ = writeln!(
            out,
            "ringway_jwks_keys{{provider=\"{}\"}} {}",
            esc(&s.provider),
            s.keys
        );
    }
    header(
        out,
        "ringway_jwks_age_seconds",
        "gauge",
        "Seconds since each provider's keys were last fetched successfully (absent before the first).",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for s in all {
        if let Some(at) = s.fetched_at {
            let _ = writeln!(
                out,
                "ringway_jwks_age_seconds{{provider=\"{}\"}} {}",
                esc(&s.provider),
                now.saturating_sub(at)
            );
        }
    }
}

/// Upstream health: active checks' verdicts and probes, outlier ejections.
pub fn health(out: &mut String, all: &[super::status::TargetHealth]) {
    let label = |t: &super::status::TargetHealth| {
        format!(
            "upstream=\"{}\",target=\"{}\"",
            esc(&t.upstream),
            esc(&t.target)
        )
    };
    let probed: Vec<_> = all.iter().filter(|t| t.healthy.is_some()).collect();
    if !probed.is_empty() {
        header(
            out,
            "ringway_upstream_target_healthy",
            "gauge",
            "1 while active health checks find the target healthy, 0 while they do not.",
        );
        for t in &probed {
            let healthy = u8::from(t.healthy == Some(true));
            let _ = writeln!(
                out,
                "ringway_upstream_target_healthy{{{},backup=\"{}\"}} {healthy}",
                label(t),
                t.backup
            );
        }
        header(
            out,
            "ringway_health_probes_total",
            "counter",
            "Active health probes by upstream, target and result (ok, failed).",
        );
        for t in &probed {
            for (result, n) in [("ok", t.ok), ("failed", t.failed)] {
                let _ = writeln!(
                    out,
                    "ringway_health_probes_total{{{},result=\"{result}\"}} {n}",
                    label(t)
                );
            }
        }
    }
    if !all.is_empty() {
        header(
            out,
            "ringway_upstream_target_ejected",
            "gauge",
            "1 while outlier detection keeps the target out of the balancer.",
        );
        for t in all {
            let _ = writeln!(
                out,
                "ringway_upstream_target_ejected{{{}}} {}",
                label(t),
                u8::from(t.ejected)
            );
        }
        header(
            out,
            "ringway_outlier_ejections_total",
            "counter",
            "Outlier ejections by upstream and target.",
        );
        for t in all {
            let _ = writeln!(
                out,
                "ringway_outlier_ejections_total{{{}}} {}",
                label(t),
                t.ejections
            );
        }
    }
}

/// The config in use and reload outcomes.
pub fn config(out: &mut String, process: &super::render::Process) {
    let Some(loaded) = &process.config else {
        return;
    };
    header(
        out,
        "ringway_config_generation",
        "gauge",
        "The loaded config's generation: 1 at start, one more per successful reload.",
    );
    let _ = writeln!(out, "ringway_config_generation {}", loaded.generation);
    header(
        out,
        "ringway_config_reloads_total",
        "counter",
        "Reloads asked for (SIGHUP, POST /config/reload), by result: ok, invalid, refused (needs a restart), failed.",
    );
    for (result, n) in super::status::RELOAD_RESULTS.iter().zip(process.reloads) {
        let _ = writeln!(
            out,
            "ringway_config_reloads_total{{result=\"{result}\"}} {n}"
        );
    }
}
