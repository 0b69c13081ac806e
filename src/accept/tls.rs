//! A TLS listener's connection: admitted like any other, handshaken within the listener's
//! `handshake_timeout`, then served by the same pipeline as cleartext. What is not TLS is told
//! apart first: a plain HTTP request gets a 400 that says so (as nginx does), other bytes a
//! close, and every refusal is counted under its reason.

use std::net::SocketAddr;
use std::rc::Rc;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use rustls::server::ServerConnection;
use rustls::Connection;
use tracing::debug;

use crate::config::ListenerId;
use crate::deadline::TimedOut;
use crate::error::Reject;
use crate::tls::{handshake, HandshakeError, TlsStream};
use crate::worker::{FirstRequest, Worker};

/// TLS records start with a content type; a ClientHello comes in a handshake record.
const HANDSHAKE_RECORD: u8 = 0x16;
const FIRST_READ: usize = 16 * 1024 + 256;

const PLAIN_HTTP_REPLY: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
content-length: 49\r\nconnection: close\r\n\r\n{\"error\":\"plain HTTP request sent to a TLS port\"}";

/// Serves one connection accepted on TLS listener `listener` (`first` counts it from the
/// accept to the end of its first request).
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    listener: ListenerId,
    w: Rc<Worker>,
    first: FirstRequest,
) {
    let Some(_active) = w.admit_connection(peer) else {
        return;
    };
    let Some((config, timeout)) = w.tls_config(listener) else {
        return;
    };
    let conn = match ServerConnection::new(config) {
        Ok(c) => c,
        Err(e) => {
            debug!(worker = w.id, error = %e, "cannot start a TLS session");
            return;
        }
    };
    let outcome = {
        let deadline = w.deadlines.slot();
        deadline.within(timeout, start(tcp, conn)).await
    };
    let reject = match outcome {
        Ok(Ok(stream)) => {
            crate::proxy::serve_admitted(stream, peer, listener, &w, first).await;
            return;
        }
        Ok(Err(Refused::Closed)) => None,
        Ok(Err(Refused::PlainHttp)) => Some(Reject::TlsPlainHttp),
        Ok(Err(Refused::NotTls)) => Some(Reject::TlsNotTls),
        Ok(Err(Refused::ClientCertificate(e))) => {
            debug!(worker = w.id, %peer, error = %e, "TLS client certificate refused");
            Some(Reject::TlsClientCertificate)
        }
        Ok(Err(Refused::Handshake(e))) => {
            debug!(worker = w.id, %peer, error = %e, "TLS handshake failed");
            Some(Reject::TlsHandshakeFailed)
        }
        Err(TimedOut) => Some(Reject::TlsHandshakeTimeout),
    };
    if let Some(r) = reject {
        w.count_rejection(r);
    }
}

enum Refused {
    Closed,
    PlainHttp,
    NotTls,
    ClientCertificate(rustls::Error),
    Handshake(String),
}

/// Reads the first bytes, tells TLS from the rest, and runs the handshake.
async fn start(mut tcp: TcpStream, conn: ServerConnection) -> Result<TlsStream, Refused> {
    let (res, first) = tcp.read(Vec::with_capacity(FIRST_READ)).await;
    match res {
        Ok(n) if n > 0 => {}
        _ => return Err(Refused::Closed),
    }
    if first[0] != HANDSHAKE_RECORD {
        if looks_like_http(&first) {
            let _ = tcp.write_all(PLAIN_HTTP_REPLY).await;
            return Err(Refused::PlainHttp);
        }
        return Err(Refused::NotTls);
    }
    handshake(tcp, Connection::Server(conn), first)
        .await
        .map_err(|e| match e {
            HandshakeError::Closed => Refused::Closed,
            HandshakeError::Io(e) => Refused::Handshake(e.to_string()),
            HandshakeError::Tls(
                e @ (rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_)),
            ) => Refused::ClientCertificate(e),
            HandshakeError::Tls(e) => Refused::Handshake(e.to_string()),
        })
}

/// A method token and a space: what every HTTP/1 request starts with, and no TLS record can.
fn looks_like_http(bytes: &[u8]) -> bool {
    let method = bytes.iter().take_while(|b| b.is_ascii_uppercase()).count();
    (3..=10).contains(&method) && bytes.get(method) == Some(&b' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_told_from_tls_and_garbage() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"OPTIONS * HTTP/1.1\r\n"));
        assert!(!looks_like_http(b"\x16\x03\x01\x02\x00"));
        assert!(!looks_like_http(b"GE"));
        assert!(!looks_like_http(b"hello world"));
        assert_eq!(
            PLAIN_HTTP_REPLY.len()
                - PLAIN_HTTP_REPLY
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .unwrap()
                - 4,
            49
        );
    }
}
