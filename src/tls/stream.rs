//! TLS over a monoio TCP stream, on rustls's buffered API, with halves the pipeline can read
//! and write at once.
//!
//! Our own adapter rather than monoio-rustls 0.4: the pipeline needs reads that a deadline can
//! cancel without losing what they read (`CancelableAsyncReadRent`; monoio-rustls drops the
//! ciphertext of a cancelled read, which corrupts the session), and halves that are really
//! separate (monoio-rustls shares one `&mut` stream between both through an `UnsafeCell`).
//! Here each half owns its TCP half and its ciphertext buffer and borrows the rustls
//! connection, in an `Rc<RefCell<_>>`, only between awaits.

use std::cell::RefCell;
use std::io::{self, BufRead as _, Write as _};
use std::rc::Rc;

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut, RawBuf};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent,
    OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::Connection;

use super::TlsInfo;

/// Ciphertext read per system call: one full record.
const CIPHER_READ: usize = 16 * 1024 + 256;
/// Plaintext taken per write call, so the ciphertext buffer stays bounded (`write_all` loops).
const PLAIN_WRITE: usize = 64 * 1024;

/// A TLS connection whose handshake is done.
pub struct TlsStream {
    tcp: TcpStream,
    conn: Connection,
    /// Ciphertext read past the handshake's last record (a client's first request, often).
    cin: Vec<u8>,
    info: TlsInfo,
}

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// The peer closed (or reset) before it was done.
    Closed,
    /// rustls refused it; an alert was sent.
    Tls(rustls::Error),
    Io(io::Error),
}

impl TlsStream {
    pub fn info(&self) -> &TlsInfo {
        &self.info
    }

    pub fn into_halves(self) -> (TlsReader, TlsWriter) {
        let conn = Rc::new(RefCell::new(self.conn));
        let (r, w) = self.tcp.into_split();
        let reader = TlsReader {
            tcp: r,
            conn: Rc::clone(&conn),
            cin: self.cin,
            fed: 0,
        };
        let writer = TlsWriter {
            tcp: w,
            conn,
            cout: Vec::new(),
        };
        (reader, writer)
    }
}

/// Runs the handshake of `conn` on `tcp`, starting with `cin` (bytes already read). The caller
/// bounds it in time. On failure whatever rustls has to say (an alert) is sent first.
pub async fn handshake(
    mut tcp: TcpStream,
    mut conn: Connection,
    mut cin: Vec<u8>,
) -> Result<TlsStream, HandshakeError> {
    let mut cout = Vec::new();
    let mut fed = 0;
    loop {
        if conn.wants_write() {
            cout.clear();
            while conn.wants_write() {
                conn.write_tls(&mut cout).map_err(HandshakeError::Io)?;
            }
            let (res, buf) = tcp.write_all(std::mem::take(&mut cout)).await;
            cout = buf;
            res.map_err(HandshakeError::Io)?;
        }
        if !conn.is_handshaking() {
            break;
        }
        if fed == cin.len() {
            cin.clear();
            fed = 0;
            cin.reserve(CIPHER_READ);
            let (res, buf) = tcp.read(cin).await;
            cin = buf;
            match res {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) => {}
                Err(e) if is_reset(&e) => return Err(HandshakeError::Closed),
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
        fed += feed(&mut conn, &cin[fed..]).map_err(HandshakeError::Io)?;
        if let Err(e) = conn.process_new_packets() {
            // The alert rustls queued is worth one attempt; the connection closes after it.
            cout.clear();
            while conn.wants_write() && conn.write_tls(&mut cout).is_ok() {}
            let _ = tcp.write_all(cout).await;
            return Err(HandshakeError::Tls(e));
        }
    }
    cin.drain(..fed);
    let info = TlsInfo::of(&conn);
    Ok(TlsStream {
        tcp,
        conn,
        cin,
        info,
    })
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// Gives rustls what it will take of `bytes`; how much it took.
fn feed(conn: &mut Connection, mut bytes: &[u8]) -> io::Result<usize> {
    let before = bytes.len();
    conn.read_tls(&mut bytes)?;
    Ok(before - bytes.len())
}

/// The reading half: decrypts into the caller's buffer.
pub struct TlsReader {
    tcp: OwnedReadHalf<TcpStream>,
    conn: Rc<RefCell<Connection>>,
    cin: Vec<u8>,
    /// How much of `cin` rustls has taken.
    fed: usize,
}

enum Step {
    Done(io::Result<usize>),
    NeedBytes,
}

impl TlsReader {
    /// Copies decrypted bytes into `buf`, feeding rustls what is already read; `NeedBytes`
    /// when only a read from the socket can help.
    fn step<T: IoBufMut>(&mut self, buf: &mut T) -> Step {
        let mut conn = self.conn.borrow_mut();
        loop {
            let mut reader = conn.reader();
            match reader.fill_buf() {
                Ok(chunk) => {
                    let n = chunk.len().min(buf.bytes_total());
                    // SAFETY: `buf` has room for `bytes_total()` bytes at `write_ptr()`, which
                    // does not overlap rustls's buffer; the first `n` are initialised here.
                    unsafe {
                        std::ptr::copy_nonoverlapping(chunk.as_ptr(), buf.write_ptr(), n);
                        buf.set_init(n);
                    }
                    reader.consume(n);
                    return Step::Done(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // A TCP close without close_notify: HTTP/1.1 framing says where messages
                // end, so this is the end of the stream like any other.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Step::Done(Ok(0)),
                Err(e) => return Step::Done(Err(e)),
            }
            if self.fed == self.cin.len() {
                return Step::NeedBytes;
            }
            match feed(&mut conn, &self.cin[self.fed..]) {
                Ok(n) => self.fed += n,
                Err(e) => return Step::Done(Err(e)),
            }
            if let Err(e) = conn.process_new_packets() {
                return Step::Done(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }

    async fn read_into<T: IoBufMut>(
        &mut self,
        mut buf: T,
        cancel: Option<CancelHandle>,
    ) -> BufResult<usize, T> {
        loop {
            match self.step(&mut buf) {
                Step::Done(res) => return (res, buf),
                Step::NeedBytes => {}
            }
            let mut cin = std::mem::take(&mut self.cin);
            cin.clear();
            self.fed = 0;
            cin.reserve(CIPHER_READ);
            let (res, got) = match &cancel {
                Some(c) => self.tcp.cancelable_read(cin, c.clone()).await,
                None => self.tcp.read(cin).await,
            };
            self.cin = got;
            match res {
                Ok(0) => {
                    // End of stream: rustls learns it from an empty read.
                    let _ = feed(&mut self.conn.borrow_mut(), &[]);
                }
                Ok(_) => {}
                // A cancelled read returns here with nothing lost: what it read, if it read
                // before the cancel took, was kept above.
                Err(e) => return (Err(e), buf),
            }
        }
    }
}

impl AsyncReadRent for TlsReader {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        self.read_into(buf, None).await
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        // SAFETY: the raw buffer is the first iovec of `buf`, which outlives the read.
        let res = match unsafe { RawBuf::new_from_iovec_mut(&mut buf) } {
            Some(raw) => self.read(raw).await.0,
            None => Ok(0),
        };
        if let Ok(n) = res {
            // SAFETY: `n` bytes of the first iovec were just written.
            unsafe { buf.set_init(n) };
        }
        (res, buf)
    }
}

impl CancelableAsyncReadRent for TlsReader {
    async fn cancelable_read<T: IoBufMut>(
        &mut self,
        buf: T,
        c: CancelHandle,
    ) -> BufResult<usize, T> {
        self.read_into(buf, Some(c)).await
    }

    async fn cancelable_readv<T: IoVecBufMut>(
        &mut self,
        mut buf: T,
        c: CancelHandle,
    ) -> BufResult<usize, T> {
        // SAFETY: as in `readv`.
        let res = match unsafe { RawBuf::new_from_iovec_mut(&mut buf) } {
            Some(raw) => self.cancelable_read(raw, c).await.0,
            None => Ok(0),
        };
        if let Ok(n) = res {
            // SAFETY: as in `readv`.
            unsafe { buf.set_init(n) };
        }
        (res, buf)
    }
}

/// The writing half: encrypts the caller's bytes and sends them.
pub struct TlsWriter {
    tcp: OwnedWriteHalf<TcpStream>,
    conn: Rc<RefCell<Connection>>,
    cout: Vec<u8>,
}

impl TlsWriter {
    /// Sends whatever rustls has queued: records just written, and anything the reading half
    /// left (a key update's answer, an alert).
    async fn flush_tls(&mut self) -> io::Result<()> {
        self.cout.clear();
        {
            let mut conn = self.conn.borrow_mut();
            while conn.wants_write() {
                conn.write_tls(&mut self.cout)?;
            }
        }
        if self.cout.is_empty() {
            return Ok(());
        }
        let (res, buf) = self.tcp.write_all(std::mem::take(&mut self.cout)).await;
        self.cout = buf;
        res.map(drop)
    }

    /// Encrypts up to `PLAIN_WRITE` bytes of `parts`; how many it took.
    fn encrypt<'a>(&mut self, parts: impl Iterator<Item = &'a [u8]>) -> io::Result<usize> {
        let mut conn = self.conn.borrow_mut();
        let mut writer = conn.writer();
        let mut taken = 0;
        for part in parts {
            let part = &part[..part.len().min(PLAIN_WRITE - taken)];
            let n = writer.write(part)?;
            taken += n;
            if n < part.len() || taken == PLAIN_WRITE {
                break;
            }
        }
        Ok(taken)
    }
}

impl AsyncWriteRent for TlsWriter {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        // SAFETY: `buf` holds `bytes_init()` initialised bytes at `read_ptr()`.
        let plain = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let res = match self.encrypt(std::iter::once(plain)) {
            Ok(n) => self.flush_tls().await.map(|()| n),
            Err(e) => Err(e),
        };
        (res, buf)
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        let (ptr, len) = (buf.read_iovec_ptr(), buf.read_iovec_len());
        // SAFETY: `buf` holds `len` valid iovecs at `ptr`, each naming initialised bytes, and
        // is owned by this call until it returns.
        let parts = (0..len).map(|i| unsafe {
            let v = &*ptr.add(i);
            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
        });
        let res = match self.encrypt(parts) {
            Ok(n) => self.flush_tls().await.map(|()| n),
            Err(e) => Err(e),
        };
        (res, buf)
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.flush_tls().await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        self.conn.borrow_mut().send_close_notify();
        self.flush_tls().await?;
        self.tcp.shutdown().await
    }
}
