//! Filters: the per-route steps of the request pipeline (see `proxy::pipeline` for where each
//! phase runs). A filter is a variant of the closed enum `Filter`, dispatched by `match` (no
//! `dyn`, no boxed futures, nothing allocated per request), compiled per route at load into a
//! `Chain`; a route without filters pays for an empty loop.
//!
//! Phases, in the order a request meets them:
//! - `on_response`: edits for every response head the client gets on the route, whoever writes
//!   it (proxied, cache hit, 304, the gateway's own refusals). Filled once the route is known,
//!   before any filter may refuse, so a refusal carries them too.
//! - `on_request` (async): may refuse the request (an `Err` becomes the response through the
//!   one error funnel), answer it instead of the terminal (`Flow::Cached`), or add the
//!   gateway's own response lines (`RateLimit-*`, `X-Cache`).
//! - `on_upstream_request`: edits to the head going upstream (proxy terminal only).
//! - `on_upstream_response` and the body observer: the cache's, run by the response side on
//!   the request's `CacheSlot` (the only filter that asks for them).
//! - `on_done`: however the terminal ended; may still answer (`Flow::Cached`, after a 304
//!   revalidated a stale entry).
//!
//! Filters see a `RequestInfo` (a view of the parsed head and what the exchange knows) and
//! write `HeaderEdits`; they never see framing bytes or the stream. A new filter is a new
//! variant here, a file beside this one, and a line in `Chain::build`.

mod auth;
pub mod cache;
mod cors;
mod headers;
mod rate_limit;

use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use crate::auth::basic::BasicChecks;
use crate::auth::jwks::JwtState;
use crate::auth::{Consumers, Identity};
use crate::cache::{Entry, WorkerCache};
use crate::cidr::{any_contains, Cidr};
use crate::config::{Config, Route, RouteAction, RouteId};
use crate::deadline::Deadline;
use crate::error::ProxyError;
use crate::http::{HeaderEdits, RequestHead};
use crate::metrics::{CacheOutcome, GenMetrics, WorkerMetrics};
use crate::ratelimit::Limiter;

use auth::Auth;
use cache::{Cache, CacheSlot};
use cors::Cors;
pub use headers::HeaderRules;
pub use rate_limit::RateLimit;

/// What the pipeline does after a filter phase.
pub enum Flow {
    Continue,
    /// Answer from this cache entry instead of (or after) the terminal.
    Cached(Arc<Entry>, CacheOutcome),
    /// Answer with this status, no body, and the lines the filters wrote (a CORS preflight).
    Respond(u16),
}

/// A read-only view of a parsed request head over the buffer it was parsed from.
#[derive(Clone, Copy)]
pub struct RequestView<'b> {
    pub buf: &'b [u8],
    pub head: &'b RequestHead,
}

impl<'b> RequestView<'b> {
    /// The first field named `name` (any case).
    #[inline]
    pub fn header(&self, name: &[u8]) -> Option<&'b [u8]> {
        self.head.header(self.buf, name)
    }

    /// The Host value (or absolute-form authority), empty without one.
    #[inline]
    pub fn host(&self) -> &'b [u8] {
        self.head.host.map_or(&b""[..], |h| h.get(self.buf))
    }
}

/// What a filter may know about the request.
#[derive(Clone, Copy)]
pub struct RequestInfo<'a> {
    pub view: RequestView<'a>,
    /// The client (see `Exchange::client`), as an address and as text.
    pub client: IpAddr,
    pub client_ip: &'a [u8],
    /// What the connection's TLS negotiated; `None` on cleartext.
    pub tls: Option<&'a crate::tls::TlsInfo>,
    pub route: RouteId,
    pub route_name: &'a str,
    /// The request's generation's per-route figures.
    pub metrics: &'a RefCell<GenMetrics>,
    pub request_id: &'a [u8],
    /// The authenticated consumer's name (or token subject), once the auth filter knows.
    pub consumer: Option<&'a str>,
    /// Who the auth filter found, for what it sends upstream.
    pub identity: Option<&'a Identity>,
}

/// The worker's services a filter may use, borrowed from the worker (no filter sees `Worker`),
/// and the connection's deadline for bounded waits.
pub struct Ctx<'a> {
    pub limiters: &'a RefCell<Vec<Limiter>>,
    pub metrics: &'a RefCell<WorkerMetrics>,
    pub cache: Option<&'a WorkerCache>,
    pub deadline: &'a Deadline<'a>,
    /// Basic-auth password checks in flight, and their cache.
    pub basic: &'a BasicChecks,
    /// JWT providers' keys and this worker's verified tokens.
    pub jwt: &'a JwtState,
    /// The worker's coarse clock, and its wall-clock seconds.
    pub now: std::time::Instant,
    pub unix_now: u64,
}

/// What `on_request` may write besides its answer.
pub struct RequestOut<'a> {
    /// The gateway's lines for the response (`RateLimit-*`, `X-Cache`).
    pub lines: &'a mut Vec<u8>,
    /// The cache's per-request state.
    pub cache: &'a mut Option<CacheSlot>,
    /// Who is calling, once the auth filter knows.
    pub identity: &'a mut Option<Identity>,
}

pub enum Filter {
    /// `ip_allow` / `ip_deny`: 403 for a client outside or inside them.
    IpRules {
        allow: Box<[Cidr]>,
        deny: Box<[Cidr]>,
    },
    /// CORS: preflights answered, allow headers on every response.
    Cors(Cors),
    /// Authentication and the route's group rules.
    Auth(Auth),
    RateLimit(RateLimit),
    /// Header transforms, in either direction.
    Headers {
        request: Option<HeaderRules>,
        response: Option<HeaderRules>,
    },
    /// Caching, on routes with `cache`.
    Cache(Cache),
    /// On routes without `cache` while `[cache]` is on: unsafe requests invalidate.
    Invalidate,
}

impl Filter {
    #[inline]
    fn on_response(&self, req: &RequestInfo<'_>, edits: &mut HeaderEdits) {
        match self {
            Filter::Headers {
                response: Some(rules),
                ..
            } => rules.apply(req, edits),
            Filter::Cors(cors) => cors.on_response(req, edits),
            _ => {}
        }
    }

    /// The synchronous filters' `on_request`; the cache's may wait, and `Chain` awaits it
    /// directly (one async layer less on every request).
    #[inline]
    fn on_request_now(
        &self,
        cx: &Ctx<'_>,
        req: &RequestInfo<'_>,
        out: &mut RequestOut<'_>,
    ) -> Result<(), ProxyError> {
        match self {
            Filter::IpRules { allow, deny } => {
                if (!allow.is_empty() && !any_contains(allow, req.client))
                    || any_contains(deny, req.client)
                {
                    return Err(ProxyError::Forbidden(
                        "the client's address may not use this route",
                    ));
                }
                Ok(())
            }
            Filter::RateLimit(limit) => limit.on_request(cx, req, out.lines, out.identity.as_ref()),
            Filter::Invalidate => {
                cache::invalidate_on_request(req, out.cache);
                Ok(())
            }
            Filter::Headers { .. } | Filter::Cache(_) | Filter::Cors(_) | Filter::Auth(_) => Ok(()),
        }
    }

    #[inline]
    fn on_upstream_request(
        &self,
        req: &RequestInfo<'_>,
        slot: Option<&CacheSlot>,
        edits: &mut HeaderEdits,
    ) {
        match self {
            Filter::Headers {
                request: Some(rules),
                ..
            } => rules.apply(req, edits),
            Filter::Cache(_) => Cache::on_upstream_request(slot, edits),
            Filter::Auth(auth) => auth.on_upstream_request(req, edits),
            _ => {}
        }
    }
}

/// A route's filters, in the order they run.
#[derive(Default)]
pub struct Chain {
    filters: Box<[Filter]>,
    /// Which phases any filter of the chain acts in: the pipeline skips the others.
    phases: Phases,
}

#[derive(Default, Clone, Copy)]
struct Phases {
    response: bool,
    request: bool,
    upstream_request: bool,
}

impl Chain {
    /// The route's filters: header transforms first (so that a refusal carries the response
    /// edits), then IP rules (the cheapest refusal), then authentication (so that rate limits can key on the consumer, and nobody
    /// unknown spends a limit), then rate limits, then the cache (a refused request never
    /// reaches it).
    pub fn build(route: &Route, config: &Config, consumers: &Rc<Consumers>) -> Chain {
        let mut filters = Vec::new();
        if route.request_headers.is_some() || route.response_headers.is_some() {
            filters.push(Filter::Headers {
                request: route.request_headers.as_ref().map(HeaderRules::new),
                response: route.response_headers.as_ref().map(HeaderRules::new),
            });
        }
        if !route.ip_allow.is_empty() || !route.ip_deny.is_empty() {
            filters.push(Filter::IpRules {
                allow: route.ip_allow.as_slice().into(),
                deny: route.ip_deny.as_slice().into(),
            });
        }
        // Before authentication: a preflight carries no credentials.
        if let Some(policy) = &route.cors {
            filters.push(Filter::Cors(Cors::new(policy)));
        }
        if !route.auth.is_empty() {
            filters.push(Filter::Auth(Auth::new(route, config, consumers)));
        }
        if !route.rate_limits.is_empty() {
            filters.push(Filter::RateLimit(RateLimit::new(&route.rate_limits)));
        }
        match (&route.cache, &route.action) {
            (Some(policy), RouteAction::Proxy(up)) => {
                let timeout = config.upstreams[usize::from(up.0)].request_timeout;
                let authenticated = !route.auth.is_empty();
                filters.push(Filter::Cache(Cache::new(
                    policy,
                    timeout,
                    authenticated,
                    consumers,
                )));
            }
            (None, RouteAction::Proxy(_)) if config.cache.is_some() => {
                filters.push(Filter::Invalidate);
            }
            _ => {}
        }
        let mut phases = Phases::default();
        for f in &filters {
            match f {
                Filter::Headers { request, response } => {
                    phases.response |= response.is_some();
                    phases.upstream_request |= request.is_some();
                }
                Filter::RateLimit(_) | Filter::Invalidate | Filter::IpRules { .. } => {
                    phases.request = true
                }
                Filter::Cors(_) => {
                    phases.request = true;
                    phases.response = true;
                }
                Filter::Cache(_) | Filter::Auth(_) => {
                    phases.request = true;
                    phases.upstream_request = true;
                }
            }
        }
        Chain {
            filters: filters.into(),
            phases,
        }
    }

    /// Whether `on_response` does anything on this route.
    #[inline]
    pub fn runs_on_response(&self) -> bool {
        self.phases.response
    }

    /// Whether `on_request` does anything on this route.
    #[inline]
    pub fn runs_on_request(&self) -> bool {
        self.phases.request
    }

    /// Whether `on_upstream_request` does anything on this route.
    #[inline]
    pub fn runs_on_upstream_request(&self) -> bool {
        self.phases.upstream_request
    }

    pub fn on_response(&self, req: &RequestInfo<'_>, edits: &mut HeaderEdits) {
        for f in self.filters.iter() {
            f.on_response(req, edits);
        }
    }

    /// Runs the filters' `on_request` in order, until one refuses or answers.
    pub async fn on_request(
        &self,
        cx: &Ctx<'_>,
        req: &RequestInfo<'_>,
        out: &mut RequestOut<'_>,
    ) -> Result<Flow, ProxyError> {
        for f in self.filters.iter() {
            match f {
                Filter::Cache(c) => {
                    let identity = out.identity.as_ref();
                    return c.on_request(cx, req, out.lines, out.cache, identity).await;
                }
                Filter::Cors(c) => {
                    if let Some(flow) = c.on_request(req, out.lines) {
                        return Ok(flow);
                    }
                }
                Filter::Auth(a) => a.on_request(cx, req, out.identity).await?,
                f => f.on_request_now(cx, req, out)?,
            }
        }
        Ok(Flow::Continue)
    }

    pub fn on_upstream_request(
        &self,
        req: &RequestInfo<'_>,
        slot: Option<&CacheSlot>,
        edits: &mut HeaderEdits,
    ) {
        for f in self.filters.iter() {
            f.on_upstream_request(req, slot, edits);
        }
    }

    /// However the terminal ended (`origin_failed`: the upstream failed before any of the
    /// response was sent): the cache's ending. Only a request that left a `CacheSlot` has one.
    pub fn on_done(
        &self,
        cx: &Ctx<'_>,
        slot: &mut Option<CacheSlot>,
        origin_failed: bool,
        lines: &mut Vec<u8>,
    ) -> Flow {
        cache::on_done(cx, slot, origin_failed, lines)
    }
}
