//! Hot reload, on the main thread. `SIGHUP`, `POST /config/reload` (admin) and `ringway reload`
//! (which calls the admin) all end here: the config file is read and validated completely,
//! changes that need a restart are refused, sockets for added listener addresses are bound, and
//! only then is the new config sent to every worker, which applies it between requests and
//! says so. Any failure before that leaves the running config untouched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use serde_json::json;
use tracing::{error, info, warn};

use crate::bind::{self, PerWorker};
use crate::config::{self, Config, ConfigError, ListenerId};
use crate::control::{Control, Event};
use crate::handover::Outbox;
pub use crate::metrics::status::{Loaded, RELOAD_RESULTS};
use crate::upgrade::{Offered, OfferedSockets};

/// How long the workers have to take a new config (each does so on its next tick).
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a reload did not happen; the running config is untouched.
#[derive(Debug)]
pub enum ReloadError {
    /// The file does not validate.
    Invalid(ConfigError),
    /// A change that only a restart (or a binary upgrade) can make.
    Refused(String),
    /// Valid, but it could not be applied (an address in use, a worker not answering).
    Failed(String),
}

impl ReloadError {
    /// The admin's answer status.
    pub fn status(&self) -> u16 {
        match self {
            ReloadError::Invalid(_) => 400,
            ReloadError::Refused(_) => 409,
            ReloadError::Failed(_) => 500,
        }
    }

    /// The `result` label of `ringway_config_reloads_total`.
    pub fn label(&self) -> &'static str {
        match self {
            ReloadError::Invalid(_) => "invalid",
            ReloadError::Refused(_) => "refused",
            ReloadError::Failed(_) => "failed",
        }
    }
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Invalid(e) => write!(f, "{e}"),
            ReloadError::Refused(why) | ReloadError::Failed(why) => f.write_str(why),
        }
    }
}

/// A reload's outcome, as the admin answers it.
pub type Answer = Result<Loaded, ReloadError>;

/// What the admin thread knows of reloads: the config in use, the outcomes so far, and the way
/// to ask the main thread for one.
pub struct ReloadStatus {
    loaded: Mutex<Loaded>,
    /// By result: ok, invalid, refused, failed.
    counts: [AtomicU64; 4],
    asks: Sender<Sender<Answer>>,
}

impl ReloadStatus {
    pub fn new(config: &Config, asks: Sender<Sender<Answer>>) -> ReloadStatus {
        ReloadStatus {
            loaded: Mutex::new(loaded(config, 1)),
            counts: Default::default(),
            asks,
        }
    }

    pub fn loaded(&self) -> Loaded {
        match self.loaded.lock() {
            Ok(l) => l.clone(),
            Err(e) => e.into_inner().clone(),
        }
    }

    pub fn counts(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }

    fn record(&self, answer: &Answer) {
        let label = match answer {
            Ok(l) => {
                if let Ok(mut current) = self.loaded.lock() {
                    *current = l.clone();
                }
                "ok"
            }
            Err(e) => e.label(),
        };
        if let Some(i) = RELOAD_RESULTS.iter().position(|r| *r == label) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Asks the main thread to reload, and waits for the outcome (admin thread; polled, so the
    /// admin keeps serving meanwhile).
    pub async fn request(&self) -> Answer {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.asks.try_send(tx).is_err() {
            return Err(ReloadError::Failed("a reload is already under way".into()));
        }
        let deadline = Instant::now() + APPLY_TIMEOUT + Duration::from_secs(5);
        while Instant::now() < deadline {
            match rx.try_recv() {
                Ok(answer) => return answer,
                Err(crossbeam_channel::TryRecvError::Disconnected) => break,
                Err(crossbeam_channel::TryRecvError::Empty) => {
                    monoio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        Err(ReloadError::Failed("no answer from the main thread".into()))
    }
}

/// The admin's JSON for an outcome.
pub fn answer_json(answer: &Answer) -> (u16, Vec<u8>) {
    let value = match answer {
        Ok(l) => json!({ "reloaded": true, "generation": l.generation, "digest": l.digest }),
        Err(ReloadError::Invalid(e)) => json!({
            "reloaded": false, "result": "invalid", "error": e.to_string(),
            "file": e.file.display().to_string(), "line": e.line, "column": e.column, "key": e.key,
        }),
        Err(e) => json!({ "reloaded": false, "result": e.label(), "error": e.to_string() }),
    };
    let status = answer.as_ref().map_or_else(ReloadError::status, |_| 200);
    (status, value.to_string().into_bytes())
}

fn loaded(config: &Config, generation: u64) -> Loaded {
    Loaded {
        generation,
        digest: config.digest.clone(),
        path: config.path.display().to_string(),
        loaded_at: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

/// The main thread's side: the config in use and the links a reload goes through.
pub struct Reloader {
    pub config: Arc<Config>,
    generation: u64,
    /// To every worker, in worker order.
    pub controls: Vec<Sender<Control>>,
    /// Every worker's socket link, in worker order.
    outboxes: Vec<Outbox>,
    /// The TLS watcher's new configs.
    tls_watch: Sender<Arc<Config>>,
    status: Arc<ReloadStatus>,
    /// The sockets a successor would take over, kept in step with the listeners.
    offered: Arc<Mutex<Offered>>,
}

impl Reloader {
    pub fn new(
        config: Arc<Config>,
        controls: Vec<Sender<Control>>,
        outboxes: Vec<Outbox>,
        tls_watch: Sender<Arc<Config>>,
        status: Arc<ReloadStatus>,
        offered: Arc<Mutex<Offered>>,
    ) -> Reloader {
        Reloader {
            config,
            generation: 1,
            controls,
            outboxes,
            tls_watch,
            status,
            offered,
        }
    }

    /// Reloads the config file, and records and logs the outcome. `events`: the workers'; a
    /// worker that stops meanwhile is put back for the caller to see.
    pub fn reload(&mut self, events: &Receiver<Event>, stopped: &mut Vec<Event>) -> Answer {
        let answer = self.try_reload(events, stopped);
        match &answer {
            Ok(l) => info!(generation = l.generation, digest = %l.digest, "configuration reloaded"),
            Err(e @ ReloadError::Invalid(_)) => {
                error!(error = %e, "reload: the new configuration is invalid; the running one stays")
            }
            Err(e) => warn!(error = %e, "reload not done; the running configuration stays"),
        }
        self.status.record(&answer);
        answer
    }

    fn try_reload(&mut self, events: &Receiver<Event>, stopped: &mut Vec<Event>) -> Answer {
        let next = config::load(&self.config.path).map_err(ReloadError::Invalid)?;
        if let Some(why) = needs_restart(&self.config, &next) {
            return Err(ReloadError::Refused(why));
        }
        let (mut sockets, added) = bind_added(&self.config, &next)?;
        let next = Arc::new(next);
        // Worker 0 last: by the time its services speak in the new config's ids, every other
        // worker already has the new config in its queue, ahead of what they send.
        for (w, tx) in self.controls.iter().enumerate().rev() {
            let sockets = self.outboxes[w]
                .send(std::mem::take(&mut sockets[w]))
                .map_err(|e| {
                    ReloadError::Failed(format!("worker {w} is not taking sockets: {e}"))
                })?;
            let control = Control::Reload {
                config: Arc::clone(&next),
                sockets,
            };
            tx.send_timeout(control, APPLY_TIMEOUT)
                .map_err(|_| ReloadError::Failed(format!("worker {w} is not taking controls")))?;
        }
        self.config = Arc::clone(&next);
        let _ = self.tls_watch.try_send(Arc::clone(&next));
        if let Ok(mut offered) = self.offered.lock() {
            offered
                .listeners
                .retain(|(l, _)| next.listeners.iter().any(|n| n.same_socket(l)));
            offered.listeners.extend(added);
        }
        let deadline = Instant::now() + APPLY_TIMEOUT;
        let mut applied = 0;
        while applied < self.controls.len() {
            match events.recv_deadline(deadline) {
                Ok(Event::Reloaded) => applied += 1,
                Ok(other) => stopped.push(other),
                Err(_) => {
                    return Err(ReloadError::Failed(format!(
                        "{} of {} workers applied the new configuration in time",
                        applied,
                        self.controls.len()
                    )))
                }
            }
        }
        self.generation += 1;
        Ok(loaded(&next, self.generation))
    }
}

/// Why `next` cannot replace `current` without a restart, if it cannot.
fn needs_restart(current: &Config, next: &Config) -> Option<String> {
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let sections = [
        (
            "[runtime]",
            differs(&current.runtime, &next.runtime),
            "workers, pinning, driver, ring size and drain timeout",
        ),
        ("admin", current.admin != next.admin, "the admin address"),
        (
            "[limits]",
            differs(&current.limits, &next.limits),
            "the connection limits and timeouts",
        ),
        (
            "[metrics]",
            current.metrics_interval != next.metrics_interval,
            "the metrics interval",
        ),
        (
            "[access_log]",
            differs(&current.access_log, &next.access_log),
            "the access log",
        ),
        (
            "[cache]",
            differs(&current.cache, &next.cache),
            "the cache's size",
        ),
        (
            "[[rate_limits]]",
            differs(&current.rate_limits, &next.rate_limits),
            "rate limit definitions (routes may use them differently)",
        ),
    ];
    let changed: Vec<String> = sections
        .iter()
        .filter(|(_, changed, _)| *changed)
        .map(|(name, _, what)| format!("{name} ({what})"))
        .collect();
    (!changed.is_empty()).then(|| {
        format!(
            "{} changed: this needs a restart or a binary upgrade (`ringway --upgrade`), not a reload; nothing was changed",
            changed.join(", ")
        )
    })
}

/// Binds the listeners `next` adds, once per worker; returns the sockets by worker, and their
/// duplicates to offer a successor.
fn bind_added(
    current: &Config,
    next: &Config,
) -> Result<(PerWorker, Vec<OfferedSockets>), ReloadError> {
    let workers = current.runtime.workers;
    let mut sockets: PerWorker = (0..workers).map(|_| Vec::new()).collect();
    let mut added = Vec::new();
    for (i, l) in next.listeners.iter().enumerate() {
        if current.listeners.iter().any(|c| c.same_socket(l)) {
            continue;
        }
        let dups =
            bind::listen(ListenerId(i as u16), l, workers, None, &mut sockets).map_err(|e| {
                ReloadError::Failed(format!(
                    "listener {:?}: cannot listen on {}: {e}",
                    l.name, l.addr
                ))
            })?;
        added.push((l.clone(), dups));
    }
    Ok((sockets, added))
}
