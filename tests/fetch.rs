//! The gateway's own requests (`upstream::client::fetch`: JWKS, background revalidation) go
//! through the same pools as proxied ones, and recover the same way from a pooled connection
//! the upstream closed while it was idle.

mod common;
mod jwt_support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::Algorithm;
use jwt_support::{jwks, SigningKey};
use serde_json::json;

/// An identity provider that answers one request per connection with a keep-alive response
/// and then closes the connection, as servers with a short keep-alive timeout do: `first` on
/// the first connection, `later` on the others. Sends on `closed` after each close.
fn closing_idp(
    first: String,
    later: String,
) -> (
    SocketAddr,
    Arc<Mutex<Vec<String>>>,
    crossbeam_channel::Receiver<()>,
) {
    let (listener, addr) = raw_upstream();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (closed_tx, closed) = crossbeam_channel::unbounded();
    let log = Arc::clone(&seen);
    thread::spawn(move || {
        for (n, s) in listener.incoming().enumerate() {
            let Ok(mut s) = s else { break };
            let head = String::from_utf8(read_head(&mut s)).unwrap();
            log.lock()
                .unwrap()
                .push(format!("conn{n}: {}", head.lines().next().unwrap()));
            let body = if n == 0 { &first } else { &later };
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            drop(s);
            let _ = closed_tx.send(());
        }
    });
    (addr, seen, closed)
}

#[test]
fn a_jwks_refetch_on_a_pooled_connection_the_idp_closed_goes_to_a_fresh_one() {
    let (old, new) = (
        SigningKey::new(Algorithm::ES256, "old"),
        SigningKey::new(Algorithm::ES256, "new"),
    );
    let (idp, seen, closed) = closing_idp(jwks(&[&old]), jwks(&[&old, &new]));
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = Gateway::start(&format!(
        r#"
[[auth]]
name = "idp"
type = "jwt"
algorithms = ["ES256"]
jwks = {{ upstream = "idp", path = "/jwks", refresh_s = 3600 }}
[[upstreams]]
name = "idp"
targets = ["{idp}"]
[[upstreams]]
name = "app"
targets = ["{}"]
[[routes]]
name = "orders"
listener = "public"
path_prefix = "/"
upstream = "app"
auth = ["idp"]
[[listeners]]
name = "public"
address = "127.0.0.1:0"
"#,
        up.addr
    ));
    // The fetch at start, on a connection the gateway pools and the provider then closes.
    closed.recv().unwrap();
    // The provider rotated: the new kid asks for a refetch, which meets the closed connection.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = new.sign(&json!({ "sub": "u", "iat": now, "exp": now + 600 }));
    let resp = exchange(
        gw.addr("public"),
        format!("GET /orders HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        *seen.lock().unwrap(),
        ["conn0: GET /jwks HTTP/1.1", "conn1: GET /jwks HTTP/1.1"]
    );
}
