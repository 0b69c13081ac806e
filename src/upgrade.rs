//! Binary upgrade without a refused connection. A process started with `[runtime]
//! upgrade_socket` answers on that Unix socket; `ringway --upgrade` connects to it and receives
//! the running process's listening sockets (and the admin's) with SCM_RIGHTS, as Pingora and
//! HAProxy do. Both processes then accept from the same sockets, so the kernel's accept queues
//! are never without a reader: the new process starts its workers on them, says "ready", and
//! the old one stops accepting (without shutting the shared sockets down), drains and exits.
//! If the new process fails before "ready", the old one notices the closed connection and goes
//! on as if nothing happened.
//!
//! The exchange: the new process sends `ringway-upgrade 1\n`; the old answers one message, a
//! JSON line describing the sockets with their descriptors attached in the same order; the new
//! process sends `ready\n` once it serves, and the old answers `draining\n`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crossbeam_channel::Sender;
use sendfd::{RecvWithFd, SendWithFd};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::{Config, Listener};

const HELLO: &str = "ringway-upgrade 1\n";
/// The most descriptors one message may carry (the kernel's SCM_MAX_FD is 253).
const MAX_FDS: usize = 250;
/// How long the new process may take from receiving the sockets to serving.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The sockets a process serves on, as it offers them to its successor: duplicates of the
/// workers' descriptors, kept by the main thread and updated by reloads.
#[derive(Default)]
pub struct Offered {
    pub listeners: Vec<OfferedSockets>,
    /// The admin listener, with its configured address.
    pub admin: Option<(SocketAddr, OwnedFd)>,
}

/// A listener and duplicates of its sockets.
pub type OfferedSockets = (Listener, Vec<OwnedFd>);

/// What the predecessor handed over.
#[derive(Default)]
pub struct Handed {
    listeners: Vec<(String, SocketAddr, Vec<OwnedFd>)>,
    admin: Option<(SocketAddr, OwnedFd)>,
}

#[derive(Serialize, Deserialize)]
struct Offer {
    listeners: Vec<OfferedListener>,
    /// The admin's configured address, when its socket comes last.
    admin: Option<SocketAddr>,
}

#[derive(Serialize, Deserialize)]
struct OfferedListener {
    name: String,
    addr: SocketAddr,
    sockets: usize,
}

impl Handed {
    /// The sockets of the listener `l` (the same name and address, or the same fixed address),
    /// taken out of what was handed over.
    pub fn take_listener(&mut self, l: &Listener) -> Vec<StdListener> {
        let found = self
            .listeners
            .iter()
            .position(|(name, addr, _)| *addr == l.addr && (addr.port() != 0 || *name == l.name));
        match found {
            Some(i) => self
                .listeners
                .swap_remove(i)
                .2
                .into_iter()
                .map(StdListener::from)
                .collect(),
            None => Vec::new(),
        }
    }

    /// The admin socket, if it was configured at `addr` before too.
    pub fn take_admin(&mut self, addr: SocketAddr) -> Option<StdListener> {
        match self.admin.take() {
            Some((a, fd)) if a == addr => Some(StdListener::from(fd)),
            other => {
                self.admin = other;
                None
            }
        }
    }
}

/// The new process's side: takes the sockets of the process serving at `path`. The returned
/// stream is for `confirm`.
pub fn take_over(path: &Path) -> Result<(Handed, UnixStream), String> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        format!(
            "no running ringway answers at upgrade_socket {}: {e}",
            path.display()
        )
    })?;
    let io = |e: std::io::Error| format!("upgrade socket {}: {e}", path.display());
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
    stream.write_all(HELLO.as_bytes()).map_err(io)?;
    let mut bytes = vec![0u8; 64 * 1024];
    let mut fds: Vec<RawFd> = vec![-1; MAX_FDS];
    let (n, received) = stream.recv_with_fd(&mut bytes, &mut fds).map_err(io)?;
    // SAFETY: the kernel installed `received` new descriptors in this process for us; nothing
    // else owns them.
    let mut owned = fds[..received]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect::<Vec<_>>()
        .into_iter();
    let text = bytes[..n].split(|&b| b == b'\n').next().unwrap_or_default();
    let offer: Offer = serde_json::from_slice(text)
        .map_err(|e| format!("the running process's offer is not understood: {e}"))?;
    let mut handed = Handed::default();
    for l in offer.listeners {
        let sockets: Vec<OwnedFd> = owned.by_ref().take(l.sockets).collect();
        if sockets.len() != l.sockets {
            return Err("the running process sent fewer sockets than it offered".into());
        }
        handed.listeners.push((l.name, l.addr, sockets));
    }
    if let Some(addr) = offer.admin {
        let fd = owned.next().ok_or("the admin socket is missing")?;
        handed.admin = Some((addr, fd));
    }
    Ok((handed, stream))
}

/// Tells the predecessor that this process serves, and waits for it to start draining.
pub fn confirm(stream: UnixStream) -> Result<(), String> {
    let mut w = &stream;
    w.write_all(b"ready\n").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line == "draining\n" {
        Ok(())
    } else {
        Err(format!("unexpected answer {line:?}"))
    }
}

/// Serves `config`'s upgrade socket: the first successor that says "ready" gets a message on
/// `handed_over`, and this process stops offering. The socket file is bound under a temporary
/// name and renamed into place, so a predecessor's file is replaced atomically.
pub fn listen(
    config: &Config,
    offered: Arc<Mutex<Offered>>,
    handed_over: Sender<()>,
) -> std::io::Result<()> {
    let Some(path) = config.runtime.upgrade_socket.clone() else {
        return Ok(());
    };
    let temporary = PathBuf::from(format!("{}.{}", path.display(), std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary)?;
    // Whoever can connect gets the listening sockets: only this user may.
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&temporary, &path)?;
    info!(path = %path.display(), "upgrade socket listening");
    thread::Builder::new()
        .name("ringway-upgrade".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                match hand_over(&stream, &offered) {
                    Ok(()) => {
                        info!("the new process serves; this one drains and exits");
                        let _ = handed_over.send(());
                        return;
                    }
                    Err(e) => warn!(error = %e, "upgrade abandoned; this process goes on serving"),
                }
            }
        })?;
    Ok(())
}

/// One successor: the offer, then its "ready" (or its failure).
fn hand_over(stream: &UnixStream, offered: &Mutex<Offered>) -> Result<(), String> {
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut hello = String::new();
    reader.read_line(&mut hello).map_err(|e| e.to_string())?;
    if hello != HELLO {
        return Err(format!("not an upgrade request: {hello:?}"));
    }
    {
        let offered = offered.lock().map_err(|_| "offer state poisoned")?;
        let mut fds: Vec<RawFd> = Vec::new();
        let mut offer = Offer {
            listeners: Vec::new(),
            admin: None,
        };
        for (l, sockets) in &offered.listeners {
            fds.extend(sockets.iter().map(AsRawFd::as_raw_fd));
            offer.listeners.push(OfferedListener {
                name: l.name.clone(),
                addr: l.addr,
                sockets: sockets.len(),
            });
        }
        if let Some((addr, fd)) = &offered.admin {
            fds.push(fd.as_raw_fd());
            offer.admin = Some(*addr);
        }
        if fds.len() > MAX_FDS {
            return Err(format!(
                "{} sockets are more than one message carries",
                fds.len()
            ));
        }
        let mut text = serde_json::to_vec(&offer).map_err(|e| e.to_string())?;
        text.push(b'\n');
        stream
            .send_with_fd(&text, &fds)
            .map_err(|e| e.to_string())?;
    }
    stream
        .set_read_timeout(Some(START_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut ready = String::new();
    reader.read_line(&mut ready).map_err(|e| e.to_string())?;
    if ready != "ready\n" {
        return Err("the new process did not start".into());
    }
    let mut w = stream;
    w.write_all(b"draining\n").map_err(|e| e.to_string())
}

/// Duplicates of `sockets`' descriptors, to offer a successor.
pub fn duplicates(sockets: &[&StdListener]) -> Vec<OwnedFd> {
    sockets
        .iter()
        .filter_map(|s| s.try_clone().ok().map(OwnedFd::from))
        .collect()
}
