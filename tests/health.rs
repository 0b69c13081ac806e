//! Upstream health through the real gateway: a target failing its probes gets no traffic and
//! returns once it passes them; backups carry the traffic only while no primary is healthy;
//! with nothing healthy, 503 (or the primaries anyway with `panic_routing`); TCP probes;
//! outlier ejection from real traffic, process-wide, bounded by `max_ejection_percent`;
//! `/status` and `/metrics`; config errors.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;

use common::*;

/// An upstream answering `name` to requests and a switchable status to `/healthz`.
struct Backend {
    server: Upstream,
    health: Arc<AtomicU16>,
    /// Answer 500 to every request but probes.
    failing: Arc<AtomicBool>,
}

impl Backend {
    fn start(name: &'static str) -> Backend {
        let health = Arc::new(AtomicU16::new(200));
        let failing = Arc::new(AtomicBool::new(false));
        let (h, f) = (Arc::clone(&health), Arc::clone(&failing));
        let server = Upstream::start(move |r| match r.path.as_str() {
            "/healthz" => Reply::ok("probe").status(h.load(Ordering::SeqCst)),
            _ if f.load(Ordering::SeqCst) => Reply::ok(name).status(500),
            _ => Reply::ok(name),
        });
        Backend {
            server,
            health,
            failing,
        }
    }

    fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }

    /// Requests other than probes.
    fn served(&self) -> usize {
        self.server
            .received()
            .iter()
            .filter(|r| r.path != "/healthz")
            .count()
    }

    fn probed(&self) -> bool {
        self.server.received().iter().any(|r| r.path == "/healthz")
    }
}

fn gateway(targets: &[SocketAddr], backups: &[SocketAddr], extra: &str) -> Gateway {
    let backups: Vec<String> = backups.iter().map(|t| format!("\"{t}\"")).collect();
    let upstream_extra = format!("backup_targets = [{}]\n{extra}", backups.join(", "));
    let proxy = proxy_config(targets, &upstream_extra, "");
    Gateway::start(&format!(
        "[runtime]\nworkers = 2\npin_cores = false\n\n[admin]\naddress = \"127.0.0.1:0\"\n{proxy}"
    ))
}

const HTTP_CHECK: &str = "[upstreams.health_check]\npath = \"/healthz\"\nhost = \"probe.example\"\ninterval_ms = 20\ntimeout_ms = 500\nhealthy_threshold = 2\nunhealthy_threshold = 2\nexpect_status = [200, 204]\n";

/// The bodies (server names) of `n` requests, each on its own connection (so both workers
/// serve them).
fn answers(gw: &Gateway, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let r = get(gw.addr("public"), &format!("/r{i}"));
            format!("{} {}", r.status, r.text())
        })
        .collect()
}

/// Waits until `n` requests in a row are all answered as `pred` says.
fn eventually_all(gw: &Gateway, what: &str, pred: impl Fn(&str) -> bool) {
    eventually(what, || {
        answers(gw, 20).iter().all(|a| pred(a)).then_some(())
    });
}

fn target_health(gw: &Gateway, target: SocketAddr) -> serde_json::Value {
    let status = get(gw.admin.unwrap(), "/status").json();
    status["upstreams"]["app"]["targets"][target.to_string()]["health"].clone()
}

#[test]
fn a_target_failing_its_probes_gets_no_traffic_until_it_passes_them_again() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let gw = gateway(&[a.server.addr, b.server.addr], &[], HTTP_CHECK);
    eventually("both targets serving", || {
        let got = answers(&gw, 20);
        (got.contains(&"200 a".into()) && got.contains(&"200 b".into())).then_some(())
    });
    let probe = b
        .server
        .received()
        .into_iter()
        .find(|r| r.path == "/healthz");
    assert_eq!(
        probe
            .and_then(|p| p.header("host").map(str::to_owned))
            .as_deref(),
        Some("probe.example")
    );
    b.set_health(500);
    eventually_all(&gw, "b taken out", |a| a == "200 a");
    // Once out, it stays out: not one request reaches it.
    let before = b.served();
    assert!(answers(&gw, 50).iter().all(|r| r == "200 a"));
    assert_eq!(b.served(), before);
    let h = target_health(&gw, b.server.addr);
    assert_eq!(h["healthy"], false, "{h}");
    assert_eq!(h["last_probe"], "answered 500", "{h}");
    gw.wait_log("the unhealthy warning", |l| {
        l.contains("target unhealthy") && l.contains(&b.server.addr.to_string())
    });

    // 204 is expected too: it comes back after two good probes.
    b.set_health(204);
    eventually("b back", || {
        answers(&gw, 20).contains(&"200 b".into()).then_some(())
    });
    assert_eq!(target_health(&gw, b.server.addr)["healthy"], true);
    let m = get(gw.admin.unwrap(), "/metrics").text();
    let healthy = format!(
        "ringway_upstream_target_healthy{{upstream=\"app\",target=\"{}\",backup=\"false\"}} 1",
        b.server.addr
    );
    assert!(m.contains(&healthy), "{m}");
    assert!(
        m.contains("ringway_health_probes_total{upstream=\"app\""),
        "{m}"
    );
}

#[test]
fn backups_carry_the_traffic_only_while_no_primary_is_healthy() {
    let (a, b, spare) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("spare"),
    );
    let gw = gateway(
        &[a.server.addr, b.server.addr],
        &[spare.server.addr],
        HTTP_CHECK,
    );
    eventually("the backup probed", || spare.probed().then_some(()));
    assert!(answers(&gw, 20).iter().all(|r| r != "200 spare"));
    assert_eq!(
        spare.served(),
        0,
        "a healthy primary leaves the backup idle"
    );
    a.set_health(503);
    eventually_all(&gw, "a out", |r| r == "200 b");
    b.set_health(503);
    eventually_all(&gw, "the backup in", |r| r == "200 spare");
    a.set_health(200);
    eventually_all(&gw, "the backup released", |r| r == "200 a");
    let h = target_health(&gw, spare.server.addr);
    assert_eq!(h["backup"], true, "{h}");
}

#[test]
fn with_nothing_healthy_requests_get_503_unless_panic_routing() {
    let a = Backend::start("a");
    a.set_health(500);
    let gw = gateway(&[a.server.addr], &[], HTTP_CHECK);
    eventually_all(&gw, "503 with no healthy target", |r| {
        r.starts_with("503 ") && r.contains("no healthy upstream target")
    });
    drop(gw);
    let gw = gateway(
        &[a.server.addr],
        &[],
        &format!("panic_routing = true\n{HTTP_CHECK}"),
    );
    eventually("a probed unhealthy", || {
        (target_health(&gw, a.server.addr)["healthy"] == false).then_some(())
    });
    assert!(answers(&gw, 10).iter().all(|r| r == "200 a"));
}

#[test]
fn tcp_probes_take_out_a_target_that_refuses_connections() {
    let a = Backend::start("a");
    let closed = closed_port();
    let gw = gateway(
        &[a.server.addr, closed],
        &[],
        "[upstreams.health_check]\ntype = \"tcp\"\ninterval_ms = 20\nunhealthy_threshold = 1\n",
    );
    eventually("the closed port marked unhealthy", || {
        let h = target_health(&gw, closed);
        (h["healthy"] == false).then_some(h)
    });
    assert!(answers(&gw, 20).iter().all(|r| r == "200 a"));
    assert!(
        !a.probed(),
        "TCP probes send no request: {:?}",
        a.server.received()
    );
}

#[test]
fn a_target_failing_real_traffic_is_ejected_process_wide_and_comes_back() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let gw = gateway(
        &[a.server.addr, b.server.addr],
        &[],
        "[upstreams.outlier]\nconsecutive_failures = 3\nejection_ms = 400\n",
    );
    b.failing.store(true, Ordering::SeqCst);
    // Its 500s go to the clients (nothing is retried here) until the failures add up.
    eventually_all(&gw, "b ejected", |r| r == "200 a");
    let h = target_health(&gw, b.server.addr);
    assert_eq!(
        (h["ejected"].clone(), h["ejections"].clone()),
        (true.into(), 1.into()),
        "{h}"
    );
    gw.wait_log("the ejection warning", |l| l.contains("target ejected"));
    let m = get(gw.admin.unwrap(), "/metrics").text();
    let ejected = format!(
        "ringway_outlier_ejections_total{{upstream=\"app\",target=\"{}\"}} 1",
        b.server.addr
    );
    assert!(m.contains(&ejected), "{m}");
    // Healed, it takes traffic again once the ejection is over.
    b.failing.store(false, Ordering::SeqCst);
    eventually("b back", || {
        answers(&gw, 20).contains(&"200 b".into()).then_some(())
    });
    assert_eq!(target_health(&gw, b.server.addr)["ejected"], false);
}

#[test]
fn never_more_than_max_ejection_percent_is_ejected() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    a.failing.store(true, Ordering::SeqCst);
    b.failing.store(true, Ordering::SeqCst);
    let gw = gateway(
        &[a.server.addr, b.server.addr],
        &[],
        "[upstreams.outlier]\nconsecutive_failures = 2\nejection_ms = 60000\nmax_ejection_percent = 50\n",
    );
    let ejected = || {
        [a.server.addr, b.server.addr]
            .iter()
            .filter(|t| target_health(&gw, **t)["ejected"] == true)
            .count()
    };
    eventually("one target ejected", || {
        answers(&gw, 5);
        (ejected() == 1).then_some(())
    });
    // Every request fails now, on the one target left in: it stays in.
    assert!(answers(&gw, 30).iter().all(|r| r.starts_with("500 ")));
    assert_eq!(ejected(), 1);
}

#[test]
fn health_check_config_errors_name_the_key() {
    let base = "[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"u\"\ntargets = [\"127.0.0.1:9\"]\n";
    for (extra, message) in [
        (
            "[upstreams.health_check]\ninterval_ms = 100\n",
            "needs a `path`",
        ),
        (
            "[upstreams.health_check]\ntype = \"udp\"\n",
            "give \"http\" or \"tcp\"",
        ),
        (
            "[upstreams.health_check]\ntype = \"tcp\"\npath = \"/h\"\n",
            "for HTTP health checks",
        ),
        (
            "[upstreams.health_check]\npath = \"h\"\n",
            "starts with '/'",
        ),
        (
            "[upstreams.health_check]\npath = \"/h\"\ninterval_ms = 5\n",
            "between 10 and 3600000",
        ),
        (
            "[upstreams.health_check]\npath = \"/h\"\nexpect_status = [700]\n",
            "between 100 and 599",
        ),
        (
            "[upstreams.health_check]\npath = \"/h\"\nhealthy_threshold = 0\n",
            "between 1 and 100",
        ),
    ] {
        assert_refused(
            &format!("{base}{extra}"),
            "upstreams[0].health_check",
            message,
        );
    }
    for (extra, key, message) in [
        (
            "[upstreams.outlier]\nejection_ms = 5\n",
            "outlier.ejection_ms",
            "between 10 and",
        ),
        (
            "[upstreams.outlier]\nmax_ejection_percent = 101\n",
            "outlier.max_ejection_percent",
            "between 0 and 100",
        ),
        (
            "[upstreams.outlier]\nconsecutive_failures = 0\n",
            "outlier.consecutive_failures",
            "between 1 and 1000",
        ),
        (
            "[upstreams.outlier]\nejection_ms = 1000\nmax_ejection_ms = 500\n",
            "outlier.max_ejection_ms",
            "between 1000 and",
        ),
    ] {
        assert_refused(
            &format!("{base}{extra}"),
            &format!("upstreams[0].{key}"),
            message,
        );
    }
    assert_refused(
        &format!("{base}backup_targets = [\"127.0.0.1:9\"]\n"),
        "upstreams[0].backup_targets[0]",
        "listed twice",
    );
}
