//! What the admin endpoints show of the side services, as plain data: each service writes its
//! own (off the request path) and the admin thread reads a copy at scrape time. Here, below
//! the services, so that rendering needs none of them.

/// A remote JWKS provider's fetches.
#[derive(Debug, Clone, Default)]
pub struct JwksStat {
    pub provider: String,
    pub keys: usize,
    /// Seconds since the epoch of the last good fetch.
    pub fetched_at: Option<u64>,
    pub ok: u64,
    pub failed: u64,
    pub refused: u64,
}

/// A target's active health and ejection state.
#[derive(Debug, Clone)]
pub struct TargetHealth {
    pub upstream: String,
    pub target: String,
    pub backup: bool,
    /// What the active checks say; `None` without them.
    pub healthy: Option<bool>,
    pub ejected: bool,
    pub ejections: u64,
    /// What the last probe found: "ok", or why not.
    pub last: String,
    pub ok: u64,
    pub failed: u64,
}

/// The config in use.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// 1 for the config the process started with, one more per reload.
    pub generation: u64,
    pub digest: String,
    pub path: String,
    /// Seconds since the epoch.
    pub loaded_at: u64,
}

/// A reload's outcomes, in the order `ringway_config_reloads_total` counts them.
pub const RELOAD_RESULTS: [&str; 4] = ["ok", "invalid", "refused", "failed"];

/// A listener certificate's expiry.
#[derive(Debug, Clone)]
pub struct CertExpiry {
    pub listener: String,
    pub name: String,
    /// notAfter, in seconds since the epoch.
    pub not_after: i64,
}
