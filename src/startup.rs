//! What start-up can fail with, and the signal thread the main thread listens to.

use std::io;
use std::net::SocketAddr;
use std::thread;

use crossbeam_channel::Receiver;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};

#[derive(Debug)]
pub enum StartError {
    Bind {
        listener: String,
        addr: SocketAddr,
        error: io::Error,
    },
    Worker(String),
    Signals(io::Error),
    AccessLog(String, io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Bind {
                listener,
                addr,
                error,
            } if error.kind() == io::ErrorKind::AddrInUse => write!(
                f,
                "listener {listener:?}: address in use: {addr} is already held by another process"
            ),
            StartError::Bind {
                listener,
                addr,
                error,
            } => write!(f, "listener {listener:?}: cannot listen on {addr}: {error}"),
            StartError::Worker(e) => write!(f, "worker failed to start: {e}"),
            StartError::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            StartError::AccessLog(path, e) => write!(f, "access log {path:?}: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// SIGTERM and SIGINT drain and stop; SIGHUP reloads the config; SIGUSR1 reopens the access
/// log.
pub fn signal_channel() -> Result<Receiver<i32>, StartError> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])
        .map_err(StartError::Signals)?;
    let (tx, rx) = crossbeam_channel::bounded(4);
    thread::Builder::new()
        .name("ringway-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        })
        .map_err(StartError::Signals)?;
    Ok(rx)
}
