//! The admin listener runs on its own thread with its own (epoll) runtime, so that a scrape or
//! a probe never takes time from a worker. It answers `GET /healthz` (the process is alive) and
//! `GET /readyz` (every worker has bound its listeners and the gateway is not draining).
//! One request per connection.

use std::net::TcpListener as StdListener;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use monoio::io::AsyncWriteRentExt;
use monoio::net::{TcpListener, TcpStream};
use monoio::{LegacyDriver, RuntimeBuilder};
use tracing::warn;

use crate::buffer::ReadBuf;
use crate::config::Limits;
use crate::http::write::{generated_response, Generated};
use crate::http::{parse_request, RequestHead, Version};

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Lifecycle state shared between the main thread and the admin thread (never a worker).
pub struct AdminState(AtomicU8);

impl AdminState {
    pub fn new() -> Self {
        AdminState(AtomicU8::new(STARTING))
    }

    pub fn set_ready(&self) {
        self.0.store(READY, Ordering::Release);
    }

    pub fn set_draining(&self) {
        self.0.store(DRAINING, Ordering::Release);
    }

    fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
}

impl Default for AdminState {
    fn default() -> Self {
        Self::new()
    }
}

pub fn spawn(listener: StdListener, state: Arc<AdminState>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    thread::Builder::new()
        .name("ringway-admin".into())
        .spawn(move || {
            let rt = RuntimeBuilder::<LegacyDriver>::new().enable_timer().build();
            match rt {
                Ok(mut rt) => rt.block_on(serve(listener, state)),
                Err(e) => warn!(error = %e, "admin runtime failed to start"),
            }
        })?;
    Ok(())
}

async fn serve(listener: StdListener, state: Arc<AdminState>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "admin listener failed");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                monoio::spawn(handle(stream, Arc::clone(&state)));
            }
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, state: Arc<AdminState>) {
    let limits = Limits::default();
    let mut rbuf = ReadBuf::new();
    let mut head = RequestHead::default();
    let max = limits.max_request_line_bytes + limits.max_header_bytes + 4096;
    let parsed = loop {
        match monoio::time::timeout(READ_TIMEOUT, rbuf.fill(&mut stream, max)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
        match parse_request(rbuf.data(), &limits, &mut head) {
            Ok(true) => break true,
            Ok(false) => continue,
            Err(_) => break false,
        }
    };
    let path = head.path.get(rbuf.data());
    let path = path.split(|&b| b == b'?').next().unwrap_or(path);
    let (status, body): (u16, &[u8]) = if !parsed {
        (400, b"{\"error\":\"bad request\"}")
    } else {
        match path {
            b"/healthz" => (200, b"{\"status\":\"ok\"}"),
            b"/readyz" => match state.get() {
                READY => (200, b"{\"status\":\"ready\"}"),
                DRAINING => (503, b"{\"status\":\"draining\"}"),
                _ => (503, b"{\"status\":\"starting\"}"),
            },
            _ => (404, b"{\"error\":\"not found\"}"),
        }
    };
    let mut out = Vec::with_capacity(256);
    generated_response(
        &mut out,
        &Generated {
            status,
            headers: b"content-type: application/json\r\n",
            body,
            head_only: false,
            keep_alive: false,
            client_version: Version::Http11,
            request_id: b"admin",
        },
    );
    let _ = monoio::time::timeout(READ_TIMEOUT, stream.write_all(out)).await;
}
