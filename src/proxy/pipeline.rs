//! The phases of one request, in order: route → `on_response` edits → body size → `on_request`
//! filters (which may answer: a cache hit, a CORS preflight) → terminal (`on_upstream_request`,
//! `on_upstream_response` and `on_body` run inside the proxy terminal) → `on_done` for every
//! filter that acts in it, however the request ended (which may still answer, if nothing was
//! sent). Each phase's filters come from the route's `Chain`; the terminal is the route's
//! `Terminal`. Whatever fails returns a `Failure`, which `session` answers through the one error
//! funnel.

use std::rc::Rc;

use super::session::Session;
use super::{forward, reply, Failure, Io, Next};
use crate::config::RouteId;
use crate::error::ProxyError;
use crate::filter::{Done, Flow, RequestInfo, RequestOut, RequestView, Slot};
use crate::generation::{Generation, RouteEntry, Terminal};
use crate::http::{BodyLength, RequestHead};
use crate::router::RouteMatch;
use crate::tls::TlsInfo;
use crate::worker::Worker;

pub(super) async fn run<S: Io>(c: &mut Session<'_, S>, w: &Rc<Worker>) -> Result<Next, Failure> {
    // The request keeps its generation to the end, whatever the worker installs meanwhile.
    let gen = Rc::clone(&c.ex.gen);
    let buf = c.rbuf.data();
    let found = gen.router.route(
        c.ex.listener,
        c.head.host.map(|h| h.get(buf)),
        c.head.path.get(buf),
        c.head.method_span.get(buf),
    );
    let id = match found {
        RouteMatch::Found(id) => id,
        RouteMatch::MethodNotAllowed(allow) => {
            return Err(Failure::BeforeBody(ProxyError::MethodNotAllowed(allow)))
        }
        RouteMatch::NotFound => return Err(Failure::BeforeBody(ProxyError::NoRoute)),
    };
    c.ex.route = Some(id);
    let route = gen.route(id);
    if c.head.identity || c.head.forwarding {
        drop_untrusted_headers(c, w, &gen, route);
    }
    let result = filters_and_terminal(c, w, &gen, id, route).await;
    // `on_done` is for the filters that kept state for this request (a cache hit keeps none).
    if !route.chain.runs_on_done() || c.ex.slots.iter().all(Slot::is_empty) {
        return result;
    }
    done(c, w, &gen, id, route, result).await
}

/// The request's filters up to the terminal, and the terminal.
async fn filters_and_terminal<S: Io>(
    c: &mut Session<'_, S>,
    w: &Rc<Worker>,
    gen: &Generation,
    id: RouteId,
    route: &RouteEntry,
) -> Result<Next, Failure> {
    let info = request_info(
        c.rbuf.data(),
        &c.head,
        Who {
            client: c.ex.client,
            client_ip: &c.ex.client_ip,
            tls: c.ex.tls.as_ref(),
            request_id: &c.ex.request_id,
            consumer: None,
            identity: None,
        },
        id,
        route,
        &gen.metrics,
    );
    if route.chain.runs_on_response() {
        route.chain.on_response(&info, &mut c.ex.resp_edits);
    }
    if let (Some(max), BodyLength::Length(n)) = (route.max_body_bytes, c.head.body) {
        if n > max {
            return Err(Failure::BeforeBody(ProxyError::PayloadTooLarge));
        }
    }
    if route.chain.runs_on_request() {
        let cx = w.filter_ctx(gen, &c.deadline);
        let mut out = RequestOut {
            lines: &mut c.ex.extra,
            identity: &mut c.ex.identity,
        };
        let flow = route
            .chain
            .on_request(&cx, &info, &mut c.ex.slots, &mut out)
            .await
            .map_err(Failure::BeforeBody)?;
        if let Flow::Reply(answer) = flow {
            return reply::respond(c, w, route, &answer).await;
        }
    }
    match &route.terminal {
        Terminal::Respond(answer) => reply::respond(c, w, route, answer).await,
        Terminal::Redirect {
            status,
            scheme,
            host,
            port,
        } => {
            reply::redirect(
                c,
                w,
                route,
                *status,
                [scheme, host.as_deref().unwrap_or_default(), port],
            )
            .await
        }
        Terminal::Proxy {
            upstream,
            strip_prefix,
        } => {
            forward::proxy(
                c,
                w,
                route,
                gen.upstream(*upstream),
                strip_prefix.as_deref(),
            )
            .await
        }
    }
}

/// Every filter's `on_done`, however the request ended. An answer one of them gives is sent if
/// the upstream failed before the client got anything (a stale entry standing in); a failure
/// before the request was sent leaves its head unread, and the answer then reads it.
async fn done<S: Io>(
    c: &mut Session<'_, S>,
    w: &Rc<Worker>,
    gen: &Generation,
    id: RouteId,
    route: &RouteEntry,
    result: Result<Next, Failure>,
) -> Result<Next, Failure> {
    let origin_failed = result.as_ref().is_err_and(Failure::origin_failed);
    let head_pending = matches!(result, Err(Failure::BeforeBody(_)));
    let answer = {
        let cx = w.filter_ctx(gen, &c.deadline);
        let request = head_pending.then(|| {
            let who = Who {
                client: c.ex.client,
                client_ip: &c.ex.client_ip,
                tls: c.ex.tls.as_ref(),
                request_id: &c.ex.request_id,
                consumer: None,
                identity: None,
            };
            request_info(c.rbuf.data(), &c.head, who, id, route, &gen.metrics)
        });
        let done = Done {
            origin_failed,
            request,
            route: id,
            metrics: &gen.metrics,
        };
        route
            .chain
            .on_done(&cx, &mut c.ex.slots, &done, &mut c.ex.extra)
    };
    match answer {
        Some(answer) if origin_failed && head_pending => reply::respond(c, w, route, &answer).await,
        Some(answer) if origin_failed => reply::after_terminal(c, w, &answer).await,
        _ => result,
    }
}

/// The trust boundary: before any filter sees the request, the client's copies of the headers
/// the gateway vouches for go (unless the listener or route trusts them), and so do the
/// forwarding headers of a peer not in `trusted_proxies` (routing overrides from anyone). Run
/// only for a head the parser flagged as carrying any.
#[cold]
fn drop_untrusted_headers<S: Io>(
    c: &mut Session<'_, S>,
    w: &Worker,
    gen: &Generation,
    route: &RouteEntry,
) {
    let identity = c.head.identity && !gen.trusts_identity(c.ex.listener, route);
    let dropped = c.head.drop_untrusted(identity, !c.ex.peer_trusted);
    if dropped > 0 {
        c.ex.log.identity_dropped = dropped;
        w.metrics
            .borrow_mut()
            .record_identity_headers_dropped(dropped);
    }
}

/// The exchange's facts about who sent the request, borrowed field by field (so that the
/// caller can write the exchange's edits meanwhile).
pub(super) struct Who<'a> {
    pub client: std::net::IpAddr,
    pub client_ip: &'a super::exchange::IpText,
    pub tls: Option<&'a TlsInfo>,
    pub request_id: &'a [u8],
    pub consumer: Option<&'a str>,
    pub identity: Option<&'a crate::auth::Identity>,
}

/// What the route's filters may know about the request.
pub(super) fn request_info<'a>(
    buf: &'a [u8],
    head: &'a RequestHead,
    who: Who<'a>,
    route: RouteId,
    entry: &'a RouteEntry,
    metrics: &'a std::cell::RefCell<crate::metrics::GenMetrics>,
) -> RequestInfo<'a> {
    RequestInfo {
        view: RequestView { buf, head },
        client: who.client,
        client_ip: who.client_ip.as_bytes(),
        tls: who.tls,
        consumer: who.consumer,
        identity: who.identity,
        request_id: who.request_id,
        route,
        route_name: &entry.name,
        metrics,
    }
}
