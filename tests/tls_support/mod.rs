//! TLS test helpers: a private CA made by rcgen for each test (server and client
//! certificates, written as PEM files), and a blocking rustls client.
#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A certificate authority whose files live in `dir`.
pub struct Ca {
    pub dir: tempfile::TempDir,
    params: CertificateParams,
    key: KeyPair,
    pub cert: CertificateDer<'static>,
    /// The CA certificate's PEM file.
    pub pem: PathBuf,
}

/// A certificate issued by a `Ca`: its files and DER, to compare with what a client saw.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.path().join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).unwrap();
        Ca {
            dir,
            params,
            key,
            cert: cert.der().clone(),
            pem,
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A server certificate for `names` (ECDSA P-256), written as `<file>.pem` / `<file>.key`.
    pub fn server(&self, file: &str, names: &[&str]) -> Issued {
        self.issue(
            file,
            names,
            None,
            ExtendedKeyUsagePurpose::ServerAuth,
            |_| {},
        )
    }

    /// A client certificate with subject CN `cn` and an email SAN.
    pub fn client(&self, file: &str, cn: &str) -> Issued {
        let email = format!("{cn}@clients.test");
        self.issue(
            file,
            &[],
            Some(cn),
            ExtendedKeyUsagePurpose::ClientAuth,
            |p| {
                p.subject_alt_names.push(rcgen::SanType::Rfc822Name(
                    email.clone().try_into().unwrap(),
                ));
            },
        )
    }

    /// A certificate with `tweak` applied to its parameters (dates, for instance).
    pub fn issue(
        &self,
        file: &str,
        names: &[&str],
        cn: Option<&str>,
        usage: ExtendedKeyUsagePurpose,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.extended_key_usages = vec![usage];
        tweak(&mut params);
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let cert_path = self.path(&format!("{file}.pem"));
        let key_path = self.path(&format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Issued {
            cert: cert_path,
            key: key_path,
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        roots
    }
}

impl Issued {
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.der.clone()]
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// Writes `bytes` to `path` by a rename, as certificate managers do.
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A client trusting `roots`, offering TLS 1.3 and 1.2 and `http/1.1`.
pub fn client_config(roots: RootCertStore) -> ClientConfig {
    client_config_with(
        roots,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        None,
    )
}

pub fn client_config_with(
    roots: RootCertStore,
    versions: &[&'static rustls::SupportedProtocolVersion],
    client_cert: Option<&Issued>,
) -> ClientConfig {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut c = match client_cert {
        Some(id) => b
            .with_client_auth_cert(id.chain(), id.private_key())
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    c
}

/// Connects and completes the handshake with SNI `sni` (an IP address sends none).
pub fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: &Arc<ClientConfig>,
) -> Result<TlsStream, rustls::Error> {
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let mut conn = ClientConnection::new(Arc::clone(config), name).unwrap();
    let mut sock = super::common::connect(addr);
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            return Err(
                match e.into_inner().map(|i| i.downcast::<rustls::Error>()) {
                    Some(Ok(e)) => *e,
                    _ => rustls::Error::General("handshake i/o failed".into()),
                },
            );
        }
    }
    Ok(StreamOwned::new(conn, sock))
}

/// The leaf certificate the server presented.
pub fn leaf(s: &TlsStream) -> CertificateDer<'static> {
    s.conn.peer_certificates().expect("a server certificate")[0].clone()
}

/// One request on a TLS stream; the response.
pub fn request(s: &mut TlsStream, raw: &str) -> super::common::Response {
    s.write_all(raw.as_bytes()).unwrap();
    s.flush().unwrap();
    let head = raw.starts_with("HEAD ");
    let mut reader = super::common::ResponseReader::new(&mut *s);
    reader.read_response(head).expect("a response")
}

/// What a `TlsUpstream` saw of one connection.
#[derive(Debug, Clone)]
pub struct UpstreamConnection {
    pub sni: Option<String>,
    pub resumed: bool,
    /// The client certificate's DER, when one was presented.
    pub client_cert: Option<Vec<u8>>,
}

/// An HTTPS upstream (rustls, blocking, a thread per connection) that answers every request
/// `200 tls-ok` (closing the connection after a path starting `/close`), or `200` with a given
/// body, and records requests and connections.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<std::sync::Mutex<Vec<super::common::Received>>>,
    pub connections: Arc<std::sync::Mutex<Vec<UpstreamConnection>>>,
}

impl TlsUpstream {
    pub fn start(config: rustls::ServerConfig) -> TlsUpstream {
        Self::serving(config, "tls-ok")
    }

    /// Answers every request `200` with `body`.
    pub fn serving(config: rustls::ServerConfig, body: &str) -> TlsUpstream {
        let config = Arc::new(config);
        let body: Arc<str> = body.into();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<std::sync::Mutex<Vec<super::common::Received>>> = Arc::default();
        let connections: Arc<std::sync::Mutex<Vec<UpstreamConnection>>> = Arc::default();
        let (reqs, conns) = (Arc::clone(&requests), Arc::clone(&connections));
        std::thread::spawn(move || {
            for (id, sock) in listener.incoming().enumerate() {
                let Ok(mut sock) = sock else { break };
                let (config, reqs, conns, body) = (
                    Arc::clone(&config),
                    Arc::clone(&reqs),
                    Arc::clone(&conns),
                    Arc::clone(&body),
                );
                std::thread::spawn(move || {
                    sock.set_read_timeout(Some(super::common::TIMEOUT)).unwrap();
                    let mut conn = rustls::ServerConnection::new(config).unwrap();
                    while conn.is_handshaking() {
                        if conn.complete_io(&mut sock).is_err() {
                            return;
                        }
                    }
                    conns.lock().unwrap().push(UpstreamConnection {
                        sni: conn.server_name().map(str::to_owned),
                        resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                        client_cert: conn
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| c.to_vec()),
                    });
                    let mut reader =
                        super::common::RequestReader::new(StreamOwned::new(conn, sock));
                    while let Some(req) = reader.read_request(id) {
                        let close = req.path.starts_with("/close");
                        reqs.lock().unwrap().push(req);
                        let out = format!(
                            "HTTP/1.1 200 OK\r\n{}content-length: {}\r\n\r\n{body}",
                            if close { "connection: close\r\n" } else { "" },
                            body.len()
                        );
                        if reader.stream.write_all(out.as_bytes()).is_err() || close {
                            reader.stream.conn.send_close_notify();
                            let _ = reader.stream.flush();
                            break;
                        }
                        let _ = reader.stream.flush();
                    }
                });
            }
        });
        TlsUpstream {
            addr,
            requests,
            connections,
        }
    }

    pub fn connections(&self) -> Vec<UpstreamConnection> {
        self.connections.lock().unwrap().clone()
    }
}

/// A server config for `cert`, optionally requiring client certificates from `clients`.
pub fn server_config(cert: &Issued, clients: Option<&Ca>) -> rustls::ServerConfig {
    let b = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let b = match clients {
        Some(ca) => b.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca.roots()),
                provider(),
            )
            .build()
            .unwrap(),
        ),
        None => b.with_no_client_auth(),
    };
    b.with_single_cert(cert.chain(), cert.private_key())
        .unwrap()
}

/// A `{ cert, key }` entry for `certificates`.
pub fn pair(i: &Issued) -> String {
    format!(
        "{{ cert = \"{}\", key = \"{}\" }}",
        i.cert.display(),
        i.key.display()
    )
}

/// A gateway with `workers` workers, an admin listener and one TLS listener (`tls`: the body of
/// its `[listeners.tls]`), proxying every path to `upstream` (`route_extra`: more route keys).
pub fn tls_gateway(
    workers: usize,
    tls: &str,
    upstream: SocketAddr,
    route_extra: &str,
) -> super::common::Gateway {
    super::common::Gateway::start(&format!(
        r#"
[runtime]
workers = {workers}
pin_cores = false

[admin]
address = "127.0.0.1:0"

[[listeners]]
name = "tls"
address = "127.0.0.1:0"
[listeners.tls]
{tls}

[[upstreams]]
name = "app"
targets = ["{upstream}"]

[[routes]]
name = "all"
listener = "tls"
path_prefix = "/"
upstream = "app"
{route_extra}
"#
    ))
}
