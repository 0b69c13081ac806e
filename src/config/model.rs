//! A route as loaded: what it matches, what answers it, and the filters it runs, with every
//! reference resolved to an id (`route.rs` validates the file's routes into these).

use std::time::Duration;

use super::{
    AuthId, Compression, CorsPolicy, HeaderTransform, ListenerId, RateLimitId, UpstreamId,
};
use crate::cidr::Cidr;

/// What stands in for freshness when a response gives none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Implicit {
    /// The route's `default_ttl_ms`.
    pub ttl: Duration,
    /// The route's `heuristic_percent`: this share of the time since `Last-Modified`, at most
    /// `ttl` (RFC 9111 §4.2.2), for heuristically cacheable statuses.
    pub heuristic_percent: Option<u32>,
}

impl Implicit {
    pub fn ttl(ttl: Duration) -> Implicit {
        Implicit {
            ttl,
            heuristic_percent: None,
        }
    }
}

/// A route's caching.
#[derive(Debug, Clone)]
pub struct RouteCache {
    /// Freshness when the upstream's response gives none: `default_ttl_ms`, or a share of the
    /// time since `Last-Modified` with `heuristic_percent`.
    pub implicit: Implicit,
    /// Lower-cased request headers that are part of the cache key.
    pub key_headers: Vec<String>,
    /// How long past freshness a stored response may answer when the upstream fails (beyond
    /// what its own `stale-if-error` allows).
    pub serve_stale_on_error: Duration,
    /// On a route with `auth`, the consumer is part of the key (else entries are shared, and
    /// only what RFC 9111 §3.5 lets a shared cache store for an authenticated request is).
    pub per_consumer: bool,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub listener: ListenerId,
    pub host: HostMatch,
    pub path: PathMatch,
    pub methods: Option<Vec<String>>,
    pub strip_prefix: Option<String>,
    pub action: RouteAction,
    pub max_body_bytes: Option<u64>,
    pub rate_limits: Vec<RateLimitId>,
    pub cache: Option<RouteCache>,
    /// Edits to the head sent upstream.
    pub request_headers: Option<HeaderTransform>,
    /// Edits to every response head the client gets on this route.
    pub response_headers: Option<HeaderTransform>,
    /// Providers tried in order; empty: no authentication.
    pub auth: Vec<AuthId>,
    /// Consumers in none of these groups get 403 (empty: any consumer).
    pub allow_groups: Vec<String>,
    /// Consumers in any of these groups get 403.
    pub deny_groups: Vec<String>,
    /// Clients outside these ranges get 403 (empty: any client).
    pub ip_allow: Vec<Cidr>,
    /// Clients inside these ranges get 403.
    pub ip_deny: Vec<Cidr>,
    pub cors: Option<CorsPolicy>,
    /// Response compression (proxied routes).
    pub compression: Option<Compression>,
    /// Proxied routes: the longest the upstream exchange may take up to the response head,
    /// retries included.
    pub timeout: Option<Duration>,
    /// Client-sent copies of the headers the gateway vouches for are kept on this route.
    pub trust_identity_headers: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    /// Lower-case host without port.
    Exact(String),
    /// `*.example.com` is stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Debug, Clone)]
pub enum RouteAction {
    Proxy(UpstreamId),
    Respond(Respond),
    Redirect(Redirect),
}

/// A redirect to the same path and query on another scheme, host or port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
    /// `"https"` or `"http"`.
    pub scheme: String,
    /// The host to send clients to; the request's own host (without its port) when unset.
    pub host: Option<String>,
    /// Written only when it is not the scheme's default port.
    pub port: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct Respond {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}
