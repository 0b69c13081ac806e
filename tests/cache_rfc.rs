//! The cache's RFC 9111 / RFC 9110 details through the real gateway, against real upstreams that
//! record what they get: serving stale when the origin fails (`stale-if-error`, the route's
//! `serve_stale_on_error_ms`), ranges from a stored response, a 304 updating stored headers, `Age`
//! and date parsing, heuristic freshness, `Vary` normalisation, and conditional requests.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use common::*;

/// One worker, a `[cache]`, and one caching route over `upstream` with `route_cache` options.
fn gateway(upstream: SocketAddr, route_cache: &str) -> Gateway {
    Gateway::start(&format!(
        r#"[cache]

[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[upstreams]]
name = "app"
targets = ["{upstream}"]
request_timeout_ms = 300
fail_timeout_ms = 100

[[routes]]
name = "cached"
listener = "public"
path_prefix = "/"
upstream = "app"
cache = {{ {route_cache} }}
"#
    ))
}

fn fetch(gw: &Gateway, path: &str, headers: &str) -> Response {
    exchange(
        gw.addr("public"),
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n{headers}Connection: close\r\n\r\n")
            .as_bytes(),
    )
}

fn x_cache(r: &Response) -> &str {
    r.header("x-cache").unwrap_or("(none)")
}

fn now_http() -> String {
    httpdate::fmt_http_date(SystemTime::now())
}

// ---------------------------------------------------------------------------------------------
// Serving stale when the origin fails

/// How the failing origin behaves.
const SERVE: u8 = 0;
const ANSWER_503: u8 = 1;
const RESET: u8 = 2;
const HANG: u8 = 3;

/// An origin whose behaviour a test switches, and which it can take down entirely (then a
/// connect is refused). It answers every request with `head` and a numbered body.
struct Origin {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    down: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
}

impl Origin {
    fn start(head: &'static str) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(SERVE));
        let down = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let (m, d, n) = (Arc::clone(&mode), Arc::clone(&down), Arc::clone(&served));
        thread::spawn(move || {
            for stream in listener.incoming() {
                if d.load(Ordering::SeqCst) {
                    break; // the listener closes: connects are refused from now on
                }
                let Ok(mut stream) = stream else { continue };
                let (m, n) = (Arc::clone(&m), Arc::clone(&n));
                thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(k) => got.extend_from_slice(&buf[..k]),
                        }
                    }
                    let reply = match m.load(Ordering::SeqCst) {
                        ANSWER_503 => "HTTP/1.1 503 X\r\nContent-Length: 4\r\n\r\ndown".to_owned(),
                        RESET => return,
                        HANG => {
                            thread::sleep(Duration::from_secs(2));
                            return;
                        }
                        _ => {
                            let body = format!("body #{}", n.fetch_add(1, Ordering::SeqCst));
                            format!("HTTP/1.1 200 OK\r\n{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                        }
                    };
                    let _ = stream.write_all(reply.as_bytes());
                });
            }
        });
        Origin {
            addr,
            mode,
            down,
            served,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn take_down(&self) {
        self.down.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr); // wakes the accept loop
        eventually("the origin to refuse connections", || {
            std::net::TcpStream::connect(self.addr)
                .is_err()
                .then_some(())
        });
    }
}

/// Stores `/page` (stale at once: its Age equals its max-age), then fails the origin each way.
fn stale_served_on_every_failure(head: &'static str, route_cache: &str) {
    let origin = Origin::start(head);
    let gw = gateway(origin.addr, route_cache);
    let first = fetch(&gw, "/page", "");
    assert_eq!((first.status, x_cache(&first)), (200, "MISS"));
    for mode in [ANSWER_503, RESET, HANG] {
        origin.set(mode);
        let r = fetch(&gw, "/page", "");
        assert_eq!(
            (r.status, x_cache(&r), r.text()),
            (200, "STALE", first.text()),
            "failure mode {mode}"
        );
        assert!(r
            .header("age")
            .is_some_and(|a| a.parse::<u64>().unwrap() >= 1));
    }
    origin.take_down();
    let r = fetch(&gw, "/page", "");
    assert_eq!((r.status, x_cache(&r)), (200, "STALE"), "origin down");
    assert_eq!(origin.served.load(Ordering::SeqCst), 1);
}

#[test]
fn stale_if_error_serves_the_stale_entry_when_the_origin_fails() {
    stale_served_on_every_failure(
        "Cache-Control: max-age=1, stale-if-error=600\r\nAge: 1\r\nETag: \"v\"\r\n",
        "",
    );
}

#[test]
fn the_route_can_serve_stale_on_error_without_stale_if_error() {
    stale_served_on_every_failure(
        "Cache-Control: max-age=1\r\nAge: 1\r\n",
        "serve_stale_on_error_ms = 60000",
    );
}

#[test]
fn revalidation_rules_and_no_permission_mean_the_error_passes_through() {
    for head in [
        "Cache-Control: max-age=1, stale-if-error=600, must-revalidate\r\nAge: 1\r\n",
        "Cache-Control: max-age=1, stale-if-error=600, proxy-revalidate\r\nAge: 1\r\n",
        "Cache-Control: s-maxage=1, stale-if-error=600\r\nAge: 1\r\n",
        "Cache-Control: no-cache, stale-if-error=600\r\n",
        "Cache-Control: max-age=1\r\nAge: 1\r\n",
    ] {
        let origin = Origin::start(head);
        let gw = gateway(origin.addr, "");
        assert_eq!(fetch(&gw, "/page", "").status, 200, "{head}");
        origin.set(ANSWER_503);
        let r = fetch(&gw, "/page", "");
        assert_eq!((r.status, r.text()), (503, "down".to_owned()), "{head}");
    }
}

// ---------------------------------------------------------------------------------------------
// Ranges

/// An origin with a 100-byte body (`0123456789` ten times) under a strong ETag, which answers a
/// `Range` itself with a 206 (to show partial responses pass through and are not stored).
fn range_origin() -> Upstream {
    Upstream::start(|req| {
        let body = "0123456789".repeat(10);
        if req.header("range").is_some() {
            return Reply::ok(&body[..10])
                .status(206)
                .header("Content-Range", "bytes 0-9/100")
                .header("Cache-Control", "max-age=60");
        }
        Reply::ok(&body)
            .header("Cache-Control", "max-age=60")
            .header("ETag", "\"r1\"")
            .header("Last-Modified", "Sun, 06 Nov 1994 08:49:37 GMT")
    })
}

#[test]
fn ranges_are_answered_from_a_stored_response() {
    let up = range_origin();
    let gw = gateway(up.addr, "");
    let full = fetch(&gw, "/file", "");
    assert_eq!(
        (full.status, x_cache(&full), full.body.len()),
        (200, "MISS", 100)
    );
    let part = |range: &str, if_range: &str| {
        let extra = if if_range.is_empty() {
            String::new()
        } else {
            format!("If-Range: {if_range}\r\n")
        };
        fetch(&gw, "/file", &format!("Range: {range}\r\n{extra}"))
    };
    for (range, body, content_range) in [
        ("bytes=10-19", "0123456789", "bytes 10-19/100"),
        ("bytes=95-", "56789", "bytes 95-99/100"),
        ("bytes=-3", "789", "bytes 97-99/100"),
        ("bytes=98-1000", "89", "bytes 98-99/100"),
    ] {
        let r = part(range, "");
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(
            (r.text(), r.header("content-range")),
            (body.to_owned(), Some(content_range))
        );
        assert_eq!(
            r.header("content-length"),
            Some(body.len().to_string().as_str())
        );
        assert_eq!(x_cache(&r), "HIT");
    }
    let r = part("bytes=100-", "");
    assert_eq!(
        (r.status, r.header("content-range")),
        (416, Some("bytes */100"))
    );
    // Several ranges get the whole response; so does a range under a stale If-Range.
    for (range, if_range) in [
        ("bytes=0-1,5-6", ""),
        ("bytes=0-1", "\"old\""),
        ("bytes=0-1", "W/\"r1\""),
        ("bytes=0-1", "Mon, 07 Nov 1994 08:49:37 GMT"),
        ("lines=0-1", ""),
    ] {
        let r = part(range, if_range);
        assert_eq!((r.status, r.body.len()), (200, 100), "{range} {if_range}");
    }
    for if_range in ["\"r1\"", "Sun, 06 Nov 1994 08:49:37 GMT"] {
        assert_eq!(part("bytes=0-1", if_range).status, 206, "{if_range}");
    }
    assert_eq!(up.count(), 1, "every range came from the stored response");
}

#[test]
fn a_partial_response_from_the_upstream_passes_through_and_is_not_stored() {
    let up = range_origin();
    let gw = gateway(up.addr, "");
    let r = fetch(&gw, "/fresh", "Range: bytes=0-9\r\n");
    assert_eq!(
        (r.status, r.text(), x_cache(&r)),
        (206, "0123456789".to_owned(), "MISS")
    );
    let r = fetch(&gw, "/fresh", "");
    assert_eq!((r.status, x_cache(&r), r.body.len()), (200, "MISS", 100));
    assert_eq!(up.count(), 2);
}

// ---------------------------------------------------------------------------------------------
// 304s update the stored headers

#[test]
fn a_304_updates_the_stored_headers() {
    let n = AtomicUsize::new(0);
    let up = Upstream::start(move |req| {
        if n.fetch_add(1, Ordering::SeqCst) == 0 {
            return Reply::ok("the body")
                .header("Cache-Control", "max-age=1")
                .header("Age", "1")
                .header("ETag", "\"v1\"")
                .header("X-Version", "1")
                .header("X-Kept", "kept");
        }
        assert_eq!(req.header("if-none-match"), Some("\"v1\""));
        Reply::ok("")
            .status(304)
            .header("Cache-Control", "max-age=60")
            .header("ETag", "\"v1\"")
            .header("X-Version", "2")
            .header("Expires", "Thu, 01 Jan 2099 00:00:00 GMT")
    });
    let gw = gateway(up.addr, "");
    let first = fetch(&gw, "/doc", "");
    assert_eq!(first.header("x-version"), Some("1"));
    let revalidated = fetch(&gw, "/doc", "");
    let hit = fetch(&gw, "/doc", "");
    for r in [&revalidated, &hit] {
        assert_eq!(r.text(), "the body");
        assert_eq!(r.header("x-version"), Some("2"));
        assert_eq!(r.header("x-kept"), Some("kept"));
        assert_eq!(r.header("cache-control"), Some("max-age=60"));
        assert_eq!(r.header("expires"), Some("Thu, 01 Jan 2099 00:00:00 GMT"));
        assert_eq!(r.header("content-length"), Some("8"));
        assert_eq!(r.headers_named("x-version").len(), 1);
    }
    // The updated max-age=60 makes it fresh: a hit, the upstream not asked again.
    assert_eq!(x_cache(&hit), "HIT");
    assert_eq!(up.count(), 2);
}

// ---------------------------------------------------------------------------------------------
// Age, dates, heuristic freshness

#[test]
fn the_first_age_counts_and_an_invalid_age_is_ignored() {
    // RFC 9111 §5.1: the first line, the first member of a list; an invalid value ignored.
    let up = Upstream::start(|req| {
        let reply = Reply::ok(&req.path).header("Cache-Control", "max-age=100");
        match req.path.as_str() {
            "/two-lines" => reply.header("Age", "10").header("Age", "500"),
            "/old-first" => reply.header("Age", "500, 10"),
            "/huge" => reply.header("Age", "99999999999999999999999"),
            "/float" => reply.header("Age", "7200.0"),
            _ => reply.header("Age", "abc"),
        }
    });
    let gw = gateway(up.addr, "");
    let hit = |path: &str| {
        fetch(&gw, path, "");
        let r = fetch(&gw, path, "");
        (x_cache(&r) == "HIT").then(|| r.header("age").unwrap().parse::<u64>().unwrap())
    };
    let age = hit("/two-lines").expect("fresh: its first Age is 10");
    assert!((10..100).contains(&age), "{age}");
    assert_eq!(hit("/old-first"), None, "stale: its first member is 500");
    assert_eq!(hit("/huge"), None, "stale: 2^31 s old");
    assert!(
        hit("/float").is_some_and(|a| a < 100),
        "an invalid Age is ignored"
    );
    assert!(hit("/nonnumeric").is_some_and(|a| a < 100));
}

#[test]
fn dates_are_read_in_any_case_and_with_a_wrong_weekday() {
    let up = Upstream::start(|req| {
        let expires = match req.path.as_str() {
            "/lower" => "thu, 01 jan 2099 00:00:00 gmt",
            "/weekday" => "Mon, 01 Jan 2099 00:00:00 GMT", // 1 Jan 2099 is a Thursday
            _ => "Thursday, 01-Jan-99 00:00:00 GMT",       // RFC 850: 1999, in the past
        };
        Reply::ok(&req.path).header("Expires", expires)
    });
    let gw = gateway(up.addr, "");
    for path in ["/lower", "/weekday"] {
        fetch(&gw, path, "");
        assert_eq!(x_cache(&fetch(&gw, path, "")), "HIT", "{path}");
    }
    fetch(&gw, "/past", "");
    assert_eq!(x_cache(&fetch(&gw, "/past", "")), "MISS");
}

#[test]
fn heuristic_freshness_is_a_share_of_the_time_since_last_modified() {
    let up = Upstream::start(|req| {
        let now = SystemTime::now();
        let ago = if req.path == "/old" { 100_000 } else { 5 };
        let modified = httpdate::fmt_http_date(now - Duration::from_secs(ago));
        Reply::ok(&req.path)
            .header("Date", &httpdate::fmt_http_date(now))
            .header("Last-Modified", &modified)
            .header("Age", "1")
    });
    // 10% of 100,000 s (capped at the 60 s TTL) is fresh at age 1; 10% of 5 s is not.
    let gw = gateway(up.addr, "default_ttl_ms = 60000, heuristic_percent = 10");
    fetch(&gw, "/old", "");
    assert_eq!(x_cache(&fetch(&gw, "/old", "")), "HIT");
    fetch(&gw, "/recent", "");
    assert_eq!(x_cache(&fetch(&gw, "/recent", "")), "MISS");
    // Without it, the TTL applies to both, as before.
    let plain = gateway(up.addr, "default_ttl_ms = 60000");
    fetch(&plain, "/recent", "");
    assert_eq!(x_cache(&fetch(&plain, "/recent", "")), "HIT");
}

#[test]
fn heuristic_percent_is_validated() {
    assert_config_error(
        "[cache]\n[[listeners]]\nname = \"p\"\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"a\"\ntargets = [\"127.0.0.1:9\"]\n[[routes]]\nname = \"r\"\nlistener = \"p\"\nupstream = \"a\"\ncache = { heuristic_percent = 0 }\n",
        ":12:31: routes[0].cache.heuristic_percent:",
        "must be 1-100",
    );
}

// ---------------------------------------------------------------------------------------------
// Vary and conditional requests

#[test]
fn vary_compares_normalised_values() {
    let up = Upstream::start(|req| {
        Reply::ok(&format!("{:?}", req.header("accept-encoding")))
            .header("Cache-Control", "max-age=60")
            .header("Vary", "Accept-Encoding")
    });
    let gw = gateway(up.addr, "");
    assert_eq!(
        x_cache(&fetch(&gw, "/v", "Accept-Encoding: gzip, br\r\n")),
        "MISS"
    );
    for same in [
        "Accept-Encoding: gzip,br\r\n",
        "Accept-Encoding: GZIP ,  BR\r\n",
        "Accept-Encoding: gzip\r\nAccept-Encoding: br\r\n",
    ] {
        assert_eq!(x_cache(&fetch(&gw, "/v", same)), "HIT", "{same:?}");
    }
    assert_eq!(
        x_cache(&fetch(&gw, "/v", "Accept-Encoding: br, gzip\r\n")),
        "MISS"
    );
    assert_eq!(up.count(), 2);
}

#[test]
fn conditionals_use_date_without_last_modified_and_match_any_with_a_star() {
    let date = now_http();
    let up = Upstream::start(move |_| {
        Reply::ok("no validators")
            .header("Cache-Control", "max-age=60")
            .header("Date", &date)
    });
    let gw = gateway(up.addr, "");
    fetch(&gw, "/c", "");
    let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
    let r = fetch(&gw, "/c", &format!("If-Modified-Since: {later}\r\n"));
    assert_eq!(r.status, 304, "If-Modified-Since after its Date");
    let r = fetch(
        &gw,
        "/c",
        "If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n",
    );
    assert_eq!(r.status, 200, "If-Modified-Since before its Date");
    assert_eq!(fetch(&gw, "/c", "If-None-Match: *\r\n").status, 304);
    assert_eq!(fetch(&gw, "/c", "If-None-Match: \"x\"\r\n").status, 200);
    assert_eq!(up.count(), 1);
}

#[test]
fn cdn_cache_control_takes_the_place_of_cache_control() {
    // RFC 9213: the gateway's cache is in a CDN's role.
    let up = Upstream::start(|req| {
        let reply = Reply::ok(&req.path);
        match req.path.as_str() {
            "/cdn-fresh" => reply
                .header("Cache-Control", "no-store")
                .header("CDN-Cache-Control", "max-age=60"),
            "/cdn-invalid" => reply
                .header("Cache-Control", "no-store")
                .header("CDN-Cache-Control", "max-age=\"60\""),
            _ => reply
                .header("Cache-Control", "max-age=60")
                .header("CDN-Cache-Control", "no-cache"),
        }
    });
    let gw = gateway(up.addr, "");
    fetch(&gw, "/cdn-fresh", "");
    assert_eq!(x_cache(&fetch(&gw, "/cdn-fresh", "")), "HIT");
    for ignored in ["/cdn-no-cache", "/cdn-invalid"] {
        fetch(&gw, ignored, "");
        assert_eq!(x_cache(&fetch(&gw, ignored, "")), "MISS", "{ignored}");
    }
}

#[test]
fn a_stored_response_without_date_gets_the_time_it_was_received() {
    // RFC 9110 §6.6.1; the recording upstream sends no Date of its own.
    let up = Upstream::start(|_| Reply::ok("dated").header("Cache-Control", "max-age=60"));
    let gw = gateway(up.addr, "");
    let before = SystemTime::now() - Duration::from_secs(1);
    fetch(&gw, "/d", "");
    let hit = fetch(&gw, "/d", "");
    assert_eq!(x_cache(&hit), "HIT");
    let date = httpdate::parse_http_date(hit.header("date").expect("a Date")).unwrap();
    assert!(date >= before && date <= SystemTime::now(), "{date:?}");
    assert_eq!(hit.headers_named("date").len(), 1);
    // If-Modified-Since after it: a 304 from the cache.
    let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
    assert_eq!(
        fetch(&gw, "/d", &format!("If-Modified-Since: {later}\r\n")).status,
        304
    );
}
