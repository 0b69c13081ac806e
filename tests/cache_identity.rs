//! The cache on authenticated routes: a response the gateway fetched for one consumer never
//! answers another. The upstream answers from the identity the gateway sends it (`X-Consumer`)
//! without `Vary`, as an upstream behind a gateway does; the credential travels in a header, in
//! the query, as Basic and as a bearer token.

mod common;
mod jwt_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use common::*;

const ALICE_KEY: &str = "alice-key-0123456789";
const BOB_KEY: &str = "bob-key-0123456789ab";
const HS_SECRET: &str = "an-hmac-secret-of-at-least-32-bytes!";

/// The upstream: `private data of <consumer>`, with the `cache-control` a path asks for.
fn per_consumer_upstream() -> Upstream {
    let n = Arc::new(AtomicUsize::new(0));
    Upstream::start(move |r| {
        let who = r.header("x-consumer").unwrap_or("nobody");
        let cc = if r.path.contains("/public") {
            "public, max-age=60"
        } else if r.path.contains("/never") {
            "private, max-age=60"
        } else if r.path.contains("/stale") {
            // Stale on arrival, served while revalidating.
            "max-age=60, stale-while-revalidate=600"
        } else {
            "max-age=60"
        };
        let seq = n.fetch_add(1, Ordering::SeqCst);
        let mut reply =
            Reply::ok(&format!("private data of {who} #{seq}")).header("cache-control", cc);
        if r.path.contains("/stale") {
            reply = reply.header("age", "100");
        }
        reply
    })
}

fn gateway(up: SocketAddr) -> Gateway {
    let bcrypt = |pw: &str| bcrypt::hash(pw, 4).unwrap();
    Gateway::start_with_env(
        &format!(
            r#"
[admin]
address = "127.0.0.1:0"
[cache]
[[consumers]]
name = "alice"
api_keys = ["{ALICE_KEY}"]
basic = {{ username = "alice", password_hash = "{}" }}
[[consumers]]
name = "bob"
api_keys = ["{BOB_KEY}"]
basic = {{ username = "bob", password_hash = "{}" }}
[[auth]]
name = "keys"
type = "api_key"
header = "x-api-key"
[[auth]]
name = "qkeys"
type = "api_key"
query = "api_key"
[[auth]]
name = "basic"
type = "basic"
[[auth]]
name = "idp"
type = "jwt"
algorithms = ["HS256"]
secret = {{ env = "CACHE_ID_SECRET" }}
claims_to_headers = {{ "x-tenant" = "tenant" }}
[[listeners]]
name = "pub"
address = "127.0.0.1:0"
[[upstreams]]
name = "o"
targets = ["{up}"]
[[routes]]
name = "hdr"
listener = "pub"
path_prefix = "/hdr/"
upstream = "o"
auth = ["keys"]
cache = {{ default_ttl_ms = 60000 }}
[[routes]]
name = "qry"
listener = "pub"
path_prefix = "/qry/"
upstream = "o"
auth = ["qkeys"]
cache = {{ default_ttl_ms = 60000 }}
[[routes]]
name = "basic"
listener = "pub"
path_prefix = "/basic/"
upstream = "o"
auth = ["basic"]
cache = {{ default_ttl_ms = 60000 }}
[[routes]]
name = "jwt"
listener = "pub"
path_prefix = "/jwt/"
upstream = "o"
auth = ["idp"]
cache = {{ default_ttl_ms = 60000 }}
[[routes]]
name = "shared"
listener = "pub"
path_prefix = "/shared/"
upstream = "o"
auth = ["keys"]
cache = {{ default_ttl_ms = 60000, per_consumer = false }}
"#,
            bcrypt("alice-password"),
            bcrypt("bob-password"),
        ),
        &[("CACHE_ID_SECRET", HS_SECRET)],
    )
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Alice,
    Bob,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Alice => "alice",
            Who::Bob => "bob",
        }
    }
}

fn bearer(sub: &str, tenant: &str) -> String {
    jwt_support::hs256(HS_SECRET, sub, tenant)
}

/// `GET path` as `who`, the credential carried as the route (`/hdr`, `/qry`, `/basic`,
/// `/jwt`, `/shared`) takes it.
fn get_as(addr: SocketAddr, who: Who, path: &str) -> Response {
    let key = match who {
        Who::Alice => ALICE_KEY,
        Who::Bob => BOB_KEY,
    };
    let (target, credential) = match path.split('/').nth(1) {
        Some("qry") => (format!("{path}?api_key={key}"), String::new()),
        Some("basic") => {
            let pair = format!("{}:{}-password", who.name(), who.name());
            let b64 = base64::engine::general_purpose::STANDARD.encode(pair);
            (path.to_owned(), format!("Authorization: Basic {b64}\r\n"))
        }
        Some("jwt") => (
            path.to_owned(),
            format!("Authorization: Bearer {}\r\n", bearer(who.name(), "t-1")),
        ),
        _ => (path.to_owned(), format!("X-Api-Key: {key}\r\n")),
    };
    let resp = exchange(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: h\r\n{credential}Connection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(resp.status, 200, "{path} as {who:?}: {}", resp.text());
    resp
}

fn owner(resp: &Response) -> String {
    resp.text()
        .strip_prefix("private data of ")
        .and_then(|t| t.split(' ').next())
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn no_consumer_ever_receives_anothers_body_whatever_carries_the_credential() {
    let up = per_consumer_upstream();
    let gw = gateway(up.addr);
    let addr = gw.addr("pub");
    for route in ["/hdr", "/qry", "/basic", "/jwt"] {
        for kind in ["private", "public"] {
            let path = format!("{route}/{kind}");
            for who in [Who::Alice, Who::Bob] {
                let first = get_as(addr, who, &path);
                assert_eq!(owner(&first), who.name(), "{path}: {}", first.text());
                assert_eq!(first.header("x-cache"), Some("MISS"), "{path} as {who:?}");
            }
            // Each has an entry of its own on a repeat.
            for who in [Who::Bob, Who::Alice] {
                let again = get_as(addr, who, &path);
                assert_eq!(owner(&again), who.name(), "{path}");
                assert_eq!(again.header("x-cache"), Some("HIT"), "{path} as {who:?}");
            }
        }
        // `private` is never stored by a shared cache, whoever asks.
        let path = format!("{route}/never");
        for who in [Who::Alice, Who::Alice, Who::Bob] {
            let resp = get_as(addr, who, &path);
            assert_eq!(owner(&resp), who.name());
            assert_eq!(resp.header("x-cache"), Some("MISS"), "{path}");
        }
    }
}

#[test]
fn tokens_with_other_claims_have_entries_of_their_own() {
    let up = per_consumer_upstream();
    let gw = gateway(up.addr);
    let call = |tenant: &str| {
        exchange(
            gw.addr("pub"),
            format!(
                "GET /jwt/x HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                bearer("alice", tenant)
            )
            .as_bytes(),
        )
    };
    assert_eq!(call("t-1").header("x-cache"), Some("MISS"));
    // The upstream hears X-Tenant: t-2 for this one, and may answer otherwise.
    assert_eq!(call("t-2").header("x-cache"), Some("MISS"));
    assert_eq!(call("t-1").header("x-cache"), Some("HIT"));
    let got = up.wait_for(2);
    assert_eq!(got[1].header("x-tenant"), Some("t-2"));
}

#[test]
fn shared_entries_hold_only_what_a_shared_cache_may_store_for_an_authenticated_request() {
    let up = per_consumer_upstream();
    let gw = gateway(up.addr);
    let addr = gw.addr("pub");
    // `public`: shared deliberately, the upstream said so.
    assert_eq!(
        get_as(addr, Who::Alice, "/shared/public").header("x-cache"),
        Some("MISS")
    );
    let bob = get_as(addr, Who::Bob, "/shared/public");
    assert_eq!(bob.header("x-cache"), Some("HIT"));
    assert_eq!(owner(&bob), "alice");
    // Without `public`, `s-maxage` or `must-revalidate`: not stored at all (RFC 9111 §3.5).
    for who in [Who::Alice, Who::Bob, Who::Alice] {
        let resp = get_as(addr, who, "/shared/private");
        assert_eq!(resp.header("x-cache"), Some("MISS"));
        assert_eq!(owner(&resp), who.name());
    }
}

#[test]
fn a_purge_removes_every_consumers_entries() {
    let up = per_consumer_upstream();
    let gw = gateway(up.addr);
    let addr = gw.addr("pub");
    let admin = gw.admin.unwrap();
    let purge = |body: &str| {
        let resp = exchange(
            admin,
            format!(
                "POST /cache/purge HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        assert_eq!(resp.status, 202, "{}", resp.text());
    };
    for (path, body) in [
        ("/hdr/a", r#"{"prefix": "/hdr/"}"#),
        ("/hdr/b", r#"{"key": "/hdr/b"}"#),
    ] {
        for who in [Who::Alice, Who::Bob] {
            get_as(addr, who, path);
            assert_eq!(get_as(addr, who, path).header("x-cache"), Some("HIT"));
        }
        purge(body);
        for who in [Who::Alice, Who::Bob] {
            let resp = get_as(addr, who, path);
            assert_eq!(
                resp.header("x-cache"),
                Some("MISS"),
                "{path} as {who:?} after {body}"
            );
            assert_eq!(owner(&resp), who.name());
        }
    }
}

#[test]
fn background_revalidation_sends_the_identity_of_the_entry_it_refreshes() {
    // Alice's revalidation is held until Bob's arrives: one consumer's refresh in flight must
    // not stop another's (nor answer for it).
    let bob_came = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let seen = Arc::clone(&bob_came);
    let inner = per_consumer_upstream();
    let inner_addr = inner.addr;
    let up = Upstream::start(move |r| {
        if r.header("x-cache-revalidation").is_some() {
            let (lock, cv) = &*seen;
            let mut came = lock.lock().unwrap();
            if r.header("x-consumer") == Some("bob") {
                *came = true;
                cv.notify_all();
            } else {
                let timeout = std::time::Duration::from_secs(5);
                came = cv.wait_timeout_while(came, timeout, |c| !*c).unwrap().0;
            }
            drop(came);
        }
        forward_to(inner_addr, r)
    });
    let gw = gateway(up.addr);
    let addr = gw.addr("pub");
    for who in [Who::Alice, Who::Bob] {
        assert_eq!(
            get_as(addr, who, "/hdr/stale").header("x-cache"),
            Some("MISS")
        );
    }
    // Each entry is stale on arrival: the next request is answered from it while one
    // background request refreshes it.
    for who in [Who::Alice, Who::Bob] {
        let stale = get_as(addr, who, "/hdr/stale");
        assert_eq!(stale.header("x-cache"), Some("STALE"));
        assert_eq!(owner(&stale), who.name());
    }
    let got = up.wait_for(4);
    let revalidations: Vec<&str> = got
        .iter()
        .filter(|r| r.header("x-cache-revalidation").is_some())
        .map(|r| r.header("x-consumer").unwrap_or("none"))
        .collect();
    assert_eq!(revalidations.len(), 2, "{got:?}");
    assert!(revalidations.contains(&"alice") && revalidations.contains(&"bob"));
    // What each revalidation stored is still its own consumer's.
    for who in [Who::Alice, Who::Bob] {
        let resp = eventually("the refreshed entry", || {
            let r = get_as(addr, who, "/hdr/stale");
            (!r.text().ends_with("#0") && !r.text().ends_with("#1")).then_some(r)
        });
        assert_eq!(owner(&resp), who.name());
    }
}

/// `r` sent again to `addr` (the per-consumer upstream), and its answer as a reply.
fn forward_to(addr: SocketAddr, r: &Received) -> Reply {
    let mut head = format!(
        "GET {} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n",
        r.path
    );
    for (n, v) in &r.headers {
        if n.eq_ignore_ascii_case("x-consumer") {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
    }
    let resp = exchange(addr, format!("{head}\r\n").as_bytes());
    let mut reply = Reply::ok(&resp.text());
    for name in ["cache-control", "age"] {
        if let Some(v) = resp.header(name) {
            reply = reply.header(name, v);
        }
    }
    reply
}

#[test]
fn a_transform_sending_a_per_client_value_on_a_caching_route_is_warned_about() {
    let up = per_consumer_upstream();
    let gw = Gateway::start(&format!(
        "[cache]\n{}",
        proxy_config(
            &[up.addr],
            "",
            "cache = {}\nrequest_headers = { set = { \"x-client\" = \"${client_ip}\" } }"
        )
    ));
    let line = gw.wait_log("the warning", |l| l.contains("per-client value"));
    assert!(line.contains("WARN") && line.contains("x-client"), "{line}");
}
