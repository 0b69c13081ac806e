//! Microbenchmarks of the per-request hot pieces: head parsing with framing checks, writing the
//! upstream head, route matching with 10 and 1000 routes, each balancer's pick, and recording a
//! request's metrics, a rate-limit admit and cache lookups (authentication's are in `auth.rs`).
//! `cargo bench` runs them; they are not part of CI beyond being built.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use ringway::config::{self, ListenerId, RateLimitId, RouteId, UpstreamId};
use ringway::http::write::{upstream_request, Forwarding};
use ringway::http::{parse_request, parse_response, RequestHead, ResponseHead};
use ringway::http::{HeaderEdits, Method, NameSet, ParseLimits};
use ringway::metrics::{GenMetrics, RequestRecord, UpstreamOutcome, UpstreamStats, WorkerMetrics};
use ringway::ratelimit::Limiter;
use ringway::rng::Rng;
use ringway::router::{RouteMatch, Router};
use ringway::upstream::{TargetId, UpstreamState};

const REQUEST: &[u8] = b"GET /api/v1/users/42?expand=orders HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/120.0\r\nAccept: application/json\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.5\r\nConnection: keep-alive\r\nCookie: session=4f2b1c9a7e; theme=dark\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\nDate: Sat, 28 Nov 2026 06:46:41 GMT\r\nServer: origin\r\n\r\n{\"ok\":true}\r\n";

fn config_with_routes(n: usize) -> config::Config {
    let mut src = String::from(
        "[[listeners]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"app\"\ntargets = [\"127.0.0.1:9\", \"127.0.0.2:9\", \"127.0.0.3:9\", \"127.0.0.4:9\"]\n",
    );
    for i in 0..n {
        let matcher = match i % 3 {
            0 => format!("path = \"/svc{i}/exact\""),
            1 => format!("path_prefix = \"/svc{i}/\""),
            _ => format!("path_prefix = \"/api/v1/svc{i}/\""),
        };
        src.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\nlistener = \"public\"\n{matcher}\nupstream = \"app\"\n"
        ));
    }
    src.push_str("[[routes]]\nname = \"users\"\nlistener = \"public\"\npath_prefix = \"/api/v1/users/\"\nupstream = \"app\"\n");
    config::parse(Path::new("bench.toml"), &src).expect("bench config")
}

fn parse(c: &mut Criterion) {
    let limits = ParseLimits::default();
    let mut head = RequestHead::default();
    c.bench_function("parse_request_head_9_headers", |b| {
        b.iter(|| {
            assert!(
                parse_request(black_box(REQUEST), &limits, &NameSet::default(), &mut head).unwrap()
            );
        })
    });
    let mut resp = ResponseHead::default();
    c.bench_function("parse_response_head", |b| {
        b.iter(|| {
            assert!(parse_response(black_box(RESPONSE), false, 40_000, 100, &mut resp).unwrap());
        })
    });
    assert!(parse_request(REQUEST, &limits, &NameSet::default(), &mut head).unwrap());
    let mut out = Vec::with_capacity(1024);
    c.bench_function("write_upstream_head", |b| {
        b.iter(|| {
            out.clear();
            upstream_request(
                &mut out,
                black_box(REQUEST),
                &head,
                &Forwarding {
                    client_ip: b"127.0.0.1",
                    proto: b"http",
                    port: b"80",
                    forwarded: false,
                    request_id: b"0123456789abcdef0123456789abcdef",
                    fallback_host: b"127.0.0.1:9",
                    strip_prefix: Some(b"/api"),
                    traceparent: b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    edits: &HeaderEdits::default(),
                },
            );
            black_box(out.len())
        })
    });
}

fn route(c: &mut Criterion) {
    for n in [10, 1000] {
        let router = Router::new(&config_with_routes(n));
        c.bench_function(&format!("route_match_{n}_routes"), |b| {
            b.iter(|| {
                let m = router.route(
                    ListenerId(0),
                    Some(black_box(b"api.example.com")),
                    black_box(b"/api/v1/users/42?expand=orders"),
                    b"GET",
                );
                assert!(matches!(m, RouteMatch::Found(_)));
            })
        });
    }
}

fn balance(c: &mut Criterion) {
    let rng = Rng::from_os();
    for balance in ["round_robin", "least_request", "random", "consistent_hash"] {
        let src = format!(
            "[[listeners]]\nname = \"p\"\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"app\"\nbalance = \"{balance}\"\ntargets = [\"127.0.0.1:9\", \"127.0.0.2:9\", \"127.0.0.3:9\", \"127.0.0.4:9\"]\n"
        );
        let cfg = config::parse(Path::new("bench.toml"), &src).unwrap();
        let up = UpstreamState::new(UpstreamId(0), &cfg.upstreams[0], 1, None);
        let mut key = 0u64;
        c.bench_function(&format!("pick_{balance}"), |b| {
            b.iter(|| {
                key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                black_box(up.pick(&rng, black_box(key)))
            })
        });
    }
}

fn record(c: &mut Criterion) {
    let mut m = WorkerMetrics::default();
    let mut routes = GenMetrics::new(100, 0);
    let mut up = UpstreamStats::new(4);
    let mut us = 1u64;
    c.bench_function("metrics_record_request_and_upstream", |b| {
        b.iter(|| {
            us = us * 7 % 100_003 + 1;
            let r = RequestRecord {
                method: Method::Get,
                status: 200,
                total_us: us,
            };
            m.record_request(Some(&mut routes), RouteId(42), black_box(&r));
            up.record(TargetId(1), UpstreamOutcome::Response, Some(us / 2));
        })
    });
}

fn rate_limit(c: &mut Criterion) {
    let cfg = config::parse(
        Path::new("bench.toml"),
        "[[listeners]]\nname = \"p\"\naddress = \"127.0.0.1:0\"\n[[rate_limits]]\nname = \"l\"\nkey = \"client_ip\"\nrate = 1e9\nburst = 1e9\n",
    )
    .unwrap();
    let mut limiter = Limiter::new(RateLimitId(0), &cfg.rate_limits[0]);
    let keys: Vec<u64> = (0..1000u32)
        .map(|i| Limiter::hash_key(format!("10.0.{}.{}", i / 256, i % 256).as_bytes()))
        .collect();
    for &k in &keys {
        let _ = limiter.check(k);
    }
    let mut i = 0;
    c.bench_function("ratelimit_admit_existing_key", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let slot = limiter.check(black_box(keys[i])).unwrap();
            black_box(limiter.charge(slot))
        })
    });
    c.bench_function("ratelimit_hash_client_ip", |b| {
        b.iter(|| Limiter::hash_key(black_box(b"203.0.113.77")))
    });
}

/// A test entry for `target`, stored now.
fn cache_entry(target: &str) -> ringway::cache::Entry {
    use ringway::cache::{url_hash, variant_hash, Entry};
    use std::time::{Duration, Instant};
    Entry {
        url: url_hash(b"api.example.com", target.as_bytes()),
        variant: variant_hash(0, std::iter::empty(), |_| std::iter::empty()),
        vary: Vec::new(),
        target: target.as_bytes().into(),
        host: b"api.example.com"[..].into(),
        request_headers: Box::default(),
        replay: Box::default(),
        authorized: false,
        status: 200,
        reason: b"OK"[..].into(),
        head: bytes::Bytes::from_static(b"content-type: application/json\r\n"),
        body: bytes::Bytes::from(vec![b'x'; 512]),
        etag: None,
        last_modified: None,
        date: None,
        stored_at: Instant::now(),
        initial_age: Duration::ZERO,
        freshness: Duration::from_secs(60),
        stale_while_revalidate: Duration::ZERO,
        must_revalidate: false,
        stale_if_error: None,
    }
}

/// A cache hit's index work on one of two workers: apply the (empty) inbox, hash the URL, find
/// the entry among 10,000, move it to the LRU head. And a store: index it and send it to the
/// other worker, which applies it.
fn cache_lookup(c: &mut Criterion) {
    use ringway::cache::{links, url_hash, variant_hash, WorkerCache};
    use ringway::config::CacheSettings;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let settings = CacheSettings {
        max_bytes: 1 << 30,
        max_entry_bytes: 1 << 20,
        sync_interval: Duration::from_millis(20),
    };
    let (mut per_worker, _admin) = links(2);
    let (peers_b, inbox_b) = per_worker.pop().expect("two workers");
    let (peers_a, inbox_a) = per_worker.pop().expect("two workers");
    let a = WorkerCache::new(settings.clone(), peers_a, inbox_a);
    let b = WorkerCache::new(settings, peers_b, inbox_b);
    let targets: Vec<String> = (0..10_000).map(|i| format!("/api/items/{i}?v=1")).collect();
    for t in &targets {
        a.insert(Arc::new(cache_entry(t)));
        b.receive();
    }
    let lookup = |cache: &WorkerCache, target: &str| {
        let url = url_hash(black_box(b"api.example.com:8080"), target.as_bytes());
        let entry = cache.get(url, |e| {
            variant_hash(0, e.vary.iter().map(|n| &n[..]), |_| std::iter::empty())
        });
        entry.is_some_and(|e| e.is_fresh(Instant::now()))
    };
    c.bench_function("cache_lookup_hot_entry", |bench| {
        bench.iter(|| black_box(lookup(&b, &targets[42])))
    });
    // Random entries: each lookup's index, entry and LRU neighbours are cold in the CPU cache.
    let mut i = 0;
    c.bench_function("cache_lookup_10k_entries", |bench| {
        bench.iter(|| {
            i = (i + 7919) % targets.len();
            black_box(lookup(&b, &targets[i]))
        })
    });
    let fresh: Vec<Arc<_>> = (0..1000)
        .map(|i| Arc::new(cache_entry(&targets[i])))
        .collect();
    let mut n = 0;
    c.bench_function("cache_store_and_replicate", |bench| {
        bench.iter(|| {
            n = (n + 1) % fresh.len();
            a.insert(Arc::clone(&fresh[n]));
            b.receive();
        })
    });
}

criterion_group!(
    benches,
    parse,
    route,
    balance,
    record,
    rate_limit,
    cache_lookup
);
criterion_main!(benches);
