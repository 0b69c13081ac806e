//! The cache filters. `Cache`, on routes with `cache`: `on_request` answers from the worker's
//! cache when an entry is fresh (HIT), or stale within `stale-while-revalidate` (STALE; the
//! pipeline revalidates it in the background), waits for another request's fetch of the same
//! key (one per key on a worker at a time), or lets the request go upstream (MISS) with a
//! `CacheSlot` in the exchange; `on_upstream_request` adds the validators of a stale entry;
//! the response side records the upstream's head, copies a storable body and stores it once the
//! body is whole, before its last bytes go to the client (`CacheExchange`); `on_done` refreshes
//! the entry a 304 revalidated and asks the pipeline to answer from it. `Invalidate`, on routes
//! without `cache` while `[cache]` is on, and `Cache` for unsafe methods: an unsafe request
//! whose response head is not an error invalidates its URL (and its `Location` /
//! `Content-Location`) on every worker before the head goes to the client.
//!
//! The key is the URL, a partition and the variant headers. The partition holds what the
//! upstream hears about the request beyond its own headers: where the client addressed it
//! (scheme, port), and on a route with `auth` who is calling, so that a response the gateway
//! fetched for one consumer (whose identity it sent as `X-Consumer`) never answers another.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

mod key;

use super::{Ctx, Flow, RequestInfo};
use crate::auth::{Consumers, Identity};
use crate::body::Tee;
use crate::cache::policy::{self, CacheControl};
use crate::cache::record::{add_validators, new_entry, refreshed, Recorded, Request};
use crate::cache::{url_hash, variant_hash, Entry, WorkerCache};
use crate::config::Implicit;
use crate::config::RouteCache;
use crate::error::ProxyError;
use crate::http::{BodyLength, HeaderEdits, HeaderKind, Method, RequestHead, ResponseHead};
use crate::metrics::CacheOutcome;
use key::{Keyed, Keying};

/// How long a miss waits for another request's fetch of the same key before making its own.
const COALESCE_WAIT: Duration = Duration::from_secs(5);

pub struct Cache {
    policy: RouteCache,
    /// The longest wait for another request's fetch: `COALESCE_WAIT`, or less when the
    /// upstream's `request_timeout` is shorter.
    coalesce_wait: Duration,
    /// What the key holds beyond the URL and header values.
    keying: Keying,
}

/// What the cache phases keep about one request that went upstream.
pub struct CacheSlot {
    /// What the response side looks at.
    pub exchange: CacheExchange,
    /// The stale entry this request revalidates, if any.
    stale: Option<Arc<Entry>>,
    /// The flight this request leads, landed when it ends.
    flight: Option<u64>,
    /// Where `X-Cache: MISS` starts in the gateway's lines (dropped if a 304 revalidates).
    miss_line: usize,
}

/// What caching asks of one proxied exchange's response side.
pub struct CacheExchange {
    /// A stale entry is being revalidated: a 304 answers from it instead of reaching the client.
    pub revalidating: bool,
    pub not_modified: Cell<bool>,
    /// Conditional header lines for the upstream request.
    conditional: Vec<u8>,
    capture: Option<Capture>,
    /// For an unsafe request: the host and URL it invalidates if it succeeds.
    invalidates: Option<(Box<[u8]>, u64)>,
    /// The stale entry to answer with if the upstream fails, and the route's window for it.
    fallback: Option<(Arc<Entry>, Duration)>,
    /// The upstream answered 5xx and this fallback was taken instead (decided once, at the head:
    /// the 5xx is not forwarded, so the entry must answer even if its window closes meanwhile).
    failed_over: RefCell<Option<Arc<Entry>>>,
}

struct Capture {
    /// What storing the response needs from the request (read before its head is consumed).
    request: Request,
    tee: RefCell<Tee>,
    recorded: RefCell<Option<Recorded>>,
    authorized: bool,
    implicit: Implicit,
    max_entry: usize,
}

impl CacheExchange {
    fn new(capture: Option<Capture>) -> CacheExchange {
        CacheExchange {
            revalidating: false,
            not_modified: Cell::new(false),
            conditional: Vec::new(),
            capture,
            invalidates: None,
            fallback: None,
            failed_over: RefCell::new(None),
        }
    }

    /// The stale entry, if it may answer now that the upstream failed.
    fn fallback_now(&self) -> Option<&Arc<Entry>> {
        let (entry, window) = self.fallback.as_ref()?;
        entry
            .may_serve_on_error(Instant::now(), *window)
            .then_some(entry)
    }

    /// The upstream's final head, before the client sees anything: a 304 to a revalidation is
    /// recorded and taken over (the caller writes nothing; the pipeline answers from the
    /// refreshed entry), and so is a 5xx when a stale entry may answer instead
    /// (`stale-if-error`); a non-error answer to an unsafe request invalidates now, so no worker
    /// can serve the old entry once the client has the answer; anything else is noted for
    /// storing. Returns whether the response was taken over.
    pub fn on_upstream_response(
        &self,
        cache: Option<&WorkerCache>,
        buf: &[u8],
        resp: &ResponseHead,
    ) -> bool {
        if self.revalidating && resp.status == 304 {
            if let Some(cap) = &self.capture {
                *cap.recorded.borrow_mut() = Some(Recorded::from_head(buf, resp));
            }
            self.not_modified.set(true);
            return true;
        }
        if resp.status >= 500 {
            if let Some(entry) = self.fallback_now() {
                *self.failed_over.borrow_mut() = Some(Arc::clone(entry));
                return true;
            }
        }
        if let (Some((host, own)), Some(cache)) = (&self.invalidates, cache) {
            if (200..400).contains(&resp.status) {
                let locations = resp.headers.iter().filter_map(|h| {
                    let name = h.name.get(buf);
                    (name.eq_ignore_ascii_case(b"location")
                        || name.eq_ignore_ascii_case(b"content-location"))
                    .then(|| h.value.get(buf))
                });
                invalidate(cache, host, *own, locations);
            }
        }
        let Some(cap) = &self.capture else {
            return false;
        };
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
        false
    }

    /// The body observer: where the response body is copied, while it may still be stored.
    pub fn tee(&self) -> Option<&RefCell<Tee>> {
        self.capture
            .as_ref()
            .filter(|c| c.recorded.borrow().is_some() && !c.tee.borrow().overflowed)
            .map(|c| &c.tee)
    }

    /// The body arrived whole: stores the response if it was storable and copied whole (before
    /// its last bytes go to the client, so that every worker has it by the time the client
    /// can ask again). `arrived` is when the response head came.
    pub fn on_body_complete(&self, cache: Option<&WorkerCache>, arrived: Instant) {
        let (Some(cap), Some(cache)) = (&self.capture, cache) else {
            return;
        };
        if self.not_modified.get() {
            return;
        }
        let Some(rec) = cap.recorded.borrow_mut().take() else {
            return;
        };
        let mut tee = cap.tee.borrow_mut();
        if tee.overflowed {
            return;
        }
        let body = Bytes::from(std::mem::take(&mut tee.data));
        let entry = new_entry(&cap.request, rec, body, arrived, cap.implicit);
        cache.insert(Arc::new(entry));
    }
}

impl CacheSlot {
    /// For an unsafe request: nothing to store, only its URL to invalidate if it succeeds.
    pub fn invalidating(req: &RequestInfo<'_>) -> CacheSlot {
        let host = req.view.host();
        let mut exchange = CacheExchange::new(None);
        exchange.invalidates = Some((host.into(), url_hash(host, origin_target(req))));
        CacheSlot {
            exchange,
            stale: None,
            flight: None,
            miss_line: 0,
        }
    }
}

/// The request's path as the cache keys it; "/" for an empty one.
pub fn origin_target<'a>(req: &RequestInfo<'a>) -> &'a [u8] {
    let path = req.view.head.path.get(req.view.buf);
    if path.is_empty() {
        b"/"
    } else {
        path
    }
}

/// Every value of request header `name`, in order.
pub fn header_values<'a>(
    buf: &'a [u8],
    head: &'a RequestHead,
    name: &'a [u8],
) -> impl Iterator<Item = &'a [u8]> + 'a {
    head.headers
        .iter()
        .filter(move |h| h.name.get(buf).eq_ignore_ascii_case(name))
        .map(move |h| h.value.get(buf))
}

/// The request's facts a stored entry keeps, read before the head's buffer is reused.
fn request_facts(
    req: &RequestInfo<'_>,
    url: u64,
    key_headers: &[String],
    keyed: Keyed,
    who: Option<(&str, &Identity)>,
) -> Request {
    let (buf, head) = (req.view.buf, req.view.head);
    Request {
        url,
        partition: keyed.partition,
        replay: key::replay(req, who),
        authorized: keyed.authorized,
        variant_names: key_headers.iter().map(|h| h.as_bytes().into()).collect(),
        host: req.view.host().into(),
        target: origin_target(req).into(),
        headers: head
            .headers
            .iter()
            .filter(|h| h.kind != HeaderKind::Dropped)
            .map(|h| {
                (
                    h.name.get(buf).to_ascii_lowercase().into(),
                    h.value.get(buf).into(),
                )
            })
            .collect(),
    }
}

/// What the request asks of the cache.
struct Asked {
    cc: CacheControl,
    authorized: bool,
    conditional: bool,
}

fn asked(req: &RequestInfo<'_>) -> Asked {
    let mut a = Asked {
        cc: CacheControl::default(),
        authorized: false,
        conditional: false,
    };
    let buf = req.view.buf;
    for h in &req.view.head.headers {
        let name = h.name.get(buf);
        if name.eq_ignore_ascii_case(b"cache-control") || name.eq_ignore_ascii_case(b"pragma") {
            a.cc.add(h.value.get(buf));
        } else if name.eq_ignore_ascii_case(b"authorization") {
            a.authorized = true;
        } else if name.eq_ignore_ascii_case(b"if-none-match")
            || name.eq_ignore_ascii_case(b"if-modified-since")
        {
            a.conditional = true;
        }
    }
    a
}

impl Cache {
    /// `authenticated`: the route has `auth`, so every request that reaches the cache has an
    /// identity.
    pub fn new(
        policy: &RouteCache,
        request_timeout: Duration,
        authenticated: bool,
        consumers: &Rc<Consumers>,
    ) -> Cache {
        Cache {
            policy: policy.clone(),
            coalesce_wait: COALESCE_WAIT.min(request_timeout),
            keying: Keying::new(policy.per_consumer, authenticated, consumers),
        }
    }

    pub async fn on_request(
        &self,
        cx: &Ctx<'_>,
        req: &RequestInfo<'_>,
        lines: &mut Vec<u8>,
        slot: &mut Option<CacheSlot>,
        identity: Option<&Identity>,
    ) -> Result<Flow, ProxyError> {
        let Some(cache) = cx.cache else {
            return Ok(Flow::Continue);
        };
        let head = req.view.head;
        let method = head.method;
        let asked = asked(req);
        let directives = policy::request_directives(&asked.cc);
        let eligible =
            matches!(method, Method::Get | Method::Head) && head.body == BodyLength::None;
        let keyed = self
            .keying
            .keyed(req, asked.authorized, identity)
            .filter(|_| eligible && !directives.no_store);
        let Some(keyed) = keyed else {
            lines.extend_from_slice(b"x-cache: BYPASS\r\n");
            cx.metrics.borrow_mut().record_cache(CacheOutcome::Bypass);
            if !method.is_safe() {
                *slot = Some(CacheSlot::invalidating(req));
            }
            return Ok(Flow::Continue);
        };
        let url = url_hash(req.view.host(), origin_target(req));
        let variant_of = |vary: &[Box<[u8]>]| {
            let names = self.policy.key_headers.iter().map(String::as_bytes);
            variant_hash(
                keyed.partition,
                names.chain(vary.iter().map(|n| &n[..])),
                |n| header_values(req.view.buf, head, n),
            )
        };
        let now = Instant::now();
        let found = cache.get(url, |e| variant_of(&e.vary));
        if let Some(entry) = &found {
            if entry.is_fresh(now) && !directives.revalidate {
                return Ok(Flow::Cached(Arc::clone(entry), CacheOutcome::Hit));
            }
            if !directives.revalidate && entry.may_serve_stale(now) {
                return Ok(Flow::Cached(Arc::clone(entry), CacheOutcome::Stale));
            }
        }
        if directives.only_if_cached {
            return Err(ProxyError::NotCached);
        }

        // One fetch (or revalidation of a stale entry) per key on this worker at a time; the
        // others wait for it, bounded. A request that asked to revalidate goes itself.
        let flight_key = url ^ variant_of(&[]);
        let mut leading = false;
        if !directives.revalidate {
            let (flight, leader) = cache.flight(flight_key);
            leading = leader;
            if !leader {
                let _ = cx
                    .deadline
                    .within(self.coalesce_wait, flight.landed())
                    .await;
                let again = cache.get(url, |e| variant_of(&e.vary));
                if let Some(entry) = again.filter(|e| e.is_fresh(Instant::now())) {
                    return Ok(Flow::Cached(entry, CacheOutcome::Coalesced));
                }
            }
        }
        let who = identity.map(|i| (self.keying.name(i), i));
        let mut exchange = CacheExchange::new((method == Method::Get).then(|| Capture {
            request: request_facts(req, url, &self.policy.key_headers, keyed, who),
            tee: RefCell::new(Tee::new(cache.settings.max_entry_bytes)),
            recorded: RefCell::new(None),
            authorized: keyed.authorized,
            implicit: self.policy.implicit,
            max_entry: cache.settings.max_entry_bytes,
        }));
        if let Some(entry) = found.as_ref().filter(|_| !asked.conditional) {
            if entry.etag.is_some() || entry.last_modified.is_some() {
                add_validators(&mut exchange.conditional, entry);
                exchange.revalidating = true;
            }
        }
        if !directives.revalidate {
            exchange.fallback = found.clone().map(|e| (e, self.policy.serve_stale_on_error));
        }
        let miss_line = lines.len();
        lines.extend_from_slice(b"x-cache: MISS\r\n");
        *slot = Some(CacheSlot {
            exchange,
            stale: found,
            flight: leading.then_some(flight_key),
            miss_line,
        });
        Ok(Flow::Continue)
    }

    /// The validators of the stale entry being revalidated.
    pub fn on_upstream_request(slot: Option<&CacheSlot>, edits: &mut HeaderEdits) {
        if let Some(s) = slot {
            edits.append_lines(&s.exchange.conditional);
        }
    }
}

/// `Invalidate::on_request`: an unsafe request may change what its URL returns.
pub fn invalidate_on_request(req: &RequestInfo<'_>, slot: &mut Option<CacheSlot>) {
    if !req.view.head.method.is_safe() {
        *slot = Some(CacheSlot::invalidating(req));
    }
}

/// However the exchange ended: answer from the stale entry if the upstream failed (`origin_failed`:
/// before any of the response was sent) or answered 5xx, and the entry allows it; refresh the
/// entry a 304 revalidated (and answer from it: `Flow::Cached`); count a miss; and land the
/// flight this request led, after storing, so that its waiters find the entry.
pub fn on_done(
    cx: &Ctx<'_>,
    slot: &mut Option<CacheSlot>,
    origin_failed: bool,
    lines: &mut Vec<u8>,
) -> Flow {
    let (Some(s), Some(cache)) = (slot.take(), cx.cache) else {
        return Flow::Continue;
    };
    let fallback = s.exchange.failed_over.take().or_else(|| {
        origin_failed
            .then(|| s.exchange.fallback_now().cloned())
            .flatten()
    });
    let flow = if s.exchange.invalidates.is_some() {
        Flow::Continue
    } else if let Some(entry) = fallback {
        lines.truncate(s.miss_line);
        Flow::Cached(entry, CacheOutcome::StaleIfError)
    } else if let Some(stale) = s.stale.filter(|_| s.exchange.not_modified.get()) {
        let rec = s
            .exchange
            .capture
            .as_ref()
            .and_then(|c| c.recorded.borrow_mut().take());
        let fresh = refreshed(&stale, rec, Instant::now());
        cache.insert(Arc::clone(&fresh));
        lines.truncate(s.miss_line);
        Flow::Cached(fresh, CacheOutcome::Revalidated)
    } else {
        cx.metrics.borrow_mut().record_cache(CacheOutcome::Miss);
        Flow::Continue
    };
    if let Some(key) = s.flight {
        cache.land(key);
    }
    flow
}

/// Invalidates `own` and the same-origin URLs in `locations` (RFC 9111 §4.4: a path, or an
/// absolute URL on the same host), here and on every other worker.
fn invalidate<'a>(
    cache: &WorkerCache,
    host: &[u8],
    own: u64,
    locations: impl Iterator<Item = &'a [u8]>,
) {
    let mut urls = vec![own];
    for value in locations {
        let target = if value.starts_with(b"/") {
            Some(value)
        } else {
            let rest = value
                .strip_prefix(b"http://")
                .or_else(|| value.strip_prefix(b"https://"));
            rest.and_then(|r| {
                let slash = r.iter().position(|&b| b == b'/').unwrap_or(r.len());
                r[..slash].eq_ignore_ascii_case(host).then_some(&r[slash..])
            })
        };
        if let Some(t) = target.filter(|t| !t.is_empty()) {
            urls.push(url_hash(host, t));
        }
    }
    cache.invalidate(&urls);
    tracing::debug!("unsafe request invalidated its URL");
}
