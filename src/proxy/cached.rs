//! The cache phase of a proxied request, for routes with `cache`: answer from the worker's
//! cache when an entry is fresh (HIT, or 304 for a matching conditional request), answer stale
//! within `stale-while-revalidate` and revalidate in the background (STALE), revalidate a
//! stale entry with a conditional request, or forward (MISS) — one request per key at a time on
//! a worker — and store what comes back if RFC 9111 allows. Unsafe requests that succeed
//! invalidate their URL (and `Location` / `Content-Location`) on every worker.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use monoio::io::AsyncWriteRentExt;
use tracing::debug;

use super::forward::proxy;
use super::session::Session;
use super::{Failure, Io, Next};
use crate::body::Tee;
use crate::buffer::send;
use crate::cache::policy::{self, CacheControl};
use crate::cache::record::{add_validators, new_entry, refreshed, Recorded, Request};
use crate::cache::{url_hash, variant_hash, Entry, WorkerCache};
use crate::config::RouteCache;
use crate::error::ProxyError;
use crate::generation::RouteEntry;
use crate::http::write::{self, Generated};
use crate::http::{BodyLength, Method, RequestHead, ResponseHead};
use crate::metrics::CacheOutcome;
use crate::upstream::client::{self, fetch};
use crate::upstream::UpstreamState;
use crate::worker::Worker;

/// How long a miss waits for another request's fetch of the same key before making its own.
const COALESCE_WAIT: Duration = Duration::from_secs(5);
/// Bodies up to this size are copied into the response buffer; larger ones are written from
/// the shared `Bytes` (one atomic increment instead of a copy).
const COPY_BODY_BYTES: usize = 64 * 1024;
/// Flights for background revalidation are keyed apart from fetches for misses.
const REVALIDATION: u64 = 0x9e37_79b9_7f4a_7c15;

/// What caching asks of one proxied exchange.
pub struct CacheExchange {
    /// Conditional header lines added to the upstream request.
    pub conditional: Vec<u8>,
    /// A stale entry is being revalidated: a 304 answers from it instead of reaching the client.
    pub revalidating: bool,
    pub not_modified: Cell<bool>,
    capture: Option<Capture>,
    /// The response's `Location` and `Content-Location` values (for invalidation).
    locations: RefCell<Vec<Box<[u8]>>>,
}

struct Capture {
    tee: RefCell<Tee>,
    recorded: RefCell<Option<Recorded>>,
    authorized: bool,
    default_ttl: Duration,
    max_entry: usize,
}

impl CacheExchange {
    /// For an unsafe request: nothing to store, only the URLs to invalidate.
    pub(super) fn invalidating() -> CacheExchange {
        CacheExchange {
            conditional: Vec::new(),
            revalidating: false,
            not_modified: Cell::new(false),
            capture: None,
            locations: RefCell::new(Vec::new()),
        }
    }

    /// Records a 304's head, to refresh the entry it revalidated.
    pub(super) fn record(&self, buf: &[u8], resp: &ResponseHead) {
        if let Some(cap) = &self.capture {
            *cap.recorded.borrow_mut() = Some(Recorded::from_head(buf, resp));
        }
    }

    /// Notes what the response head says for the cache: the URLs it names, and whether to
    /// copy the body for storing.
    pub(super) fn start_capture(&self, buf: &[u8], resp: &ResponseHead) {
        let mut locations = self.locations.borrow_mut();
        for h in &resp.headers {
            let name = h.name.get(buf);
            if name.eq_ignore_ascii_case(b"location")
                || name.eq_ignore_ascii_case(b"content-location")
            {
                locations.push(h.value.get(buf).into());
            }
        }
        drop(locations);
        let Some(cap) = &self.capture else { return };
        let rec = Recorded::from_head(buf, resp);
        let fits = match resp.body {
            BodyLength::Length(n) => n <= cap.max_entry as u64,
            _ => true,
        };
        if fits && policy::storable(&rec.facts(cap.authorized)) {
            *cap.recorded.borrow_mut() = Some(rec);
        } else {
            cap.tee.borrow_mut().overflowed = true;
        }
    }

    /// Where the response body is copied, while it may still be stored.
    pub(super) fn tee(&self) -> Option<&RefCell<Tee>> {
        self.capture
            .as_ref()
            .filter(|c| c.recorded.borrow().is_some() && !c.tee.borrow().overflowed)
            .map(|c| &c.tee)
    }
}

/// The value of request header `name`, or empty.
fn header<'a>(buf: &'a [u8], head: &RequestHead, name: &[u8]) -> &'a [u8] {
    head.header(buf, name).unwrap_or_default()
}

fn origin_target<'a>(buf: &'a [u8], head: &RequestHead) -> &'a [u8] {
    let path = head.path.get(buf);
    if path.is_empty() {
        b"/"
    } else {
        path
    }
}

/// The request's facts a stored entry keeps, read before the head's buffer is reused.
fn request_facts(buf: &[u8], head: &RequestHead, url: u64, key_headers: &[String]) -> Request {
    Request {
        url,
        variant_names: key_headers.iter().map(|h| h.as_bytes().into()).collect(),
        host: head.host.map_or(&b""[..], |h| h.get(buf)).into(),
        target: origin_target(buf, head).into(),
        headers: head
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.get(buf).to_ascii_lowercase().into(),
                    h.value.get(buf).into(),
                )
            })
            .collect(),
    }
}

pub(super) async fn proxy_cached<S: Io>(
    c: &mut Session<'_, S>,
    w: &Rc<Worker>,
    cache: &WorkerCache,
    route: &RouteEntry,
    up: &UpstreamState,
    strip: Option<&[u8]>,
    policy: &RouteCache,
) -> Result<Next, Failure> {
    let method = c.head.method;
    let mut req_cc = CacheControl::default();
    let mut authorized = false;
    let mut conditional = false;
    {
        let buf = c.rbuf.data();
        for h in &c.head.headers {
            let name = h.name.get(buf);
            if name.eq_ignore_ascii_case(b"cache-control") || name.eq_ignore_ascii_case(b"pragma") {
                req_cc.add(h.value.get(buf));
            } else if name.eq_ignore_ascii_case(b"authorization") {
                authorized = true;
            } else if name.eq_ignore_ascii_case(b"if-none-match")
                || name.eq_ignore_ascii_case(b"if-modified-since")
            {
                conditional = true;
            }
        }
    }
    let directives = policy::request_directives(&req_cc);
    let eligible = matches!(method, Method::Get | Method::Head) && c.head.body == BodyLength::None;
    if !eligible || directives.no_store {
        c.ex.extra.extend_from_slice(b"x-cache: BYPASS\r\n");
        w.metrics.borrow_mut().record_cache(CacheOutcome::Bypass);
        if method.is_safe() {
            return proxy(c, w, route, up, strip, None).await;
        }
        return proxy_invalidating(c, w, cache, route, up, strip).await;
    }

    let buf = c.rbuf.data();
    let host = c.head.host.map_or(&b""[..], |h| h.get(buf));
    let url = url_hash(host, origin_target(buf, &c.head));
    let variant_of = |c: &Session<'_, S>, vary: &[Box<[u8]>]| {
        let names = policy.key_headers.iter().map(String::as_bytes);
        let buf = c.rbuf.data();
        variant_hash(names.chain(vary.iter().map(|n| &n[..])), |n| {
            header(buf, &c.head, n)
        })
    };
    let now = Instant::now();
    let found = cache
        .store
        .borrow_mut()
        .get(url, |e| variant_of(c, &e.vary));
    if let Some(entry) = &found {
        if entry.is_fresh(now) && !directives.revalidate {
            return serve_entry(c, w, entry, CacheOutcome::Hit, now).await;
        }
        if !directives.revalidate && entry.may_serve_stale(now) {
            let up = Rc::clone(&c.ex.gen.upstreams[usize::from(up.id.0)]);
            revalidate_in_background(w, cache, up, strip, Arc::clone(entry));
            return serve_entry(c, w, entry, CacheOutcome::Stale, now).await;
        }
    }

    if directives.only_if_cached {
        return Err(Failure::BeforeBody(ProxyError::NotCached));
    }

    // One fetch (or revalidation of a stale entry) per key on this worker at a time; the
    // others wait for it, bounded. A request that asked to revalidate goes itself.
    let flight_key = url ^ variant_of(c, &[]);
    let mut leading = false;
    if !directives.revalidate {
        let (flight, leader) = cache.flight(flight_key);
        leading = leader;
        if !leader {
            let wait = COALESCE_WAIT.min(up.request_timeout);
            let _ = c.deadline.within(wait, flight.landed()).await;
            let again = cache
                .store
                .borrow_mut()
                .get(url, |e| variant_of(c, &e.vary));
            if let Some(entry) = again.filter(|e| e.is_fresh(Instant::now())) {
                return serve_entry(c, w, &entry, CacheOutcome::Coalesced, Instant::now()).await;
            }
        }
    }
    // Going upstream: what storing the response needs from the request, before the proxy
    // consumes its head.
    let request = request_facts(c.rbuf.data(), &c.head, url, &policy.key_headers);
    let _landing = Landing {
        cache,
        key: flight_key,
        leading,
    };

    let mut exchange = CacheExchange {
        conditional: Vec::new(),
        revalidating: false,
        not_modified: Cell::new(false),
        locations: RefCell::new(Vec::new()),
        capture: (method == Method::Get).then(|| Capture {
            tee: RefCell::new(Tee::new(cache.settings.max_entry_bytes)),
            recorded: RefCell::new(None),
            authorized,
            default_ttl: policy.default_ttl,
            max_entry: cache.settings.max_entry_bytes,
        }),
    };
    if let Some(entry) = found.as_ref().filter(|_| !conditional) {
        if entry.etag.is_some() || entry.last_modified.is_some() {
            add_validators(&mut exchange.conditional, entry);
            exchange.revalidating = true;
        }
    }
    let extra_len = c.ex.extra.len();
    c.ex.extra.extend_from_slice(b"x-cache: MISS\r\n");
    let result = proxy(c, w, route, up, strip, Some(&exchange)).await;
    if exchange.not_modified.get() {
        if let Some(stale) = found {
            let rec = exchange
                .capture
                .as_ref()
                .and_then(|c| c.recorded.borrow_mut().take());
            let fresh = refreshed(&stale, rec, Instant::now());
            cache.insert(Arc::clone(&fresh));
            c.ex.extra.truncate(extra_len);
            result?;
            // The request went upstream unconditional (its head is consumed): plain answer.
            return serve_entry(c, w, &fresh, CacheOutcome::Revalidated, Instant::now()).await;
        }
    }
    w.metrics.borrow_mut().record_cache(CacheOutcome::Miss);
    if result.is_ok() {
        if let Some(entry) = exchange.into_entry(&request, Instant::now()) {
            cache.insert(Arc::new(entry));
        }
    }
    result
}

/// Ends the flight a miss led, however the request ends.
struct Landing<'a> {
    cache: &'a WorkerCache,
    key: u64,
    leading: bool,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        if self.leading {
            self.cache.land(self.key);
        }
    }
}

impl CacheExchange {
    /// The entry to store, if the response was storable and its body was copied whole.
    fn into_entry(self, request: &Request, now: Instant) -> Option<Entry> {
        let cap = self.capture?;
        let rec = cap.recorded.into_inner()?;
        let tee = cap.tee.into_inner();
        if tee.overflowed {
            return None;
        }
        Some(new_entry(
            request,
            rec,
            Bytes::from(tee.data),
            now,
            cap.default_ttl,
        ))
    }
}

/// Whether the client's own conditional request is satisfied by `entry` (RFC 9110 §13.2.2:
/// If-None-Match wins over If-Modified-Since).
fn not_modified_for(buf: &[u8], head: &RequestHead, entry: &Entry) -> bool {
    let inm = header(buf, head, b"if-none-match");
    if !inm.is_empty() {
        return entry
            .etag
            .as_ref()
            .is_some_and(|etag| policy::if_none_match_matches(inm, etag));
    }
    let ims = header(buf, head, b"if-modified-since");
    match (policy::http_date(ims), &entry.last_modified) {
        (Some(since), Some((modified, _))) => *modified <= since,
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
    now: Instant,
) -> Result<Next, Failure> {
    let state: &[u8] = if outcome == CacheOutcome::Stale {
        b"STALE"
    } else {
        b"HIT"
    };
    // After a revalidation the proxy has consumed the head (and the request was not
    // conditional); otherwise it is still in the buffer.
    let head_pending = outcome != CacheOutcome::Revalidated;
    let not_modified = head_pending && not_modified_for(c.rbuf.data(), &c.head, entry);
    let to_head = c.head.method == Method::Head;
    let keep = c.head.keep_alive && !w.draining.get();
    if head_pending {
        c.rbuf.consume(c.head.len);
    }
    let status = if not_modified { 304 } else { entry.status };
    // The gateway's lines: Age and X-Cache, then what the filters added (RateLimit-*).
    let filters_added = c.ex.extra.len();
    c.ex.extra.extend_from_slice(b"age: ");
    c.ex.extra.extend_from_slice(
        itoa::Buffer::new()
            .format(entry.age(now).as_secs())
            .as_bytes(),
    );
    c.ex.extra.extend_from_slice(b"\r\nx-cache: ");
    c.ex.extra.extend_from_slice(state);
    c.ex.extra.extend_from_slice(b"\r\n");
    c.ex.extra.rotate_left(filters_added);
    let with_body = !not_modified && !to_head && !entry.body.is_empty();
    let copy = with_body && entry.body.len() <= COPY_BODY_BYTES;
    c.out.clear();
    write::generated_response(
        &mut c.out,
        &Generated {
            status,
            reason: if not_modified { b"" } else { &entry.reason },
            headers: &entry.head,
            only: not_modified.then_some(keep_in_304 as fn(&[u8]) -> bool),
            extra: &c.ex.extra,
            edits: &c.ex.resp_edits,
            body: if copy { &entry.body } else { b"" },
            content_length: (!not_modified && status != 204).then_some(entry.body.len() as u64),
            head_only: false,
            keep_alive: keep,
            client_version: c.head.version,
            request_id: &c.ex.request_id,
        },
    );
    c.ex.log.status = status;
    c.ex.log.bytes_in = c.head.len as u64;
    let streamed = if with_body && !copy {
        entry.body.len()
    } else {
        0
    };
    c.ex.log.bytes_out.set((c.out.len() + streamed) as u64);
    w.metrics.borrow_mut().record_cache(outcome);
    let limit = w.limits.write_timeout;
    send(&mut c.w, &mut c.out, &c.deadline, limit)
        .await
        .map_err(|_| Failure::Abort)?;
    if streamed > 0 {
        let body = entry.body.clone();
        match c.deadline.within(limit, c.w.write_all(body)).await {
            Ok((Ok(_), _)) => {}
            _ => return Err(Failure::Abort),
        }
    }
    Ok(if keep { Next::KeepAlive } else { Next::Close })
}

/// An unsafe request through a route that does not cache: forwarded, and if it succeeds its
/// URL (and the ones its response names) are invalidated on every worker.
pub(super) async fn proxy_invalidating<S: Io>(
    c: &mut Session<'_, S>,
    w: &Worker,
    cache: &WorkerCache,
    route: &RouteEntry,
    up: &UpstreamState,
    strip: Option<&[u8]>,
) -> Result<Next, Failure> {
    // Read the URL now: the head's buffer is reused while proxying.
    let buf = c.rbuf.data();
    let host: Box<[u8]> = c.head.host.map_or(&b""[..], |h| h.get(buf)).into();
    let own = url_hash(&host, origin_target(buf, &c.head));
    let exchange = CacheExchange::invalidating();
    let result = proxy(c, w, route, up, strip, Some(&exchange)).await;
    if result.is_err() || !(200..400).contains(&c.resp.status) {
        return result;
    }
    cache.invalidate(own);
    for value in exchange.locations.borrow().iter() {
        // Same-origin only (RFC 9111 §4.4): a path, or an absolute URL on the same host.
        let target = if value.starts_with(b"/") {
            Some(&value[..])
        } else {
            let rest = value
                .strip_prefix(b"http://")
                .or_else(|| value.strip_prefix(b"https://"));
            rest.and_then(|r| {
                let slash = r.iter().position(|&b| b == b'/').unwrap_or(r.len());
                r[..slash]
                    .eq_ignore_ascii_case(&host)
                    .then_some(&r[slash..])
            })
        };
        if let Some(t) = target.filter(|t| !t.is_empty()) {
            cache.invalidate(url_hash(&host, t));
        }
    }
    debug!("unsafe request invalidated its URL");
    result
}

/// Revalidates `entry` off the request path (stale-while-revalidate), once per URL at a time,
/// through the buffered upstream client. The request goes to the path the route forwards to
/// (after `strip_prefix`), like the request that stored the entry.
fn revalidate_in_background(
    w: &Rc<Worker>,
    cache: &WorkerCache,
    up: Rc<UpstreamState>,
    strip: Option<&[u8]>,
    entry: Arc<Entry>,
) {
    let key = entry.url ^ REVALIDATION;
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
    add_validators(&mut headers, entry);
    headers.extend_from_slice(b"x-cache-revalidation: 1\r\n");
    let request = client::Request {
        method: b"GET",
        target,
        host: &entry.host,
        headers: &headers,
    };
    let resp = fetch(w, up, entry.url, &request, cache.settings.max_entry_bytes).await?;
    let now = Instant::now();
    let rec = Recorded::from_head(&resp.raw_head, &resp.head);
    if resp.head.status == 304 {
        cache.insert(refreshed(entry, Some(rec), now));
        return Ok(());
    }
    // A new representation: store it if it is storable and was small enough to fetch whole.
    let Some(body) = resp.body else { return Ok(()) };
    if !policy::storable(&rec.facts(false)) {
        return Ok(());
    }
    let request = Request {
        url: entry.url,
        variant_names: Vec::new(),
        host: entry.host.clone(),
        target: entry.target.clone(),
        headers: Vec::new(),
    };
    let mut stored = new_entry(&request, rec, Bytes::from(body), now, entry.freshness);
    stored.variant = entry.variant;
    stored.vary = entry.vary.clone();
    stored.request_headers = entry.request_headers.clone();
    cache.insert(Arc::new(stored));
    Ok(())
}
