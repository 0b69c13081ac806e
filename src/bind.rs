//! The main thread's listening sockets: one per worker per listener (SO_REUSEPORT, so the
//! kernel spreads connections across workers), bound here or inherited from the process being
//! upgraded; and the duplicates the main thread keeps to hand to a successor.

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::OwnedFd;

use socket2::{Domain, Protocol, Socket, Type};
use tracing::info;

use crate::config::{Listener, ListenerId};
use crate::upgrade::{self, Handed};

const BACKLOG: i32 = 4096;

/// Sockets per worker: `[worker][..]`.
pub type PerWorker = Vec<Vec<(ListenerId, StdListener)>>;

/// Sockets for `listener` (number `id` of its config), spread over `workers`: the ones `handed`
/// has for it (all of them, so that no accept queue is closed), joined by new ones when there
/// are more workers than sockets; else freshly bound. Returns the duplicates to offer a
/// successor.
pub fn listen(
    id: ListenerId,
    listener: &Listener,
    workers: usize,
    handed: Option<&mut Handed>,
    into: &mut PerWorker,
) -> io::Result<Vec<OwnedFd>> {
    let mut sockets = handed.map_or_else(Vec::new, |h| h.take_listener(listener));
    let inherited = sockets.len();
    if sockets.is_empty() {
        sockets = bind_reuseport(listener.addr, workers)?;
    } else {
        let actual = sockets[0].local_addr()?;
        if sockets.len() < workers {
            sockets.extend(join_reuseport(actual, workers - sockets.len())?);
        }
        for s in &sockets {
            s.set_nonblocking(true)?;
        }
    }
    let addr = sockets[0].local_addr().unwrap_or(listener.addr);
    let count = sockets.len();
    info!(listener = %listener.name, address = %addr, sockets = count, inherited, "listening");
    let offered = upgrade::duplicates(&sockets.iter().collect::<Vec<_>>());
    for (i, s) in sockets.into_iter().enumerate() {
        into[i % workers].push((id, s));
    }
    Ok(offered)
}

/// Binds `count` sockets to `addr` with SO_REUSEPORT. The first binds before the option is
/// set, so that it fails with "address in use" if anyone already holds the address — even a
/// leftover process that set SO_REUSEPORT itself and would otherwise silently share the port.
pub fn bind_reuseport(addr: SocketAddr, count: usize) -> io::Result<Vec<StdListener>> {
    let first = socket(false, addr)?;
    first.set_reuse_port(true)?;
    first.listen(BACKLOG)?;
    first.set_nonblocking(true)?;
    let first: StdListener = first.into();
    let actual = first.local_addr()?;
    let mut out = vec![first];
    out.extend(join_reuseport(actual, count - 1)?);
    Ok(out)
}

/// `count` more sockets in the SO_REUSEPORT group listening on `addr`.
fn join_reuseport(addr: SocketAddr, count: usize) -> io::Result<Vec<StdListener>> {
    (0..count)
        .map(|_| {
            let s = socket(true, addr)?;
            s.listen(BACKLOG)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .collect()
}

fn socket(reuse_port: bool, addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s)
}
