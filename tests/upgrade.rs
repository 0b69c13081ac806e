//! `Upgrade` (e.g. WebSocket): after a 101 the gateway relays raw bytes both ways.

mod common;

use std::io::{Read, Write};

use common::*;

#[test]
fn upgrade_is_tunnelled_as_raw_bytes_both_ways() {
    let (addr, upstream) = upgrading_echo();
    let gw = Gateway::start(&proxy_config(&[addr], "", ""));
    let mut conn = ResponseReader::new(connect(gw.addr("public")));
    // Bytes sent right behind the head, before the 101, belong to the tunnel too.
    conn.stream
        .write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: k\r\n\r\nearly ")
        .unwrap();
    let resp = conn.read_response(false).unwrap();
    assert_eq!(resp.status, 101);
    assert_eq!(resp.header("upgrade"), Some("websocket"));
    assert_eq!(resp.header("connection"), Some("upgrade"));
    assert_eq!(resp.header("sec-websocket-accept"), Some("abc"));

    // The upstream may echo "early " before "frame" is sent: it can arrive with the 101.
    let (mut s, mut got) = conn.into_parts();
    s.write_all(b"frame").unwrap();
    let mut buf = [0u8; 64];
    while got.len() < b"EARLY FRAME".len() {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "tunnel closed early: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"EARLY FRAME");
    half_close(&s);
    let head = upstream.join().unwrap();
    assert!(head.contains("Upgrade: websocket\r\n"), "{head}");
    assert!(head.contains("connection: upgrade\r\n"), "{head}");
    // The upstream closed after our half-close: the tunnel ends on both sides.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn refused_upgrade_is_an_ordinary_response() {
    let up = Upstream::start(|_| Reply::ok("no upgrade for you").status(426));
    let gw = Gateway::start(&proxy_config(&[up.addr], "", ""));
    let resp = exchange(
        gw.addr("public"),
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    assert_eq!(resp.status, 426);
    assert_eq!(resp.text(), "no upgrade for you");
}
