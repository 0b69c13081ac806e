//! The JWKS fetcher, on worker 0: fetches every remote provider's keys on its schedule and
//! when a worker asks (a `kid` it does not know), within the limits `auth::jwks` describes, and
//! hands the keys to every worker.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use tracing::{info, warn};

use crate::auth::jwks::{remote_source, Ask, JwksStat, JwksStatus, KeysUpdate, REFETCH_EVERY};
use crate::auth::jwt::KeySet;
use crate::config::{AuthId, AuthKind, Config, JwksSource};
use crate::upstream::client::{self, Request};
use crate::worker::Worker;

/// After a failed fetch, the next try comes this soon (or at `refresh_s`, if sooner).
const RETRY: Duration = Duration::from_secs(10);
/// Largest JWKS document read.
const MAX_JWKS: usize = 1024 * 1024;

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
    let resp = client::fetch(&w.upstream_ctx(), up, 0, &request, MAX_JWKS)
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
