//! Certificate rotation without restart. One thread looks at every TLS listener's files every
//! `CHECK_INTERVAL`; when any changed (new inode after a rename or a symlink swap, or a new
//! size or modification time after an in-place write), the listener's files are read and
//! checked again. Good files go to every worker, which builds its next `ServerConfig` from them
//! between handshakes; a bad file is logged and the certificates in use stay.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TryRecvError};
use tracing::{error, info, warn};

use crate::config::{Config, ListenerTls};
use crate::pki::certs::EXPIRY_WARNING;
use crate::pki::TlsFiles;

/// How often files are looked at.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// New files for one listener, for a worker to build its next `ServerConfig` from.
pub struct TlsUpdate {
    /// The listener's name (ids may change with a reload).
    pub listener: String,
    pub files: Arc<TlsFiles>,
}

/// Each served certificate's expiry, for `ringway_tls_cert_expiry_seconds`: written by this
/// thread, read by the admin thread; never touched by a worker.
#[derive(Default)]
pub struct CertExpiries(Mutex<Vec<CertExpiry>>);

pub use crate::metrics::status::CertExpiry;

impl CertExpiries {
    pub fn snapshot(&self) -> Vec<CertExpiry> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Forgets the certificates of listeners `keep` says no.
    fn retain(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut all) = self.0.lock() {
            all.retain(|e| keep(&e.listener));
        }
    }

    fn set(&self, listener: &str, files: &TlsFiles) {
        let Ok(mut all) = self.0.lock() else { return };
        all.retain(|e| e.listener != listener);
        all.extend(files.certs.iter().map(|c| CertExpiry {
            listener: listener.to_owned(),
            name: c.label(),
            not_after: c.not_after,
        }));
    }
}

/// Logs a warning for each certificate that expires within `EXPIRY_WARNING`.
pub fn warn_expiring(listener: &str, files: &TlsFiles) {
    let now = SystemTime::now();
    for c in &files.certs {
        let left = c.expires_in(now);
        if left < EXPIRY_WARNING.as_secs() as i64 {
            warn!(
                listener,
                certificate = %c.paths.cert.display(),
                name = %c.label(),
                days_left = left / 86_400,
                "TLS certificate expires soon"
            );
        }
    }
}

struct Watched {
    name: String,
    tls: ListenerTls,
    stamps: Vec<Option<Stamp>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    // `metadata` follows symbolic links: a swapped link shows as a new inode.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

fn paths(tls: &ListenerTls) -> Vec<PathBuf> {
    let mut p: Vec<PathBuf> = tls
        .certificates
        .iter()
        .flat_map(|c| [c.cert.clone(), c.key.clone()])
        .collect();
    p.extend(tls.client_ca.clone());
    p
}

/// Starts the watcher if any listener has TLS; `workers` are the workers' update channels.
pub fn spawn(
    config: &Config,
    workers: Vec<Sender<TlsUpdate>>,
    expiries: Arc<CertExpiries>,
    reloads: Receiver<Arc<Config>>,
) -> std::io::Result<()> {
    let mut watched = watch_list(config, &expiries, Vec::new());
    thread::Builder::new()
        .name("ringway-tls-watch".into())
        .spawn(move || loop {
            thread::sleep(CHECK_INTERVAL);
            match reloads.try_recv() {
                Ok(config) => watched = watch_list(&config, &expiries, watched),
                Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => {}
            }
            for w in &mut watched {
                if !check(w, &workers, &expiries) {
                    return;
                }
            }
        })?;
    Ok(())
}

/// The TLS listeners of `config` to watch; one already watched with the same settings keeps
/// its files' stamps (a reload is not a rotation).
fn watch_list(config: &Config, expiries: &CertExpiries, before: Vec<Watched>) -> Vec<Watched> {
    let mut watched = Vec::new();
    expiries.retain(|name| {
        config
            .listeners
            .iter()
            .any(|l| l.name == name && l.tls.is_some())
    });
    for l in &config.listeners {
        let Some(tls) = &l.tls else { continue };
        let settings = format!("{tls:?}");
        if let Some(old) = before
            .iter()
            .find(|w| w.name == l.name && format!("{:?}", w.tls) == settings)
        {
            watched.push(Watched {
                name: old.name.clone(),
                tls: old.tls.clone(),
                stamps: old.stamps.clone(),
            });
            continue;
        }
        expiries.set(&l.name, &tls.files);
        warn_expiring(&l.name, &tls.files);
        watched.push(Watched {
            name: l.name.clone(),
            stamps: paths(tls).iter().map(|p| stamp(p)).collect(),
            tls: tls.clone(),
        });
    }
    watched
}

/// Looks at one listener's files; false once the workers are gone.
fn check(w: &mut Watched, workers: &[Sender<TlsUpdate>], expiries: &CertExpiries) -> bool {
    let now: Vec<Option<Stamp>> = paths(&w.tls).iter().map(|p| stamp(p)).collect();
    if now == w.stamps {
        return true;
    }
    w.stamps = now;
    let files = match TlsFiles::load(
        &w.tls.certificates,
        w.tls.client_ca.as_deref(),
        SystemTime::now(),
    ) {
        Ok(f) => Arc::new(f),
        Err(e) => {
            error!(
                listener = %w.name,
                error = %e.message,
                "TLS files changed but cannot be used; the current certificates stay"
            );
            return true;
        }
    };
    // Built once here to catch what only building finds; each worker builds its own.
    if let Err(e) = super::server_config(&w.tls, &files) {
        error!(listener = %w.name, error = %e, "TLS files changed but cannot be used; the current certificates stay");
        return true;
    }
    info!(
        listener = %w.name,
        certificates = files.certs.len(),
        "TLS files changed: new handshakes use them"
    );
    warn_expiring(&w.name, &files);
    expiries.set(&w.name, &files);
    for tx in workers {
        let update = TlsUpdate {
            listener: w.name.clone(),
            files: Arc::clone(&files),
        };
        match tx.send_timeout(update, Duration::from_secs(1)) {
            Ok(()) => {}
            Err(SendTimeoutError::Disconnected(_)) => return false,
            Err(SendTimeoutError::Timeout(_)) => {
                warn!(listener = %w.name, "a worker did not take the new TLS files in time")
            }
        }
    }
    true
}
