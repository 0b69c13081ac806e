//! `[listeners.tls]`: TLS termination settings, checked with the files they name: every
//! certificate is read, its key matched and its dates checked here, so a broken file stops the
//! start with the line of the entry that names it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use rustls::server::ProducesTickets;
use rustls::RootCertStore;
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};
use crate::pki::certs::{self, CertPaths, LoadedCert};
use crate::pki::{FileAt, TlsFiles};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsFile {
    pub certificates: Spanned<Vec<Spanned<CertificateFile>>>,
    pub min_version: Option<Spanned<String>>,
    pub alpn: Option<Spanned<Vec<Spanned<String>>>>,
    pub client_auth: Option<Spanned<String>>,
    pub client_ca: Option<Spanned<String>>,
    pub handshake_timeout_ms: Option<Spanned<u64>>,
    pub session_tickets: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFile {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

/// A TLS listener's settings.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// The first is the default: served when SNI is absent or matches no certificate.
    pub certificates: Vec<CertPaths>,
    pub min_version: TlsVersion,
    /// ALPN protocols offered, in preference order.
    pub alpn: Vec<String>,
    pub client_auth: ClientAuth,
    pub client_ca: Option<PathBuf>,
    pub handshake_timeout: Duration,
    /// The ticket keys (rotated by rustls every 6 hours), shared by every worker so that a
    /// ticket resumes on any; `None` when `session_tickets = false`.
    pub tickets: Option<Arc<dyn ProducesTickets>>,
    /// What the files held at load; rotation replaces it at run time, not here.
    pub files: Arc<TlsFiles>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V12,
    V13,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    None,
    Optional,
    Required,
}

const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

impl Validator<'_> {
    pub(super) fn listener_tls(
        &self,
        t: &Spanned<ListenerTlsFile>,
        key: &str,
    ) -> Result<ListenerTls, ConfigError> {
        let f = t.get_ref();
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &str| -> PathBuf { dir.join(p) };
        if f.certificates.get_ref().is_empty() {
            return Err(self.err(
                f.certificates.span(),
                &format!("{key}.certificates"),
                "give at least one { cert = \"...\", key = \"...\" }",
            ));
        }
        let certificates: Vec<CertPaths> = f
            .certificates
            .get_ref()
            .iter()
            .map(|c| CertPaths {
                cert: resolve(c.get_ref().cert.get_ref()),
                key: resolve(c.get_ref().key.get_ref()),
            })
            .collect();
        let min_version = match f.min_version.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None | Some((_, "1.2")) => TlsVersion::V12,
            Some((_, "1.3")) => TlsVersion::V13,
            Some((v, other)) => {
                return Err(self.err(
                    v.span(),
                    &format!("{key}.min_version"),
                    format!("{other:?}: give \"1.2\" or \"1.3\" (older versions are not offered)"),
                ))
            }
        };
        let alpn = match &f.alpn {
            None => vec!["http/1.1".to_owned()],
            Some(list) => {
                if list.get_ref().is_empty() {
                    return Err(self.err(
                        list.span(),
                        &format!("{key}.alpn"),
                        "give at least one protocol (\"http/1.1\")",
                    ));
                }
                for p in list.get_ref() {
                    if p.get_ref() != "http/1.1" {
                        return Err(self.err(
                            p.span(),
                            &format!("{key}.alpn"),
                            format!(
                                "{:?}: only \"http/1.1\" is served (HTTP/2 is not supported yet)",
                                p.get_ref()
                            ),
                        ));
                    }
                }
                list.get_ref().iter().map(|p| p.get_ref().clone()).collect()
            }
        };
        let client_auth = match f.client_auth.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None | Some((_, "none")) => ClientAuth::None,
            Some((_, "optional")) => ClientAuth::Optional,
            Some((_, "required")) => ClientAuth::Required,
            Some((v, other)) => {
                return Err(self.err(
                    v.span(),
                    &format!("{key}.client_auth"),
                    format!("{other:?}: give \"none\", \"optional\" or \"required\""),
                ))
            }
        };
        match (&f.client_ca, client_auth) {
            (None, ClientAuth::Optional | ClientAuth::Required) => {
                let span = f.client_auth.as_ref().map_or(t.span(), |v| v.span());
                return Err(self.err(
                    span,
                    &format!("{key}.client_auth"),
                    "client certificates need client_ca, the CA file they must chain to",
                ));
            }
            (Some(ca), ClientAuth::None) => {
                return Err(self.err(
                    ca.span(),
                    &format!("{key}.client_ca"),
                    "client_ca is set but client_auth is \"none\": give \"optional\" or \"required\"",
                ));
            }
            _ => {}
        }
        let client_ca = f.client_ca.as_ref().map(|p| resolve(p.get_ref()));
        let handshake_timeout = match &f.handshake_timeout_ms {
            None => Duration::from_millis(DEFAULT_HANDSHAKE_TIMEOUT_MS),
            Some(v) if (1..=600_000).contains(v.get_ref()) => Duration::from_millis(*v.get_ref()),
            Some(v) => {
                return Err(self.err(
                    v.span(),
                    &format!("{key}.handshake_timeout_ms"),
                    "must be between 1 and 600000",
                ))
            }
        };
        let files = TlsFiles::load(&certificates, client_ca.as_deref(), SystemTime::now())
            .map_err(|e| {
                let (span, k) = match e.at {
                    FileAt::Cert(i) => {
                        let c = &f.certificates.get_ref()[i];
                        (
                            c.get_ref().cert.span(),
                            format!("{key}.certificates[{i}].cert"),
                        )
                    }
                    FileAt::Key(i) => {
                        let c = &f.certificates.get_ref()[i];
                        (
                            c.get_ref().key.span(),
                            format!("{key}.certificates[{i}].key"),
                        )
                    }
                    FileAt::ClientCa => match &f.client_ca {
                        Some(ca) => (ca.span(), format!("{key}.client_ca")),
                        None => (t.span(), key.to_owned()),
                    },
                };
                self.err(span, &k, e.message)
            })?;
        let tickets = match f.session_tickets {
            Some(false) => None,
            _ => Some(rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| {
                self.err(t.span(), &format!("{key}.session_tickets"), e.to_string())
            })?),
        };
        let tls = ListenerTls {
            certificates,
            min_version,
            alpn,
            client_auth,
            client_ca,
            handshake_timeout,
            tickets,
            files: Arc::new(files),
        };
        // What only building the verifier finds (a client CA it cannot use).
        if let (false, Some(roots)) = (client_auth == ClientAuth::None, &tls.files.client_roots) {
            crate::pki::check_client_roots(roots).map_err(|e| self.err(t.span(), key, e))?;
        }
        Ok(tls)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsFile {
    pub sni: Option<Spanned<String>>,
    pub ca: Option<Spanned<String>>,
    pub verify: Option<bool>,
    pub client_cert: Option<Spanned<String>>,
    pub client_key: Option<Spanned<String>>,
}

/// TLS to an upstream's targets.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// The name each target is verified against (and sent as SNI unless it is an address),
    /// in target order.
    pub names: Vec<ServerName<'static>>,
    /// False: any certificate is accepted (warned about loudly at start).
    pub verify: bool,
    pub roots: Arc<RootCertStore>,
    /// The certificate and key ringway presents, when the upstream asks for one.
    pub client: Option<LoadedCert>,
}

impl Validator<'_> {
    pub(super) fn upstream_tls(
        &self,
        t: &Spanned<UpstreamTlsFile>,
        key: &str,
        targets: &[super::Target],
    ) -> Result<UpstreamTls, ConfigError> {
        let f = t.get_ref();
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut names = Vec::with_capacity(targets.len());
        for target in targets {
            let (text, span, k) = match &f.sni {
                Some(s) => (s.get_ref().as_str(), s.span(), format!("{key}.sni")),
                None => (host_of(&target.name), t.span(), key.to_owned()),
            };
            let name = ServerName::try_from(text.to_owned()).map_err(|_| {
                self.err(
                    span,
                    &k,
                    format!("{text:?} is not a DNS name or IP address to verify the target by"),
                )
            })?;
            names.push(name);
        }
        let roots = match &f.ca {
            Some(ca) => certs::load_roots(&dir.join(ca.get_ref()))
                .map_err(|e| self.err(ca.span(), &format!("{key}.ca"), e))?,
            None => system_roots().map_err(|e| self.err(t.span(), &format!("{key}.ca"), e))?,
        };
        let client = match (&f.client_cert, &f.client_key) {
            (None, None) => None,
            (Some(cert), Some(k)) => {
                let paths = CertPaths {
                    cert: dir.join(cert.get_ref()),
                    key: dir.join(k.get_ref()),
                };
                let loaded = certs::load(&paths, &crate::pki::provider(), SystemTime::now())
                    .map_err(|e| match e {
                        certs::CertError::Cert(m) => {
                            self.err(cert.span(), &format!("{key}.client_cert"), m)
                        }
                        certs::CertError::Key(m) => {
                            self.err(k.span(), &format!("{key}.client_key"), m)
                        }
                    })?;
                Some(loaded)
            }
            (Some(s), None) | (None, Some(s)) => {
                return Err(self.err(
                    s.span(),
                    key,
                    "give both client_cert and client_key, or neither",
                ))
            }
        };
        Ok(UpstreamTls {
            names,
            verify: f.verify.unwrap_or(true),
            roots: Arc::new(roots),
            client,
        })
    }
}

/// `host` of a `host:port` target (an IPv6 literal without its brackets).
fn host_of(target: &str) -> &str {
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The system's CA certificates (what `ca-certificates` installs).
fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(format!(
            "no system CA certificates found ({} errors); install ca-certificates or give ca",
            found.errors.len()
        ));
    }
    Ok(roots)
}
