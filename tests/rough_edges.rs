//! What a new user trips over (issue 17), each fixed with a test that failed before: generated
//! 204s without Content-Length, lower-case methods, an admin address that is also a listener's,
//! regex errors that say what is wrong, a mistyped `RINGWAY_LOG`, start-up errors printed once,
//! SIGHUP and SIGUSR1, a prompt shutdown with an access log, and what the access log records.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::process::Command;

use common::*;

const BASE: &str = "[[listeners]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"app\"\ntargets = [\"127.0.0.1:9\"]\n";

#[test]
fn a_generated_204_has_no_content_length_and_keeps_the_connection() {
    let gw = Gateway::start(
        "[[listeners]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n[[routes]]\nname = \"empty\"\nlistener = \"public\"\nrespond = { status = 204 }\n",
    );
    let mut c = ResponseReader::new(connect(gw.addr("public")));
    for _ in 0..2 {
        c.stream
            .write_all(b"GET /anything HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let r = c.read_response(false).expect("a response");
        assert_eq!(r.status, 204);
        assert!(r.header("content-length").is_none(), "{}", r.head);
        assert!(r.header("transfer-encoding").is_none(), "{}", r.head);
    }
}

#[test]
fn standard_methods_in_lower_case_are_a_config_error_with_a_hint() {
    assert_config_error(
        &format!("{BASE}[[routes]]\nname = \"r\"\nlistener = \"public\"\nupstream = \"app\"\nmethods = [\"GET\", \"post\"]\n"),
        ":11:19: routes[0].methods:",
        "methods are case-sensitive; did you mean \"POST\"?",
    );
    // A method that is not a standard one may be in any case.
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &format!("{BASE}[[routes]]\nname = \"r\"\nlistener = \"public\"\nupstream = \"app\"\nmethods = [\"purge\"]\n"),
    );
    let (status, _, stderr) = run_ringway(&["check", "--config", &path]);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn an_admin_address_that_is_a_listeners_names_both() {
    assert_config_error(
        "[admin]\naddress = \"127.0.0.1:18931\"\n[[listeners]]\nname = \"public\"\naddress = \"127.0.0.1:18931\"\n",
        ":2:11: admin.address:",
        "127.0.0.1:18931 is also listener \"public\"'s address (listeners[0].address)",
    );
    assert_config_error(
        "[[listeners]]\nname = \"a\"\naddress = \"0.0.0.0:18932\"\n[[listeners]]\nname = \"b\"\naddress = \"127.0.0.1:18932\"\n",
        ":6:11: listeners[1].address:",
        "127.0.0.1:18932 is also listener \"a\"'s address",
    );
}

#[test]
fn a_bad_path_regex_says_what_is_wrong() {
    assert_config_error(
        &format!("{BASE}[[routes]]\nname = \"r\"\nlistener = \"public\"\nupstream = \"app\"\npath_regex = \"^/v(1|2/\"\n"),
        ":11:14: routes[0].path_regex:",
        "unclosed group",
    );
}

#[test]
fn a_duplicate_key_is_named() {
    assert_config_error(
        &format!("{BASE}[runtime]\nworkers = 1\nworkers = 2\n"),
        ":9:1: runtime.workers:",
        "duplicate key",
    );
}

#[test]
fn a_mistyped_log_filter_is_an_error_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, BASE);
    for spec in ["debg", "info,ringway::proxy=debgu"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ringway"))
            .args(["check", "--config", &path])
            .env("RINGWAY_LOG", spec)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{spec}: {stderr}");
        assert!(stderr.contains("RINGWAY_LOG"), "{stderr}");
    }
    for spec in ["debug", "ringway=debug,info", "ringway::proxy", "WARN"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ringway"))
            .args(["check", "--config", &path])
            .env("RINGWAY_LOG", spec)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{spec}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_start_up_error_is_printed_once() {
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &format!("[[listeners]]\nname = \"public\"\naddress = \"{addr}\"\n"),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ringway"))
        .args(["--config", &path])
        .env("RINGWAY_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches("address in use").count(), 1, "{stderr}");
}

fn logging_gateway(log: &std::path::Path) -> Gateway {
    Gateway::start(&format!(
        "[access_log]\npath = \"{}\"\n[[listeners]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n[[routes]]\nname = \"hello\"\nlistener = \"public\"\nrespond = {{ status = 200, body = \"hi\" }}\n",
        log.display()
    ))
}

fn file_text(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn sighup_is_logged_and_the_gateway_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = logging_gateway(&dir.path().join("access.log"));
    gw.signal(libc::SIGHUP);
    gw.wait_log("the SIGHUP log line", |l| l.contains("SIGHUP"));
    assert_eq!(get(gw.addr("public"), "/after-hup").status, 200);
    assert!(gw.child.try_wait().unwrap().is_none(), "the gateway exited");
}

#[test]
fn sigusr1_reopens_the_access_log_after_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (log, rotated) = (
        dir.path().join("access.log"),
        dir.path().join("access.log.1"),
    );
    let gw = logging_gateway(&log);
    assert_eq!(get(gw.addr("public"), "/before-rotation").status, 200);
    eventually("the first line in the log", || {
        file_text(&log).contains("/before-rotation").then_some(())
    });
    std::fs::rename(&log, &rotated).unwrap();
    gw.signal(libc::SIGUSR1);
    gw.wait_log("the reopen", |l| l.contains("access log reopened"));
    assert_eq!(get(gw.addr("public"), "/after-rotation").status, 200);
    eventually("the next line in the new file", || {
        file_text(&log).contains("/after-rotation").then_some(())
    });
    let old = file_text(&rotated);
    assert!(
        old.contains("/before-rotation") && !old.contains("/after-rotation"),
        "{old}"
    );
}

#[test]
fn shutdown_with_an_access_log_does_not_wait_for_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let mut gw = logging_gateway(&log);
    assert_eq!(get(gw.addr("public"), "/last").status, 200);
    let asked = std::time::Instant::now();
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit().success());
    let took = asked.elapsed();
    // It used to take 2 s whatever was in flight: the writer thread was never told to finish.
    assert!(took < std::time::Duration::from_millis(1500), "{took:?}");
    assert!(
        file_text(&log).contains("/last"),
        "the last line was written"
    );
}

/// The access log's lines after the gateway has stopped (its last lines are written by then).
fn log_after_stop(mut gw: Gateway, path: &std::path::Path) -> Vec<String> {
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit().success());
    file_text(path).lines().map(str::to_owned).collect()
}

#[test]
fn the_access_log_counts_what_was_read_and_writes_dash_for_unknown_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    // Nothing listens behind the upstream: /api/x is a 502.
    let gw = Gateway::start(&format!(
        "[access_log]\npath = \"{}\"\n{}",
        path.display(),
        proxy_config(&[closed_port()], "", "")
            .replace("path_prefix = \"/\"", "path_prefix = \"/api\"")
    ));
    let not_found = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let bad_gateway = b"GET /api/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let malformed = b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n";
    assert_eq!(exchange(gw.addr("public"), not_found).status, 404);
    assert_eq!(exchange(gw.addr("public"), bad_gateway).status, 502);
    assert_eq!(exchange(gw.addr("public"), malformed).status, 400);
    let lines = log_after_stop(gw, &path);
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_status = |s: u64| {
        entries
            .iter()
            .find(|e| e["status"] == s)
            .unwrap_or_else(|| panic!("no {s} in {lines:?}"))
    };
    assert_eq!(by_status(404)["bytes_in"], not_found.len());
    assert_eq!(by_status(502)["bytes_in"], bad_gateway.len());
    let bad = by_status(400);
    assert_eq!(bad["bytes_in"], malformed.len());
    assert_eq!((&bad["method"], &bad["path"]), (&"-".into(), &"-".into()));
    assert_eq!(bad["route"], "");
}

#[test]
fn the_combined_log_writes_dash_for_a_request_line_it_could_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        "[access_log]\npath = \"{}\"\nformat = \"combined\"\n[[listeners]]\nname = \"public\"\naddress = \"127.0.0.1:0\"\n",
        path.display()
    ));
    let resp = exchange(
        gw.addr("public"),
        b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    );
    assert_eq!(resp.status, 400);
    let lines = log_after_stop(gw, &path);
    assert!(lines[0].contains("] \"-\" 400 "), "{lines:?}");
    assert!(lines[0].contains(" route=- "), "{lines:?}");
}

#[test]
fn an_upgraded_tunnel_logs_the_bytes_relayed_each_way() {
    let (listener, addr) = raw_upstream();
    let upstream = std::thread::spawn(move || {
        use std::io::Read;
        let (mut s, _) = listener.accept().unwrap();
        read_head(&mut s);
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
        )
        .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            // Twice what came: the two directions' counts differ.
            s.write_all(&buf[..n]).unwrap();
            s.write_all(&buf[..n]).unwrap();
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        "[access_log]\npath = \"{}\"\n{}",
        path.display(),
        proxy_config(&[addr], "", "")
    ));
    let head = "GET /t HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n";
    let mut conn = ResponseReader::new(connect(gw.addr("public")));
    conn.stream.write_all(head.as_bytes()).unwrap();
    let resp = conn.read_response(false).unwrap();
    assert_eq!(resp.status, 101);
    let (mut s, mut got) = conn.into_parts();
    s.write_all(&[b'a'; 1000]).unwrap();
    while got.len() < 2000 {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    half_close(&s);
    upstream.join().unwrap();
    // The tunnel closes once both ways have; the line is written then.
    eventually("the tunnel to close", || {
        let mut rest = Vec::new();
        use std::io::Read;
        s.read_to_end(&mut rest).ok().map(|_| ())
    });
    let lines = log_after_stop(gw, &path);
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["status"], 101);
    assert_eq!(v["bytes_in"], head.len() + 1000, "{v}");
    assert_eq!(v["bytes_out"], resp.head.len() + 2000, "{v}");
}

#[test]
fn upstream_state_changes_and_failures_are_logged_at_the_default_level() {
    let port = closed_port();
    let gw = Gateway::start(&proxy_config(&[port], "fail_timeout_ms = 100", ""));
    let target = port.to_string();
    assert_eq!(get(gw.addr("public"), "/x").status, 502);
    let down = gw.wait_log("the target-down warning", |l| {
        l.contains("WARN") && l.contains("target down") && l.contains(&target)
    });
    assert!(down.contains("upstream=app"), "{down}");
    gw.wait_log("the failure summary", |l| {
        l.contains("WARN") && l.contains("upstream exchanges failed") && l.contains("upstream=app")
    });
    // The target comes back: the next connect after fail_timeout_ms succeeds and says so.
    let up = Upstream::start_on(port, |_| Reply::ok("back"));
    eventually("a 200 from the returning target", || {
        (get(gw.addr("public"), "/x").status == 200).then_some(())
    });
    gw.wait_log("the target-up line", |l| {
        l.contains("target up again") && l.contains(&target)
    });
    drop(up);
}
