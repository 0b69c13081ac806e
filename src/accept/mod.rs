//! A worker's listening sockets and their accept loops: a reload keeps the loops of the
//! listeners it keeps (`Listener::same_socket`) (under their new `ListenerId`), stops those it removes (they stop
//! accepting; their connections finish and close) and starts the ones it adds.

mod tls;

use std::cell::Cell;
use std::net::TcpListener as StdListener;
use std::rc::Rc;
use std::time::Duration;

use monoio::io::{CancelHandle, Canceller};
use monoio::net::TcpListener;
use monoio::task::JoinHandle;
use tracing::warn;

use crate::config::{Config, Listener, ListenerId};
use crate::proxy;
use crate::worker::{FirstRequest, Worker};

/// Whether an accept loop goes on, and how it ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    No,
    /// Shut the socket down: queued connections are reset rather than left unanswered.
    Close,
    /// Only stop accepting: a successor process accepts from the same socket.
    Leave,
}

/// One worker's listeners.
#[derive(Default)]
pub struct Listening {
    loops: Vec<AcceptLoop>,
}

struct AcceptLoop {
    /// The listener as configured (a reload keeps it if `same_socket`).
    config: Listener,
    id: Rc<Cell<ListenerId>>,
    /// Set before the loop's accept is cancelled, so that it ends rather than retries.
    stopping: Rc<Cell<Stop>>,
    canceller: Canceller,
    task: JoinHandle<()>,
}

impl Listening {
    /// Starts accepting on `sockets`, bound by the main thread for `config`'s listeners.
    pub fn add(
        &mut self,
        worker: &Rc<Worker>,
        config: &Config,
        sockets: Vec<(ListenerId, StdListener)>,
    ) -> std::io::Result<()> {
        for (id, socket) in sockets {
            let listener = TcpListener::from_std(socket)?;
            let canceller = Canceller::new();
            let cell = Rc::new(Cell::new(id));
            let stopping = Rc::new(Cell::new(Stop::No));
            let task = accept_loop(
                listener,
                Rc::clone(&cell),
                Rc::clone(&stopping),
                Rc::clone(worker),
                canceller.handle(),
            );
            self.loops.push(AcceptLoop {
                config: config.listeners[usize::from(id.0)].clone(),
                id: cell,
                stopping,
                canceller,
                task: monoio::spawn(task),
            });
        }
        Ok(())
    }

    /// Follows a reload: listeners `config` keeps take their new ids, the others stop
    /// accepting, and `added` (the new addresses' sockets) start.
    pub async fn reload(
        &mut self,
        worker: &Rc<Worker>,
        config: &Config,
        added: Vec<(ListenerId, StdListener)>,
    ) -> std::io::Result<()> {
        let mut kept = Vec::with_capacity(self.loops.len());
        for l in std::mem::take(&mut self.loops) {
            match config
                .listeners
                .iter()
                .position(|c| l.config.same_socket(c))
            {
                Some(i) => {
                    l.id.set(ListenerId(i as u16));
                    kept.push(l);
                }
                None => l.stop(Stop::Close).await,
            }
        }
        self.loops = kept;
        self.add(worker, config, added)
    }

    /// Stops every accept loop; returns once none is listening. `close`: shut the sockets
    /// down (false when a successor process accepts from them).
    pub async fn stop_all(&mut self, close: bool) {
        let how = if close { Stop::Close } else { Stop::Leave };
        for l in self.loops.drain(..) {
            l.stop(how).await;
        }
    }
}

impl AcceptLoop {
    async fn stop(self, how: Stop) {
        self.stopping.set(how);
        self.canceller.cancel();
        self.task.await;
    }
}

/// Takes the socket out of LISTEN at once, resetting connections still in its accept queue.
/// Dropping a monoio listener closes it only when the driver next submits, and not at all if the
/// runtime is gone by then; `shutdown` on a listening socket is synchronous.
fn stop_listening(listener: &TcpListener) {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the descriptor belongs to `listener`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) };
    if let Err(e) = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Read) {
        warn!(error = %e, "cannot stop listening");
    }
}

async fn accept_loop(
    listener: TcpListener,
    id: Rc<Cell<ListenerId>>,
    stopping: Rc<Cell<Stop>>,
    worker: Rc<Worker>,
    cancel: CancelHandle,
) {
    loop {
        match listener.cancelable_accept(cancel.clone()).await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let (w, id) = (Rc::clone(&worker), id.get());
                // Counted now, before its task runs: a drain starting meanwhile waits for it.
                let first = FirstRequest::new(&worker);
                if worker.is_tls(id) {
                    monoio::spawn(tls::serve(stream, peer, id, w, first));
                } else {
                    monoio::spawn(proxy::serve_accepted(stream, peer, id, w, first));
                }
            }
            Err(_) if stopping.get() != Stop::No => {
                if stopping.get() == Stop::Close {
                    stop_listening(&listener);
                }
                break;
            }
            Err(e) => {
                warn!(worker = worker.id, error = %e, "accept failed");
                // Out of descriptors or memory: back off rather than spin.
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
