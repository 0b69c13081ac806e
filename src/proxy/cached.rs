//! Answers from the cache, once the route's cache filter (`filter::cache`) has decided on an
//! entry: the stored response, or a 304 when the client's own conditions hold, through the one
//! generated-head writer; and the background revalidation of an entry answered STALE, through
//! the buffered upstream client.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use monoio::io::AsyncWriteRentExt;
use tracing::debug;

use super::session::Session;
use super::{Failure, Io, Next};
use crate::buffer::send;
use crate::cache::policy;
use crate::cache::range::{self, Ranged};
use crate::cache::record::{add_validators, new_entry, refreshed, Recorded, Request};
use crate::cache::{Entry, WorkerCache};
use crate::config::Implicit;
use crate::error::ProxyError;
use crate::generation::{RouteEntry, Terminal};
use crate::http::write::{self, Generated};
use crate::http::{Method, RequestHead};
use crate::metrics::CacheOutcome;
use crate::upstream::client::{self, fetch};
use crate::upstream::UpstreamState;
use crate::worker::Worker;

/// Bodies up to this size are copied into the response buffer; larger ones are written from
/// the shared `Bytes` (one atomic increment instead of a copy).
const COPY_BODY_BYTES: usize = 64 * 1024;
/// The largest `Age` sent: larger ages are sent as 2^31 (RFC 9111 §1.2.2).
const MAX_AGE_SHOWN: u64 = 1 << 31;
/// Flights for background revalidation are keyed apart from fetches for misses.
const REVALIDATION: u64 = 0x9e37_79b9_7f4a_7c15;

/// Answers from a cache entry the route's cache filter found (HIT, STALE, coalesced), refreshed
/// (after a 304) or fell back on (the upstream failed): a STALE answer also starts its
/// background revalidation. `head_pending`: the request's head is still in the buffer (not yet
/// forwarded), so its conditions and range apply.
pub(super) async fn serve<S: Io>(
    c: &mut Session<'_, S>,
    w: &Rc<Worker>,
    route: &RouteEntry,
    entry: &Arc<Entry>,
    outcome: CacheOutcome,
    head_pending: bool,
) -> Result<Next, Failure> {
    if outcome == CacheOutcome::Stale {
        if let (
            Some(cache),
            Terminal::Proxy {
                upstream,
                strip_prefix,
            },
        ) = (&w.cache, &route.terminal)
        {
            let up = Rc::clone(&c.ex.gen.upstreams[usize::from(upstream.0)]);
            revalidate_in_background(w, cache, up, strip_prefix.as_deref(), Arc::clone(entry));
        }
    }
    serve_entry(c, w, entry, outcome, head_pending, Instant::now()).await
}

/// The request fields an answer from the cache depends on, read in one pass over the head.
#[derive(Default)]
struct Asked<'a> {
    if_none_match: &'a [u8],
    if_modified_since: &'a [u8],
    range: &'a [u8],
    if_range: &'a [u8],
}

impl<'a> Asked<'a> {
    fn read(buf: &'a [u8], head: &RequestHead) -> Asked<'a> {
        let mut a = Asked::default();
        for h in &head.headers {
            let name = h.name.get(buf);
            // The length picks the one candidate; the first line of each counts.
            let slot = match name.len() {
                13 if name.eq_ignore_ascii_case(b"if-none-match") => &mut a.if_none_match,
                17 if name.eq_ignore_ascii_case(b"if-modified-since") => &mut a.if_modified_since,
                5 if name.eq_ignore_ascii_case(b"range") => &mut a.range,
                8 if name.eq_ignore_ascii_case(b"if-range") => &mut a.if_range,
                _ => continue,
            };
            if slot.is_empty() {
                *slot = h.value.get(buf);
            }
        }
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

/// Answers from `entry`: the stored response, or 304 if the client's conditions hold.
async fn serve_entry<S: Io>(
    c: &mut Session<'_, S>,
    w: &Worker,
    entry: &Entry,
    outcome: CacheOutcome,
    head_pending: bool,
    now: Instant,
) -> Result<Next, Failure> {
    let state: &[u8] = match outcome {
        CacheOutcome::Stale | CacheOutcome::StaleIfError => b"STALE",
        _ => b"HIT",
    };
    let (not_modified, ranged) = if head_pending {
        let asked = Asked::read(c.rbuf.data(), &c.head);
        let not_modified = not_modified_for(&asked, entry);
        let ranged = if !not_modified && c.head.method == Method::Get {
            range::ranged(asked.range, asked.if_range, entry)
        } else {
            Ranged::Full
        };
        (not_modified, ranged)
    } else {
        (false, Ranged::Full)
    };
    let to_head = c.head.method == Method::Head;
    let keep = c.head.keep_alive && !w.draining.get();
    if head_pending {
        c.rbuf.consume(c.head.len);
    }
    let len = entry.body.len();
    let (status, body) = match ranged {
        _ if not_modified => (304, 0..0),
        Ranged::Full => (entry.status, 0..len),
        Ranged::Part { first, last } => (206, first as usize..last as usize + 1),
        Ranged::Unsatisfiable => (416, 0..0),
    };
    content_range(&mut c.ex.extra, ranged, len);
    // The gateway's lines: what the filters added (RateLimit-*), then Age and X-Cache.
    c.ex.extra.extend_from_slice(b"age: ");
    c.ex.extra.extend_from_slice(
        itoa::Buffer::new()
            .format(entry.age(now).as_secs().min(MAX_AGE_SHOWN))
            .as_bytes(),
    );
    c.ex.extra.extend_from_slice(b"\r\nx-cache: ");
    c.ex.extra.extend_from_slice(state);
    c.ex.extra.extend_from_slice(b"\r\n");
    let with_body = !to_head && !body.is_empty();
    let copy = with_body && body.len() <= COPY_BODY_BYTES;
    c.out.clear();
    write::generated_response(
        &mut c.out,
        &Generated {
            status,
            // The stored reason goes with the stored status; others get the standard one.
            reason: if status == entry.status {
                &entry.reason
            } else {
                b""
            },
            headers: &entry.head,
            only: not_modified.then_some(keep_in_304 as fn(&[u8]) -> bool),
            extra: &c.ex.extra,
            edits: &c.ex.resp_edits,
            body: if copy { &entry.body[body.clone()] } else { b"" },
            content_length: (!not_modified && status != 204).then_some(body.len() as u64),
            head_only: false,
            keep_alive: keep,
            client_version: c.head.version,
            request_id: &c.ex.request_id,
        },
    );
    c.ex.log.status = status;
    c.ex.log.bytes_in = c.head.len as u64;
    let streamed = if with_body && !copy { body.len() } else { 0 };
    c.ex.log.bytes_out.set((c.out.len() + streamed) as u64);
    w.metrics.borrow_mut().record_cache(outcome);
    let limit = w.limits.write_timeout;
    send(&mut c.w, &mut c.out, &c.deadline, limit)
        .await
        .map_err(|_| Failure::Abort)?;
    if streamed > 0 {
        let body = entry.body.slice(body);
        match c.deadline.within(limit, c.w.write_all(body)).await {
            Ok((Ok(_), _)) => {}
            _ => return Err(Failure::Abort),
        }
    }
    Ok(if keep { Next::KeepAlive } else { Next::Close })
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

/// Revalidates `entry` off the request path (stale-while-revalidate), once per entry at a time,
/// through the buffered upstream client. The request goes to the path the route forwards to
/// (after `strip_prefix`), like the request that stored the entry.
fn revalidate_in_background(
    w: &Rc<Worker>,
    cache: &WorkerCache,
    up: Rc<UpstreamState>,
    strip: Option<&[u8]>,
    entry: Arc<Entry>,
) {
    // One per entry: each consumer's entry for a URL is refreshed as that consumer.
    let key = entry.url ^ entry.variant.wrapping_mul(REVALIDATION);
    let (_, leader) = cache.flight(key);
    if !leader {
        return;
    }
    let w = Rc::clone(w);
    // The task owns what it needs: the upstream's state (alive past a generation swap) and
    // the path to ask for.
    let (slash, rest) = write::upstream_path(&entry.target, strip);
    let target: Box<[u8]> = [slash, rest].concat().into();
    monoio::spawn(async move {
        if let Err(e) = background_fetch(&w, &up, &target, &entry).await {
            debug!(error = ?e, "background revalidation failed");
        }
        if let Some(cache) = &w.cache {
            cache.land(key);
        }
    });
}

async fn background_fetch(
    w: &Worker,
    up: &UpstreamState,
    target: &[u8],
    entry: &Entry,
) -> Result<(), ProxyError> {
    let Some(cache) = &w.cache else { return Ok(()) };
    let mut headers = Vec::with_capacity(256);
    headers.extend_from_slice(&entry.request_headers);
    headers.extend_from_slice(&entry.replay);
    add_validators(&mut headers, entry);
    headers.extend_from_slice(b"x-cache-revalidation: 1\r\n");
    let request = client::Request {
        method: b"GET",
        target,
        host: &entry.host,
        headers: &headers,
    };
    let resp = fetch(
        &w.upstream_ctx(),
        up,
        entry.url,
        &request,
        cache.settings.max_entry_bytes,
    )
    .await?;
    let now = Instant::now();
    let rec = Recorded::from_head(&resp.raw_head, &resp.head);
    if resp.head.status == 304 {
        cache.insert(refreshed(entry, Some(rec), now));
        return Ok(());
    }
    // A new representation: store it if it is storable and was small enough to fetch whole.
    let Some(body) = resp.body else { return Ok(()) };
    if !policy::storable(&rec.facts(entry.authorized)) {
        return Ok(());
    }
    let request = Request {
        url: entry.url,
        partition: 0,
        replay: entry.replay.clone(),
        authorized: entry.authorized,
        variant_names: Vec::new(),
        host: entry.host.clone(),
        target: entry.target.clone(),
        headers: Vec::new(),
    };
    let mut stored = new_entry(
        &request,
        rec,
        Bytes::from(body),
        now,
        Implicit::ttl(entry.freshness),
    );
    stored.variant = entry.variant;
    stored.vary = entry.vary.clone();
    stored.request_headers = entry.request_headers.clone();
    cache.insert(Arc::new(stored));
    Ok(())
}
