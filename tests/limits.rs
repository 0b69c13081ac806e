//! Size and count limits under `[limits]` and per route: each is refused with its status before
//! anything reaches the upstream, and nothing is buffered past the limit.

mod common;

use std::io::{Read, Write};

use common::*;

fn limited(up: &Upstream, limits: &str, route_extra: &str) -> Gateway {
    Gateway::start_with_env(
        &format!(
            "[runtime]\nworkers = 1\npin_cores = false\n[limits]\n{limits}\n{}",
            proxy_config(&[up.addr], "", route_extra)
        ),
        &[("RINGWAY_LOG", "debug")],
    )
}

#[test]
fn oversized_request_line_is_414_and_oversized_headers_431() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = limited(
        &up,
        "max_request_line_bytes = 256\nmax_header_bytes = 2048\nmax_headers = 10",
        "",
    );
    let addr = gw.addr("public");
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(300));
    assert_eq!(exchange(addr, long_line.as_bytes()).status, 414);
    // Refused as soon as the limit is passed, without waiting for the end of the line.
    let endless = format!("GET /{}", "a".repeat(300));
    assert_eq!(exchange(addr, endless.as_bytes()).status, 414);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(3000)
    );
    assert_eq!(exchange(addr, big.as_bytes()).status, 431);
    let many: String = (0..11).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_eq!(exchange(addr, many.as_bytes()).status, 431);
    let fits: String = (0..8).map(|i| format!("X-H{i}: v\r\n")).collect();
    let fits = format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{fits}\r\n");
    assert_eq!(exchange(addr, fits.as_bytes()).status, 200);
    assert_eq!(up.count(), 1);
    gw.wait_log("the 414 counted", |l| {
        l.contains("reason=\"request_line_too_long\"")
    });
    gw.wait_log("the 431 counted", |l| {
        l.contains("reason=\"headers_too_large\"")
    });
}

#[test]
fn body_over_max_body_bytes_is_413_and_never_reaches_the_upstream() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = limited(&up, "", "max_body_bytes = 10");
    let addr = gw.addr("public");
    // A declared length over the limit is refused before any body byte is read.
    let declared = exchange(
        addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world",
    );
    assert_eq!(declared.status, 413);
    let chunked = exchange(
        addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n",
    );
    assert_eq!(chunked.status, 413);
    let fits = exchange(
        addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhelloworld",
    );
    assert_eq!(fits.status, 200);
    assert_eq!(up.count(), 1);
    assert!(!String::from_utf8_lossy(&up.raw()).contains("hello world"));
    gw.wait_log("the 413 counted", |l| {
        l.contains("reason=\"body_too_large\"")
    });
}

#[test]
fn long_chunk_extensions_and_large_trailers_are_400() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = limited(
        &up,
        "max_chunk_extension_bytes = 16\nmax_trailer_bytes = 64",
        "",
    );
    let addr = gw.addr("public");
    let head = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let ext = format!("{head}5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(20));
    assert_eq!(exchange(addr, ext.as_bytes()).status, 400);
    let trailers = format!("{head}5\r\nhello\r\n0\r\nX-T: {}\r\n\r\n", "t".repeat(80));
    assert_eq!(exchange(addr, trailers.as_bytes()).status, 400);
    let fine = format!("{head}5;short\r\nhello\r\n0\r\nX-T: t\r\n\r\n");
    assert_eq!(exchange(addr, fine.as_bytes()).status, 200);
    assert_eq!(up.count(), 1);
}

#[test]
fn connections_past_max_connections_are_closed_at_accept() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = limited(&up, "max_connections = 2", "");
    let addr = gw.addr("public");
    let mut first = ResponseReader::new(connect(addr));
    let mut second = ResponseReader::new(connect(addr));
    // Both are served (and stay open, keep-alive).
    for c in [&mut first, &mut second] {
        c.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert_eq!(c.read_response(false).unwrap().status, 200);
    }
    let mut third = connect(addr);
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = [0u8; 64];
    let n = third.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the connection over the limit got {:?}", &buf[..n]);
    gw.wait_log("the refusal", |l| l.contains("reason=\"connection_limit\""));
    // A slot frees when a connection closes.
    drop(first);
    eventually("a free connection slot", || {
        let mut c = ResponseReader::new(connect(addr));
        c.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        c.read_response(false).filter(|r| r.status == 200)
    });
}
