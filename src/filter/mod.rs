//! Filters: the per-route steps of the request pipeline (see `proxy::pipeline` for where each
//! phase runs). A filter is a variant of the closed enum `Filter`, dispatched by `match` (no
//! `dyn`, no boxed futures, nothing allocated per request), compiled per route at load into a
//! `Chain`; a route without filters pays for an empty loop.
//!
//! Phases, in the order a request meets them; every filter may act in any of them, and `Chain`
//! calls a phase only on routes where some filter does (`Filter::phases`):
//! - `on_response`: edits for every response head the client gets on the route, whoever writes
//!   it (proxied, cache hit, 304, the gateway's own refusals). Filled once the route is known,
//!   before any filter may refuse, so a refusal carries them too.
//! - `on_request` (async): may refuse the request (an `Err` becomes the response through the
//!   one error funnel), answer it instead of the terminal (`Flow::Reply`: a cache hit, a CORS
//!   preflight), or add the gateway's own response lines (`RateLimit-*`, `X-Cache`).
//! - `on_upstream_request`: edits to the head going upstream (proxy terminal only).
//! - `on_upstream_response`: the upstream's final head, before the client sees anything: edits
//!   to it (what the response is, as a cache stores it), or a reply that replaces it.
//! - `on_body`: the upstream's body as it passes, in route order: a filter may transform it
//!   (compression) for the filters after it and the client, or observe it (the cache's copy);
//!   a flush when the upstream pauses, and a last call at its end.
//! - `on_done`: however the exchange ended, for every filter that acts in it and kept state in
//!   its slot, whichever filter answered; may still answer if nothing was sent (a stale entry
//!   when the upstream failed).
//!
//! Per-request state lives in the exchange's `Slot`s, one per filter position. Filters see a
//! `RequestInfo` (a view of the parsed head and what the exchange knows) and write
//! `HeaderEdits`; they never see framing bytes or the stream. A new filter is a new variant
//! here (the compiler then asks for its arm in every phase), a file beside this one, and a line
//! in `Chain::build`.

mod auth;
pub mod cache;
mod chain;
mod compress;
mod cors;
mod headers;
mod rate_limit;

use std::cell::RefCell;
use std::net::IpAddr;

use bytes::Bytes;

use crate::auth::basic::BasicChecks;
use crate::auth::jwks::JwtState;
use crate::auth::Identity;
use crate::cache::WorkerCache;
use crate::cidr::{any_contains, Cidr};
use crate::config::RouteId;
use crate::deadline::Deadline;
use crate::error::ProxyError;
use crate::http::{HeaderEdits, RequestHead, ResponseHead};
use crate::metrics::{GenMetrics, WorkerMetrics};
use crate::ratelimit::Limiter;

use auth::Auth;
use cache::{Cache, CacheSlot};
pub use chain::{BodyStep, Chain};
use compress::{Compress, CompressSlot};
use cors::Cors;
pub use headers::HeaderRules;
pub use rate_limit::RateLimit;

/// What the pipeline does after a filter phase.
pub enum Flow {
    Continue,
    /// Answer with this instead of the terminal (or of the upstream's response).
    Reply(Reply),
}

/// A response a filter answers with (a cache hit, a CORS preflight, a refreshed entry) or a
/// `respond` route's: written by `proxy::reply` through the one generated-head writer, with
/// the route's response edits and the gateway's lines.
#[derive(Clone, Default)]
pub struct Reply {
    pub status: u16,
    /// The reason phrase; empty for the standard one.
    pub reason: Bytes,
    /// Header lines, each ending in CRLF (a stored response's, a route's).
    pub headers: Bytes,
    /// Only the lines of `headers` whose name this accepts are sent (a 304's subset).
    pub only: Option<fn(&[u8]) -> bool>,
    pub body: Bytes,
}

impl Reply {
    /// A reply with this status and nothing else.
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            ..Reply::default()
        }
    }

    /// Whether the head states the body's length (RFC 9110 §8.6: not a 1xx or 204, and a 304
    /// describes no representation whose length it could repeat).
    pub fn states_length(&self) -> bool {
        !matches!(self.status, 100..=199 | 204 | 304)
    }
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

/// A read-only view of the upstream's final response head.
#[derive(Clone, Copy)]
pub struct ResponseView<'b> {
    pub buf: &'b [u8],
    pub head: &'b ResponseHead,
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

/// Work a filter starts that outlives its request: a background revalidation of a cache entry
/// answered stale. The worker runs it (`proxy::revalidate`).
pub trait Background {
    fn revalidate(&self, job: cache::Revalidation);
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
    pub background: &'a dyn Background,
}

/// What `on_request` may write besides its answer.
pub struct RequestOut<'a> {
    /// The gateway's lines for the response (`RateLimit-*`, `X-Cache`).
    pub lines: &'a mut Vec<u8>,
    /// Who is calling, once the auth filter knows.
    pub identity: &'a mut Option<Identity>,
}

/// What `on_upstream_response` may write.
pub struct ResponseOut<'a> {
    /// The gateway's lines for the response.
    pub lines: &'a mut Vec<u8>,
    /// Edits to the upstream's head: what the response is from here on (a cache stores it so).
    pub edits: &'a mut HeaderEdits,
    /// A filter will change the body's length (compression): the client gets it chunked.
    pub reframes: bool,
}

/// How the exchange ended, for `on_done`.
pub struct Done<'a> {
    /// The upstream failed before any of the response went to the client.
    pub origin_failed: bool,
    /// The request, while its head is still unread by the terminal (it failed first).
    pub request: Option<RequestInfo<'a>>,
    pub route: RouteId,
    pub metrics: &'a RefCell<GenMetrics>,
}

/// One filter's state for one request.
#[derive(Default)]
pub enum Slot {
    #[default]
    Empty,
    /// Boxed: a slot is moved with its exchange, and most requests have none.
    Cache(Box<CacheSlot>),
    Compress(Box<CompressSlot>),
}

impl Slot {
    #[inline]
    pub fn is_empty(&self) -> bool {
        matches!(self, Slot::Empty)
    }
}

/// Where `on_request` may leave a filter's state. The exchange's slots are made (one per filter
/// of the route) only when a filter first keeps some: a request no filter keeps state for (a
/// cache hit, a route without such filters) has none, and the later phases skip them.
pub struct SlotRef<'a> {
    slots: &'a mut Vec<Slot>,
    index: usize,
    filters: usize,
}

impl SlotRef<'_> {
    pub fn set(self, slot: Slot) {
        if self.slots.len() < self.filters {
            self.slots.resize_with(self.filters, Slot::default);
        }
        self.slots[self.index] = slot;
    }
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
    /// Response compression, on routes with `compression`.
    Compress(Compress),
    /// Caching, on routes with `cache`.
    Cache(Cache),
    /// On routes without `cache` while `[cache]` is on: unsafe requests invalidate.
    Invalidate,
}

/// Which phases a filter (or any filter of a chain) acts in.
#[derive(Default, Clone, Copy)]
pub(crate) struct Phases {
    pub response: bool,
    pub request: bool,
    pub upstream_request: bool,
    pub upstream_response: bool,
    pub body: bool,
    pub done: bool,
}

impl Phases {
    fn or(self, o: Phases) -> Phases {
        Phases {
            response: self.response | o.response,
            request: self.request | o.request,
            upstream_request: self.upstream_request | o.upstream_request,
            upstream_response: self.upstream_response | o.upstream_response,
            body: self.body | o.body,
            done: self.done | o.done,
        }
    }
}

impl Filter {
    /// The phases this filter acts in.
    fn phases(&self) -> Phases {
        let none = Phases::default();
        match self {
            Filter::Headers { request, response } => Phases {
                response: response.is_some(),
                upstream_request: request.is_some(),
                ..none
            },
            Filter::RateLimit(_) | Filter::IpRules { .. } => Phases {
                request: true,
                ..none
            },
            Filter::Cors(_) => Phases {
                request: true,
                response: true,
                ..none
            },
            Filter::Auth(_) => Phases {
                request: true,
                upstream_request: true,
                ..none
            },
            Filter::Cache(_) => Phases {
                request: true,
                upstream_request: true,
                upstream_response: true,
                body: true,
                done: true,
                ..none
            },
            Filter::Invalidate => Phases {
                request: true,
                upstream_response: true,
                done: true,
                ..none
            },
            Filter::Compress(_) => Phases {
                request: true,
                upstream_response: true,
                body: true,
                done: true,
                ..none
            },
        }
    }

    #[inline]
    fn on_response(&self, req: &RequestInfo<'_>, edits: &mut HeaderEdits) {
        match self {
            Filter::Headers {
                response: Some(rules),
                ..
            } => rules.apply(req, edits),
            Filter::Cors(cors) => cors.on_response(req, edits),
            Filter::Headers { response: None, .. }
            | Filter::IpRules { .. }
            | Filter::Auth(_)
            | Filter::RateLimit(_)
            | Filter::Compress(_)
            | Filter::Cache(_)
            | Filter::Invalidate => {}
        }
    }

    /// The synchronous filters' `on_request`; the ones that may wait (auth, cache) `Chain`
    /// awaits directly (one async layer less on every request).
    #[inline]
    fn on_request_now(
        &self,
        cx: &Ctx<'_>,
        req: &RequestInfo<'_>,
        slot: SlotRef<'_>,
        out: &mut RequestOut<'_>,
    ) -> Result<Flow, ProxyError> {
        match self {
            Filter::IpRules { allow, deny } => {
                if (!allow.is_empty() && !any_contains(allow, req.client))
                    || any_contains(deny, req.client)
                {
                    return Err(ProxyError::Forbidden(
                        "the client's address may not use this route",
                    ));
                }
            }
            Filter::RateLimit(limit) => {
                limit.on_request(cx, req, out.lines, out.identity.as_ref())?
            }
            Filter::Invalidate => cache::invalidate_on_request(req, slot),
            Filter::Cors(c) => {
                if let Some(reply) = c.on_request(req, out.lines) {
                    return Ok(Flow::Reply(reply));
                }
            }
            Filter::Compress(c) => c.on_request(req, slot),
            Filter::Headers { .. } | Filter::Cache(_) | Filter::Auth(_) => {}
        }
        Ok(Flow::Continue)
    }

    #[inline]
    fn on_upstream_request(
        &self,
        req: &RequestInfo<'_>,
        slot: Option<&Slot>,
        edits: &mut HeaderEdits,
    ) {
        match self {
            Filter::Headers {
                request: Some(rules),
                ..
            } => rules.apply(req, edits),
            Filter::Cache(_) => cache::on_upstream_request(slot, edits),
            Filter::Auth(auth) => auth.on_upstream_request(req, edits),
            Filter::Headers { request: None, .. }
            | Filter::IpRules { .. }
            | Filter::Cors(_)
            | Filter::RateLimit(_)
            | Filter::Compress(_)
            | Filter::Invalidate => {}
        }
    }

    fn on_upstream_response(
        &self,
        cx: &Ctx<'_>,
        slot: &mut Slot,
        resp: ResponseView<'_>,
        out: &mut ResponseOut<'_>,
    ) -> Flow {
        match self {
            Filter::Cache(_) | Filter::Invalidate => {
                cache::on_upstream_response(cx, slot, resp, out)
            }
            Filter::Compress(c) => c.on_upstream_response(slot, resp, out),
            Filter::Headers { .. }
            | Filter::IpRules { .. }
            | Filter::Cors(_)
            | Filter::Auth(_)
            | Filter::RateLimit(_) => Flow::Continue,
        }
    }

    fn on_done(&self, cx: &Ctx<'_>, slot: &mut Slot, done: &Done<'_>, lines: &mut Vec<u8>) -> Flow {
        match self {
            Filter::Cache(_) | Filter::Invalidate => cache::on_done(cx, slot, done, lines),
            Filter::Compress(_) => compress::on_done(slot, done),
            Filter::Headers { .. }
            | Filter::IpRules { .. }
            | Filter::Cors(_)
            | Filter::Auth(_)
            | Filter::RateLimit(_) => Flow::Continue,
        }
    }
}
