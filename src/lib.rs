//! ringway: a thread-per-core HTTP/1.1 API gateway on monoio (io_uring).
//!
//! The binary is thin (`main.rs`: CLI → `config::load` → `runtime::run`). A request's phases
//! read top to bottom in `proxy::pipeline` (route → filters → terminal → ending). Modules by
//! concern:
//!
//! - `config`: the TOML file, validated into plain data.
//! - `runtime`: threads, core pinning, drivers, SO_REUSEPORT listeners, signals and drain;
//!   `handover`: each worker's own descriptor table, and its sockets sent to it there.
//! - `worker`: what each worker thread owns; `generation`: the swappable request path built
//!   from one config (router, route chains and terminals, upstreams).
//! - `proxy`: the connection (`session`), per-request state (`exchange`), the phases
//!   (`pipeline`), the proxy terminal (`forward`, `response`, `tunnel`), generated answers
//!   (`reply`, `cached`). Generic over the client stream.
//! - `filter`: the per-route filter chain (rate limit, header transforms, cache).
//! - `http`: the HTTP/1.1 codec (parse, framing, chunked, header edits, head writers).
//! - `router`: route selection.
//! - `upstream`: per-worker pools, balancers and passive health; the buffered client.
//! - `body`, `buffer`: streaming bodies through bounded buffers.
//! - `deadline`: coarse per-connection timeouts, woken by the worker's tick.
//! - `cache`: per-worker response caches sharing entries (`bytes::Bytes`) over crossbeam.
//! - `ratelimit`: per-worker token quotas, granted by a sync thread from global buckets.
//! - `metrics`: per-worker recording, merged on the admin thread; Prometheus and JSON.
//! - `access_log`: per-worker buffered access log lines, written by their own thread.
//! - `trace`: W3C trace context; `hash`: stable hashing (a leaf).
//! - `tls`: TLS termination (rustls): certificates, the stream adapter, rotation.
//! - `auth`: consumers and their credentials (the auth filter is in `filter`).
//! - `admin`: the admin listener on its own thread.

pub mod accept;
pub mod access_log;
pub mod admin;
pub mod auth;
pub mod bind;
pub mod body;
pub mod buffer;
pub mod cache;
pub mod cidr;
pub mod config;
pub mod control;
pub mod deadline;
pub mod error;
pub mod filter;
pub mod generation;
pub mod handover;
pub mod hash;
pub mod http;
pub mod keyset;
pub mod metrics;
pub mod pki;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod rng;
pub mod router;
pub mod runtime;
pub mod services;
pub mod stamp;
pub mod startup;
pub mod tls;
pub mod trace;
pub mod upgrade;
pub mod upstream;
pub mod worker;
