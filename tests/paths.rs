//! Path normalization: every decision and the upstream read the path the upstream will serve.
//! Held against a real normalizing upstream (nginx) and against recording upstreams that show
//! exactly what was forwarded.

mod common;

use std::net::SocketAddr;

use common::nginx::Nginx;
use common::*;

const KEY: &str = "admin-key-0123456789";

/// nginx behind the issue's two routes: `/admin/` behind an API key, `/` open. nginx answers
/// "ADMIN SECRET" for its normalized `/admin/` location, and echoes the target it received.
fn behind_nginx(nginx: &Nginx, limits: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
[admin]
address = "127.0.0.1:0"
[limits]
{limits}
[[consumers]]
name = "ops"
api_keys = ["{KEY}"]
[[auth]]
name = "keys"
type = "api_key"
header = "x-api-key"
[[listeners]]
name = "pub"
address = "127.0.0.1:0"
[[upstreams]]
name = "o"
targets = ["{}"]
[[routes]]
name = "admin"
listener = "pub"
path_prefix = "/admin/"
upstream = "o"
auth = ["keys"]
[[routes]]
name = "public"
listener = "pub"
path_prefix = "/"
upstream = "o"
"#,
        nginx.addr
    ))
}

fn nginx_with_a_secret() -> Nginx {
    Nginx::start(
        "location /admin/ { return 200 \"ADMIN SECRET $request_uri\\n\"; }\n\
         location / { return 200 \"PUBLIC $request_uri\\n\"; }",
    )
}

fn request(addr: SocketAddr, target: &str, key: Option<&str>) -> Response {
    let key = key.map_or(String::new(), |k| format!("X-Api-Key: {k}\r\n"));
    exchange(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: h\r\n{key}Connection: close\r\n\r\n").as_bytes(),
    )
}

/// Spellings of `/admin/secret` an upstream normalizes to it, and ones that climb too far.
const SPELLINGS: [&str; 22] = [
    "/admin/secret",
    "/public/../admin/secret",
    "/%61dmin/secret",
    "/%61%64%6d%69%6e/secret",
    "/%61%64%6D%69%6E/secret",
    "/ad%6din/secret",
    "//admin/secret",
    "/./admin/secret",
    "/public/%2e%2e/admin/secret",
    "/public/%2E%2E/admin/secret",
    "/public/.%2E/admin/secret",
    "/x/..//admin/secret",
    "/admin//secret",
    "/admin/./secret",
    "/admin/x/../secret",
    "/a/b/../../admin/secret",
    "/public/..%2fadmin/secret",
    "/public/..%5cadmin/secret",
    "/public/..\\admin/secret",
    "/..",
    "/../admin/secret",
    "/admin/../../admin/secret",
];

#[test]
fn every_spelling_of_a_protected_path_reaches_its_route_or_is_refused() {
    let nginx = nginx_with_a_secret();
    let gw = behind_nginx(&nginx, "");
    let addr = gw.addr("pub");
    for target in SPELLINGS {
        let anonymous = request(addr, target, None);
        assert!(
            matches!(anonymous.status, 401 | 400),
            "{target} without a key: {} {}",
            anonymous.status,
            anonymous.text()
        );
        assert!(!anonymous.text().contains("ADMIN SECRET"), "{target}");
        let keyed = request(addr, target, Some(KEY));
        match keyed.status {
            // The upstream got the normalized path, so it served what the route protects.
            200 => assert_eq!(keyed.text(), "ADMIN SECRET /admin/secret\n", "{target}"),
            400 => assert_eq!(anonymous.status, 400, "{target}: refused only with a key"),
            s => panic!("{target} with the key: {s} {}", keyed.text()),
        }
    }
    // The common spellings are normalized, not refused.
    for target in [
        "/public/../admin/secret",
        "/%61dmin/secret",
        "//admin/secret",
    ] {
        assert_eq!(request(addr, target, None).status, 401, "{target}");
    }
    // Paths that stay public stay public, and nginx sees them as routed.
    let open = request(addr, "/public/./page/../x%7e?q=/../admin", None);
    assert_eq!(open.status, 200);
    assert_eq!(open.text(), "PUBLIC /public/x~?q=/../admin\n");
}

#[test]
fn parameters_are_left_as_they_are() {
    let nginx = nginx_with_a_secret();
    let gw = behind_nginx(&nginx, "");
    // `;` is an ordinary byte to the gateway and to nginx: `/admin;x/` is not `/admin/`.
    let resp = request(gw.addr("pub"), "/admin;x/secret", None);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "PUBLIC /admin;x/secret\n");
    let resp = request(gw.addr("pub"), "/public/..;/admin/secret", None);
    assert_eq!(resp.text(), "PUBLIC /public/..;/admin/secret\n");
}

#[test]
fn the_upstream_receives_the_normalized_path_and_the_query_as_sent() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = Gateway::start(&proxy_config(&[up.addr], "", ""));
    let addr = gw.addr("public");
    for (sent, forwarded) in [
        ("/a/./b/../c//d?x=/../y&z=%2e%2E", "/a/c/d?x=/../y&z=%2e%2E"),
        ("/%7Euser/%e2%82%ac/%3a", "/~user/%E2%82%AC/%3A"),
        ("/plain/path?q=1", "/plain/path?q=1"),
        ("/a/b/..", "/a/"),
        ("http://h/x/../y?q", "/y?q"),
    ] {
        assert_eq!(request(addr, sent, None).status, 200, "{sent}");
        let got = up.received();
        assert_eq!(got.last().unwrap().path, forwarded, "{sent}");
    }
}

#[test]
fn strip_prefix_and_the_cache_key_see_the_normalized_path() {
    let up = Upstream::start(|r| {
        Reply::ok(&format!("item at {}", r.path)).header("cache-control", "max-age=60")
    });
    let gw = Gateway::start(&format!(
        "[cache]\n{}",
        proxy_config(&[up.addr], "", "strip_prefix = \"/api\"\ncache = {}")
            .replace("path_prefix = \"/\"", "path_prefix = \"/api/\"")
    ));
    let addr = gw.addr("public");
    let first = request(addr, "/x/../api/%69tem", None);
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), "item at /item");
    assert_eq!(first.header("x-cache"), Some("MISS"));
    for again in ["/api/item", "/api//item", "/api/./%69tem"] {
        let hit = request(addr, again, None);
        assert_eq!(hit.header("x-cache"), Some("HIT"), "{again}");
        assert_eq!(hit.text(), "item at /item");
    }
    assert_eq!(up.count(), 1);
    // A path that only looked like the route's before normalizing is not stripped.
    assert_eq!(request(addr, "/api/../item", None).status, 404);
}

#[test]
fn encoded_slashes_are_refused_kept_or_decoded_as_configured() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let routes = |mode: &str| {
        format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n[metrics]\ninterval_ms = 20\n{}",
            proxy_config(&[up.addr], "", "").replace(
                "[[listeners]]",
                &format!("[limits]\nencoded_slashes = \"{mode}\"\n[[listeners]]")
            )
        )
    };
    let target = "/files/a%2fb%5Cc/..%2Fd";

    let reject = Gateway::start(&routes("reject"));
    let resp = request(reject.addr("public"), target, None);
    assert_eq!(resp.status, 400);
    assert!(resp.text().contains("encoded slash"), "{}", resp.text());
    wait_metric(
        reject.admin.unwrap(),
        "ringway_rejected_requests_total{reason=\"encoded_slash\"}",
        1.0,
    );
    drop(reject);
    assert_eq!(up.count(), 0);

    let keep = Gateway::start(&routes("keep"));
    assert_eq!(request(keep.addr("public"), target, None).status, 200);
    assert_eq!(up.received()[0].path, "/files/a%2Fb%5Cc/..%2Fd");
    drop(keep);

    let decode = Gateway::start(&routes("decode"));
    assert_eq!(request(decode.addr("public"), target, None).status, 200);
    assert_eq!(up.received()[1].path, "/files/a/b/d");
}

#[test]
fn refused_paths_are_counted_by_reason_and_logged_as_sent() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n[metrics]\ninterval_ms = 20\n[access_log]\npath = \"{}\"\n{}",
        log.display(),
        proxy_config(&[up.addr], "", "")
    ));
    let addr = gw.addr("public");
    for (target, status) in [
        ("/a/../../etc/passwd", 400),
        ("/%2e%2e/x", 400),
        ("/bad%zzescape", 400),
        ("/nul%00byte", 400),
        ("/back\\slash", 400),
        ("/fragment#x", 400),
        ("/ok/./fine", 200),
    ] {
        assert_eq!(request(addr, target, None).status, status, "{target}");
    }
    let admin = gw.admin.unwrap();
    wait_metric(
        admin,
        "ringway_rejected_requests_total{reason=\"path_traversal\"}",
        2.0,
    );
    wait_metric(
        admin,
        "ringway_rejected_requests_total{reason=\"invalid_path\"}",
        4.0,
    );
    assert_eq!(up.count(), 1);
    let lines = access_log_after_stop(gw, &log);
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |path: &str| {
        entries
            .iter()
            .find(|e| e["path"] == path)
            .unwrap_or_else(|| panic!("no {path} in {lines:?}"))
    };
    let refused = find("/a/../../etc/passwd");
    assert_eq!(
        (&refused["status"], &refused["method"]),
        (&400.into(), &"GET".into())
    );
    assert!(refused.get("normalized_path").is_none());
    assert_eq!(find("/ok/./fine")["normalized_path"], "/ok/fine");
    assert!(
        entries.iter().all(|e| e["path"] != "/ok/fine"),
        "the log keeps the path as sent"
    );
}

#[test]
fn a_configured_path_that_could_never_match_is_refused_at_load() {
    let base = proxy_config(&[closed_port()], "", "");
    for (prefix, hint) in [
        ("/api/./v1/", "write \"/api/v1/\""),
        ("/%61pi/", "write \"/api/\""),
        ("/a%2fb/", "encoded slash"),
        ("/../x", "climbs above the root"),
    ] {
        assert_refused(
            &base.replace(
                "path_prefix = \"/\"",
                &format!("path_prefix = \"{prefix}\""),
            ),
            "routes[0].path_prefix",
            hint,
        );
    }
}
