//! Answers from a cache entry as a `Reply`: the stored response (whole, or the range asked
//! for), or a 304 when the client's own conditions hold; with `Age` and `X-Cache` among the
//! gateway's lines. The body is the entry's shared `Bytes` (a slice for a range): nothing is
//! copied until the writer does.

use std::time::Instant;

use super::RequestInfo;
use crate::cache::policy::{self, CacheControl};
use crate::cache::range::{self, Ranged};
use crate::cache::Entry;
use crate::filter::Reply;
use crate::http::{Method, RequestHead};
use crate::metrics::CacheOutcome;

/// The largest `Age` sent: larger ages are sent as 2^31 (RFC 9111 §1.2.2).
const MAX_AGE_SHOWN: u64 = 1 << 31;

/// What the request asks of the cache, read in one pass over its head: its cache directives and
/// credentials (whether and how it may be answered from the cache), and the fields an answer
/// depends on (its conditions and range).
#[derive(Default)]
pub(super) struct Asked<'a> {
    /// `Cache-Control` and `Pragma`, every line.
    pub cc: CacheControl,
    pub authorized: bool,
    /// The client's own validators: a stale entry is not revalidated with the cache's.
    pub conditional: bool,
    if_none_match: &'a [u8],
    if_modified_since: &'a [u8],
    range: &'a [u8],
    if_range: &'a [u8],
    get: bool,
}

impl<'a> Asked<'a> {
    pub(super) fn read(req: &RequestInfo<'a>) -> Asked<'a> {
        let (buf, head): (&'a [u8], &'a RequestHead) = (req.view.buf, req.view.head);
        let mut a = Asked {
            get: head.method == Method::Get,
            ..Asked::default()
        };
        for h in &head.headers {
            let name = h.name.get(buf);
            let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
            // The length picks the candidates; the first line of each field below counts.
            let field = match name.len() {
                13 if is(b"cache-control") => {
                    a.cc.add(h.value.get(buf));
                    continue;
                }
                6 if is(b"pragma") => {
                    a.cc.add(h.value.get(buf));
                    continue;
                }
                13 if is(b"authorization") => {
                    a.authorized = true;
                    continue;
                }
                13 if is(b"if-none-match") => &mut a.if_none_match,
                17 if is(b"if-modified-since") => &mut a.if_modified_since,
                5 if is(b"range") => &mut a.range,
                8 if is(b"if-range") => &mut a.if_range,
                _ => continue,
            };
            if field.is_empty() {
                *field = h.value.get(buf);
            }
        }
        a.conditional = !a.if_none_match.is_empty() || !a.if_modified_since.is_empty();
        a
    }
}

/// Whether the client's own conditional request is satisfied by `entry` (RFC 9110 §13.2.2:
/// If-None-Match wins over If-Modified-Since; `*` matches any stored representation; without
/// `Last-Modified` the entry's `Date` stands in, RFC 9110 §13.1.3).
fn not_modified_for(asked: &Asked<'_>, entry: &Entry) -> bool {
    let inm = asked.if_none_match;
    if !inm.is_empty() {
        let any = crate::http::list_items(inm).any(|t| t == b"*");
        return any
            || entry
                .etag
                .as_ref()
                .is_some_and(|etag| policy::if_none_match_matches(inm, etag));
    }
    let ims = asked.if_modified_since;
    if ims.is_empty() {
        // Most hits: no date to parse.
        return false;
    }
    let modified = entry.last_modified.as_ref().map(|(t, _)| *t).or(entry.date);
    match (policy::http_date(ims), modified) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// Header fields a 304 carries from the stored response (RFC 9110 §15.4.5).
fn keep_in_304(name: &[u8]) -> bool {
    [
        "cache-control",
        "content-location",
        "date",
        "etag",
        "expires",
        "vary",
        "last-modified",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}

/// The answer from `entry`; `asked`: the request's conditions and range, when its head is
/// still there to read (an answer instead of the upstream's); `None` after the upstream was
/// asked (a refreshed entry, a stale one standing in for a failure). Writes `Content-Range`,
/// `Age` and `X-Cache` to the gateway's `lines`.
#[inline]
pub(super) fn reply(
    entry: &Entry,
    outcome: CacheOutcome,
    asked: Option<&Asked<'_>>,
    lines: &mut Vec<u8>,
    now: Instant,
) -> Reply {
    let (not_modified, ranged) = match asked {
        Some(asked) => {
            let not_modified = not_modified_for(asked, entry);
            let ranged = if !not_modified && asked.get {
                range::ranged(asked.range, asked.if_range, entry)
            } else {
                Ranged::Full
            };
            (not_modified, ranged)
        }
        None => (false, Ranged::Full),
    };
    let len = entry.body.len();
    let (status, body) = match ranged {
        _ if not_modified => (304, 0..0),
        Ranged::Full => (entry.status, 0..len),
        Ranged::Part { first, last } => (206, first as usize..last as usize + 1),
        Ranged::Unsatisfiable => (416, 0..0),
    };
    content_range(lines, ranged, len);
    // The gateway's lines: what the filters added (RateLimit-*), then Age and X-Cache.
    lines.extend_from_slice(b"age: ");
    lines.extend_from_slice(
        itoa::Buffer::new()
            .format(entry.age(now).as_secs().min(MAX_AGE_SHOWN))
            .as_bytes(),
    );
    lines.extend_from_slice(match outcome {
        CacheOutcome::Stale | CacheOutcome::StaleIfError => b"\r\nx-cache: STALE\r\n",
        _ => b"\r\nx-cache: HIT\r\n",
    });
    Reply {
        status,
        // The stored reason goes with the stored status; others get the standard one.
        reason: if status == entry.status {
            entry.reason.clone()
        } else {
            bytes::Bytes::new()
        },
        headers: entry.head.clone(),
        only: not_modified.then_some(keep_in_304 as fn(&[u8]) -> bool),
        body: if body.len() == len {
            entry.body.clone()
        } else if body.is_empty() {
            bytes::Bytes::new()
        } else {
            entry.body.slice(body)
        },
    }
}

/// `Content-Range` for a 206 or a 416 from the cache.
fn content_range(out: &mut Vec<u8>, ranged: Ranged, len: usize) {
    let mut n = itoa::Buffer::new();
    match ranged {
        Ranged::Full => return,
        Ranged::Part { first, last } => {
            out.extend_from_slice(b"content-range: bytes ");
            out.extend_from_slice(n.format(first).as_bytes());
            out.push(b'-');
            out.extend_from_slice(n.format(last).as_bytes());
        }
        Ranged::Unsatisfiable => out.extend_from_slice(b"content-range: bytes *"),
    }
    out.push(b'/');
    out.extend_from_slice(n.format(len).as_bytes());
    out.extend_from_slice(b"\r\n");
}
