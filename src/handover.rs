//! Each worker's own descriptor table, and how its listening sockets reach it.
//!
//! Every socket system call looks its descriptor up in the calling thread's table. While
//! several threads share that table (as threads do by default), the kernel takes and drops a
//! reference on the file around each call, two atomic operations per call; on a table with one
//! user it skips both (`fdget`). perf showed them at 1.6% of an epoll worker's time against
//! 0.66% of an nginx worker's (a process of its own). So each worker thread takes a table of
//! its own as it starts (`unshare(CLONE_FILES)`) and closes its copies of everything it did not
//! come for, so that no socket outlives its owner through a stray copy.
//!
//! The main thread still binds every listener (at start, on reload, or inherited in an upgrade),
//! so a descriptor it opens later would mean nothing in a worker's table. It sends each worker
//! its sockets over a Unix socket pair with SCM_RIGHTS (the kernel installs them in the
//! receiver's table), whether or not the worker's table is its own. Each batch carries a number
//! that the worker's control message names, so sockets of a reload whose control message never
//! arrived are closed rather than mistaken for the next reload's.

use std::io;
use std::net::TcpListener as StdListener;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use sendfd::{RecvWithFd, SendWithFd};
use tracing::info;

use crate::config::ListenerId;

/// The most descriptors one message carries (the kernel's SCM_MAX_FD is 253).
const MAX_FDS: usize = 250;
/// How long the main thread waits to hand a worker its sockets when the worker's socket buffer
/// is full (a worker that has not read for that long is stuck).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The main thread's end of a worker's link: sends it sockets.
pub struct Outbox {
    stream: UnixStream,
    next: u64,
}

/// The worker's end of the link, in the main thread's table until the worker has taken it
/// (`own_table`): the main thread drops it once the worker has reported in.
pub struct WorkerEnd(OwnedFd);

/// The worker's end of its link, in its own table.
pub struct Inbox(UnixStream);

/// Sockets sent to a worker, as its control message names them: the batch number and the
/// listener of each socket, in the order they were sent.
pub struct Parcel {
    batch: u64,
    ids: Vec<ListenerId>,
}

/// A link from the main thread to one worker.
pub fn link() -> io::Result<(Outbox, WorkerEnd)> {
    let (main, worker) = UnixStream::pair()?;
    main.set_write_timeout(Some(SEND_TIMEOUT))?;
    // The sockets of a control message are sent before it, so they are always there when the
    // worker looks; were they not, the worker reports an error rather than waits.
    worker.set_nonblocking(true)?;
    Ok((
        Outbox {
            stream: main,
            next: 0,
        },
        WorkerEnd(worker.into()),
    ))
}

impl Outbox {
    /// Sends `sockets` (closing them here: they are the worker's now) and returns the parcel to
    /// put in the worker's control message.
    pub fn send(&mut self, sockets: Vec<(ListenerId, StdListener)>) -> io::Result<Parcel> {
        let batch = self.next;
        self.next += 1;
        let mut ids = Vec::with_capacity(sockets.len());
        let mut fds = Vec::with_capacity(sockets.len());
        for (id, s) in &sockets {
            ids.push(*id);
            fds.push(s.as_raw_fd());
        }
        for chunk in fds.chunks(MAX_FDS) {
            let sent = self.stream.send_with_fd(&batch.to_le_bytes(), chunk)?;
            if sent != 8 {
                return Err(io::Error::other("a worker's socket parcel was cut short"));
            }
        }
        Ok(Parcel { batch, ids })
    }
}

impl WorkerEnd {
    /// The descriptor's number, for the worker thread to take (`own_table`).
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Gives the calling thread a descriptor table of its own holding only stdin/out/err and `end`
/// (a `WorkerEnd`'s number, which the main thread keeps open until this thread reports in),
/// and returns `end` as this thread's `Inbox`. Where the kernel refuses (no `close_range`,
/// before Linux 5.9, or a sandbox that forbids `unshare`), worker `worker` keeps sharing the
/// process's table, says so in the log, and takes a duplicate of `end`.
pub fn own_table(worker: usize, end: RawFd) -> io::Result<Inbox> {
    // An empty range past every descriptor: succeeds exactly where close_range exists.
    let own = close_range(u32::MAX, u32::MAX).is_ok()
        // SAFETY: unshare(CLONE_FILES) only replaces this thread's table with a copy of it.
        && unsafe { libc::unshare(libc::CLONE_FILES) } == 0;
    if !own {
        info!(
            worker,
            "sharing the process's descriptor table (no unshare or close_range here)"
        );
        // SAFETY: the main thread keeps `end` open until this thread reports in.
        let dup = unsafe { BorrowedFd::borrow_raw(end) }.try_clone_to_owned()?;
        return Ok(Inbox(dup.into()));
    }
    // This thread owns nothing yet, so closing every other copy closes nothing it uses.
    let keep = end as u32;
    if keep >= 3 {
        if keep > 3 {
            close_range(3, keep - 1)?;
        }
        close_range(keep + 1, u32::MAX)?;
    } else {
        close_range(3, u32::MAX)?;
    }
    // SAFETY: `end` is open in this table (copied by unshare) and nothing else here owns it.
    let stream = unsafe { UnixStream::from_raw_fd(end) };
    Ok(Inbox(stream))
}

fn close_range(first: u32, last: u32) -> io::Result<()> {
    // SAFETY: closes descriptors of this thread's table only; no argument is a pointer.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Inbox {
    /// The sockets `parcel` names, as they arrived. Sockets of earlier batches still waiting
    /// (their control message was never delivered) are closed.
    pub fn receive(&self, parcel: Parcel) -> io::Result<Vec<(ListenerId, StdListener)>> {
        let mut got: Vec<OwnedFd> = Vec::with_capacity(parcel.ids.len());
        while got.len() < parcel.ids.len() {
            let mut batch = [0u8; 8];
            let mut fds: [RawFd; MAX_FDS] = [-1; MAX_FDS];
            let (n, count) = self.0.recv_with_fd(&mut batch, &mut fds)?;
            // SAFETY: the kernel installed `count` new descriptors in this table for us;
            // nothing else owns them.
            let owned: Vec<OwnedFd> = fds[..count]
                .iter()
                .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
                .collect();
            if n != batch.len() {
                return Err(io::Error::other("a socket parcel arrived cut short"));
            }
            match u64::from_le_bytes(batch).cmp(&parcel.batch) {
                // An earlier batch's: dropping closes them.
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => got.extend(owned),
                std::cmp::Ordering::Greater => {
                    return Err(io::Error::other("a socket parcel went missing"))
                }
            }
        }
        if got.len() != parcel.ids.len() {
            return Err(io::Error::other("more sockets arrived than were sent"));
        }
        Ok(parcel
            .ids
            .into_iter()
            .zip(got.into_iter().map(StdListener::from))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn listener() -> StdListener {
        StdListener::bind("127.0.0.1:0").unwrap()
    }

    #[test]
    fn a_thread_with_its_own_table_gets_only_the_sockets_of_its_parcel() {
        let (mut outbox, end) = link().unwrap();
        let before = listener();
        let stale = outbox.send(vec![(ListenerId(7), listener())]).unwrap();
        drop(stale); // its control message never arrives
        let wanted = listener();
        let addr = wanted.local_addr().unwrap();
        let parcel = outbox.send(vec![(ListenerId(3), wanted)]).unwrap();
        let (raw, other) = (end.raw(), before.as_raw_fd());
        let worker = std::thread::spawn(move || {
            let inbox = own_table(0, raw).unwrap();
            // SAFETY: F_GETFD only asks whether the number is open in this thread's table.
            let open = unsafe { libc::fcntl(other, libc::F_GETFD) } != -1;
            assert!(!open, "a copy of the main thread's socket stayed open");
            let mut got = inbox.receive(parcel).unwrap();
            assert_eq!(got.len(), 1);
            let (id, socket) = got.remove(0);
            assert_eq!(id, ListenerId(3));
            let (mut conn, _) = socket.accept().unwrap();
            conn.write_all(b"hi").unwrap();
        });
        let mut client = TcpStream::connect(addr).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "hi");
        worker.join().unwrap();
        // This thread's table is the process's: its own socket is still open here.
        assert!(before.local_addr().is_ok());
        drop(end);
    }

    #[test]
    fn sockets_not_yet_sent_are_an_error_not_a_wait() {
        let (_outbox, end) = link().unwrap();
        let inbox = Inbox(end.0.try_clone().unwrap().into());
        let parcel = Parcel {
            batch: 0,
            ids: vec![ListenerId(0)],
        };
        let e = inbox.receive(parcel).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
