//! Background revalidation (stale-while-revalidate) through the buffered upstream client: it
//! asks for the path the route forwards to (after `strip_prefix`), and an interim response
//! before the 304 does not break it.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;

fn gateway(upstream: SocketAddr) -> Gateway {
    Gateway::start(&format!(
        r#"
[cache]

[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[upstreams]]
name = "app"
targets = ["{upstream}"]

[[routes]]
name = "api"
listener = "public"
path_prefix = "/api"
strip_prefix = "/api"
upstream = "app"
cache = {{ default_ttl_ms = 60000 }}
"#
    ))
}

fn fetch(gw: &Gateway, path: &str) -> Response {
    get(gw.addr("public"), path)
}

/// The first response is stale at once (max-age=1 with Age: 1) but may be served stale while
/// it is revalidated; a revalidation with the right validator gets a 304 (after `interim`, if
/// any) that makes it fresh for a minute.
fn swr_upstream(interim: &'static str) -> Upstream {
    let n = AtomicUsize::new(0);
    Upstream::start(move |req| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        if req.header("if-none-match") == Some("\"v1\"") {
            return Reply::ok("")
                .status(304)
                .header("ETag", "\"v1\"")
                .header("Cache-Control", "max-age=60")
                .interim(interim);
        }
        Reply::ok(&format!("{} #{i}", req.path))
            .header("Cache-Control", "max-age=1, stale-while-revalidate=60")
            .header("Age", "1")
            .header("ETag", "\"v1\"")
    })
}

#[test]
fn background_revalidation_asks_for_the_path_after_strip_prefix() {
    let up = swr_upstream("");
    let gw = gateway(up.addr);
    let first = fetch(&gw, "/api/item");
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(first.text(), "/item #0");
    let stale = fetch(&gw, "/api/item");
    assert_eq!(stale.header("x-cache"), Some("STALE"));
    let got = up.wait_for(2);
    assert_eq!(got[1].path, "/item", "{}", got[1].head);
    assert_eq!(got[1].header("if-none-match"), Some("\"v1\""));
    let fresh = eventually("the entry refreshed by the 304", || {
        let r = fetch(&gw, "/api/item");
        (r.header("x-cache") == Some("HIT")).then_some(r)
    });
    assert_eq!(fresh.text(), "/item #0");
    assert_eq!(up.count(), 2);
}

#[test]
fn background_revalidation_skips_an_interim_response_before_the_304() {
    let up = swr_upstream("HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n");
    let gw = gateway(up.addr);
    assert_eq!(fetch(&gw, "/api/hinted").header("x-cache"), Some("MISS"));
    assert_eq!(fetch(&gw, "/api/hinted").header("x-cache"), Some("STALE"));
    up.wait_for(2);
    let fresh = eventually("the entry refreshed by the 304 after the 103", || {
        let r = fetch(&gw, "/api/hinted");
        (r.header("x-cache") == Some("HIT")).then_some(r)
    });
    assert_eq!(fresh.text(), "/hinted #0");
    assert!(fresh.header("link").is_none(), "{}", fresh.head);
    assert_eq!(up.count(), 2, "one revalidation, not one per stale answer");
}
