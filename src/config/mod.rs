//! Configuration: the TOML file is a public interface. `load` reads it, lets serde reject unknown
//! keys and ill-typed values, then validates everything that serde cannot (references between
//! sections, addresses, regexes, ranges) before anything starts. The result, `Config`, is plain
//! data with references resolved to ids; each worker builds its own runtime state from it.

mod auth;
mod compression;
mod error;
mod file;
mod headers;
mod health;
mod jwt;
mod limits;
mod model;
mod route;
mod tls;
mod trust;
mod upstream;

use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use auth::{
    check_password_hash, AuthId, AuthKind, AuthProvider, Consumer, ConsumerId, CorsPolicy,
};
pub use compression::{Coding, Compression};
pub use error::ConfigError;
pub use file::{AccessLogFormat, Balance, DriverChoice};
use file::{File, PinCores, Workers};
pub use headers::{HeaderTransform, Template, TemplatePart, TlsVar};
pub use health::{HealthCheck, Limit, Outlier, Probe, Retries, RetryOn, UpstreamLimits};
pub use jwt::{JwksSource, JwtSettings, Secret};
pub use limits::Limits;
pub use model::{
    HostMatch, Implicit, PathMatch, Redirect, Respond, Route, RouteAction, RouteCache,
};
pub use tls::{ClientAuth, ListenerTls, TlsVersion, UpstreamTls};
use toml::Spanned;
pub use upstream::{HashKey, Target, Upstream};

use crate::cidr::Cidr;
use crate::http::path::EncodedSlashes;
use crate::http::MAX_HEADERS_CEILING;

/// Index of a listener in `Config::listeners`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(pub u16);

/// Index of an upstream in `Config::upstreams`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UpstreamId(pub u16);

/// Index of a target within its upstream (`Upstream::targets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetId(pub usize);

/// Index of a rate limit in `Config::rate_limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimitId(pub u16);

/// Index of a route in `Config::routes`, which is also the file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId(pub u16);

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// SHA-256 of the file's text, in hex: which config is loaded (`/status`).
    pub digest: String,
    pub runtime: RuntimeSettings,
    pub admin: Option<SocketAddr>,
    pub limits: Limits,
    /// How often workers send their metrics to the aggregator.
    pub metrics_interval: Duration,
    pub access_log: Option<AccessLogConfig>,
    pub cache: Option<CacheSettings>,
    pub listeners: Vec<Listener>,
    pub upstreams: Vec<Upstream>,
    pub routes: Vec<Route>,
    pub rate_limits: Vec<RateLimit>,
    pub consumers: Vec<Consumer>,
    /// Peers whose `X-Forwarded-For` names the client (`[clients] trusted_proxies`).
    pub trusted_proxies: Vec<Cidr>,
    /// `[clients] forwarded`: also send an RFC 7239 `Forwarded` element upstream.
    pub forwarded_header: bool,
    /// The request headers the gateway vouches for besides `X-Consumer`, lower-case (see
    /// `trust`): removed from every client request, set only by the gateway.
    pub identity_headers: Vec<String>,
    /// Authentication providers, referenced by routes' `auth`.
    pub auth: Vec<AuthProvider>,
}

#[derive(Debug, Clone)]
pub struct RateLimit {
    pub name: String,
    pub key: RateLimitKey,
    /// Requests per second for the whole process.
    pub rate: f64,
    pub burst: f64,
    /// Keys held per worker.
    pub max_keys: usize,
    pub sync_interval: Duration,
    /// `RateLimit-*` headers on admitted responses too.
    pub headers: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitKey {
    ClientIp,
    /// A request header, lower-cased; requests without it share one bucket.
    Header(String),
    /// One bucket per route.
    Route,
    /// One bucket per authenticated consumer; requests without one share a bucket.
    Consumer,
}

#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    pub workers: usize,
    /// The core each worker is pinned to, or `None` for no pinning.
    pub cores: Vec<Option<usize>>,
    pub driver: DriverChoice,
    pub ring_entries: u32,
    pub drain_timeout: Duration,
    /// `upgrade_socket`, relative to the config file's directory.
    pub upgrade_socket: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// For the whole process (a body held by several workers counts once).
    pub max_bytes: usize,
    /// Larger responses stream through uncached.
    pub max_entry_bytes: usize,
    pub sync_interval: Duration,
}

/// Rate limits a route may apply.
pub const MAX_LIMITS_PER_ROUTE: usize = 8;

#[derive(Debug, Clone)]
pub struct AccessLogConfig {
    /// `"stdout"` or a file, opened for appending.
    pub path: String,
    pub format: AccessLogFormat,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub addr: SocketAddr,
    /// Present on a TLS listener.
    pub tls: Option<ListenerTls>,
    /// Client-sent copies of the headers the gateway vouches for are kept.
    pub trust_identity_headers: bool,
}

impl Listener {
    /// Whether a reload from `self` to `other` keeps the listening sockets: the same address
    /// (and, for a port the kernel picks, `:0`, the same name too).
    pub fn same_socket(&self, other: &Listener) -> bool {
        self.addr == other.addr && (self.addr.port() != 0 || self.name == other.name)
    }
}

/// Whether two listening addresses would take the same port (port 0 never clashes: each bind
/// gets a port of its own; an unspecified IP takes the port on every address).
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Reads and validates the config at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::whole_file(path, format!("cannot read config: {e}")))?;
    parse(path, &source)
}

/// Validates `source` as if it had been read from `path`.
pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigError> {
    let file: File =
        toml::from_str(source).map_err(|e| ConfigError::from_toml(path, source, &e))?;
    Validator { path, source }.validate(file)
}

struct Validator<'a> {
    path: &'a Path,
    source: &'a str,
}

impl Validator<'_> {
    fn err(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::at(self.path, self.source, span, key, message)
    }

    fn validate(&self, f: File) -> Result<Config, ConfigError> {
        let runtime = self.runtime(&f.runtime)?;
        let admin = match &f.admin {
            Some(a) => Some(self.socket_addr(&a.address, "admin.address")?),
            None => None,
        };
        let limits = self.limits(&f.limits)?;
        let interval = &f.metrics.interval_ms;
        if !(10..=60_000).contains(interval.get_ref()) {
            return Err(self.err(
                interval.span(),
                "metrics.interval_ms",
                "must be between 10 and 60000",
            ));
        }

        let listeners = self.listeners(&f, admin)?;
        self.fits_id(listeners.len(), "listeners")?;
        if listeners.is_empty() {
            return Err(ConfigError::whole_file(
                self.path,
                "no [[listeners]]: ringway needs at least one",
            ));
        }

        let mut upstreams: Vec<Upstream> = Vec::with_capacity(f.upstreams.len());
        for (i, u) in f.upstreams.iter().enumerate() {
            let up = self.upstream(i, u)?;
            if upstreams.iter().any(|o| o.name == up.name) {
                return Err(self.err(
                    u.name.span(),
                    "",
                    format!("duplicate upstream name {:?}", up.name),
                ));
            }
            upstreams.push(up);
        }

        self.fits_id(upstreams.len(), "upstreams")?;

        let mut rate_limits: Vec<RateLimit> = Vec::with_capacity(f.rate_limits.len());
        for (i, l) in f.rate_limits.iter().enumerate() {
            let limit = self.rate_limit(i, l)?;
            if rate_limits.iter().any(|o| o.name == limit.name) {
                return Err(self.err(
                    l.name.span(),
                    "",
                    format!("duplicate rate limit name {:?}", limit.name),
                ));
            }
            rate_limits.push(limit);
        }

        self.fits_id(rate_limits.len(), "rate limits")?;

        let trusted_proxies = match &f.clients {
            Some(c) => self.cidrs(&c.trusted_proxies, "clients.trusted_proxies")?,
            None => Vec::new(),
        };
        let consumers = self.consumers(&f.consumers)?;
        let auth = self.auth_providers(&f.auth, &upstreams)?;
        let mut routes: Vec<Route> = Vec::with_capacity(f.routes.len());
        for (i, r) in f.routes.iter().enumerate() {
            let known = route::Known {
                listeners: &listeners,
                upstreams: &upstreams,
                rate_limits: &rate_limits,
                has_cache: f.cache.is_some(),
                providers: &auth,
                consumers: &consumers,
                slashes: limits.encoded_slashes,
            };
            let route = self.route(i, r, &known)?;
            if routes.iter().any(|o| o.name == route.name) {
                return Err(self.err(
                    r.name.span(),
                    "",
                    format!("duplicate route name {:?}", route.name),
                ));
            }
            routes.push(route);
        }
        self.fits_id(routes.len(), "routes")?;
        for warning in routes.iter().flat_map(trust::cache_warnings) {
            tracing::warn!("{warning}");
        }
        let identity_headers = trust::identity_headers(&auth, &routes);

        Ok(Config {
            path: self.path.to_owned(),
            digest: crate::hash::hex_sha256(self.source.as_bytes()),
            runtime,
            admin,
            limits,
            metrics_interval: ms(*interval.get_ref()),
            cache: match &f.cache {
                None => None,
                Some(c) => {
                    let (max, entry, sync) =
                        (&c.max_bytes, &c.max_entry_bytes, &c.sync_interval_ms);
                    if !(1024..=1 << 40).contains(max.get_ref()) {
                        return Err(self.err(
                            max.span(),
                            "cache.max_bytes",
                            "must be between 1024 and 2^40",
                        ));
                    }
                    if *entry.get_ref() == 0 || entry.get_ref() > max.get_ref() {
                        return Err(self.err(
                            entry.span(),
                            "cache.max_entry_bytes",
                            "must be above 0 and at most max_bytes",
                        ));
                    }
                    if !(5..=60_000).contains(sync.get_ref()) {
                        return Err(self.err(
                            sync.span(),
                            "cache.sync_interval_ms",
                            "must be between 5 and 60000",
                        ));
                    }
                    Some(CacheSettings {
                        max_bytes: *max.get_ref() as usize,
                        max_entry_bytes: *entry.get_ref() as usize,
                        sync_interval: ms(*sync.get_ref()),
                    })
                }
            },
            access_log: match &f.access_log {
                None => None,
                Some(a) if a.path.get_ref().is_empty() => {
                    return Err(self.err(
                        a.path.span(),
                        "access_log.path",
                        "give \"stdout\" or a file path; omit [access_log] to turn it off",
                    ))
                }
                Some(a) => Some(AccessLogConfig {
                    path: a.path.get_ref().clone(),
                    format: a.format,
                }),
            },
            listeners,
            upstreams,
            routes,
            rate_limits,
            consumers,
            trusted_proxies,
            forwarded_header: f.clients.as_ref().is_some_and(|c| c.forwarded),
            identity_headers,
            auth,
        })
    }

    /// A list of addresses and CIDR ranges.
    fn cidrs(&self, list: &[Spanned<String>], key: &str) -> Result<Vec<Cidr>, ConfigError> {
        list.iter()
            .map(|s| Cidr::parse(s.get_ref()).map_err(|e| self.err(s.span(), key, e)))
            .collect()
    }

    /// Ids are `u16`: a section with more entries is refused here, never truncated later.
    fn fits_id(&self, count: usize, what: &str) -> Result<(), ConfigError> {
        if count > usize::from(u16::MAX) {
            return Err(ConfigError::whole_file(
                self.path,
                format!("more than {} {what}", u16::MAX),
            ));
        }
        Ok(())
    }

    fn rate_limit(&self, i: usize, l: &file::RateLimitFile) -> Result<RateLimit, ConfigError> {
        let key = format!("rate_limits[{i}]");
        let name = self.name(&l.name, &format!("{key}.name"))?;
        let k = match l.key.get_ref().as_str() {
            "client_ip" => RateLimitKey::ClientIp,
            "route" => RateLimitKey::Route,
            "consumer" => RateLimitKey::Consumer,
            s => match s.strip_prefix("header:") {
                Some(h) if crate::http::is_token(h.as_bytes()) => {
                    RateLimitKey::Header(h.to_ascii_lowercase())
                }
                _ => {
                    return Err(self.err(
                        l.key.span(),
                        &format!("{key}.key"),
                        format!("{s:?}: expected \"client_ip\", \"route\" or \"header:NAME\""),
                    ))
                }
            },
        };
        let positive = |v: &Spanned<f64>, field: &str| {
            let x = *v.get_ref();
            if x.is_finite() && x > 0.0 && x <= 1e9 {
                Ok(x)
            } else {
                Err(self.err(
                    v.span(),
                    &format!("{key}.{field}"),
                    "must be a number above 0",
                ))
            }
        };
        let rate = positive(&l.rate, "rate")?;
        let burst = positive(&l.burst, "burst")?;
        if burst < 1.0 {
            return Err(self.err(
                l.burst.span(),
                &format!("{key}.burst"),
                "must be at least 1",
            ));
        }
        if !(1..=10_000_000).contains(l.max_keys.get_ref()) {
            return Err(self.err(
                l.max_keys.span(),
                &format!("{key}.max_keys"),
                "must be between 1 and 10000000",
            ));
        }
        if !(5..=60_000).contains(l.sync_interval_ms.get_ref()) {
            return Err(self.err(
                l.sync_interval_ms.span(),
                &format!("{key}.sync_interval_ms"),
                "must be between 5 and 60000",
            ));
        }
        Ok(RateLimit {
            name,
            key: k,
            rate,
            burst,
            max_keys: *l.max_keys.get_ref(),
            sync_interval: ms(*l.sync_interval_ms.get_ref()),
            headers: l.headers,
        })
    }

    fn runtime(&self, r: &file::RuntimeFile) -> Result<RuntimeSettings, ConfigError> {
        let available = std::thread::available_parallelism().map_or(1, |n| n.get());
        let core_ids: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect();
        let workers = match (*r.workers.get_ref(), r.pin_cores.get_ref()) {
            (Workers::Count(n), _) => n,
            (Workers::Auto, PinCores::List(list)) if !list.is_empty() => list.len(),
            (Workers::Auto, _) => available,
        };
        let cores = match r.pin_cores.get_ref() {
            PinCores::All(false) => vec![None; workers],
            PinCores::All(true) if core_ids.is_empty() => vec![None; workers],
            PinCores::All(true) => (0..workers)
                .map(|i| Some(core_ids[i % core_ids.len()]))
                .collect(),
            PinCores::List(list) => {
                if list.is_empty() {
                    return Err(self.err(
                        r.pin_cores.span(),
                        "runtime.pin_cores",
                        "an empty core list; use false to disable pinning",
                    ));
                }
                if let Some(bad) = list.iter().find(|c| !core_ids.contains(c)) {
                    return Err(self.err(
                        r.pin_cores.span(),
                        "runtime.pin_cores",
                        format!("core {bad} does not exist here (cores: {core_ids:?})"),
                    ));
                }
                (0..workers).map(|i| Some(list[i % list.len()])).collect()
            }
        };
        let ring_entries = *r.ring_entries.get_ref();
        if !(256..=32768).contains(&ring_entries) {
            return Err(self.err(
                r.ring_entries.span(),
                "runtime.ring_entries",
                "must be between 256 and 32768",
            ));
        }
        Ok(RuntimeSettings {
            workers,
            cores,
            driver: r.driver,
            ring_entries,
            drain_timeout: ms(r.drain_timeout_ms),
            upgrade_socket: match &r.upgrade_socket {
                Some(s) if s.get_ref().is_empty() => {
                    return Err(self.err(s.span(), "runtime.upgrade_socket", "must be a path"))
                }
                Some(s) => Some(
                    self.path
                        .parent()
                        .unwrap_or(Path::new("."))
                        .join(s.get_ref()),
                ),
                None => None,
            },
        })
    }

    fn limits(&self, l: &file::LimitsFile) -> Result<Limits, ConfigError> {
        let range = |v: &Spanned<usize>, key: &str, lo: usize, hi: usize| {
            if (lo..=hi).contains(v.get_ref()) {
                Ok(*v.get_ref())
            } else {
                Err(self.err(
                    v.span(),
                    &format!("limits.{key}"),
                    format!("must be between {lo} and {hi}"),
                ))
            }
        };
        let positive = |v: &Spanned<u64>, key: &str| {
            if *v.get_ref() > 0 {
                Ok(ms(*v.get_ref()))
            } else {
                Err(self.err(v.span(), &format!("limits.{key}"), "must be greater than 0"))
            }
        };
        Ok(Limits {
            max_request_line_bytes: range(
                &l.max_request_line_bytes,
                "max_request_line_bytes",
                64,
                1 << 20,
            )?,
            max_header_bytes: range(&l.max_header_bytes, "max_header_bytes", 1024, 1 << 20)?,
            max_headers: range(&l.max_headers, "max_headers", 1, MAX_HEADERS_CEILING)?,
            max_chunk_extension_bytes: range(
                &l.max_chunk_extension_bytes,
                "max_chunk_extension_bytes",
                0,
                1 << 20,
            )?,
            max_trailer_bytes: range(&l.max_trailer_bytes, "max_trailer_bytes", 0, 1 << 20)?,
            max_connections: range(&l.max_connections, "max_connections", 1, 1 << 24)?,
            header_read_timeout: positive(&l.header_read_timeout_ms, "header_read_timeout_ms")?,
            body_read_timeout: positive(&l.body_read_timeout_ms, "body_read_timeout_ms")?,
            keepalive_timeout: positive(&l.keepalive_timeout_ms, "keepalive_timeout_ms")?,
            write_timeout: positive(&l.write_timeout_ms, "write_timeout_ms")?,
            tunnel_idle_timeout: positive(&l.tunnel_idle_timeout_ms, "tunnel_idle_timeout_ms")?,
            encoded_slashes: match l.encoded_slashes {
                file::EncodedSlashesChoice::Reject => EncodedSlashes::Reject,
                file::EncodedSlashesChoice::Keep => EncodedSlashes::Keep,
                file::EncodedSlashesChoice::Decode => EncodedSlashes::Decode,
            },
        })
    }

    fn name(&self, v: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
        let s = v.get_ref();
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(s.clone())
        } else {
            Err(self.err(
                v.span(),
                key,
                format!("{s:?} is not a valid name (1-64 of A-Z a-z 0-9 - _ .)"),
            ))
        }
    }

    fn socket_addr(&self, v: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        let s = v.get_ref();
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(addr);
        }
        match s.to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .ok_or_else(|| self.err(v.span(), key, format!("{s:?} resolves to no address"))),
            Err(e) => Err(self.err(
                v.span(),
                key,
                format!("{s:?} is not a host:port address ({e})"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Config, ConfigError> {
        parse(Path::new("test.toml"), s)
    }

    const MINIMAL: &str = r#"
[[listeners]]
name = "public"
address = "127.0.0.1:0"

[[upstreams]]
name = "app"
targets = ["127.0.0.1:9"]
"#;

    #[test]
    fn defaults_apply() {
        let c = parse_str(MINIMAL).unwrap();
        assert_eq!(c.limits.max_headers, 100);
        assert_eq!(c.upstreams[0].balance, Balance::RoundRobin);
        assert_eq!(c.runtime.ring_entries, 4096);
    }

    #[test]
    fn unknown_route_upstream_is_located() {
        let src = format!(
            "{MINIMAL}\n[[routes]]\nname = \"r\"\nlistener = \"public\"\nupstream = \"nope\"\n"
        );
        let e = parse_str(&src).unwrap_err();
        assert_eq!(e.key, "routes[0].upstream");
        assert_eq!(e.line, 13);
        assert!(e.message.contains("unknown upstream \"nope\""), "{e}");
    }

    #[test]
    fn unknown_key_is_located() {
        let e = parse_str(&format!("{MINIMAL}\n[runtime]\nworkerz = 2\n")).unwrap_err();
        assert_eq!(e.key, "runtime.workerz");
        assert_eq!((e.line, e.column), (11, 1));
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn hash_key_is_checked() {
        let src = MINIMAL.replace("targets", "hash_key = \"cookie:x\"\ntargets");
        let e = parse_str(&src).unwrap_err();
        assert_eq!(e.key, "upstreams[0].hash_key");
        let src = MINIMAL.replace("targets", "hash_key = \"header:X-User\"\ntargets");
        assert_eq!(
            parse_str(&src).unwrap().upstreams[0].hash_key,
            HashKey::Header("x-user".into())
        );
    }

    #[test]
    fn wildcard_host_becomes_suffix() {
        let src = format!(
            "{MINIMAL}\n[[routes]]\nname = \"r\"\nlistener = \"public\"\nhost = \"*.Example.com\"\nupstream = \"app\"\n"
        );
        let c = parse_str(&src).unwrap();
        assert_eq!(c.routes[0].host, HostMatch::Suffix(".example.com".into()));
    }
}
