//! The cache filters. `Cache`, on routes with `cache`: `on_request` answers from the worker's
//! cache when an entry is fresh (HIT), or stale within `stale-while-revalidate` (STALE; a
//! background revalidation starts), waits for another request's fetch of the same key (one
//! per key on a worker at a time), or lets the request go upstream (MISS) with a `CacheSlot`;
//! `on_upstream_request` adds the validators of a stale entry; `on_upstream_response` records
//! the upstream's head (as the filters before it edited it), or replaces it: a 304 that
//! revalidated a stale entry by the refreshed entry, a 5xx by a stale entry that may stand in;
//! `on_body` copies a storable body and stores it at its end, before its last bytes go to the
//! client; `on_done` answers from a stale entry if the upstream failed, counts the miss and
//! lands the flight. `Invalidate`, on routes without `cache` while `[cache]` is on, and `Cache`
//! for unsafe methods: an unsafe request whose response head is not an error invalidates its
//! URL (and its `Location` / `Content-Location`) on every worker before the head goes to the
//! client. Answers are `Reply`s (`answer`), written like any other.
//!
//! The key is the URL, a partition and the variant headers. The partition holds what the
//! upstream hears about the request beyond its own headers: where the client addressed it
//! (scheme, port), and on a route with `auth` who is calling, so that a response the gateway
//! fetched for one consumer (whose identity it sent as `X-Consumer`) never answers another.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

mod answer;
mod key;

use super::{
    compress, BodyStep, Ctx, Done, Flow, RequestInfo, ResponseOut, ResponseView, Slot, SlotRef,
};
use crate::auth::{Consumers, Identity};
use crate::cache::policy;
use crate::cache::record::{add_validators, new_entry, refreshed, Recorded, Request};
use crate::cache::{url_hash, variant_hash, Entry, WorkerCache};
use crate::config::{Coding, Implicit, Route, RouteCache};
use crate::error::ProxyError;
use crate::http::{BodyLength, HeaderEdits, HeaderKind, Method, RequestHead, ResponseHead};
use crate::metrics::CacheOutcome;
use crate::upstream::UpstreamState;
use answer::Asked;
use key::{Keyed, Keying};

/// How long a miss waits for another request's fetch of the same key before making its own.
const COALESCE_WAIT: Duration = Duration::from_secs(5);
/// Flights for background revalidation are keyed apart from fetches for misses.
const REVALIDATION: u64 = 0x9e37_79b9_7f4a_7c15;

pub struct Cache {
    policy: RouteCache,
    /// The longest wait for another request's fetch: `COALESCE_WAIT`, or less when the
    /// upstream's `request_timeout` is shorter.
    coalesce_wait: Duration,
    /// What the key holds beyond the URL and header values.
    keying: Keying,
    /// Where a background revalidation goes: the route's upstream, and the prefix it strips.
    upstream: Rc<UpstreamState>,
    strip_prefix: Option<Box<[u8]>>,
    /// The route compresses with these: `Accept-Encoding` is keyed by the coding negotiated
    /// (one entry per coding, not per header spelling).
    codings: Option<Box<[Coding]>>,
}

/// The values of request header `name` as the key sees them: for `Accept-Encoding` on a
/// compressing route, the coding negotiated.
enum Values<'a, I> {
    Header(I),
    Coding(Option<&'a [u8]>),
}

impl<'a, I: Iterator<Item = &'a [u8]>> Iterator for Values<'a, I> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            Values::Header(i) => i.next(),
            Values::Coding(c) => c.take(),
        }
    }
}

/// A background revalidation of an entry answered STALE, for the worker to run (`Background`).
pub struct Revalidation {
    pub upstream: Rc<UpstreamState>,
    /// The path asked for (after `strip_prefix`), as for the request that stored the entry.
    pub target: Box<[u8]>,
    pub entry: Arc<Entry>,
    /// The flight it leads (one per entry at a time), landed when it ends.
    pub flight: u64,
}

/// What the cache filters keep about one request that went upstream.
pub struct CacheSlot {
    /// The stale entry found for the request, if any: revalidated by it, or standing in.
    stale: Option<Arc<Entry>>,
    /// The flight this request leads, landed when it ends.
    flight: Option<u64>,
    /// Where `X-Cache: MISS` starts in the gateway's lines (dropped if an entry answers).
    miss_line: usize,
    /// A stale entry is being revalidated: a 304 answers from it.
    revalidating: bool,
    /// Conditional header lines for the upstream request.
    conditional: Vec<u8>,
    capture: Option<Capture>,
    /// For an unsafe request: the host and URL it invalidates if it succeeds.
    invalidates: Option<(Box<[u8]>, u64)>,
    /// The stale entry to answer with if the upstream fails, and the route's window for it.
    fallback: Option<(Arc<Entry>, Duration)>,
    /// An entry answered instead of the upstream's response: no miss to count.
    answered: bool,
    /// On a compressing route, the coding the key holds: a response in another is not stored.
    coding: Option<&'static [u8]>,
}

struct Capture {
    /// What storing the response needs from the request (read before its head is consumed).
    request: Request,
    /// The body so far, while it may still be stored.
    tee: Vec<u8>,
    /// Not stored after all: not storable, or over `max_entry`.
    given_up: bool,
    recorded: Option<Recorded>,
    /// When the response head arrived.
    arrived: Instant,
    authorized: bool,
    implicit: Implicit,
    max_entry: usize,
}

impl CacheSlot {
    fn new(capture: Option<Capture>) -> CacheSlot {
        CacheSlot {
            stale: None,
            flight: None,
            miss_line: 0,
            revalidating: false,
            conditional: Vec::new(),
            capture,
            invalidates: None,
            fallback: None,
            answered: false,
            coding: None,
        }
    }

    /// For an unsafe request: nothing to store, only its URL to invalidate if it succeeds.
    pub fn invalidating(req: &RequestInfo<'_>) -> CacheSlot {
        let host = req.view.host();
        let mut slot = CacheSlot::new(None);
        slot.invalidates = Some((host.into(), url_hash(host, origin_target(req))));
        slot
    }

    /// The stale entry, if it may answer now that the upstream failed.
    fn fallback_now(&self) -> Option<Arc<Entry>> {
        let (entry, window) = self.fallback.as_ref()?;
        entry
            .may_serve_on_error(Instant::now(), *window)
            .then(|| Arc::clone(entry))
    }

    /// Answers from `entry` instead of the upstream's response.
    fn answer(
        &mut self,
        cx: &Ctx<'_>,
        entry: &Entry,
        outcome: CacheOutcome,
        asked: Option<&Asked<'_>>,
        lines: &mut Vec<u8>,
    ) -> Flow {
        self.answered = true;
        lines.truncate(self.miss_line);
        cx.metrics.borrow_mut().record_cache(outcome);
        Flow::Reply(answer::reply(entry, outcome, asked, lines, Instant::now()))
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
    coding: Option<&[u8]>,
) -> Request {
    let (buf, head) = (req.view.buf, req.view.head);
    let mut request = Request {
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
    };
    if let Some(c) = coding {
        request
            .headers
            .retain(|(n, _)| &n[..] != b"accept-encoding");
        request
            .headers
            .push((b"accept-encoding"[..].into(), c.into()));
    }
    request
}

/// The content coding of the response as the filters before the cache left it.
fn final_coding<'a>(buf: &'a [u8], head: &'a ResponseHead, edits: &'a HeaderEdits) -> &'a [u8] {
    let set = edits
        .appended()
        .split_inclusive(|&b| b == b'\n')
        .find_map(|line| {
            let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
            name.eq_ignore_ascii_case(b"content-encoding")
                .then(|| value[1..].trim_ascii())
        });
    set.or_else(|| {
        head.headers
            .iter()
            .find(|h| h.name.get(buf).eq_ignore_ascii_case(b"content-encoding"))
            .map(|h| h.value.get(buf).trim_ascii())
    })
    .unwrap_or(b"identity")
}

impl Cache {
    /// `authenticated`: the route has `auth`, so every request that reaches the cache has an
    /// identity.
    pub fn new(
        policy: &RouteCache,
        route: &Route,
        upstream: Rc<UpstreamState>,
        authenticated: bool,
        consumers: &Rc<Consumers>,
    ) -> Cache {
        Cache {
            policy: policy.clone(),
            coalesce_wait: COALESCE_WAIT.min(upstream.request_timeout),
            keying: Keying::new(policy.per_consumer, authenticated, consumers),
            upstream,
            strip_prefix: route.strip_prefix.as_ref().map(|p| p.as_bytes().into()),
            codings: route
                .compression
                .as_ref()
                .map(|c| c.algorithms.as_slice().into()),
        }
    }

    pub async fn on_request(
        &self,
        cx: &Ctx<'_>,
        req: &RequestInfo<'_>,
        lines: &mut Vec<u8>,
        slot: SlotRef<'_>,
        identity: Option<&Identity>,
    ) -> Result<Flow, ProxyError> {
        let Some(cache) = cx.cache else {
            return Ok(Flow::Continue);
        };
        let head = req.view.head;
        let method = head.method;
        let asked = Asked::read(req);
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
                slot.set(Slot::Cache(Box::new(CacheSlot::invalidating(req))));
            }
            return Ok(Flow::Continue);
        };
        let url = url_hash(req.view.host(), origin_target(req));
        let coding = self.codings.as_ref().map(|algorithms| {
            let accept = header_values(req.view.buf, head, b"accept-encoding");
            compress::negotiate(accept, algorithms)
                .map_or(&b"identity"[..], |c| c.token().as_bytes())
        });
        let variant_of = |vary: &[Box<[u8]>]| {
            let names = self.policy.key_headers.iter().map(String::as_bytes);
            variant_hash(
                keyed.partition,
                names.chain(vary.iter().map(|n| &n[..])),
                |n| match coding {
                    Some(c) if n.eq_ignore_ascii_case(b"accept-encoding") => {
                        Values::Coding(Some(c))
                    }
                    _ => Values::Header(header_values(req.view.buf, head, n)),
                },
            )
        };
        let now = Instant::now();
        let found = cache.get(url, |e| variant_of(&e.vary));
        if let Some(entry) = &found {
            if entry.is_fresh(now) && !directives.revalidate {
                return Ok(self.hit(cx, &asked, entry, CacheOutcome::Hit, lines, now));
            }
            if !directives.revalidate && entry.may_serve_stale(now) {
                self.revalidate_in_background(cx, cache, entry);
                return Ok(self.hit(cx, &asked, entry, CacheOutcome::Stale, lines, now));
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
                    return Ok(self.hit(
                        cx,
                        &asked,
                        &entry,
                        CacheOutcome::Coalesced,
                        lines,
                        Instant::now(),
                    ));
                }
            }
        }
        let who = identity.map(|i| (self.keying.name(i), i));
        let mut s = CacheSlot::new((method == Method::Get).then(|| Capture {
            request: request_facts(req, url, &self.policy.key_headers, keyed, who, coding),
            tee: Vec::new(),
            given_up: false,
            recorded: None,
            arrived: now,
            authorized: keyed.authorized,
            implicit: self.policy.implicit,
            max_entry: cache.settings.max_entry_bytes,
        }));
        if let Some(entry) = found.as_ref().filter(|_| !asked.conditional) {
            if entry.etag.is_some() || entry.last_modified.is_some() {
                add_validators(&mut s.conditional, entry);
                s.revalidating = true;
            }
        }
        if !directives.revalidate {
            s.fallback = found.clone().map(|e| (e, self.policy.serve_stale_on_error));
        }
        s.miss_line = lines.len();
        lines.extend_from_slice(b"x-cache: MISS\r\n");
        s.stale = found;
        s.flight = leading.then_some(flight_key);
        s.coding = coding;
        slot.set(Slot::Cache(Box::new(s)));
        Ok(Flow::Continue)
    }

    /// Answers from `entry` before the upstream is asked.
    #[inline(always)]
    fn hit(
        &self,
        cx: &Ctx<'_>,
        asked: &Asked<'_>,
        entry: &Entry,
        outcome: CacheOutcome,
        lines: &mut Vec<u8>,
        now: Instant,
    ) -> Flow {
        cx.metrics.borrow_mut().record_cache(outcome);
        Flow::Reply(answer::reply(entry, outcome, Some(asked), lines, now))
    }

    /// Starts revalidating `entry` off the request path (stale-while-revalidate), once per entry
    /// at a time: the request goes to the path the route forwards to (after `strip_prefix`),
    /// like the request that stored the entry.
    fn revalidate_in_background(&self, cx: &Ctx<'_>, cache: &WorkerCache, entry: &Arc<Entry>) {
        // One per entry: each consumer's entry for a URL is refreshed as that consumer.
        let flight = entry.url ^ entry.variant.wrapping_mul(REVALIDATION);
        if !cache.flight(flight).1 {
            return;
        }
        let (slash, rest) =
            crate::http::write::upstream_path(&entry.target, self.strip_prefix.as_deref());
        cx.background.revalidate(Revalidation {
            upstream: Rc::clone(&self.upstream),
            target: [slash, rest].concat().into(),
            entry: Arc::clone(entry),
            flight,
        });
    }
}

/// The validators of the stale entry being revalidated.
pub fn on_upstream_request(slot: Option<&Slot>, edits: &mut HeaderEdits) {
    if let Some(Slot::Cache(s)) = slot {
        edits.append_lines(&s.conditional);
    }
}

/// `Invalidate::on_request`: an unsafe request may change what its URL returns.
pub fn invalidate_on_request(req: &RequestInfo<'_>, slot: SlotRef<'_>) {
    if !req.view.head.method.is_safe() {
        slot.set(Slot::Cache(Box::new(CacheSlot::invalidating(req))));
    }
}

/// The upstream's final head, before the client sees anything: a 304 to a revalidation
/// refreshes the stale entry, which answers instead; so does a stale entry for a 5xx when it
/// may (`stale-if-error`); a non-error answer to an unsafe request invalidates now, so no
/// worker can serve the old entry once the client has the answer; anything else is recorded
/// for storing, as the filters before the cache left it (`out.edits`).
pub fn on_upstream_response(
    cx: &Ctx<'_>,
    slot: &mut Slot,
    resp: ResponseView<'_>,
    out: &mut ResponseOut<'_>,
) -> Flow {
    let (Slot::Cache(s), Some(cache)) = (slot, cx.cache) else {
        return Flow::Continue;
    };
    let (buf, head) = (resp.buf, resp.head);
    if s.revalidating && head.status == 304 {
        if let Some(stale) = s.stale.take() {
            let rec = Recorded::from_edited(buf, head, out.edits);
            let fresh = refreshed(&stale, Some(rec), Instant::now());
            cache.insert(Arc::clone(&fresh));
            return s.answer(cx, &fresh, CacheOutcome::Revalidated, None, out.lines);
        }
    }
    if head.status >= 500 {
        if let Some(entry) = s.fallback_now() {
            return s.answer(cx, &entry, CacheOutcome::StaleIfError, None, out.lines);
        }
    }
    if let Some((host, own)) = &s.invalidates {
        if (200..400).contains(&head.status) {
            let locations = head.headers.iter().filter_map(|h| {
                let name = h.name.get(buf);
                (name.eq_ignore_ascii_case(b"location")
                    || name.eq_ignore_ascii_case(b"content-location"))
                .then(|| h.value.get(buf))
            });
            invalidate(cache, host, *own, locations);
        }
    }
    let Some(cap) = &mut s.capture else {
        return Flow::Continue;
    };
    let rec = Recorded::from_edited(buf, head, out.edits);
    let fits = match head.body {
        BodyLength::Length(n) if !out.reframes => n <= cap.max_entry as u64,
        _ => true,
    };
    // Keyed by a coding, an entry must be in it (an upstream may encode on its own).
    let coded = s
        .coding
        .is_none_or(|c| final_coding(buf, head, out.edits).eq_ignore_ascii_case(c));
    if fits && coded && policy::storable(&rec.facts(cap.authorized)) {
        cap.recorded = Some(rec);
        cap.arrived = Instant::now();
    } else {
        cap.given_up = true;
    }
    Flow::Continue
}

/// The response body: copied while it may be stored, and stored at its end (before its last
/// bytes go to the client, so that every worker has it by the time the client can ask again).
pub fn on_body(cx: &Ctx<'_>, slot: &mut Slot, step: BodyStep<'_>) {
    let Slot::Cache(s) = slot else {
        return;
    };
    let Some(cap) = &mut s.capture else {
        return;
    };
    if cap.given_up || cap.recorded.is_none() {
        return;
    }
    match step {
        BodyStep::Data(data) if cap.tee.len() + data.len() > cap.max_entry => {
            cap.given_up = true;
            cap.tee = Vec::new();
        }
        BodyStep::Data(data) => cap.tee.extend_from_slice(data),
        BodyStep::Flush => {}
        BodyStep::End => {
            let (Some(cache), Some(rec)) = (cx.cache, cap.recorded.take()) else {
                return;
            };
            let body = Bytes::from(std::mem::take(&mut cap.tee));
            let entry = new_entry(&cap.request, rec, body, cap.arrived, cap.implicit);
            cache.insert(Arc::new(entry));
        }
    }
}

/// However the exchange ended: a stale entry answers if the upstream failed before any of the
/// response was sent and the entry allows it; a miss is counted; and the flight this request
/// led lands, after storing, so that its waiters find the entry.
pub fn on_done(cx: &Ctx<'_>, slot: &mut Slot, done: &Done<'_>, lines: &mut Vec<u8>) -> Flow {
    let (Slot::Cache(mut s), Some(cache)) = (std::mem::take(slot), cx.cache) else {
        return Flow::Continue;
    };
    let flow = if s.invalidates.is_some() || s.answered {
        Flow::Continue
    } else if let Some(entry) = s.fallback_now().filter(|_| done.origin_failed) {
        let asked = done.request.as_ref().map(Asked::read);
        s.answer(
            cx,
            &entry,
            CacheOutcome::StaleIfError,
            asked.as_ref(),
            lines,
        )
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
