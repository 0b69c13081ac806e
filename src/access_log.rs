//! The access log: one line per request. Each worker appends lines to its own buffer and, on
//! its tick or when the buffer passes 64 KiB, hands the whole buffer (whole lines only) to a
//! writer thread over a bounded crossbeam channel. The request path never touches the disk and
//! lines from different workers never interleave mid-line. If the writer falls behind (a slow
//! disk), batches are dropped and counted rather than queued without bound. The process tells the
//! writer to reopen its file (SIGUSR1, after a log rotation) or to finish (at shutdown, once
//! every worker has handed over its last lines) on a control channel of its own.

use std::cell::{Cell, RefCell};
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::thread::{self, JoinHandle};
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tracing::{info, warn};

use crate::config::{AccessLogConfig, AccessLogFormat, TlsVar};
use crate::tls::TlsInfo;

/// A worker's buffer is handed over early once it holds this much.
const FLUSH_BYTES: usize = 64 * 1024;
/// Batches waiting for the writer, for all workers together.
const QUEUE_BATCHES: usize = 1024;

/// One request, as logged. Byte strings are as received (escaped when written).
pub struct Entry<'a> {
    pub worker: usize,
    pub client_ip: &'a [u8],
    pub method: &'a [u8],
    pub target: &'a [u8],
    pub http10: bool,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub route: &'a str,
    pub upstream: &'a str,
    pub upstream_us: Option<u64>,
    pub total_us: u64,
    pub request_id: &'a [u8],
    pub trace_id: &'a [u8],
    pub referer: &'a [u8],
    pub user_agent: &'a [u8],
    /// The path as routed and forwarded, when normalizing changed it (else empty).
    pub normalized_path: &'a [u8],
    /// On a TLS connection: what it negotiated (logged only then).
    pub tls: Option<&'a TlsInfo>,
    /// The authenticated consumer (logged only when there is one).
    pub consumer: Option<&'a str>,
    /// Client-sent copies of headers the gateway vouches for, removed (logged when any).
    pub identity_dropped: u32,
}

/// A worker's side of the access log.
pub struct AccessLog {
    format: AccessLogFormat,
    buf: RefCell<Vec<u8>>,
    lines: Cell<u64>,
    tx: Sender<Vec<u8>>,
    /// The formatted date-time of the last second a line was written in.
    second: RefCell<(u64, String)>,
}

/// What the process asks of the writer thread.
pub enum LogControl {
    /// Open the file again (logrotate's convention after renaming it); a failure keeps the old.
    Reopen,
    /// Write what is queued, then end.
    Finish,
}

/// The writer thread: workers get clones of `lines`; the process keeps `control` and `handle`.
pub struct Writer {
    pub lines: Sender<Vec<u8>>,
    pub control: Sender<LogControl>,
    pub handle: JoinHandle<()>,
}

fn open(path: &str) -> io::Result<Box<dyn Write + Send>> {
    Ok(if path == "stdout" {
        Box::new(io::stdout())
    } else {
        Box::new(OpenOptions::new().create(true).append(true).open(path)?)
    })
}

/// Starts the writer thread.
pub fn spawn_writer(config: &AccessLogConfig) -> io::Result<Writer> {
    let mut out = open(&config.path)?;
    let path = config.path.clone();
    let (tx, rx): (Sender<Vec<u8>>, Receiver<Vec<u8>>) = crossbeam_channel::bounded(QUEUE_BATCHES);
    let (control, orders) = crossbeam_channel::bounded(8);
    let handle = thread::Builder::new()
        .name("ringway-log".into())
        .spawn(move || {
            let mut failed = false;
            let mut write = |out: &mut Box<dyn Write + Send>, batch: &[u8]| {
                if let Err(e) = out.write_all(batch).and_then(|()| out.flush()) {
                    if !failed {
                        warn!(error = %e, "access log write failed");
                        failed = true;
                    }
                }
            };
            loop {
                crossbeam_channel::select! {
                    recv(rx) -> batch => match batch {
                        Ok(batch) => write(&mut out, &batch),
                        Err(_) => break,
                    },
                    recv(orders) -> order => match order {
                        Ok(LogControl::Reopen) => match open(&path) {
                            Ok(file) => {
                                out = file;
                                info!(path = %path, "access log reopened");
                            }
                            Err(e) => warn!(path = %path, error = %e, "access log not reopened; writing to the old file"),
                        },
                        Ok(LogControl::Finish) | Err(_) => {
                            for batch in rx.try_iter() {
                                write(&mut out, &batch);
                            }
                            break;
                        }
                    },
                }
            }
        })?;
    Ok(Writer {
        lines: tx,
        control,
        handle,
    })
}

impl AccessLog {
    pub fn new(format: AccessLogFormat, tx: Sender<Vec<u8>>) -> AccessLog {
        AccessLog {
            format,
            buf: RefCell::new(Vec::with_capacity(FLUSH_BYTES)),
            lines: Cell::new(0),
            tx,
            second: RefCell::new((u64::MAX, String::new())),
        }
    }

    /// Appends one line; returns lines dropped if a full buffer could not be handed over.
    pub fn write(&self, e: &Entry<'_>) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut buf = self.buf.borrow_mut();
        match self.format {
            AccessLogFormat::Json => self.json(&mut buf, e, now.as_secs(), now.subsec_millis()),
            AccessLogFormat::Combined => self.combined(&mut buf, e, now.as_secs()),
        }
        self.lines.set(self.lines.get() + 1);
        if buf.len() >= FLUSH_BYTES {
            drop(buf);
            return self.flush();
        }
        0
    }

    /// Hands the buffered lines to the writer; returns how many were dropped (writer behind).
    pub fn flush(&self) -> u64 {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return 0;
        }
        let batch = std::mem::replace(&mut *buf, Vec::with_capacity(FLUSH_BYTES));
        let lines = self.lines.replace(0);
        match self.tx.try_send(batch) {
            Ok(()) => 0,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => lines,
        }
    }

    fn date_time(&self, secs: u64) -> std::cell::Ref<'_, (u64, String)> {
        if self.second.borrow().0 != secs {
            let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
            let rem = secs % 86_400;
            let text = match self.format {
                AccessLogFormat::Json => format!(
                    "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
                    rem / 3600,
                    rem / 60 % 60,
                    rem % 60
                ),
                AccessLogFormat::Combined => format!(
                    "{d:02}/{}/{y:04}:{:02}:{:02}:{:02} +0000",
                    MONTHS[(mo - 1) as usize],
                    rem / 3600,
                    rem / 60 % 60,
                    rem % 60
                ),
            };
            *self.second.borrow_mut() = (secs, text);
        }
        self.second.borrow()
    }

    fn json(&self, out: &mut Vec<u8>, e: &Entry<'_>, secs: u64, millis: u32) {
        out.extend_from_slice(b"{\"time\":\"");
        out.extend_from_slice(self.date_time(secs).1.as_bytes());
        let _ = write!(out, ".{millis:03}Z\",\"worker\":{},\"client\":", e.worker);
        json_str(out, e.client_ip);
        out.extend_from_slice(b",\"method\":");
        json_str(out, or_dash(e.method));
        out.extend_from_slice(b",\"path\":");
        json_str(out, or_dash(e.target));
        if !e.normalized_path.is_empty() {
            out.extend_from_slice(b",\"normalized_path\":");
            json_str(out, e.normalized_path);
        }
        let _ = write!(
            out,
            ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"route\":",
            e.status, e.bytes_in, e.bytes_out
        );
        json_str(out, e.route.as_bytes());
        out.extend_from_slice(b",\"upstream\":");
        json_str(out, e.upstream.as_bytes());
        match e.upstream_us {
            Some(us) => {
                let _ = write!(out, ",\"upstream_us\":{us}");
            }
            None => out.extend_from_slice(b",\"upstream_us\":null"),
        }
        let _ = write!(out, ",\"total_us\":{},\"request_id\":", e.total_us);
        json_str(out, e.request_id);
        out.extend_from_slice(b",\"trace_id\":");
        json_str(out, e.trace_id);
        if let Some(t) = e.tls {
            for (key, v) in TLS_FIELDS {
                let _ = write!(out, ",\"{key}\":");
                json_str(out, t.var(v));
            }
        }
        if let Some(c) = e.consumer {
            out.extend_from_slice(b",\"consumer\":");
            json_str(out, c.as_bytes());
        }
        if e.identity_dropped > 0 {
            let _ = write!(out, ",\"identity_headers_dropped\":{}", e.identity_dropped);
        }
        out.extend_from_slice(b"}\n");
    }

    /// Apache's combined format, then the gateway's own fields as `key=value`.
    fn combined(&self, out: &mut Vec<u8>, e: &Entry<'_>, secs: u64) {
        out.extend_from_slice(e.client_ip);
        out.extend_from_slice(b" - - [");
        out.extend_from_slice(self.date_time(secs).1.as_bytes());
        out.extend_from_slice(b"] \"");
        if e.method.is_empty() {
            // No request line could be read (a malformed head): Apache's "-".
            out.extend_from_slice(b"-\" ");
        } else {
            quoted(out, e.method);
            out.push(b' ');
            quoted(out, e.target);
            out.extend_from_slice(if e.http10 {
                b" HTTP/1.0\" "
            } else {
                b" HTTP/1.1\" "
            });
        }
        let _ = write!(out, "{} {} \"", e.status, e.bytes_out);
        quoted(out, or_dash(e.referer));
        out.extend_from_slice(b"\" \"");
        quoted(out, or_dash(e.user_agent));
        let _ = write!(
            out,
            "\" worker={} route={} upstream={} upstream_us=",
            e.worker,
            dash(e.route),
            dash(e.upstream)
        );
        match e.upstream_us {
            Some(us) => {
                let _ = write!(out, "{us}");
            }
            None => out.push(b'-'),
        }
        let _ = write!(
            out,
            " total_us={} bytes_in={} request_id=",
            e.total_us, e.bytes_in
        );
        quoted(out, e.request_id);
        out.extend_from_slice(b" trace_id=");
        out.extend_from_slice(or_dash(e.trace_id));
        if !e.normalized_path.is_empty() {
            out.extend_from_slice(b" normalized_path=");
            quoted(out, e.normalized_path);
        }
        if let Some(t) = e.tls {
            for (key, v) in TLS_FIELDS {
                let _ = write!(out, " {key}=");
                quoted(out, or_dash(t.var(v)));
            }
        }
        if let Some(c) = e.consumer {
            out.extend_from_slice(b" consumer=");
            quoted(out, c.as_bytes());
        }
        if e.identity_dropped > 0 {
            let _ = write!(out, " identity_headers_dropped={}", e.identity_dropped);
        }
        out.push(b'\n');
    }
}

/// What a TLS connection adds to its requests' lines.
const TLS_FIELDS: [(&str, TlsVar); 3] = [
    ("tls_version", TlsVar::Version),
    ("tls_cipher", TlsVar::Cipher),
    ("tls_sni", TlsVar::Sni),
];

/// `-` for a field that is unknown or empty, as the combined format writes it.
fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// `dash`, for byte strings.
fn or_dash(s: &[u8]) -> &[u8] {
    if s.is_empty() {
        b"-"
    } else {
        s
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `s` with `"` and `\\` backslash-escaped and other bytes outside printable ASCII written by
/// `unprintable`.
fn escaped(out: &mut Vec<u8>, s: &[u8], unprintable: fn(&mut Vec<u8>, u8)) {
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x20..=0x7e => out.push(b),
            _ => unprintable(out, b),
        }
    }
}

/// A JSON string from bytes: control and non-ASCII bytes as `\u00XX`.
fn json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    escaped(out, s, |out, b| {
        let _ = write!(out, "\\u{b:04x}");
    });
    out.push(b'"');
}

/// Bytes inside a quoted field of the combined format: unprintables as `\xXX`.
fn quoted(out: &mut Vec<u8>, s: &[u8]) {
    escaped(out, s, |out, b| {
        let _ = write!(out, "\\x{b:02x}");
    });
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(target: &'a [u8]) -> Entry<'a> {
        Entry {
            worker: 1,
            client_ip: b"10.0.0.1",
            method: b"GET",
            target,
            http10: false,
            status: 200,
            bytes_in: 40,
            bytes_out: 120,
            route: "api",
            upstream: "127.0.0.1:9000",
            upstream_us: Some(250),
            total_us: 300,
            request_id: b"rid",
            trace_id: b"4bf92f3577b34da6a3ce929d0e0e4736",
            referer: b"",
            user_agent: b"curl/8",
            normalized_path: b"",
            tls: None,
            consumer: None,
            identity_dropped: 0,
        }
    }

    #[test]
    fn json_lines_are_valid_json_with_every_field() {
        let (tx, rx) = crossbeam_channel::bounded(4);
        let log = AccessLog::new(AccessLogFormat::Json, tx);
        assert_eq!(log.write(&entry(b"/a?q=\"x\"\\")), 0);
        assert_eq!(log.flush(), 0);
        let batch = rx.try_recv().unwrap();
        let line: serde_json::Value = serde_json::from_slice(&batch).unwrap();
        assert_eq!(line["path"], "/a?q=\"x\"\\");
        assert_eq!(line["upstream_us"], 250);
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(line["time"].as_str().unwrap().ends_with('Z'));
        assert!(
            line.get("tls_version").is_none(),
            "cleartext lines have no TLS fields"
        );

        let tls = TlsInfo {
            sni: Some("api.test".into()),
            version: "TLSv1.3",
            cipher: "TLS13_AES_128_GCM_SHA256",
            client: None,
        };
        let mut e = entry(b"/");
        e.tls = Some(&tls);
        e.consumer = Some("acme");
        log.write(&e);
        log.flush();
        let line: serde_json::Value = serde_json::from_slice(&rx.try_recv().unwrap()).unwrap();
        assert_eq!(line["tls_version"], "TLSv1.3");
        assert_eq!(line["tls_cipher"], "TLS13_AES_128_GCM_SHA256");
        assert_eq!(line["tls_sni"], "api.test");
        assert_eq!(line["consumer"], "acme");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (tx, _rx) = crossbeam_channel::bounded(1);
        let log = AccessLog::new(AccessLogFormat::Combined, tx);
        log.write(&entry(b"/1"));
        assert_eq!(log.flush(), 0);
        log.write(&entry(b"/2"));
        log.write(&entry(b"/3"));
        assert_eq!(log.flush(), 2);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_785), (2026, 11, 28));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
