//! Receives that run ahead of the reader. On io_uring a connection's bytes are received into
//! the worker's ring of buffers as they arrive (one multishot receive per connection; see
//! vendor/monoio/RINGWAY.md), before the gateway reads them. Many connections whose reader is
//! held up fill that ring: none of them may lose, double or reorder a byte, and the worker must
//! go on serving other connections.

mod common;

use std::{
    io::Write,
    sync::{Arc, Condvar, Mutex},
    thread,
};

use common::*;

/// Enough held-up connections, each with two 64 KiB bodies waiting behind its first request,
/// to take every buffer in a worker's ring (64 of 16 KiB) with either worker count.
const CLIENTS: usize = 48;
const BODY: usize = 64 * 1024;

/// An order-sensitive checksum: a lost, doubled or moved byte changes it.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().enumerate().fold(0u64, |s, (i, &b)| {
        s.wrapping_mul(31).wrapping_add(u64::from(b) ^ i as u64)
    })
}

#[test]
fn held_up_readers_on_many_connections_lose_no_bytes_and_block_no_one() {
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let held = Arc::clone(&gate);
    let up = Upstream::start(move |r| {
        if r.path.starts_with("/hold") {
            let (lock, cv) = &*held;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
        }
        Reply::ok(&format!(
            "{} {} {}",
            r.path,
            r.body.len(),
            checksum(&r.body)
        ))
    });
    let gw = Gateway::start(&proxy_config(&[up.addr], "", ""));
    let addr = gw.addr("public");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            thread::spawn(move || {
                let mut conn = ResponseReader::new(connect(addr));
                let mut wire = format!("GET /hold/{c} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
                let mut expect = vec![format!("/hold/{c} 0 {}", checksum(b""))];
                for k in 0..2 {
                    let body: Vec<u8> = (0..BODY).map(|i| (i * 7 + c * 3 + k) as u8).collect();
                    let path = format!("/after/{c}/{k}");
                    wire.extend_from_slice(
                        format!(
                            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n"
                        )
                        .as_bytes(),
                    );
                    wire.extend_from_slice(&body);
                    expect.push(format!("{path} {BODY} {}", checksum(&body)));
                }
                conn.stream.write_all(&wire).unwrap();
                expect
                    .into_iter()
                    .map(|want| (conn.read_response(false).expect("a response").text(), want))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    // Every connection's first request is at the upstream, so every reader is held up while
    // its connection's bodies arrive.
    up.wait_for(CLIENTS);
    assert_eq!(
        get(addr, "/free").text(),
        format!("/free 0 {}", checksum(b""))
    );
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    for client in clients {
        for (got, want) in client.join().expect("client thread") {
            assert_eq!(got, want);
        }
    }
    assert_eq!(up.count(), CLIENTS * 3 + 1);
}
