//! Filters: the per-route steps of the request pipeline (see `proxy::pipeline` for where each
//! phase runs). A filter is a variant of the closed enum `Filter`, dispatched by `match` (no
//! `dyn`, no boxed futures, nothing allocated per request), compiled per route at load into a
//! `Chain`; a route without filters pays for an empty loop.
//!
//! Phases, in the order a request meets them:
//! - `on_response`: edits for every response head the client gets on the route, whoever writes
//!   it (proxied, cache hit, 304, the gateway's own refusals). Filled once the route is known,
//!   before any filter may refuse, so a refusal carries them too.
//! - `on_request`: may refuse the request (an `Err` becomes the response through the one
//!   error funnel) or add the gateway's own response lines (`RateLimit-*`).
//! - `on_upstream_request`: edits to the head going upstream (proxy terminal only).
//!
//! Filters see a `RequestInfo` (a view of the parsed head and what the exchange knows) and
//! write `HeaderEdits`; they never see framing bytes or the stream. A new filter is a new
//! variant here, a file beside this one, and a line in `Chain::build`.

mod headers;
mod rate_limit;

use std::cell::RefCell;

use crate::config::{RateLimitId, Route, RouteId};
use crate::error::ProxyError;
use crate::http::{HeaderEdits, RequestHead};
use crate::metrics::WorkerMetrics;
use crate::ratelimit::Limiter;

pub use headers::HeaderRules;
pub use rate_limit::RateLimit;

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
    pub client_ip: &'a [u8],
    pub route: RouteId,
    pub route_name: &'a str,
    pub request_id: &'a [u8],
}

/// The worker's services a filter may use, borrowed from the worker (no filter sees `Worker`).
pub struct Ctx<'w> {
    pub limiters: &'w RefCell<Vec<Limiter>>,
    pub metrics: &'w RefCell<WorkerMetrics>,
}

pub enum Filter {
    RateLimit(RateLimit),
    /// Header transforms, in either direction.
    Headers {
        request: Option<HeaderRules>,
        response: Option<HeaderRules>,
    },
}

impl Filter {
    #[inline]
    fn on_response(&self, req: &RequestInfo<'_>, edits: &mut HeaderEdits) {
        match self {
            Filter::Headers {
                response: Some(rules),
                ..
            } => rules.apply(req, edits),
            Filter::Headers { .. } | Filter::RateLimit(_) => {}
        }
    }

    #[inline]
    fn on_request(
        &self,
        cx: &Ctx<'_>,
        req: &RequestInfo<'_>,
        gateway_lines: &mut Vec<u8>,
    ) -> Result<(), ProxyError> {
        match self {
            Filter::RateLimit(limit) => limit.on_request(cx, req, gateway_lines),
            Filter::Headers { .. } => Ok(()),
        }
    }

    #[inline]
    fn on_upstream_request(&self, req: &RequestInfo<'_>, edits: &mut HeaderEdits) {
        match self {
            Filter::Headers {
                request: Some(rules),
                ..
            } => rules.apply(req, edits),
            Filter::Headers { .. } | Filter::RateLimit(_) => {}
        }
    }
}

/// A route's filters, in the order they run.
#[derive(Default)]
pub struct Chain {
    filters: Box<[Filter]>,
}

impl Chain {
    /// The route's filters: header transforms first (so that a refusal carries the response
    /// edits), then rate limits.
    pub fn build(route: &Route) -> Chain {
        let mut filters = Vec::new();
        if route.request_headers.is_some() || route.response_headers.is_some() {
            filters.push(Filter::Headers {
                request: route.request_headers.as_ref().map(HeaderRules::new),
                response: route.response_headers.as_ref().map(HeaderRules::new),
            });
        }
        if !route.rate_limits.is_empty() {
            filters.push(Filter::RateLimit(RateLimit::new(&route.rate_limits)));
        }
        Chain {
            filters: filters.into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// The rate limits the route applies, for callers that report them.
    pub fn rate_limits(&self) -> &[RateLimitId] {
        self.filters
            .iter()
            .find_map(|f| match f {
                Filter::RateLimit(l) => Some(l.ids()),
                Filter::Headers { .. } => None,
            })
            .unwrap_or_default()
    }

    pub fn on_response(&self, req: &RequestInfo<'_>, edits: &mut HeaderEdits) {
        for f in self.filters.iter() {
            f.on_response(req, edits);
        }
    }

    pub fn on_request(
        &self,
        cx: &Ctx<'_>,
        req: &RequestInfo<'_>,
        gateway_lines: &mut Vec<u8>,
    ) -> Result<(), ProxyError> {
        for f in self.filters.iter() {
            f.on_request(cx, req, gateway_lines)?;
        }
        Ok(())
    }

    pub fn on_upstream_request(&self, req: &RequestInfo<'_>, edits: &mut HeaderEdits) {
        for f in self.filters.iter() {
            f.on_upstream_request(req, edits);
        }
    }
}
