//! What a cache key holds beyond the URL and the variant headers: the partition. The upstream
//! answers from more than the request's own headers: from what the gateway tells it (where the
//! client addressed the request, as `X-Forwarded-Proto`, `-Host` and `-Port`; who is calling,
//! as `X-Consumer` and claim headers), which it cannot name in a `Vary`. So on a route with
//! `auth` the key holds the caller (each consumer has entries of its own), and the scheme always.

use std::hash::Hasher;
use std::rc::Rc;

use super::RequestInfo;
use crate::auth::{Consumers, Identity};
use crate::hash::stable_hasher;
use crate::http::write::{field, forwarded_port};
use crate::http::HeaderKind;

/// How a request is keyed beyond its URL and header values.
#[derive(Clone, Copy)]
pub(super) struct Keyed {
    /// Hash of what the upstream hears about the request besides its own headers: where the
    /// client addressed it, and on a per-consumer route who is calling.
    pub partition: u64,
    /// RFC 9111 §3.5 applies: the request carried credentials and the entry is shared.
    pub authorized: bool,
}

/// A route's keying, fixed at load.
pub(super) struct Keying {
    /// The route authenticates and keys entries by consumer (`per_consumer`, the default).
    per_consumer: bool,
    /// The route authenticates and shares entries across consumers: only what RFC 9111 §3.5
    /// lets a shared cache store for an authenticated request is stored.
    shared_authenticated: bool,
    consumers: Rc<Consumers>,
}

impl Keying {
    /// `authenticated`: the route has `auth`, so every request that reaches the cache has an
    /// identity.
    pub fn new(per_consumer: bool, authenticated: bool, consumers: &Rc<Consumers>) -> Keying {
        Keying {
            per_consumer: authenticated && per_consumer,
            shared_authenticated: authenticated && !per_consumer,
            consumers: Rc::clone(consumers),
        }
    }

    /// The name the gateway sends upstream for `who`.
    pub fn name<'a>(&'a self, who: &'a Identity) -> &'a str {
        who.name(&self.consumers)
    }

    /// The request's partition of the key (`authorization`: the request carries an
    /// `Authorization` header). On a per-consumer route, the caller: a consumer by name
    /// (stable across reloads, unlike its id), or a token's provider and subject; with the
    /// claim lines sent upstream. `None`: a caller with no name to key by (a token without
    /// `sub` and no consumer), which is not cached.
    pub fn keyed(
        &self,
        req: &RequestInfo<'_>,
        authorization: bool,
        identity: Option<&Identity>,
    ) -> Option<Keyed> {
        let place = Addressed::partition(req);
        if !self.per_consumer {
            return Some(Keyed {
                partition: place,
                authorized: authorization || self.shared_authenticated,
            });
        }
        let who = identity?;
        let mut h = stable_hasher();
        h.write_u64(place);
        match (who, who.consumer()) {
            (_, Some(id)) => h.write(self.consumers.name(id).as_bytes()),
            (Identity::Token(v), None) if !v.subject.is_empty() => {
                h.write(v.provider.as_bytes());
                h.write_u8(b' ');
                h.write(v.subject.as_bytes());
            }
            _ => return None,
        }
        h.write_u8(b'\n');
        h.write(who.lines());
        // The consumer's own entries are private to it: §3.5 does not hold them back.
        Some(Keyed {
            partition: h.finish(),
            authorized: false,
        })
    }
}

/// What the gateway told the upstream about a request that stores an entry (where it was
/// addressed; who, named as `name`), for the entry's background revalidation to send again.
pub(super) fn replay(req: &RequestInfo<'_>, who: Option<(&str, &Identity)>) -> Box<[u8]> {
    let a = Addressed::of(req);
    let mut replay = Vec::with_capacity(128);
    field(&mut replay, b"x-forwarded-proto", a.proto);
    field(&mut replay, b"x-forwarded-host", a.host);
    field(&mut replay, b"x-forwarded-port", a.port);
    if let Some((name, identity)) = who {
        field(&mut replay, b"x-consumer", name.as_bytes());
        replay.extend_from_slice(identity.lines());
    }
    replay.into()
}

/// Where the client addressed the request, as the gateway tells the upstream: the scheme,
/// host and port (a trusted proxy's `X-Forwarded-*` values where it sent them).
struct Addressed<'a> {
    proto: &'a [u8],
    host: &'a [u8],
    port: &'a [u8],
}

impl<'a> Addressed<'a> {
    /// What the connection and the Host say.
    fn of_connection(req: &RequestInfo<'a>) -> Addressed<'a> {
        let tls = req.tls.is_some();
        let host = req.view.head.host.map(|h| h.get(req.view.buf));
        Addressed {
            proto: if tls { b"https" } else { b"http" },
            host: host.unwrap_or_default(),
            port: forwarded_port(host, tls),
        }
    }

    /// What the upstream hears: the connection's facts, or a trusted proxy's.
    fn of(req: &RequestInfo<'a>) -> Addressed<'a> {
        let head = req.view.head;
        let mut a = Addressed::of_connection(req);
        // Only a trusted peer's forwarding headers are left (the parser flagged any).
        if head.forwarding {
            for h in &head.headers {
                let slot = match h.kind {
                    HeaderKind::XForwardedProto => &mut a.proto,
                    HeaderKind::XForwardedHost => &mut a.host,
                    HeaderKind::XForwardedPort => &mut a.port,
                    _ => continue,
                };
                *slot = h.value.get(req.view.buf);
            }
        }
        a
    }

    /// The partition for where the request was addressed. The URL key holds the Host (whence
    /// the gateway's `X-Forwarded-Host` and `-Port`), so without a trusted proxy's values it
    /// is the scheme alone, with no hashing: the common path.
    fn partition(req: &RequestInfo<'_>) -> u64 {
        let plain = u64::from(req.tls.is_some());
        if !req.view.head.forwarding {
            return plain;
        }
        let a = Addressed::of(req);
        let own = Addressed::of_connection(req);
        if (a.proto, a.host, a.port) == (own.proto, own.host, own.port) {
            return plain;
        }
        let mut h = stable_hasher();
        for part in [a.proto, a.host, a.port] {
            h.write(part);
            h.write_u8(b' ');
        }
        h.finish()
    }
}
