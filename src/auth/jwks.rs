//! Remote key sets (`jwks = { upstream, path }`): fetched by one worker for the whole process
//! (the fetcher is a service: `services::jwks`), through the buffered upstream client (so the
//! upstream's TLS, timeouts and pools apply), and handed to every worker read-only as an
//! `Arc<KeySet>`. Here: what every worker holds and asks.
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

use std::cell::RefCell;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::jwt::{KeySet, TokenCache};
use crate::config::{AuthId, AuthKind, Config, JwksSource};
pub use crate::metrics::status::JwksStat;

/// Kid-triggered refetches happen at most this often per provider.
pub const REFETCH_EVERY: Duration = Duration::from_secs(30);
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
pub struct JwksStatus(pub(crate) Mutex<Vec<JwksStat>>);

impl JwksStatus {
    pub fn snapshot(&self) -> Vec<JwksStat> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub(crate) fn update(&self, provider: &str, f: impl FnOnce(&mut JwksStat)) {
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
pub(crate) fn remote_source(config: &Config, keys: &JwksSource) -> String {
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
