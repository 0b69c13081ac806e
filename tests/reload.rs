//! Hot reload: SIGHUP, `POST /config/reload` and `ringway reload`, against the real binary under
//! load from the test: nothing in flight fails, state carried by name survives, listeners come
//! and go, and a config that is invalid or needs a restart changes nothing.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use common::*;

const ADMIN: &str = "[admin]\naddress = \"127.0.0.1:0\"\n[metrics]\ninterval_ms = 50\n";

/// A listener a reload adds to a generation, with a route answering "second" on it.
const SECOND: &str = "\n[[listeners]]\nname = \"second\"\naddress = \"127.0.0.1:0\"\n\n[[routes]]\nname = \"on-second\"\nlistener = \"second\"\npath_prefix = \"/\"\nrespond = { status = 200, body = \"second\" }\n";

/// Generation `i` of a config: a stable proxied route, a route whose answer names `i`, and a
/// route that exists only in this generation.
fn generation(workers: usize, upstream: std::net::SocketAddr, i: usize) -> String {
    format!(
        r#"[runtime]
workers = {workers}
pin_cores = false
{ADMIN}
[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[upstreams]]
name = "app"
targets = ["{upstream}"]

[[routes]]
name = "gen"
listener = "public"
path = "/gen"
respond = {{ status = 200, body = "gen-{i}" }}

[[routes]]
name = "only-{i}"
listener = "public"
path = "/v{i}"
respond = {{ status = 200, body = "v{i}" }}

[[routes]]
name = "stable"
listener = "public"
path_prefix = "/stable"
upstream = "app"
"#
    )
}

#[test]
fn fifty_reloads_under_keep_alive_load_fail_no_request_and_keep_the_pools() {
    let up = Upstream::start(|_| Reply::ok("up"));
    let gw = Gateway::start(&generation(2, up.addr, 0));
    let addr = gw.addr("public");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            thread::spawn(move || {
                // One keep-alive connection for the whole run: any error is a failure.
                let mut c = ResponseReader::new(connect(addr));
                while !stop.load(Ordering::Relaxed) {
                    let sent = c
                        .stream
                        .write_all(b"GET /stable HTTP/1.1\r\nHost: x\r\n\r\n");
                    let good = sent.is_ok()
                        && c.read_response(false)
                            .is_some_and(|r| r.status == 200 && r.text() == "up");
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        c = ResponseReader::new(connect(addr));
                    }
                }
            })
        })
        .collect();
    eventually("load to start", || {
        (ok.load(Ordering::Relaxed) > 100).then_some(())
    });
    for i in 1..=50 {
        gw.rewrite_config(&generation(2, up.addr, i));
        let answer = gw.reload();
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.json()["generation"], i as u64 + 1);
        // The answer comes once every worker has the new config: a request sent now sees it.
        assert_eq!(get(addr, "/gen").text(), format!("gen-{i}"));
        assert_eq!(get(addr, &format!("/v{i}")).text(), format!("v{i}"));
        assert_eq!(get(addr, &format!("/v{}", i - 1)).status, 404);
    }
    let before_stop = ok.load(Ordering::Relaxed);
    eventually("load to go on after the reloads", || {
        (ok.load(Ordering::Relaxed) > before_stop + 100).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed requests");
    assert!(ok.load(Ordering::Relaxed) > 1000);
    assert!(
        up.connections() <= 4,
        "{} upstream connections for 4 clients: pools were not kept",
        up.connections()
    );
    let metrics = get(gw.admin.unwrap(), "/metrics").text();
    assert!(
        metrics.contains("ringway_config_generation 51\n"),
        "{metrics}"
    );
    assert!(metrics.contains("ringway_config_reloads_total{result=\"ok\"} 50\n"));
    // Figures of routes that came and went are kept under their names.
    eventually("the stable route's count", || {
        let m = get(gw.admin.unwrap(), "/metrics").text();
        m.contains("route=\"only-50\"").then_some(())
    });
}

#[test]
fn a_reload_that_keeps_an_upstream_keeps_its_pooled_connection() {
    let up = Upstream::start(|_| Reply::ok("up"));
    let gw = Gateway::start(&generation(1, up.addr, 0));
    let mut c = ResponseReader::new(connect(gw.addr("public")));
    for i in 1..=5 {
        c.stream
            .write_all(b"GET /stable HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert_eq!(c.read_response(false).unwrap().text(), "up");
        gw.rewrite_config(&generation(1, up.addr, i));
        assert_eq!(gw.reload().status, 200);
    }
    assert_eq!(up.count(), 5);
    assert_eq!(
        up.connections(),
        1,
        "one upstream connection, reused across 5 reloads"
    );
}

#[test]
fn an_invalid_or_restart_only_config_changes_nothing() {
    let up = Upstream::start(|_| Reply::ok("up"));
    let gw = Gateway::start(&generation(1, up.addr, 0));
    let addr = gw.addr("public");
    let good = generation(1, up.addr, 1);

    gw.rewrite_config(&format!("{good}\nbroken = \n"));
    let answer = gw.reload();
    assert_eq!(answer.status, 400);
    let error = answer.json();
    assert_eq!(error["result"], "invalid");
    assert!(
        error["error"].as_str().unwrap().contains("ringway.toml:"),
        "{error}"
    );
    assert_eq!(error["line"], good.lines().count() as u64 + 2, "{error}");

    gw.rewrite_config(&good.replace("upstream = \"app\"", "upstream = \"nope\""));
    let error = gw.reload().json();
    assert_eq!(error["key"], "routes[2].upstream", "{error}");
    assert!(error["error"]
        .as_str()
        .unwrap()
        .contains("unknown upstream"));

    gw.rewrite_config(&good.replace("workers = 1", "workers = 2"));
    let answer = gw.reload();
    assert_eq!(answer.status, 409);
    let why = answer.json()["error"].as_str().unwrap().to_owned();
    assert!(
        why.contains("[runtime]") && why.contains("restart"),
        "{why}"
    );

    // SIGHUP with a bad file: logged, and the gateway goes on with generation 0.
    gw.rewrite_config("[[listeners]\n");
    gw.signal(libc::SIGHUP);
    gw.wait_log("the reload error", |l| {
        l.contains("new configuration is invalid")
    });
    assert_eq!(get(addr, "/gen").text(), "gen-0");
    assert_eq!(get(addr, "/v1").status, 404);
    assert_eq!(get(addr, "/stable/x").text(), "up");
    let metrics = get(gw.admin.unwrap(), "/metrics").text();
    for (result, n) in [("ok", 0), ("invalid", 3), ("refused", 1)] {
        let line = format!("ringway_config_reloads_total{{result=\"{result}\"}} {n}\n");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    // And SIGHUP with a good one applies it.
    gw.rewrite_config(&good);
    gw.signal(libc::SIGHUP);
    eventually("SIGHUP's reload", || {
        (get(addr, "/gen").text() == "gen-1").then_some(())
    });
    // A worker serves the new config as soon as it has applied it; the main thread records
    // the generation once every worker has, so /status may lag /gen by a moment.
    let status = eventually("the status's generation 2", || {
        let status = get(gw.admin.unwrap(), "/status").json();
        (status["config"]["generation"] == 2).then_some(status)
    });
    assert_eq!(status["config"]["digest"].as_str().unwrap().len(), 64);
}

#[test]
fn a_websocket_tunnel_opened_before_ten_reloads_still_echoes_after_them() {
    let (upstream, echo) = upgrading_echo();
    let gw = Gateway::start(&generation(1, upstream, 0));
    let mut conn = ResponseReader::new(connect(gw.addr("public")));
    conn.stream
        .write_all(
            b"GET /stable/chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        )
        .unwrap();
    assert_eq!(conn.read_response(false).unwrap().status, 101);
    let (mut s, _) = conn.into_parts();
    let mut echoes = |word: &str| {
        s.write_all(word.as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < word.len() {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the tunnel closed");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, word.to_ascii_uppercase().as_bytes());
    };
    echoes("before");
    for i in 1..=10 {
        gw.rewrite_config(&generation(1, upstream, i));
        assert_eq!(gw.reload().status, 200);
        echoes(&format!("after{i}"));
    }
    half_close(&s);
    echo.join().unwrap();
}

#[test]
fn listeners_are_added_and_removed_and_a_removed_ones_connections_close_after_their_request() {
    let up = Upstream::start(|_| Reply::ok("up"));
    let base = generation(1, up.addr, 0);
    let gw = Gateway::start(&base);
    gw.rewrite_config(&format!("{base}{SECOND}"));
    assert_eq!(gw.reload().status, 200);
    let addr = gw.added_listener("second");
    assert_eq!(get(addr, "/x").text(), "second");
    assert_eq!(get(gw.addr("public"), "/stable").text(), "up");
    assert_eq!(
        get(gw.addr("public"), "/x").status,
        404,
        "routes stay on their listener"
    );

    let mut kept = ResponseReader::new(connect(addr));
    kept.stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(kept.read_response(false).unwrap().text(), "second");

    gw.rewrite_config(&base);
    assert_eq!(gw.reload().status, 200);
    // New connections are refused at once; the open one gets its next answer, then closes.
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still accepting"
    );
    kept.stream
        .write_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let last = kept.read_response(false).unwrap();
    assert_eq!(last.text(), "second");
    assert_eq!(last.header("connection"), Some("close"));
    assert!(kept.is_closed());
    assert_eq!(get(gw.addr("public"), "/stable").text(), "up");
}

#[test]
fn rate_limit_buckets_the_cache_and_health_survive_a_reload() {
    let hits = Arc::new(AtomicU64::new(0));
    let counted = hits.clone();
    let cached = Upstream::start(move |_| {
        counted.fetch_add(1, Ordering::Relaxed);
        Reply::ok("fresh").header("cache-control", "max-age=60")
    });
    let sick =
        Upstream::start(|r| Reply::ok("sick").status(if r.path == "/healthz" { 500 } else { 200 }));
    let healthy = Upstream::start(|_| Reply::ok("healthy"));
    let config = |i: usize| {
        format!(
            r#"[runtime]
workers = 1
pin_cores = false
{ADMIN}
[cache]
max_bytes = 1048576

[[rate_limits]]
name = "tight"
key = "route"
rate = 0.001
burst = 2

[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[upstreams]]
name = "cached"
targets = ["{}"]

[[upstreams]]
name = "pair"
targets = ["{}", "{}"]
[upstreams.health_check]
path = "/healthz"
interval_ms = 50
unhealthy_threshold = 1

[[routes]]
name = "limited"
listener = "public"
path = "/limited"
rate_limits = ["tight"]
respond = {{ status = 200, body = "ok" }}

[[routes]]
name = "cached"
listener = "public"
path = "/cached"
upstream = "cached"
cache = {{}}

[[routes]]
name = "pair"
listener = "public"
path = "/pair"
upstream = "pair"

[[routes]]
name = "gen-{i}"
listener = "public"
path = "/gen"
respond = {{ status = 200, body = "gen-{i}" }}
"#,
            cached.addr, healthy.addr, sick.addr
        )
    };
    let gw = Gateway::start(&config(0));
    let addr = gw.addr("public");
    assert_eq!(get(addr, "/limited").status, 200);
    assert_eq!(get(addr, "/limited").status, 200);
    assert_eq!(get(addr, "/cached").text(), "fresh");
    eventually("the probe to mark the sick target", || {
        let s = get(gw.admin.unwrap(), "/status").json();
        (s["upstreams"]["pair"]["targets"][sick.addr.to_string()]["health"]["healthy"] == false)
            .then_some(())
    });

    gw.rewrite_config(&config(1));
    assert_eq!(gw.reload().status, 200);
    assert_eq!(get(addr, "/gen").text(), "gen-1");
    assert_eq!(
        get(addr, "/limited").status,
        429,
        "the bucket kept its tokens spent"
    );
    assert_eq!(get(addr, "/cached").text(), "fresh");
    assert_eq!(hits.load(Ordering::Relaxed), 1, "the cached entry served");
    for _ in 0..20 {
        assert_ne!(
            get(addr, "/pair").text(),
            "sick",
            "the unhealthy target stays out"
        );
    }
}

#[test]
fn ringway_reload_asks_the_running_gateway() {
    let up = Upstream::start(|_| Reply::ok("up"));
    let gw = Gateway::start(&generation(1, up.addr, 0));
    let admin = gw.admin.unwrap().to_string();
    let path = gw.config_path.to_str().unwrap().to_owned();
    gw.rewrite_config(&generation(1, up.addr, 7));
    let (status, stdout, stderr) = run_ringway(&["reload", "--config", &path, "--admin", &admin]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("\"reloaded\":true"), "{stdout}");
    assert_eq!(get(gw.addr("public"), "/gen").text(), "gen-7");

    gw.rewrite_config("[[listeners]]\nname = 1\n");
    let (status, stdout, _) = run_ringway(&["reload", "--config", &path, "--admin", &admin]);
    assert_eq!(status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("\"result\":\"invalid\""), "{stdout}");
    assert_eq!(get(gw.addr("public"), "/gen").text(), "gen-7");

    // Without --admin, the config's admin address is used; a config without one is an error.
    let dir = tempfile::tempdir().unwrap();
    let lone = write_config(
        &dir,
        "[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:0\"\n",
    );
    let (status, _, stderr) = run_ringway(&["reload", "--config", &lone]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("no `admin` address"), "{stderr}");
}

#[test]
fn a_removed_upstreams_pooled_connection_is_closed() {
    let (listener, extra) = raw_upstream();
    let served = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        read_head(&mut s);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")
            .unwrap();
        // Pooled by the gateway; the reload that removes the upstream must close it.
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 64];
        s.read(&mut buf).map(|n| n == 0).unwrap_or(false)
    });
    let up = Upstream::start(|_| Reply::ok("up"));
    let base = generation(1, up.addr, 0);
    let with_extra = format!(
        "{base}\n[[upstreams]]\nname = \"extra\"\ntargets = [\"{extra}\"]\n\n[[routes]]\nname = \"extra\"\nlistener = \"public\"\npath = \"/extra\"\nupstream = \"extra\"\n"
    );
    let gw = Gateway::start(&with_extra);
    assert_eq!(get(gw.addr("public"), "/extra").text(), "extra");
    gw.rewrite_config(&base);
    assert_eq!(gw.reload().status, 200);
    assert_eq!(get(gw.addr("public"), "/extra").status, 404);
    assert!(served.join().unwrap(), "the pooled connection was closed");
}

/// Inodes of the sockets listening on `port` (/proc/net/tcp: local HEX_IP:HEX_PORT, state 0A
/// is LISTEN, column 10 the inode).
fn listening_inodes(port: u16) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|c| c[3] == "0A" && c[1].ends_with(&format!(":{port:04X}")))
        .map(|c| c[9].to_string())
        .collect()
}

/// The socket inodes in the descriptor table of thread `comm` of process `pid`.
fn thread_sockets(pid: i32, comm: &str) -> Vec<String> {
    let task = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| t.path())
        .find(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == comm))
        .unwrap_or_else(|| panic!("no thread {comm}"));
    std::fs::read_dir(task.join("fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(String::from)
        })
        .collect()
}

#[test]
fn each_worker_holds_only_its_own_listening_sockets_in_its_own_table_before_and_after_a_reload() {
    let up = Upstream::start(|_| Reply::ok("up"));
    let base = generation(2, up.addr, 0);
    let gw = Gateway::start(&base);
    gw.rewrite_config(&format!("{base}{SECOND}"));
    assert_eq!(gw.reload().status, 200);
    let added = gw.added_listener("second");
    for _ in 0..10 {
        assert_eq!(get(added, "/x").text(), "second");
    }
    let admin = listening_inodes(gw.admin.expect("admin").port());
    assert_eq!(admin.len(), 1);
    for port in [gw.addr("public").port(), added.port()] {
        let group = listening_inodes(port);
        assert_eq!(group.len(), 2, "one socket per worker on {port}");
        let held: Vec<Vec<String>> = (0..2)
            .map(|w| {
                let sockets = thread_sockets(gw.pid(), &format!("ringway-w{w}"));
                assert!(
                    !sockets.contains(&admin[0]),
                    "worker {w} holds the admin socket"
                );
                group
                    .iter()
                    .filter(|s| sockets.contains(s))
                    .cloned()
                    .collect()
            })
            .collect();
        assert_eq!(
            held[0].len(),
            1,
            "worker 0 holds {:?} of {group:?}",
            held[0]
        );
        assert_eq!(
            held[1].len(),
            1,
            "worker 1 holds {:?} of {group:?}",
            held[1]
        );
        assert_ne!(held[0], held[1]);
    }
}
