//! The pipeline driven in-process through ringway's library: over an in-memory stream pair (no
//! client socket at all), which shows the connection path is generic over its stream; and the
//! per-worker generation swap, which must keep pooled upstream connections.

mod common;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent, Split,
};
use monoio::BufResult;
use ringway::config::{self, Config, ListenerId};
use ringway::generation::Generation;
use ringway::worker::Worker;

use common::{Reply, Upstream};

/// One direction of an in-memory connection.
#[derive(Default)]
struct Pipe {
    data: VecDeque<u8>,
    closed: bool,
    reader: Option<Waker>,
}

/// One end of an in-memory connection: reads from one pipe, writes to the other.
struct MemStream {
    rx: Rc<RefCell<Pipe>>,
    tx: Rc<RefCell<Pipe>>,
}

fn mem_pair() -> (MemStream, MemStream) {
    let (a, b) = (Rc::default(), Rc::default());
    (
        MemStream {
            rx: Rc::clone(&a),
            tx: Rc::clone(&b),
        },
        MemStream { rx: b, tx: a },
    )
}

// SAFETY: the read half touches only `rx` and the write half only `tx`, so reads and writes
// may run concurrently, as `Split` requires.
unsafe impl Split for MemStream {}

impl AsyncReadRent for MemStream {
    fn read<T: IoBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        let rx = Rc::clone(&self.rx);
        let mut buf = Some(buf);
        std::future::poll_fn(move |cx| {
            let mut pipe = rx.borrow_mut();
            if pipe.data.is_empty() && !pipe.closed {
                pipe.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let mut b = buf.take().expect("polled after completion");
            let n = pipe.data.len().min(b.bytes_total());
            for (i, byte) in pipe.data.drain(..n).enumerate() {
                // SAFETY: i < n <= bytes_total(), the buffer's writable length.
                unsafe { b.write_ptr().add(i).write(byte) };
            }
            // SAFETY: the first n bytes were just written.
            unsafe { b.set_init(n) };
            Poll::Ready((Ok(n), b))
        })
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        (Err(std::io::ErrorKind::Unsupported.into()), buf)
    }
}

impl CancelableAsyncReadRent for MemStream {
    /// The in-memory read cannot be cancelled (monoio keeps cancellation state private); the
    /// pipeline cancels reads only for tunnels and lingering, which these tests do not reach.
    fn cancelable_read<T: IoBufMut>(
        &mut self,
        buf: T,
        _c: CancelHandle,
    ) -> impl Future<Output = BufResult<usize, T>> {
        self.read(buf)
    }

    async fn cancelable_readv<T: IoVecBufMut>(
        &mut self,
        buf: T,
        _c: CancelHandle,
    ) -> BufResult<usize, T> {
        (Err(std::io::ErrorKind::Unsupported.into()), buf)
    }
}

impl AsyncWriteRent for MemStream {
    fn write<T: IoBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        let mut pipe = self.tx.borrow_mut();
        // SAFETY: read_ptr() is valid for bytes_init() bytes.
        let bytes = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
        let result = if pipe.closed {
            Err(std::io::ErrorKind::BrokenPipe.into())
        } else {
            pipe.data.extend(bytes);
            if let Some(w) = pipe.reader.take() {
                w.wake();
            }
            Ok(bytes.len())
        };
        async move { (result, buf) }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        (Err(std::io::ErrorKind::Unsupported.into()), buf)
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    /// Closes the write direction at once: monoio's write half calls this on drop without
    /// polling the future.
    fn shutdown(&mut self) -> impl Future<Output = std::io::Result<()>> {
        let mut pipe = self.tx.borrow_mut();
        pipe.closed = true;
        if let Some(w) = pipe.reader.take() {
            w.wake();
        }
        async { Ok(()) }
    }
}

fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("a runtime")
}

fn parse(toml: &str) -> Config {
    config::parse(Path::new("test.toml"), toml).expect("a valid config")
}

const PEER: &str = "192.0.2.7:40000";

/// Sends `requests` on a new in-memory connection served by `worker`, then reads until the
/// gateway closes it (the last request should say `Connection: close`).
async fn converse(worker: &Rc<Worker>, requests: &str) -> String {
    let (mut client, server) = mem_pair();
    let peer: SocketAddr = PEER.parse().unwrap();
    let served = monoio::spawn(ringway::proxy::serve(
        server,
        peer,
        ListenerId(0),
        Rc::clone(worker),
    ));
    let (res, _) = client.write_all(requests.as_bytes().to_vec()).await;
    res.expect("write to the in-memory stream");
    let mut got = Vec::new();
    loop {
        let (res, buf) = client.read(Vec::with_capacity(4096)).await;
        match res.expect("read from the in-memory stream") {
            0 => break,
            _ => got.extend_from_slice(&buf),
        }
    }
    // The client closes its side too, as a client does after a `Connection: close` response.
    client.shutdown().await.expect("close");
    served.await;
    String::from_utf8(got).expect("text")
}

#[test]
fn the_pipeline_runs_over_an_in_memory_stream() {
    let config = Arc::new(parse(
        r#"
[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[routes]]
name = "hello"
listener = "public"
path = "/hello"
respond = { status = 200, body = "hi", headers = { "content-type" = "text/plain" } }
response_headers = { set = { "x-client" = "${client_ip}" }, remove = ["content-type"] }
"#,
    ));
    runtime().block_on(async {
        let worker = Rc::new(Worker::new(0, &config, None, None));
        let text = converse(
            &worker,
            "GET /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /missing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        let (first, second) = text.split_once("HTTP/1.1 404").expect("two responses");
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(first.contains("\r\nx-client: 192.0.2.7\r\n"), "{text}");
        assert!(!first.to_ascii_lowercase().contains("content-type"), "{text}");
        assert!(first.ends_with("\r\n\r\nhi"), "{text}");
        assert!(second.contains("\"error\":\"no route\""), "{text}");
        assert!(!second.contains("x-client"), "{text}");
    });
}

fn proxied(upstream: SocketAddr) -> Config {
    parse(&format!(
        r#"
[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[upstreams]]
name = "app"
targets = ["{upstream}"]

[[routes]]
name = "all"
listener = "public"
upstream = "app"
"#
    ))
}

const ONE_REQUEST: &str = "GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";

#[test]
fn installing_a_generation_built_from_the_previous_keeps_pooled_connections() {
    let up = Upstream::start(|req| Reply::ok(&req.path));
    let config = Arc::new(proxied(up.addr));
    runtime().block_on(async {
        let worker = Rc::new(Worker::new(0, &config, None, None));
        let before = worker.generation();
        assert!(converse(&worker, ONE_REQUEST).await.ends_with("\r\n\r\n/x"));
        assert_eq!(before.upstreams[0].idle_connections(), 1);

        worker.install(Generation::build(&config, Some(&before)));
        let after = worker.generation();
        assert_eq!((before.id, after.id), (1, 2));
        assert!(Rc::ptr_eq(
            &before.upstreams[0].targets[0],
            &after.upstreams[0].targets[0]
        ));
        assert!(converse(&worker, ONE_REQUEST).await.ends_with("\r\n\r\n/x"));
        assert_eq!(up.wait_for(2).len(), 2);
        assert_eq!(
            up.connections(),
            1,
            "the second request reused the pooled connection"
        );

        // A generation built from nothing has pools of its own: the next request connects.
        worker.install(Generation::build(&config, None));
        assert!(converse(&worker, ONE_REQUEST).await.ends_with("\r\n\r\n/x"));
        assert_eq!(up.wait_for(3).len(), 3);
        assert_eq!(up.connections(), 2);
    });
}

#[test]
fn a_request_keeps_the_generation_it_started_on() {
    let up = Upstream::start(|req| Reply::ok(&req.path));
    let config = Arc::new(proxied(up.addr));
    runtime().block_on(async {
        let worker = Rc::new(Worker::new(0, &config, None, None));
        let first = worker.generation();
        let (mut client, server) = mem_pair();
        let served = monoio::spawn(ringway::proxy::serve(
            server,
            PEER.parse().unwrap(),
            ListenerId(0),
            Rc::clone(&worker),
        ));
        // The connection is open (no request yet) while a new generation is installed: its
        // next request runs on the new one, and the old one is released once nothing holds it.
        worker.install(Generation::build(&config, Some(&first)));
        let (res, _) = client.write_all(ONE_REQUEST.as_bytes().to_vec()).await;
        res.unwrap();
        let mut got = Vec::new();
        loop {
            let (res, buf) = client.read(Vec::with_capacity(4096)).await;
            match res.unwrap() {
                0 => break,
                _ => got.extend_from_slice(&buf),
            }
        }
        client.shutdown().await.unwrap();
        served.await;
        assert!(String::from_utf8(got).unwrap().ends_with("\r\n\r\n/x"));
        assert_eq!(
            Rc::strong_count(&first),
            2,
            "only this test and the worker's list of retired generations hold the first"
        );
        drop(worker.snapshot(std::time::Duration::from_secs(1)));
        let gen = Rc::downgrade(&first);
        drop(first);
        drop(worker.snapshot(std::time::Duration::from_secs(1)));
        assert!(
            gen.upgrade().is_none(),
            "a snapshot let the retired generation go"
        );
    });
}
