//! A real nginx as an upstream: the normalizing server the path tests hold the gateway against.
//! Started in the foreground on a free loopback port with everything in a temporary directory,
//! stopped when dropped. `.ci/run` installs it (Debian's nginx-light).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::eventually;

pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `server` (the directives inside its one `server` block, after
    /// `listen`), and waits until it accepts connections.
    pub fn start(server: &str) -> Nginx {
        let bin = [
            "/usr/sbin/nginx",
            "/usr/local/sbin/nginx",
            "/usr/local/nginx/sbin/nginx",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nginx is needed for this test: apt-get install nginx-light (.ci/run does)");
        // nginx cannot report a port it picked: take a free one and hand it over. Another
        // process taking it in between makes nginx fail to start, and the test says so.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{ worker_connections 64; }}\nhttp {{\n\
             access_log off;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
             default_type text/plain;\nserver {{\nlisten 127.0.0.1:{port};\n{server}\n}}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("write nginx.conf");
        let mut child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually("nginx to accept connections", || {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                panic!("nginx exited ({status}): {log}");
            }
            TcpStream::connect_timeout(&addr, Duration::from_millis(100))
                .ok()
                .map(|_| ())
        });
        Nginx {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
