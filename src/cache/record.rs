//! What storing a response needs: the facts a response head gives about caching it
//! (`Recorded`), the request's facts an entry keeps (`Request`), and building an entry from
//! them, fresh or refreshed by a 304. Used on the request path and by background revalidation.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::policy::{self, CacheControl, ResponseFacts};
use super::{variant_hash, Entry};
use crate::http::write::copy_lines;
use crate::http::{HeaderKind, ResponseHead};

/// What a response head says about caching it.
pub struct Recorded {
    pub status: u16,
    pub reason: Box<[u8]>,
    /// The header lines to replay from the cache.
    pub head: Vec<u8>,
    pub cc: CacheControl,
    pub expires: Option<SystemTime>,
    pub date: Option<SystemTime>,
    pub age: Duration,
    pub etag: Option<Box<[u8]>>,
    pub last_modified: Option<(SystemTime, Box<[u8]>)>,
    pub vary: Vec<Box<[u8]>>,
    pub vary_star: bool,
    pub set_cookie: bool,
}

impl Recorded {
    pub fn from_head(buf: &[u8], resp: &ResponseHead) -> Recorded {
        let mut r = Recorded {
            status: resp.status,
            reason: resp.reason.get(buf).into(),
            head: Vec::new(),
            cc: CacheControl::default(),
            expires: None,
            date: None,
            age: Duration::ZERO,
            etag: None,
            last_modified: None,
            vary: Vec::new(),
            vary_star: false,
            set_cookie: false,
        };
        for h in &resp.headers {
            let (name, value) = (h.name.get(buf), h.value.get(buf));
            let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
            if is("cache-control") {
                r.cc.add(value);
            } else if is("expires") {
                // An invalid Expires means "already expired" (RFC 9111 §5.3).
                r.expires = Some(policy::http_date(value).unwrap_or(SystemTime::UNIX_EPOCH));
            } else if is("date") {
                r.date = policy::http_date(value);
            } else if is("age") {
                let secs = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                r.age = Duration::from_secs(secs.unwrap_or(0));
            } else if is("etag") {
                r.etag = Some(value.into());
            } else if is("last-modified") {
                r.last_modified = policy::http_date(value).map(|t| (t, value.into()));
            } else if is("set-cookie") {
                r.set_cookie = true;
            } else if is("vary") {
                for v in crate::http::list_items(value) {
                    if v == b"*" {
                        r.vary_star = true;
                    } else {
                        r.vary.push(v.to_ascii_lowercase().into());
                    }
                }
            }
        }
        copy_lines(&mut r.head, buf, &resp.headers, resp.len, |h| {
            !h.kind.is_hop_by_hop()
                && h.kind != HeaderKind::XRequestId
                && !h.name.get(buf).eq_ignore_ascii_case(b"age")
                && !h.name.get(buf).eq_ignore_ascii_case(b"x-cache")
                && !resp.connection.names(buf, h.name.get(buf))
        });
        r
    }

    pub fn facts(&self, authorized: bool) -> ResponseFacts<'_> {
        ResponseFacts {
            status: self.status,
            cc: &self.cc,
            expires: self.expires,
            date: self.date,
            has_set_cookie: self.set_cookie,
            vary_star: self.vary_star,
            request_has_authorization: authorized,
        }
    }
}

pub type HeaderValue = (Box<[u8]>, Box<[u8]>);

/// The request's facts a stored entry keeps, read before the head's buffer is reused.
pub struct Request {
    pub url: u64,
    pub variant_names: Vec<Box<[u8]>>,
    pub host: Box<[u8]>,
    pub target: Box<[u8]>,
    /// The request's headers (lower-cased names) any variant may depend on.
    pub headers: Vec<HeaderValue>,
}

impl Request {
    pub fn value(&self, name: &[u8]) -> &[u8] {
        self.headers
            .iter()
            .find(|(n, _)| **n == *name)
            .map_or(&b""[..], |(_, v)| v)
    }

    pub fn variant(&self, vary: &[Box<[u8]>]) -> u64 {
        variant_hash(self.variant_names.iter().chain(vary).map(|n| &n[..]), |n| {
            self.value(n)
        })
    }
}

pub fn new_entry(
    request: &Request,
    rec: Recorded,
    body: Bytes,
    now: Instant,
    default_ttl: Duration,
) -> Entry {
    let freshness = policy::freshness(&rec.facts(false), default_ttl);
    let mut request_headers = Vec::new();
    for name in request.variant_names.iter().chain(&rec.vary) {
        let value = request.value(name);
        if !value.is_empty() {
            request_headers.extend_from_slice(name);
            request_headers.extend_from_slice(b": ");
            request_headers.extend_from_slice(value);
            request_headers.extend_from_slice(b"\r\n");
        }
    }
    Entry {
        url: request.url,
        variant: request.variant(&rec.vary),
        vary: rec.vary,
        target: request.target.clone(),
        host: request.host.clone(),
        request_headers: request_headers.into(),
        status: rec.status,
        reason: rec.reason,
        head: Bytes::from(rec.head),
        body,
        etag: rec.etag,
        last_modified: rec.last_modified,
        stored_at: now,
        initial_age: rec.age,
        freshness,
        stale_while_revalidate: Duration::from_secs(rec.cc.stale_while_revalidate.unwrap_or(0)),
        must_revalidate: rec.cc.must_revalidate || rec.cc.proxy_revalidate,
    }
}

/// The entry a 304 (whose head is `rec`, if recorded) revalidated, fresh again (with the 304's
/// freshness if it gave any).
pub fn refreshed(stale: &Entry, rec: Option<Recorded>, now: Instant) -> Arc<Entry> {
    let (freshness, age, etag, last_modified) = match rec {
        Some(r) => (
            policy::freshness(&r.facts(false), stale.freshness),
            r.age,
            r.etag.or_else(|| stale.etag.clone()),
            r.last_modified.or_else(|| stale.last_modified.clone()),
        ),
        None => (
            stale.freshness,
            Duration::ZERO,
            stale.etag.clone(),
            stale.last_modified.clone(),
        ),
    };
    Arc::new(Entry {
        url: stale.url,
        variant: stale.variant,
        vary: stale.vary.clone(),
        target: stale.target.clone(),
        host: stale.host.clone(),
        request_headers: stale.request_headers.clone(),
        status: stale.status,
        reason: stale.reason.clone(),
        head: stale.head.clone(),
        body: stale.body.clone(),
        etag,
        last_modified,
        stored_at: now,
        initial_age: age,
        freshness,
        stale_while_revalidate: stale.stale_while_revalidate,
        must_revalidate: stale.must_revalidate,
    })
}

pub fn add_validators(out: &mut Vec<u8>, entry: &Entry) {
    if let Some(etag) = &entry.etag {
        out.extend_from_slice(b"if-none-match: ");
        out.extend_from_slice(etag);
        out.extend_from_slice(b"\r\n");
    }
    if let Some((_, raw)) = &entry.last_modified {
        out.extend_from_slice(b"if-modified-since: ");
        out.extend_from_slice(raw);
        out.extend_from_slice(b"\r\n");
    }
}
