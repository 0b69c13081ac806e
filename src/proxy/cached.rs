//! The cache phase of a proxied request, for routes with `cache`: answer from the worker's
//! cache when an entry is fresh (HIT, or 304 for a matching conditional request), answer stale
//! within `stale-while-revalidate` and revalidate in the background (STALE), revalidate a
//! stale entry with a conditional request, or forward (MISS) — one request per key at a time on
//! a worker — and store what comes back if RFC 9111 allows. Unsafe requests that succeed
//! invalidate their URL (and `Location` / `Content-Location`) on every worker.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use monoio::io::AsyncWriteRentExt;
use tracing::debug;

use super::{acquire, proxy, send, write_out, Client, Failure, Next};
use crate::body::Tee;
use crate::cache::policy::{self, CacheControl, ResponseFacts};
use crate::cache::{url_hash, variant_hash, Entry, WorkerCache};
use crate::config::{RouteCache, UpstreamId};
use crate::error::ProxyError;
use crate::http::write::{copy_lines, reason_phrase};
use crate::http::{parse_response, BodyLength, HeaderKind, Method, ResponseHead, Version};
use crate::metrics::CacheOutcome;
use crate::upstream::UpstreamState;
use crate::worker::{RouteEntry, Worker};

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

/// What a response head says about caching it.
struct Recorded {
    status: u16,
    reason: Box<[u8]>,
    /// The header lines to replay from the cache.
    head: Vec<u8>,
    cc: CacheControl,
    expires: Option<SystemTime>,
    date: Option<SystemTime>,
    age: Duration,
    etag: Option<Box<[u8]>>,
    last_modified: Option<(SystemTime, Box<[u8]>)>,
    vary: Vec<Box<[u8]>>,
    vary_star: bool,
    set_cookie: bool,
}

impl Recorded {
    fn from_head(buf: &[u8], resp: &ResponseHead) -> Recorded {
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

    fn facts(&self, authorized: bool) -> ResponseFacts<'_> {
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

type HeaderValue = (Box<[u8]>, Box<[u8]>);

/// The request's facts a stored entry keeps, read before the head's buffer is reused.
struct Request {
    url: u64,
    variant_names: Vec<Box<[u8]>>,
    host: Box<[u8]>,
    target: Box<[u8]>,
    /// The request's headers (lower-cased names) any variant may depend on.
    headers: Vec<HeaderValue>,
}

impl Request {
    fn of(c: &Client<'_>, url: u64, key_headers: &[String]) -> Request {
        let buf = c.rbuf.data();
        Request {
            url,
            variant_names: key_headers.iter().map(|h| h.as_bytes().into()).collect(),
            host: c.head.host.map_or(&b""[..], |h| h.get(buf)).into(),
            target: origin_target(c).into(),
            headers: c
                .head
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

    fn value(&self, name: &[u8]) -> &[u8] {
        self.headers
            .iter()
            .find(|(n, _)| **n == *name)
            .map_or(&b""[..], |(_, v)| v)
    }

    fn variant(&self, vary: &[Box<[u8]>]) -> u64 {
        variant_hash(self.variant_names.iter().chain(vary).map(|n| &n[..]), |n| {
            self.value(n)
        })
    }
}

/// The value of request header `name` (lower-case), or empty.
fn header<'a>(c: &'a Client<'_>, name: &[u8]) -> &'a [u8] {
    let buf = c.rbuf.data();
    c.head
        .headers
        .iter()
        .find(|h| h.name.get(buf).eq_ignore_ascii_case(name))
        .map_or(&b""[..], |h| h.value.get(buf))
}

fn origin_target<'a>(c: &'a Client<'_>) -> &'a [u8] {
    let path = c.head.path.get(c.rbuf.data());
    if path.is_empty() {
        b"/"
    } else {
        path
    }
}

pub(super) async fn proxy_cached(
    c: &mut Client<'_>,
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
        c.extra.extend_from_slice(b"x-cache: BYPASS\r\n");
        w.metrics.borrow_mut().record_cache(CacheOutcome::Bypass);
        if method.is_safe() {
            return proxy(c, w, route, up, strip, None).await;
        }
        let urls = urls_of(c);
        let exchange = CacheExchange::invalidating();
        let result = proxy(c, w, route, up, strip, Some(&exchange)).await;
        invalidate_after(c, cache, urls, &exchange, &result);
        return result;
    }

    let host = c.head.host.map_or(&b""[..], |h| h.get(c.rbuf.data()));
    let url = url_hash(host, origin_target(c));
    let variant_of = |c: &Client<'_>, vary: &[Box<[u8]>]| {
        let names = policy.key_headers.iter().map(String::as_bytes);
        variant_hash(names.chain(vary.iter().map(|n| &n[..])), |n| header(c, n))
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
            revalidate_in_background(w, cache, up.id, Arc::clone(entry));
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
    let request = Request::of(c, url, &policy.key_headers);
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
    let extra_len = c.extra.len();
    c.extra.extend_from_slice(b"x-cache: MISS\r\n");
    let result = proxy(c, w, route, up, strip, Some(&exchange)).await;
    if exchange.not_modified.get() {
        if let Some(stale) = found {
            let rec = exchange
                .capture
                .as_ref()
                .and_then(|c| c.recorded.borrow_mut().take());
            let fresh = refreshed(&stale, rec, Instant::now());
            cache.insert(Arc::clone(&fresh));
            c.extra.truncate(extra_len);
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

fn new_entry(
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
fn refreshed(stale: &Entry, rec: Option<Recorded>, now: Instant) -> Arc<Entry> {
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

fn add_validators(out: &mut Vec<u8>, entry: &Entry) {
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

/// Whether the client's own conditional request is satisfied by `entry` (RFC 9110 §13.2.2:
/// If-None-Match wins over If-Modified-Since).
fn not_modified_for(c: &Client<'_>, entry: &Entry) -> bool {
    let inm = header(c, b"if-none-match");
    if !inm.is_empty() {
        return entry
            .etag
            .as_ref()
            .is_some_and(|etag| policy::if_none_match_matches(inm, etag));
    }
    let ims = header(c, b"if-modified-since");
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
async fn serve_entry(
    c: &mut Client<'_>,
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
    let not_modified = head_pending && not_modified_for(c, entry);
    let to_head = c.head.method == Method::Head;
    let keep = c.head.keep_alive && !w.draining.get();
    let version = c.head.version;
    if head_pending {
        c.rbuf.consume(c.head.len);
    }
    let status = if not_modified { 304 } else { entry.status };
    let out = &mut c.out;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    if not_modified {
        out.extend_from_slice(reason_phrase(304).as_bytes());
        out.extend_from_slice(b"\r\n");
        for line in entry.head.split_inclusive(|&b| b == b'\n') {
            let name = line.split(|&b| b == b':').next().unwrap_or_default();
            if keep_in_304(name) {
                out.extend_from_slice(line);
            }
        }
    } else {
        out.extend_from_slice(&entry.reason);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&entry.head);
    }
    out.extend_from_slice(b"age: ");
    out.extend_from_slice(
        itoa::Buffer::new()
            .format(entry.age(now).as_secs())
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\nx-cache: ");
    out.extend_from_slice(state);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&c.extra);
    out.extend_from_slice(b"x-request-id: ");
    out.extend_from_slice(&c.request_id);
    out.extend_from_slice(b"\r\n");
    if !not_modified && status != 204 {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(entry.body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::Http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let with_body = !not_modified && !to_head && !entry.body.is_empty();
    let copy = with_body && entry.body.len() <= COPY_BODY_BYTES;
    if copy {
        out.extend_from_slice(&entry.body);
    }
    c.log.status = status;
    c.log.bytes_in = c.head.len as u64;
    let sent = out.len()
        + if with_body && !copy {
            entry.body.len()
        } else {
            0
        };
    c.log.bytes_out.set(sent as u64);
    w.metrics.borrow_mut().record_cache(outcome);
    let limit = w.limits.write_timeout;
    send(&mut c.w, &mut c.out, &c.deadline, limit)
        .await
        .map_err(|_| Failure::Abort)?;
    if with_body && !copy {
        let body = entry.body.clone();
        match c.deadline.within(limit, c.w.write_all(body)).await {
            Ok((Ok(_), _)) => {}
            _ => return Err(Failure::Abort),
        }
    }
    Ok(if keep { Next::KeepAlive } else { Next::Close })
}

/// The URLs an unsafe request may change: its own, and its `Location` / `Content-Location`
/// are added once the response is known.
pub(super) struct Urls {
    host: Box<[u8]>,
    own: u64,
}

pub(super) fn urls_of(c: &Client<'_>) -> Urls {
    let host = c.head.host.map_or(&b""[..], |h| h.get(c.rbuf.data()));
    Urls {
        host: host.into(),
        own: url_hash(host, origin_target(c)),
    }
}

/// After an unsafe request: if it succeeded, its URL and the ones its response names are
/// invalidated here and on every other worker.
pub(super) fn invalidate_after(
    c: &Client<'_>,
    cache: &WorkerCache,
    urls: Urls,
    exchange: &CacheExchange,
    result: &Result<Next, Failure>,
) {
    if result.is_err() || !(200..400).contains(&c.resp.status) {
        return;
    }
    cache.invalidate(urls.own);
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
                    .eq_ignore_ascii_case(&urls.host)
                    .then_some(&r[slash..])
            })
        };
        if let Some(t) = target.filter(|t| !t.is_empty()) {
            cache.invalidate(url_hash(&urls.host, t));
        }
    }
    debug!("unsafe request invalidated its URL");
}

/// Revalidates `entry` off the request path (stale-while-revalidate), once per URL at a time.
fn revalidate_in_background(
    w: &Rc<Worker>,
    cache: &WorkerCache,
    upstream: UpstreamId,
    entry: Arc<Entry>,
) {
    let key = entry.url ^ REVALIDATION;
    let (_, leader) = cache.flight(key);
    if !leader {
        return;
    }
    let w = Rc::clone(w);
    monoio::spawn(async move {
        if let Err(e) = background_fetch(&w, upstream, &entry).await {
            debug!(error = ?e, "background revalidation failed");
        }
        if let Some(cache) = &w.cache {
            cache.land(key);
        }
    });
}

async fn background_fetch(
    w: &Worker,
    upstream: UpstreamId,
    entry: &Entry,
) -> Result<(), ProxyError> {
    let Some(cache) = &w.cache else { return Ok(()) };
    let up = w.upstream(upstream);
    let deadline = w.deadlines.slot();
    let (lease, mut conn) = acquire(up, w, entry.url, &deadline).await?;
    let mut req = Vec::with_capacity(256);
    req.extend_from_slice(b"GET ");
    req.extend_from_slice(&entry.target);
    req.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    req.extend_from_slice(&entry.host);
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(&entry.request_headers);
    add_validators(&mut req, entry);
    req.extend_from_slice(b"x-cache-revalidation: 1\r\n\r\n");
    let limits = &w.limits;
    let max_head = limits.max_request_line_bytes + limits.max_header_bytes;
    let mut resp = ResponseHead::default();
    let exchange = async {
        write_out(&mut conn.w, &mut req)
            .await
            .map_err(|_| ProxyError::UpstreamUnreachable("write failed"))?;
        loop {
            if !conn.rbuf.is_empty()
                && parse_response(
                    conn.rbuf.data(),
                    false,
                    max_head,
                    limits.max_headers,
                    &mut resp,
                )
                .map_err(|_| ProxyError::UpstreamInvalid("unparsable response head"))?
                && resp.status >= 200
            {
                return Ok(());
            }
            match conn.rbuf.fill(&mut conn.r, max_head + 1).await {
                Ok(n) if n > 0 => {}
                _ => return Err(ProxyError::UpstreamUnreachable("closed before responding")),
            }
        }
    };
    deadline
        .within(up.request_timeout, exchange)
        .await
        .map_err(|_| ProxyError::UpstreamTimeout)??;
    let now = Instant::now();
    let rec = Recorded::from_head(conn.rbuf.data(), &resp);
    conn.rbuf.consume(resp.len);
    let request = Request {
        url: entry.url,
        variant_names: Vec::new(),
        host: entry.host.clone(),
        target: entry.target.clone(),
        headers: Vec::new(),
    };
    if resp.status == 304 {
        cache.insert(refreshed(entry, Some(rec), now));
        if resp.keep_alive {
            up.checkin(lease.target, conn, w.now());
        }
        return Ok(());
    }
    // A new representation: store it if it is storable and small enough to fetch whole.
    let BodyLength::Length(n) = resp.body else {
        return Ok(());
    };
    if n > cache.settings.max_entry_bytes as u64 || !policy::storable(&rec.facts(false)) {
        return Ok(());
    }
    let mut body = Vec::with_capacity(n as usize);
    let fetch = async {
        while (body.len() as u64) < n {
            let take = conn.rbuf.len().min(n as usize - body.len());
            body.extend_from_slice(&conn.rbuf.data()[..take]);
            conn.rbuf.consume(take);
            if (body.len() as u64) < n
                && !matches!(conn.rbuf.fill(&mut conn.r, 64 * 1024).await, Ok(k) if k > 0)
            {
                return false;
            }
        }
        true
    };
    if matches!(deadline.within(up.request_timeout, fetch).await, Ok(true)) {
        let mut stored = new_entry(&request, rec, Bytes::from(body), now, entry.freshness);
        stored.variant = entry.variant;
        stored.vary = entry.vary.clone();
        stored.request_headers = entry.request_headers.clone();
        cache.insert(Arc::new(stored));
    }
    Ok(())
}
