//! The trust boundary for headers: the headers the gateway vouches for (identity) and the
//! forwarding headers are the gateway's own. A client's copies never reach an upstream, or a
//! filter, unless the listener, route or peer is trusted; the gateway's values are right on
//! plain and TLS listeners and with `strip_prefix`; and the cache never keeps a client's.

mod common;
mod jwt_support;
mod tls_support;

use std::net::SocketAddr;

use common::*;

const KEY: &str = "alice-key-0123456789";
const HS_SECRET: &str = "an-hmac-secret-of-at-least-32-bytes!";

/// A token the `idp` provider accepts, for subject `sub` with a `tenant` claim.
fn token(sub: &str) -> String {
    jwt_support::hs256(HS_SECRET, sub, "t-1")
}

/// One service with private routes (an API key, a token) and an open one, as the issue has it;
/// `listener` and `open_route` add keys to the listener and the open route.
fn identity_gateway(up: SocketAddr, listener: &str, open_route: &str) -> Gateway {
    Gateway::start_with_env(
        &format!(
            r#"
[admin]
address = "127.0.0.1:0"
[metrics]
interval_ms = 20
[[consumers]]
name = "alice"
api_keys = ["{KEY}"]
[[auth]]
name = "keys"
type = "api_key"
header = "x-api-key"
[[auth]]
name = "idp"
type = "jwt"
algorithms = ["HS256"]
secret = {{ env = "TRUST_TEST_SECRET" }}
claims_to_headers = {{ "X-User-Id" = "sub", "x-tenant" = "tenant" }}
[[rate_limits]]
name = "per-user"
key = "header:x-user-id"
rate = 0.001
burst = 1
[[listeners]]
name = "pub"
address = "127.0.0.1:0"
{listener}
[[upstreams]]
name = "app"
targets = ["{up}"]
[[routes]]
name = "private"
listener = "pub"
path_prefix = "/private/"
upstream = "app"
auth = ["keys"]
[[routes]]
name = "tokens"
listener = "pub"
path_prefix = "/tokens/"
upstream = "app"
auth = ["idp"]
[[routes]]
name = "limited"
listener = "pub"
path_prefix = "/limited/"
upstream = "app"
rate_limits = ["per-user"]
[[routes]]
name = "open"
listener = "pub"
path_prefix = "/"
upstream = "app"
request_headers = {{ set = {{ "x-client-cert" = "${{tls_client_subject}}" }} }}
{open_route}
"#
        ),
        &[("TRUST_TEST_SECRET", HS_SECRET)],
    )
}

/// Every spelling and copy of the vouched headers a client might send.
const FORGED: &str = "X-Consumer: alice\r\nx-consumer: bob\r\nX-CONSUMER: carol\r\nX-User-Id: 1\r\nx-user-id: 2\r\nX-TENANT: t-9\r\nX-Client-Cert: CN=admin\r\n";

fn call(addr: SocketAddr, path: &str, headers: &str) -> Response {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: h\r\n{headers}Connection: close\r\n\r\n").as_bytes(),
    )
}

#[test]
fn client_identity_headers_never_reach_the_upstream_through_an_open_route() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = identity_gateway(up.addr, "", "");
    let addr = gw.addr("pub");
    assert_eq!(call(addr, "/open/x", FORGED).status, 200);
    let got = &up.wait_for(1)[0];
    for name in ["x-consumer", "x-user-id", "x-tenant"] {
        assert!(
            got.header(name).is_none(),
            "{name} reached the upstream:\n{}",
            got.head
        );
    }
    // The transform's own value, empty on cleartext, replaced the client's.
    assert_eq!(got.headers_named("x-client-cert"), [""]);
    wait_metric(
        gw.admin.unwrap(),
        "ringway_identity_headers_dropped_total",
        7.0,
    );
}

#[test]
fn identity_drops_are_logged() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        "[access_log]\npath = \"{}\"\n{}",
        log.display(),
        proxy_config(&[up.addr], "", "")
    ));
    assert_eq!(
        call(
            gw.addr("public"),
            "/a",
            "X-Consumer: eve\r\nx-consumer: eve\r\n"
        )
        .status,
        200
    );
    assert_eq!(call(gw.addr("public"), "/b", "").status, 200);
    let lines = access_log_after_stop(gw, &log);
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let a = entries.iter().find(|e| e["path"] == "/a").unwrap();
    assert_eq!(a["identity_headers_dropped"], 2);
    let b = entries.iter().find(|e| e["path"] == "/b").unwrap();
    assert!(b.get("identity_headers_dropped").is_none());
}

#[test]
fn on_routes_with_auth_they_are_replaced_by_the_verified_values() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = identity_gateway(up.addr, "", "");
    let addr = gw.addr("pub");
    let keyed = format!("X-Api-Key: {KEY}\r\n{FORGED}");
    assert_eq!(call(addr, "/private/x", &keyed).status, 200);
    let bearer = format!("Authorization: Bearer {}\r\n{FORGED}", token("user-7"));
    assert_eq!(call(addr, "/tokens/x", &bearer).status, 200);
    let got = up.wait_for(2);
    assert_eq!(got[0].headers_named("x-consumer"), ["alice"]);
    assert!(got[0].header("x-user-id").is_none() && got[0].header("x-tenant").is_none());
    assert_eq!(got[1].headers_named("x-consumer"), ["user-7"]);
    assert_eq!(got[1].headers_named("x-user-id"), ["user-7"]);
    assert_eq!(got[1].headers_named("x-tenant"), ["t-1"]);
}

#[test]
fn filters_never_see_a_clients_copy() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = identity_gateway(up.addr, "", "");
    let addr = gw.addr("pub");
    // Keyed on a claim header: two forged values would be two buckets. Removed before the
    // filters, both requests share the bucket of "no header", which holds one.
    assert_eq!(call(addr, "/limited/a", "X-User-Id: 1\r\n").status, 200);
    assert_eq!(call(addr, "/limited/a", "X-User-Id: 2\r\n").status, 429);
}

#[test]
fn a_trusted_listener_or_route_keeps_them() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = identity_gateway(up.addr, "trust_identity_headers = true", "");
    let addr = gw.addr("pub");
    assert_eq!(
        call(addr, "/open/x", "X-Consumer: alice\r\nX-User-Id: 7\r\n").status,
        200
    );
    // Auth still replaces them with what it verified.
    let keyed = format!("X-Api-Key: {KEY}\r\nX-Consumer: mallory\r\n");
    assert_eq!(call(addr, "/private/x", &keyed).status, 200);
    let got = up.wait_for(2);
    assert_eq!(got[0].headers_named("x-consumer"), ["alice"]);
    assert_eq!(got[0].headers_named("x-user-id"), ["7"]);
    assert_eq!(got[1].headers_named("x-consumer"), ["alice"]);
    drop(gw);

    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = identity_gateway(up.addr, "", "trust_identity_headers = true");
    let addr = gw.addr("pub");
    assert_eq!(call(addr, "/open/x", "X-Consumer: alice\r\n").status, 200);
    assert_eq!(
        call(addr, "/limited/x", "X-Consumer: alice\r\n").status,
        200
    );
    let got = up.wait_for(2);
    assert_eq!(got[0].headers_named("x-consumer"), ["alice"]);
    assert!(
        got[1].header("x-consumer").is_none(),
        "only the trusting route keeps it"
    );
}

// ---------------------------------------------------------------------------------------------
// Forwarding headers

/// Every forwarding header a client might forge, in several spellings and copies.
const FORGED_FORWARDING: &str = "Forwarded: for=6.6.6.6;host=evil.example;proto=https\r\nforwarded: for=7.7.7.7\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\nX-FORWARDED-PROTO: https\r\nX-Forwarded-Port: 1337\r\nx-forwarded-port: 1338\r\nX-Forwarded-Prefix: /evil\r\nX-Forwarded-Ssl: on\r\nX-Real-IP: 6.6.6.6\r\nx-real-ip: 6.6.6.7\r\nX-Original-URL: /admin/secret\r\nX-Rewrite-URL: /admin/secret\r\n";

/// Every forwarding header the upstream received, as `name: value` lines (names lower-case).
fn forwarding_of(r: &Received) -> Vec<String> {
    r.headers
        .iter()
        .filter(|(n, _)| {
            let n = n.to_ascii_lowercase();
            n == "forwarded"
                || n.starts_with("x-forwarded-")
                || n == "x-real-ip"
                || n == "x-original-url"
                || n == "x-rewrite-url"
        })
        .map(|(n, v)| format!("{}: {v}", n.to_ascii_lowercase()))
        .collect()
}

#[test]
fn forwarding_headers_from_an_untrusted_peer_are_replaced_by_the_gateways() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = Gateway::start(&proxy_config(&[up.addr], "", ""));
    let addr = gw.addr("public");
    let resp = exchange(
        addr,
        format!("GET /x HTTP/1.1\r\nHost: shop.example:8080\r\n{FORGED_FORWARDING}Connection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(resp.status, 200);
    let got = &up.wait_for(1)[0];
    assert_eq!(got.path, "/x");
    assert_eq!(
        forwarding_of(got),
        [
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: shop.example:8080",
            "x-forwarded-port: 8080",
        ]
    );
}

#[test]
fn strip_prefix_is_sent_as_the_forwarded_prefix_and_forwarded_when_asked() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = Gateway::start(&format!(
        "[clients]\nforwarded = true\n{}",
        proxy_config(&[up.addr], "", "strip_prefix = \"/api/\"")
            .replace("path_prefix = \"/\"", "path_prefix = \"/api/\"")
    ));
    let addr = gw.addr("public");
    let resp = exchange(
        addr,
        format!(
            "GET /api/users HTTP/1.1\r\nHost: h\r\n{FORGED_FORWARDING}Connection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(resp.status, 200);
    let got = &up.wait_for(1)[0];
    assert_eq!(got.path, "/users");
    assert_eq!(
        forwarding_of(got),
        [
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: h",
            "x-forwarded-port: 80",
            "x-forwarded-prefix: /api",
            "forwarded: for=127.0.0.1;host=\"h\";proto=http",
        ]
    );
}

#[test]
fn from_a_trusted_proxy_the_documented_headers_pass() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = Gateway::start(&format!(
        "[clients]\ntrusted_proxies = [\"127.0.0.1\"]\nforwarded = true\n{}",
        proxy_config(&[up.addr], "", "strip_prefix = \"/api\"")
            .replace("path_prefix = \"/\"", "path_prefix = \"/api/\"")
    ));
    let resp = exchange(
        gw.addr("public"),
        b"GET /api/users HTTP/1.1\r\nHost: internal:8080\r\nX-Forwarded-For: 203.0.113.9\r\nForwarded: for=203.0.113.9;proto=https\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: shop.example\r\nX-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /outer/\r\nX-Forwarded-Ssl: on\r\nX-Real-IP: 203.0.113.9\r\nX-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.status, 200);
    let got = &up.wait_for(1)[0];
    assert_eq!(
        forwarding_of(got),
        [
            "x-forwarded-proto: https",
            "x-forwarded-host: shop.example",
            "x-forwarded-port: 443",
            "x-forwarded-ssl: on",
            "x-real-ip: 203.0.113.9",
            "x-forwarded-for: 203.0.113.9, 127.0.0.1",
            "x-forwarded-prefix: /outer/api",
            "forwarded: for=203.0.113.9;proto=https, for=127.0.0.1;host=\"internal:8080\";proto=http",
        ]
    );
}

#[test]
fn a_cached_response_after_forged_headers_holds_none_of_them() {
    // The upstream builds its answer from the forwarding headers, as frameworks build URLs.
    let up = Upstream::start(|r| {
        Reply::ok(&forwarding_of(r).join("; ")).header("cache-control", "max-age=60")
    });
    let gw = Gateway::start(&format!(
        "[cache]\n{}",
        proxy_config(&[up.addr], "", "cache = {}")
    ));
    let addr = gw.addr("public");
    let poisoned = exchange(
        addr,
        format!("GET /page HTTP/1.1\r\nHost: h\r\n{FORGED_FORWARDING}Connection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(poisoned.header("x-cache"), Some("MISS"));
    let next = call(addr, "/page", "");
    assert_eq!(next.header("x-cache"), Some("HIT"));
    let body = next.text();
    for evil in ["6.6.6", "evil", "1337", "https", "admin", "Ssl"] {
        assert!(!body.contains(evil), "{evil} in the cached body: {body}");
    }
    assert_eq!(
        body,
        "x-forwarded-for: 127.0.0.1; x-forwarded-proto: http; x-forwarded-host: h; x-forwarded-port: 80"
    );
}

#[test]
fn on_a_tls_listener_the_gateway_says_https_and_its_port() {
    use tls_support::*;
    let ca = Ca::new("trust-ca");
    let cert = ca.server("server", &["localhost"]);
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = tls_gateway(1, &format!("certificates = [{}]", pair(&cert)), up.addr, "");
    let config = std::sync::Arc::new(client_config(ca.roots()));
    let mut s = tls_connect(gw.addr("tls"), "localhost", &config).expect("handshake");
    let resp = request(
        &mut s,
        &format!(
            "GET /x HTTP/1.1\r\nHost: localhost\r\n{FORGED_FORWARDING}Connection: close\r\n\r\n"
        ),
    );
    assert_eq!(resp.status, 200);
    let got = &up.wait_for(1)[0];
    assert_eq!(
        forwarding_of(got),
        [
            "x-forwarded-for: 127.0.0.1",
            "x-forwarded-proto: https",
            "x-forwarded-host: localhost",
            "x-forwarded-port: 443",
        ]
    );
}

#[test]
fn a_reload_that_vouches_for_a_new_header_removes_it_on_a_connection_already_open() {
    use std::io::Write;
    let up = Upstream::start(|_| Reply::ok("ok"));
    let before = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n{}",
        proxy_config(&[up.addr], "", "")
    );
    let gw = Gateway::start(&before);
    let mut c = ResponseReader::new(connect(gw.addr("public")));
    let forged = b"GET /x HTTP/1.1\r\nHost: h\r\nX-Tenant: t-9\r\n\r\n";
    c.stream.write_all(forged).unwrap();
    assert_eq!(c.read_response(false).unwrap().status, 200);
    // The new config's provider sends X-Tenant: from now on the gateway vouches for it.
    std::fs::write(gw.config_path.with_file_name("secret"), HS_SECRET).unwrap();
    gw.rewrite_config(&format!(
        "{before}\n[[auth]]\nname = \"idp\"\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = {{ file = \"secret\" }}\nclaims_to_headers = {{ \"x-tenant\" = \"tenant\" }}\n"
    ));
    assert_eq!(gw.reload().status, 200);
    c.stream.write_all(forged).unwrap();
    assert_eq!(c.read_response(false).unwrap().status, 200);
    let got = up.wait_for(2);
    assert_eq!(
        got[0].header("x-tenant"),
        Some("t-9"),
        "not vouched for yet"
    );
    assert!(got[1].header("x-tenant").is_none(), "{}", got[1].head);
}
