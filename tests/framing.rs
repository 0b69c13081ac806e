//! Request framing per RFC 9112: every ambiguity two hops could read differently is refused with
//! 400 and the connection closed, and the upstream receives nothing. What is forwarded carries
//! exactly one framing header, chosen by the gateway.

mod common;

use std::io::Write;

use common::*;

fn gateway(up: &Upstream) -> Gateway {
    Gateway::start_with_env(
        &proxy_config(&[up.addr], "", ""),
        &[("RINGWAY_LOG", "debug")],
    )
}

/// Sends `raw`, expects `status` and a closed connection; returns the response.
fn refused(gw: &Gateway, raw: &[u8], status: u16) -> Response {
    let mut conn = ResponseReader::new(connect(gw.addr("public")));
    conn.stream.write_all(raw).unwrap();
    let resp = conn
        .read_response(false)
        .unwrap_or_else(|| panic!("no response to {:?}", String::from_utf8_lossy(raw)));
    assert_eq!(
        resp.status,
        status,
        "{:?}: {}",
        String::from_utf8_lossy(raw),
        resp.text()
    );
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(
        conn.is_closed(),
        "connection left open after {:?}",
        String::from_utf8_lossy(raw)
    );
    resp
}

#[test]
fn ambiguous_framing_is_400_and_nothing_reaches_the_upstream() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = gateway(&up);
    let cases: &[(&str, &[u8])] = &[
        ("CL and TE", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("differing CLs", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ("CL list", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello"),
        ("signed CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello"),
        ("final coding not chunked", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
        ("other coding", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        ("chunked twice", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("TE on HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("bare LF in head", b"GET / HTTP/1.1\nHost: x\r\n\r\n"),
        ("bare LF ending head", b"GET / HTTP/1.1\r\nHost: x\n\n"),
        ("bare CR in value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n"),
        ("space before colon", b"GET / HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n"),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n"),
        ("NUL in value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n"),
        ("bad header name", b"GET / HTTP/1.1\r\nHost: x\r\nX(A): b\r\n\r\n"),
        ("bad method", b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("relative target", b"GET foo HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("asterisk on GET", b"GET * HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("no Host", b"GET / HTTP/1.1\r\n\r\n"),
        ("two Hosts", b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
        ("Host disagrees", b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n"),
        ("bad Host", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
    ];
    for (what, raw) in cases {
        let resp = refused(&gw, raw, 400);
        assert!(
            resp.json()["error"]
                .as_str()
                .unwrap()
                .starts_with("bad request"),
            "{what}"
        );
    }
    assert!(
        up.raw().is_empty(),
        "upstream saw {:?}",
        String::from_utf8_lossy(&up.raw())
    );
    gw.wait_log("a rejection logged with its reason", |l| {
        l.contains("request rejected") && l.contains("reason=\"malformed_head\"")
    });
}

#[test]
fn broken_chunked_bodies_are_400_and_nothing_reaches_the_upstream() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = gateway(&up);
    let head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let bodies: &[&[u8]] = &[
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"10000000000000000\r\nhello\r\n0\r\n\r\n",
        b"5 junk\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXY0\r\n\r\n",
        b"5\r\nhello\r\n0\r\n bad-trailer\r\n\r\n",
    ];
    for body in bodies {
        let raw = [head.as_slice(), body].concat();
        let resp = refused(&gw, &raw, 400);
        assert!(
            resp.json()["error"]
                .as_str()
                .unwrap()
                .starts_with("bad request"),
            "{}",
            resp.text()
        );
    }
    assert!(
        up.raw().is_empty(),
        "upstream saw {:?}",
        String::from_utf8_lossy(&up.raw())
    );
    gw.wait_log("a body rejection", |l| {
        l.contains("reason=\"malformed_body\"")
    });
}

#[test]
fn forwarded_requests_carry_exactly_one_framing_header() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = gateway(&up);
    let addr = gw.addr("public");
    for raw in [
        &b"POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\ncontent-length: 5\r\nConnection: close\r\n\r\nhello"[..],
        b"POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET /none HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        assert_eq!(exchange(addr, raw).status, 200);
    }
    let got = up.wait_for(3);
    fn framing(r: &Received) -> (Vec<&str>, Vec<&str>) {
        (
            r.headers_named("content-length"),
            r.headers_named("transfer-encoding"),
        )
    }
    assert_eq!(framing(&got[0]), (vec!["5"], vec![]));
    assert_eq!(framing(&got[1]), (vec![], vec!["chunked"]));
    assert_eq!(framing(&got[2]), (vec![], vec![]));
    assert_eq!(got[0].body, b"hello");
    assert_eq!(got[1].body, b"hello");
    // The chunked body went out in the gateway's own framing.
    let raw = String::from_utf8(up.raw()).unwrap();
    assert!(
        raw.contains("transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        "{raw}"
    );
}

#[test]
fn unsupported_versions_methods_and_expectations_have_their_own_statuses() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = gateway(&up);
    refused(&gw, b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505);
    refused(
        &gw,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        501,
    );
    refused(
        &gw,
        b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\nx",
        417,
    );
    assert!(up.raw().is_empty());
}
