//! Route validation: matching (host, path, methods), the action (upstream or a fixed
//! response), and what a route applies (rate limits, cache, header transforms).

use toml::Spanned;

use crate::http::path::EncodedSlashes;

use super::file::{RedirectFile, RespondFile, RouteFile};
use super::{
    ms, AuthId, AuthProvider, ConfigError, Consumer, HostMatch, Listener, ListenerId, PathMatch,
    RateLimit, RateLimitId, Redirect, Respond, Route, RouteAction, RouteCache, Upstream,
    UpstreamId, Validator,
};

/// RFC 9110's methods and PATCH: written in any other case, a config almost certainly meant them.
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// What a route may refer to: the sections validated before the routes.
pub(super) struct Known<'a> {
    pub listeners: &'a [Listener],
    pub upstreams: &'a [Upstream],
    pub rate_limits: &'a [RateLimit],
    pub has_cache: bool,
    pub providers: &'a [AuthProvider],
    pub consumers: &'a [Consumer],
    /// `[limits] encoded_slashes`: configured paths must be in the form requests take.
    pub slashes: EncodedSlashes,
}

/// A route's authentication: providers in order, and the group rules.
struct RouteAuth {
    auth: Vec<AuthId>,
    allow_groups: Vec<String>,
    deny_groups: Vec<String>,
}

impl Validator<'_> {
    pub(super) fn route(
        &self,
        i: usize,
        r: &RouteFile,
        known: &Known<'_>,
    ) -> Result<Route, ConfigError> {
        let Known {
            listeners,
            upstreams,
            rate_limits,
            has_cache,
            providers,
            consumers,
            slashes,
        } = *known;
        let key = format!("routes[{i}]");
        let name = self.name(&r.name, &format!("{key}.name"))?;
        let listener = listeners
            .iter()
            .position(|l| &l.name == r.listener.get_ref())
            .ok_or_else(|| {
                self.err(
                    r.listener.span(),
                    &format!("{key}.listener"),
                    format!("unknown listener {:?}", r.listener.get_ref()),
                )
            })?;

        let host = match &r.host {
            None => HostMatch::Any,
            Some(h) => self.host(h, &format!("{key}.host"))?,
        };

        let path = self.path_match(r, &key, slashes)?;
        let methods = self.methods(r, &key)?;
        let strip_prefix = match &r.strip_prefix {
            None => None,
            Some(p) => Some(self.path(p, &format!("{key}.strip_prefix"), slashes)?),
        };

        let action = match (&r.upstream, &r.respond, &r.redirect) {
            (Some(u), None, None) => {
                let id = upstreams
                    .iter()
                    .position(|o| &o.name == u.get_ref())
                    .ok_or_else(|| {
                        self.err(
                            u.span(),
                            &format!("{key}.upstream"),
                            format!("unknown upstream {:?}", u.get_ref()),
                        )
                    })?;
                RouteAction::Proxy(UpstreamId(id as u16))
            }
            (None, Some(resp), None) => RouteAction::Respond(self.respond(resp, &key)?),
            (None, None, Some(redirect)) => {
                RouteAction::Redirect(self.redirect(redirect, &format!("{key}.redirect"))?)
            }
            _ => {
                return Err(self.err(
                    r.name.span(),
                    &key,
                    "a route needs exactly one of upstream, respond and redirect",
                ))
            }
        };

        if r.rate_limits.len() > super::MAX_LIMITS_PER_ROUTE {
            return Err(self.err(
                r.name.span(),
                &format!("{key}.rate_limits"),
                format!(
                    "at most {} rate limits per route",
                    super::MAX_LIMITS_PER_ROUTE
                ),
            ));
        }
        let cache = self.route_cache(r, &key, has_cache)?;
        let limits = self.route_limits(r, &key, rate_limits)?;

        let RouteAuth {
            auth,
            allow_groups,
            deny_groups,
        } = self.route_auth(r, &key, providers, consumers)?;
        let ip_allow = self.cidrs(&r.ip_allow, &format!("{key}.ip_allow"))?;
        let ip_deny = self.cidrs(&r.ip_deny, &format!("{key}.ip_deny"))?;
        let cors = match &r.cors {
            Some(c) => Some(self.cors(c, &format!("{key}.cors"))?),
            None => None,
        };
        let compression = match &r.compression {
            Some(c) if !matches!(action, RouteAction::Proxy(_)) => {
                return Err(self.err(
                    c.span(),
                    &format!("{key}.compression"),
                    "compression is for routes with an upstream",
                ))
            }
            Some(c) => Some(self.compression(c, &format!("{key}.compression"))?),
            None => None,
        };
        let timeout = match &r.timeout_ms {
            None => None,
            Some(t) if !matches!(action, RouteAction::Proxy(_)) => {
                return Err(self.err(
                    t.span(),
                    &format!("{key}.timeout_ms"),
                    "timeout_ms is for routes with an upstream",
                ))
            }
            Some(t) if (1..=3_600_000).contains(t.get_ref()) => Some(ms(*t.get_ref())),
            Some(t) => {
                return Err(self.err(
                    t.span(),
                    &format!("{key}.timeout_ms"),
                    "must be between 1 and 3600000",
                ))
            }
        };
        Ok(Route {
            trust_identity_headers: r.trust_identity_headers,
            timeout,
            cors,
            compression,
            ip_allow,
            ip_deny,
            auth,
            allow_groups,
            deny_groups,
            name,
            listener: ListenerId(listener as u16),
            host,
            path,
            methods,
            strip_prefix,
            action,
            max_body_bytes: r.max_body_bytes,
            rate_limits: limits,
            cache,
            request_headers: r
                .request_headers
                .as_ref()
                .map(|t| self.header_transform(t, &format!("{key}.request_headers")))
                .transpose()?,
            response_headers: r
                .response_headers
                .as_ref()
                .map(|t| self.header_transform(t, &format!("{key}.response_headers")))
                .transpose()?,
        })
    }

    fn path_match(
        &self,
        r: &RouteFile,
        key: &str,
        slashes: EncodedSlashes,
    ) -> Result<PathMatch, ConfigError> {
        Ok(match (&r.path, &r.path_prefix, &r.path_regex) {
            (None, None, None) => PathMatch::Prefix("/".to_owned()),
            (Some(p), None, None) => {
                PathMatch::Exact(self.path(p, &format!("{key}.path"), slashes)?)
            }
            (None, Some(p), None) => {
                PathMatch::Prefix(self.path(p, &format!("{key}.path_prefix"), slashes)?)
            }
            (None, None, Some(p)) => {
                if let Err(e) = regex_automata::meta::Regex::new(p.get_ref()) {
                    return Err(self.err(
                        p.span(),
                        &format!("{key}.path_regex"),
                        format!(
                            "invalid regex: {}",
                            e.syntax_error()
                                .map_or_else(|| e.to_string(), |s| s.to_string())
                        ),
                    ));
                }
                PathMatch::Regex(p.get_ref().clone())
            }
            _ => {
                return Err(self.err(
                    r.name.span(),
                    key,
                    "give at most one of path, path_prefix and path_regex",
                ))
            }
        })
    }

    fn methods(&self, r: &RouteFile, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        Ok(match &r.methods {
            None => None,
            Some(list) if list.is_empty() => {
                return Err(self.err(
                    r.name.span(),
                    &format!("{key}.methods"),
                    "an empty methods list matches nothing; omit it to allow every method",
                ))
            }
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for m in list {
                    if !crate::http::is_token(m.get_ref().as_bytes()) {
                        return Err(self.err(
                            m.span(),
                            &format!("{key}.methods"),
                            format!("{:?} is not a valid method", m.get_ref()),
                        ));
                    }
                    let upper = m.get_ref().to_ascii_uppercase();
                    if upper != *m.get_ref() && STANDARD_METHODS.contains(&upper.as_str()) {
                        return Err(self.err(
                            m.span(),
                            &format!("{key}.methods"),
                            format!(
                                "{:?} would never match: methods are case-sensitive; did you mean {upper:?}?",
                                m.get_ref()
                            ),
                        ));
                    }
                    out.push(m.get_ref().clone());
                }
                Some(out)
            }
        })
    }

    fn route_cache(
        &self,
        r: &RouteFile,
        key: &str,
        has_cache: bool,
    ) -> Result<Option<RouteCache>, ConfigError> {
        Ok(match &r.cache {
            None => None,
            Some(c) => {
                if !has_cache {
                    return Err(self.err(
                        c.span(),
                        &format!("{key}.cache"),
                        "route caching needs a [cache] section",
                    ));
                }
                if r.upstream.is_none() {
                    return Err(self.err(
                        c.span(),
                        &format!("{key}.cache"),
                        "only routes with an upstream can cache",
                    ));
                }
                let mut key_headers = Vec::new();
                for h in &c.get_ref().key_headers {
                    if !crate::http::is_token(h.get_ref().as_bytes()) {
                        return Err(self.err(
                            h.span(),
                            &format!("{key}.cache.key_headers"),
                            format!("{:?} is not a header name", h.get_ref()),
                        ));
                    }
                    key_headers.push(h.get_ref().to_ascii_lowercase());
                }
                let heuristic_percent = match &c.get_ref().heuristic_percent {
                    Some(p) if !(1..=100).contains(p.get_ref()) => {
                        return Err(self.err(
                            p.span(),
                            &format!("{key}.cache.heuristic_percent"),
                            "must be 1-100",
                        ))
                    }
                    p => p.as_ref().map(|p| *p.get_ref()),
                };
                Some(RouteCache {
                    implicit: super::Implicit {
                        ttl: ms(c.get_ref().default_ttl_ms),
                        heuristic_percent,
                    },
                    key_headers,
                    serve_stale_on_error: ms(c.get_ref().serve_stale_on_error_ms),
                    per_consumer: c.get_ref().per_consumer,
                })
            }
        })
    }

    fn route_limits(
        &self,
        r: &RouteFile,
        key: &str,
        rate_limits: &[RateLimit],
    ) -> Result<Vec<RateLimitId>, ConfigError> {
        let mut limits = Vec::with_capacity(r.rate_limits.len());
        for l in &r.rate_limits {
            let id = rate_limits
                .iter()
                .position(|o| &o.name == l.get_ref())
                .ok_or_else(|| {
                    self.err(
                        l.span(),
                        &format!("{key}.rate_limits"),
                        format!("unknown rate limit {:?}", l.get_ref()),
                    )
                })?;
            if !limits.contains(&RateLimitId(id as u16)) {
                limits.push(RateLimitId(id as u16));
            }
        }
        Ok(limits)
    }

    fn host(&self, h: &Spanned<String>, key: &str) -> Result<HostMatch, ConfigError> {
        let s = h.get_ref().to_ascii_lowercase();
        let (wild, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s.as_str()),
        };
        let valid = !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid {
            return Err(self.err(
                h.span(),
                key,
                format!(
                    "{:?} is not a host name or \"*.domain\" (hosts are matched without a port)",
                    h.get_ref()
                ),
            ));
        }
        Ok(if wild {
            HostMatch::Suffix(format!(".{rest}"))
        } else {
            HostMatch::Exact(rest.to_owned())
        })
    }

    /// A configured path: requests are matched after normalization (`http::path`), so a path
    /// that normalization would change could never match and is refused, naming its form.
    fn path(
        &self,
        p: &Spanned<String>,
        key: &str,
        slashes: EncodedSlashes,
    ) -> Result<String, ConfigError> {
        let s = p.get_ref();
        if !(s.starts_with('/') && s.bytes().all(|b| b.is_ascii_graphic())) {
            return Err(self.err(
                p.span(),
                key,
                format!("{s:?} must start with '/' and contain no spaces"),
            ));
        }
        match crate::http::path::normalized(s, slashes) {
            Ok(n) if n == *s => Ok(n),
            Ok(n) => Err(self.err(
                p.span(),
                key,
                format!(
                    "{s:?} would never match: request paths are matched normalized; write {n:?}"
                ),
            )),
            Err(e) => Err(self.err(
                p.span(),
                key,
                format!("{s:?} would never match: {}", e.reason()),
            )),
        }
    }

    /// A route's `auth`, `allow_groups` and `deny_groups`.
    fn route_auth(
        &self,
        r: &RouteFile,
        key: &str,
        providers: &[AuthProvider],
        consumers: &[Consumer],
    ) -> Result<RouteAuth, ConfigError> {
        let mut auth = Vec::with_capacity(r.auth.len());
        for a in &r.auth {
            let Some(i) = providers.iter().position(|p| &p.name == a.get_ref()) else {
                return Err(self.err(
                    a.span(),
                    &format!("{key}.auth"),
                    format!("unknown auth provider {:?}", a.get_ref()),
                ));
            };
            if auth.contains(&AuthId(i as u16)) {
                return Err(self.err(a.span(), &format!("{key}.auth"), "listed twice"));
            }
            auth.push(AuthId(i as u16));
        }
        let mut lists = [Vec::new(), Vec::new()];
        for (list, (field, out)) in [&r.allow_groups, &r.deny_groups].into_iter().zip(
            ["allow_groups", "deny_groups"]
                .into_iter()
                .zip(lists.iter_mut()),
        ) {
            for g in list {
                let k = format!("{key}.{field}");
                if auth.is_empty() {
                    return Err(self.err(
                        g.span(),
                        &k,
                        "groups need the route's auth to name a consumer",
                    ));
                }
                if !consumers.iter().any(|c| c.groups.contains(g.get_ref())) {
                    return Err(self.err(
                        g.span(),
                        &k,
                        format!("no consumer is in group {:?}", g.get_ref()),
                    ));
                }
                out.push(g.get_ref().clone());
            }
        }
        let [allow_groups, deny_groups] = lists;
        Ok(RouteAuth {
            auth,
            allow_groups,
            deny_groups,
        })
    }

    fn redirect(&self, r: &Spanned<RedirectFile>, key: &str) -> Result<Redirect, ConfigError> {
        let f = r.get_ref();
        let scheme = match &f.scheme {
            None => "https".to_owned(),
            Some(s) if matches!(s.get_ref().as_str(), "https" | "http") => s.get_ref().clone(),
            Some(s) => {
                return Err(self.err(
                    s.span(),
                    &format!("{key}.scheme"),
                    format!("{:?}: give \"https\" or \"http\"", s.get_ref()),
                ))
            }
        };
        let status = match &f.status {
            None => 308,
            Some(s) if matches!(s.get_ref(), 301 | 302 | 303 | 307 | 308) => *s.get_ref(),
            Some(s) => {
                return Err(self.err(
                    s.span(),
                    &format!("{key}.status"),
                    "give 301, 302, 303, 307 or 308 (307 and 308 keep the method and body)",
                ))
            }
        };
        let host = match &f.host {
            None => None,
            Some(h) if crate::http::valid_redirect_host(h.get_ref().as_bytes()) => {
                Some(h.get_ref().to_ascii_lowercase())
            }
            Some(h) => {
                return Err(self.err(
                    h.span(),
                    &format!("{key}.host"),
                    format!("{:?} is not a host name or address", h.get_ref()),
                ))
            }
        };
        let port = match &f.port {
            None => None,
            Some(p) => match u16::try_from(*p.get_ref()) {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    return Err(self.err(
                        p.span(),
                        &format!("{key}.port"),
                        "must be between 1 and 65535",
                    ))
                }
            },
        };
        Ok(Redirect {
            status,
            scheme,
            host,
            port,
        })
    }

    fn respond(&self, r: &Spanned<RespondFile>, key: &str) -> Result<Respond, ConfigError> {
        let resp = r.get_ref();
        let status = *resp.status.get_ref();
        if !(200..=599).contains(&status) {
            return Err(self.err(
                resp.status.span(),
                &format!("{key}.respond.status"),
                "must be between 200 and 599",
            ));
        }
        if matches!(status, 204 | 304) && !resp.body.is_empty() {
            return Err(self.err(
                resp.status.span(),
                &format!("{key}.respond.body"),
                format!("a {status} response cannot have a body"),
            ));
        }
        let mut headers = Vec::with_capacity(resp.headers.len());
        for (name, value) in &resp.headers {
            let hkey = format!("{key}.respond.headers");
            if !crate::http::is_token(name.as_bytes()) {
                return Err(self.err(
                    value.span(),
                    &hkey,
                    format!("{name:?} is not a valid header name"),
                ));
            }
            let lower = name.to_ascii_lowercase();
            if matches!(
                lower.as_str(),
                "content-length" | "transfer-encoding" | "connection" | "x-request-id"
            ) {
                return Err(self.err(
                    value.span(),
                    &hkey,
                    format!("{name} is set by ringway and cannot be configured"),
                ));
            }
            if value
                .get_ref()
                .bytes()
                .any(|b| b.is_ascii_control() && b != b'\t')
            {
                return Err(self.err(
                    value.span(),
                    &hkey,
                    "header values cannot contain control characters",
                ));
            }
            headers.push((lower, value.get_ref().clone()));
        }
        Ok(Respond {
            status,
            headers,
            body: resp.body.clone(),
        })
    }
}
