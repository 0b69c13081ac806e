//! The authentication filter: the route's providers are tried in order, and the first whose
//! credentials the request carries decides (a wrong key is a 401 even if a later provider would
//! have matched something else). The consumer it finds is the request's identity; the route's
//! `allow_groups` / `deny_groups` then decide whether that consumer may pass (403).
//!
//! Upstream, the identity travels as `X-Consumer` (any `X-Consumer` the client sent is dropped
//! first), and the credentials are removed unless the provider says `forward_credentials`.

use std::rc::Rc;

use super::{Ctx, RequestInfo};
use crate::auth::basic::{self, Verdict};
use crate::auth::jwks::Unknown;
use crate::auth::jwt::{Checker, Failure, MAX_TOKEN};
use crate::auth::{query_param, Consumers, Identity};
use crate::config::{AuthId, AuthKind, Config, Route};
use crate::error::ProxyError;
use crate::http::HeaderEdits;
use crate::metrics::AuthOutcome;

pub struct Auth {
    providers: Box<[Provider]>,
    /// Per consumer: whether the route's groups let it pass; `None`: every consumer does.
    allowed: Option<Box<[bool]>>,
    consumers: Rc<Consumers>,
    /// The 401's `www-authenticate` lines: one challenge per provider.
    challenges: Rc<[u8]>,
    /// `x-consumer`, and the credentials not forwarded, encoded for `HeaderEdits`.
    strip: Box<[u8]>,
    /// Query parameters holding credentials not forwarded.
    strip_query: Box<[Box<[u8]>]>,
}

struct Provider {
    id: AuthId,
    kind: Kind,
}

enum Kind {
    ApiKey {
        header: Option<Box<[u8]>>,
        query: Option<Box<[u8]>>,
    },
    Basic,
    Jwt(Box<Jwt>),
}

struct Jwt {
    checker: Checker,
    /// The 401's challenge lines for a refused token (RFC 6750 `invalid_token`), and for an
    /// expired one.
    invalid: Rc<[u8]>,
    expired: Rc<[u8]>,
}

/// Why a bearer token did not pass.
enum Refused {
    Invalid,
    Expired,
    /// The provider's keys could not be had in time.
    Unavailable,
}

impl Auth {
    pub fn new(route: &Route, config: &Config, consumers: &Rc<Consumers>) -> Auth {
        let mut providers = Vec::new();
        let mut challenges = Vec::new();
        let mut strip = Vec::new();
        let mut strip_query = Vec::new();
        HeaderEdits::encode_name(&mut strip, b"x-consumer");
        for &id in &route.auth {
            let p = &config.auth[usize::from(id.0)];
            let kind = match &p.kind {
                AuthKind::ApiKey { header, query } => {
                    let mut c = format!("www-authenticate: ApiKey realm=\"{}\"", p.name);
                    if let Some(h) = header {
                        c.push_str(&format!(", header=\"{h}\""));
                    }
                    if let Some(q) = query {
                        c.push_str(&format!(", query=\"{q}\""));
                    }
                    challenges.extend_from_slice(c.as_bytes());
                    if !p.forward_credentials {
                        if let Some(h) = header {
                            HeaderEdits::encode_name(&mut strip, h.as_bytes());
                        }
                        if let Some(q) = query {
                            strip_query.push(q.as_bytes().into());
                        }
                    }
                    Kind::ApiKey {
                        header: header.as_ref().map(|h| h.as_bytes().into()),
                        query: query.as_ref().map(|q| q.as_bytes().into()),
                    }
                }
                AuthKind::Basic { realm } => {
                    let c = format!("www-authenticate: Basic realm=\"{realm}\", charset=\"UTF-8\"");
                    challenges.extend_from_slice(c.as_bytes());
                    if !p.forward_credentials {
                        HeaderEdits::encode_name(&mut strip, b"authorization");
                    }
                    Kind::Basic
                }
                AuthKind::Jwt(settings) => {
                    let bearer = format!("www-authenticate: Bearer realm=\"{}\"", settings.realm);
                    challenges.extend_from_slice(bearer.as_bytes());
                    if !p.forward_credentials {
                        HeaderEdits::encode_name(&mut strip, b"authorization");
                    }
                    for (header, _) in &settings.claims_to_headers {
                        HeaderEdits::encode_name(&mut strip, header.as_bytes());
                    }
                    let with_error = |description: &str| -> Rc<[u8]> {
                        format!("{bearer}, error=\"invalid_token\", error_description=\"{description}\"\r\n")
                            .into_bytes()
                            .into()
                    };
                    Kind::Jwt(Box::new(Jwt {
                        checker: Checker::new(settings),
                        invalid: with_error("the access token is invalid"),
                        expired: with_error("the access token expired"),
                    }))
                }
            };
            challenges.extend_from_slice(b"\r\n");
            providers.push(Provider { id, kind });
        }
        let allowed =
            (!route.allow_groups.is_empty() || !route.deny_groups.is_empty()).then(|| {
                config
                    .consumers
                    .iter()
                    .map(|c| {
                        let in_any = |list: &[String]| c.groups.iter().any(|g| list.contains(g));
                        (route.allow_groups.is_empty() || in_any(&route.allow_groups))
                            && !in_any(&route.deny_groups)
                    })
                    .collect()
            });
        Auth {
            providers: providers.into(),
            allowed,
            consumers: Rc::clone(consumers),
            challenges: challenges.into(),
            strip: strip.into(),
            strip_query: strip_query.into(),
        }
    }

    /// Finds the request's consumer (into `consumer`), or refuses it: 401 without valid
    /// credentials, 403 for a consumer the route's groups exclude, 503 when too many Basic
    /// checks wait.
    pub async fn on_request(
        &self,
        cx: &Ctx<'_>,
        req: &RequestInfo<'_>,
        identity: &mut Option<Identity>,
    ) -> Result<(), ProxyError> {
        let record = |p: AuthId, outcome| {
            req.metrics.borrow_mut().record_auth(req.route, p, outcome);
        };
        let unauthorized = |invalid| ProxyError::Unauthorized {
            challenges: Rc::clone(&self.challenges),
            invalid,
        };
        for p in self.providers.iter() {
            let found = match &p.kind {
                Kind::ApiKey { header, query } => {
                    let presented =
                        header
                            .as_deref()
                            .and_then(|h| req.view.header(h))
                            .or_else(|| {
                                let q = query.as_deref()?;
                                query_param(req.view.head.target.get(req.view.buf), q)
                            });
                    let Some(key) = presented else { continue };
                    self.consumers.by_api_key(key).map(Identity::Consumer)
                }
                Kind::Jwt(jwt) => {
                    let Some(token) = req.view.header(b"authorization").and_then(bearer) else {
                        continue;
                    };
                    match self.check_token(cx, p.id, jwt, token).await {
                        Ok(who) => Some(who),
                        Err(refused) => {
                            record(p.id, AuthOutcome::Invalid);
                            return Err(match refused {
                                Refused::Invalid => ProxyError::Unauthorized {
                                    challenges: Rc::clone(&jwt.invalid),
                                    invalid: true,
                                },
                                Refused::Expired => ProxyError::Unauthorized {
                                    challenges: Rc::clone(&jwt.expired),
                                    invalid: true,
                                },
                                Refused::Unavailable => ProxyError::Overloaded(
                                    "the identity provider's keys are not available",
                                ),
                            });
                        }
                    }
                }
                Kind::Basic => {
                    let Some(value) = req.view.header(b"authorization") else {
                        continue;
                    };
                    if !value
                        .get(..6)
                        .is_some_and(|s| s.eq_ignore_ascii_case(b"basic "))
                    {
                        continue;
                    }
                    let Some((user, mut password)) = basic::parse(value) else {
                        record(p.id, AuthOutcome::Invalid);
                        return Err(unauthorized(true));
                    };
                    let who = self.consumers.by_user(&user);
                    let verdict = cx.basic.check(&user, &password, who, cx.now).await;
                    password.fill(0);
                    match verdict {
                        Verdict::Consumer(id) => Some(Identity::Consumer(id)),
                        Verdict::Invalid => None,
                        Verdict::Busy => {
                            return Err(ProxyError::Overloaded("too many password checks waiting"))
                        }
                    }
                }
            };
            let Some(who) = found else {
                record(p.id, AuthOutcome::Invalid);
                return Err(unauthorized(true));
            };
            let consumer = who.consumer();
            *identity = Some(who);
            if let Some(allowed) = &self.allowed {
                let ok = consumer.is_some_and(|id| allowed.get(usize::from(id.0)) == Some(&true));
                if !ok {
                    record(p.id, AuthOutcome::Forbidden);
                    return Err(ProxyError::Forbidden(
                        "this consumer may not use this route",
                    ));
                }
            }
            record(p.id, AuthOutcome::Ok);
            return Ok(());
        }
        if let Some(first) = self.providers.first() {
            record(first.id, AuthOutcome::Missing);
        }
        Err(unauthorized(false))
    }

    /// A bearer token of provider `id`: from this worker's cache of verified tokens, or
    /// verified now (waiting, bounded, for a refetch when its `kid` is unknown).
    async fn check_token(
        &self,
        cx: &Ctx<'_>,
        id: AuthId,
        jwt: &Jwt,
        token: &[u8],
    ) -> Result<Identity, Refused> {
        if token.len() > MAX_TOKEN {
            return Err(Refused::Invalid);
        }
        let version = cx.jwt.keys_version(id);
        if let Some(v) = cx
            .jwt
            .tokens
            .borrow()
            .get(&jwt.checker, id, token, version, cx.unix_now)
        {
            return Ok(Identity::Token(Rc::clone(v)));
        }
        // Answers waited for. A first answer may be keys fetched before the ask reached the
        // fetcher (another worker's, or a scheduled fetch): then one more ask gets a refetch,
        // unless the keys are settled.
        let mut waited = 0;
        loop {
            let Some(keys) = cx.jwt.keys(id) else {
                return Err(Refused::Invalid);
            };
            match jwt
                .checker
                .verify(token, &keys, &self.consumers, cx.unix_now)
            {
                Ok(v) => {
                    let v = Rc::new(v);
                    cx.jwt.tokens.borrow_mut().insert(
                        id,
                        token,
                        keys.version,
                        Rc::clone(&v),
                        cx.unix_now,
                    );
                    return Ok(Identity::Token(v));
                }
                Err(Failure::Expired) => return Err(Refused::Expired),
                Err(Failure::Invalid(_)) => return Err(Refused::Invalid),
                // Without any key (a remote JWKS never fetched), it is the provider's fault.
                Err(Failure::UnknownKid) if keys.is_empty() && waited > 0 => {
                    return Err(Refused::Unavailable)
                }
                Err(Failure::UnknownKid) if waited == 2 => return Err(Refused::Invalid),
                Err(Failure::UnknownKid) => match cx.jwt.unknown_kid(id, cx.now).await {
                    Unknown::Retry => waited += 1,
                    _ if keys.is_empty() => return Err(Refused::Unavailable),
                    Unknown::Refuse | Unknown::Unavailable => return Err(Refused::Invalid),
                },
            }
        }
    }

    /// Drops a client's `X-Consumer`, claim headers and credentials, and names the caller
    /// upstream.
    pub fn on_upstream_request(&self, req: &RequestInfo<'_>, edits: &mut HeaderEdits) {
        edits.remove_encoded(&self.strip);
        for q in self.strip_query.iter() {
            edits.drop_query_param(q);
        }
        if let Some(name) = req.consumer.filter(|n| !n.is_empty()) {
            edits.append_lines(b"x-consumer: ");
            edits.append_lines(name.as_bytes());
            edits.append_lines(b"\r\n");
        }
        if let Some(who) = req.identity {
            edits.append_lines(who.lines());
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value (RFC 6750 section 2.1).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let scheme = value.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(value[7..].trim_ascii())
}
