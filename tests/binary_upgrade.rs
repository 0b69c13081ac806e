//! Binary upgrade (`[runtime] upgrade_socket`, `ringway --upgrade`): a second process takes the
//! listening sockets over while the test opens new connections every few milliseconds; no
//! connection is refused and no request fails, and a successor that cannot start changes
//! nothing.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;

fn config(workers: usize, body: &str, extra: &str) -> String {
    format!(
        r#"[runtime]
workers = {workers}
pin_cores = false
upgrade_socket = "ringway.sock"
drain_timeout_ms = 2000
[admin]
address = "127.0.0.1:0"

[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[routes]]
name = "who"
listener = "public"
path = "/who"
respond = {{ status = 200, body = "{body}" }}
{extra}"#
    )
}

/// Clients that each open a new connection every 2 ms for one request, recording every body
/// and counting anything but a 200 (a refused connect included) as a failure.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    bodies: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..3)
            .map(|_| {
                let (stop, failed, bodies) = (stop.clone(), failed.clone(), bodies.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let answer = std::net::TcpStream::connect(addr).ok().and_then(|mut s| {
                            s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
                            s.write_all(
                                b"GET /who HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                            )
                            .ok()?;
                            ResponseReader::new(s).read_response(false)
                        });
                        match answer {
                            Some(r) if r.status == 200 => bodies.lock().unwrap().push(r.text()),
                            _ => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        Load {
            stop,
            failed,
            bodies,
            threads,
        }
    }

    fn served(&self, body: &str) -> usize {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .filter(|b| *b == body)
            .count()
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let bodies = self.bodies.lock().unwrap().clone();
        (self.failed.load(Ordering::Relaxed), bodies)
    }
}

#[test]
fn a_successor_takes_over_under_load_without_a_refused_connection() {
    let mut old = Gateway::start(&config(2, "old", ""));
    let addr = old.addr("public");
    old.wait_log("the upgrade socket", |l| {
        l.contains("upgrade socket listening")
    });
    let socket = old.config_path.with_file_name("ringway.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "only the owner may take the sockets");
    let load = Load::start(addr);
    eventually("load on the old process", || {
        (load.served("old") > 50).then_some(())
    });

    // One worker fewer: a change only an upgrade can make.
    let new = old.spawn_successor(&config(1, "new", "")).wait_serving();
    assert_eq!(new.addr("public"), addr, "the same socket");
    new.wait_log("the handover", |l| {
        l.contains("took over from the previous process")
    });
    assert!(
        old.wait_exit().success(),
        "the old process drained and exited"
    );
    let at_exit = load.served("new");
    eventually("load on the new process", || {
        (load.served("new") > at_exit + 100).then_some(())
    });
    let (failed, bodies) = load.finish();
    assert_eq!(failed, 0, "refused or failed requests");
    let first_new = bodies.iter().position(|b| b == "new").unwrap();
    assert!(bodies[first_new..].len() > 100);
    assert!(old
        .logs()
        .iter()
        .any(|l| l.contains("the new process serves")));
    // The successor has the admin socket too, and answers for the config it loaded.
    let status = get(new.admin.unwrap(), "/status").json();
    assert_eq!(status["workers"].as_array().unwrap().len(), 1);

    // And it can be upgraded in turn.
    let mut new = new;
    let newer = new.spawn_successor(&config(1, "newer", "")).wait_serving();
    assert!(new.wait_exit().success());
    assert_eq!(get(newer.addr("public"), "/who").text(), "newer");
}

#[test]
fn a_successor_that_cannot_start_leaves_the_old_process_serving() {
    let old = Gateway::start(&config(1, "old", ""));
    let addr = old.addr("public");

    // An invalid config: refused before the old process is even asked.
    let mut bad = old.spawn_successor("[runtime]\nworkers = \"many\"\n");
    assert_eq!(bad.wait_exit().code(), Some(2));

    // A valid config the successor cannot serve (a listener on an address in use): it has the
    // sockets already, and fails before saying ready.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra = format!(
        "\n[[listeners]]\nname = \"second\"\naddress = \"{}\"\n",
        taken.local_addr().unwrap()
    );
    let load = Load::start(addr);
    let mut failing = old.spawn_successor(&config(1, "new", &extra));
    assert_eq!(failing.wait_exit().code(), Some(1));
    old.wait_log("the abandoned upgrade", |l| l.contains("upgrade abandoned"));
    let before = load.served("old");
    eventually("the old process serving on", || {
        (load.served("old") > before + 50).then_some(())
    });
    let (failed, bodies) = load.finish();
    assert_eq!(failed, 0);
    assert!(bodies.iter().all(|b| b == "old"));
    assert_eq!(get(old.admin.unwrap(), "/readyz").status, 200);

    // Without an upgrade socket configured, or with nobody serving on it: clear errors.
    let dir = tempfile::tempdir().unwrap();
    let lone = write_config(&dir, &config(1, "x", "").replace("upgrade_socket", "# "));
    let (status, _, stderr) = run_ringway(&["--config", &lone, "--upgrade"]);
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains("--upgrade needs [runtime] upgrade_socket"),
        "{stderr}"
    );
    let nobody = write_config(&dir, &config(1, "x", ""));
    let (status, _, stderr) = run_ringway(&["--config", &nobody, "--upgrade"]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("no running ringway answers at upgrade_socket"),
        "{stderr}"
    );
}
