//! Certificates and keys on disk, and the crypto provider: reading, checking (key match,
//! dates, names) and the roots a peer is verified against. A leaf: `config` checks the files
//! it names with it at load, and `tls` builds its configs and reloads rotated files with it.

pub mod certs;

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use certs::{CertPaths, LoadedCert};

/// The crypto provider every TLS object uses: aws-lc-rs's, with AES-128-GCM preferred over
/// AES-256-GCM over ChaCha20-Poly1305 (aws-lc-rs lists AES-256 first). The SHA-256 suites are
/// the cheap ones here: a TLS 1.3 handshake is mostly HKDF over the transcript hash, and
/// SHA-256 runs on the CPU's SHA extensions where aws-lc's SHA-384 takes its generic code on
/// AMD (16% of a resumed handshake's cycles, measured with perf). All three are AEADs that
/// every current guideline accepts.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        let name = s.suite().as_str().unwrap_or("");
        (
            s.version().version != rustls::ProtocolVersion::TLSv1_3,
            !name.contains("AES_128"),
            name.contains("CHACHA"),
        )
    });
    Arc::new(p)
}

/// A TLS listener's certificates and client CA, as read from disk at one moment.
#[derive(Debug)]
pub struct TlsFiles {
    pub certs: Vec<LoadedCert>,
    pub client_roots: Option<Arc<RootCertStore>>,
}

/// Which configured file a `FileError` is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileAt {
    Cert(usize),
    Key(usize),
    ClientCa,
}

#[derive(Debug)]
pub struct FileError {
    pub at: FileAt,
    pub message: String,
}

impl TlsFiles {
    /// Reads and checks every certificate pair and the client CA file, as of `now`.
    pub fn load(
        certs: &[CertPaths],
        client_ca: Option<&Path>,
        now: SystemTime,
    ) -> Result<TlsFiles, FileError> {
        let provider = provider();
        let mut loaded = Vec::with_capacity(certs.len());
        for (i, paths) in certs.iter().enumerate() {
            let c = certs::load(paths, &provider, now).map_err(|e| FileError {
                at: match e {
                    certs::CertError::Cert(_) => FileAt::Cert(i),
                    certs::CertError::Key(_) => FileAt::Key(i),
                },
                message: e.to_string(),
            })?;
            loaded.push(c);
        }
        let client_roots = match client_ca {
            Some(p) => Some(Arc::new(certs::load_roots(p).map_err(|message| {
                FileError {
                    at: FileAt::ClientCa,
                    message,
                }
            })?)),
            None => None,
        };
        Ok(TlsFiles {
            certs: loaded,
            client_roots,
        })
    }
}

/// Whether `roots` can verify client certificates: what only building the verifier finds.
pub fn check_client_roots(roots: &Arc<RootCertStore>) -> Result<(), String> {
    WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), provider())
        .build()
        .map(drop)
        .map_err(|e| format!("client_ca: {e}"))
}
