//! `[[auth]]` entries of `type = "jwt"`: which tokens a provider accepts and where its keys
//! come from. A `jwks_file` is read and checked here; a remote `jwks` names an `[[upstreams]]`
//! entry, fetched at run time. An HMAC secret comes from the environment or a file, never from
//! the config text, and is never printed.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use toml::Spanned;

use super::auth::AuthFile;
use super::{ConfigError, Upstream, UpstreamId, Validator};
use crate::keyset::KeySet;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksFile {
    pub upstream: Spanned<String>,
    pub path: Spanned<String>,
    pub refresh_s: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretFile {
    pub env: Option<Spanned<String>>,
    pub file: Option<Spanned<String>>,
}

/// A JWT provider's settings.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// The provider's name: the namespace its tokens' subjects are in.
    pub provider: String,
    pub realm: String,
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub keys: JwksSource,
    pub leeway_s: u64,
    /// Dotted path of a claim naming a `[[consumers]]` entry.
    pub consumer_claim: Option<String>,
    /// (lower-case header name, dotted claim path), in name order.
    pub claims_to_headers: Vec<(String, String)>,
    pub hs_secret: Option<Secret>,
}

#[derive(Debug, Clone)]
pub enum JwksSource {
    /// HMAC only: the secret is the key.
    None,
    File(Arc<KeySet>),
    Remote {
        upstream: UpstreamId,
        path: String,
        refresh: Duration,
    },
}

/// Key material that must not reach a log: `Debug` prints its length only.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Fields of a request a claim may not overwrite: framing, routing and the identity header.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "authorization",
    "x-consumer",
    "x-forwarded-for",
    "x-forwarded-proto",
];

impl Validator<'_> {
    pub(super) fn jwt(
        &self,
        a: &AuthFile,
        key: &str,
        name: &str,
        upstreams: &[Upstream],
    ) -> Result<JwtSettings, ConfigError> {
        let algorithms = self.algorithms(a, key)?;
        let hmac_only = algorithms
            .iter()
            .all(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac);
        let wants_hmac = algorithms
            .iter()
            .any(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac);
        let hs_secret =
            match &a.secret {
                Some(s) if wants_hmac => Some(self.secret(s, &format!("{key}.secret"))?),
                Some(s) => {
                    return Err(self.err(
                        s.span(),
                        &format!("{key}.secret"),
                        "a secret is for HS256/HS384/HS512, which `algorithms` does not list",
                    ))
                }
                None if wants_hmac => return Err(self.err(
                    a.kind.span(),
                    &format!("{key}.secret"),
                    "HS256/HS384/HS512 need `secret = { env = \"...\" }` or `{ file = \"...\" }`",
                )),
                None => None,
            };
        let keys = match (&a.jwks_file, &a.jwks) {
            (Some(_), Some(j)) => {
                return Err(self.err(
                    j.span(),
                    &format!("{key}.jwks"),
                    "give `jwks_file` or `jwks`, not both",
                ))
            }
            (None, None) if hmac_only => JwksSource::None,
            (None, None) => {
                return Err(self.err(
                    a.kind.span(),
                    &format!("{key}.jwks"),
                    "a JWT provider needs its keys: `jwks_file` or `jwks = { upstream, path }`",
                ))
            }
            (Some(f), None) => {
                let dir = self.path.parent().unwrap_or(Path::new("."));
                let text = std::fs::read(dir.join(f.get_ref())).map_err(|e| {
                    self.err(
                        f.span(),
                        &format!("{key}.jwks_file"),
                        format!("cannot read {:?}: {e}", f.get_ref()),
                    )
                })?;
                let (set, skipped) = KeySet::parse(&text)
                    .map_err(|e| self.err(f.span(), &format!("{key}.jwks_file"), e))?;
                for s in skipped {
                    tracing::warn!(provider = name, "jwks_file: skipped {s}");
                }
                JwksSource::File(Arc::new(set))
            }
            (None, Some(j)) => self.remote_jwks(j, &format!("{key}.jwks"), upstreams)?,
        };
        let leeway_s = match &a.leeway_s {
            None => 30,
            Some(l) if *l.get_ref() <= 300 => *l.get_ref(),
            Some(l) => {
                return Err(self.err(l.span(), &format!("{key}.leeway_s"), "must be at most 300"))
            }
        };
        let consumer_claim = match &a.consumer_claim {
            None => None,
            Some(c) => Some(self.claim_path(c, &format!("{key}.consumer_claim"))?),
        };
        let mut claims_to_headers = Vec::new();
        if let Some(map) = &a.claims_to_headers {
            let field = format!("{key}.claims_to_headers");
            for (header, claim) in map.get_ref() {
                let lower = header.to_ascii_lowercase();
                if !crate::http::is_token(header.as_bytes()) {
                    return Err(self.err(
                        map.span(),
                        &field,
                        format!("{header:?} is not a header name"),
                    ));
                }
                if RESERVED_HEADERS.contains(&lower.as_str()) {
                    return Err(self.err(
                        map.span(),
                        &field,
                        format!("{header:?} cannot carry a claim (framing, routing or identity)"),
                    ));
                }
                claims_to_headers.push((lower, self.claim_path(claim, &field)?));
            }
        }
        Ok(JwtSettings {
            provider: name.to_owned(),
            realm: self.realm(a, key, name)?,
            issuer: a.issuer.as_ref().map(|i| i.get_ref().clone()),
            audiences: a
                .audiences
                .iter()
                .flatten()
                .map(|s| s.get_ref().clone())
                .collect(),
            algorithms,
            keys,
            leeway_s,
            consumer_claim,
            claims_to_headers,
            hs_secret,
        })
    }

    fn algorithms(&self, a: &AuthFile, key: &str) -> Result<Vec<Algorithm>, ConfigError> {
        let field = format!("{key}.algorithms");
        let Some(list) = &a.algorithms else {
            return Err(self.err(
                a.kind.span(),
                &field,
                "a JWT provider lists its `algorithms`, e.g. [\"RS256\", \"ES256\", \"EdDSA\"]",
            ));
        };
        let mut out = Vec::new();
        for s in list.get_ref() {
            let alg = match s.get_ref().as_str() {
                n if n.eq_ignore_ascii_case("none") => {
                    return Err(self.err(
                        s.span(),
                        &field,
                        "\"none\" (unsigned tokens) is never allowed",
                    ))
                }
                n => Algorithm::from_str(n).map_err(|_| {
                    self.err(
                        s.span(),
                        &field,
                        format!(
                            "{n:?}: give RS256/384/512, PS256/384/512, ES256/384, EdDSA or HS256/384/512"
                        ),
                    )
                })?,
            };
            if !out.contains(&alg) {
                out.push(alg);
            }
        }
        if out.is_empty() {
            return Err(self.err(list.span(), &field, "list at least one algorithm"));
        }
        Ok(out)
    }

    fn remote_jwks(
        &self,
        j: &Spanned<JwksFile>,
        key: &str,
        upstreams: &[Upstream],
    ) -> Result<JwksSource, ConfigError> {
        let f = j.get_ref();
        let upstream = upstreams
            .iter()
            .position(|u| u.name == *f.upstream.get_ref())
            .ok_or_else(|| {
                self.err(
                    f.upstream.span(),
                    &format!("{key}.upstream"),
                    format!("unknown upstream {:?}", f.upstream.get_ref()),
                )
            })?;
        let path = f.path.get_ref();
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(self.err(
                f.path.span(),
                &format!("{key}.path"),
                "a path starts with '/' and has no spaces or control characters",
            ));
        }
        let refresh_s = match &f.refresh_s {
            None => 600,
            Some(r) if (10..=86_400).contains(r.get_ref()) => *r.get_ref(),
            Some(r) => {
                return Err(self.err(
                    r.span(),
                    &format!("{key}.refresh_s"),
                    "must be between 10 and 86400",
                ))
            }
        };
        Ok(JwksSource::Remote {
            upstream: UpstreamId(upstream as u16),
            path: path.clone(),
            refresh: Duration::from_secs(refresh_s),
        })
    }

    /// The HMAC secret, from the environment or a file (one trailing newline dropped).
    fn secret(&self, s: &Spanned<SecretFile>, key: &str) -> Result<Secret, ConfigError> {
        let bytes = match (&s.get_ref().env, &s.get_ref().file) {
            (Some(var), None) => std::env::var_os(var.get_ref())
                .map(|v| v.into_encoded_bytes())
                .ok_or_else(|| {
                    self.err(
                        var.span(),
                        &format!("{key}.env"),
                        format!("environment variable {:?} is not set", var.get_ref()),
                    )
                })?,
            (None, Some(file)) => {
                let dir = self.path.parent().unwrap_or(Path::new("."));
                let mut b = std::fs::read(dir.join(file.get_ref())).map_err(|e| {
                    self.err(
                        file.span(),
                        &format!("{key}.file"),
                        format!("cannot read {:?}: {e}", file.get_ref()),
                    )
                })?;
                if b.ends_with(b"\n") {
                    b.pop();
                    if b.ends_with(b"\r") {
                        b.pop();
                    }
                }
                b
            }
            _ => return Err(self.err(s.span(), key, "give exactly one of `env` and `file`")),
        };
        if bytes.len() < 32 {
            return Err(self.err(
                s.span(),
                key,
                format!(
                    "the secret has {} bytes; HMAC secrets need at least 32",
                    bytes.len()
                ),
            ));
        }
        Ok(Secret(bytes.into()))
    }

    fn claim_path(&self, c: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
        let p = c.get_ref();
        if p.is_empty() || p.split('.').any(str::is_empty) {
            return Err(self.err(
                c.span(),
                key,
                format!("{p:?} is not a claim path (names joined by '.', e.g. \"org.tenant\")"),
            ));
        }
        Ok(p.clone())
    }

    /// A challenge's realm: the `realm` key, or the provider's name.
    pub(super) fn realm(&self, a: &AuthFile, key: &str, name: &str) -> Result<String, ConfigError> {
        match &a.realm {
            Some(r)
                if !r.get_ref().contains(['"', '\\'])
                    && !r.get_ref().chars().any(char::is_control) =>
            {
                Ok(r.get_ref().clone())
            }
            Some(r) => Err(self.err(
                r.span(),
                &format!("{key}.realm"),
                "a realm has no quotes, backslashes or control characters",
            )),
            None => Ok(name.to_owned()),
        }
    }
}
