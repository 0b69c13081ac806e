//! Slow and stalled peers: a slowloris client, a stalled request body, an idle keep-alive
//! connection and a client that stops reading are each cut off after their timeout, and none of
//! them keeps an upstream connection.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn gateway(up_addr: std::net::SocketAddr, limits: &str) -> Gateway {
    Gateway::start_with_env(
        &format!(
            "[runtime]\nworkers = 1\npin_cores = false\n[limits]\n{limits}\n{}",
            proxy_config(&[up_addr], "", "")
        ),
        &[("RINGWAY_LOG", "debug")],
    )
}

#[test]
fn slowloris_client_gets_408_and_is_closed() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = gateway(up.addr, "header_read_timeout_ms = 400");
    let stream = connect(gw.addr("public"));
    let mut writer = stream.try_clone().unwrap();
    let started = Instant::now();
    // One header byte every 50 ms: never a complete head.
    let dribble = thread::spawn(move || {
        for b in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .chain([b'a'; 1000].iter())
        {
            if writer.write_all(&[*b]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    let mut conn = ResponseReader::new(stream);
    let resp = conn.read_response(false).expect("a 408");
    let took = started.elapsed();
    assert_eq!(resp.status, 408);
    assert!(
        took >= Duration::from_millis(350),
        "408 after only {took:?}"
    );
    assert!(took < Duration::from_secs(5), "408 after {took:?}");
    assert!(conn.is_closed());
    dribble.join().unwrap();
    assert!(up.raw().is_empty());
    gw.wait_log("the rejection", |l| l.contains("reason=\"head_timeout\""));
}

#[test]
fn a_silent_new_connection_is_closed_without_a_response() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = gateway(up.addr, "header_read_timeout_ms = 300");
    let mut s = connect(gw.addr("public"));
    let started = Instant::now();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[test]
fn idle_keep_alive_connection_is_closed_after_keepalive_timeout() {
    let up = Upstream::start(|_| Reply::ok("ok"));
    let gw = gateway(up.addr, "keepalive_timeout_ms = 300");
    let mut conn = ResponseReader::new(connect(gw.addr("public")));
    conn.stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(conn.read_response(false).unwrap().status, 200);
    let idle_from = Instant::now();
    assert!(conn.is_closed());
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(250) && idle < Duration::from_secs(5),
        "{idle:?}"
    );
}

#[test]
fn stalled_request_body_gets_408_and_the_upstream_connection_is_dropped() {
    let (listener, addr) = raw_upstream();
    let upstream = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    });
    let gw = gateway(addr, "body_read_timeout_ms = 300");
    let mut conn = ResponseReader::new(connect(gw.addr("public")));
    conn.stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .unwrap();
    let resp = conn.read_response(false).expect("a 408");
    assert_eq!(resp.status, 408);
    assert!(conn.is_closed());
    // The upstream got the head and the three bytes, then its connection was closed.
    let got = String::from_utf8(upstream.join().unwrap()).unwrap();
    assert!(got.starts_with("POST /upload HTTP/1.1\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\nabc"), "{got}");
    gw.wait_log("the rejection", |l| l.contains("reason=\"body_timeout\""));
}

#[test]
fn a_client_that_stops_reading_is_dropped_and_the_upstream_released() {
    let (listener, addr) = raw_upstream();
    let upstream = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_head(&mut s);
        let total: usize = 256 << 20;
        s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n").as_bytes())
            .unwrap();
        let chunk = vec![b'z'; 1 << 16];
        let mut sent = 0;
        // Until the gateway closes this connection.
        while sent < total {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => return sent,
            }
        }
        sent
    });
    let gw = gateway(addr, "write_timeout_ms = 300");
    let mut client = TcpStream::connect(gw.addr("public")).unwrap();
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // ... and never reads. The upstream finds its connection closed long before 256 MiB.
    let sent = upstream.join().unwrap();
    assert!(
        sent < 256 << 20,
        "the upstream connection was held until the end"
    );
    drop(client);
}
