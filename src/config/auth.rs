//! `[[consumers]]` and `[[auth]]`: who may call, and how they prove it. API keys are stored
//! as SHA-256 digests (`sha256:<hex>`); a plain key is accepted and hashed at load, with a
//! warning at start, so that the running process never holds a key it could leak.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::jwt::{JwksFile, JwtSettings, SecretFile};
use super::{ConfigError, Upstream, Validator};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub groups: Vec<Spanned<String>>,
    #[serde(default)]
    pub api_keys: Vec<Spanned<String>>,
    pub basic: Option<Spanned<BasicFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicFile {
    pub username: Spanned<String>,
    pub password_hash: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    pub name: Spanned<String>,
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    pub header: Option<Spanned<String>>,
    pub query: Option<Spanned<String>>,
    pub realm: Option<Spanned<String>>,
    #[serde(default)]
    pub forward_credentials: bool,
    pub issuer: Option<Spanned<String>>,
    pub audiences: Option<Vec<Spanned<String>>>,
    pub algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    pub jwks_file: Option<Spanned<String>>,
    pub jwks: Option<Spanned<JwksFile>>,
    pub leeway_s: Option<Spanned<u64>>,
    pub consumer_claim: Option<Spanned<String>>,
    pub claims_to_headers: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    pub secret: Option<Spanned<SecretFile>>,
}

impl AuthFile {
    /// The first key set here that type `kind` does not take, and its span.
    fn stray_key(&self, kind: &str) -> Option<(&'static str, std::ops::Range<usize>)> {
        let s = |v: &Option<Spanned<String>>| v.as_ref().map(Spanned::span);
        let for_jwt = [
            ("issuer", s(&self.issuer)),
            ("algorithms", self.algorithms.as_ref().map(Spanned::span)),
            ("jwks_file", s(&self.jwks_file)),
            ("jwks", self.jwks.as_ref().map(Spanned::span)),
            ("leeway_s", self.leeway_s.as_ref().map(Spanned::span)),
            ("consumer_claim", s(&self.consumer_claim)),
            (
                "claims_to_headers",
                self.claims_to_headers.as_ref().map(Spanned::span),
            ),
            ("secret", self.secret.as_ref().map(Spanned::span)),
            (
                "audiences",
                self.audiences
                    .as_ref()
                    .and_then(|a| a.first())
                    .map(Spanned::span),
            ),
        ];
        let for_keys = [("header", s(&self.header)), ("query", s(&self.query))];
        let for_challenges = [("realm", s(&self.realm))];
        let stray = match kind {
            "api_key" => [&for_jwt[..], &for_challenges[..]].concat(),
            "basic" => [&for_jwt[..], &for_keys[..]].concat(),
            "jwt" => for_keys.to_vec(),
            _ => Vec::new(),
        };
        stray.into_iter().find_map(|(k, span)| Some((k, span?)))
    }
}

/// Index of a consumer in `Config::consumers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsumerId(pub u16);

/// Index of a provider in `Config::auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AuthId(pub u16);

#[derive(Debug, Clone)]
pub struct Consumer {
    pub name: String,
    pub groups: Vec<String>,
    /// SHA-256 digests of the consumer's API keys.
    pub api_keys: Vec<[u8; 32]>,
    /// Some key was given in plain text (hashed here; warned about at start).
    pub plain_keys: bool,
    /// Basic credentials: the user name and its argon2id or bcrypt hash.
    pub basic: Option<(String, Arc<str>)>,
}

#[derive(Debug, Clone)]
pub struct AuthProvider {
    pub name: String,
    pub kind: AuthKind,
    /// Keep the credentials on the request that goes upstream (stripped by default).
    pub forward_credentials: bool,
}

#[derive(Debug, Clone)]
pub enum AuthKind {
    /// A key in a request header (lower-case name) and/or a query parameter.
    ApiKey {
        header: Option<String>,
        query: Option<String>,
    },
    /// HTTP Basic (RFC 7617) against the consumers' `basic` credentials.
    Basic { realm: String },
    /// Bearer JSON Web Tokens (RFC 6750, RFC 7519).
    Jwt(Box<JwtSettings>),
}

impl Validator<'_> {
    pub(super) fn consumers(&self, files: &[ConsumerFile]) -> Result<Vec<Consumer>, ConfigError> {
        let mut out: Vec<Consumer> = Vec::with_capacity(files.len());
        for (i, c) in files.iter().enumerate() {
            let key = format!("consumers[{i}]");
            let name = self.name(&c.name, &format!("{key}.name"))?;
            if out.iter().any(|o| o.name == name) {
                return Err(self.err(
                    c.name.span(),
                    "",
                    format!("duplicate consumer name {name:?}"),
                ));
            }
            let basic = match &c.basic {
                None => None,
                Some(b) => {
                    let b = b.get_ref();
                    let user = b.username.get_ref();
                    if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
                        return Err(self.err(
                            b.username.span(),
                            &format!("{key}.basic.username"),
                            "a user name is not empty and has no ':' or control characters",
                        ));
                    }
                    if out
                        .iter()
                        .any(|o| o.basic.as_ref().is_some_and(|(u, _)| u == user))
                    {
                        return Err(self.err(
                            b.username.span(),
                            &format!("{key}.basic.username"),
                            format!("user name {user:?} is also another consumer's"),
                        ));
                    }
                    check_password_hash(b.password_hash.get_ref()).map_err(|e| {
                        self.err(
                            b.password_hash.span(),
                            &format!("{key}.basic.password_hash"),
                            e,
                        )
                    })?;
                    Some((user.clone(), Arc::from(b.password_hash.get_ref().as_str())))
                }
            };
            let mut groups = Vec::with_capacity(c.groups.len());
            for g in &c.groups {
                groups.push(self.name(g, &format!("{key}.groups"))?);
            }
            let mut api_keys = Vec::with_capacity(c.api_keys.len());
            let mut plain_keys = false;
            for k in &c.api_keys {
                let (digest, plain) = self.api_key(k, &format!("{key}.api_keys"))?;
                let taken = out.iter().find(|o| o.api_keys.contains(&digest));
                if let Some(other) = taken
                    .map(|o| &o.name)
                    .or(api_keys.contains(&digest).then_some(&name))
                {
                    return Err(self.err(
                        k.span(),
                        &format!("{key}.api_keys"),
                        format!("this key is also consumer {other:?}'s: a key names one consumer"),
                    ));
                }
                plain_keys |= plain;
                api_keys.push(digest);
            }
            out.push(Consumer {
                name,
                groups,
                api_keys,
                plain_keys,
                basic,
            });
        }
        self.fits_id(out.len(), "consumers")?;
        Ok(out)
    }

    /// A `sha256:<64 hex digits>` digest, or a plain key hashed here (true: it was plain).
    fn api_key(&self, k: &Spanned<String>, key: &str) -> Result<([u8; 32], bool), ConfigError> {
        let s = k.get_ref();
        if let Some(hex) = s.strip_prefix("sha256:") {
            let mut digest = [0u8; 32];
            let ok = hex.len() == 64
                && hex
                    .as_bytes()
                    .chunks(2)
                    .zip(digest.iter_mut())
                    .all(|(pair, out)| {
                        let text = std::str::from_utf8(pair).unwrap_or("");
                        u8::from_str_radix(text, 16).map(|b| *out = b).is_ok()
                    });
            if !ok {
                return Err(self.err(
                    k.span(),
                    key,
                    "a hashed key is \"sha256:\" and 64 hex digits (sha256sum of the key)",
                ));
            }
            return Ok((digest, false));
        }
        if s.len() < 16 {
            return Err(self.err(
                k.span(),
                key,
                "an API key needs at least 16 characters (or give its \"sha256:...\" digest)",
            ));
        }
        Ok((crate::hash::sha256(s.as_bytes()), true))
    }

    pub(super) fn auth_providers(
        &self,
        files: &[AuthFile],
        upstreams: &[Upstream],
    ) -> Result<Vec<AuthProvider>, ConfigError> {
        let mut out: Vec<AuthProvider> = Vec::with_capacity(files.len());
        for (i, a) in files.iter().enumerate() {
            let key = format!("auth[{i}]");
            let name = self.name(&a.name, &format!("{key}.name"))?;
            if out.iter().any(|o| o.name == name) {
                return Err(self.err(
                    a.name.span(),
                    "",
                    format!("duplicate auth provider {name:?}"),
                ));
            }
            if let Some((stray, span)) = a.stray_key(a.kind.get_ref()) {
                return Err(self.err(
                    span,
                    &format!("{key}.{stray}"),
                    format!("`{stray}` does not apply to type {:?}", a.kind.get_ref()),
                ));
            }
            let kind = match a.kind.get_ref().as_str() {
                "api_key" => {
                    let header = match &a.header {
                        Some(h)
                            if crate::http::classify(h.get_ref().as_bytes()).is_forwarding()
                                || h.get_ref().eq_ignore_ascii_case("x-consumer") =>
                        {
                            return Err(self.err(
                                h.span(),
                                &format!("{key}.header"),
                                format!(
                                    "{:?} is a header the gateway owns (forwarding or identity) and removes from clients; name the key's header otherwise",
                                    h.get_ref()
                                ),
                            ))
                        }
                        Some(h) if crate::http::is_token(h.get_ref().as_bytes()) => {
                            Some(h.get_ref().to_ascii_lowercase())
                        }
                        Some(h) => {
                            return Err(self.err(
                                h.span(),
                                &format!("{key}.header"),
                                format!("{:?} is not a header name", h.get_ref()),
                            ))
                        }
                        None => None,
                    };
                    let query = match &a.query {
                        Some(q)
                            if !q.get_ref().is_empty()
                                && q.get_ref()
                                    .bytes()
                                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
                        {
                            Some(q.get_ref().clone())
                        }
                        Some(q) => {
                            return Err(self.err(
                                q.span(),
                                &format!("{key}.query"),
                                "a query parameter name is letters, digits, '-', '_' or '.'",
                            ))
                        }
                        None => None,
                    };
                    let header = match (header, &query) {
                        (None, None) => Some("x-api-key".to_owned()),
                        (h, _) => h,
                    };
                    AuthKind::ApiKey { header, query }
                }
                "basic" => AuthKind::Basic {
                    realm: self.realm(a, &key, &name)?,
                },
                "jwt" => AuthKind::Jwt(Box::new(self.jwt(a, &key, &name, upstreams)?)),
                other => {
                    return Err(self.err(
                        a.kind.span(),
                        &format!("{key}.type"),
                        format!("{other:?}: give \"api_key\", \"basic\" or \"jwt\""),
                    ))
                }
            };
            out.push(AuthProvider {
                name,
                kind,
                forward_credentials: a.forward_credentials,
            });
        }
        self.fits_id(out.len(), "auth providers")?;
        Ok(out)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsFile {
    pub origins: Spanned<Vec<Spanned<String>>>,
    pub methods: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub headers: Vec<Spanned<String>>,
    #[serde(default)]
    pub expose: Vec<Spanned<String>>,
    #[serde(default)]
    pub credentials: bool,
    pub max_age_s: Option<Spanned<u64>>,
}

/// A route's CORS policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsPolicy {
    /// Lower-case origins (`https://app.example.com`), or `*`.
    pub origins: Vec<String>,
    pub methods: Vec<String>,
    /// Request headers a preflight may ask for, lower-case.
    pub headers: Vec<String>,
    /// Response headers scripts may read.
    pub expose: Vec<String>,
    pub credentials: bool,
    pub max_age_s: u64,
}

impl Validator<'_> {
    pub(super) fn cors(&self, c: &Spanned<CorsFile>, key: &str) -> Result<CorsPolicy, ConfigError> {
        let f = c.get_ref();
        if f.origins.get_ref().is_empty() {
            return Err(self.err(
                f.origins.span(),
                &format!("{key}.origins"),
                "give at least one origin, or \"*\"",
            ));
        }
        let mut origins = Vec::new();
        for o in f.origins.get_ref() {
            let s = o.get_ref().to_ascii_lowercase();
            let ok = s == "*"
                || s.split_once("://").is_some_and(|(scheme, rest)| {
                    matches!(scheme, "http" | "https")
                        && !rest.is_empty()
                        && rest
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
                });
            if !ok {
                return Err(self.err(
                    o.span(),
                    &format!("{key}.origins"),
                    format!(
                        "{:?} is not an origin (scheme://host[:port], no path) or \"*\"",
                        o.get_ref()
                    ),
                ));
            }
            if s == "*" && f.credentials {
                return Err(self.err(
                    o.span(),
                    &format!("{key}.origins"),
                    "\"*\" cannot be used with credentials = true: list the origins",
                ));
            }
            origins.push(s);
        }
        let tokens = |list: &[Spanned<String>], field: &str, lower: bool| {
            list.iter()
                .map(|t| {
                    if crate::http::is_token(t.get_ref().as_bytes()) {
                        Ok(if lower {
                            t.get_ref().to_ascii_lowercase()
                        } else {
                            t.get_ref().clone()
                        })
                    } else {
                        Err(self.err(
                            t.span(),
                            &format!("{key}.{field}"),
                            format!("{:?} is not a token", t.get_ref()),
                        ))
                    }
                })
                .collect::<Result<Vec<String>, ConfigError>>()
        };
        let methods = match &f.methods {
            Some(m) => tokens(m, "methods", false)?,
            None => vec!["GET".into(), "HEAD".into(), "POST".into()],
        };
        let max_age_s = match &f.max_age_s {
            None => 600,
            Some(v) if *v.get_ref() <= 86_400 => *v.get_ref(),
            Some(v) => {
                return Err(self.err(
                    v.span(),
                    &format!("{key}.max_age_s"),
                    "must be at most 86400",
                ))
            }
        };
        Ok(CorsPolicy {
            origins,
            methods,
            headers: tokens(&f.headers, "headers", true)?,
            expose: tokens(&f.expose, "expose", true)?,
            credentials: f.credentials,
            max_age_s,
        })
    }
}

/// Whether `hash` is a PHC argon2id string or a bcrypt hash ringway can verify.
pub fn check_password_hash(hash: &str) -> Result<(), String> {
    if hash.starts_with("$argon2id$") {
        return argon2::PasswordHash::new(hash)
            .map(drop)
            .map_err(|e| format!("not a valid argon2id hash: {e}"));
    }
    if ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
        return hash
            .parse::<bcrypt::HashParts>()
            .map(drop)
            .map_err(|e| format!("not a valid bcrypt hash: {e}"));
    }
    Err("give an argon2id (\"$argon2id$...\") or bcrypt (\"$2b$...\") hash".into())
}
