//! TLS to upstreams through the real gateway, against a real rustls HTTPS upstream that records
//! what it saw: verification against a configured CA (success, unknown CA, wrong name), SNI,
//! a client certificate, pooled reuse and session resumption, and the 502 a failure gets.

mod common;
mod jwt_support;
mod tls_support;

use common::*;
use tls_support::*;

fn gateway(upstream_tls: &str, target: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
[admin]
address = "127.0.0.1:0"

[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[upstreams]]
name = "secure"
targets = ["{target}"]
[upstreams.tls]
{upstream_tls}

[[routes]]
name = "all"
listener = "public"
path_prefix = "/"
upstream = "secure"
"#
    ))
}

#[test]
fn a_verified_upstream_is_reused_from_the_pool_and_resumes() {
    let ca = Ca::new("internal-ca");
    let cert = ca.server("api", &["api.internal"]);
    let up = TlsUpstream::start(server_config(&cert, None));
    let gw = gateway(
        &format!("sni = \"api.internal\"\nca = \"{}\"", ca.pem.display()),
        &up.addr.to_string(),
    );
    let addr = gw.addr("public");
    // Keep-alive on both sides: one upstream connection serves every request.
    let mut s = common::connect(addr);
    let mut reader = ResponseReader::new(s.try_clone().unwrap());
    for i in 0..5 {
        use std::io::Write;
        s.write_all(format!("GET /k{i} HTTP/1.1\r\nHost: gw\r\n\r\n").as_bytes())
            .unwrap();
        let r = reader.read_response(false).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "tls-ok");
    }
    let conns = up.connections();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0].sni.as_deref(), Some("api.internal"));
    let reqs = up.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 5);
    assert_eq!(reqs[4].path, "/k4");
    assert!(reqs.iter().all(|r| r.connection == reqs[0].connection));

    // The upstream closes its connection; the next request needs a new one, whose handshake
    // resumes the session the first one was given.
    assert!(!conns[0].resumed);
    for path in ["/close", "/after-close"] {
        assert_eq!(get(addr, path).status, 200);
    }
    let conns = up.connections();
    assert_eq!(conns.len(), 2, "{conns:?}");
    assert!(conns[1].resumed, "{conns:?}");
}

#[test]
fn verification_failures_are_502_with_the_reason_logged_and_counted() {
    let ca = Ca::new("internal-ca");
    let other_ca = Ca::new("other-ca");
    let cert = ca.server("api", &["api.internal"]);
    let up = TlsUpstream::start(server_config(&cert, None));
    for (tls, why) in [
        (
            format!(
                "sni = \"api.internal\"\nca = \"{}\"",
                other_ca.pem.display()
            ),
            "unknown issuer",
        ),
        (
            format!("sni = \"wrong.internal\"\nca = \"{}\"", ca.pem.display()),
            "name mismatch",
        ),
    ] {
        let gw = gateway(&tls, &up.addr.to_string());
        let r = get(gw.addr("public"), "/");
        assert_eq!(r.status, 502, "{why}");
        assert!(
            r.text().contains("TLS handshake with the upstream failed"),
            "{}",
            r.text()
        );
        gw.wait_log(why, |l| {
            l.contains("TLS handshake failed") && l.contains(why)
        });
        eventually("the tls_failed count", || {
            let m = get(gw.admin.unwrap(), "/metrics").text();
            m.lines()
                .any(|l| l.contains("outcome=\"tls_failed\"") && l.ends_with(" 1"))
                .then_some(())
        });
    }
    assert!(up.requests.lock().unwrap().is_empty(), "nothing was sent");

    // verify = false: any certificate, with a warning at start.
    let gw = gateway(
        "verify = false\nsni = \"wrong.internal\"",
        &up.addr.to_string(),
    );
    gw.wait_log("the verification warning", |l| {
        l.contains("WARN") && l.contains("verification is off") && l.contains("secure")
    });
    assert_eq!(get(gw.addr("public"), "/").status, 200);
}

#[test]
fn a_client_certificate_is_presented_to_an_upstream_that_requires_one() {
    let ca = Ca::new("internal-ca");
    let clients = Ca::new("gateway-ca");
    let cert = ca.server("api", &["api.internal"]);
    let gw_cert = clients.client("gw", "ringway-gateway");
    let up = TlsUpstream::start(server_config(&cert, Some(&clients)));
    // Without one: refused.
    let gw = gateway(
        &format!("sni = \"api.internal\"\nca = \"{}\"", ca.pem.display()),
        &up.addr.to_string(),
    );
    assert_eq!(get(gw.addr("public"), "/").status, 502);
    drop(gw);
    let gw = gateway(
        &format!(
            "sni = \"api.internal\"\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
            ca.pem.display(),
            gw_cert.cert.display(),
            gw_cert.key.display()
        ),
        &up.addr.to_string(),
    );
    assert_eq!(get(gw.addr("public"), "/").status, 200);
    let conns = up.connections();
    let last = conns.last().unwrap();
    assert_eq!(last.client_cert.as_deref(), Some(gw_cert.der.as_ref()));
}

#[test]
fn upstream_tls_config_errors() {
    let ca = Ca::new("internal-ca");
    let base = |tls: &str| {
        format!(
            "[[listeners]]\nname = \"p\"\naddress = \"127.0.0.1:0\"\n\n[[upstreams]]\nname = \"u\"\ntargets = [\"127.0.0.1:1\"]\n[upstreams.tls]\n{tls}\n"
        )
    };
    assert_config_error(
        &base("ca = \"/nonexistent/ca.pem\""),
        ":9:",
        "upstreams[0].tls.ca",
    );
    let c = ca.client("gw", "gw");
    assert_config_error(
        &base(&format!("client_cert = \"{}\"", c.cert.display())),
        ":9:",
        "give both client_cert and client_key",
    );
    assert_config_error(&base("sni = \"not a name\""), ":9:", "is not a DNS name");
}

#[test]
fn a_jwks_is_fetched_over_https_through_its_upstream() {
    let ca = Ca::new("idp-ca");
    let cert = ca.server("idp", &["idp.internal"]);
    let key = jwt_support::SigningKey::new(jsonwebtoken::Algorithm::ES256, "k1");
    let idp = TlsUpstream::serving(server_config(&cert, None), &jwt_support::jwks(&[&key]));
    let app = common::Upstream::start(|_| common::Reply::ok("app"));
    let gw = Gateway::start(&format!(
        r#"
[[auth]]
name = "idp"
type = "jwt"
algorithms = ["ES256"]
jwks = {{ upstream = "idp", path = "/jwks.json" }}

[[upstreams]]
name = "idp"
targets = ["{idp}"]
[upstreams.tls]
sni = "idp.internal"
ca = "{ca}"

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
        idp = idp.addr,
        app = app.addr,
        ca = ca.pem.display(),
    ));
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = key.sign(&serde_json::json!({ "sub": "u1", "exp": exp }));
    let r = common::exchange(
        gw.addr("public"),
        format!("GET /x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(app.wait_for(1)[0].header("x-consumer"), Some("u1"));
    let conns = idp.connections();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0].sni.as_deref(), Some("idp.internal"));
    let reqs = idp.requests.lock().unwrap().clone();
    assert_eq!(reqs[0].path, "/jwks.json");
    assert_eq!(reqs[0].header("host"), Some("idp.internal"));
}
