//! Metrics, status, HDR export, access log and trace context, driven with known traffic through
//! two workers.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::*;

const TWO_WORKERS: &str = "[runtime]\nworkers = 2\npin_cores = false\n[admin]\naddress = \"127.0.0.1:0\"\n[metrics]\ninterval_ms = 50\n";

/// The value of the sample `name{labels}` in a Prometheus text scrape, if present.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .strip_prefix(' ')?
            .parse()
            .ok()
    })
}

fn sum_samples(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Parses a scrape with the reference Python parser; returns family names.
fn prometheus_parse(text: &str) -> Vec<String> {
    let script = "import sys\nfrom prometheus_client.parser import text_string_to_metric_families\nfor f in text_string_to_metric_families(sys.stdin.read()):\n    print(f.name, f.type, len(f.samples))\n";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the scrape: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect()
}

#[test]
fn known_traffic_is_counted_exactly_and_timed_within_hdr_precision() {
    let up = Upstream::start(|_| {
        thread::sleep(Duration::from_millis(20));
        Reply::ok("slow")
    });
    let gw = Gateway::start(&format!(
        "{TWO_WORKERS}{}",
        proxy_config(&[up.addr], "", "")
    ));
    let addr = gw.addr("public");
    let admin = gw.admin.unwrap();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..10 {
                    assert_eq!(get(addr, "/timed").status, 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let scrape = eventually("all 200 requests in /metrics", || {
        let text = get(admin, "/metrics").text();
        (sum_samples(&text, "ringway_worker_requests_total") == 200.0).then_some(text)
    });
    let families = prometheus_parse(&scrape);
    for name in [
        "ringway_requests",
        "ringway_request_duration_seconds",
        "ringway_upstream_duration_seconds",
        "ringway_upstream_requests",
        "ringway_connections_active",
        "ringway_connections",
        "ringway_rejected_requests",
        "ringway_worker_requests",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(
            families.iter().any(|f| f == name),
            "{name} missing from {families:?}"
        );
    }
    assert_eq!(
        sample(
            &scrape,
            "ringway_requests_total{route=\"all\",method=\"GET\",status_class=\"2xx\"}"
        ),
        Some(200.0)
    );
    assert_eq!(
        sample(&scrape, &format!("ringway_upstream_requests_total{{upstream=\"app\",target=\"{}\",outcome=\"response\"}}", up.addr)),
        Some(200.0)
    );
    // Both workers took part.
    for w in 0..2 {
        let n = sample(
            &scrape,
            &format!("ringway_worker_requests_total{{worker=\"{w}\"}}"),
        )
        .unwrap();
        assert!(n > 0.0, "worker {w} served nothing:\n{scrape}");
    }
    assert_eq!(sum_samples(&scrape, "ringway_connections_total"), 200.0);
    assert_eq!(
        sample(
            &scrape,
            "ringway_request_duration_seconds_count{route=\"all\"}"
        ),
        Some(200.0)
    );
    // Every request took at least the upstream's 20 ms: nothing in the 10 ms bucket, all by 60 s.
    assert_eq!(
        sample(
            &scrape,
            "ringway_request_duration_seconds_bucket{route=\"all\",le=\"0.01\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &scrape,
            "ringway_request_duration_seconds_bucket{route=\"all\",le=\"+Inf\"}"
        ),
        Some(200.0)
    );
    let sum = sample(
        &scrape,
        "ringway_request_duration_seconds_sum{route=\"all\"}",
    )
    .unwrap();
    assert!(sum >= 200.0 * 0.020, "sum {sum}");

    let status = get(admin, "/status").json();
    assert_eq!(status["total"]["requests"], 200);
    assert_eq!(status["workers"].as_array().unwrap().len(), 2);
    // A worker's percentiles and the total's come from its routes' histograms.
    for w in status["workers"].as_array().unwrap() {
        let p50 = w["latency_us"]["p50"].as_u64().unwrap();
        assert!(p50 >= 19_980, "worker {} p50 = {p50} µs", w["worker"]);
    }
    assert!(status["total"]["latency_us"]["p50"].as_u64().unwrap() >= 19_980);
    let route = &status["routes"]["all"];
    assert_eq!(route["requests"], 200);
    let up_latency = &status["upstreams"]["app"]["targets"][up.addr.to_string()]["latency_us"];
    // HDR keeps 3 significant digits: a value is reported within 0.1% of what was recorded.
    for p in ["p50", "p90", "p99", "p99.9", "max"] {
        let us = up_latency[p].as_u64().unwrap();
        assert!((20_000..2_000_000).contains(&us), "upstream {p} = {us} µs");
        let total = route["latency_us"][p].as_u64().unwrap();
        assert!(
            total as f64 >= us as f64 * 0.999,
            "total {p} {total} < upstream {us}"
        );
    }

    let hdr = get(admin, "/metrics/hdr?route=all");
    assert_eq!(hdr.status, 200);
    let text = hdr.text();
    assert!(
        text.contains("Value     Percentile TotalCount 1/(1-Percentile)"),
        "{text}"
    );
    assert!(text.contains("Total count    =          200]"), "{text}");
    let first: f64 = text
        .lines()
        .nth(2)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(first >= 20.0 * 0.999, "fastest request {first} ms");
    assert_eq!(get(admin, "/metrics/hdr?route=nope").status, 404);
}

#[test]
fn rejections_are_exported_by_reason() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = Gateway::start(&format!(
        "{TWO_WORKERS}{}",
        proxy_config(&[up.addr], "", "")
    ));
    let addr = gw.addr("public");
    for _ in 0..3 {
        assert_eq!(exchange(addr, b"GET / HTTP/1.1\r\n\r\n").status, 400);
    }
    assert_eq!(
        exchange(addr, b"GET / HTTP/3.0\r\nHost: x\r\n\r\n").status,
        505
    );
    let admin = gw.admin.unwrap();
    eventually("the rejections in /metrics", || {
        let text = get(admin, "/metrics").text();
        (sample(
            &text,
            "ringway_rejected_requests_total{reason=\"malformed_head\"}",
        ) == Some(3.0)
            && sample(
                &text,
                "ringway_rejected_requests_total{reason=\"unsupported_version\"}",
            ) == Some(1.0))
        .then_some(())
    });
}

#[test]
fn access_log_lines_are_whole_json_objects_under_load_from_both_workers() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut gw = Gateway::start(&format!(
        "{TWO_WORKERS}[access_log]\npath = \"{}\"\nformat = \"json\"\n{}",
        path.display(),
        proxy_config(&[up.addr], "", "")
    ));
    let addr = gw.addr("public");
    let clients: Vec<_> = (0..8)
        .map(|t| {
            thread::spawn(move || {
                let mut conn = ResponseReader::new(connect(addr));
                for i in 0..100 {
                    // Long paths make lines long, so torn writes would show.
                    let path = format!("/c{t}/r{i}/{}", "x".repeat(200 + i));
                    conn.stream
                        .write_all(
                            format!("GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: t{t}\r\n\r\n")
                                .as_bytes(),
                        )
                        .unwrap();
                    assert_eq!(conn.read_response(false).unwrap().status, 200);
                }
            })
        })
        .collect();
    // Plus one connection per request, so that both workers see traffic.
    for i in 0..100 {
        assert_eq!(get(addr, &format!("/single/{i}")).status, 200);
    }
    for c in clients {
        c.join().unwrap();
    }
    gw.signal(libc::SIGTERM);
    assert_eq!(gw.wait_exit().code(), Some(0));
    let log = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 900);
    let mut workers = HashSet::new();
    let mut ids = HashSet::new();
    let mut per_client: HashMap<String, usize> = HashMap::new();
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for field in [
            "time",
            "worker",
            "client",
            "method",
            "path",
            "status",
            "bytes_in",
            "bytes_out",
            "route",
            "upstream",
            "upstream_us",
            "total_us",
            "request_id",
            "trace_id",
        ] {
            assert!(v.get(field).is_some(), "{field} missing: {line}");
        }
        assert_eq!(v["status"], 200);
        assert_eq!(v["route"], "all");
        assert_eq!(v["upstream"], up.addr.to_string());
        assert_eq!(v["client"], "127.0.0.1");
        assert!(v["total_us"].as_u64().unwrap() >= v["upstream_us"].as_u64().unwrap());
        assert_eq!(v["trace_id"].as_str().unwrap().len(), 32);
        workers.insert(v["worker"].as_u64().unwrap());
        ids.insert(v["request_id"].as_str().unwrap().to_owned());
        let path = v["path"].as_str().unwrap();
        *per_client
            .entry(path.split('/').nth(1).unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(workers.len(), 2, "lines from both workers");
    assert_eq!(ids.len(), 900, "one line per request");
    assert_eq!(per_client["single"], 100);
    assert_eq!(per_client["c3"], 100);
}

#[test]
fn combined_access_log_has_the_apache_fields_first() {
    let up = Upstream::start(|_| Reply::ok("hello"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut gw = Gateway::start(&format!(
        "[access_log]\npath = \"{}\"\nformat = \"combined\"\n{}",
        path.display(),
        proxy_config(&[up.addr], "", "")
    ));
    exchange(
        gw.addr("public"),
        b"GET /p?q=1 HTTP/1.1\r\nHost: x\r\nReferer: http://ref/\r\nUser-Agent: agent \"7\"\r\nConnection: close\r\n\r\n",
    );
    gw.signal(libc::SIGTERM);
    gw.wait_exit();
    let log = std::fs::read_to_string(&path).unwrap();
    let line = log.lines().next().expect("a line");
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains(" +0000] \"GET /p?q=1 HTTP/1.1\" 200 "),
        "{line}"
    );
    assert!(
        line.contains(" \"http://ref/\" \"agent \\\"7\\\"\" worker=0 route=all "),
        "{line}"
    );
}

#[test]
fn trace_context_is_joined_or_started_and_passed_upstream() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = Gateway::start(&proxy_config(&[up.addr], "", ""));
    let addr = gw.addr("public");
    exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: vendor=abc\r\nConnection: close\r\n\r\n",
    );
    exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\ntraceparent: 00-00000000000000000000000000000000-00f067aa0ba902b7-01\r\nConnection: close\r\n\r\n",
    );
    let got = up.wait_for(3);
    let parts = |r: &Received| -> Vec<String> {
        let tp = r.headers_named("traceparent");
        assert_eq!(tp.len(), 1, "{}", r.head);
        tp[0].split('-').map(str::to_owned).collect()
    };
    let joined = parts(&got[0]);
    assert_eq!(joined[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(
        joined[2], "00f067aa0ba902b7",
        "a new span for the gateway's hop"
    );
    assert_eq!(joined[3], "01");
    assert_eq!(got[0].headers_named("tracestate"), ["vendor=abc"]);
    for r in &got[1..] {
        let started = parts(r);
        assert_eq!(
            (started[0].as_str(), started[1].len(), started[2].len()),
            ("00", 32, 16)
        );
        assert_ne!(started[1], "00000000000000000000000000000000");
    }
}
