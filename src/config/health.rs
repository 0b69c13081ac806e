//! An upstream's resilience: `[upstreams.health_check]` (active probing), `[upstreams.outlier]`
//! (ejecting a target on what real traffic shows), `[upstreams.retries]` and
//! `[upstreams.limits]` (circuit breaking).

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ms, ConfigError, Validator};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckFile {
    #[serde(rename = "type")]
    pub kind: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub interval_ms: Option<Spanned<u64>>,
    pub timeout_ms: Option<Spanned<u64>>,
    pub healthy_threshold: Option<Spanned<u32>>,
    pub unhealthy_threshold: Option<Spanned<u32>>,
    pub expect_status: Option<Spanned<Vec<Spanned<u16>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierFile {
    pub consecutive_failures: Option<Spanned<u64>>,
    pub ejection_ms: Option<Spanned<u64>>,
    pub max_ejection_ms: Option<Spanned<u64>>,
    pub max_ejection_percent: Option<Spanned<u64>>,
}

/// Passive health: when a target is ejected, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlier {
    /// Failures in a row (connect errors, resets, timeouts, 5xx), summed over the workers.
    pub consecutive_failures: u32,
    /// The first ejection's length; each consecutive one doubles it, up to `max_ejection`.
    pub ejection: Duration,
    pub max_ejection: Duration,
    /// Never more than this share of the upstream's targets ejected at once.
    pub max_ejection_percent: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesFile {
    pub attempts: Option<Spanned<u64>>,
    pub on: Option<Vec<Spanned<String>>>,
    pub budget_percent: Option<Spanned<u64>>,
    pub backoff_ms: Option<Spanned<u64>>,
}

/// When a failed exchange is tried again on another target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retries {
    /// Extra attempts after the first.
    pub attempts: u32,
    pub on: RetryOn,
    /// Retries may add at most this share to the requests sent.
    pub budget_percent: u32,
    /// The pause before a retry (jittered: half to one and a half times).
    pub backoff: Duration,
}

/// The failures `retries.on` names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub reset: bool,
    pub timeout: bool,
    /// 502, 503, 504 answered by the target.
    pub statuses: [bool; 3],
}

impl RetryOn {
    /// Whether a response with `status` is retried.
    pub fn status(&self, status: u16) -> bool {
        matches!(status, 502..=504) && self.statuses[usize::from(status - 502)]
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_connections: Option<Spanned<u64>>,
    pub max_pending: Option<Spanned<u64>>,
    pub max_requests: Option<Spanned<u64>>,
}

/// Circuit breaking: the process's limits, and each worker's share of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamLimits {
    /// Connections open to the upstream's targets (in use and idle).
    pub max_connections: u32,
    /// Requests waiting for a connection while `max_connections` are open.
    pub max_pending: u32,
    /// Requests in flight to the upstream.
    pub max_requests: u32,
}

impl UpstreamLimits {
    /// A worker's share: each limit divided by the workers, rounded up (so the process may
    /// exceed a limit by fewer than one per worker), and never below 1 (`max_pending` may be 0).
    pub fn per_worker(&self, workers: usize) -> UpstreamLimits {
        let w = workers.max(1) as u32;
        let share = |n: u32, floor: u32| n.div_ceil(w).max(floor);
        UpstreamLimits {
            max_connections: share(self.max_connections, 1),
            max_pending: share(self.max_pending, 0),
            max_requests: share(self.max_requests, 1),
        }
    }
}

/// How an upstream's targets are probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive good probes that bring an unhealthy target back.
    pub healthy_threshold: u32,
    /// Consecutive failed probes that take a healthy target out.
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET path` with `Host: host` (the target's name when `None`); healthy when the status
    /// is in `expect` (any 2xx or 3xx when empty).
    Http {
        path: String,
        host: Option<String>,
        expect: Vec<u16>,
    },
    /// A connection (and TLS handshake, for a TLS upstream) is made.
    Tcp,
}

impl Validator<'_> {
    /// `v` if it is within `min..=max`, `default` without one; else an error naming
    /// `key.field` and the range.
    fn ranged(
        &self,
        v: Option<&Spanned<u64>>,
        key: &str,
        field: &str,
        default: u64,
        (min, max): (u64, u64),
    ) -> Result<u64, ConfigError> {
        match v {
            None => Ok(default),
            Some(v) if (min..=max).contains(v.get_ref()) => Ok(*v.get_ref()),
            Some(v) => Err(self.err(
                v.span(),
                &format!("{key}.{field}"),
                format!("must be between {min} and {max}"),
            )),
        }
    }

    pub(super) fn limits_of(
        &self,
        l: &Spanned<LimitsFile>,
        key: &str,
    ) -> Result<UpstreamLimits, ConfigError> {
        let f = l.get_ref();
        let number = |v: &Option<Spanned<u64>>, field: &str, min: u64| {
            self.ranged(v.as_ref(), key, field, 1_000_000, (min, 1_000_000))
                .map(|n| n as u32)
        };
        Ok(UpstreamLimits {
            max_connections: number(&f.max_connections, "max_connections", 1)?,
            max_pending: number(&f.max_pending, "max_pending", 0)?,
            max_requests: number(&f.max_requests, "max_requests", 1)?,
        })
    }

    pub(super) fn retries(
        &self,
        r: &Spanned<RetriesFile>,
        key: &str,
    ) -> Result<Retries, ConfigError> {
        let f = r.get_ref();
        let number = |v: &Option<Spanned<u64>>, field: &str, default: u64, max: u64| {
            self.ranged(v.as_ref(), key, field, default, (0, max))
        };
        let mut on = RetryOn::default();
        match &f.on {
            None => {
                on = RetryOn {
                    connect_failure: true,
                    reset: true,
                    timeout: true,
                    statuses: [true; 3],
                }
            }
            Some(list) => {
                for c in list {
                    match c.get_ref().as_str() {
                        "connect-failure" => on.connect_failure = true,
                        "reset" => on.reset = true,
                        "timeout" => on.timeout = true,
                        "502" => on.statuses[0] = true,
                        "503" => on.statuses[1] = true,
                        "504" => on.statuses[2] = true,
                        other => {
                            return Err(self.err(
                                c.span(),
                                &format!("{key}.on"),
                                format!("{other:?}: give \"connect-failure\", \"reset\", \"timeout\", \"502\", \"503\" or \"504\""),
                            ))
                        }
                    }
                }
            }
        }
        Ok(Retries {
            attempts: number(&f.attempts, "attempts", 2, 5)? as u32,
            on,
            budget_percent: number(&f.budget_percent, "budget_percent", 20, 100)? as u32,
            backoff: ms(number(&f.backoff_ms, "backoff_ms", 25, 10_000)?),
        })
    }

    pub(super) fn outlier(
        &self,
        o: &Spanned<OutlierFile>,
        key: &str,
    ) -> Result<Outlier, ConfigError> {
        let f = o.get_ref();
        let number = |v: &Option<Spanned<u64>>, field: &str, default: u64, range: (u64, u64)| {
            self.ranged(v.as_ref(), key, field, default, range)
        };
        let ejection = number(&f.ejection_ms, "ejection_ms", 30_000, (10, 3_600_000))?;
        let max_ejection = number(
            &f.max_ejection_ms,
            "max_ejection_ms",
            (ejection * 10).max(300_000),
            (ejection, 86_400_000),
        )?;
        Ok(Outlier {
            consecutive_failures: number(
                &f.consecutive_failures,
                "consecutive_failures",
                5,
                (1, 1000),
            )? as u32,
            ejection: ms(ejection),
            max_ejection: ms(max_ejection),
            max_ejection_percent: number(
                &f.max_ejection_percent,
                "max_ejection_percent",
                50,
                (0, 100),
            )? as u32,
        })
    }

    pub(super) fn health_check(
        &self,
        h: &Spanned<HealthCheckFile>,
        key: &str,
    ) -> Result<HealthCheck, ConfigError> {
        let f = h.get_ref();
        let kind = f.kind.as_ref().map_or("http", |k| k.get_ref().as_str());
        let probe = match kind {
            "http" => {
                let Some(path) = &f.path else {
                    return Err(self.err(
                        h.span(),
                        &format!("{key}.path"),
                        "an HTTP health check needs a `path` (or give type = \"tcp\")",
                    ));
                };
                let p = path.get_ref();
                if !p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
                    return Err(self.err(
                        path.span(),
                        &format!("{key}.path"),
                        "a path starts with '/' and has no spaces or control characters",
                    ));
                }
                let host = match &f.host {
                    Some(v) if crate::http::valid_redirect_host(v.get_ref().as_bytes()) => {
                        Some(v.get_ref().clone())
                    }
                    Some(v) => {
                        return Err(self.err(
                            v.span(),
                            &format!("{key}.host"),
                            format!("{:?} is not a host", v.get_ref()),
                        ))
                    }
                    None => None,
                };
                let mut expect = Vec::new();
                if let Some(list) = &f.expect_status {
                    for s in list.get_ref() {
                        if !(100..=599).contains(s.get_ref()) {
                            return Err(self.err(
                                s.span(),
                                &format!("{key}.expect_status"),
                                "a status is between 100 and 599",
                            ));
                        }
                        expect.push(*s.get_ref());
                    }
                    if expect.is_empty() {
                        return Err(self.err(
                            list.span(),
                            &format!("{key}.expect_status"),
                            "list at least one status (or leave it out: any 2xx or 3xx)",
                        ));
                    }
                }
                Probe::Http {
                    path: p.clone(),
                    host,
                    expect,
                }
            }
            "tcp" => {
                let stray = [("path", &f.path), ("host", &f.host)]
                    .into_iter()
                    .find_map(|(name, v)| Some((name, v.as_ref()?.span())))
                    .or_else(|| Some(("expect_status", f.expect_status.as_ref()?.span())));
                if let Some((name, span)) = stray {
                    return Err(self.err(
                        span,
                        &format!("{key}.{name}"),
                        format!("`{name}` is for HTTP health checks, not type = \"tcp\""),
                    ));
                }
                Probe::Tcp
            }
            other => {
                let span = f.kind.as_ref().map_or(h.span(), Spanned::span);
                return Err(self.err(
                    span,
                    &format!("{key}.type"),
                    format!("{other:?}: give \"http\" or \"tcp\""),
                ));
            }
        };
        let number = |v: &Option<Spanned<u64>>, field: &str, default: u64, range: (u64, u64)| {
            self.ranged(v.as_ref(), key, field, default, range)
        };
        let interval = number(&f.interval_ms, "interval_ms", 2000, (10, 3_600_000))?;
        let timeout = number(&f.timeout_ms, "timeout_ms", 1000, (1, 60_000))?;
        let threshold = |v: &Option<Spanned<u32>>, field: &str, default: u64| {
            let v = v
                .as_ref()
                .map(|s| Spanned::new(s.span(), u64::from(*s.get_ref())));
            number(&v, field, default, (1, 100)).map(|n| n as u32)
        };
        Ok(HealthCheck {
            probe,
            interval: ms(interval),
            timeout: ms(timeout),
            healthy_threshold: threshold(&f.healthy_threshold, "healthy_threshold", 2)?,
            unhealthy_threshold: threshold(&f.unhealthy_threshold, "unhealthy_threshold", 3)?,
        })
    }
}

/// Which of an upstream's `[limits]` refused a request (its circuit breaker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Pending,
    Connections,
}

impl Limit {
    pub const ALL: [Limit; 3] = [Limit::Requests, Limit::Pending, Limit::Connections];

    pub fn label(self) -> &'static str {
        match self {
            Limit::Requests => "max_requests",
            Limit::Pending => "max_pending",
            Limit::Connections => "max_connections",
        }
    }

    /// The reason a refused client reads.
    pub fn reason(self) -> &'static str {
        match self {
            Limit::Requests => "the upstream's max_requests are in flight",
            Limit::Pending => "the upstream's max_pending requests are waiting for a connection",
            Limit::Connections => "no connection to the upstream came free in time",
        }
    }
}
