//! Test harness: starts the real `ringway` binary on 127.0.0.1 with a config written for the
//! test, real upstream servers that record exactly what they receive, and a raw HTTP/1.1 client.
//! Everything binds port 0 and learns its port from the gateway's start-up log, so tests run in
//! parallel. Readiness is polled for; nothing sleeps and hopes.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub mod nginx;

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Polls `f` until it returns `Some`, or panics after `TIMEOUT` naming `what`.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway

pub struct Gateway {
    pub child: Child,
    logs: Arc<(Mutex<Vec<String>>, Condvar)>,
    listeners: HashMap<String, SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The directory of the config (`None` for a successor, which shares its predecessor's).
    _dir: Option<tempfile::TempDir>,
    pub config_path: std::path::PathBuf,
}

/// A config with one worker and no pinning, so that parallel tests do not crowd a core.
pub fn config(body: &str) -> String {
    if body.contains("[runtime]") {
        body.to_owned()
    } else {
        format!("[runtime]\nworkers = 1\npin_cores = false\n\n{body}")
    }
}

impl Gateway {
    /// Starts the gateway with `toml` (passed through `config`) and waits until it is ready.
    pub fn start(toml: &str) -> Gateway {
        Self::start_with_env(toml, &[])
    }

    pub fn start_with_env(toml: &str, env: &[(&str, &str)]) -> Gateway {
        let gw = Self::spawn(toml, env);
        gw.wait_ready()
    }

    /// Starts the process without waiting for readiness.
    pub fn spawn(toml: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("ringway.toml");
        std::fs::write(&config_path, config(toml)).expect("write config");
        let mut gw = Self::spawn_at(config_path, &[], env);
        gw._dir = Some(dir);
        gw
    }

    /// Starts `ringway --upgrade` on this gateway's config file, now `toml`, without waiting.
    pub fn spawn_successor(&self, toml: &str) -> Gateway {
        self.rewrite_config(toml);
        Self::spawn_at(self.config_path.clone(), &["--upgrade"], &[])
    }

    /// Waits until a successor serves.
    pub fn wait_serving(self) -> Gateway {
        self.wait_ready()
    }

    fn spawn_at(config_path: std::path::PathBuf, args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringway"));
        cmd.arg("--config")
            .arg(&config_path)
            .args(args)
            .env("RINGWAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ringway");
        let stderr = child.stderr.take().expect("stderr");
        let logs: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let sink = Arc::clone(&logs);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (lock, cv) = &*sink;
                lock.lock().unwrap().push(line);
                cv.notify_all();
            }
        });
        Gateway {
            child,
            logs,
            listeners: HashMap::new(),
            admin: None,
            _dir: None,
            config_path,
        }
    }

    fn wait_ready(mut self) -> Gateway {
        self.wait_log("the gateway to be ready", |l| l.contains(" ready "));
        for line in self.logs() {
            if line.contains("listening listener=") {
                let name = field(&line, "listener").expect("listener name");
                let addr = field(&line, "address").expect("address");
                self.listeners.insert(name, addr.parse().expect("address"));
            } else if line.contains("admin listening") {
                self.admin = Some(field(&line, "address").unwrap().parse().unwrap());
            }
        }
        self
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        *self
            .listeners
            .get(listener)
            .unwrap_or_else(|| panic!("no listener {listener:?}: {:?}", self.logs()))
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.0.lock().unwrap().clone()
    }

    /// Waits for a log line matching `pred` and returns it.
    pub fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let (lock, cv) = &*self.logs;
        let deadline = Instant::now() + TIMEOUT;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for {what}; log so far:\n{}",
                lines.join("\n")
            );
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// Replaces the config file (through `config`), for a reload to read.
    pub fn rewrite_config(&self, toml: &str) {
        std::fs::write(&self.config_path, config(toml)).expect("write config");
    }

    /// `POST /config/reload` on the admin listener.
    pub fn reload(&self) -> Response {
        let admin = self.admin.expect("an admin listener");
        exchange(
            admin,
            b"POST /config/reload HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        )
    }

    /// The address of a listener a reload added (from its "listening" log line).
    pub fn added_listener(&self, name: &str) -> SocketAddr {
        let line = self.wait_log("the added listener", |l| {
            l.contains("listening listener=") && field(l, "listener").as_deref() == Some(name)
        });
        field(&line, "address").unwrap().parse().unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        eventually("the gateway to exit", || self.child.try_wait().unwrap())
    }

    /// Peak resident set size of the gateway process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .expect("VmHWM")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=value` in a tracing log line (quotes removed).
pub fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let value = if let Some(quoted) = rest.strip_prefix('"') {
        &quoted[..quoted.find('"')?]
    } else {
        rest.split_whitespace().next()?
    };
    Some(value.to_owned())
}

/// Runs `ringway` with `args` to completion; returns (status, stdout, stderr).
pub fn run_ringway(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringway"))
        .args(args)
        .env("RINGWAY_LOG", "warn")
        .output()
        .expect("run ringway");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `body` as `ringway.toml` in `dir`; returns its path.
pub fn write_config(dir: &tempfile::TempDir, body: &str) -> String {
    let path = dir.path().join("ringway.toml");
    std::fs::write(&path, body).unwrap();
    path.to_str().unwrap().to_owned()
}

/// `ringway check` on `body` exits 2 with `error: PATH{location}` and `message` on stderr, and
/// running it (not just checking) refuses the same way.
pub fn assert_config_error(body: &str, location: &str, message: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, body);
    let (status, _, stderr) = run_ringway(&["check", "--config", &path]);
    assert_eq!(status.code(), Some(2), "{body}\n{stderr}");
    assert!(
        stderr.contains(&format!("error: {path}{location}")),
        "expected {location} in:\n{stderr}\nfor:\n{body}"
    );
    assert!(
        stderr.contains(message),
        "expected {message:?} in:\n{stderr}"
    );
    let (status, _, _) = run_ringway(&["--config", &path]);
    assert_eq!(status.code(), Some(2));
}

/// `ringway check` refuses `body` with exit 2, naming `key` and saying `message`.
pub fn assert_refused(body: &str, key: &str, message: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, body);
    let (status, _, stderr) = run_ringway(&["check", "--config", &path]);
    assert_eq!(status.code(), Some(2), "{body}\n{stderr}");
    assert!(stderr.contains(key), "expected {key} in:\n{stderr}");
    assert!(
        stderr.contains(message),
        "expected {message:?} in:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The head exactly as received.
    pub head: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads one response from `s`, framed per RFC 9112 (`head_request`: the request was HEAD).
pub struct ResponseReader<S = TcpStream> {
    pub stream: S,
    buf: Vec<u8>,
    record: Option<Arc<Mutex<Vec<u8>>>>,
}

impl<S: Read> ResponseReader<S> {
    pub fn new(stream: S) -> Self {
        ResponseReader {
            stream,
            buf: Vec::new(),
            record: None,
        }
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk).unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        if let Some(r) = &self.record {
            r.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
        n
    }

    /// The stream, and what was received past the last response (e.g. tunnelled bytes that
    /// arrived with a 101).
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }

    /// Everything received after the last complete response, waiting for EOF.
    pub fn read_to_close(&mut self) -> Vec<u8> {
        while self.fill() > 0 {}
        std::mem::take(&mut self.buf)
    }

    pub fn read_response(&mut self, head_request: bool) -> Option<Response> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf).expect("parsable response") {
                httparse::Status::Complete(len) => {
                    let status = resp.code.unwrap();
                    let headers: Vec<(String, String)> = resp
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    let head = String::from_utf8_lossy(&self.buf[..len]).into_owned();
                    self.buf.drain(..len);
                    let get = |n: &str| {
                        headers
                            .iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case(n))
                            .map(|(_, v)| v.clone())
                    };
                    let body = if head_request || status < 200 || status == 204 || status == 304 {
                        Vec::new()
                    } else if get("transfer-encoding").is_some() {
                        self.read_chunked()
                    } else if let Some(cl) = get("content-length") {
                        let n: usize = cl.parse().unwrap();
                        while self.buf.len() < n {
                            assert!(self.fill() > 0, "EOF inside a Content-Length body");
                        }
                        self.buf.drain(..n).collect()
                    } else {
                        while self.fill() > 0 {}
                        std::mem::take(&mut self.buf)
                    };
                    return Some(Response {
                        status,
                        headers,
                        body,
                        head,
                    });
                }
                httparse::Status::Partial => {
                    if self.fill() == 0 {
                        return None;
                    }
                }
            }
        }
    }

    fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break p;
                }
                assert!(self.fill() > 0, "EOF inside chunked framing");
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {line:?}"));
            self.buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers, then the final CRLF.
                loop {
                    let end = loop {
                        if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                            break p;
                        }
                        assert!(self.fill() > 0, "EOF inside trailers");
                    };
                    self.buf.drain(..end + 2);
                    if end == 0 {
                        return body;
                    }
                }
            }
            while self.buf.len() < size + 2 {
                assert!(self.fill() > 0, "EOF inside a chunk");
            }
            body.extend_from_slice(&self.buf[..size]);
            assert_eq!(&self.buf[size..size + 2], b"\r\n");
            self.buf.drain(..size + 2);
        }
    }

    /// True once the peer has closed (EOF) with nothing more to read.
    pub fn is_closed(&mut self) -> bool {
        self.buf.is_empty() && self.fill() == 0
    }
}

/// Sends `raw` on a new connection and reads one response.
pub fn exchange(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut s = connect(addr);
    s.write_all(raw).unwrap();
    let head = raw.starts_with(b"HEAD ");
    ResponseReader::new(s)
        .read_response(head)
        .expect("a response")
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

// ---------------------------------------------------------------------------------------------
// Recording upstreams

/// A request as an upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The head exactly as it arrived.
    pub head: String,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Which connection (0, 1, ...) of this upstream it came on.
    pub connection: usize,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What a recording upstream answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub chunked: bool,
    pub close: bool,
    /// Interim (1xx) heads sent before the final response, as raw text.
    pub interim: String,
}

impl Reply {
    pub fn ok(body: &str) -> Reply {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            chunked: false,
            close: false,
            interim: String::new(),
        }
    }

    pub fn status(mut self, status: u16) -> Reply {
        self.status = status;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sends `head` (a complete 1xx head, blank line included) before the final response.
    pub fn interim(mut self, head: &str) -> Reply {
        self.interim.push_str(head);
        self
    }

    pub fn chunked(mut self) -> Reply {
        self.chunked = true;
        self
    }
}

type Handler = dyn Fn(&Received) -> Reply + Send + Sync;

/// An HTTP/1.1 server on its own threads that records every request it gets.
pub struct Upstream {
    pub addr: SocketAddr,
    received: Arc<(Mutex<Vec<Received>>, Condvar)>,
    connections: Arc<AtomicUsize>,
    /// Every byte received, on any connection, in arrival order.
    raw: Arc<Mutex<Vec<u8>>>,
}

impl Upstream {
    /// Answers every request `200` with its own address as the body.
    pub fn echo_addr() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        Self::from_listener(listener, move |_| Reply::ok(&addr))
    }

    pub fn start(handler: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Upstream {
        Self::from_listener(TcpListener::bind("127.0.0.1:0").unwrap(), handler)
    }

    /// An upstream on a given address (e.g. one a test first left closed).
    pub fn start_on(
        addr: SocketAddr,
        handler: impl Fn(&Received) -> Reply + Send + Sync + 'static,
    ) -> Upstream {
        Self::from_listener(
            TcpListener::bind(addr).expect("bind the given address"),
            handler,
        )
    }

    fn from_listener(
        listener: TcpListener,
        handler: impl Fn(&Received) -> Reply + Send + Sync + 'static,
    ) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let received: Arc<(Mutex<Vec<Received>>, Condvar)> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let raw: Arc<Mutex<Vec<u8>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let (rec, conns, bytes) = (
            Arc::clone(&received),
            Arc::clone(&connections),
            Arc::clone(&raw),
        );
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let id = conns.fetch_add(1, Ordering::SeqCst);
                let (rec, handler, bytes) =
                    (Arc::clone(&rec), Arc::clone(&handler), Arc::clone(&bytes));
                thread::spawn(move || serve_upstream(stream, id, &rec, &*handler, bytes));
            }
        });
        Upstream {
            addr,
            received,
            connections,
            raw,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.0.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.0.lock().unwrap().len()
    }

    /// Waits until at least `n` requests have arrived; returns them all.
    pub fn wait_for(&self, n: usize) -> Vec<Received> {
        let (lock, cv) = &*self.received;
        let deadline = Instant::now() + TIMEOUT;
        let mut got = lock.lock().unwrap();
        while got.len() < n {
            let now = Instant::now();
            assert!(now < deadline, "upstream got {} of {n} requests", got.len());
            got = cv.wait_timeout(got, deadline - now).unwrap().0;
        }
        got.clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Every byte the upstream has received so far.
    pub fn raw(&self) -> Vec<u8> {
        self.raw.lock().unwrap().clone()
    }
}

fn serve_upstream(
    stream: TcpStream,
    id: usize,
    received: &(Mutex<Vec<Received>>, Condvar),
    handler: &Handler,
    raw: Arc<Mutex<Vec<u8>>>,
) {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut reader = RequestReader::new(stream);
    reader.record = Some(raw);
    while let Some(req) = reader.read_request(id) {
        {
            let (lock, cv) = received;
            lock.lock().unwrap().push(req.clone());
            cv.notify_all();
        }
        let reply = handler(&req);
        let mut out = reply.interim.clone().into_bytes();
        out.extend_from_slice(format!("HTTP/1.1 {} X\r\n", reply.status).as_bytes());
        for (k, v) in &reply.headers {
            out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        let bodiless = req.method == "HEAD" || reply.status == 204 || reply.status == 304;
        if reply.chunked {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        } else if !reply
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            && reply.status != 204
        {
            out.extend_from_slice(format!("Content-Length: {}\r\n", reply.body.len()).as_bytes());
        }
        if reply.close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !bodiless {
            if reply.chunked {
                for piece in reply.body.chunks(7) {
                    out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                    out.extend_from_slice(piece);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            } else {
                out.extend_from_slice(&reply.body);
            }
        }
        if reader.stream.write_all(&out).is_err() || reply.close {
            break;
        }
    }
}

/// Reads requests (Content-Length or chunked bodies) from a stream, for test upstreams.
pub struct RequestReader<S = TcpStream> {
    pub stream: S,
    buf: Vec<u8>,
    /// Where to copy every byte read, if anywhere.
    pub record: Option<Arc<Mutex<Vec<u8>>>>,
}

impl<S: Read> RequestReader<S> {
    pub fn new(stream: S) -> Self {
        RequestReader {
            stream,
            buf: Vec::new(),
            record: None,
        }
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk).unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        if let Some(r) = &self.record {
            r.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
        n
    }

    pub fn read_request(&mut self, connection: usize) -> Option<Received> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut headers);
            match req
                .parse(&self.buf)
                .expect("gateway sent a parsable request")
            {
                httparse::Status::Complete(len) => {
                    let head = String::from_utf8_lossy(&self.buf[..len]).into_owned();
                    let method = req.method.unwrap().to_owned();
                    let path = req.path.unwrap().to_owned();
                    let headers: Vec<(String, String)> = req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    self.buf.drain(..len);
                    let get = |n: &str| {
                        headers
                            .iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case(n))
                            .map(|(_, v)| v.clone())
                    };
                    let body = if get("transfer-encoding").is_some() {
                        let mut r = ResponseReader {
                            stream: &mut self.stream,
                            buf: std::mem::take(&mut self.buf),
                            record: self.record.clone(),
                        };
                        let body = r.read_chunked();
                        self.buf = r.buf;
                        body
                    } else if let Some(cl) = get("content-length") {
                        let n: usize = cl.parse().unwrap();
                        while self.buf.len() < n {
                            if self.fill() == 0 {
                                return None;
                            }
                        }
                        self.buf.drain(..n).collect()
                    } else {
                        Vec::new()
                    };
                    return Some(Received {
                        head,
                        method,
                        path,
                        headers,
                        body,
                        connection,
                    });
                }
                httparse::Status::Partial => {
                    if self.fill() == 0 {
                        return None;
                    }
                }
            }
        }
    }
}

/// A listening socket for tests that script an upstream byte by byte.
/// An upstream that answers one request with 101 (`Upgrade: websocket`), then echoes what it
/// reads, upper-cased, until the client's side closes; the thread returns the request head.
pub fn upgrading_echo() -> (SocketAddr, thread::JoinHandle<String>) {
    let (listener, addr) = raw_upstream();
    let echo = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let head = String::from_utf8(read_head(&mut s)).unwrap();
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: abc\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 256];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n].to_ascii_uppercase()).unwrap();
        }
        head
    });
    (addr, echo)
}

pub fn raw_upstream() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// Reads from `s` until the blank line that ends a head; returns the bytes read.
pub fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    buf
}

/// A port with nothing listening on it.
pub fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

pub fn half_close(s: &TcpStream) {
    let _ = s.shutdown(Shutdown::Write);
}

/// A listener + upstream + route config proxying everything on "public" to `targets`.
pub fn proxy_config(targets: &[SocketAddr], upstream_extra: &str, route_extra: &str) -> String {
    let targets: Vec<String> = targets.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"
[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[upstreams]]
name = "app"
targets = [{}]
{upstream_extra}

[[routes]]
name = "all"
listener = "public"
path_prefix = "/"
upstream = "app"
{route_extra}
"#,
        targets.join(", ")
    )
}

/// The value of the first `/metrics` line on the admin listener starting with `line_start`.
pub fn metric(admin: SocketAddr, line_start: &str) -> Option<f64> {
    let body = get(admin, "/metrics").text();
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until the metric line starting with `line_start` reads `n` (workers report on their
/// metrics interval), and checks it does not pass it.
pub fn wait_metric(admin: SocketAddr, line_start: &str, n: f64) {
    eventually(&format!("{line_start} to reach {n}"), || {
        (metric(admin, line_start)? >= n).then_some(())
    });
    assert_eq!(metric(admin, line_start), Some(n), "{line_start}");
}

/// Stops the gateway (SIGTERM, which writes the access log's last lines) and reads the log.
pub fn access_log_after_stop(mut gw: Gateway, path: &std::path::Path) -> Vec<String> {
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit().success());
    std::fs::read_to_string(path)
        .expect("access log")
        .lines()
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Placing connections on workers

pub fn status_connections(admin: SocketAddr) -> Vec<u64> {
    get(admin, "/status").json()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["connections_active"].as_u64().unwrap())
        .collect()
}

/// Keep-alive connections, one on each of two workers: opens connections (closing the ones
/// that land on a worker already covered) and asks /status where each landed. The gateway
/// needs an admin listener and a `GET /probe` that answers 200 without caching.
pub fn one_connection_per_worker(gw: &Gateway) -> Vec<ResponseReader> {
    let addr = gw.addr("public");
    let admin = gw.admin.unwrap();
    let mut held: Vec<Option<ResponseReader>> = vec![None, None];
    let mut open = 0;
    while held.iter().any(Option::is_none) {
        let before = status_connections(admin);
        let mut c = ResponseReader::new(connect(addr));
        c.stream
            .write_all(b"GET /probe HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert_eq!(c.read_response(false).unwrap().status, 200);
        let after = eventually("the new connection in /status", || {
            let now = status_connections(admin);
            (now.iter().sum::<u64>() == open + 1).then_some(now)
        });
        let worker = (0..2)
            .find(|&w| after[w] > before[w])
            .expect("a worker gained it");
        if held[worker].is_none() {
            held[worker] = Some(c);
            open += 1;
        } else {
            drop(c);
            eventually("the extra connection to close", || {
                (status_connections(admin).iter().sum::<u64>() == open).then_some(())
            });
        }
    }
    held.into_iter().map(Option::unwrap).collect()
}
