//! An upstream connection's halves: cleartext TCP or TLS, chosen per upstream. An enum rather
//! than a type parameter, so that the pools, the forwarding code and the buffered client stay
//! one monomorphic path; the cost is one predictable branch per read or write.

use std::io;

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, CancelHandle, CancelableAsyncReadRent, OwnedReadHalf,
    OwnedWriteHalf,
};
use monoio::net::TcpStream;
use monoio::BufResult;

use crate::tls::{TlsReader, TlsWriter};

/// The TLS halves are boxed: a pooled connection is moved several times per request, and
/// unboxed they would make it 136 bytes instead of 80 (copied with `memcpy` calls rather
/// than a few moves).
pub enum UpRead {
    Plain(OwnedReadHalf<TcpStream>),
    Tls(Box<TlsReader>),
}

pub enum UpWrite {
    Plain(OwnedWriteHalf<TcpStream>),
    Tls(Box<TlsWriter>),
}

impl AsyncReadRent for UpRead {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpRead::Plain(r) => r.read(buf).await,
            UpRead::Tls(r) => r.read(buf).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpRead::Plain(r) => r.readv(buf).await,
            UpRead::Tls(r) => r.readv(buf).await,
        }
    }
}

impl CancelableAsyncReadRent for UpRead {
    async fn cancelable_read<T: IoBufMut>(
        &mut self,
        buf: T,
        c: CancelHandle,
    ) -> BufResult<usize, T> {
        match self {
            UpRead::Plain(r) => r.cancelable_read(buf, c).await,
            UpRead::Tls(r) => r.cancelable_read(buf, c).await,
        }
    }

    async fn cancelable_readv<T: IoVecBufMut>(
        &mut self,
        buf: T,
        c: CancelHandle,
    ) -> BufResult<usize, T> {
        match self {
            UpRead::Plain(r) => r.cancelable_readv(buf, c).await,
            UpRead::Tls(r) => r.cancelable_readv(buf, c).await,
        }
    }
}

impl AsyncWriteRent for UpWrite {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpWrite::Plain(w) => w.write(buf).await,
            UpWrite::Tls(w) => w.write(buf).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpWrite::Plain(w) => w.writev(buf).await,
            UpWrite::Tls(w) => w.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            UpWrite::Plain(w) => w.flush().await,
            UpWrite::Tls(w) => w.flush().await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            UpWrite::Plain(w) => w.shutdown().await,
            UpWrite::Tls(w) => w.shutdown().await,
        }
    }
}
