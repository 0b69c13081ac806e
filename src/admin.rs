//! The admin listener runs on its own thread with its own (epoll) runtime, so that a scrape or
//! a probe never takes time from a worker. It also hosts the metrics aggregator, which drains
//! the workers' snapshots from their crossbeam channel.
//!
//! - `GET /healthz`: the process is alive.
//! - `GET /readyz`: every worker has bound its listeners and the gateway is not draining.
//! - `GET /metrics`: Prometheus text exposition format 0.0.4.
//! - `GET /metrics/hdr?route=NAME`: a route's latency in HdrHistogram's percentile text.
//! - `GET /status`: JSON with per-worker and merged figures.
//! - `POST /cache/purge`: `{"prefix": "/api/"}` or `{"key": "/path?q"}`, on every worker.
//! - `POST /config/reload`: re-reads the config file (as SIGHUP does); 200 with the new
//!   generation, or 400 (invalid, with file:line:column and key), 409 (needs a restart), 500.
//!
//! One request per connection.

use std::cell::RefCell;
use std::net::TcpListener as StdListener;
use std::rc::Rc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use monoio::io::AsyncWriteRentExt;
use monoio::net::{TcpListener, TcpStream};
use monoio::{LegacyDriver, RuntimeBuilder};
use tracing::warn;

use crate::buffer::ReadBuf;
use crate::cache::coherence::Purged;
use crate::cache::{Batch, Change};
use crate::config::Config;
use crate::http::write::{generated_response, Generated};
use crate::http::{
    parse_request, BodyLength, HeaderEdits, Method, NameSet, ParseLimits, RequestHead, Version,
};
use crate::metrics::aggregate::Aggregate;
use crate::metrics::render::{self, Process};
use crate::metrics::Snapshot;
use crate::reload::{answer_json, ReloadStatus};
use crate::tls::watch::CertExpiries;

/// `POST /cache/purge` with `{"prefix": "/api/"}` or `{"key": "/exact/target?q"}`: removes
/// matching entries on every worker: each applies it before its next lookup, so a request sent
/// after the answer never sees a purged entry.
fn purge(body: &[u8], workers: &[Sender<Batch>]) -> (u16, &'static [u8], Vec<u8>) {
    const JSON: &[u8] = b"content-type: application/json\r\n";
    if workers.is_empty() {
        return (404, JSON, br#"{"error":"no [cache] configured"}"#.to_vec());
    }
    let request: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            return (
                400,
                JSON,
                br#"{"error":"expected {\"prefix\": ...} or {\"key\": ...}"}"#.to_vec(),
            )
        }
    };
    let change = match (request["prefix"].as_str(), request["key"].as_str()) {
        (Some(p), None) => Purged::Prefix(p.as_bytes().into()),
        (None, Some(k)) => Purged::Target(k.as_bytes().into()),
        _ => {
            return (
                400,
                JSON,
                br#"{"error":"expected {\"prefix\": ...} or {\"key\": ...}"}"#.to_vec(),
            )
        }
    };
    let batch: Batch = Arc::new(vec![Change::Purge(Arc::new(change), Instant::now())]);
    let sent = workers
        .iter()
        .filter(|w| w.try_send(Arc::clone(&batch)).is_ok())
        .count();
    let reply = serde_json::json!({ "purge": "sent", "workers": sent });
    (202, JSON, reply.to_string().into_bytes())
}

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the aggregator drains the workers' snapshots.
const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// State shared between the main thread, the TLS watcher and the admin thread (never a
/// worker): the lifecycle phase and the served certificates' expiry dates.
pub struct AdminState {
    phase: AtomicU8,
    pub certs: Arc<CertExpiries>,
    /// Remote JWKS fetches, written by the fetcher.
    pub jwks: Arc<crate::auth::jwks::JwksStatus>,
    /// Active health checks' view of each probed target, written by the prober.
    pub health: Arc<crate::upstream::health::HealthStatus>,
    /// The config in use, reload outcomes, and the way to ask for a reload.
    pub reload: Arc<ReloadStatus>,
}

impl AdminState {
    pub fn new(reload: Arc<ReloadStatus>) -> Self {
        AdminState {
            phase: AtomicU8::new(STARTING),
            certs: Arc::default(),
            jwks: Arc::default(),
            health: Arc::default(),
            reload,
        }
    }

    pub fn set_ready(&self) {
        self.phase.store(READY, Ordering::Release);
    }

    pub fn set_draining(&self) {
        self.phase.store(DRAINING, Ordering::Release);
    }

    fn get(&self) -> u8 {
        self.phase.load(Ordering::Acquire)
    }

    fn process(&self, agg: &Aggregate) -> Process {
        let mut p = Process::read(agg);
        p.tls_certs = self.certs.snapshot();
        p.jwks = self.jwks.snapshot();
        p.health = self.health.snapshot();
        p.config = Some(self.reload.loaded());
        p.reloads = self.reload.counts();
        p
    }
}

pub fn spawn(
    listener: StdListener,
    state: Arc<AdminState>,
    config: Arc<Config>,
    snapshots: Receiver<Snapshot>,
    cache_purge: Vec<Sender<Batch>>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    thread::Builder::new()
        .name("ringway-admin".into())
        .spawn(move || {
            let rt = RuntimeBuilder::<LegacyDriver>::new().enable_timer().build();
            match rt {
                Ok(mut rt) => rt.block_on(serve(listener, state, &config, snapshots, cache_purge)),
                Err(e) => warn!(error = %e, "admin runtime failed to start"),
            }
        })?;
    Ok(())
}

async fn serve(
    listener: StdListener,
    state: Arc<AdminState>,
    config: &Arc<Config>,
    snapshots: Receiver<Snapshot>,
    cache_purge: Vec<Sender<Batch>>,
) {
    let cache_purge = Rc::new(cache_purge);
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "admin listener failed");
            return;
        }
    };
    let aggregate = Rc::new(RefCell::new(Aggregate::new(config)));
    let agg = Rc::clone(&aggregate);
    monoio::spawn(async move {
        loop {
            monoio::time::sleep(DRAIN_EVERY).await;
            let mut agg = agg.borrow_mut();
            for snapshot in snapshots.try_iter() {
                agg.merge(snapshot);
            }
        }
    });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                monoio::spawn(handle(
                    stream,
                    Arc::clone(&state),
                    Rc::clone(&aggregate),
                    Rc::clone(&cache_purge),
                ));
            }
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(
    mut stream: TcpStream,
    state: Arc<AdminState>,
    aggregate: Rc<RefCell<Aggregate>>,
    cache_purge: Rc<Vec<Sender<Batch>>>,
) {
    let limits = ParseLimits::default();
    let mut rbuf = ReadBuf::new();
    let mut head = RequestHead::default();
    let max = limits.max_request_line_bytes + limits.max_header_bytes + 4096;
    let parsed = loop {
        match monoio::time::timeout(READ_TIMEOUT, rbuf.fill(&mut stream, max)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
        match parse_request(rbuf.data(), &limits, &NameSet::default(), &mut head) {
            Ok(true) => break true,
            Ok(false) => continue,
            Err(_) => break false,
        }
    };
    let target = head.path.get(rbuf.data()).to_vec();
    // A small request body (for POST /cache/purge).
    let body = match head.body {
        BodyLength::Length(n) if parsed && n <= 64 * 1024 => {
            rbuf.consume(head.len);
            let n = n as usize;
            while rbuf.len() < n {
                match monoio::time::timeout(READ_TIMEOUT, rbuf.fill(&mut stream, max + n)).await {
                    Ok(Ok(k)) if k > 0 => {}
                    _ => return,
                }
            }
            rbuf.data()[..n].to_vec()
        }
        _ => Vec::new(),
    };
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(q) => (&target[..q], &target[q + 1..]),
        None => (&target[..], &b""[..]),
    };
    let json = b"content-type: application/json\r\n";
    let text = b"content-type: text/plain; version=0.0.4; charset=utf-8\r\n";
    let (status, content_type, body): (u16, &[u8], Vec<u8>) = if !parsed {
        (400, json, br#"{"error":"bad request"}"#.to_vec())
    } else {
        match path {
            b"/healthz" => (200, json, br#"{"status":"ok"}"#.to_vec()),
            b"/readyz" => match state.get() {
                READY => (200, json, br#"{"status":"ready"}"#.to_vec()),
                DRAINING => (503, json, br#"{"status":"draining"}"#.to_vec()),
                _ => (503, json, br#"{"status":"starting"}"#.to_vec()),
            },
            b"/metrics" => {
                let agg = aggregate.borrow();
                let body = render::prometheus(&agg, &state.process(&agg));
                (200, text, body.into_bytes())
            }
            b"/metrics/hdr" => {
                let route = query
                    .split(|&b| b == b'&')
                    .find_map(|kv| kv.strip_prefix(b"route="))
                    .map(String::from_utf8_lossy);
                let agg = aggregate.borrow();
                match route.as_deref().and_then(|r| agg.route_latency(r)) {
                    Some(h) => (
                        200,
                        b"content-type: text/plain\r\n",
                        render::hdr_distribution(h).into_bytes(),
                    ),
                    None => (
                        404,
                        json,
                        br#"{"error":"no latency recorded for that route (?route=NAME)"}"#.to_vec(),
                    ),
                }
            }
            b"/cache/purge" if head.method == Method::Post => purge(&body, &cache_purge),
            b"/config/reload" if head.method == Method::Post => {
                let (status, body) = answer_json(&state.reload.request().await);
                (status, json, body)
            }
            b"/status" => {
                let agg = aggregate.borrow();
                let value = render::status(&agg, &state.process(&agg));
                (
                    200,
                    json,
                    serde_json::to_vec_pretty(&value).unwrap_or_default(),
                )
            }
            _ => (404, json, br#"{"error":"not found"}"#.to_vec()),
        }
    };
    let mut out = Vec::with_capacity(body.len() + 256);
    let body = &body[..];
    generated_response(
        &mut out,
        &Generated {
            status,
            reason: b"",
            headers: content_type,
            only: None,
            extra: b"",
            edits: &HeaderEdits::default(),
            body,
            content_length: Some(body.len() as u64),
            head_only: false,
            keep_alive: false,
            client_version: Version::Http11,
            request_id: b"admin",
        },
    );
    let _ = monoio::time::timeout(READ_TIMEOUT, stream.write_all(out)).await;
}
