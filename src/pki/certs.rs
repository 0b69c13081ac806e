//! Certificate files: read, checked (the key matches, the certificate is current) and
//! described (the names it serves, when it expires), at start and on every rotation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A certificate expiring sooner than this is warned about at start and on rotation.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// The files of one certificate, as configured (resolved against the config's directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One certificate chain with its key, checked.
#[derive(Clone)]
pub struct LoadedCert {
    pub paths: CertPaths,
    pub key: Arc<CertifiedKey>,
    /// DNS names from the subjectAltName extension (lower-case; `*.` for wildcards), or the
    /// subject's common name when there is no such extension.
    pub names: Vec<String>,
    /// The leaf's notAfter, as seconds since the epoch.
    pub not_after: i64,
}

impl std::fmt::Debug for LoadedCert {
    /// Names and dates only: a key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedCert")
            .field("paths", &self.paths)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl LoadedCert {
    /// The name shown in logs and metrics: the first name, or the file's name.
    pub fn label(&self) -> String {
        match self.names.first() {
            Some(n) => n.clone(),
            None => self.paths.cert.display().to_string(),
        }
    }

    /// Seconds until the certificate expires (negative once it has).
    pub fn expires_in(&self, now: SystemTime) -> i64 {
        self.not_after - unix(now)
    }
}

/// What is wrong with a certificate pair, and which file it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertError {
    Cert(String),
    Key(String),
}

impl std::fmt::Display for CertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertError::Cert(m) | CertError::Key(m) => f.write_str(m),
        }
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Reads and checks the chain at `paths.cert` and the key at `paths.key` as of `now`.
pub fn load(
    paths: &CertPaths,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<LoadedCert, CertError> {
    let chain = read_chain(&paths.cert).map_err(CertError::Cert)?;
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| {
        CertError::Key(format!(
            "{}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {}",
            paths.key.display(),
            pem_error(e)
        ))
    })?;
    let leaf = chain[0].clone();
    let (names, not_before, not_after) =
        describe(&leaf).map_err(|e| CertError::Cert(format!("{}: {e}", paths.cert.display())))?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        CertError::Key(match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "{} is not the key of the certificate in {}",
                paths.key.display(),
                paths.cert.display()
            ),
            other => format!("{}: unusable key: {other}", paths.key.display()),
        })
    })?;
    let now_s = unix(now);
    if not_after < now_s {
        return Err(CertError::Cert(format!(
            "{}: the certificate expired on {}",
            paths.cert.display(),
            httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64))
        )));
    }
    if not_before > now_s {
        return Err(CertError::Cert(format!(
            "{}: the certificate is not valid before {}",
            paths.cert.display(),
            httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(not_before.max(0) as u64))
        )));
    }
    Ok(LoadedCert {
        paths: paths.clone(),
        key: Arc::new(key),
        names,
        not_after,
    })
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {}", path.display(), pem_error(e)))?;
    let chain = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {}", path.display(), pem_error(e)))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(chain)
}

/// Reads the CA certificates in `path` (one or more PEM certificates).
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_chain(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(e) => e.to_string(),
        Error::NoItemsFound => "no matching PEM section".into(),
        other => format!("malformed PEM: {other:?}"),
    }
}

/// The leaf's DNS names and validity period (seconds since the epoch).
fn describe(leaf: &[u8]) -> Result<(Vec<String>, i64, i64), String> {
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        if let Some(cn) = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
        {
            names.push(cn.to_ascii_lowercase());
        }
    }
    let validity = cert.validity();
    Ok((
        names,
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// A verified client certificate's subject (RFC 4514 form) and subjectAltName entries
/// (`DNS:`, `email:`, `URI:`, `IP:`), for `${tls_client_subject}` and `${tls_client_san}`.
pub fn client_identity(leaf: &[u8]) -> Option<(String, String)> {
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let subject = cert.subject().to_string();
    let mut san = String::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            let item = match n {
                GeneralName::DNSName(d) => format!("DNS:{d}"),
                GeneralName::RFC822Name(e) => format!("email:{e}"),
                GeneralName::URI(u) => format!("URI:{u}"),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => format!(
                        "IP:{}",
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?)
                    ),
                    16 => format!(
                        "IP:{}",
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?)
                    ),
                    _ => continue,
                },
                _ => continue,
            };
            if !san.is_empty() {
                san.push(',');
            }
            san.push_str(&item);
        }
    }
    // Values go into header lines: nothing that could end one.
    let clean = |s: String| s.chars().filter(|c| !c.is_control()).collect::<String>();
    Some((clean(subject), clean(san)))
}
