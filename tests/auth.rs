//! Authentication through the real gateway: API keys in a header or the query (hashed and
//! plain), the identity upstream (`X-Consumer`, a forged one removed; `${consumer}`), credentials
//! stripped, group rules, the `consumer` rate-limit key, metrics and the access log, and the
//! config errors.

mod common;

use std::net::SocketAddr;

use common::*;

// sha256("acme-key-0123456789") and sha256("globex-key-0123456789").
const ACME_KEY: &str = "acme-key-0123456789";
const GLOBEX_KEY: &str = "globex-key-0123456789";

fn sha256_hex(s: &str) -> String {
    ringway::auth::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn gateway(upstream: SocketAddr, extra: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        r#"
[admin]
address = "127.0.0.1:0"

[access_log]
path = "{log}"
format = "json"

[[consumers]]
name = "acme"
groups = ["partners"]
api_keys = ["sha256:{acme}"]

[[consumers]]
name = "globex"
groups = ["blocked"]
api_keys = ["{globex}"]

[[auth]]
name = "keys"
type = "api_key"
header = "x-api-key"
query = "api_key"

[[auth]]
name = "forwarding"
type = "api_key"
header = "x-pass-key"
forward_credentials = true

[[rate_limits]]
name = "per-consumer"
key = "consumer"
rate = 0.001
burst = 2

[[upstreams]]
name = "app"
targets = ["{upstream}"]

[[routes]]
name = "open"
listener = "public"
path_prefix = "/open"
upstream = "app"

[[routes]]
name = "keys"
listener = "public"
path_prefix = "/api"
upstream = "app"
auth = ["keys"]
request_headers = {{ set = {{ "x-who" = "${{consumer}}" }} }}

[[routes]]
name = "partners"
listener = "public"
path_prefix = "/partners"
upstream = "app"
auth = ["keys"]
allow_groups = ["partners"]

[[routes]]
name = "not-blocked"
listener = "public"
path_prefix = "/nb"
upstream = "app"
auth = ["keys"]
deny_groups = ["blocked"]

[[routes]]
name = "limited"
listener = "public"
path_prefix = "/limited"
upstream = "app"
auth = ["keys"]
rate_limits = ["per-consumer"]

[[routes]]
name = "forwarded"
listener = "public"
path_prefix = "/fwd"
upstream = "app"
auth = ["forwarding"]

[[listeners]]
name = "public"
address = "127.0.0.1:0"
{extra}
"#,
        log = log.display(),
        acme = sha256_hex(ACME_KEY),
        globex = GLOBEX_KEY,
    ));
    // The access log's directory lives as long as the gateway's own.
    std::mem::forget(dir);
    gw
}

fn call(gw: &Gateway, path: &str, headers: &str) -> Response {
    exchange(
        gw.addr("public"),
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n{headers}Connection: close\r\n\r\n")
            .as_bytes(),
    )
}

#[test]
fn api_keys_identify_the_consumer_upstream_and_are_not_forwarded() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = gateway(up.addr, "");
    // A hashed key in the header; a forged X-Consumer is dropped.
    let r = call(
        &gw,
        "/api/a",
        &format!("X-Api-Key: {ACME_KEY}\r\nX-Consumer: admin\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // A plain key in the query, among other parameters that stay.
    let r = call(&gw, &format!("/api/b?x=1&api_key={GLOBEX_KEY}&y=2"), "");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call(&gw, &format!("/api/c?api_key={GLOBEX_KEY}"), "");
    assert_eq!(r.status, 200);
    let got = up.wait_for(3);
    assert_eq!(got[0].headers_named("x-consumer"), vec!["acme"]);
    assert_eq!(got[0].header("x-who"), Some("acme"));
    assert_eq!(got[0].header("x-api-key"), None, "the key is stripped");
    assert_eq!(got[1].path, "/api/b?x=1&y=2");
    assert_eq!(got[1].header("x-consumer"), Some("globex"));
    assert_eq!(got[2].path, "/api/c");
    // The plain key was warned about at start, without the key itself.
    let warning = gw.wait_log("the plain-key warning", |l| l.contains("plain text"));
    assert!(
        warning.contains("globex") && !warning.contains(GLOBEX_KEY),
        "{warning}"
    );
    assert!(gw
        .logs()
        .iter()
        .all(|l| !l.contains(GLOBEX_KEY) && !l.contains(ACME_KEY)));

    // forward_credentials keeps them.
    let r = call(&gw, "/fwd/x", &format!("X-Pass-Key: {ACME_KEY}\r\n"));
    assert_eq!(r.status, 200);
    assert_eq!(up.wait_for(4)[3].header("x-pass-key"), Some(ACME_KEY));
}

#[test]
fn missing_and_wrong_keys_get_401_with_a_challenge() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = gateway(up.addr, "");
    let r = call(&gw, "/api/a", "");
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("ApiKey realm=\"keys\", header=\"x-api-key\", query=\"api_key\"")
    );
    assert_eq!(r.json()["error"], "authentication required");
    let r = call(&gw, "/api/a", "X-Api-Key: not-a-key-of-anyone\r\n");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "invalid credentials");
    // A wrong key in the header decides, even with a right one in the query.
    let r = call(
        &gw,
        &format!("/api/a?api_key={ACME_KEY}"),
        "X-Api-Key: wrong-wrong-wrong\r\n",
    );
    assert_eq!(r.status, 401);
    // Routes without auth are untouched.
    assert_eq!(call(&gw, "/open", "").status, 200);
    assert_eq!(up.count(), 1, "only the open route reached the upstream");
    let m = eventually("the auth counters", || {
        let m = get(gw.admin.unwrap(), "/metrics").text();
        m.contains("outcome=\"invalid\"} 2").then_some(m)
    });
    assert!(
        m.contains("ringway_auth_total{route=\"keys\",provider=\"keys\",outcome=\"missing\"} 1"),
        "{m}"
    );
}

#[test]
fn group_rules_refuse_with_403() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = gateway(up.addr, "");
    let acme = format!("X-Api-Key: {ACME_KEY}\r\n");
    let globex = format!("X-Api-Key: {GLOBEX_KEY}\r\n");
    assert_eq!(call(&gw, "/partners", &acme).status, 200);
    let r = call(&gw, "/partners", &globex);
    assert_eq!(r.status, 403);
    assert!(r.json()["error"].as_str().unwrap().starts_with("forbidden"));
    assert_eq!(call(&gw, "/nb", &acme).status, 200);
    assert_eq!(call(&gw, "/nb", &globex).status, 403);
    assert_eq!(up.count(), 2);
}

#[test]
fn the_consumer_rate_limit_key_gives_each_consumer_its_bucket() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = gateway(up.addr, "");
    let acme = format!("X-Api-Key: {ACME_KEY}\r\n");
    let globex = format!("X-Api-Key: {GLOBEX_KEY}\r\n");
    let statuses: Vec<u16> = (0..3)
        .map(|_| call(&gw, "/limited", &acme).status)
        .collect();
    assert_eq!(statuses, [200, 200, 429]);
    // Another consumer has its own burst.
    assert_eq!(call(&gw, "/limited", &globex).status, 200);
    // Unauthenticated requests never reach the limit (401 first).
    assert_eq!(call(&gw, "/limited", "").status, 401);
}

#[test]
fn auth_config_errors() {
    let base = "[[listeners]]\nname = \"p\"\naddress = \"127.0.0.1:0\"\n";
    let consumer =
        "[[consumers]]\nname = \"c\"\ngroups = [\"g\"]\napi_keys = [\"0123456789abcdef\"]\n";
    let auth = "[[auth]]\nname = \"k\"\ntype = \"api_key\"\n";
    let route = |extra: &str| {
        format!(
            "[[routes]]\nname = \"r\"\nlistener = \"p\"\nrespond = {{ status = 200 }}\n{extra}\n"
        )
    };
    assert_config_error(
        &format!("{base}{consumer}{auth}{}", route("auth = [\"nope\"]")),
        ":15:",
        "unknown auth provider \"nope\"",
    );
    assert_config_error(
        &format!(
            "{base}{consumer}{auth}{}",
            route("auth = [\"k\"]\nallow_groups = [\"gg\"]")
        ),
        ":16:",
        "no consumer is in group \"gg\"",
    );
    assert_config_error(
        &format!("{base}{consumer}{auth}{}", route("allow_groups = [\"g\"]")),
        ":15:",
        "groups need the route's auth",
    );
    assert_config_error(
        &format!("{base}[[consumers]]\nname = \"c\"\napi_keys = [\"sha256:abc\"]\n"),
        ":6:",
        "64 hex digits",
    );
    assert_config_error(
        &format!("{base}[[consumers]]\nname = \"c\"\napi_keys = [\"short\"]\n"),
        ":6:",
        "at least 16 characters",
    );
    assert_config_error(
        &format!(
            "{base}{consumer}[[consumers]]\nname = \"d\"\napi_keys = [\"sha256:{}\"]\n",
            sha256_hex("0123456789abcdef")
        ),
        ":10:",
        "this key is also consumer \"c\"'s",
    );
    assert_config_error(
        &format!("{base}[[auth]]\nname = \"j\"\ntype = \"jwt\"\n"),
        ":6:",
        "a JWT provider lists its `algorithms`",
    );
}

#[test]
fn ip_rules_see_the_client_behind_trusted_proxies_v4_and_v6() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let routes = |trusted: &str| {
        format!(
            r#"
{trusted}

[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[upstreams]]
name = "app"
targets = ["{}"]

[[routes]]
name = "partners"
listener = "public"
path_prefix = "/partners"
upstream = "app"
ip_allow = ["203.0.113.0/24", "2001:db8::/32"]
ip_deny = ["203.0.113.66"]
request_headers = {{ set = {{ "x-client" = "${{client_ip}}" }} }}

[[routes]]
name = "local"
listener = "public"
path_prefix = "/local"
upstream = "app"
ip_allow = ["127.0.0.0/8"]
"#,
            up.addr
        )
    };
    let gw = Gateway::start(&routes(
        "[clients]\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]",
    ));
    let call = |xff: &str| {
        let xff = if xff.is_empty() {
            String::new()
        } else {
            format!("X-Forwarded-For: {xff}\r\n")
        };
        exchange(
            gw.addr("public"),
            format!("GET /partners HTTP/1.1\r\nHost: t\r\n{xff}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .status
    };
    // The rightmost untrusted hop is the client; trusted hops (10/8) are skipped.
    assert_eq!(call("198.51.100.9, 203.0.113.5"), 200);
    assert_eq!(call("198.51.100.9, 203.0.113.5, 10.1.1.1"), 200);
    assert_eq!(call("203.0.113.5, 198.51.100.9"), 403);
    assert_eq!(call("2001:db8::7"), 200);
    assert_eq!(call("203.0.113.66"), 403, "denied within the allowed range");
    assert_eq!(
        call(""),
        403,
        "no header: the peer (127.0.0.1) is the client"
    );
    assert_eq!(
        call("garbage, 203.0.113.5"),
        200,
        "the walk stops at what is not an address"
    );
    assert_eq!(call("203.0.113.5, garbage"), 403);
    let got = up.wait_for(4);
    assert_eq!(got[0].header("x-client"), Some("203.0.113.5"));
    assert_eq!(
        got[0].header("x-forwarded-for"),
        Some("198.51.100.9, 203.0.113.5, 127.0.0.1"),
        "the hop list grows by the peer, not the resolved client"
    );
    assert_eq!(got[2].header("x-client"), Some("2001:db8::7"));
    drop(gw);

    // Without trusted proxies, X-Forwarded-For is not believed.
    let gw = Gateway::start(&routes(""));
    let r = exchange(
        gw.addr("public"),
        b"GET /partners HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.5\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 403);
    assert!(
        r.json()["error"].as_str().unwrap().contains("address"),
        "{}",
        r.text()
    );
    assert_eq!(get(gw.addr("public"), "/local").status, 200);
    assert_config_error(
        &format!("{}\nip_deny = [\"10.0.0.1/8\"]\n", routes("")),
        ":28:",
        "has bits set past its /8 prefix",
    );
}

#[test]
fn cors_preflights_are_answered_here_and_allowed_origins_get_the_headers_even_on_cache_hits() {
    let up = Upstream::start(|_| Reply::ok("ok").header("Cache-Control", "max-age=60"));
    let cors = r#"cors = { origins = ["https://app.example.com"], methods = ["GET", "POST"], headers = ["authorization", "x-api-key"], expose = ["x-request-id"], credentials = true, max_age_s = 600 }"#;
    let gw = Gateway::start(&format!(
        r#"
[cache]

[[consumers]]
name = "acme"
api_keys = ["sha256:{}"]

[[auth]]
name = "keys"
type = "api_key"

[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[upstreams]]
name = "app"
targets = ["{}"]

[[routes]]
name = "api"
listener = "public"
path_prefix = "/api"
upstream = "app"
auth = ["keys"]
{cors}

[[routes]]
name = "cached"
listener = "public"
path_prefix = "/cached"
upstream = "app"
cache = {{ default_ttl_ms = 60000 }}
{cors}
"#,
        sha256_hex(ACME_KEY),
        up.addr
    ));
    let send = |raw: String| exchange(gw.addr("public"), raw.as_bytes());
    let origin = "Origin: https://app.example.com\r\n";
    // A preflight: answered by the gateway, without credentials, never forwarded.
    let r = send(format!(
        "OPTIONS /api/orders HTTP/1.1\r\nHost: t\r\n{origin}Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: X-Api-Key, Content-Type\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(r.status, 204);
    assert!(
        r.header("access-control-allow-methods").is_none(),
        "content-type is not allowed"
    );
    let r = send(format!(
        "OPTIONS /api/orders HTTP/1.1\r\nHost: t\r\n{origin}Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: X-Api-Key\r\nConnection: close\r\n\r\n"
    ));
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, POST"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("authorization, x-api-key")
    );
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    assert!(r.headers_named("vary").iter().any(|v| v.contains("Origin")));
    // A disallowed origin's preflight: no CORS headers.
    let r = send(
        "OPTIONS /api/orders HTTP/1.1\r\nHost: t\r\nOrigin: https://evil.example\r\nAccess-Control-Request-Method: GET\r\nConnection: close\r\n\r\n".into(),
    );
    assert_eq!(r.status, 204);
    assert!(r.header("access-control-allow-origin").is_none());
    assert!(r.header("access-control-allow-methods").is_none());
    assert_eq!(up.count(), 0, "no preflight reached the upstream");

    // Actual requests: the allowed origin gets the headers, on success and on a 401.
    let key = format!("X-Api-Key: {ACME_KEY}\r\n");
    let r = send(format!(
        "GET /api/x HTTP/1.1\r\nHost: t\r\n{origin}{key}Connection: close\r\n\r\n"
    ));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("x-request-id")
    );
    assert!(r.headers_named("vary").contains(&"Origin"));
    let r = send(format!(
        "GET /api/x HTTP/1.1\r\nHost: t\r\n{origin}Connection: close\r\n\r\n"
    ));
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let r = send(format!("GET /api/x HTTP/1.1\r\nHost: t\r\nOrigin: https://evil.example\r\n{key}Connection: close\r\n\r\n"));
    assert_eq!(r.status, 200);
    assert!(r.header("access-control-allow-origin").is_none());

    // On a cache hit too.
    for expect in ["MISS", "HIT"] {
        let r = send(format!(
            "GET /cached/a HTTP/1.1\r\nHost: t\r\n{origin}Connection: close\r\n\r\n"
        ));
        assert_eq!(r.header("x-cache"), Some(expect));
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("https://app.example.com")
        );
    }
    let base = "[[listeners]]\nname = \"p\"\naddress = \"127.0.0.1:0\"\n\n[[routes]]\nname = \"r\"\nlistener = \"p\"\nrespond = { status = 200 }\n";
    assert_config_error(
        &format!("{base}cors = {{ origins = [\"*\"], credentials = true }}\n"),
        ":9:",
        "\"*\" cannot be used with credentials",
    );
    assert_config_error(
        &format!("{base}cors = {{ origins = [\"https://app.example.com/path\"] }}\n"),
        ":9:",
        "is not an origin",
    );
}

#[test]
fn basic_credentials_check_argon2id_and_bcrypt_hashes_off_the_worker() {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use base64::Engine as _;
    let salt = SaltString::from_b64("c29tZXNhbHRzb21lc2FsdA").unwrap();
    let argon = argon2::Argon2::default()
        .hash_password(b"alice-password", &salt)
        .unwrap()
        .to_string();
    let bcrypt_hash = bcrypt::hash("bob-password", 4).unwrap();
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = Gateway::start(&format!(
        r#"
[[consumers]]
name = "alice"
basic = {{ username = "alice", password_hash = "{argon}" }}

[[consumers]]
name = "bob"
basic = {{ username = "bob", password_hash = "{bcrypt_hash}" }}

[[auth]]
name = "basic"
type = "basic"
realm = "orders"

[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[upstreams]]
name = "app"
targets = ["{}"]

[[routes]]
name = "orders"
listener = "public"
path_prefix = "/"
upstream = "app"
auth = ["basic"]
"#,
        up.addr
    ));
    let call = |creds: Option<&str>| {
        let auth = creds.map_or(String::new(), |c| {
            format!(
                "Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(c)
            )
        });
        exchange(
            gw.addr("public"),
            format!("GET /o HTTP/1.1\r\nHost: t\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
        )
    };
    assert_eq!(call(Some("alice:alice-password")).status, 200);
    assert_eq!(
        call(Some("alice:alice-password")).status,
        200,
        "from the cache"
    );
    assert_eq!(call(Some("bob:bob-password")).status, 200);
    let got = up.wait_for(3);
    assert_eq!(got[0].header("x-consumer"), Some("alice"));
    assert_eq!(
        got[0].header("authorization"),
        None,
        "credentials are not forwarded"
    );
    assert_eq!(got[2].header("x-consumer"), Some("bob"));
    for creds in [
        Some("alice:wrong"),
        Some("bob:alice-password"),
        Some("mallory:x"),
        None,
    ] {
        let r = call(creds);
        assert_eq!(r.status, 401, "{creds:?}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Basic realm=\"orders\", charset=\"UTF-8\"")
        );
    }
    let r = exchange(
        gw.addr("public"),
        b"GET /o HTTP/1.1\r\nHost: t\r\nAuthorization: Basic !!notbase64\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 401);
    assert_eq!(up.count(), 3);
    assert_config_error(
        "[[listeners]]\nname = \"p\"\naddress = \"127.0.0.1:0\"\n[[consumers]]\nname = \"c\"\nbasic = { username = \"c\", password_hash = \"$1$md5\" }\n",
        ":6:",
        "give an argon2id",
    );
}
