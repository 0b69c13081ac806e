//! TLS termination on rustls 0.23 with the aws-lc-rs provider.
//!
//! Certificate files are read and checked by `pki` (a leaf `config` uses too).
//! - `stream`: the handshake and the two halves the pipeline reads and writes (our adapter).
//! - `watch`: rotation: files re-read when they change, new configs handed to every worker.
//!
//! Each worker builds its own `ServerConfig` per listener from the checked files, with a
//! certificate resolver of its own, so a handshake touches nothing another worker writes. Only
//! the ticket keys are shared (rustls's rotating ticketer), so a ticket issued by one worker
//! resumes on any.

pub mod client;
mod stream;
pub mod watch;

use std::sync::Arc;

use ahash::AHashMap;
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{Connection, ServerConfig};

pub use stream::{handshake, HandshakeError, TlsReader, TlsStream, TlsWriter};

use crate::config::{ClientAuth, ListenerTls, TlsVar, TlsVersion};
use crate::pki::certs::{self, LoadedCert};
use crate::pki::{provider, TlsFiles};

/// What a TLS connection negotiated, for `${tls_*}` variables and the access log.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// The server name the client asked for (SNI), lower-case.
    pub sni: Option<Box<str>>,
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
    /// The cipher suite, in rustls's (IANA) naming.
    pub cipher: &'static str,
    /// The verified client certificate's subject and subjectAltName entries.
    pub client: Option<(Box<str>, Box<str>)>,
}

impl TlsInfo {
    /// A template variable's value; empty when there is none.
    pub fn var(&self, v: TlsVar) -> &[u8] {
        match v {
            TlsVar::Sni => self.sni.as_deref().unwrap_or_default().as_bytes(),
            TlsVar::Version => self.version.as_bytes(),
            TlsVar::Cipher => self.cipher.as_bytes(),
            TlsVar::ClientSubject => self.client.as_ref().map_or(&[][..], |c| c.0.as_bytes()),
            TlsVar::ClientSan => self.client.as_ref().map_or(&[][..], |c| c.1.as_bytes()),
        }
    }

    fn of(conn: &Connection) -> TlsInfo {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "",
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("");
        let sni = match conn {
            Connection::Server(s) => s.server_name().map(Box::from),
            Connection::Client(_) => None,
        };
        let client = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .filter(|_| matches!(conn, Connection::Server(_)))
            .and_then(|leaf| certs::client_identity(leaf))
            .map(|(subject, san)| (subject.into_boxed_str(), san.into_boxed_str()));
        TlsInfo {
            sni,
            version,
            cipher,
            client,
        }
    }
}

/// Picks the certificate for a ClientHello's SNI: an exact name, else a wildcard one level
/// deep, else the default (the first configured).
#[derive(Debug)]
struct ByName {
    exact: AHashMap<String, Arc<CertifiedKey>>,
    wildcard: AHashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ByName {
    /// Each worker gets its own `Arc`s, so a handshake's reference count is its worker's.
    fn new(certs: &[LoadedCert]) -> Option<ByName> {
        let mut exact = AHashMap::new();
        let mut wildcard = AHashMap::new();
        let mut default = None;
        for c in certs {
            let key = Arc::new(CertifiedKey::clone(&c.key));
            default.get_or_insert_with(|| Arc::clone(&key));
            for name in &c.names {
                // The first certificate naming a host wins, as in the file's order.
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_owned()),
                    None => exact.entry(name.clone()),
                }
                .or_insert_with(|| Arc::clone(&key));
            }
        }
        Some(ByName {
            exact,
            wildcard,
            default: default?,
        })
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return Arc::clone(&self.default);
        };
        let name = name.trim_end_matches('.');
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if let Some(k) = self.exact.get(name) {
            return Arc::clone(k);
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return Arc::clone(k);
            }
        }
        Arc::clone(&self.default)
    }
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// One worker's `ServerConfig` for a listener, from its settings and the files as last read.
pub fn server_config(tls: &ListenerTls, files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::V12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V13 => &[&rustls::version::TLS13],
    };
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?;
    let verifier = match (tls.client_auth, &files.client_roots) {
        (ClientAuth::None, _) | (_, None) => WebPkiClientVerifier::no_client_auth(),
        (auth, Some(roots)) => {
            let b = WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), provider);
            let b = match auth {
                ClientAuth::Optional => b.allow_unauthenticated(),
                _ => b,
            };
            b.build().map_err(|e| format!("client_ca: {e}"))?
        }
    };
    let resolver = ByName::new(&files.certs).ok_or("no certificate")?;
    let mut config = builder
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // The server's order (`provider`: AES-128-GCM, AES-256-GCM, ChaCha20; ECDHE only), not the
    // client's:
    // every suite offered is a strong AEAD either way, but auditors (testssl.sh rates "no
    // cipher order" HIGH) and hardened nginx configs expect it.
    config.ignore_client_order = true;
    // rustls's in-memory session cache is behind a mutex and per process: stateless tickets
    // resume on every worker without it.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    match &tls.tickets {
        Some(t) => config.ticketer = Arc::clone(t),
        None => config.send_tls13_tickets = 0,
    }
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_win_over_wildcards_and_the_first_is_the_default() {
        let key = |n: u8| Arc::new(CertifiedKey::new(vec![vec![n].into()], dummy_key()));
        let (a, b, c) = (key(1), key(2), key(3));
        let by = ByName {
            exact: [("api.example.org".to_owned(), Arc::clone(&b))]
                .into_iter()
                .collect(),
            wildcard: [("example.org".to_owned(), Arc::clone(&c))]
                .into_iter()
                .collect(),
            default: Arc::clone(&a),
        };
        let pick = |sni| by.pick(sni).cert[0].as_ref()[0];
        assert_eq!(pick(Some("api.example.org")), 2);
        assert_eq!(pick(Some("API.Example.org.")), 2);
        assert_eq!(pick(Some("www.example.org")), 3);
        assert_eq!(
            pick(Some("a.b.example.org")),
            1,
            "a wildcard is one label deep"
        );
        assert_eq!(pick(Some("example.org")), 1);
        assert_eq!(pick(None), 1);
    }

    #[test]
    fn suites_prefer_aes_128_then_aes_256_then_chacha_with_tls13_first() {
        let names: Vec<&str> = provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite().as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            &names[..3],
            [
                "TLS13_AES_128_GCM_SHA256",
                "TLS13_AES_256_GCM_SHA384",
                "TLS13_CHACHA20_POLY1305_SHA256"
            ]
        );
        assert!(names[3].starts_with("TLS_ECDHE_") && names[3].contains("AES_128_GCM"));
        assert!(names.last().unwrap().contains("CHACHA20"));
    }

    fn dummy_key() -> Arc<dyn rustls::sign::SigningKey> {
        #[derive(Debug)]
        struct Never;
        impl rustls::sign::SigningKey for Never {
            fn choose_scheme(
                &self,
                _: &[rustls::SignatureScheme],
            ) -> Option<Box<dyn rustls::sign::Signer>> {
                None
            }
            fn algorithm(&self) -> rustls::SignatureAlgorithm {
                rustls::SignatureAlgorithm::ECDSA
            }
        }
        Arc::new(Never)
    }
}
