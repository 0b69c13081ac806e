//! JWT through the real gateway, with keys generated per test and tokens signed here: RS256,
//! ES256, EdDSA and HS256; the refusals (expired, not yet valid, wrong issuer or audience,
//! `alg: none`, HS256 signed with the RSA public key, unknown kid, oversized, garbage); claims
//! to headers and the consumer claim; a JWKS served by a local server the test changes (key
//! rotation, refetch limits under a flood of made-up kids, the server failing or hanging).

mod common;
mod jwt_support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use jwt_support::{jwks, SigningKey};
use serde_json::{json, Value};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims that pass the test providers' checks, with `extra` merged in.
fn claims(extra: Value) -> Value {
    let mut c = json!({
        "iss": "https://idp.test/",
        "aud": ["orders-api"],
        "sub": "user-42",
        "iat": now(),
        "exp": now() + 600,
        "org": { "tenant": "t-7" },
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn call(gw: &Gateway, path: &str, token: Option<&str>, extra: &str) -> Response {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    exchange(
        gw.addr("public"),
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n{auth}{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    )
}

const HS_SECRET: &str = "an-hmac-secret-of-at-least-32-bytes!";

/// A gateway whose `idp` provider reads `jwks_file` and whose `hs` provider takes HS256.
fn file_gateway(upstream: SocketAddr, keys: &str) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, keys).unwrap();
    let jwks = jwks.display();
    let config = format!(
        r#"
[admin]
address = "127.0.0.1:0"

[[consumers]]
name = "acme"
groups = ["partners"]

[[consumers]]
name = "globex"

[[auth]]
name = "idp"
type = "jwt"
issuer = "https://idp.test/"
audiences = ["orders-api"]
algorithms = ["RS256", "ES256", "EdDSA"]
jwks_file = "{jwks}"
leeway_s = 5
claims_to_headers = {{ "x-user-id" = "sub", "x-tenant" = "org.tenant", "x-roles" = "roles" }}

[[auth]]
name = "partners-idp"
type = "jwt"
realm = "partners"
algorithms = ["ES256"]
jwks_file = "{jwks}"
consumer_claim = "client"

[[auth]]
name = "hs"
type = "jwt"
algorithms = ["HS256", "RS256"]
jwks_file = "{jwks}"
secret = {{ env = "TEST_JWT_SECRET" }}
forward_credentials = true

[[rate_limits]]
name = "per-consumer"
key = "consumer"
rate = 0.001
burst = 1

[[upstreams]]
name = "app"
targets = ["{upstream}"]

[[routes]]
name = "orders"
listener = "public"
path_prefix = "/orders"
upstream = "app"
auth = ["idp"]
request_headers = {{ set = {{ "x-who" = "${{consumer}}" }} }}

[[routes]]
name = "partners"
listener = "public"
path_prefix = "/partners"
upstream = "app"
auth = ["partners-idp"]
allow_groups = ["partners"]

[[routes]]
name = "hs"
listener = "public"
path_prefix = "/hs"
upstream = "app"
auth = ["hs"]

[[routes]]
name = "limited"
listener = "public"
path_prefix = "/limited"
upstream = "app"
auth = ["idp"]
rate_limits = ["per-consumer"]

[[listeners]]
name = "public"
address = "127.0.0.1:0"
"#
    );
    let gw = Gateway::start_with_env(&config, &[("TEST_JWT_SECRET", HS_SECRET)]);
    (gw, dir)
}

#[test]
fn valid_tokens_of_each_algorithm_pass_with_claims_upstream() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let (rsa, ec, ed) = (
        SigningKey::new(Algorithm::RS256, "rsa-1"),
        SigningKey::new(Algorithm::ES256, "ec-1"),
        SigningKey::new(Algorithm::EdDSA, "ed-1"),
    );
    let (gw, _dir) = file_gateway(up.addr, &jwks(&[&rsa, &ec, &ed]));
    let extra = json!({ "roles": ["reader", "writer"] });
    for key in [&rsa, &ec, &ed] {
        let token = key.sign(&claims(extra.clone()));
        // Forged identity headers are dropped before the gateway's own go on.
        let r = call(
            &gw,
            "/orders/1",
            Some(&token),
            "X-User-Id: admin\r\nX-Consumer: admin\r\nX-Tenant: evil\r\n",
        );
        assert_eq!(r.status, 200, "{:?}: {}", key.alg, r.text());
    }
    let got = up.wait_for(3);
    for g in &got {
        assert_eq!(g.headers_named("x-user-id"), vec!["user-42"]);
        assert_eq!(g.headers_named("x-consumer"), vec!["user-42"]);
        assert_eq!(g.headers_named("x-tenant"), vec!["t-7"]);
        assert_eq!(g.header("x-roles"), Some("reader,writer"));
        assert_eq!(
            g.header("x-who"),
            Some("user-42"),
            "${{consumer}} is the subject"
        );
        assert_eq!(
            g.header("authorization"),
            None,
            "the token is not forwarded"
        );
    }
    // The same token again is served from the cache of verified tokens.
    let token = ec.sign(&claims(json!({})));
    for _ in 0..3 {
        assert_eq!(call(&gw, "/orders/2", Some(&token), "").status, 200);
    }
    // HS256 with the configured secret.
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(HS_SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(call(&gw, "/hs", Some(&hs), "").status, 200);
    let got = up.wait_for(7);
    let forwarded = format!("Bearer {hs}");
    assert_eq!(
        got[6].header("authorization"),
        Some(forwarded.as_str()),
        "forward_credentials keeps the token"
    );
    // The secret never reaches a log.
    assert!(gw.logs().iter().all(|l| !l.contains(HS_SECRET)));
}

#[test]
fn bad_tokens_get_401_with_rfc6750_challenges() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let rsa = SigningKey::new(Algorithm::RS256, "rsa-1");
    let (gw, _dir) = file_gateway(up.addr, &jwks(&[&rsa]));

    // No token: a challenge without an error code.
    let r = call(&gw, "/orders", None, "");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"idp\""));
    assert_eq!(r.json()["error"], "authentication required");

    let invalid = "Bearer realm=\"idp\", error=\"invalid_token\", error_description=\"the access token is invalid\"";
    let expired = "Bearer realm=\"idp\", error=\"invalid_token\", error_description=\"the access token expired\"";
    let refused = |token: &str, challenge: &str, what: &str| {
        let r = call(&gw, "/orders", Some(token), "");
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert_eq!(r.header("www-authenticate"), Some(challenge), "{what}");
        assert_eq!(r.json()["error"], "invalid credentials", "{what}");
    };
    refused(
        &rsa.sign(&claims(json!({ "exp": now() - 60 }))),
        expired,
        "expired beyond the leeway",
    );
    // Within the 5 s leeway it passes.
    let r = call(
        &gw,
        "/orders",
        Some(&rsa.sign(&claims(json!({ "exp": now() - 1 })))),
        "",
    );
    assert_eq!(r.status, 200);
    refused(
        &rsa.sign(&claims(json!({ "nbf": now() + 120 }))),
        invalid,
        "not yet valid",
    );
    refused(
        &rsa.sign(&claims(json!({ "iat": now() + 120 }))),
        invalid,
        "issued in the future",
    );
    refused(
        &rsa.sign(&claims(json!({ "iss": "https://evil.test/" }))),
        invalid,
        "wrong issuer",
    );
    refused(
        &rsa.sign(&claims(json!({ "aud": "other-api" }))),
        invalid,
        "wrong audience",
    );
    refused(
        &rsa.sign(&claims(json!({ "aud": null }))),
        invalid,
        "no audience",
    );
    refused(
        &rsa.sign(&claims(json!({ "exp": null }))),
        invalid,
        "no exp",
    );
    refused(
        &rsa.sign_as("rsa-unknown", &claims(json!({}))),
        invalid,
        "unknown kid (a file's keys are never refetched)",
    );
    // alg "none": an unsigned token.
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(&json!({ "alg": "none", "typ": "JWT" })),
        b64(&claims(json!({})))
    );
    refused(&none, invalid, "alg none");
    // HS256 signed with the RSA public key (alg confusion): `idp` does not allow HS256, and
    // `hs` checks HS256 against its own secret.
    let public = rsa.jwk().to_string();
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(public.as_bytes()).unwrap(),
    )
    .unwrap();
    refused(&confused, invalid, "HS256 with the public key");
    let r = call(&gw, "/hs", Some(&confused), "");
    assert_eq!(
        r.status, 401,
        "HS256 with the public key, on an HS256 provider"
    );
    // A tampered payload fails the signature.
    let good = rsa.sign(&claims(json!({})));
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(&claims(json!({ "sub": "admin" }))),
        parts[2]
    );
    refused(&tampered, invalid, "tampered payload");
    refused("not.a.token", invalid, "garbage");
    refused("%%%.***.###", invalid, "not base64");
    let huge = format!("{good}{}", "A".repeat(9 * 1024));
    refused(&huge, invalid, "over 8 KiB");

    assert_eq!(
        up.count(),
        1,
        "only the token within the leeway went upstream"
    );
    let m = eventually("the auth counters", || {
        let m = get(gw.admin.unwrap(), "/metrics").text();
        m.contains("ringway_auth_total{route=\"orders\",provider=\"idp\",outcome=\"invalid\"} 14")
            .then_some(m)
    });
    assert!(m.contains("outcome=\"missing\"} 1"), "{m}");
}

#[test]
fn consumer_claim_names_a_consumer_for_groups_and_rate_limits() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let ec = SigningKey::new(Algorithm::ES256, "ec-1");
    let (gw, _dir) = file_gateway(up.addr, &jwks(&[&ec]));
    let token = |client: &str| ec.sign(&claims(json!({ "client": client })));
    let r = call(&gw, "/partners", Some(&token("acme")), "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.wait_for(1)[0].header("x-consumer"), Some("acme"));
    let r = call(&gw, "/partners", Some(&token("globex")), "");
    assert_eq!(r.status, 403, "globex is not a partner");
    let r = call(&gw, "/partners", Some(&token("nobody")), "");
    assert_eq!(r.status, 401, "a claim naming no consumer");
    assert_eq!(
        r.header("www-authenticate")
            .map(|h| h.starts_with("Bearer realm=\"partners\", error=\"invalid_token\"")),
        Some(true)
    );
    // The `consumer` rate-limit key: each subject has its own bucket (burst 1).
    let as_subject = |sub: &str| ec.sign(&claims(json!({ "sub": sub })));
    let (alice, bob) = (as_subject("alice"), as_subject("bob"));
    assert_eq!(call(&gw, "/limited", Some(&alice), "").status, 200);
    assert_eq!(call(&gw, "/limited", Some(&alice), "").status, 429);
    assert_eq!(call(&gw, "/limited", Some(&bob), "").status, 200);
}

/// A JWKS server the test can change: what it serves, and whether it fails or hangs.
struct IdentityProvider {
    server: Upstream,
    keys: Arc<Mutex<String>>,
    mode: Arc<Mutex<&'static str>>,
}

impl IdentityProvider {
    fn start(keys: String) -> IdentityProvider {
        let keys = Arc::new(Mutex::new(keys));
        let mode = Arc::new(Mutex::new("ok"));
        let (k, m) = (Arc::clone(&keys), Arc::clone(&mode));
        let server = Upstream::start(move |_| {
            let mode = *m.lock().unwrap();
            match mode {
                "garbage" => Reply::ok("<html>not json</html>"),
                "hang" => {
                    std::thread::sleep(Duration::from_secs(3));
                    Reply::ok("{}")
                }
                _ => {
                    Reply::ok(&k.lock().unwrap()).header("content-type", "application/jwk-set+json")
                }
            }
        });
        IdentityProvider { server, keys, mode }
    }

    fn serve(&self, keys: String) {
        *self.keys.lock().unwrap() = keys;
    }

    fn set_mode(&self, mode: &'static str) {
        *self.mode.lock().unwrap() = mode;
    }
}

fn remote_gateway(upstream: SocketAddr, idp: SocketAddr, workers: usize) -> Gateway {
    Gateway::start(&format!(
        r#"
[admin]
address = "127.0.0.1:0"

[runtime]
workers = {workers}

[[auth]]
name = "idp"
type = "jwt"
issuer = "https://idp.test/"
audiences = ["orders-api"]
algorithms = ["RS256", "ES256"]
jwks = {{ upstream = "idp", path = "/.well-known/jwks.json", refresh_s = 600 }}

[[upstreams]]
name = "idp"
targets = ["{idp}"]
request_timeout_ms = 500

[[upstreams]]
name = "app"
targets = ["{upstream}"]

[[routes]]
name = "orders"
listener = "public"
path_prefix = "/orders"
upstream = "app"
auth = ["idp"]

[[listeners]]
name = "public"
address = "127.0.0.1:0"
"#
    ))
}

fn jwks_metric(gw: &Gateway, result: &str) -> u64 {
    let m = get(gw.admin.unwrap(), "/metrics").text();
    let key = format!("ringway_jwks_fetches_total{{provider=\"idp\",result=\"{result}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&key)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_rotated_key_is_fetched_once_and_a_flood_of_unknown_kids_is_not() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let (old, new) = (
        SigningKey::new(Algorithm::ES256, "2026-old"),
        SigningKey::new(Algorithm::ES256, "2026-new"),
    );
    let idp = IdentityProvider::start(jwks(&[&old]));
    let gw = remote_gateway(up.addr, idp.server.addr, 2);
    // The first request may arrive before the first fetch: it waits for it.
    let r = call(&gw, "/orders", Some(&old.sign(&claims(json!({})))), "");
    assert_eq!(r.status, 200, "{}\n{:#?}", r.text(), gw.logs());
    assert_eq!(
        idp.server.count(),
        1,
        "one fetch at start, for every worker"
    );
    let got = idp.server.received();
    assert_eq!(got[0].path, "/.well-known/jwks.json");

    // The provider rotates: a token with the new kid triggers one refetch and passes.
    idp.serve(jwks(&[&old, &new]));
    let r = call(&gw, "/orders", Some(&new.sign(&claims(json!({})))), "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(idp.server.count(), 2, "one refetch");

    // A flood of made-up kids within 30 s: all refused at once, no further fetch.
    for i in 0..40 {
        let r = call(
            &gw,
            "/orders",
            Some(&new.sign_as(&format!("made-up-{i}"), &claims(json!({})))),
            "",
        );
        assert_eq!(r.status, 401);
    }
    assert_eq!(
        idp.server.count(),
        2,
        "the flood reached the identity provider"
    );
    // Known keys keep working meanwhile, on both workers.
    for _ in 0..4 {
        let token = old.sign(&claims(
            json!({ "jti": format!("{:?}", std::time::Instant::now()) }),
        ));
        assert_eq!(call(&gw, "/orders", Some(&token), "").status, 200);
    }
    assert_eq!(jwks_metric(&gw, "ok"), 2);
}

#[test]
fn a_failing_identity_provider_leaves_the_keys_in_use() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let key = SigningKey::new(Algorithm::RS256, "k1");
    let idp = IdentityProvider::start(jwks(&[&key]));
    let gw = remote_gateway(up.addr, idp.server.addr, 1);
    let token = key.sign(&claims(json!({})));
    assert_eq!(call(&gw, "/orders", Some(&token), "").status, 200);
    eventually("the first fetch counted", || {
        (jwks_metric(&gw, "ok") == 1).then_some(())
    });

    // The provider breaks; an unknown kid makes the gateway try it, and the refetch fails.
    idp.set_mode("garbage");
    let stranger = key.sign_as("k2", &claims(json!({})));
    assert_eq!(call(&gw, "/orders", Some(&stranger), "").status, 401);
    assert_eq!(jwks_metric(&gw, "failed"), 1);
    gw.wait_log("the failed fetch", |l| {
        l.contains("JWKS fetch failed") && l.contains("not JSON")
    });
    // The keys fetched before still work, also for tokens never seen before.
    let fresh = key.sign(&claims(json!({ "sub": "someone-else" })));
    assert_eq!(call(&gw, "/orders", Some(&fresh), "").status, 200);
    assert_eq!(up.count(), 2);
}

#[test]
fn a_hanging_identity_provider_bounds_the_wait_with_a_503() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let key = SigningKey::new(Algorithm::RS256, "k1");
    let idp = IdentityProvider::start(jwks(&[&key]));
    idp.set_mode("hang");
    let gw = remote_gateway(up.addr, idp.server.addr, 1);
    // No keys yet and the first fetch hangs: the request waits a bounded time, then 503
    // (the provider's fault, not the client's).
    let started = std::time::Instant::now();
    let r = call(&gw, "/orders", Some(&key.sign(&claims(json!({})))), "");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(r.text().contains("identity provider"), "{}", r.text());
    eventually("the timed-out fetch counted", || {
        (jwks_metric(&gw, "failed") >= 1).then_some(())
    });
    assert_eq!(up.count(), 0);
}

/// `ringway check` refuses `body` (after a listener), naming `key` and saying `message`.
fn config_error(body: &str, key: &str, message: &str) {
    let listener = "[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n\n";
    assert_refused(&format!("{listener}{body}"), key, message);
}

#[test]
fn the_jwks_is_refreshed_every_refresh_s() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let (old, new) = (
        SigningKey::new(Algorithm::ES256, "k-old"),
        SigningKey::new(Algorithm::ES256, "k-new"),
    );
    let idp = IdentityProvider::start(jwks(&[&old]));
    let gw = Gateway::start(&format!(
        r#"
[[auth]]
name = "idp"
type = "jwt"
algorithms = ["ES256"]
jwks = {{ upstream = "idp", path = "/jwks", refresh_s = 10 }}

[[upstreams]]
name = "idp"
targets = ["{idp}"]

[[upstreams]]
name = "app"
targets = ["{app}"]

[[routes]]
name = "r"
listener = "public"
path_prefix = "/"
upstream = "app"
auth = ["idp"]

[[listeners]]
name = "public"
address = "127.0.0.1:0"
"#,
        idp = idp.server.addr,
        app = up.addr,
    ));
    eventually("the first fetch", || {
        (idp.server.count() == 1).then_some(())
    });
    idp.serve(jwks(&[&old, &new]));
    // No token asks for it: the periodic refresh brings the new key.
    eventually("the refresh", || (idp.server.count() == 2).then_some(()));
    let token = new.sign(&json!({ "sub": "u", "exp": now() + 600 }));
    // (Answered by the refreshed keys, or, when it beats the workers' next tick, by one refetch.)
    assert_eq!(call(&gw, "/x", Some(&token), "").status, 200);
}

#[test]
fn an_hmac_secret_comes_from_a_file_without_its_trailing_newline() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hs.key");
    std::fs::write(&file, format!("{HS_SECRET}\n")).unwrap();
    let gw = Gateway::start(&format!(
        r#"
[[auth]]
name = "hs"
type = "jwt"
algorithms = ["HS384"]
secret = {{ file = "{file}" }}

[[upstreams]]
name = "app"
targets = ["{app}"]

[[routes]]
name = "r"
listener = "public"
path_prefix = "/"
upstream = "app"
auth = ["hs"]

[[listeners]]
name = "public"
address = "127.0.0.1:0"
"#,
        file = file.display(),
        app = up.addr,
    ));
    let sign = |secret: &str| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &json!({ "sub": "u", "exp": now() + 600 }),
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(call(&gw, "/x", Some(&sign(HS_SECRET)), "").status, 200);
    let with_newline = format!("{HS_SECRET}\n");
    assert_eq!(call(&gw, "/x", Some(&sign(&with_newline)), "").status, 401);
    assert!(gw.logs().iter().all(|l| !l.contains(HS_SECRET)));
}

#[test]
fn jwt_config_errors_name_the_key() {
    config_error(
        "[[auth]]\nname = \"j\"\ntype = \"jwt\"\nalgorithms = [\"none\"]\njwks_file = \"x\"\n",
        "auth[0].algorithms",
        "never allowed",
    );
    config_error(
        "[[auth]]\nname = \"j\"\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\n",
        "auth[0].secret",
        "need `secret",
    );
    config_error(
        "[[auth]]\nname = \"j\"\ntype = \"jwt\"\nalgorithms = [\"RS256\"]\n",
        "auth[0].jwks",
        "needs its keys",
    );
    config_error(
        "[[auth]]\nname = \"j\"\ntype = \"jwt\"\nalgorithms = [\"RS256\"]\njwks = { upstream = \"nope\", path = \"/k\" }\n",
        "auth[0].jwks.upstream",
        "unknown upstream",
    );
    config_error(
        "[[auth]]\nname = \"j\"\ntype = \"jwt\"\nalgorithms = [\"RS256\"]\njwks_file = \"/nonexistent/jwks.json\"\n",
        "auth[0].jwks_file",
        "cannot read",
    );
    config_error(
        "[[auth]]\nname = \"j\"\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = { env = \"RINGWAY_TEST_UNSET_SECRET\" }\n",
        "auth[0].secret.env",
        "is not set",
    );
    config_error(
        "[[auth]]\nname = \"k\"\ntype = \"api_key\"\nissuer = \"https://idp/\"\n",
        "auth[0].issuer",
        "does not apply to type \"api_key\"",
    );
    config_error(
        "[[auth]]\nname = \"j\"\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = { env = \"PATH\" }\nclaims_to_headers = { \"content-length\" = \"sub\" }\n",
        "auth[0].claims_to_headers",
        "cannot carry a claim",
    );
}

#[test]
fn a_jwks_file_without_usable_keys_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    for (text, message) in [
        ("not json", "not JSON"),
        ("{\"nokeys\": []}", "no \"keys\" array"),
        (
            "{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}",
            "symmetric key",
        ),
    ] {
        let path = write("jwks.json", text);
        config_error(
            &format!(
                "[[auth]]\nname = \"j\"\ntype = \"jwt\"\nalgorithms = [\"RS256\"]\njwks_file = \"{path}\"\n"
            ),
            "auth[0].jwks_file",
            message,
        );
    }
}

#[test]
fn the_auth_example_config_checks_with_its_jwks_file() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples/auth.toml");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    let key = SigningKey::new(Algorithm::ES256, "partner-1");
    std::fs::write(dir.path().join("keys/partners-jwks.json"), jwks(&[&key])).unwrap();
    let config = dir.path().join("auth.toml");
    std::fs::copy(example, &config).unwrap();
    let (status, stdout, stderr) = run_ringway(&["check", "--config", config.to_str().unwrap()]);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains(": ok (1 listeners, 2 upstreams, 3 routes"),
        "{stdout}"
    );
    // Without its key file the same config is refused, naming the entry.
    std::fs::remove_file(dir.path().join("keys/partners-jwks.json")).unwrap();
    let (status, _, stderr) = run_ringway(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("auth[3].jwks_file"), "{stderr}");
}
