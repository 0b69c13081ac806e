//! Header transforms (`request_headers`, `response_headers`) through the real gateway: set, add
//! and remove on the head going upstream (as the upstream recorded it) and on every response
//! head of the route — proxied, cache hit, 304 from the cache, and the gateway's own 413, 429
//! and 502 — with templated values, and the config errors that guard them.

mod common;

use std::net::SocketAddr;

use common::*;

fn transform_gateway(upstream: SocketAddr, extra_route: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
[cache]

[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[upstreams]]
name = "app"
targets = ["{upstream}"]

[[upstreams]]
name = "gone"
targets = ["{gone}"]

[[rate_limits]]
name = "one"
key = "route"
rate = 0.001
burst = 1

[[routes]]
name = "edited"
listener = "public"
path_prefix = "/api"
upstream = "app"
max_body_bytes = 10
request_headers  = {{ set = {{ "x-env" = "prod" }}, add = {{ "x-tag" = "a" }}, remove = ["x-debug"] }}
response_headers = {{ set = {{ "cache-control" = "no-store" }}, remove = ["server", "x-powered-by"] }}

[[routes]]
name = "templated"
listener = "public"
path_prefix = "/tpl"
upstream = "app"
request_headers = {{ set = {{ "x-rid" = "${{request_id}}", "x-client" = "ip=${{client_ip}}", "x-route" = "${{route}}", "x-host" = "${{host}}" }} }}
response_headers = {{ add = {{ "x-served-by" = "${{route}}/${{request_id}}" }} }}

[[routes]]
name = "cached"
listener = "public"
path_prefix = "/cached"
upstream = "app"
cache = {{ default_ttl_ms = 60000 }}
response_headers = {{ set = {{ "x-edge" = "ringway" }}, remove = ["server"] }}

[[routes]]
name = "limited"
listener = "public"
path_prefix = "/limited"
upstream = "app"
rate_limits = ["one"]
response_headers = {{ set = {{ "x-edge" = "ringway" }}, remove = ["ratelimit-limit"] }}

[[routes]]
name = "down"
listener = "public"
path_prefix = "/down"
upstream = "gone"
response_headers = {{ set = {{ "x-edge" = "ringway" }} }}
{extra_route}
"#,
        gone = closed_port()
    ))
}

fn transform_upstream() -> Upstream {
    Upstream::start(|req| {
        let reply = Reply::ok("hello")
            .header("Server", "origin/1.0")
            .header("X-Powered-By", "php")
            .header("ETag", "\"v1\"");
        if req.path.starts_with("/cached") {
            reply.header("Cache-Control", "max-age=60")
        } else {
            reply.header("Cache-Control", "max-age=5")
        }
    })
}

fn send(gw: &Gateway, raw: &str) -> Response {
    exchange(gw.addr("public"), raw.as_bytes())
}

#[test]
fn request_edits_set_add_and_remove_on_the_head_going_upstream() {
    let up = transform_upstream();
    let gw = transform_gateway(up.addr, "");
    let r = send(
        &gw,
        "GET /api/x HTTP/1.1\r\nHost: h\r\nX-Env: dev\r\nx-env: staging\r\nX-Tag: z\r\nX-Debug: 1\r\nX-Keep: k\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let got = &up.wait_for(1)[0];
    assert_eq!(got.headers_named("x-env"), ["prod"], "{}", got.head);
    assert_eq!(got.headers_named("x-tag"), ["z", "a"], "{}", got.head);
    assert!(got.header("x-debug").is_none(), "{}", got.head);
    assert_eq!(got.header("x-keep"), Some("k"));
    // The gateway's own fields are still there, once.
    assert_eq!(got.headers_named("x-forwarded-for").len(), 1);
    assert_eq!(got.headers_named("host"), ["h"]);
}

#[test]
fn response_edits_apply_to_a_proxied_response() {
    let up = transform_upstream();
    let gw = transform_gateway(up.addr, "");
    let r = send(
        &gw,
        "GET /api/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello");
    assert_eq!(r.headers_named("cache-control"), ["no-store"], "{}", r.head);
    assert!(r.header("server").is_none(), "{}", r.head);
    assert!(r.header("x-powered-by").is_none(), "{}", r.head);
    assert_eq!(r.header("etag"), Some("\"v1\""));
    assert_eq!(r.header("content-length"), Some("5"));
}

#[test]
fn templated_values_are_expanded_per_request() {
    let up = transform_upstream();
    let gw = transform_gateway(up.addr, "");
    for i in 0..3 {
        let r = send(
            &gw,
            &format!("GET /tpl/{i} HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"),
        );
        let got = up.wait_for(i + 1)[i].clone();
        let rid = r.header("x-request-id").expect("a request id").to_owned();
        assert_eq!(got.header("x-rid"), Some(rid.as_str()), "{}", got.head);
        assert_eq!(got.header("x-client"), Some("ip=127.0.0.1"));
        assert_eq!(got.header("x-route"), Some("templated"));
        assert_eq!(got.header("x-host"), Some("api.example.com"));
        assert_eq!(
            r.header("x-served-by"),
            Some(format!("templated/{rid}").as_str()),
            "{}",
            r.head
        );
    }
    // A client-supplied request id is what the template sees.
    let r = send(
        &gw,
        "GET /tpl/mine HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc-123\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.header("x-served-by"), Some("templated/abc-123"));
    assert_eq!(up.wait_for(4)[3].header("x-rid"), Some("abc-123"));
}

#[test]
fn response_edits_apply_to_cache_hits_and_their_304s() {
    let up = transform_upstream();
    let gw = transform_gateway(up.addr, "");
    let miss = send(
        &gw,
        "GET /cached/a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(miss.header("x-cache"), Some("MISS"));
    for r in [
        &miss,
        &send(
            &gw,
            "GET /cached/a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        ),
    ] {
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-edge"), Some("ringway"), "{}", r.head);
        assert!(r.header("server").is_none(), "{}", r.head);
        assert_eq!(r.header("x-powered-by"), Some("php"));
    }
    let hit = send(
        &gw,
        "GET /cached/a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    let not_modified = send(
        &gw,
        "GET /cached/a HTTP/1.1\r\nHost: h\r\nIf-None-Match: \"v1\"\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(not_modified.status, 304, "{}", not_modified.head);
    assert_eq!(not_modified.header("x-cache"), Some("HIT"));
    assert_eq!(not_modified.header("x-edge"), Some("ringway"));
    assert!(not_modified.header("server").is_none());
    assert_eq!(up.count(), 1, "hits stay off the upstream");
}

#[test]
fn the_gateways_own_refusals_for_the_route_carry_the_response_edits() {
    let up = transform_upstream();
    let gw = transform_gateway(up.addr, "");
    // 413: the declared body is over the route's max_body_bytes.
    let r = send(
        &gw,
        "POST /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\nConnection: close\r\n\r\n01234567890",
    );
    assert_eq!(r.status, 413);
    assert_eq!(r.headers_named("cache-control"), ["no-store"], "{}", r.head);

    // 429: the second request in the burst of one; the edits may drop the gateway's own
    // RateLimit-* lines too.
    let first = send(
        &gw,
        "GET /limited HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-edge"), Some("ringway"));
    assert!(first.header("ratelimit-limit").is_none(), "{}", first.head);
    assert!(
        first.header("ratelimit-remaining").is_some(),
        "{}",
        first.head
    );
    let refused = send(
        &gw,
        "GET /limited HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.header("x-edge"),
        Some("ringway"),
        "{}",
        refused.head
    );
    assert!(
        refused.header("ratelimit-limit").is_none(),
        "{}",
        refused.head
    );
    assert!(refused.header("retry-after").is_some());

    // 502: nothing listens behind the route's upstream.
    let r = send(
        &gw,
        "GET /down HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 502, "{}", r.head);
    assert_eq!(r.header("x-edge"), Some("ringway"));

    // No route: no route's edits.
    let r = send(
        &gw,
        "GET /nowhere HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 404);
    assert!(r.header("x-edge").is_none());
}

#[test]
fn a_respond_route_carries_its_edits_and_keeps_its_own_headers() {
    let up = transform_upstream();
    let route = r#"
[[routes]]
name = "fixed"
listener = "public"
path = "/fixed"
respond = { status = 200, body = "ok", headers = { "content-type" = "text/plain", "x-old" = "1" } }
response_headers = { add = { "x-new" = "2" }, remove = ["x-old"] }
"#;
    let gw = transform_gateway(up.addr, route);
    let r = send(
        &gw,
        "GET /fixed HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.header("x-new"), Some("2"));
    assert!(r.header("x-old").is_none(), "{}", r.head);
}

#[test]
fn bad_transforms_are_config_errors_naming_line_and_key() {
    let base = "[[listeners]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"app\"\ntargets = [\"127.0.0.1:9\"]\n[[routes]]\nname = \"r\"\nlistener = \"public\"\nupstream = \"app\"\n";
    let cases = [
        (
            "request_headers = { set = { \"content-length\" = \"5\" } }",
            ":11:48: routes[0].request_headers.set:",
            "content-length is a framing, hop-by-hop or request-id field",
        ),
        (
            "response_headers = { remove = [\"Connection\"] }",
            ":11:32: routes[0].response_headers.remove:",
            "Connection is a framing, hop-by-hop or request-id field",
        ),
        (
            "request_headers = { add = { \"bad name\" = \"x\" } }",
            ":11:42: routes[0].request_headers.add:",
            "\"bad name\" is not a valid header name",
        ),
        (
            "request_headers = { set = { \"x-a\" = \"${nope}\" } }",
            ":11:37: routes[0].request_headers.set:",
            "unknown variable ${nope}",
        ),
        (
            "request_headers = { set = { \"x-a\" = \"a\\u0001b\" } }",
            ":11:37: routes[0].request_headers.set:",
            "control characters",
        ),
        (
            "request_headers = { set = { \"x-a\" = \"${host\" } }",
            ":11:37: routes[0].request_headers.set:",
            "without a closing",
        ),
        (
            "response_headers = { set = { \"x-a\" = \"1\" }, remove = [\"X-A\"] }",
            ":11:55: routes[0].response_headers.remove:",
            "both removed and set or added",
        ),
        (
            "response_headers = { sett = { \"x-a\" = \"1\" } }",
            ":11:22: routes[0].response_headers.sett:",
            "unknown field",
        ),
        (
            "request_headers = { set = { \"host\" = \"other\" } }",
            ":11:38: routes[0].request_headers.set:",
            "host is a framing",
        ),
    ];
    for (line, location, message) in cases {
        assert_config_error(&format!("{base}{line}\n"), location, message);
    }
}
