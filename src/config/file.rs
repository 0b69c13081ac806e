//! The TOML file as serde sees it. Every table denies unknown keys, and every value that later
//! validation may reject is `Spanned`, so that its error can name the file, line, column and key.
//! Nothing here is used after start-up: `config::validate` turns it into the checked `Config`.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use crate::http::ParseLimits;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub runtime: RuntimeFile,
    pub admin: Option<AdminFile>,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub metrics: MetricsFile,
    pub access_log: Option<AccessLogFile>,
    pub cache: Option<CacheFile>,
    #[serde(default)]
    pub listeners: Vec<ListenerFile>,
    #[serde(default)]
    pub upstreams: Vec<UpstreamFile>,
    #[serde(default)]
    pub routes: Vec<RouteFile>,
    #[serde(default)]
    pub rate_limits: Vec<RateLimitFile>,
    pub clients: Option<ClientsFile>,
    #[serde(default)]
    pub consumers: Vec<super::auth::ConsumerFile>,
    #[serde(default)]
    pub auth: Vec<super::auth::AuthFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeFile {
    #[serde(default = "d_workers")]
    pub workers: Spanned<Workers>,
    #[serde(default = "d_pin_cores")]
    pub pin_cores: Spanned<PinCores>,
    #[serde(default)]
    pub driver: DriverChoice,
    #[serde(default = "default_ring_entries")]
    pub ring_entries: Spanned<u32>,
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// A Unix socket through which `ringway --upgrade` takes over the listening sockets.
    #[serde(default)]
    pub upgrade_socket: Option<Spanned<String>>,
}

impl Default for RuntimeFile {
    fn default() -> Self {
        RuntimeFile {
            workers: d_workers(),
            pin_cores: d_pin_cores(),
            driver: DriverChoice::Auto,
            ring_entries: default_ring_entries(),
            drain_timeout_ms: default_drain_timeout_ms(),
            upgrade_socket: None,
        }
    }
}

fn d_workers() -> Spanned<Workers> {
    Spanned::new(0..0, Workers::Auto)
}
fn d_pin_cores() -> Spanned<PinCores> {
    Spanned::new(0..0, PinCores::All(true))
}
fn default_ring_entries() -> Spanned<u32> {
    Spanned::new(0..0, 4096)
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}

/// `workers = "auto"` or a positive count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Workers {
    #[default]
    Auto,
    Count(usize),
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Workers;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"auto\" or a number of workers from 1 to 1024")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Workers, E> {
                if s == "auto" {
                    Ok(Workers::Auto)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(s), &self))
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Workers, E> {
                match usize::try_from(n) {
                    Ok(n @ 1..=1024) => Ok(Workers::Count(n)),
                    _ => Err(E::invalid_value(de::Unexpected::Signed(n), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `pin_cores = true | false | [core, ...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinCores {
    All(bool),
    List(Vec<usize>),
}

impl Default for PinCores {
    fn default() -> Self {
        PinCores::All(true)
    }
}

impl<'de> Deserialize<'de> for PinCores {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PinCores;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false, or a list of core ids such as [0, 1]")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<PinCores, E> {
                Ok(PinCores::All(b))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PinCores, A::Error> {
                let mut cores = Vec::new();
                while let Some(core) = seq.next_element::<usize>()? {
                    cores.push(core);
                }
                Ok(PinCores::List(cores))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverChoice {
    /// io_uring, falling back to epoll with a warning when the kernel refuses io_uring.
    #[default]
    Auto,
    IoUring,
    Legacy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub address: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    #[serde(default = "d_request_line")]
    pub max_request_line_bytes: Spanned<usize>,
    #[serde(default = "d_header_bytes")]
    pub max_header_bytes: Spanned<usize>,
    #[serde(default = "d_headers")]
    pub max_headers: Spanned<usize>,
    #[serde(default = "d_chunk_ext")]
    pub max_chunk_extension_bytes: Spanned<usize>,
    #[serde(default = "d_trailers")]
    pub max_trailer_bytes: Spanned<usize>,
    #[serde(default = "d_max_connections")]
    pub max_connections: Spanned<usize>,
    #[serde(default = "d_header_read_timeout")]
    pub header_read_timeout_ms: Spanned<u64>,
    #[serde(default = "d_body_read_timeout")]
    pub body_read_timeout_ms: Spanned<u64>,
    #[serde(default = "d_keepalive_timeout")]
    pub keepalive_timeout_ms: Spanned<u64>,
    #[serde(default = "d_write_timeout")]
    pub write_timeout_ms: Spanned<u64>,
    #[serde(default = "d_tunnel_idle_timeout")]
    pub tunnel_idle_timeout_ms: Spanned<u64>,
    #[serde(default)]
    pub encoded_slashes: EncodedSlashesChoice,
}

/// `encoded_slashes`: what `%2F` and `%5C` in a request path do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodedSlashesChoice {
    #[default]
    Reject,
    Keep,
    Decode,
}

impl Default for LimitsFile {
    fn default() -> Self {
        LimitsFile {
            max_request_line_bytes: d_request_line(),
            max_header_bytes: d_header_bytes(),
            max_headers: d_headers(),
            max_chunk_extension_bytes: d_chunk_ext(),
            max_trailer_bytes: d_trailers(),
            max_connections: d_max_connections(),
            header_read_timeout_ms: d_header_read_timeout(),
            body_read_timeout_ms: d_body_read_timeout(),
            keepalive_timeout_ms: d_keepalive_timeout(),
            write_timeout_ms: d_write_timeout(),
            tunnel_idle_timeout_ms: d_tunnel_idle_timeout(),
            encoded_slashes: EncodedSlashesChoice::Reject,
        }
    }
}

fn d_request_line() -> Spanned<usize> {
    Spanned::new(0..0, ParseLimits::DEFAULT.max_request_line_bytes)
}
fn d_header_bytes() -> Spanned<usize> {
    Spanned::new(0..0, ParseLimits::DEFAULT.max_header_bytes)
}
fn d_headers() -> Spanned<usize> {
    Spanned::new(0..0, ParseLimits::DEFAULT.max_headers)
}
fn d_chunk_ext() -> Spanned<usize> {
    Spanned::new(0..0, ParseLimits::DEFAULT.max_chunk_extension_bytes)
}
fn d_trailers() -> Spanned<usize> {
    Spanned::new(0..0, ParseLimits::DEFAULT.max_trailer_bytes)
}
fn d_max_connections() -> Spanned<usize> {
    Spanned::new(0..0, 10_000)
}
fn d_header_read_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 10_000)
}
fn d_body_read_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 30_000)
}
fn d_keepalive_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 60_000)
}
fn d_write_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 30_000)
}
fn d_tunnel_idle_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 600_000)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogFile {
    pub path: Spanned<String>,
    #[serde(default)]
    pub format: AccessLogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    #[default]
    Json,
    Combined,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    #[serde(default = "d_metrics_interval")]
    pub interval_ms: Spanned<u64>,
}

impl Default for MetricsFile {
    fn default() -> Self {
        MetricsFile {
            interval_ms: d_metrics_interval(),
        }
    }
}

fn d_metrics_interval() -> Spanned<u64> {
    Spanned::new(0..0, 1000)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub name: Spanned<String>,
    pub address: Spanned<String>,
    pub tls: Option<Spanned<super::tls::ListenerTlsFile>>,
    /// Keep client-sent copies of the headers the gateway vouches for (a trusted gateway in
    /// front sets them).
    #[serde(default)]
    pub trust_identity_headers: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub name: Spanned<String>,
    pub targets: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub balance: Balance,
    pub hash_key: Option<Spanned<String>>,
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout_ms: Spanned<u64>,
    #[serde(default = "d_request_timeout")]
    pub request_timeout_ms: Spanned<u64>,
    #[serde(default = "d_idle_timeout")]
    pub idle_timeout_ms: u64,
    #[serde(default = "d_max_idle")]
    pub max_idle_per_target: usize,
    #[serde(default = "d_fail_timeout")]
    pub fail_timeout_ms: u64,
    pub tls: Option<Spanned<super::tls::UpstreamTlsFile>>,
    #[serde(default)]
    pub backup_targets: Vec<Spanned<String>>,
    #[serde(default)]
    pub panic_routing: bool,
    pub health_check: Option<Spanned<super::health::HealthCheckFile>>,
    pub outlier: Option<Spanned<super::health::OutlierFile>>,
    pub retries: Option<Spanned<super::health::RetriesFile>>,
    pub limits: Option<Spanned<super::health::LimitsFile>>,
}

fn d_connect_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 1_000)
}
fn d_request_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 15_000)
}
fn d_idle_timeout() -> u64 {
    60_000
}
fn d_max_idle() -> usize {
    64
}
fn d_fail_timeout() -> u64 {
    10_000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    ConsistentHash,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: Spanned<String>,
    pub listener: Spanned<String>,
    pub host: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub path_regex: Option<Spanned<String>>,
    pub methods: Option<Vec<Spanned<String>>>,
    pub strip_prefix: Option<Spanned<String>>,
    pub upstream: Option<Spanned<String>>,
    pub respond: Option<Spanned<RespondFile>>,
    pub redirect: Option<Spanned<RedirectFile>>,
    pub max_body_bytes: Option<u64>,
    #[serde(default)]
    pub rate_limits: Vec<Spanned<String>>,
    pub cache: Option<Spanned<RouteCacheFile>>,
    pub request_headers: Option<Spanned<HeaderTransformFile>>,
    pub response_headers: Option<Spanned<HeaderTransformFile>>,
    #[serde(default)]
    pub auth: Vec<Spanned<String>>,
    #[serde(default)]
    pub allow_groups: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny_groups: Vec<Spanned<String>>,
    pub cors: Option<Spanned<super::auth::CorsFile>>,
    pub compression: Option<Spanned<super::compression::CompressionFile>>,
    #[serde(default)]
    pub ip_allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub ip_deny: Vec<Spanned<String>>,
    pub timeout_ms: Option<Spanned<u64>>,
    #[serde(default)]
    pub trust_identity_headers: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientsFile {
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    /// Also send an RFC 7239 `Forwarded` element upstream.
    #[serde(default)]
    pub forwarded: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderTransformFile {
    #[serde(default)]
    pub set: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub add: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub remove: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    #[serde(default = "d_cache_bytes")]
    pub max_bytes: Spanned<u64>,
    #[serde(default = "d_cache_entry_bytes")]
    pub max_entry_bytes: Spanned<u64>,
    #[serde(default = "d_cache_sync")]
    pub sync_interval_ms: Spanned<u64>,
}

fn d_cache_bytes() -> Spanned<u64> {
    Spanned::new(0..0, 256 << 20)
}
fn d_cache_entry_bytes() -> Spanned<u64> {
    Spanned::new(0..0, 1 << 20)
}
fn d_cache_sync() -> Spanned<u64> {
    Spanned::new(0..0, 20)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheFile {
    #[serde(default = "d_default_ttl")]
    pub default_ttl_ms: u64,
    #[serde(default)]
    pub key_headers: Vec<Spanned<String>>,
    /// Heuristic freshness (RFC 9111 §4.2.2): this percent of the time since Last-Modified.
    pub heuristic_percent: Option<Spanned<u32>>,
    /// How long past freshness a stored response may answer when the upstream fails.
    #[serde(default)]
    pub serve_stale_on_error_ms: u64,
    /// On a route with `auth`: each consumer has its own entries.
    #[serde(default = "d_true")]
    pub per_consumer: bool,
}

fn d_default_ttl() -> u64 {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    pub name: Spanned<String>,
    pub key: Spanned<String>,
    pub rate: Spanned<f64>,
    pub burst: Spanned<f64>,
    #[serde(default = "d_max_keys")]
    pub max_keys: Spanned<usize>,
    #[serde(default = "d_sync_interval")]
    pub sync_interval_ms: Spanned<u64>,
    #[serde(default = "d_true")]
    pub headers: bool,
}

fn d_max_keys() -> Spanned<usize> {
    Spanned::new(0..0, 100_000)
}
fn d_sync_interval() -> Spanned<u64> {
    Spanned::new(0..0, 50)
}
fn d_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectFile {
    pub scheme: Option<Spanned<String>>,
    pub status: Option<Spanned<u16>>,
    pub host: Option<Spanned<String>>,
    pub port: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespondFile {
    pub status: Spanned<u16>,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
}
