//! What storing a response needs: the facts a response head gives about caching it
//! (`Recorded`), the request's facts an entry keeps (`Request`), and building an entry from
//! them, fresh or refreshed by a 304. Used on the request path and by background revalidation.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::policy::{self, CacheControl, ResponseFacts};
use super::{variant_hash, Entry};
use crate::config::Implicit;
use crate::http::write::copy_lines;
use crate::http::{parse_response, HeaderEdits, HeaderKind, ResponseHead, MAX_HEADERS_CEILING};

/// The largest age a response can state: larger values count as 2^31 s (RFC 9111 §1.2.2).
pub const MAX_AGE: Duration = Duration::from_secs(1 << 31);

/// A response's age from its first `Age` line (RFC 9111 §5.1): the first member of a list, and an
/// invalid value (not a non-negative integer) ignored, as the RFC says a cache SHOULD.
fn age_value(value: &[u8]) -> Duration {
    let first = value
        .split(|&b| b == b',')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if first.is_empty() || !first.iter().all(u8::is_ascii_digit) {
        return Duration::ZERO;
    }
    std::str::from_utf8(first)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(MAX_AGE, |s| Duration::from_secs(s).min(MAX_AGE))
}

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
        let mut age_seen = false;
        // RFC 9213: a cache in a CDN's role uses `CDN-Cache-Control` instead of `Cache-Control`.
        let mut targeted: Option<CacheControl> = None;
        let mut targeted_invalid = false;
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
            } else if is("cdn-cache-control") {
                targeted_invalid |= !policy::targeted_valid(value);
                targeted
                    .get_or_insert_with(CacheControl::default)
                    .add(value);
            } else if is("expires") {
                // An invalid Expires means "already expired" (RFC 9111 §5.3).
                r.expires = Some(policy::http_date(value).unwrap_or(SystemTime::UNIX_EPOCH));
            } else if is("date") {
                r.date = policy::http_date(value);
            } else if is("age") && !age_seen {
                // The first Age line counts (RFC 9111 §5.1).
                age_seen = true;
                r.age = age_value(value);
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
        if let Some(cc) = targeted.filter(|_| !targeted_invalid) {
            r.cc = cc;
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

    /// `from_head` of the head as `edits` leave it (the filters before the cache changed it).
    pub fn from_edited(buf: &[u8], resp: &ResponseHead, edits: &HeaderEdits) -> Recorded {
        if edits.is_empty() {
            return Recorded::from_head(buf, resp);
        }
        let mut lines = Vec::with_capacity(resp.len);
        copy_lines(&mut lines, buf, &resp.headers, resp.len, |h| {
            !edits.removes(h.name.get(buf))
        });
        edits.write_appended(&mut lines);
        Recorded::from_lines(resp.status, resp.reason.get(buf), &lines)
            .unwrap_or_else(|| Recorded::from_head(buf, resp))
    }

    /// The facts of a header block as stored (`name: value\r\n` lines), as if it came with
    /// `status`: for an entry whose stored headers a 304 has updated.
    fn from_lines(status: u16, reason: &[u8], lines: &[u8]) -> Option<Recorded> {
        let mut buf = Vec::with_capacity(lines.len() + reason.len() + 32);
        buf.extend_from_slice(b"HTTP/1.1 ");
        buf.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
        buf.push(b' ');
        buf.extend_from_slice(reason);
        buf.extend_from_slice(b"\r\n");
        buf.extend_from_slice(lines);
        buf.extend_from_slice(b"\r\n");
        let mut head = ResponseHead::default();
        match parse_response(&buf, true, buf.len(), MAX_HEADERS_CEILING, &mut head) {
            Ok(true) => Some(Recorded::from_head(&buf, &head)),
            _ => None,
        }
    }

    /// Whether the response may be served stale when the origin fails, and for how long on its
    /// own say.
    fn stale_if_error(&self) -> Option<Duration> {
        let cc = &self.cc;
        let forbidden =
            cc.must_revalidate || cc.proxy_revalidate || cc.no_cache || cc.s_maxage.is_some();
        (!forbidden).then(|| Duration::from_secs(cc.stale_if_error.unwrap_or(0)))
    }

    pub fn facts(&self, authorized: bool) -> ResponseFacts<'_> {
        ResponseFacts {
            status: self.status,
            cc: &self.cc,
            expires: self.expires,
            date: self.date,
            last_modified: self.last_modified.as_ref().map(|(t, _)| *t),
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
    /// The key's part that is neither URL nor header values (`filter::cache::partition`).
    pub partition: u64,
    /// What the gateway sends upstream about the request (forwarding, identity lines).
    pub replay: Box<[u8]>,
    /// The request had credentials, and the entry is shared across consumers (§3.5).
    pub authorized: bool,
    pub variant_names: Vec<Box<[u8]>>,
    pub host: Box<[u8]>,
    pub target: Box<[u8]>,
    /// The request's headers (lower-cased names) any variant may depend on.
    pub headers: Vec<HeaderValue>,
}

impl Request {
    /// Every value of header `name` (lower case), in order.
    pub fn values<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| **n == *name)
            .map(|(_, v)| &v[..])
    }

    pub fn variant(&self, vary: &[Box<[u8]>]) -> u64 {
        let names = self.variant_names.iter().chain(vary).map(|n| &n[..]);
        variant_hash(self.partition, names, |n| self.values(n))
    }
}

pub fn new_entry(
    request: &Request,
    mut rec: Recorded,
    body: Bytes,
    now: Instant,
    implicit: Implicit,
) -> Entry {
    if rec.date.is_none() {
        // RFC 9110 §6.6.1: a cached response without Date gets the time it was received.
        let received = SystemTime::now();
        rec.head.extend_from_slice(b"date: ");
        rec.head
            .extend_from_slice(httpdate::fmt_http_date(received).as_bytes());
        rec.head.extend_from_slice(b"\r\n");
        rec.date = Some(received);
    }
    let freshness = policy::freshness(&rec.facts(false), implicit);
    let mut request_headers = Vec::new();
    for name in request.variant_names.iter().chain(&rec.vary) {
        for value in request.values(name) {
            request_headers.extend_from_slice(name);
            request_headers.extend_from_slice(b": ");
            request_headers.extend_from_slice(value);
            request_headers.extend_from_slice(b"\r\n");
        }
    }
    Entry {
        url: request.url,
        variant: request.variant(&rec.vary),
        stale_if_error: rec.stale_if_error(),
        stale_while_revalidate: Duration::from_secs(rec.cc.stale_while_revalidate.unwrap_or(0)),
        must_revalidate: rec.cc.must_revalidate || rec.cc.proxy_revalidate,
        vary: rec.vary,
        target: request.target.clone(),
        host: request.host.clone(),
        request_headers: request_headers.into(),
        replay: request.replay.clone(),
        authorized: request.authorized,
        status: rec.status,
        // The standard phrase is written by the head writer: nothing to share on every hit.
        reason: if rec.reason[..] == *crate::http::write::reason_phrase(rec.status).as_bytes() {
            Bytes::new()
        } else {
            Bytes::from(rec.reason)
        },
        head: Bytes::from(rec.head),
        body,
        etag: rec.etag,
        last_modified: rec.last_modified,
        date: rec.date,
        stored_at: now,
        initial_age: rec.age,
        freshness,
    }
}

/// Fields a 304 does not update in a stored response: framing (RFC 9111 §3.1, §3.2).
fn framing(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"transfer-encoding")
}

/// The name of a stored `name: value\r\n` line.
fn line_name(line: &[u8]) -> &[u8] {
    line.split(|&b| b == b':')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

/// The stored header lines updated from a 304's (RFC 9111 §3.2, §4.3.4): every field the 304
/// carries replaces the stored field of that name, except framing fields.
pub fn updated_headers(stored: &[u8], update: &[u8]) -> Vec<u8> {
    let lines = |block: &'_ [u8]| {
        block
            .split_inclusive(|&b| b == b'\n')
            .filter(|l| !l.trim_ascii().is_empty())
            .map(<[u8]>::to_vec)
            .collect::<Vec<_>>()
    };
    let new: Vec<Vec<u8>> = lines(update)
        .into_iter()
        .filter(|l| !framing(line_name(l)))
        .collect();
    let replaced = |name: &[u8]| new.iter().any(|l| line_name(l).eq_ignore_ascii_case(name));
    let mut out: Vec<u8> = lines(stored)
        .into_iter()
        .filter(|l| !replaced(line_name(l)))
        .flatten()
        .collect();
    out.extend(new.into_iter().flatten());
    out
}

/// The entry a 304 (whose head is `rec`, if recorded) revalidated, fresh again: its stored
/// header fields updated from the 304's, and freshness, validators and the rest recomputed from
/// the updated fields (the stored freshness standing in when they give none).
pub fn refreshed(stale: &Entry, rec: Option<Recorded>, now: Instant) -> Arc<Entry> {
    let age = rec.as_ref().map_or(Duration::ZERO, |r| r.age);
    let head = match &rec {
        Some(r) => updated_headers(&stale.head, &r.head),
        None => stale.head.to_vec(),
    };
    let merged = Recorded::from_lines(stale.status, &stale.reason, &head);
    let Some(m) = merged else {
        // Unparsable together (it parsed apart): keep the stored headers, freshened.
        return Arc::new(Entry {
            stored_at: now,
            initial_age: age,
            head: stale.head.clone(),
            ..clone_entry(stale)
        });
    };
    let freshness = policy::freshness(&m.facts(false), Implicit::ttl(stale.freshness));
    Arc::new(Entry {
        stale_if_error: m.stale_if_error(),
        stale_while_revalidate: Duration::from_secs(m.cc.stale_while_revalidate.unwrap_or(0)),
        must_revalidate: m.cc.must_revalidate || m.cc.proxy_revalidate,
        head: Bytes::from(m.head),
        etag: m.etag,
        last_modified: m.last_modified,
        date: m.date,
        stored_at: now,
        initial_age: age,
        freshness,
        ..clone_entry(stale)
    })
}

fn clone_entry(e: &Entry) -> Entry {
    Entry {
        url: e.url,
        variant: e.variant,
        vary: e.vary.clone(),
        target: e.target.clone(),
        host: e.host.clone(),
        request_headers: e.request_headers.clone(),
        replay: e.replay.clone(),
        authorized: e.authorized,
        status: e.status,
        reason: e.reason.clone(),
        head: e.head.clone(),
        body: e.body.clone(),
        etag: e.etag.clone(),
        last_modified: e.last_modified.clone(),
        date: e.date,
        stored_at: e.stored_at,
        initial_age: e.initial_age,
        freshness: e.freshness,
        stale_while_revalidate: e.stale_while_revalidate,
        must_revalidate: e.must_revalidate,
        stale_if_error: e.stale_if_error,
    }
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
