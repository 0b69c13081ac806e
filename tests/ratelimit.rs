//! Rate limiting through the real gateway with two workers: one key at three times its rate for
//! five seconds, spread over both workers, all on one, and moving from one to the other; the
//! process as a whole must admit rate × seconds + burst, ±5%, each time. Plus headers, the 429,
//! and bounded memory under a flood of distinct keys.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const RATE: f64 = 100.0;
const BURST: f64 = 200.0;
const SECONDS: f64 = 5.0;

fn config(extra_limit: &str) -> String {
    format!(
        r#"[runtime]
workers = 2
pin_cores = false
[admin]
address = "127.0.0.1:0"
[metrics]
interval_ms = 20

[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[rate_limits]]
name = "per-client"
key = "client_ip"
rate = {RATE}
burst = {BURST}
sync_interval_ms = 50
{extra_limit}

[[routes]]
name = "limited"
listener = "public"
path_prefix = "/limited"
rate_limits = ["per-client"]
respond = {{ status = 200, body = "ok" }}

[[routes]]
name = "probe"
listener = "public"
path_prefix = "/probe"
respond = {{ status = 200, body = "probe" }}
"#
    )
}

/// Sends `/limited` on `conn` at `rate` per second from `start` for `from..to` seconds;
/// returns (admitted, refused).
fn drive(conn: &mut ResponseReader, start: Instant, from: f64, to: f64, rate: f64) -> (u32, u32) {
    let (mut ok, mut refused) = (0, 0);
    let n = ((to - from) * rate).round() as u32;
    for i in 0..n {
        let due = start + Duration::from_secs_f64(from + f64::from(i) / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        conn.stream
            .write_all(b"GET /limited HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        match conn.read_response(false).unwrap().status {
            200 => ok += 1,
            429 => refused += 1,
            s => panic!("unexpected {s}"),
        }
    }
    (ok, refused)
}

fn assert_accurate(admitted: u32, what: &str) {
    let expected = RATE * SECONDS + BURST;
    let error = (f64::from(admitted) - expected) / expected;
    eprintln!(
        "{what}: admitted {admitted} of expected {expected} ({:+.1}%)",
        error * 100.0
    );
    assert!(
        error.abs() <= 0.05,
        "{what}: admitted {admitted}, expected {expected} ±5%"
    );
}

/// Runs two connections (one per worker) with per-second rates given by `plan(worker)` as
/// `(from, to, rate)` phases.
fn run(plan: [&[(f64, f64, f64)]; 2]) -> u32 {
    let gw = Gateway::start(&config(""));
    let conns = one_connection_per_worker(&gw);
    let start = Instant::now() + Duration::from_millis(100);
    let handles: Vec<_> = conns
        .into_iter()
        .zip(plan)
        .map(|(mut conn, phases)| {
            let phases = phases.to_vec();
            thread::spawn(move || {
                phases
                    .iter()
                    .map(|&(from, to, rate)| drive(&mut conn, start, from, to, rate).0)
                    .sum::<u32>()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

#[test]
fn one_key_spread_evenly_over_both_workers_gets_its_rate() {
    let admitted = run([&[(0.0, SECONDS, 1.5 * RATE)], &[(0.0, SECONDS, 1.5 * RATE)]]);
    assert_accurate(admitted, "spread");
}

#[test]
fn one_key_all_on_one_worker_gets_its_full_rate() {
    let admitted = run([&[(0.0, SECONDS, 3.0 * RATE)], &[]]);
    assert_accurate(admitted, "one worker");
}

#[test]
fn one_key_moving_from_one_worker_to_the_other_gets_its_rate() {
    let half = SECONDS / 2.0;
    let admitted = run([&[(0.0, half, 3.0 * RATE)], &[(half, SECONDS, 3.0 * RATE)]]);
    assert_accurate(admitted, "moving");
}

#[test]
fn refusals_are_429_with_json_and_headers_and_admitted_responses_carry_headers() {
    let gw = Gateway::start(&config(""));
    let mut conn = ResponseReader::new(connect(gw.addr("public")));
    let mut first = None;
    let refusal = loop {
        conn.stream
            .write_all(b"GET /limited HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let resp = conn.read_response(false).unwrap();
        if resp.status == 429 {
            break resp;
        }
        first.get_or_insert(resp);
    };
    let first = first.expect("at least one admitted");
    assert_eq!(first.header("ratelimit-limit"), Some("200"));
    assert!(first
        .header("ratelimit-remaining")
        .unwrap()
        .parse::<u64>()
        .is_ok());
    assert!(first
        .header("ratelimit-reset")
        .unwrap()
        .parse::<u64>()
        .is_ok());
    assert!(first.header("retry-after").is_none());
    assert_eq!(refusal.header("content-type"), Some("application/json"));
    assert_eq!(refusal.json()["error"], "rate limited");
    assert!(
        refusal
            .header("retry-after")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(refusal.header("ratelimit-limit"), Some("200"));
    assert_eq!(refusal.header("ratelimit-remaining"), Some("0"));
    // The connection stays usable after a 429.
    conn.stream
        .write_all(b"GET /probe HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(conn.read_response(false).unwrap().text(), "probe");
    let admin = gw.admin.unwrap();
    eventually("the refusals counted", || {
        let text = get(admin, "/metrics").text();
        text.lines()
            .find(|l| {
                l.starts_with("ringway_ratelimited_total{route=\"limited\",limit=\"per-client\"}")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .filter(|&n| n >= 1)
    });
}

#[test]
fn headers_can_be_turned_off_for_admitted_responses() {
    let gw = Gateway::start(&config("headers = false"));
    let resp = get(gw.addr("public"), "/limited");
    assert_eq!(resp.status, 200);
    assert!(resp.header("ratelimit-limit").is_none(), "{}", resp.head);
}

fn flood(addr: SocketAddr, keys: std::ops::Range<u32>) {
    let mut conn = ResponseReader::new(connect(addr));
    let batch = 500;
    let mut k = keys.start;
    while k < keys.end {
        let end = (k + batch).min(keys.end);
        let mut out = Vec::new();
        for key in k..end {
            out.extend_from_slice(
                format!("GET /limited HTTP/1.1\r\nHost: x\r\nX-Key: k{key}\r\n\r\n").as_bytes(),
            );
        }
        conn.stream.write_all(&out).unwrap();
        for _ in k..end {
            let status = conn.read_response(false).unwrap().status;
            assert!(status == 200 || status == 429);
        }
        k = end;
    }
}

fn keys_held(admin: SocketAddr) -> u64 {
    let text = get(admin, "/metrics").text();
    text.lines()
        .filter(|l| l.starts_with("ringway_ratelimit_keys{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_flood_of_distinct_keys_stays_within_max_keys_and_bounded_memory() {
    let gw = Gateway::start(&config("").replace(
        "key = \"client_ip\"",
        "key = \"header:X-Key\"\nmax_keys = 1000",
    ));
    flood(gw.addr("public"), 0..200_000);
    let admin = gw.admin.unwrap();
    let held = eventually("the key gauge", || {
        let n = keys_held(admin);
        (n > 0).then_some(n)
    });
    assert_eq!(
        held, 1000,
        "a worker's table holds exactly max_keys after 200k keys"
    );
    let rss = gw.peak_rss_kib();
    assert!(rss < 64 * 1024, "peak RSS {rss} KiB");
}

#[test]
fn bytes_per_key_are_measured_and_small() {
    let gw = Gateway::start(&config("").replace(
        "key = \"client_ip\"",
        "key = \"header:X-Key\"\nmax_keys = 100000",
    ));
    let addr = gw.addr("public");
    // Warm up buffers and pools with a few keys, then fill the table.
    flood(addr, 0..2_000);
    let status = |pid: i32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    };
    let before = status(gw.pid());
    flood(addr, 2_000..102_000);
    let admin = gw.admin.unwrap();
    eventually("100000 keys held", || {
        (keys_held(admin) == 100_000).then_some(())
    });
    // Worker table ~56 B/key and sync thread ~90 B/key steady; the rest is report and grant
    // buffers in flight and allocator slack, all proportional to the keys held. Right after the
    // flood those buffers can still be held (one sample read 525 B/key, the next run 441), so
    // the bound is on the memory once they are freed: polled, not sampled once.
    let mut last = 0.0;
    eventually(
        "the table's memory to settle under 512 bytes per key",
        || {
            let after = status(gw.pid());
            last = (after.saturating_sub(before) * 1024) as f64 / 100_000.0;
            (last < 512.0).then_some(())
        },
    );
    eprintln!("rate-limit table: {last:.0} bytes per key (RSS from {before} KiB)");
}

/// One limit per route keyed by `route`, on `/a` and `/b`, for the burst tests.
fn burst_config(workers: usize, rate: f64, burst: u32) -> String {
    let mut toml = format!(
        r#"[runtime]
workers = {workers}
pin_cores = false
[admin]
address = "127.0.0.1:0"
[metrics]
interval_ms = 20

[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[rate_limits]]
name = "per-route"
key = "route"
rate = {rate}
burst = {burst}

[[routes]]
name = "probe"
listener = "public"
path_prefix = "/probe"
respond = {{ status = 200, body = "probe" }}
"#
    );
    for name in ["a", "b"] {
        toml += &format!(
            "[[routes]]\nname = \"{name}\"\nlistener = \"public\"\npath_prefix = \"/{name}\"\n\
             rate_limits = [\"per-route\"]\nrespond = {{ status = 200, body = \"ok\" }}\n"
        );
    }
    toml
}

/// Sends `n` requests for `path` at once (pipelined) and returns how many were admitted, and an
/// upper bound on what the bucket may have refilled meanwhile (`rate` × the burst's duration).
fn burst(conn: &mut ResponseReader, path: &str, n: usize, rate: f64) -> (u32, u32) {
    let start = Instant::now();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    conn.stream.write_all(request.repeat(n).as_bytes()).unwrap();
    let mut admitted = 0;
    for _ in 0..n {
        match conn.read_response(false).unwrap().status {
            200 => admitted += 1,
            429 => {}
            s => panic!("unexpected {s}"),
        }
    }
    let refill = (rate * start.elapsed().as_secs_f64()).ceil() as u32;
    (admitted, refill)
}

/// The sync thread must see the bucket full and the key idle before a burst after idle gets the
/// whole burst again: time to refill `debt` tokens, plus the rounds for demand to die down.
fn idle_until_full(debt: f64, rate: f64) {
    thread::sleep(Duration::from_secs_f64(debt / rate + 1.5));
}

#[test]
fn a_full_bucket_admits_its_burst_at_once_one_worker() {
    // Issue 17 item 1: rate 10, burst 20, 60 requests within milliseconds got 1 admitted.
    let gw = Gateway::start(&burst_config(1, 10.0, 20));
    let mut conn = ResponseReader::new(connect(gw.addr("public")));
    let (admitted, refill) = burst(&mut conn, "/a", 60, 10.0);
    assert!(
        (20..=20 + refill).contains(&admitted),
        "new key: {admitted}"
    );
    // The key idle for 4 s (its bucket refilled from empty in 2 s): a full burst again.
    idle_until_full(20.0, 10.0);
    let (admitted, refill) = burst(&mut conn, "/a", 60, 10.0);
    assert!(
        (20..=20 + refill).contains(&admitted),
        "after idle: {admitted}"
    );
}

#[test]
fn a_full_bucket_admits_its_burst_at_once_two_workers() {
    // Issue 17 item 1: two workers, rate 2, burst 3: a burst got 2 admitted.
    let gw = Gateway::start(&burst_config(2, 2.0, 3));
    let mut conns = one_connection_per_worker(&gw);
    // All on one worker: exactly the burst.
    let (admitted, refill) = burst(&mut conns[0], "/a", 60, 2.0);
    assert!(
        (3..=3 + refill).contains(&admitted),
        "one worker: {admitted}"
    );
    // Spread over both workers at once: at least the burst, at most N × burst (README bound).
    let [c0, c1] = &mut conns[..] else {
        unreachable!()
    };
    let (spread, refill) = thread::scope(|s| {
        let other = s.spawn(|| burst(c1, "/b", 30, 2.0));
        let (a0, r0) = burst(c0, "/b", 30, 2.0);
        let (a1, r1) = other.join().unwrap();
        (a0 + a1, r0.max(r1))
    });
    assert!((3..=6 + refill).contains(&spread), "spread: {spread}");
    // Idle until the bucket has repaid what the spread burst took beyond it and is full: then
    // a burst on the other worker gets the whole burst too.
    idle_until_full(6.0, 2.0);
    let (admitted, refill) = burst(&mut conns[1], "/b", 60, 2.0);
    assert!(
        (3..=3 + refill).contains(&admitted),
        "after idle: {admitted}"
    );
}
