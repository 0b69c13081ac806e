//! Upstreams that misbehave: garbage, oversized or ambiguous heads (502), silence (504), a
//! close in the middle of a body (the client connection closes; the response never looks
//! complete), stray bytes after a response. A connection that misbehaved is never pooled.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use common::*;

fn scripted_upstream(reply: &'static [u8]) -> SocketAddr {
    let (listener, addr) = raw_upstream();
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { break };
            thread::spawn(move || {
                read_head(&mut s);
                let _ = s.write_all(reply);
                let mut sink = [0u8; 1024];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// Like `scripted_upstream`, but counts connections and answers with `reply(connection)`.
fn counting_upstream(reply: fn(usize) -> &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let (listener, addr) = raw_upstream();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { break };
            let n = seen.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                // Every request on this connection gets the same reply.
                while !read_head(&mut s).is_empty() {
                    if s.write_all(reply(n)).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, count)
}

#[test]
fn garbage_or_oversized_response_heads_are_502() {
    for reply in [
        &b"SSH-2.0-OpenSSH_9.2\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        let gw = Gateway::start(&proxy_config(&[scripted_upstream(reply)], "", ""));
        let resp = get(gw.addr("public"), "/");
        assert_eq!(resp.status, 502, "{}", resp.text());
        assert!(resp.json()["error"]
            .as_str()
            .unwrap()
            .contains("invalid upstream response"));
    }
    let huge: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let gw = Gateway::start(&proxy_config(&[scripted_upstream(huge)], "", ""));
    assert_eq!(get(gw.addr("public"), "/").status, 502);
}

#[test]
fn silent_upstream_is_504_after_request_timeout() {
    let gw = Gateway::start(&proxy_config(
        &[scripted_upstream(b"")],
        "request_timeout_ms = 300",
        "",
    ));
    let resp = get(gw.addr("public"), "/");
    assert_eq!(resp.status, 504);
    assert_eq!(resp.json()["error"], "upstream timed out");
}

#[test]
fn a_connection_that_failed_is_never_pooled() {
    // The first connection answers garbage; later ones answer properly.
    let (addr, conns) = counting_upstream(|n| {
        if n == 0 {
            b"NOT HTTP\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        }
    });
    let gw = Gateway::start(&proxy_config(&[addr], "", ""));
    let public = gw.addr("public");
    assert_eq!(get(public, "/").status, 502);
    assert_eq!(get(public, "/").status, 200);
    assert_eq!(get(public, "/").status, 200);
    // One bad connection, then one good one that was pooled and reused.
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

#[test]
fn bytes_after_a_complete_response_keep_that_connection_out_of_the_pool() {
    let (addr, conns) =
        counting_upstream(|_| b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokJUNK");
    let gw = Gateway::start(&proxy_config(&[addr], "", ""));
    let public = gw.addr("public");
    for _ in 0..3 {
        let resp = get(public, "/");
        assert_eq!((resp.status, resp.text().as_str()), (200, "ok"));
    }
    assert_eq!(conns.load(Ordering::SeqCst), 3);
}

#[test]
fn upstream_closing_inside_a_small_body_before_anything_was_sent_is_502() {
    // A small sized body is gathered before the first write, so nothing has gone out yet.
    let (listener, addr) = raw_upstream();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_head(&mut s);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
            .unwrap();
    });
    let gw = Gateway::start(&proxy_config(&[addr], "", ""));
    let resp = get(gw.addr("public"), "/");
    assert_eq!(resp.status, 502);
    assert!(resp.json()["error"]
        .as_str()
        .unwrap()
        .contains("inside the response body"));
}

#[test]
fn upstream_closing_inside_a_large_body_closes_the_client_connection_short() {
    let (listener, addr) = raw_upstream();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_head(&mut s);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
            .unwrap();
        s.write_all(&[b'a'; 50_000]).unwrap();
    });
    let gw = Gateway::start(&proxy_config(&[addr], "", ""));
    let mut s = connect(gw.addr("public"));
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let split = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    let head = String::from_utf8_lossy(&got[..split]);
    assert!(head.contains("content-length: 1000000"), "{head}");
    // Fifty thousand bytes and then the connection closed: the client can tell it is short.
    assert_eq!(got.len() - split, 50_000);
}

#[test]
fn upstream_closing_inside_a_chunked_body_never_yields_the_last_chunk() {
    let (listener, addr) = raw_upstream();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_head(&mut s);
        s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .unwrap();
    });
    let gw = Gateway::start(&proxy_config(&[addr], "", ""));
    let mut s = connect(gw.addr("public"));
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let got = String::from_utf8(got).unwrap();
    let (_, body) = got.split_once("\r\n\r\n").unwrap();
    assert_eq!(
        body, "5\r\nhello\r\n",
        "no terminating chunk may be invented"
    );
}

#[test]
fn switching_protocols_without_an_upgrade_request_is_502() {
    let gw = Gateway::start(&proxy_config(
        &[scripted_upstream(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        )],
        "",
        "",
    ));
    assert_eq!(get(gw.addr("public"), "/").status, 502);
}
