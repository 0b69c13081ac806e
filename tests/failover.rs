//! A target killed under load: health checks, outlier ejection and retries together. The
//! target is a real separate process (Python's http.server), killed with SIGKILL mid-load and
//! started again on the same port: clients see no failure, and the target takes traffic again
//! once its probes pass.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use common::*;

/// Python's http.server serving `dir` on `port`, its request log captured.
fn python_server(dir: &std::path::Path, port: u16) -> (Child, Arc<Mutex<String>>) {
    let mut child = Command::new("python3")
        .args(["-u", "-m", "http.server", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let log = Arc::new(Mutex::new(String::new()));
    let (mut stderr, l) = (child.stderr.take().unwrap(), Arc::clone(&log));
    thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            l.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    eventually("python's server listening", || {
        std::net::TcpStream::connect(addr).ok()
    });
    (child, log)
}

#[test]
fn a_target_killed_mid_load_costs_no_request_and_returns_after_its_probes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data"), "from-b").unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut b, _) = python_server(dir.path(), port);
    let b_addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let a = Upstream::start(|_| Reply::ok("from-a"));
    let resilience = "fail_timeout_ms = 100
[upstreams.health_check]
path = \"/data\"
interval_ms = 50
timeout_ms = 500
healthy_threshold = 2
unhealthy_threshold = 2
[upstreams.outlier]
consecutive_failures = 3
ejection_ms = 200
[upstreams.retries]
attempts = 2
backoff_ms = 5";
    let proxy = proxy_config(&[a.addr, b_addr], resilience, "");
    let gw = Arc::new(Gateway::start(&format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n{proxy}"
    )));
    // Load from the test: requests one after another on new connections, every answer kept.
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    let load = {
        let (gw, stop, answers) = (Arc::clone(&gw), Arc::clone(&stop), Arc::clone(&answers));
        thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let r = get(gw.addr("public"), &format!("/data?n={i}"));
                answers.lock().unwrap().push((r.status, r.text()));
                i += 1;
            }
        })
    };
    let served_by = |who: &str| {
        answers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, body)| body == who)
            .count()
    };
    eventually("both targets serving", || {
        (served_by("from-a") > 20 && served_by("from-b") > 20).then_some(())
    });

    b.kill().unwrap();
    b.wait().unwrap();
    let killed_at = answers.lock().unwrap().len();
    let health = |gw: &Gateway| {
        let status = get(gw.admin.unwrap(), "/status").json();
        status["upstreams"]["app"]["targets"][b_addr.to_string()]["health"].clone()
    };
    eventually("b found unhealthy", || {
        (health(&gw)["healthy"] == false).then_some(())
    });
    // Keep the load on a while with b gone.
    let gone_until = answers.lock().unwrap().len() + 50;
    eventually("load meanwhile", || {
        (answers.lock().unwrap().len() >= gone_until).then_some(())
    });

    // b comes back on the same port: after two good probes it takes traffic again.
    let (mut b, log) = python_server(dir.path(), port);
    let back_from = answers.lock().unwrap().len();
    eventually("b serving again", || {
        let got = answers.lock().unwrap();
        got[back_from..]
            .iter()
            .any(|(_, body)| body == "from-b")
            .then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    assert!(
        log.lock().unwrap().contains("GET /data?n="),
        "the restarted b got real requests"
    );
    let got = answers.lock().unwrap();
    let failed: Vec<_> = got.iter().filter(|(status, _)| *status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed ({} after the kill): {:?}",
        failed.len(),
        got.len(),
        got.len() - killed_at,
        &failed[..failed.len().min(5)]
    );
    b.kill().unwrap();
    let _ = b.wait();
}
