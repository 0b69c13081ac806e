//! TLS termination through the real gateway, with real TLS clients (rustls here; openssl's
//! s_client where a second implementation matters) and certificates made for each test:
//! certificate choice by SNI, ALPN, protocol versions, what the upstream is told, and what
//! happens to input that is not a TLS handshake.

mod common;
mod tls_support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tls_support::*;

/// A one-worker gateway with one TLS listener serving `certs` (TOML inline tables) and `extra`
/// keys in its `[listeners.tls]`, proxying everything to `upstream`.
fn tls_gw(certs: &str, extra: &str, upstream: SocketAddr, route_extra: &str) -> Gateway {
    let tls = format!("certificates = [{certs}]\n{extra}");
    tls_gateway(1, &tls, upstream, route_extra)
}

/// The cipher suite a client negotiated, in rustls's naming (as `${tls_cipher}` has it).
fn cipher_of(s: &TlsStream) -> &'static str {
    s.conn
        .negotiated_cipher_suite()
        .and_then(|c| c.suite().as_str())
        .expect("a negotiated suite")
}

fn metric(gw: &Gateway, line_start: &str) -> f64 {
    let body = get(gw.admin.expect("admin"), "/metrics").text();
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in metrics:\n{body}"))
}

/// Waits until the rejection counter for `reason` reaches `n` (workers report once a second).
fn wait_rejections(gw: &Gateway, reason: &str, n: f64) {
    let line = format!("ringway_rejected_requests_total{{reason=\"{reason}\"}}");
    eventually(&format!("{n} {reason} rejections"), || {
        (metric(gw, &line) >= n).then_some(())
    });
    assert_eq!(metric(gw, &line), n, "{reason}");
}

#[test]
fn sni_picks_the_exact_name_then_the_wildcard_then_the_default() {
    let ca = Ca::new("test-ca");
    let default = ca.server("default", &["default.test"]);
    let wild = ca.server("wild", &["*.example.org"]);
    let exact = ca.server("exact", &["api.example.org", "www.example.com"]);
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = tls_gw(
        &[pair(&default), pair(&wild), pair(&exact)].join(", "),
        "",
        up.addr,
        "",
    );
    let addr = gw.addr("tls");
    let cfg = Arc::new(client_config(ca.roots()));
    let served = |sni: &str| leaf(&tls_connect(addr, sni, &cfg).expect("a handshake"));
    assert_eq!(served("api.example.org"), exact.der, "exact over wildcard");
    assert_eq!(served("www.example.com"), exact.der, "any SAN name");
    assert_eq!(served("shop.example.org"), wild.der, "wildcard");
    assert_eq!(served("default.test"), default.der);

    // No SNI (an IP address) or an unknown name: the default, which the client then refuses
    // for the name (so the handshake fails on the client side, after the server chose).
    let no_sni = Arc::new(client_config(ca.roots()));
    let err = tls_connect(addr, "127.0.0.1", &no_sni).expect_err("the default has no IP SAN");
    assert!(
        matches!(err, rustls::Error::InvalidCertificate(_)),
        "{err:?}"
    );
    let err = tls_connect(addr, "other.test", &cfg).expect_err("the default is not other.test");
    assert!(
        matches!(err, rustls::Error::InvalidCertificate(_)),
        "{err:?}"
    );
}

#[test]
fn a_proxied_request_over_tls_tells_the_upstream_and_the_transforms() {
    let ca = Ca::new("test-ca");
    let cert = ca.server("api", &["api.test"]);
    let up = Upstream::start(|_| Reply::ok("hello"));
    let gw = tls_gw(
        &pair(&cert),
        "",
        up.addr,
        r#"request_headers = { set = { "x-tls" = "${tls_sni} ${tls_version} ${tls_cipher}" } }"#,
    );
    let cfg = Arc::new(client_config(ca.roots()));
    let mut s = tls_connect(gw.addr("tls"), "api.test", &cfg).unwrap();
    assert_eq!(s.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    for i in 0..3 {
        let r = request(
            &mut s,
            &format!("GET /p{i} HTTP/1.1\r\nHost: api.test\r\nX-Forwarded-Proto: http\r\n\r\n"),
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "hello");
    }
    let got = up.wait_for(3);
    let first = &got[0];
    assert_eq!(first.path, "/p0");
    assert_eq!(first.header("x-forwarded-proto"), Some("https"));
    let version = match s.conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        v => panic!("{v:?}"),
    };
    let cipher = cipher_of(&s);
    assert_eq!(
        first.header("x-tls"),
        Some(format!("api.test {version} {cipher}").as_str())
    );
    // A large body both ways crosses many TLS records.
    let big = "x".repeat(300_000);
    let r = request(
        &mut s,
        &format!(
            "POST /big HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\n\r\n{big}",
            big.len()
        ),
    );
    assert_eq!(r.status, 200);
    assert_eq!(up.wait_for(4)[3].body.len(), big.len());

    // The gateway ends a connection with close_notify, so a client can tell a clean end from a
    // truncation (and OpenSSL keeps the session for resumption).
    s.write_all(b"GET /last HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("a clean close_notify, not an unexpected EOF");
    assert!(String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"));
}

#[test]
fn alpn_and_protocol_versions_are_enforced() {
    let ca = Ca::new("test-ca");
    let cert = ca.server("api", &["api.test"]);
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = tls_gw(&pair(&cert), "min_version = \"1.3\"", up.addr, "");
    let addr = gw.addr("tls");

    let mut only_h2 = client_config(ca.roots());
    only_h2.alpn_protocols = vec![b"h2".to_vec()];
    let err = tls_connect(addr, "api.test", &Arc::new(only_h2)).expect_err("no common protocol");
    assert!(
        matches!(
            err,
            rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
        ),
        "{err:?}"
    );
    let mut both = client_config(ca.roots());
    both.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let s = tls_connect(addr, "api.test", &Arc::new(both)).unwrap();
    assert_eq!(s.conn.alpn_protocol(), Some(&b"http/1.1"[..]));

    let tls12 = client_config_with(ca.roots(), &[&rustls::version::TLS12], None);
    let err =
        tls_connect(addr, "api.test", &Arc::new(tls12)).expect_err("1.2 is below min_version");
    assert!(
        matches!(
            err,
            rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion)
        ),
        "{err:?}"
    );
    // TLS 1.0 and 1.1, from OpenSSL (rustls cannot speak them).
    for flag in ["-tls1", "-tls1_1", "-tls1_2"] {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string(), flag])
            .args(["-servername", "api.test", "-cipher", "DEFAULT@SECLEVEL=0"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} must be refused:\n{text}");
        assert!(
            text.contains("alert protocol version") || text.contains("alert handshake failure"),
            "{flag}:\n{text}"
        );
    }
    wait_rejections(&gw, "tls_handshake_failed", 5.0);
}

#[test]
fn plain_http_garbage_and_slow_handshakes_on_a_tls_port() {
    let ca = Ca::new("test-ca");
    let cert = ca.server("api", &["api.test"]);
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = tls_gw(&pair(&cert), "handshake_timeout_ms = 300", up.addr, "");
    let addr = gw.addr("tls");

    // Plain HTTP: a 400 that says why, then a close.
    let mut s = common::connect(addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .unwrap();
    let mut reader = ResponseReader::new(s);
    let r = reader.read_response(false).expect("a 400");
    assert_eq!(r.status, 400);
    assert!(
        r.text().contains("plain HTTP request sent to a TLS port"),
        "{}",
        r.text()
    );
    assert!(reader.is_closed());

    // Garbage: closed without a word.
    let mut s = common::connect(addr);
    s.write_all(b"\x00\x01\x02 hello\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");

    // A handshake record that never completes, and a connection that sends nothing: both are
    // closed once the handshake timeout has passed, not before.
    for first in [&b"\x16\x03\x01\x02\x00\x01\x00"[..], &b""[..]] {
        let started = Instant::now();
        let mut s = common::connect(addr);
        s.write_all(first).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(250), "closed after {took:?}");
        assert!(took < Duration::from_secs(5), "closed after {took:?}");
    }
    wait_rejections(&gw, "tls_plain_http", 1.0);
    wait_rejections(&gw, "tls_not_tls", 1.0);
    wait_rejections(&gw, "tls_handshake_timeout", 2.0);

    // The listener still works.
    let cfg = Arc::new(client_config(ca.roots()));
    let mut s = tls_connect(addr, "api.test", &cfg).unwrap();
    let r = request(&mut s, "GET / HTTP/1.1\r\nHost: api.test\r\n\r\n");
    assert_eq!(r.status, 200);
}

#[test]
fn the_access_log_records_what_tls_negotiated() {
    let ca = Ca::new("test-ca");
    let cert = ca.server("api", &["api.test"]);
    let up = Upstream::start(|_| Reply::ok("ok"));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        r#"
[access_log]
path = "{}"
format = "combined"

[[listeners]]
name = "tls"
address = "127.0.0.1:0"
[listeners.tls]
certificates = [{}]

[[upstreams]]
name = "app"
targets = ["{}"]

[[routes]]
name = "all"
listener = "tls"
path_prefix = "/"
upstream = "app"
"#,
        log.display(),
        pair(&cert),
        up.addr
    ));
    let cfg = Arc::new(client_config(ca.roots()));
    let mut s = tls_connect(gw.addr("tls"), "api.test", &cfg).unwrap();
    let r = request(&mut s, "GET /logged HTTP/1.1\r\nHost: api.test\r\n\r\n");
    assert_eq!(r.status, 200);
    let cipher = cipher_of(&s);
    let line = eventually("the access log line", || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.lines()
            .find(|l| l.contains("/logged"))
            .map(str::to_owned)
    });
    assert!(
        line.ends_with(&format!(
            " tls_version=TLSv1.3 tls_cipher={cipher} tls_sni=api.test"
        )),
        "{line}"
    );
}

#[test]
fn a_redirect_route_sends_port_80_to_https_keeping_path_and_query() {
    let gw = Gateway::start(
        r#"
[[listeners]]
name = "plain"
address = "127.0.0.1:0"

[[routes]]
name = "to-https"
listener = "plain"
path_prefix = "/"
redirect = { scheme = "https", status = 308 }

[[routes]]
name = "elsewhere"
listener = "plain"
host = "old.test"
path_prefix = "/"
redirect = { host = "new.test", port = 8443, status = 301 }

[[routes]]
name = "default-port"
listener = "plain"
host = "443.test"
path_prefix = "/"
redirect = { host = "secure.test", port = 443 }
"#,
    );
    let addr = gw.addr("plain");
    let r = exchange(
        addr,
        b"POST /orders/7?expand=items&x=%20 HTTP/1.1\r\nHost: api.test:8080\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some("https://api.test/orders/7?expand=items&x=%20")
    );
    assert_eq!(r.header("content-length"), Some("0"));
    let r = exchange(addr, b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n");
    assert_eq!(r.header("location"), Some("https://[::1]/"));
    let r = exchange(addr, b"GET /a HTTP/1.1\r\nHost: old.test\r\n\r\n");
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://new.test:8443/a"));
    let r = exchange(addr, b"GET /b?c HTTP/1.1\r\nHost: 443.test\r\n\r\n");
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("https://secure.test/b?c"));
    // No Host to send the client back to: a 400, not a broken Location.
    let r = exchange(addr, b"GET /x HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 400);
    assert!(r.header("location").is_none());
}

#[test]
fn redirect_config_errors() {
    let base = "[[listeners]]\nname = \"p\"\naddress = \"127.0.0.1:0\"\n\n[[routes]]\nname = \"r\"\nlistener = \"p\"\npath_prefix = \"/\"\n";
    assert_config_error(
        &format!("{base}redirect = {{ status = 200 }}\n"),
        ":9:",
        "routes[0].redirect.status",
    );
    assert_config_error(
        &format!("{base}redirect = {{ scheme = \"ftp\" }}\n"),
        ":9:",
        "give \"https\" or \"http\"",
    );
    assert_config_error(
        &format!("{base}redirect = {{ host = \"evil.test/x\" }}\n"),
        ":9:",
        "is not a host name or address",
    );
    assert_config_error(
        &format!("{base}redirect = {{ port = 70000 }}\n"),
        ":9:",
        "must be between 1 and 65535",
    );
    assert_config_error(
        &format!("{base}redirect = {{}}\nrespond = {{ status = 200 }}\n"),
        ":6:",
        "exactly one of upstream, respond and redirect",
    );
}

#[test]
fn the_tls_example_config_checks_with_its_certificates() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples/tls.toml");
    let ca = Ca::new("ca");
    let clients = Ca::new("clients-ca");
    let internal = Ca::new("internal-ca");
    let certs = ca.path("certs");
    std::fs::create_dir(&certs).unwrap();
    let place = |issued: &Issued, name: &str| {
        std::fs::copy(&issued.cert, certs.join(format!("{name}.pem"))).unwrap();
        std::fs::copy(&issued.key, certs.join(format!("{name}.key"))).unwrap();
    };
    place(&ca.server("a", &["api.example.com"]), "api.example.com");
    place(&ca.server("w", &["*.example.org"]), "wildcard.example.org");
    place(&internal.client("gw", "gateway"), "gw");
    std::fs::copy(&clients.pem, certs.join("clients-ca.pem")).unwrap();
    std::fs::copy(&internal.pem, certs.join("internal-ca.pem")).unwrap();
    let config = ca.path("tls.toml");
    std::fs::copy(example, &config).unwrap();
    let (status, stdout, stderr) = run_ringway(&["check", "--config", config.to_str().unwrap()]);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains(": ok (2 listeners, 2 upstreams, 3 routes"),
        "{stdout}"
    );
    // Without its files the same config is refused, naming the first one.
    std::fs::remove_file(certs.join("api.example.com.key")).unwrap();
    let (status, _, stderr) = run_ringway(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains("listeners[1].tls.certificates[0].key"),
        "{stderr}"
    );
}
