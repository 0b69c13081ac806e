//! Balancers, passive health, the stale-connection retry, and every upstream-facing error
//! status (502, 503, 504) plus the request-size errors (413, 414, 431) and 400.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use common::*;

fn bodies(addr: SocketAddr, n: usize, req: impl Fn(usize) -> String) -> Vec<String> {
    (0..n)
        .map(|i| {
            let resp = exchange(addr, req(i).as_bytes());
            assert_eq!(resp.status, 200, "{}", resp.text());
            resp.text()
        })
        .collect()
}

fn tally(picks: &[String]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for p in picks {
        *counts.entry(p.clone()).or_insert(0) += 1;
    }
    counts
}

fn plain_get(_: usize) -> String {
    "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into()
}

#[test]
fn round_robin_takes_turns() {
    let ups: Vec<Upstream> = (0..3).map(|_| Upstream::echo_addr()).collect();
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let gw = Gateway::start(&proxy_config(&addrs, "balance = \"round_robin\"", ""));
    let picks = bodies(gw.addr("public"), 30, plain_get);
    for window in picks.chunks(3) {
        let mut w = window.to_vec();
        w.sort();
        w.dedup();
        assert_eq!(
            w.len(),
            3,
            "each window of three visits every target: {picks:?}"
        );
    }
}

#[test]
fn random_spreads_over_all_targets() {
    let ups: Vec<Upstream> = (0..3).map(|_| Upstream::echo_addr()).collect();
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let gw = Gateway::start(&proxy_config(&addrs, "balance = \"random\"", ""));
    let counts = tally(&bodies(gw.addr("public"), 300, plain_get));
    assert_eq!(counts.len(), 3, "{counts:?}");
    // Binomial(300, 1/3): mean 100, sd 8.2; 45 is more than five sd away.
    for (target, n) in &counts {
        assert!((55..=145).contains(n), "{target}: {n} of 300");
    }
}

/// An upstream that holds each request until the test lets it go.
struct Gate {
    permits: Mutex<usize>,
    cv: Condvar,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            permits: Mutex::new(0),
            cv: Condvar::new(),
        })
    }

    fn pass(&self) {
        let mut p = self.permits.lock().unwrap();
        while *p == 0 {
            p = self.cv.wait(p).unwrap();
        }
        *p -= 1;
    }

    fn release(&self, n: usize) {
        *self.permits.lock().unwrap() += n;
        self.cv.notify_all();
    }
}

fn gated_upstream(gate: Arc<Gate>) -> Upstream {
    Upstream::start(move |_| {
        gate.pass();
        Reply::ok("")
    })
}

#[test]
fn least_request_sends_new_requests_to_the_less_busy_target() {
    let (gate_a, gate_b) = (Gate::new(), Gate::new());
    let a = gated_upstream(Arc::clone(&gate_a));
    let b = gated_upstream(Arc::clone(&gate_b));
    let gw = Gateway::start(&proxy_config(
        &[a.addr, b.addr],
        "balance = \"least_request\"",
        "",
    ));
    let addr = gw.addr("public");
    let send = move || {
        thread::spawn(move || {
            let r = get(addr, "/");
            assert_eq!(r.status, 200);
        })
    };
    let held = |n: usize| {
        eventually("requests to arrive", || {
            (a.count() + b.count() == n).then_some(())
        })
    };

    // Two requests in flight: one on each target.
    let first = send();
    held(1);
    let first_on_a = a.count() == 1;
    let second = send();
    held(2);
    assert_eq!((a.count(), b.count()), (1, 1));
    // Finish the second request: its target now has nothing in flight while the other has
    // one, so the third must go where the second went (round robin would alternate).
    let (first_gate, second_gate, second_target) = if first_on_a {
        (&gate_a, &gate_b, &b)
    } else {
        (&gate_b, &gate_a, &a)
    };
    second_gate.release(1);
    second.join().unwrap();
    let third = send();
    held(3);
    assert_eq!(second_target.count(), 2);
    first_gate.release(1);
    second_gate.release(1);
    first.join().unwrap();
    third.join().unwrap();
}

#[test]
fn consistent_hash_keeps_each_key_on_one_target_and_spreads_keys() {
    let ups: Vec<Upstream> = (0..3).map(|_| Upstream::echo_addr()).collect();
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let gw = Gateway::start(&proxy_config(
        &addrs,
        "balance = \"consistent_hash\"\nhash_key = \"header:X-User\"",
        "",
    ));
    let addr = gw.addr("public");
    let user_req = |user: usize| {
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-User: user-{user}\r\nConnection: close\r\n\r\n")
    };
    let first = bodies(addr, 60, user_req);
    let again = bodies(addr, 60, user_req);
    assert_eq!(first, again, "every key stays on its target");
    let counts = tally(&first);
    assert_eq!(counts.len(), 3, "{counts:?}");
    for n in counts.values() {
        assert!(*n >= 8, "{counts:?}");
    }
}

#[test]
fn consistent_hash_moves_only_the_keys_of_a_failed_target() {
    let ups: Vec<Upstream> = (0..2).map(|_| Upstream::echo_addr()).collect();
    let dead = closed_port();
    let gw = Gateway::start(&proxy_config(
        &[ups[0].addr, ups[1].addr, dead],
        "balance = \"consistent_hash\"\nhash_key = \"header:X-User\"\nfail_timeout_ms = 60000",
        "",
    ));
    let addr = gw.addr("public");
    let user_req = |user: usize| {
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-User: user-{user}\r\nConnection: close\r\n\r\n")
    };
    // Keys on the dead target fail over (connect refused, target marked down, next target).
    let first = bodies(addr, 60, user_req);
    let again = bodies(addr, 60, user_req);
    assert_eq!(first, again);
    assert_eq!(tally(&first).len(), 2);
}

#[test]
fn refused_connect_is_502_then_the_target_is_down_and_503() {
    let gw = Gateway::start(&proxy_config(
        &[closed_port()],
        "fail_timeout_ms = 60000",
        "",
    ));
    let addr = gw.addr("public");
    let first = get(addr, "/");
    assert_eq!(first.status, 502, "{}", first.text());
    assert!(first.json()["error"]
        .as_str()
        .unwrap()
        .contains("upstream unreachable"));
    let second = get(addr, "/");
    assert_eq!(second.status, 503, "{}", second.text());
    assert_eq!(second.json()["error"], "no healthy upstream target");
}

#[test]
fn a_failed_target_is_skipped_and_the_request_still_succeeds() {
    let up = Upstream::echo_addr();
    let gw = Gateway::start(&proxy_config(
        &[closed_port(), up.addr],
        "fail_timeout_ms = 60000",
        "",
    ));
    for _ in 0..4 {
        let resp = get(gw.addr("public"), "/");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), up.addr.to_string());
    }
}

/// An upstream that answers one request per connection with a keep-alive response and then
/// closes the connection, as servers with a short keep-alive timeout do.
fn one_shot_upstream() -> (
    SocketAddr,
    Arc<Mutex<Vec<String>>>,
    crossbeam_channel::Receiver<()>,
) {
    let (listener, addr) = raw_upstream();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (closed_tx, closed) = crossbeam_channel::unbounded();
    let log = Arc::clone(&seen);
    thread::spawn(move || {
        for (n, s) in listener.incoming().enumerate() {
            let Ok(mut s) = s else { break };
            let head = String::from_utf8(read_head(&mut s)).unwrap();
            log.lock()
                .unwrap()
                .push(format!("conn{n}: {}", head.lines().next().unwrap()));
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            drop(s);
            let _ = closed_tx.send(());
        }
    });
    (addr, seen, closed)
}

#[test]
fn idempotent_request_on_a_stale_pooled_connection_is_retried_once() {
    let (addr, seen, closed) = one_shot_upstream();
    let gw = Gateway::start(&proxy_config(&[addr], "", ""));
    let public = gw.addr("public");
    assert_eq!(get(public, "/first").status, 200);
    closed.recv().unwrap();
    // The pooled connection is now closed by the upstream; the gateway does not know yet.
    let resp = get(public, "/second");
    assert_eq!((resp.status, resp.text().as_str()), (200, "ok"));
    assert_eq!(
        *seen.lock().unwrap(),
        ["conn0: GET /first HTTP/1.1", "conn1: GET /second HTTP/1.1"]
    );
}

#[test]
fn non_idempotent_request_on_a_stale_pooled_connection_is_not_retried() {
    let (addr, seen, closed) = one_shot_upstream();
    let gw = Gateway::start(&proxy_config(&[addr], "", ""));
    let public = gw.addr("public");
    assert_eq!(get(public, "/first").status, 200);
    closed.recv().unwrap();
    let resp = exchange(
        public,
        b"POST /pay HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
    );
    assert_eq!(resp.status, 502);
    assert_eq!(seen.lock().unwrap().len(), 1, "the POST was never replayed");
}
