//! A route's filters in order, and the dispatch of each phase to the filters that act in it.

use std::rc::Rc;

use super::{
    cache, compress, Auth, Cache, Compress, Cors, Ctx, Done, Filter, Flow, HeaderRules, Phases,
    RateLimit, Reply, RequestInfo, RequestOut, ResponseOut, ResponseView, Slot, SlotRef,
};
use crate::auth::Consumers;
use crate::config::{Config, Route, RouteAction};
use crate::error::ProxyError;
use crate::http::HeaderEdits;
use crate::upstream::UpstreamState;

/// What the body phase hands a filter.
#[derive(Clone, Copy)]
pub enum BodyStep<'d> {
    /// Body bytes, as the upstream sent them (or as the filters before this one made them).
    Data(&'d [u8]),
    /// The upstream paused with everything so far handed over: what a filter holds back goes.
    Flush,
    /// The body ended.
    End,
}

/// A route's filters, in the order they run.
#[derive(Default)]
pub struct Chain {
    filters: Box<[Filter]>,
    /// Which phases any filter of the chain acts in: the pipeline skips the others.
    phases: Phases,
}

impl Chain {
    /// The route's filters: header transforms first (so that a refusal carries the response
    /// edits), then IP rules (the cheapest refusal), then CORS (a preflight carries no
    /// credentials), then authentication (so that rate limits can key on the consumer, and
    /// nobody unknown spends a limit), then rate limits, then compression, then the cache (a
    /// refused request never reaches it).
    pub fn build(
        route: &Route,
        config: &Config,
        consumers: &Rc<Consumers>,
        upstreams: &[Rc<UpstreamState>],
    ) -> Chain {
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
        if let Some(policy) = &route.cors {
            filters.push(Filter::Cors(Cors::new(policy)));
        }
        if !route.auth.is_empty() {
            filters.push(Filter::Auth(Auth::new(route, config, consumers)));
        }
        if !route.rate_limits.is_empty() {
            filters.push(Filter::RateLimit(RateLimit::new(&route.rate_limits)));
        }
        // Before the cache: what it stores is the response as the client gets it (one entry
        // per coding), and its hits go out as stored.
        if let Some(c) = &route.compression {
            filters.push(Filter::Compress(Compress::new(c)));
        }
        match (&route.cache, &route.action) {
            (Some(policy), RouteAction::Proxy(up)) => {
                let upstream = Rc::clone(&upstreams[usize::from(up.0)]);
                filters.push(Filter::Cache(Cache::new(
                    policy,
                    route,
                    upstream,
                    !route.auth.is_empty(),
                    consumers,
                )));
            }
            (None, RouteAction::Proxy(_)) if config.cache.is_some() => {
                filters.push(Filter::Invalidate);
            }
            _ => {}
        }
        let phases = filters
            .iter()
            .fold(Phases::default(), |all, f| all.or(f.phases()));
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

    /// Whether `on_upstream_response` does anything on this route.
    #[inline]
    pub fn runs_on_upstream_response(&self) -> bool {
        self.phases.upstream_response
    }

    /// Whether any filter sees the response body.
    #[inline]
    pub fn runs_on_body(&self) -> bool {
        self.phases.body
    }

    /// Whether `on_done` does anything on this route.
    #[inline]
    pub fn runs_on_done(&self) -> bool {
        self.phases.done
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
        slots: &mut Vec<Slot>,
        out: &mut RequestOut<'_>,
    ) -> Result<Flow, ProxyError> {
        let filters = self.filters.len();
        for (index, f) in self.filters.iter().enumerate() {
            let slot = SlotRef {
                slots: &mut *slots,
                index,
                filters,
            };
            let flow = match f {
                Filter::Cache(c) => {
                    c.on_request(cx, req, out.lines, slot, out.identity.as_ref())
                        .await?
                }
                Filter::Auth(a) => {
                    a.on_request(cx, req, out.identity).await?;
                    Flow::Continue
                }
                Filter::IpRules { .. }
                | Filter::Cors(_)
                | Filter::RateLimit(_)
                | Filter::Headers { .. }
                | Filter::Compress(_)
                | Filter::Invalidate => f.on_request_now(cx, req, slot, out)?,
            };
            if let Flow::Reply(_) = flow {
                return Ok(flow);
            }
        }
        Ok(Flow::Continue)
    }

    pub fn on_upstream_request(
        &self,
        req: &RequestInfo<'_>,
        slots: &[Slot],
        edits: &mut HeaderEdits,
    ) {
        for (i, f) in self.filters.iter().enumerate() {
            f.on_upstream_request(req, slots.get(i), edits);
        }
    }

    /// The upstream's final head, to every filter in order; the first reply replaces the
    /// response (the filters after it do not see the head).
    pub fn on_upstream_response(
        &self,
        cx: &Ctx<'_>,
        slots: &mut [Slot],
        resp: ResponseView<'_>,
        out: &mut ResponseOut<'_>,
    ) -> Option<Reply> {
        for (f, slot) in self.filters.iter().zip(slots.iter_mut()) {
            if let Flow::Reply(r) = f.on_upstream_response(cx, slot, resp, out) {
                return Some(r);
            }
        }
        None
    }

    /// One step of the response body through the filters, in order: what the last one passes
    /// on goes to `sink`.
    pub fn on_body(
        &self,
        cx: &Ctx<'_>,
        slots: &mut [Slot],
        step: BodyStep<'_>,
        sink: &mut dyn FnMut(&[u8]),
    ) {
        body_through(&self.filters, slots, cx, step, sink);
    }

    /// However the exchange ended, every filter's `on_done`; the first answer is returned
    /// (for the pipeline to send if nothing was sent yet), and every filter still runs.
    pub fn on_done(
        &self,
        cx: &Ctx<'_>,
        slots: &mut [Slot],
        done: &Done<'_>,
        lines: &mut Vec<u8>,
    ) -> Option<Reply> {
        let mut answer = None;
        for (f, slot) in self.filters.iter().zip(slots.iter_mut()) {
            if let Flow::Reply(r) = f.on_done(cx, slot, done, lines) {
                answer.get_or_insert(r);
            }
        }
        answer
    }
}

/// The body step through `filters` (each with its slot): an observer sees it and passes it on;
/// a transformer passes what it makes of it to the rest.
fn body_through(
    filters: &[Filter],
    slots: &mut [Slot],
    cx: &Ctx<'_>,
    step: BodyStep<'_>,
    sink: &mut dyn FnMut(&[u8]),
) {
    for i in 0..filters.len().min(slots.len()) {
        match &filters[i] {
            Filter::Cache(_) => cache::on_body(cx, &mut slots[i], step),
            Filter::Compress(_) => {
                let (mine, rest) = slots.split_at_mut(i + 1);
                let after = &filters[i + 1..];
                let mut pass =
                    |out: &[u8]| body_through(after, rest, cx, BodyStep::Data(out), sink);
                if compress::step(&mut mine[i], step, &mut pass) {
                    if !matches!(step, BodyStep::Data(_)) {
                        body_through(after, rest, cx, step, sink);
                    }
                    return;
                }
            }
            Filter::Headers { .. }
            | Filter::IpRules { .. }
            | Filter::Cors(_)
            | Filter::Auth(_)
            | Filter::RateLimit(_)
            | Filter::Invalidate => {}
        }
    }
    if let BodyStep::Data(d) = step {
        sink(d);
    }
}
