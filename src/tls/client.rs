//! TLS to upstreams: each worker builds its own `ClientConfig` per upstream (so its session
//! cache, which resumes handshakes to the same target, is that worker's alone), and turns a
//! failed handshake into a reason an operator can act on.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};

use crate::config::UpstreamTls;

/// One worker's client config for an upstream.
pub fn client_config(tls: &UpstreamTls) -> Result<Arc<ClientConfig>, String> {
    let provider = crate::pki::provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if tls.verify {
        builder.with_root_certificates(Arc::clone(&tls.roots))
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    };
    let mut config = match &tls.client {
        Some(c) => builder.with_client_cert_resolver(Arc::new(OurCertificate(Arc::new(
            CertifiedKey::clone(&c.key),
        )))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `client_cert`/`client_key`: presented whenever an upstream asks.
#[derive(Debug)]
struct OurCertificate(Arc<CertifiedKey>);

impl ResolvesClientCert for OurCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Why an upstream handshake failed, in an operator's words.
pub fn describe(e: &rustls::Error) -> String {
    let cert = |c: &CertificateError| match c {
        CertificateError::UnknownIssuer => "unknown issuer (not signed by a trusted CA)".to_owned(),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "name mismatch (the certificate does not name the target)".to_owned()
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "expired certificate".to_owned()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "certificate not valid yet".to_owned()
        }
        CertificateError::Revoked => "revoked certificate".to_owned(),
        other => format!("bad certificate: {other:?}"),
    };
    match e {
        rustls::Error::InvalidCertificate(c) => cert(c),
        rustls::Error::AlertReceived(a) => format!("the upstream refused the handshake ({a:?})"),
        other => other.to_string(),
    }
}

/// `verify = false`: accepts any certificate, still checking that the peer holds its key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
