//! A generation: everything a worker builds from one config for the request path — the router,
//! each route's filter chain and terminal, and the upstreams the routes point at. A worker holds
//! its current generation in an `Rc` and may replace it between requests; a request takes its
//! own `Rc` when it starts and keeps it to the end, so it never sees two configs.
//!
//! State that must outlive a config is carried over by name when a generation is built from a
//! previous one: an upstream whose name is unchanged keeps its unchanged targets (`Rc`-shared
//! `TargetState`: idle pools, health, ejection, in-flight counts), its breaker while its limits
//! are the same, and its retry budget. Each generation has its own metrics tables, indexed by
//! its own config's ids. Rate-limit buckets and the cache belong to the worker.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use crate::auth::jwks::JwtState;
use crate::auth::Consumers;
use crate::cidr::Cidr;
use crate::config::{Config, ListenerId, RouteAction, RouteId, UpstreamId};
use crate::filter::{Chain, Reply};
use crate::http::NameSet;
use crate::metrics::{GenDelta, GenMetrics};
use crate::router::Router;
use crate::upstream::UpstreamState;

pub struct Generation {
    /// 1 for the first generation a worker builds, then one more for each rebuild.
    pub id: u32,
    /// The config it was built from (it names the ids in `metrics`).
    pub config: Arc<Config>,
    /// What requests on this generation recorded per route, for the next metrics snapshot.
    pub metrics: RefCell<GenMetrics>,
    pub router: Router,
    pub routes: Box<[RouteEntry]>,
    /// Indexed by `UpstreamId` of this generation's config.
    pub upstreams: Box<[Rc<UpstreamState>]>,
    /// The consumers and their credentials, shared by the routes' auth filters.
    pub consumers: Rc<Consumers>,
    /// `[clients] trusted_proxies`.
    pub trusted_proxies: Box<[Cidr]>,
    /// The request headers the gateway vouches for: the parser marks the client's copies, and
    /// they are removed before any filter runs (unless a listener or route trusts them).
    pub vouched: NameSet,
    /// Per listener: whether it keeps the client's copies of `vouched` headers.
    listener_trusts_identity: Box<[bool]>,
    /// `[clients] forwarded`: send an RFC 7239 `Forwarded` element upstream.
    pub forwarded_header: bool,
    /// JWT providers' keys (remote ones updated by the fetcher) and verified tokens.
    pub jwt: JwtState,
}

pub struct RouteEntry {
    pub name: String,
    pub max_body_bytes: Option<u64>,
    /// `timeout_ms`: the upstream exchange up to the response head, retries included.
    pub timeout: Option<std::time::Duration>,
    /// Keep the client's copies of the headers the gateway vouches for on this route.
    pub trust_identity_headers: bool,
    pub chain: Chain,
    pub terminal: Terminal,
}

/// What answers a request once the filters let it through.
pub enum Terminal {
    Proxy {
        upstream: UpstreamId,
        strip_prefix: Option<Box<[u8]>>,
    },
    /// A fixed response; its headers are ready-made header lines.
    Respond(Reply),
    /// A redirect to the request's path and query at `scheme://host:port`.
    Redirect {
        status: u16,
        /// `https://` or `http://`.
        scheme: Box<[u8]>,
        /// The configured host; `None`: the request's.
        host: Option<Box<[u8]>>,
        /// `:port`, or empty for the scheme's default.
        port: Box<[u8]>,
    },
}

impl Generation {
    /// Builds the request path for `config`, carrying over from `previous`, by upstream and
    /// target name, what must outlive a config (pools, health, breakers, retry budgets).
    pub fn build(config: &Arc<Config>, previous: Option<&Generation>) -> Generation {
        let consumers = Rc::new(Consumers::new(config));
        let upstreams: Box<[Rc<UpstreamState>]> = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let before = previous.and_then(|g| g.upstreams.iter().find(|s| s.name == u.name));
                let id = UpstreamId(i as u16);
                Rc::new(UpstreamState::new(
                    id,
                    u,
                    config.runtime.workers,
                    before.map(|b| &**b),
                ))
            })
            .collect();
        let routes = config
            .routes
            .iter()
            .map(|r| RouteEntry {
                name: r.name.clone(),
                max_body_bytes: r.max_body_bytes,
                timeout: r.timeout,
                trust_identity_headers: r.trust_identity_headers,
                chain: Chain::build(r, config, &consumers, &upstreams),
                terminal: match &r.action {
                    RouteAction::Proxy(upstream) => Terminal::Proxy {
                        upstream: *upstream,
                        strip_prefix: r.strip_prefix.as_ref().map(|p| p.as_bytes().into()),
                    },
                    RouteAction::Redirect(r) => {
                        let default = if r.scheme == "https" { 443 } else { 80 };
                        Terminal::Redirect {
                            status: r.status,
                            scheme: format!("{}://", r.scheme).into_bytes().into(),
                            host: r.host.as_ref().map(|h| h.as_bytes().into()),
                            port: match r.port {
                                Some(p) if p != default => format!(":{p}").into_bytes().into(),
                                _ => Box::default(),
                            },
                        }
                    }
                    RouteAction::Respond(resp) => {
                        let mut headers = Vec::new();
                        for (name, value) in &resp.headers {
                            crate::http::write::field(
                                &mut headers,
                                name.as_bytes(),
                                value.as_bytes(),
                            );
                        }
                        Terminal::Respond(Reply {
                            status: resp.status,
                            headers: headers.into(),
                            body: resp.body.clone().into_bytes().into(),
                            ..Reply::default()
                        })
                    }
                },
            })
            .collect();
        Generation {
            id: previous.map_or(1, |g| g.id.wrapping_add(1)),
            config: Arc::clone(config),
            metrics: RefCell::new(GenMetrics::new(
                config.routes.len(),
                config.rate_limits.len(),
            )),
            router: Router::new(config),
            routes,
            upstreams,
            consumers,
            trusted_proxies: config.trusted_proxies.as_slice().into(),
            vouched: NameSet::of(config.identity_headers.iter().map(String::as_bytes)),
            listener_trusts_identity: config
                .listeners
                .iter()
                .map(|l| l.trust_identity_headers)
                .collect(),
            forwarded_header: config.forwarded_header,
            jwt: JwtState::new(config, previous.map(|g| &g.jwt)),
        }
    }

    /// What this generation's requests recorded since the last call, or `None` for nothing.
    pub fn take_metrics(&self) -> Option<GenDelta> {
        let mut delta = GenDelta::new(Arc::clone(&self.config));
        delta.take_routes(&mut self.metrics.borrow_mut());
        for up in self.upstreams.iter() {
            up.stats.borrow_mut().take(up.id, &mut delta);
        }
        (!delta.is_empty()).then_some(delta)
    }

    /// The id in this generation of listener `id` of `before` (the same socket), if it has it.
    pub fn listener_after(&self, before: &Generation, id: ListenerId) -> Option<ListenerId> {
        let old = before.config.listeners.get(usize::from(id.0))?;
        let i = self
            .config
            .listeners
            .iter()
            .position(|l| l.same_socket(old))?;
        Some(ListenerId(i as u16))
    }

    /// Whether a request on `listener` and `route` keeps the client's copies of the headers
    /// the gateway vouches for.
    pub fn trusts_identity(&self, listener: ListenerId, route: &RouteEntry) -> bool {
        route.trust_identity_headers
            || self
                .listener_trusts_identity
                .get(usize::from(listener.0))
                .copied()
                .unwrap_or(false)
    }

    pub fn route(&self, id: RouteId) -> &RouteEntry {
        &self.routes[usize::from(id.0)]
    }

    pub fn upstream(&self, id: UpstreamId) -> &UpstreamState {
        &self.upstreams[usize::from(id.0)]
    }
}
