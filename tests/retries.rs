//! Retries through the real gateway: a failed attempt (a 503, a reset) tried again on another
//! target; non-idempotent requests never resent; the budget bounding what a total outage costs
//! the upstreams; config errors.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;

/// An upstream that answers `name`, or 503 while `failing`.
fn backend(name: &'static str, failing: &Arc<AtomicBool>) -> Upstream {
    let f = Arc::clone(failing);
    Upstream::start(move |_| {
        if f.load(Ordering::SeqCst) {
            Reply::ok("down").status(503)
        } else {
            Reply::ok(name)
        }
    })
}

fn gateway(targets: &[SocketAddr], retries: &str) -> Gateway {
    let proxy = proxy_config(targets, &format!("[upstreams.retries]\n{retries}"), "");
    Gateway::start(&format!("[admin]\naddress = \"127.0.0.1:0\"\n{proxy}"))
}

fn send(gw: &Gateway, method: &str, path: &str) -> Response {
    let body = if method == "GET" { "" } else { "payload" };
    exchange(
        gw.addr("public"),
        format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

#[test]
fn a_503_is_retried_on_another_target_but_never_for_a_post() {
    let (a_down, b_down) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (a, b) = (backend("a", &a_down), backend("b", &b_down));
    let gw = gateway(
        &[a.addr, b.addr],
        "attempts = 2\non = [\"503\"]\nbackoff_ms = 1",
    );
    // Traffic earns the retry budget (a fifth of a retry per request, up to 10).
    for i in 0..50 {
        assert_eq!(send(&gw, "GET", &format!("/warm{i}")).status, 200);
    }
    a_down.store(true, Ordering::SeqCst);
    let before = a.count();
    for i in 0..8 {
        let r = send(&gw, "GET", &format!("/get{i}"));
        assert_eq!((r.status, r.text()), (200, "b".into()), "GET {i}");
    }
    assert!(
        a.count() > before,
        "round robin sent some first attempts to a"
    );
    // PUT is idempotent too.
    for i in 0..4 {
        assert_eq!(send(&gw, "PUT", &format!("/put{i}")).status, 200);
    }
    // A POST that reached a is not sent again: its 503 goes to the client.
    let posts: Vec<u16> = (0..4)
        .map(|i| send(&gw, "POST", &format!("/post{i}")).status)
        .collect();
    assert!(posts.contains(&503) && posts.contains(&200), "{posts:?}");
    let at_b: Vec<String> = b.received().iter().map(|r| r.path.clone()).collect();
    for p in at_b.iter().filter(|p| p.starts_with("/post")) {
        let tries = a.received().iter().filter(|r| r.path == *p).count()
            + at_b.iter().filter(|q| *q == p).count();
        assert_eq!(tries, 1, "{p} was sent twice");
    }
    let m = eventually("the retry counter", || {
        let m = get(gw.admin.unwrap(), "/metrics").text();
        let line = format!(
            "ringway_upstream_retries_total{{upstream=\"app\",target=\"{}\"}} ",
            a.addr
        );
        m.lines()
            .find_map(|l| l.strip_prefix(&line)?.parse::<u64>().ok())
            .filter(|n| *n > 0)
            .map(|_| m.clone())
    });
    assert!(m.contains("ringway_upstream_retries_total"), "{m}");
}

#[test]
fn a_reset_is_retried_on_another_target() {
    // A target that answers until told to reset: then it accepts and closes without a byte.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let bad = listener.local_addr().unwrap();
    let resetting = Arc::new(AtomicBool::new(false));
    let resets = Arc::new(AtomicUsize::new(0));
    let (flag, n) = (Arc::clone(&resetting), Arc::clone(&resets));
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { break };
            if flag.load(Ordering::SeqCst) {
                n.fetch_add(1, Ordering::SeqCst);
                continue; // dropped: closed before a byte
            }
            let _ = read_head(&mut s);
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbad");
        }
    });
    let ok = Arc::new(AtomicBool::new(false));
    let good = backend("good", &ok);
    let gw = gateway(
        &[bad, good.addr],
        "attempts = 1\non = [\"reset\"]\nbackoff_ms = 0",
    );
    // Healthy traffic earns the budget.
    for i in 0..50 {
        assert_eq!(send(&gw, "GET", &format!("/w{i}")).status, 200);
    }
    resetting.store(true, Ordering::SeqCst);
    for i in 0..6 {
        let r = send(&gw, "GET", &format!("/r{i}"));
        assert_eq!((r.status, r.text()), (200, "good".into()), "request {i}");
    }
    assert!(
        resets.load(Ordering::SeqCst) > 0,
        "round robin tried the resetting target"
    );
}

#[test]
fn the_budget_bounds_what_a_total_outage_costs_the_upstreams() {
    let down = Arc::new(AtomicBool::new(true));
    let (a, b) = (backend("a", &down), backend("b", &down));
    let gw = gateway(
        &[a.addr, b.addr],
        "attempts = 3\nbudget_percent = 20\nbackoff_ms = 0",
    );
    let n = 200;
    for i in 0..n {
        assert_eq!(send(&gw, "GET", &format!("/x{i}")).status, 503);
    }
    let seen = a.count() + b.count();
    assert!(seen > n, "some retries happened: {seen}");
    assert!(
        seen <= n + n / 5,
        "{seen} upstream requests for {n} client requests"
    );
    // Every request that ended with attempts left was refused its retry by the budget.
    let retried = seen - n;
    let refused = eventually("the budget refusals in /metrics", || {
        let text = get(gw.admin.unwrap(), "/metrics").text();
        let line = text.lines().find(|l| {
            l.starts_with("ringway_upstream_retry_budget_refusals_total{upstream=\"app\"}")
        })?;
        let n: usize = line.rsplit(' ').next()?.parse().ok()?;
        (n > 0).then_some(n)
    });
    assert!(
        refused <= n && refused + retried >= n,
        "{refused} refused, {retried} retried"
    );
}

#[test]
fn the_route_timeout_bounds_every_attempt_together() {
    // Both targets answer 503 slowly once told to; until then they serve (earning the budget).
    let slow = Arc::new(AtomicBool::new(false));
    let target = |s: &Arc<AtomicBool>| {
        let s = Arc::clone(s);
        Upstream::start(move |_| {
            if s.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(300));
                Reply::ok("slow").status(503)
            } else {
                Reply::ok("ok")
            }
        })
    };
    let (a, b) = (target(&slow), target(&slow));
    let gw = Gateway::start(&format!(
        r#"
[[upstreams]]
name = "app"
targets = ["{}", "{}"]
[upstreams.retries]
attempts = 5
on = ["503"]
backoff_ms = 0

[[routes]]
name = "all"
listener = "public"
path_prefix = "/"
upstream = "app"
timeout_ms = 500

[[listeners]]
name = "public"
address = "127.0.0.1:0"
"#,
        a.addr, b.addr
    ));
    for i in 0..50 {
        assert_eq!(send(&gw, "GET", &format!("/w{i}")).status, 200);
    }
    slow.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let r = send(&gw, "GET", "/slow");
    let took = started.elapsed();
    // The first attempt's 503 is retried; the second is cut short by the route's 500 ms.
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(took >= std::time::Duration::from_millis(450), "{took:?}");
    assert!(took < std::time::Duration::from_millis(1000), "{took:?}");
    let tries = |u: &Upstream| u.received().iter().filter(|q| q.path == "/slow").count();
    assert_eq!(tries(&a) + tries(&b), 2);
    assert_refused(
        "[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[routes]]\nname = \"r\"\nlistener = \"l\"\npath_prefix = \"/\"\nrespond = { status = 200 }\ntimeout_ms = 100\n",
        "routes[0].timeout_ms",
        "for routes with an upstream",
    );
}

#[test]
fn retries_config_errors_name_the_key() {
    let base = "[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"u\"\ntargets = [\"127.0.0.1:9\"]\n[upstreams.retries]\n";
    for (extra, key, message) in [
        ("attempts = 9\n", "retries.attempts", "between 0 and 5"),
        ("on = [\"500\"]\n", "retries.on", "give \"connect-failure\""),
        (
            "budget_percent = 101\n",
            "retries.budget_percent",
            "between 0 and 100",
        ),
        (
            "backoff_ms = 20000\n",
            "retries.backoff_ms",
            "between 0 and 10000",
        ),
    ] {
        assert_refused(
            &format!("{base}{extra}"),
            &format!("upstreams[0].{key}"),
            message,
        );
    }
}
