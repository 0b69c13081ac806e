//! TLS certificates through the real gateway: client certificates (required and optional, the
//! subject passed upstream), rotation on disk without a restart (renamed and rewritten files,
//! a broken file ignored), session resumption across workers, expiry warnings and metrics, and
//! the config errors a bad certificate file gets.

mod common;
mod tls_support;

use std::sync::Arc;

use common::*;
use rcgen::ExtendedKeyUsagePurpose;
use tls_support::*;

#[test]
fn required_client_certificates_refuse_none_and_strangers_and_pass_the_subject() {
    let ca = Ca::new("server-ca");
    let clients = Ca::new("clients-ca");
    let stranger_ca = Ca::new("stranger-ca");
    let server = ca.server("api", &["api.test"]);
    let alice = clients.client("alice", "alice");
    let mallory = stranger_ca.client("mallory", "mallory");
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = tls_gateway(
        1,
        &format!(
            "certificates = [{}]\nclient_auth = \"required\"\nclient_ca = \"{}\"",
            pair(&server),
            clients.pem.display()
        ),
        up.addr,
        r#"request_headers = { set = { "x-client-subject" = "${tls_client_subject}", "x-client-san" = "${tls_client_san}" } }"#,
    );
    let addr = gw.addr("tls");
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];

    for (who, cert) in [("nobody", None), ("a stranger", Some(&mallory))] {
        for v in versions {
            let cfg = Arc::new(client_config_with(ca.roots(), &[v], cert));
            // TLS 1.3 clients learn of the refusal on their first read, 1.2 ones at once.
            match tls_connect(addr, "api.test", &cfg) {
                Err(_) => {}
                Ok(mut s) => {
                    use std::io::{Read, Write};
                    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n");
                    let mut buf = [0u8; 64];
                    let read = s.read(&mut buf);
                    assert!(
                        !matches!(read, Ok(n) if n > 0),
                        "{who} over {v:?} must not be served"
                    );
                }
            }
        }
    }
    assert_eq!(up.count(), 0, "nothing reached the upstream");

    let cfg = Arc::new(client_config_with(ca.roots(), &versions, Some(&alice)));
    let mut s = tls_connect(addr, "api.test", &cfg).expect("alice is let in");
    let r = request(&mut s, "GET /who HTTP/1.1\r\nHost: api.test\r\n\r\n");
    assert_eq!(r.status, 200);
    let got = up.wait_for(1);
    assert_eq!(got[0].header("x-client-subject"), Some("CN=alice"));
    assert_eq!(
        got[0].header("x-client-san"),
        Some("email:alice@clients.test")
    );
    let line = "ringway_rejected_requests_total{reason=\"tls_client_certificate\"}";
    eventually("4 refused client certificates", || {
        let body = get(gw.admin.unwrap(), "/metrics").text();
        body.lines()
            .any(|l| l.starts_with(line) && l.ends_with(" 4"))
            .then_some(())
    });
}

#[test]
fn optional_client_certificates_admit_both_and_only_the_verified_subject_is_passed() {
    let ca = Ca::new("server-ca");
    let clients = Ca::new("clients-ca");
    let server = ca.server("api", &["api.test"]);
    let bob = clients.client("bob", "bob");
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = tls_gateway(
        1,
        &format!(
            "certificates = [{}]\nclient_auth = \"optional\"\nclient_ca = \"{}\"",
            pair(&server),
            clients.pem.display()
        ),
        up.addr,
        r#"request_headers = { set = { "x-client-subject" = "${tls_client_subject}" } }"#,
    );
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let anon = Arc::new(client_config(ca.roots()));
    let with_cert = Arc::new(client_config_with(ca.roots(), &versions, Some(&bob)));
    for cfg in [&anon, &with_cert] {
        let mut s = tls_connect(gw.addr("tls"), "api.test", cfg).unwrap();
        // A client-sent header of the same name is replaced, never trusted.
        let r = request(
            &mut s,
            "GET / HTTP/1.1\r\nHost: api.test\r\nX-Client-Subject: CN=admin\r\n\r\n",
        );
        assert_eq!(r.status, 200);
    }
    let got = up.wait_for(2);
    assert_eq!(got[0].header("x-client-subject"), Some(""));
    assert_eq!(got[1].header("x-client-subject"), Some("CN=bob"));
}

#[test]
fn certificates_rotate_on_disk_and_a_broken_file_keeps_the_old_one() {
    let ca = Ca::new("test-ca");
    let first = ca.server("api", &["api.test"]);
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = tls_gateway(
        2,
        &format!("certificates = [{}]", pair(&first)),
        up.addr,
        "",
    );
    let addr = gw.addr("tls");
    let cfg = Arc::new(client_config(ca.roots()));
    // A connection opened before the rotation keeps working on it.
    let mut early = tls_connect(addr, "api.test", &cfg).unwrap();
    assert_eq!(leaf(&early), first.der);

    // Renamed into place, as certificate managers do: the key first, then the certificate
    // (in between, the pair does not match and the old one stays).
    let second = ca.server("next", &["api.test"]);
    replace_file(&first.key, &std::fs::read(&second.key).unwrap());
    replace_file(&first.cert, &std::fs::read(&second.cert).unwrap());
    let served = || leaf(&tls_connect(addr, "api.test", &cfg).unwrap());
    // Every worker takes it: many new connections, all on the new certificate.
    eventually("the rotated certificate", || {
        (0..20).all(|_| served() == second.der).then_some(())
    });
    let r = request(&mut early, "GET / HTTP/1.1\r\nHost: api.test\r\n\r\n");
    assert_eq!(r.status, 200);

    // Rewritten in place (same inode).
    let third = ca.server("third", &["api.test"]);
    std::fs::write(&first.key, std::fs::read(&third.key).unwrap()).unwrap();
    std::fs::write(&first.cert, std::fs::read(&third.cert).unwrap()).unwrap();
    eventually("the rewritten certificate", || {
        (0..20).all(|_| served() == third.der).then_some(())
    });

    // A broken certificate: logged, and the last good one stays.
    std::fs::write(&first.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    gw.wait_log("the broken file logged", |l| {
        l.contains("cannot be used") && l.contains("api.pem")
    });
    assert!((0..10).all(|_| served() == third.der));
}

#[test]
fn a_ticket_from_one_worker_resumes_on_every_worker() {
    let ca = Ca::new("test-ca");
    let server = ca.server("api", &["api.test"]);
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = tls_gateway(
        2,
        &format!("certificates = [{}]", pair(&server)),
        up.addr,
        "",
    );
    let addr = gw.addr("tls");
    for v in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let cfg = Arc::new(client_config_with(ca.roots(), &[v], None));
        let mut first = tls_connect(addr, "api.test", &cfg).unwrap();
        assert_eq!(
            first.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        // A TLS 1.3 client takes its tickets in with the first response.
        let get_one = "GET / HTTP/1.1\r\nHost: api.test\r\n\r\n";
        assert_eq!(request(&mut first, get_one).status, 200);
        drop(first);
        // Connections spread over both workers by their ports; every one resumes.
        for i in 0..30 {
            let mut s = tls_connect(addr, "api.test", &cfg).unwrap();
            assert_eq!(request(&mut s, get_one).status, 200);
            assert_eq!(
                s.conn.handshake_kind(),
                Some(rustls::HandshakeKind::Resumed),
                "{v:?} connection {i}"
            );
        }
    }
    // Both workers took connections (the per-worker connection counters say so).
    let status = get(gw.admin.unwrap(), "/status").json();
    let workers = status["workers"].as_array().expect("workers").clone();
    assert_eq!(workers.len(), 2);
    eventually("both workers to report connections", || {
        let status = get(gw.admin.unwrap(), "/status").json();
        status["workers"]
            .as_array()?
            .iter()
            .all(|w| w["connections_total"].as_u64().unwrap_or(0) > 5)
            .then_some(())
    });
}

#[test]
fn an_expiring_certificate_is_warned_about_and_exported() {
    let ca = Ca::new("test-ca");
    let soon = ca.issue(
        "soon",
        &["soon.test"],
        None,
        ExtendedKeyUsagePurpose::ServerAuth,
        |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = time_in_days(5);
        },
    );
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = tls_gateway(1, &format!("certificates = [{}]", pair(&soon)), up.addr, "");
    gw.wait_log("an expiry warning", |l| {
        l.contains("TLS certificate expires soon") && l.contains("soon.test")
    });
    let body = get(gw.admin.unwrap(), "/metrics").text();
    let line = body
        .lines()
        .find(|l| {
            l.starts_with("ringway_tls_cert_expiry_seconds{listener=\"tls\",name=\"soon.test\"}")
        })
        .unwrap_or_else(|| panic!("{body}"));
    let secs: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((4 * 86_400..=5 * 86_400).contains(&secs), "{line}");
}

fn time_in_days(days: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(days)
}

#[test]
fn bad_certificate_files_are_config_errors_naming_the_entry() {
    let ca = Ca::new("test-ca");
    let a = ca.server("a", &["a.test"]);
    let b = ca.server("b", &["b.test"]);
    let expired = ca.issue(
        "old",
        &["old.test"],
        None,
        ExtendedKeyUsagePurpose::ServerAuth,
        |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        },
    );
    let config = |certs: &str, extra: &str| {
        format!(
            "[[listeners]]\nname = \"tls\"\naddress = \"127.0.0.1:0\"\n[listeners.tls]\ncertificates = [{certs}]\n{extra}\n"
        )
    };
    let mismatched = format!(
        "{{ cert = \"{}\", key = \"{}\" }}",
        a.cert.display(),
        b.key.display()
    );
    assert_config_error(
        &config(&format!("{}, {mismatched}", pair(&a)), ""),
        ":5:",
        "listeners[0].tls.certificates[1].key",
    );
    assert_config_error(
        &config(&mismatched, ""),
        ":5:",
        "is not the key of the certificate in",
    );
    assert_config_error(
        &config(&pair(&expired), ""),
        ":5:",
        "the certificate expired on Fri, 01 Jan 2021",
    );
    assert_config_error(
        &config(
            "{ cert = \"/nonexistent/x.pem\", key = \"/nonexistent/x.key\" }",
            "",
        ),
        ":5:",
        "listeners[0].tls.certificates[0].cert",
    );
    assert_config_error(
        &config(&pair(&a), "client_auth = \"required\""),
        ":6:",
        "client certificates need client_ca",
    );
    assert_config_error(
        &config(&pair(&a), "min_version = \"1.1\""),
        ":6:",
        "give \"1.2\" or \"1.3\"",
    );
    assert_config_error(
        &config(&pair(&a), "alpn = [\"h2\"]"),
        ":6:",
        "HTTP/2 is not supported yet",
    );
    // No key material in any message.
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &config(&mismatched, ""));
    let (_, out, err) = run_ringway(&["check", "--config", &path]);
    assert!(!err.contains("PRIVATE KEY") && !out.contains("PRIVATE KEY"));
}

#[test]
fn rsa_ecdsa_and_ed25519_keys_in_pkcs8_pkcs1_and_sec1_all_serve() {
    let dir = tempfile::tempdir().unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // (name, how the key is made, the PEM label it must carry)
    let kinds: [(&str, &[&str], &str); 4] = [
        (
            "rsa-pkcs1",
            &["genrsa", "-traditional", "-out", "k", "2048"],
            "RSA PRIVATE KEY",
        ),
        (
            "ec-sec1",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "k",
            ],
            "EC PRIVATE KEY",
        ),
        (
            "ec-pkcs8",
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "k",
            ],
            "PRIVATE KEY",
        ),
        (
            "ed25519",
            &["genpkey", "-algorithm", "ed25519", "-out", "k"],
            "PRIVATE KEY",
        ),
    ];
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=formats CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
    ]);
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::pem::PemObject::from_pem_file(dir.path().join("ca.pem")).unwrap();
    roots
        .add(rustls::pki_types::CertificateDer::clone(&ca))
        .unwrap();
    let mut certs = Vec::new();
    for (name, keygen, label) in kinds {
        let key = format!("{name}.key");
        let cert = format!("{name}.pem");
        let mut args: Vec<&str> = keygen.to_vec();
        *args.iter_mut().find(|a| **a == "k").unwrap() = &key;
        openssl(&args);
        let pem = std::fs::read_to_string(dir.path().join(&key)).unwrap();
        assert!(
            pem.starts_with(&format!("-----BEGIN {label}-----")),
            "{name}: {pem}"
        );
        let ext = format!("{name}.ext");
        std::fs::write(
            dir.path().join(&ext),
            format!("subjectAltName=DNS:{name}.test\n"),
        )
        .unwrap();
        let (subj, csr) = (format!("/CN={name}.test"), format!("{name}.csr"));
        openssl(&["req", "-new", "-key", &key, "-subj", &subj, "-out", &csr]);
        openssl(&[
            "x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-days", "2", "-out",
            &cert, "-extfile", &ext,
        ]);
        let der: rustls::pki_types::CertificateDer<'static> =
            rustls::pki_types::pem::PemObject::from_pem_file(dir.path().join(&cert)).unwrap();
        certs.push((
            name,
            der,
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                dir.path().join(&cert).display(),
                dir.path().join(&key).display()
            ),
        ));
    }
    let up = Upstream::start(|_| Reply::ok("ok"));
    let list: Vec<&str> = certs.iter().map(|c| c.2.as_str()).collect();
    let gw = tls_gateway(
        1,
        &format!("certificates = [{}]", list.join(", ")),
        up.addr,
        "",
    );
    let cfg = Arc::new(client_config(roots));
    for (name, der, _) in &certs {
        let mut s = tls_connect(gw.addr("tls"), &format!("{name}.test"), &cfg)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(&leaf(&s), der, "{name}");
        let r = request(&mut s, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(r.status, 200, "{name}");
    }
}

#[test]
fn without_session_tickets_every_handshake_is_full() {
    let ca = Ca::new("test-ca");
    let server = ca.server("api", &["api.test"]);
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = tls_gateway(
        1,
        &format!(
            "certificates = [{}]\nsession_tickets = false",
            pair(&server)
        ),
        up.addr,
        "",
    );
    let cfg = Arc::new(client_config(ca.roots()));
    for _ in 0..3 {
        let mut s = tls_connect(gw.addr("tls"), "api.test", &cfg).unwrap();
        assert_eq!(s.conn.handshake_kind(), Some(rustls::HandshakeKind::Full));
        let r = request(&mut s, "GET / HTTP/1.1\r\nHost: api.test\r\n\r\n");
        assert_eq!(r.status, 200);
    }
}
