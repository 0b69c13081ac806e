//! Proxy semantics of header fields (RFC 9110 §7.6): hop-by-hop removal both ways, the
//! X-Forwarded-* fields, and X-Request-Id.

mod common;

use common::*;

#[test]
fn hop_by_hop_request_fields_are_not_forwarded() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = Gateway::start(&proxy_config(&[up.addr], "", ""));
    let resp = exchange(
        gw.addr("public"),
        b"GET /x HTTP/1.1\r\nHost: shop.example\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\nAccept: text/plain\r\nX-Custom: 1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.status, 200);
    let got = &up.wait_for(1)[0];
    for gone in [
        "connection",
        "x-private",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert!(
            got.header(gone).is_none(),
            "{gone} was forwarded:\n{}",
            got.head
        );
    }
    assert_eq!(got.header("accept"), Some("text/plain"));
    assert_eq!(got.header("x-custom"), Some("1"));
    assert_eq!(got.header("host"), Some("shop.example"));
    assert!(got.head.starts_with("GET /x HTTP/1.1\r\n"), "{}", got.head);
}

#[test]
fn hop_by_hop_response_fields_are_not_returned() {
    let up = Upstream::start(|_| {
        Reply::ok("ok")
            .header("Connection", "X-Up-Private")
            .header("X-Up-Private", "1")
            .header("Keep-Alive", "timeout=3")
            .header("Cache-Control", "no-store")
    });
    let gw = Gateway::start(&proxy_config(&[up.addr], "", ""));
    let resp = get(gw.addr("public"), "/");
    assert_eq!(resp.status, 200);
    assert!(resp.header("x-up-private").is_none(), "{}", resp.head);
    assert!(resp.header("keep-alive").is_none(), "{}", resp.head);
    assert_eq!(resp.header("cache-control"), Some("no-store"));
    assert_eq!(resp.headers_named("connection"), ["close"]);
}

#[test]
fn forwarding_fields_are_the_gateways_own() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = Gateway::start(&proxy_config(&[up.addr], "", ""));
    let addr = gw.addr("public");
    exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: shop.example:8443\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-For: 198.51.100.2\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: spoofed\r\nConnection: close\r\n\r\n",
    );
    exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: plain\r\nConnection: close\r\n\r\n",
    );
    let got = up.wait_for(2);
    // 127.0.0.1 is not a trusted proxy: what it claims about earlier hops is not passed on.
    assert_eq!(got[0].headers_named("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(got[0].headers_named("x-forwarded-proto"), ["http"]);
    assert_eq!(
        got[0].headers_named("x-forwarded-host"),
        ["shop.example:8443"]
    );
    assert_eq!(got[0].headers_named("x-forwarded-port"), ["8443"]);
    assert_eq!(got[1].headers_named("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(got[1].headers_named("x-forwarded-host"), ["plain"]);
    assert_eq!(got[1].headers_named("x-forwarded-port"), ["80"]);
    assert!(got[1].header("forwarded").is_none(), "off by default");
}

#[test]
fn request_id_is_generated_when_absent_and_kept_when_present() {
    let up = Upstream::start(|r| {
        Reply::ok("ok")
            .header("X-Request-Id", "upstream-made-this-up")
            .header("X-Seen", r.header("x-request-id").unwrap_or(""))
    });
    let gw = Gateway::start(&proxy_config(&[up.addr], "", ""));
    let addr = gw.addr("public");

    let resp = get(addr, "/");
    let id = resp.header("x-request-id").expect("an id").to_owned();
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(resp.header("x-seen"), Some(id.as_str()));
    assert_eq!(resp.headers_named("x-request-id").len(), 1);

    let resp = exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-Id: client-123\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.headers_named("x-request-id"), ["client-123"]);
    assert_eq!(resp.header("x-seen"), Some("client-123"));
    let got = up.wait_for(2);
    assert_eq!(got[1].headers_named("x-request-id"), ["client-123"]);
    assert_ne!(get(addr, "/").header("x-request-id"), Some(id.as_str()));
}
