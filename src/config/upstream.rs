//! `[[listeners]]` and `[[upstreams]]`: where ringway listens and what it proxies to.

use std::net::SocketAddr;
use std::time::Duration;

use super::file::{Balance, File, UpstreamFile};
use super::{
    clash, ms, ConfigError, HealthCheck, Listener, Outlier, Retries, UpstreamLimits, UpstreamTls,
    Validator,
};

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    /// The primary targets, then the backups (`backup_targets`).
    pub targets: Vec<Target>,
    /// How many of `targets` are primaries.
    pub primaries: usize,
    /// With every primary unhealthy and no backup up: try the primaries anyway (else 503).
    pub panic_routing: bool,
    pub health_check: Option<HealthCheck>,
    pub outlier: Option<Outlier>,
    pub retries: Option<Retries>,
    /// Circuit breaking, as configured for the process (`limits.per_worker` is a worker's share).
    pub limits: Option<UpstreamLimits>,
    pub balance: Balance,
    pub hash_key: HashKey,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_target: usize,
    pub fail_timeout: Duration,
    /// TLS to the targets, when configured.
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone)]
pub struct Target {
    /// As written in the config (`host:port`); also what consistent hashing hashes.
    pub name: String,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    /// A request header, lower-cased.
    Header(String),
}

impl Validator<'_> {
    /// Every listener, checked for unique names and addresses that no other listener (nor the
    /// admin listener, at `admin`) takes.
    pub(super) fn listeners(
        &self,
        f: &File,
        admin: Option<SocketAddr>,
    ) -> Result<Vec<Listener>, ConfigError> {
        let mut listeners: Vec<Listener> = Vec::with_capacity(f.listeners.len());
        for (i, l) in f.listeners.iter().enumerate() {
            let key = format!("listeners[{i}]");
            let name = self.name(&l.name, &format!("{key}.name"))?;
            if listeners.iter().any(|o| o.name == name) {
                return Err(self.err(
                    l.name.span(),
                    "",
                    format!("duplicate listener name {name:?}"),
                ));
            }
            let addr = self.socket_addr(&l.address, &format!("{key}.address"))?;
            if let Some(other) = listeners.iter().find(|o| clash(o.addr, addr)) {
                return Err(self.err(
                    l.address.span(),
                    &format!("{key}.address"),
                    format!("{addr} is also listener {:?}'s address", other.name),
                ));
            }
            if let (Some(admin), Some(a)) = (admin, &f.admin) {
                if clash(admin, addr) {
                    return Err(self.err(
                        a.address.span(),
                        "admin.address",
                        format!("{admin} is also listener {name:?}'s address ({key}.address)"),
                    ));
                }
            }
            let tls = match &l.tls {
                Some(t) => Some(self.listener_tls(t, &format!("{key}.tls"))?),
                None => None,
            };
            listeners.push(Listener {
                name,
                addr,
                tls,
                trust_identity_headers: l.trust_identity_headers,
            });
        }
        Ok(listeners)
    }

    pub(super) fn upstream(&self, i: usize, u: &UpstreamFile) -> Result<Upstream, ConfigError> {
        let key = format!("upstreams[{i}]");
        let name = self.name(&u.name, &format!("{key}.name"))?;
        if u.targets.get_ref().is_empty() {
            return Err(self.err(
                u.targets.span(),
                &format!("{key}.targets"),
                "an upstream needs at least one target",
            ));
        }
        let mut targets: Vec<Target> =
            Vec::with_capacity(u.targets.get_ref().len() + u.backup_targets.len());
        let lists = [
            ("targets", u.targets.get_ref().as_slice()),
            ("backup_targets", u.backup_targets.as_slice()),
        ];
        for (field, list) in lists {
            for (j, t) in list.iter().enumerate() {
                let at = format!("{key}.{field}[{j}]");
                let addr = self.socket_addr(t, &at)?;
                if field == "backup_targets" && targets.iter().any(|o| o.name == *t.get_ref()) {
                    return Err(self.err(
                        t.span(),
                        &at,
                        format!("{:?} is listed twice", t.get_ref()),
                    ));
                }
                targets.push(Target {
                    name: t.get_ref().clone(),
                    addr,
                });
            }
        }
        let health_check = match &u.health_check {
            Some(h) => Some(self.health_check(h, &format!("{key}.health_check"))?),
            None => None,
        };
        let outlier = match &u.outlier {
            Some(o) => Some(self.outlier(o, &format!("{key}.outlier"))?),
            None => None,
        };
        let retries = match &u.retries {
            Some(r) => Some(self.retries(r, &format!("{key}.retries"))?),
            None => None,
        };
        let limits = match &u.limits {
            Some(l) => Some(self.limits_of(l, &format!("{key}.limits"))?),
            None => None,
        };
        // Only consistent_hash uses the key; the documented example sets it on round_robin.
        let hash_key = match &u.hash_key {
            None => HashKey::ClientIp,
            Some(h) => match h.get_ref().as_str() {
                "client_ip" => HashKey::ClientIp,
                s => match s.strip_prefix("header:") {
                    Some(name) if crate::http::is_token(name.as_bytes()) => {
                        HashKey::Header(name.to_ascii_lowercase())
                    }
                    _ => {
                        return Err(self.err(
                            h.span(),
                            &format!("{key}.hash_key"),
                            format!("{s:?}: expected \"client_ip\" or \"header:NAME\""),
                        ))
                    }
                },
            },
        };
        for (v, field) in [
            (&u.connect_timeout_ms, "connect_timeout_ms"),
            (&u.request_timeout_ms, "request_timeout_ms"),
        ] {
            if *v.get_ref() == 0 {
                return Err(self.err(
                    v.span(),
                    &format!("{key}.{field}"),
                    "must be greater than 0",
                ));
            }
        }
        let tls = match &u.tls {
            Some(t) => Some(self.upstream_tls(t, &format!("{key}.tls"), &targets)?),
            None => None,
        };
        Ok(Upstream {
            name,
            targets,
            primaries: u.targets.get_ref().len(),
            panic_routing: u.panic_routing,
            health_check,
            outlier,
            retries,
            limits,
            balance: u.balance,
            hash_key,
            connect_timeout: ms(*u.connect_timeout_ms.get_ref()),
            request_timeout: ms(*u.request_timeout_ms.get_ref()),
            idle_timeout: ms(u.idle_timeout_ms),
            max_idle_per_target: u.max_idle_per_target,
            fail_timeout: ms(u.fail_timeout_ms),
            tls,
        })
    }
}
