//! Circuit breaking through the real gateway: past `max_requests` in flight, past
//! `max_pending` waiting for a connection, or with no connection freed in time, requests get an
//! immediate 503 naming the limit; once the upstream drains, requests pass again.

mod common;

use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use common::*;

/// An upstream whose answers wait until the test opens the gate.
struct Gated {
    server: Upstream,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl Gated {
    fn start() -> Gated {
        let gate: Arc<(Mutex<bool>, Condvar)> = Arc::default();
        let g = Arc::clone(&gate);
        let server = Upstream::start(move |_| {
            let (open, cv) = &*g;
            let mut open = open.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            Reply::ok("ok")
        });
        Gated { server, gate }
    }

    fn open(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }
}

fn gateway(upstream: std::net::SocketAddr, limits: &str) -> Gateway {
    let upstream_extra = format!("connect_timeout_ms = 300\n[upstreams.limits]\n{limits}");
    let proxy = proxy_config(&[upstream], &upstream_extra, "");
    Gateway::start(&format!("[admin]\naddress = \"127.0.0.1:0\"\n{proxy}"))
}

fn in_background(gw: &Gateway, path: &str) -> thread::JoinHandle<Response> {
    let (addr, path) = (gw.addr("public"), path.to_owned());
    thread::spawn(move || get(addr, &path))
}

fn refusals(gw: &Gateway, limit: &str) -> u64 {
    let m = get(gw.admin.unwrap(), "/metrics").text();
    let key =
        format!("ringway_upstream_breaker_refusals_total{{upstream=\"app\",limit=\"{limit}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&key)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn past_max_requests_in_flight_requests_are_refused_then_pass_again() {
    let up = Gated::start();
    let gw = gateway(up.server.addr, "max_requests = 1");
    let first = in_background(&gw, "/first");
    up.server.wait_for(1);
    let r = get(gw.addr("public"), "/second");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("max_requests"), "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    up.open();
    assert_eq!(first.join().unwrap().status, 200);
    assert_eq!(get(gw.addr("public"), "/third").status, 200, "recovered");
    eventually("the refusal counted", || {
        (refusals(&gw, "max_requests") == 1).then_some(())
    });
}

#[test]
fn past_max_pending_waiting_for_a_connection_requests_are_refused() {
    let up = Gated::start();
    let gw = gateway(
        up.server.addr,
        "max_connections = 1\nmax_pending = 1\nmax_requests = 100",
    );
    let first = in_background(&gw, "/first");
    up.server.wait_for(1);
    // Two more: one waits for the connection, the other is refused at once.
    let (b, c) = (in_background(&gw, "/b"), in_background(&gw, "/c"));
    let refused = eventually("one refused", || {
        [&b, &c].iter().position(|h| h.is_finished())
    });
    let (done, waiting) = if refused == 0 { (b, c) } else { (c, b) };
    let r = done.join().unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("max_pending"), "{}", r.text());
    // The connection comes free: the waiting request takes it.
    up.open();
    assert_eq!(first.join().unwrap().status, 200);
    assert_eq!(waiting.join().unwrap().status, 200);
    assert_eq!(up.server.connections(), 1, "never more than one connection");
    assert_eq!(get(gw.addr("public"), "/after").status, 200, "recovered");
    eventually("the refusal counted", || {
        (refusals(&gw, "max_pending") == 1).then_some(())
    });
}

#[test]
fn a_request_waiting_longer_than_the_connect_timeout_is_refused() {
    let up = Gated::start();
    let gw = gateway(up.server.addr, "max_connections = 1");
    let first = in_background(&gw, "/first");
    up.server.wait_for(1);
    let started = std::time::Instant::now();
    let r = get(gw.addr("public"), "/second");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("no connection"), "{}", r.text());
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));
    up.open();
    assert_eq!(first.join().unwrap().status, 200);
    assert_eq!(get(gw.addr("public"), "/third").status, 200);
    eventually("the refusal counted", || {
        (refusals(&gw, "max_connections") == 1).then_some(())
    });
}

#[test]
fn limits_config_errors_name_the_key() {
    let base = "[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"u\"\ntargets = [\"127.0.0.1:9\"]\n[upstreams.limits]\n";
    for (extra, key) in [
        ("max_connections = 0\n", "limits.max_connections"),
        ("max_requests = 0\n", "limits.max_requests"),
        ("max_pending = 2000000\n", "limits.max_pending"),
    ] {
        assert_refused(
            &format!("{base}{extra}"),
            &format!("upstreams[0].{key}"),
            "must be between",
        );
    }
}
