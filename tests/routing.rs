//! Route selection, rewriting and the routing errors (404, 405), through the real gateway.

mod common;

use common::*;

fn respond_route(name: &str, matcher: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nlistener = \"public\"\n{matcher}\nrespond = {{ status = 200, body = \"{name}\" }}\n"
    )
}

const LISTENER: &str = "[[listeners]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n";

fn get_host(addr: std::net::SocketAddr, host: &str, path: &str) -> Response {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

#[test]
fn the_shipped_default_config_proxies_the_demo_body() {
    let config =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/ringway.toml"))
            .unwrap();
    let gw = Gateway::start(&config);
    let resp = get(gw.addr("public"), "/api/x");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "hello from ringway\n");
    assert_eq!(resp.header("content-type"), Some("text/plain"));
    // The demo backend answered a proxied request: the route's upstream hop carried an id.
    assert_eq!(resp.header("x-request-id").map(str::len), Some(32));
    assert_eq!(get(gw.addr("public"), "/elsewhere").status, 404);
}

#[test]
fn most_specific_route_wins() {
    let routes = [
        respond_route("regex", "path_regex = \"^/v[0-9]+/\""),
        respond_route("short", "path_prefix = \"/v1/\""),
        respond_route("long", "path_prefix = \"/v1/users/\""),
        respond_route("exact", "path = \"/v1/users/me\""),
        respond_route(
            "host-exact",
            "host = \"api.example.com\"\npath_prefix = \"/\"",
        ),
        respond_route(
            "host-wild",
            "host = \"*.example.com\"\npath_prefix = \"/v1/\"",
        ),
        respond_route("tie-first", "path_prefix = \"/tie\""),
        respond_route("tie-second", "path_prefix = \"/tie\""),
    ]
    .concat();
    let gw = Gateway::start(&format!("{LISTENER}{routes}"));
    let addr = gw.addr("public");
    for (host, path, want) in [
        ("other", "/v1/users/me", "exact"),
        ("other", "/v1/users/me?x=1", "exact"),
        ("other", "/v1/users/42", "long"),
        ("other", "/v1/orders", "short"),
        ("other", "/v2/orders", "regex"),
        ("other", "/tie/x", "tie-first"),
        ("API.Example.COM:8080", "/v1/users/me", "host-exact"),
        ("b.example.com", "/v1/users/me", "host-wild"),
        ("b.example.com", "/v2/x", "regex"),
        ("example.com", "/v1/x", "short"),
    ] {
        let resp = get_host(addr, host, path);
        assert_eq!(resp.status, 200, "{host} {path}");
        assert_eq!(resp.text(), want, "{host} {path}");
    }
}

#[test]
fn unmatched_path_is_404_with_a_json_error() {
    let gw = Gateway::start(&format!(
        "{LISTENER}{}",
        respond_route("a", "path_prefix = \"/a\"")
    ));
    let resp = get(gw.addr("public"), "/b");
    assert_eq!(resp.status, 404);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let json = resp.json();
    assert_eq!(json["error"], "no route");
    assert_eq!(json["request_id"].as_str(), resp.header("x-request-id"));
}

#[test]
fn method_outside_every_matching_route_is_405_with_allow() {
    let routes = [
        respond_route(
            "read",
            "path_prefix = \"/items\"\nmethods = [\"GET\", \"HEAD\"]",
        ),
        respond_route("write", "path_prefix = \"/items\"\nmethods = [\"POST\"]"),
    ]
    .concat();
    let gw = Gateway::start(&format!("{LISTENER}{routes}"));
    let addr = gw.addr("public");
    let post = exchange(
        addr,
        b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(post.text(), "write");
    let delete = exchange(
        addr,
        b"DELETE /items HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(delete.status, 405);
    assert_eq!(delete.header("allow"), Some("GET, HEAD, POST"));
}

#[test]
fn strip_prefix_rewrites_the_forwarded_path() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let config = format!(
        "{LISTENER}[[upstreams]]\nname = \"app\"\ntargets = [\"{}\"]\n[[routes]]\nname = \"api\"\nlistener = \"public\"\npath_prefix = \"/api/\"\nstrip_prefix = \"/api\"\nupstream = \"app\"\n[[routes]]\nname = \"bare\"\nlistener = \"public\"\npath = \"/api\"\nstrip_prefix = \"/api\"\nupstream = \"app\"\n",
        up.addr
    );
    let gw = Gateway::start(&config);
    let addr = gw.addr("public");
    assert_eq!(get(addr, "/api/users/7?full=1").status, 200);
    assert_eq!(get(addr, "/api").status, 200);
    let got = up.wait_for(2);
    assert_eq!(got[0].path, "/users/7?full=1");
    assert_eq!(got[1].path, "/");
}

#[test]
fn absolute_form_target_routes_on_its_authority() {
    let routes = [
        respond_route("host", "host = \"api.example.com\""),
        respond_route("any", "path_prefix = \"/\""),
    ]
    .concat();
    let gw = Gateway::start(&format!("{LISTENER}{routes}"));
    let resp = exchange(
        gw.addr("public"),
        b"GET http://api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.text(), "host");
}
