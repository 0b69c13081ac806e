//! Response compression (`compression` on a route) through the real gateway against recording
//! upstreams: each algorithm decoded by its reference crate, negotiation, what is never
//! compressed, HEAD, Range, ETag and Vary, streaming with a pausing upstream, the cache across
//! encodings, metrics and config errors.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::thread;

use common::*;

/// 20 KiB of JSON-ish text: compressible, over the default `min_bytes`.
fn json_body() -> String {
    let mut s = String::from("[");
    let mut i = 0;
    while s.len() < 20 * 1024 {
        s.push_str(&format!(
            "{{\"id\":{i},\"name\":\"item {i}\",\"tags\":[\"a\",\"b\"]}},"
        ));
        i += 1;
    }
    s.push_str("{}]");
    s
}

fn gateway(upstream: SocketAddr, route_extra: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
[admin]
address = "127.0.0.1:0"
[metrics]
interval_ms = 50
[cache]

[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[upstreams]]
name = "app"
targets = ["{upstream}"]

[[routes]]
name = "site"
listener = "public"
path_prefix = "/"
upstream = "app"
compression = {{ algorithms = ["zstd", "br", "gzip"], min_bytes = 1024, types = ["text/*", "application/json"] }}
{route_extra}
"#
    ))
}

fn request(gw: &Gateway, method: &str, path: &str, headers: &str) -> Response {
    exchange(
        gw.addr("public"),
        format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n")
            .as_bytes(),
    )
}

fn decode(coding: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .expect("gzip");
        }
        "br" => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .expect("br");
        }
        "zstd" => out = zstd::decode_all(body).expect("zstd"),
        other => panic!("coding {other}"),
    }
    out
}

fn json_upstream() -> Upstream {
    let body = json_body();
    Upstream::start(move |r| {
        let reply = Reply::ok(&body)
            .header("content-type", "application/json; charset=utf-8")
            .header("etag", "\"v1\"")
            .header("vary", "Origin");
        if r.path.starts_with("/chunked") {
            reply.chunked()
        } else {
            reply
        }
    })
}

#[test]
fn each_algorithm_round_trips_with_its_headers_and_keeps_the_connection() {
    let up = json_upstream();
    let gw = gateway(up.addr, "");
    for (accept, coding) in [("gzip", "gzip"), ("br", "br"), ("zstd", "zstd")] {
        for path in ["/sized", "/chunked"] {
            let mut s = connect(gw.addr("public"));
            let req =
                format!("GET {path} HTTP/1.1\r\nHost: t\r\nAccept-Encoding: {accept}\r\n\r\n");
            s.write_all(req.as_bytes()).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut reader = ResponseReader::new(s);
            for _ in 0..2 {
                let r = reader
                    .read_response(false)
                    .expect("a response on the same connection");
                assert_eq!(r.status, 200);
                assert_eq!(
                    r.header("content-encoding"),
                    Some(coding),
                    "{accept} {path}"
                );
                assert_eq!(r.header("transfer-encoding"), Some("chunked"));
                assert_eq!(r.header("content-length"), None);
                assert_eq!(r.header("etag"), Some("W/\"v1\""));
                assert_eq!(r.headers_named("vary"), vec!["Origin, Accept-Encoding"]);
                assert!(
                    r.body.len() < json_body().len() / 3,
                    "{coding}: {}",
                    r.body.len()
                );
                assert_eq!(decode(coding, &r.body), json_body().into_bytes());
            }
        }
    }
}

#[test]
fn negotiation_follows_q_values_then_the_route_order() {
    let up = json_upstream();
    let gw = gateway(up.addr, "");
    let cases = [
        ("gzip, br, zstd", Some("zstd")),     // a tie: the route's order
        ("gzip;q=1, br;q=0.5", Some("gzip")), // the highest q
        ("br;q=0.9, gzip;q=0.9", Some("br")), // a tie again
        ("zstd;q=0, *", Some("br")),          // q=0 excludes; * stands for the rest
        ("*;q=0.1, gzip;q=0.2", Some("gzip")),
        ("identity", None),
        ("deflate, compress", None),    // nothing the route makes
        ("gzip;q=0.5, identity", None), // identity preferred
        ("gzip;q=0", None),
    ];
    for (accept, want) in cases {
        let r = request(&gw, "GET", "/n", &format!("Accept-Encoding: {accept}\r\n"));
        assert_eq!(r.header("content-encoding"), want, "{accept}");
        assert_eq!(
            r.headers_named("vary"),
            vec!["Origin, Accept-Encoding"],
            "{accept}"
        );
        let body = match want {
            Some(c) => decode(c, &r.body),
            None => r.body.clone(),
        };
        assert_eq!(body, json_body().into_bytes(), "{accept}");
    }
    let r = request(&gw, "GET", "/n", "");
    assert_eq!(
        r.header("content-encoding"),
        None,
        "no Accept-Encoding: as is"
    );
    assert_eq!(
        r.header("content-length"),
        Some(json_body().len().to_string().as_str())
    );
}

#[test]
fn some_responses_are_never_compressed() {
    let big = "x".repeat(4096);
    let up = Upstream::start(move |r| {
        let text = |body: &str| Reply::ok(body).header("content-type", "text/plain");
        match r.path.as_str() {
            "/small" => text("tiny"),
            "/image" => Reply::ok(&big).header("content-type", "image/png"),
            "/encoded" => text(&big).header("content-encoding", "gzip"),
            "/no-transform" => text(&big).header("cache-control", "no-transform"),
            "/empty" => text("").status(204),
            "/not-modified" => text("").status(304),
            "/partial" => text(&big)
                .status(206)
                .header("content-range", "bytes 0-4095/9000"),
            _ => text(&big),
        }
    });
    let gw = gateway(up.addr, "");
    let gz = "Accept-Encoding: gzip\r\n";
    let r = request(&gw, "GET", "/small", gz);
    assert_eq!(
        (r.header("content-encoding"), r.text().as_str()),
        (None, "tiny")
    );
    let r = request(&gw, "GET", "/image", gz);
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(
        r.header("vary"),
        None,
        "a type that is never compressed does not vary"
    );
    let r = request(&gw, "GET", "/encoded", gz);
    assert_eq!(
        r.header("content-encoding"),
        Some("gzip"),
        "passed byte for byte"
    );
    assert_eq!(r.body, "x".repeat(4096).into_bytes());
    let r = request(&gw, "GET", "/no-transform", gz);
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.body.len(), 4096);
    for path in ["/empty", "/not-modified", "/partial"] {
        let r = request(&gw, "GET", path, gz);
        assert_eq!(r.header("content-encoding"), None, "{path}");
    }
    // A Range request: the upstream's answer is passed as is.
    let r = request(
        &gw,
        "GET",
        "/text",
        "Accept-Encoding: gzip\r\nRange: bytes=0-9\r\n",
    );
    assert_eq!(r.header("content-encoding"), None);
    // The uncompressed answer of a response that could have been compressed varies too.
    let r = request(&gw, "GET", "/text", "Accept-Encoding: identity\r\n");
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.header("vary"), Some("Accept-Encoding"));
}

#[test]
fn head_gets_the_headers_get_would_and_no_body() {
    let up = json_upstream();
    let gw = gateway(up.addr, "");
    let mut s = connect(gw.addr("public"));
    s.write_all(b"HEAD /h HTTP/1.1\r\nHost: t\r\nAccept-Encoding: br\r\n\r\nGET /h HTTP/1.1\r\nHost: t\r\nAccept-Encoding: br\r\n\r\n")
        .unwrap();
    let mut reader = ResponseReader::new(s);
    let head = reader.read_response(true).expect("HEAD answer");
    assert_eq!(head.header("content-encoding"), Some("br"));
    assert_eq!(head.header("content-length"), None);
    assert_eq!(head.header("etag"), Some("W/\"v1\""));
    assert!(head.body.is_empty());
    let get = reader
        .read_response(false)
        .expect("GET answer on the same connection");
    assert_eq!(decode("br", &get.body), json_body().into_bytes());
}

/// The upstream sends a first part, then waits for the test before sending the rest: the
/// client must be able to decode the first part before the upstream goes on.
#[test]
fn a_pausing_upstream_streams_its_first_part_compressed() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_on, wait) = mpsc::channel::<()>();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            head.extend_from_slice(&buf[..n]);
        }
        let first = "first part ".repeat(200);
        write!(s, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n", first.len()).unwrap();
        wait.recv().unwrap();
        let rest = "second part ".repeat(200);
        write!(s, "{:x}\r\n{rest}\r\n0\r\n\r\n", rest.len()).unwrap();
    });
    let gw = gateway(addr, "");
    let mut s = connect(gw.addr("public"));
    s.write_all(
        b"GET /slow HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    // Read until the first part decodes, while the upstream holds the rest.
    let mut received = Vec::new();
    let mut decoder = flate2::write::GzDecoder::new(Vec::new());
    let first = "first part ".repeat(200);
    let mut fed = 0;
    let mut buf = [0u8; 65536];
    loop {
        let n = s
            .read(&mut buf)
            .expect("the first part before the upstream goes on");
        assert!(n > 0, "closed early");
        received.extend_from_slice(&buf[..n]);
        let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        // Unframe what chunks are whole so far.
        let mut at = end + 4;
        let mut data = Vec::new();
        while let Some(line_end) = received[at..].windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(
                std::str::from_utf8(&received[at..at + line_end]).unwrap(),
                16,
            )
            .unwrap();
            let start = at + line_end + 2;
            if received.len() < start + size + 2 {
                break;
            }
            data.extend_from_slice(&received[start..start + size]);
            at = start + size + 2;
        }
        decoder.write_all(&data[fed..]).unwrap();
        fed = data.len();
        decoder.flush().unwrap();
        if decoder.get_ref().len() >= first.len() {
            break;
        }
    }
    assert_eq!(&decoder.get_ref()[..first.len()], first.as_bytes());
    go_on.send(()).unwrap();
    let mut reader = ResponseReader::new(s);
    let _ = reader.read_to_close();
}

#[test]
fn the_cache_keeps_one_entry_per_coding_and_asks_once_for_each() {
    let up = Upstream::start(|_| {
        Reply::ok(&json_body())
            .header("content-type", "application/json")
            .header("cache-control", "max-age=60")
    });
    let gw = gateway(up.addr, "cache = { default_ttl_ms = 60000 }");
    let ask = |accept: &str| request(&gw, "GET", "/c", &format!("Accept-Encoding: {accept}\r\n"));
    let spellings = [
        ("gzip", Some("gzip")),
        ("gzip;q=1.0", Some("gzip")),
        ("br", Some("br")),
        ("br, gzip;q=0.5", Some("br")),
        ("identity", None),
        ("deflate", None),
    ];
    for (accept, want) in spellings {
        let r = ask(accept);
        assert_eq!(r.header("content-encoding"), want, "{accept}");
        let body = want.map_or_else(|| r.body.clone(), |c| decode(c, &r.body));
        assert_eq!(body, json_body().into_bytes(), "{accept}");
    }
    // gzip, br and identity: three fetches, whatever the spellings.
    assert_eq!(up.count(), 3);
    let again = ask("gzip, deflate");
    assert_eq!(again.header("x-cache"), Some("HIT"));
    assert_eq!(again.header("content-encoding"), Some("gzip"));
    assert_eq!(decode("gzip", &again.body), json_body().into_bytes());
    assert_eq!(up.count(), 3);
}

#[test]
fn metrics_count_responses_and_bytes() {
    let up = json_upstream();
    let gw = gateway(up.addr, "");
    for _ in 0..2 {
        request(&gw, "GET", "/m", "Accept-Encoding: gzip\r\n");
    }
    request(&gw, "GET", "/m", "Accept-Encoding: zstd\r\n");
    let admin = gw.admin.unwrap();
    wait_metric(
        admin,
        "ringway_compressed_responses_total{route=\"site\",algorithm=\"gzip\"}",
        2.0,
    );
    wait_metric(
        admin,
        "ringway_compressed_responses_total{route=\"site\",algorithm=\"zstd\"}",
        1.0,
    );
    let bytes_in = (3 * json_body().len()) as f64;
    wait_metric(
        admin,
        "ringway_compression_bytes_total{route=\"site\",direction=\"in\"}",
        bytes_in,
    );
    let out = metric(
        admin,
        "ringway_compression_bytes_total{route=\"site\",direction=\"out\"}",
    )
    .unwrap();
    assert!(out > 0.0 && out < bytes_in / 3.0, "{out}");
}

#[test]
fn config_errors_name_the_key() {
    let base = |compression: &str| {
        format!(
            r#"
[[listeners]]
name = "public"
address = "127.0.0.1:0"
[[upstreams]]
name = "app"
targets = ["127.0.0.1:9"]
[[routes]]
name = "site"
listener = "public"
path_prefix = "/"
upstream = "app"
compression = {compression}
"#
        )
    };
    assert_refused(
        &base(r#"{ algorithms = ["deflate"] }"#),
        "routes[0].compression.algorithms",
        "\"deflate\" is not one of",
    );
    assert_refused(
        &base(r#"{ algorithms = [] }"#),
        "routes[0].compression.algorithms",
        "at least one",
    );
    assert_refused(
        &base(r#"{ algorithms = ["gzip", "gzip"] }"#),
        "routes[0].compression.algorithms",
        "twice",
    );
    assert_refused(
        &base(r#"{ types = ["json"] }"#),
        "routes[0].compression.types",
        "not a media type",
    );
    assert_refused(&base(r#"{ level = 9 }"#), "level", "unknown field");
}
