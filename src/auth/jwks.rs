//! Remote key sets (`jwks = { upstream, path }`): fetched by one worker for the whole process,
//! through the buffered upstream client (so the upstream's TLS, timeouts and pools apply),
//! and handed to every worker read-only as an `Arc<KeySet>`.
//!
//! - Refreshed every `refresh_s`; a failed fetch keeps the keys there are (stale-if-error),
//!   logs, counts, and is tried again within `RETRY`.
//! - A token with a `kid` no key has makes its worker ask for a refetch (one question per
//!   worker at a time). The fetcher fetches at most once per `REFETCH_EVERY` for such asks
//!   (single-flight: asks that arrive while a fetch runs are answered by it) and refuses the
//!   rest; each answer tells the workers until when no refetch will happen, and until then an
//!   unknown `kid` is refused at once, so a flood of made-up kids costs the identity provider
//!   one request per `REFETCH_EVERY`.
//! - Requests waiting for an answer are woken when it lands, and wait at most `wait_limit`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tracing::{info, warn};

use super::jwt::{KeySet, TokenCache};
use crate::config::{AuthId, AuthKind, Config, JwksSource};
use crate::upstream::client::{self, Request};
use crate::worker::Worker;

/// Kid-triggered refetches happen at most this often per provider.
pub const REFETCH_EVERY: Duration = Duration::from_secs(30);
/// After a failed fetch, the next try comes this soon (or at `refresh_s`, if sooner).
const RETRY: Duration = Duration::from_secs(10);
/// Largest JWKS document read.
const MAX_JWKS: usize = 1024 * 1024;
/// Requests waiting for keys per worker and provider; past it, 503.
const MAX_WAITING: usize = 1024;

/// A worker's question to the fetcher: its provider met a `kid` it does not know.
pub struct Ask {
    pub provider: AuthId,
    /// How many fetches had delivered keys to the asking worker: an ask that a fetch completed
    /// since has its answer already, and is answered without a refetch.
    pub fetches_seen: u64,
}

/// The fetcher's answer to every worker: the provider's keys now, and until when a kid it does
/// not know is unknown (no refetch will happen before).
pub struct KeysUpdate {
    pub provider: AuthId,
    pub keys: Arc<KeySet>,
    pub settled_until: Option<Instant>,
    /// Fetches of this provider completed so far.
    pub fetches: u64,
}

/// One worker's view of every JWT provider's keys, and its verified tokens.
#[derive(Default)]
pub struct JwtState {
    /// By `AuthId`; `None` for providers that are not JWT.
    providers: RefCell<Vec<Option<ProviderKeys>>>,
    pub tokens: RefCell<TokenCache>,
    asks: RefCell<Option<Sender<Ask>>>,
}

struct ProviderKeys {
    name: String,
    /// Where its keys come from (`Debug` of the source): keys carry over a reload only when
    /// it is unchanged.
    source: String,
    keys: Arc<KeySet>,
    remote: bool,
    /// How long a request may wait for this provider's keys.
    wait_limit: Duration,
    /// An ask is out and unanswered.
    asked: bool,
    settled_until: Option<Instant>,
    /// The fetcher's count of completed fetches, as of the last update.
    fetches: u64,
    /// Answers received; a waiter waits for the next one.
    answers: u64,
    waiters: Vec<Waker>,
}

/// What a request may do about a `kid` its provider's keys lack.
pub enum Unknown {
    /// Refused now: the keys are settled (recently fetched).
    Refuse,
    /// New keys arrived: look again.
    Retry,
    /// No answer in time, or too many waiting.
    Unavailable,
}

impl JwtState {
    /// `previous`: the state of the generation before, whose remote providers' keys carry over
    /// by name while their source is unchanged (file keys are read again with the config).
    pub fn new(config: &Config, previous: Option<&JwtState>) -> JwtState {
        let before = previous.map(|p| p.providers.borrow());
        let providers = config
            .auth
            .iter()
            .map(|a| {
                let AuthKind::Jwt(s) = &a.kind else {
                    return None;
                };
                let source = remote_source(config, &s.keys);
                let kept = before
                    .iter()
                    .flat_map(|b| b.iter().flatten())
                    .find(|p| p.remote && p.name == a.name && p.source == source);
                Some(ProviderKeys {
                    name: a.name.clone(),
                    keys: match (&s.keys, kept) {
                        (JwksSource::File(set), _) => Arc::clone(set),
                        (JwksSource::Remote { .. }, Some(p)) => Arc::clone(&p.keys),
                        _ => Arc::new(KeySet::empty()),
                    },
                    source,
                    remote: matches!(s.keys, JwksSource::Remote { .. }),
                    wait_limit: match &s.keys {
                        JwksSource::Remote { upstream, .. } => {
                            let up = &config.upstreams[usize::from(upstream.0)];
                            (up.connect_timeout + up.request_timeout + Duration::from_millis(100))
                                .min(Duration::from_secs(10))
                        }
                        _ => Duration::ZERO,
                    },
                    asked: false,
                    settled_until: kept.and_then(|p| p.settled_until),
                    fetches: kept.map_or(0, |p| p.fetches),
                    answers: 0,
                    waiters: Vec::new(),
                })
            })
            .collect();
        JwtState {
            providers: RefCell::new(providers),
            tokens: RefCell::default(),
            asks: RefCell::new(previous.and_then(|p| p.asks.borrow().clone())),
        }
    }

    pub fn link(&self, asks: Sender<Ask>) {
        *self.asks.borrow_mut() = Some(asks);
    }

    /// The version of the provider's current keys (no reference counting: the cached path).
    pub fn keys_version(&self, id: AuthId) -> u64 {
        let all = self.providers.borrow();
        all.get(usize::from(id.0))
            .and_then(Option::as_ref)
            .map_or(0, |p| p.keys.version)
    }

    /// The provider's current keys.
    pub fn keys(&self, id: AuthId) -> Option<Arc<KeySet>> {
        let all = self.providers.borrow();
        Some(Arc::clone(&all.get(usize::from(id.0))?.as_ref()?.keys))
    }

    /// Applies the fetcher's answers and wakes the requests waiting on them (worker tick).
    pub fn apply(&self, updates: &Receiver<KeysUpdate>) {
        let mut all = self.providers.borrow_mut();
        for u in updates.try_iter() {
            let Some(Some(p)) = all.get_mut(usize::from(u.provider.0)) else {
                continue;
            };
            p.keys = u.keys;
            p.settled_until = u.settled_until;
            p.fetches = u.fetches;
            p.asked = false;
            p.answers += 1;
            for w in p.waiters.drain(..) {
                w.wake();
            }
        }
    }

    /// A token of provider `id` names a kid its keys lack: refuse it, or ask for a refetch and
    /// wait (bounded) for the answer.
    pub async fn unknown_kid(&self, id: AuthId, now: Instant) -> Unknown {
        let (seen, limit) = {
            let mut all = self.providers.borrow_mut();
            let Some(Some(p)) = all.get_mut(usize::from(id.0)) else {
                return Unknown::Refuse;
            };
            if !p.remote || p.settled_until.is_some_and(|t| now < t) {
                return Unknown::Refuse;
            }
            if p.waiters.len() >= MAX_WAITING {
                return Unknown::Unavailable;
            }
            if !p.asked {
                let ask = Ask {
                    provider: id,
                    fetches_seen: p.fetches,
                };
                let sent = self.asks.borrow().as_ref().map(|tx| tx.try_send(ask));
                match sent {
                    Some(Ok(())) => p.asked = true,
                    Some(Err(TrySendError::Full(_))) => return Unknown::Unavailable,
                    Some(Err(TrySendError::Disconnected(_))) | None => return Unknown::Refuse,
                }
            }
            (p.answers, p.wait_limit)
        };
        let answered = std::future::poll_fn(|cx| {
            let mut all = self.providers.borrow_mut();
            match all.get_mut(usize::from(id.0)) {
                Some(Some(p)) if p.answers == seen => {
                    p.waiters.push(cx.waker().clone());
                    Poll::Pending
                }
                _ => Poll::Ready(()),
            }
        });
        match monoio::time::timeout(limit, answered).await {
            Ok(()) => Unknown::Retry,
            Err(_) => Unknown::Unavailable,
        }
    }
}

/// What the admin endpoint shows of each remote JWKS: written by the fetcher when a fetch
/// ends (off the request path), read at scrape time.
#[derive(Default)]
pub struct JwksStatus(Mutex<Vec<JwksStat>>);

#[derive(Debug, Clone, Default)]
pub struct JwksStat {
    pub provider: String,
    pub keys: usize,
    /// Seconds since the epoch of the last good fetch.
    pub fetched_at: Option<u64>,
    pub ok: u64,
    pub failed: u64,
    pub refused: u64,
}

impl JwksStatus {
    pub fn snapshot(&self) -> Vec<JwksStat> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    fn update(&self, provider: &str, f: impl FnOnce(&mut JwksStat)) {
        let Ok(mut all) = self.0.lock() else { return };
        if let Some(s) = all.iter_mut().find(|s| s.provider == provider) {
            f(s);
        }
    }
}

/// The process's links: one ask channel to the fetcher, one update channel per worker.
pub struct Links {
    pub asks: (Sender<Ask>, Receiver<Ask>),
    pub updates: Vec<(Sender<KeysUpdate>, Receiver<KeysUpdate>)>,
}

impl Links {
    pub fn new(workers: usize) -> Links {
        Links {
            asks: crossbeam_channel::bounded(workers * 4),
            updates: (0..workers)
                .map(|_| crossbeam_channel::bounded(64))
                .collect(),
        }
    }
}

/// A remote provider's source as text (its upstream by name, and path), to tell whether a
/// reload changed it; empty for other sources.
fn remote_source(config: &Config, keys: &JwksSource) -> String {
    match keys {
        JwksSource::Remote {
            upstream,
            path,
            refresh,
        } => {
            let up = &config.upstreams[usize::from(upstream.0)];
            format!("{} {path} {refresh:?} {:?}", up.name, up.targets)
        }
        _ => String::new(),
    }
}

/// The fetching side, on worker 0: every remote JWKS provider.
pub struct Fetcher {
    asks: Receiver<Ask>,
    workers: Rc<[Sender<KeysUpdate>]>,
    remotes: Vec<Rc<Remote>>,
    status: Arc<JwksStatus>,
}

struct Remote {
    /// Its id in the current config (a reload may renumber providers).
    id: Cell<AuthId>,
    name: String,
    /// `remote_source`: a reload keeps this `Remote` (its keys, its schedule) while unchanged.
    source: String,
    upstream: String,
    path: Box<[u8]>,
    host: Box<[u8]>,
    refresh: Duration,
    keys: RefCell<Arc<KeySet>>,
    in_flight: Cell<bool>,
    /// Fetches completed (good or not), for telling stale asks.
    fetches: Cell<u64>,
    /// A reload removed it: a fetch still running announces nothing.
    retired: Cell<bool>,
    next_fetch: Cell<Instant>,
    last_refetch: Cell<Option<Instant>>,
}

impl Fetcher {
    pub fn new(
        config: &Config,
        asks: Receiver<Ask>,
        workers: Vec<Sender<KeysUpdate>>,
        status: Arc<JwksStatus>,
    ) -> Fetcher {
        let mut fetcher = Fetcher {
            asks,
            workers: workers.into(),
            remotes: Vec::new(),
            status,
        };
        fetcher.configure(config);
        fetcher
    }

    /// Takes the remote providers of `config` (at start and on reload): one whose name and
    /// source are unchanged keeps its keys and schedule; a new one is fetched at once.
    pub fn configure(&mut self, config: &Config) {
        let now = Instant::now();
        let mut remotes = Vec::new();
        let old_stats = self.status.snapshot();
        let mut stats = Vec::new();
        for (i, a) in config.auth.iter().enumerate() {
            let AuthKind::Jwt(s) = &a.kind else { continue };
            let JwksSource::Remote {
                upstream,
                path,
                refresh,
            } = &s.keys
            else {
                continue;
            };
            let source = remote_source(config, &s.keys);
            let kept = self
                .remotes
                .iter()
                .find(|r| r.name == a.name && r.source == source);
            let remote = kept.cloned().unwrap_or_else(|| {
                let up = &config.upstreams[usize::from(upstream.0)];
                let host = up
                    .tls
                    .as_ref()
                    .and_then(|t| match t.names.first()? {
                        rustls::pki_types::ServerName::DnsName(d) => Some(d.as_ref().to_owned()),
                        _ => None,
                    })
                    .or_else(|| up.targets.first().map(|t| t.name.clone()))
                    .unwrap_or_default();
                Rc::new(Remote {
                    id: Cell::new(AuthId(i as u16)),
                    name: a.name.clone(),
                    source,
                    upstream: up.name.clone(),
                    path: path.as_bytes().into(),
                    host: host.into_bytes().into(),
                    refresh: *refresh,
                    keys: RefCell::new(Arc::new(KeySet::empty())),
                    in_flight: Cell::new(false),
                    fetches: Cell::new(0),
                    retired: Cell::new(false),
                    next_fetch: Cell::new(now),
                    last_refetch: Cell::new(None),
                })
            });
            remote.id.set(AuthId(i as u16));
            let stat = match kept {
                Some(_) => old_stats.iter().find(|s| s.provider == a.name).cloned(),
                None => None,
            };
            stats.push(stat.unwrap_or_else(|| JwksStat {
                provider: a.name.clone(),
                ..JwksStat::default()
            }));
            remotes.push(remote);
        }
        if let Ok(mut all) = self.status.0.lock() {
            *all = stats;
        }
        for old in &self.remotes {
            if !remotes.iter().any(|r| Rc::ptr_eq(r, old)) {
                old.retired.set(true);
            }
        }
        self.remotes = remotes;
    }

    pub fn is_empty(&self) -> bool {
        self.remotes.is_empty()
    }

    /// Takes the workers' asks and starts the fetches that are due (worker 0's tick).
    pub fn poll(&self, w: &Rc<Worker>) {
        let now = w.now();
        // Scheduled fetches first: an ask that meets one in flight is answered by it, and
        // does not spend the provider's refetch.
        for r in &self.remotes {
            if !r.in_flight.get() && now >= r.next_fetch.get() {
                self.start(w, r);
            }
        }
        for ask in self.asks.try_iter() {
            let Some(r) = self.remotes.iter().find(|r| r.id.get() == ask.provider) else {
                continue;
            };
            if r.in_flight.get() {
                continue;
            }
            if ask.fetches_seen < r.fetches.get() {
                // A fetch completed after the asker's last keys: they are its answer.
                broadcast(&self.workers, r);
                continue;
            }
            match r.last_refetch.get() {
                Some(t) if now < t + REFETCH_EVERY => {
                    self.status.update(&r.name, |s| s.refused += 1);
                    broadcast(&self.workers, r);
                }
                _ => {
                    r.last_refetch.set(Some(now));
                    self.start(w, r);
                }
            }
        }
    }

    fn start(&self, w: &Rc<Worker>, r: &Rc<Remote>) {
        r.in_flight.set(true);
        let (w, r) = (Rc::clone(w), Rc::clone(r));
        let (workers, status) = (Rc::clone(&self.workers), Arc::clone(&self.status));
        monoio::spawn(async move {
            let result = fetch(&w, &r).await;
            let now = w.now();
            match result {
                Ok((set, skipped)) => {
                    for s in skipped {
                        warn!(provider = %r.name, "JWKS: skipped {s}");
                    }
                    if set.version != r.keys.borrow().version {
                        info!(provider = %r.name, keys = set.len(), "JWKS keys loaded");
                    }
                    let count = set.len();
                    *r.keys.borrow_mut() = Arc::new(set);
                    r.next_fetch.set(now + r.refresh);
                    let at = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    status.update(&r.name, |s| {
                        s.ok += 1;
                        s.keys = count;
                        s.fetched_at = Some(at);
                    });
                }
                Err(e) => {
                    warn!(provider = %r.name, error = %e, keys_kept = r.keys.borrow().len(),
                        "JWKS fetch failed; the keys there are stay in use");
                    r.next_fetch.set(now + r.refresh.min(RETRY));
                    status.update(&r.name, |s| s.failed += 1);
                }
            }
            r.in_flight.set(false);
            r.fetches.set(r.fetches.get() + 1);
            broadcast(&workers, &r);
        });
    }
}

/// Sends the provider's keys to every worker, with until when they are settled.
fn broadcast(workers: &[Sender<KeysUpdate>], r: &Remote) {
    if r.retired.get() {
        return;
    }
    let settled_until = r.last_refetch.get().map(|t| t + REFETCH_EVERY);
    for tx in workers {
        let update = KeysUpdate {
            provider: r.id.get(),
            keys: Arc::clone(&r.keys.borrow()),
            settled_until,
            fetches: r.fetches.get(),
        };
        if tx.try_send(update).is_err() {
            warn!(provider = %r.name, "a worker is not taking JWKS updates");
        }
    }
}

/// Fetches and parses the provider's JWKS.
async fn fetch(w: &Worker, r: &Remote) -> Result<(KeySet, Vec<String>), String> {
    let gen = w.generation();
    let up = gen
        .upstreams
        .iter()
        .find(|u| u.name == r.upstream)
        .ok_or("the JWKS upstream is gone")?;
    let request = Request {
        method: b"GET",
        target: &r.path,
        host: &r.host,
        headers: b"accept: application/jwk-set+json, application/json\r\n",
    };
    let resp = client::fetch(w, up, 0, &request, MAX_JWKS)
        .await
        .map_err(|e| e.message().into_owned())?;
    if resp.head.status != 200 {
        return Err(format!("the JWKS endpoint answered {}", resp.head.status));
    }
    let body = resp
        .body
        .ok_or_else(|| format!("the JWKS is larger than {MAX_JWKS} bytes"))?;
    KeySet::parse(&body)
}
